# SPDX-License-Identifier: GPL-3.0-or-later
"""Logging as libvirt's daemons do it: ``log_level``, ``log_outputs``,
``LIBVIRT_LOG_OUTPUTS``/``LIBVIRT_DEBUG``, and journald priorities."""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from .errors import Fatal


def _default_log_file(privileged: bool) -> str:
    if privileged:
        return "/var/log/libvirt/virtlockd.log"
    return os.path.join(os.path.expanduser("~"), ".cache", "libvirt", "virtlockd.log")


_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def setup_logging(cfg: dict, verbose: bool, daemonized: bool) -> None:
    """(Re)configure the ``lockd`` logger from the configuration."""
    root = logging.getLogger("lockd")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = _LEVELS.get(cfg.get("log_level") or 3, logging.WARNING)
    if verbose and level > logging.INFO:
        level = logging.INFO
    env_outputs = os.environ.get("LIBVIRT_LOG_OUTPUTS")
    outputs = env_outputs if env_outputs is not None else cfg.get("log_outputs") or ""
    if os.environ.get("LIBVIRT_DEBUG"):
        level = logging.DEBUG
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(message)s" if journal else "%(asctime)s: %(process)d: %(levelname)s : %(message)s"
    handlers = []
    for spec in outputs.split():
        parts = spec.split(":", 2)
        try:
            out_level = _LEVELS.get(int(parts[0]), logging.WARNING)
        except ValueError:
            raise Fatal("invalid log output %r in log_outputs: expected LEVEL:TYPE[:ARG]" % spec)
        kind = parts[1] if len(parts) > 1 else "stderr"
        if kind == "file" and len(parts) == 3:
            try:
                os.makedirs(os.path.dirname(parts[2]) or ".", exist_ok=True)
                h = logging.FileHandler(parts[2])
            except OSError as e:
                raise Fatal("cannot open log file %s: %s" % (parts[2], e.strerror))
            h.setFormatter(logging.Formatter("%(asctime)s: %(process)d: %(levelname)s : %(message)s"))
        elif kind == "syslog":
            try:
                h = logging.handlers.SysLogHandler(address="/dev/log")
                h.ident = (parts[2] if len(parts) == 3 else "virtlockd") + ": "
            except OSError:
                h = logging.StreamHandler(sys.stderr)
        elif kind in ("stderr", "journald"):
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(_JournalFormatter(fmt) if journal else logging.Formatter(fmt))
        else:
            raise Fatal("unknown log output type %r in log_outputs (use stderr, file, syslog or journald)" % kind)
        h.setLevel(out_level)
        handlers.append(h)
    if not handlers:
        if daemonized and not journal:
            path = _default_log_file(os.geteuid() == 0)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                h = logging.FileHandler(path)
            except OSError:
                h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s: %(process)d: %(levelname)s : %(message)s"))
        else:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(_JournalFormatter(fmt) if journal else logging.Formatter(fmt))
        handlers.append(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(min([level] + [h.level or level for h in handlers]))
    root.propagate = False


class _JournalFormatter(logging.Formatter):
    """Prefix ``<N>`` syslog priorities so journald keeps the level."""

    _PRI = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        return "<%d>%s" % (self._PRI.get(record.levelno, 6), super().format(record))
