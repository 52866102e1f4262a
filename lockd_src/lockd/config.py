# SPDX-License-Identifier: GPL-3.0-or-later
"""``virtlockd.conf``: libvirt's virConf syntax, the keys and their defaults.

``DEFAULTS`` is the single source of truth for configuration defaults; the
role's ``defaults/main.yml`` is tested against it.
"""
from __future__ import annotations

import re
from typing import Any, Dict

DEFAULTS: Dict[str, Any] = {
    # libvirt's keys (spec 4.12)
    "log_level": 0,            # 0 = libvirt default (3, warnings)
    "log_filters": "",
    "log_outputs": "",
    # libvirt defaults to 1024, which caps a host at 1023 running VMs; one
    # connection per running VM means 16384 serves 10,000 VMs with headroom.
    "max_clients": 16384,
    "admin_max_clients": 5000,
    # lockd extensions (the C daemon ignores unknown keys)
    "state_dir": "/run/virtlockd",
    "lock_type": "ofd",
    "max_clients_grace": 2,    # seconds a client over max_clients waits for a slot
    # Storage on network filesystems (docs/design.md, "Hung storage" and "Fencing")
    "io_timeout": 10,          # seconds a storage call may take before its request fails
    "storage_workers": "network",   # calls in worker threads on: "network" filesystems, "all", "none"
    "on_lockfailure": "poweroff",   # lease at risk or lost: "poweroff" (SIGKILL), "pause" (SIGSTOP), "ignore"
    "nfs_lease_time": 90,      # the NFS server's lease time (seconds): after that it grants our locks elsewhere
}

STORAGE_WORKERS = ("network", "all", "none")
ON_LOCKFAILURE = ("poweroff", "pause", "ignore")

# Keys libvirt knows but the daemon ignores.
IGNORED = {"log_buffer_size"}

_TYPES = {
    "log_level": int, "max_clients": int, "admin_max_clients": int, "max_clients_grace": int,
    "log_filters": str, "log_outputs": str, "state_dir": str, "lock_type": str,
    "io_timeout": int, "storage_workers": str, "on_lockfailure": str, "nfs_lease_time": int,
}


class ConfigError(Exception):
    """A configuration file cannot be used; the message names file and line."""


_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+) | (?P<comment>\#[^\n]*) | (?P<nl>\n) |
    (?P<name>[A-Za-z_][A-Za-z0-9_.]*) | (?P<eq>=) | (?P<comma>,) | (?P<lb>\[) | (?P<rb>\]) |
    (?P<int>[+-]?[0-9]+) | (?P<dq>"[^"\n]*") | (?P<sq>'[^'\n]*') | (?P<semi>;)
""", re.X)


def parse(text: str, filename: str = "<string>") -> Dict[str, Any]:
    """Parse virConf text into a dict (ints, strings, lists of those)."""
    toks = []
    line = 1
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ConfigError("%s:%d: unexpected character %r" % (filename, line, text[pos]))
        kind = m.lastgroup
        if kind == "nl":
            toks.append(("nl", None, line))
            line += 1
        elif kind not in ("ws", "comment"):
            toks.append((kind, m.group(), line))
        pos = m.end()
    toks.append(("eof", None, line))

    out: Dict[str, Any] = {}
    i = 0

    def err(msg, ln):
        raise ConfigError("%s:%d: %s" % (filename, ln, msg))

    def value(i):
        kind, text_, ln = toks[i]
        if kind == "int":
            return int(text_), i + 1
        if kind in ("dq", "sq"):
            return text_[1:-1], i + 1
        if kind == "lb":
            items = []
            i += 1
            while True:
                while toks[i][0] == "nl":
                    i += 1
                if toks[i][0] == "rb":
                    return items, i + 1
                v, i = value(i)
                if isinstance(v, list):
                    err("nested lists are not allowed", toks[i][2])
                items.append(v)
                while toks[i][0] == "nl":
                    i += 1
                if toks[i][0] == "comma":
                    i += 1
                elif toks[i][0] != "rb":
                    err("expecting ',' or ']' in list", toks[i][2])
        err("expecting a value (an integer, a quoted string or a [list])", ln)

    while toks[i][0] != "eof":
        kind, text_, ln = toks[i]
        if kind in ("nl", "semi"):
            i += 1
            continue
        if kind != "name":
            err("expecting a setting name", ln)
        i += 1
        if toks[i][0] != "eq":
            err("expecting '=' after %s" % text_, toks[i][2])
        i += 1
        v, i = value(i)
        out[text_] = v
        if toks[i][0] not in ("nl", "semi", "eof"):
            err("expecting end of line after the value of %s" % text_, toks[i][2])
    return out


def load(path: str | None, required: bool) -> Dict[str, Any]:
    """Load and validate a config file; returns DEFAULTS overlaid with its keys."""
    cfg = dict(DEFAULTS)
    if path is None:
        return cfg
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError("Can't load config file: %s: No such file or directory" % path) from None
        return cfg
    except OSError as e:
        raise ConfigError("Can't load config file: %s: %s" % (path, e.strerror)) from None
    try:
        raw = parse(text, path)
    except ConfigError as e:
        raise ConfigError("Can't load config file: %s" % e) from None
    for key, val in raw.items():
        if key in IGNORED or key not in DEFAULTS:
            continue
        want = _TYPES[key]
        if want is int and (not isinstance(val, int) or val < 0):
            raise ConfigError("Can't load config file: %s: %s must be a non-negative integer, got %r"
                              % (path, key, val))
        if want is str and not isinstance(val, str):
            raise ConfigError("Can't load config file: %s: %s must be a quoted string, got %r"
                              % (path, key, val))
        cfg[key] = val
    if cfg["lock_type"] not in ("ofd", "posix"):
        raise ConfigError("Can't load config file: %s: lock_type must be \"ofd\" or \"posix\", got %r"
                          % (path, cfg["lock_type"]))
    if cfg["max_clients"] < 1:
        raise ConfigError("Can't load config file: %s: max_clients must be at least 1" % path)
    for key, allowed in (("storage_workers", STORAGE_WORKERS), ("on_lockfailure", ON_LOCKFAILURE)):
        if cfg[key] not in allowed:
            hint = " (a lock daemon cannot restart a VM: use \"poweroff\")" if cfg[key] == "restart" else ""
            raise ConfigError("Can't load config file: %s: %s must be one of %s, got %r%s"
                              % (path, key, ", ".join('"%s"' % a for a in allowed), cfg[key], hint))
    for key in ("io_timeout", "nfs_lease_time"):
        if cfg[key] < 1:
            raise ConfigError("Can't load config file: %s: %s must be at least 1 (seconds)" % (path, key))
    return cfg
