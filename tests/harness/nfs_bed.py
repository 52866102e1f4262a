"""The session's one NFS test bed (testbed/nfsbed.py), shared by every test
that needs separate kernels on real NFS: the ``nfs_cluster`` and
``nfs_partition`` Molecule scenarios and the hung-storage reliability test.

* A test asks for it with the ``nfs_bed`` fixture, or carries the ``nfsbed``
  marker (the Molecule wrapper: its scenarios attach through
  ``$LOCKD_NFS_BED``, testbed.nfsbed ``attach-or-up``).
* Boot early: once collection is done and a selected test wants the bed,
  :func:`start_early` starts ``python -m testbed.nfsbed up`` in the
  background (image build when not cached, then ~1.5-2 min of TCG boots),
  so it comes up while the tests before it run. The fixture waits for it,
  showing its progress.
* ``$LOCKD_NFS_BED`` already set (a bed brought up by hand with the CLI): the
  session attaches and never takes it down.
* The bed the session booted goes down in :func:`shutdown` (sessionfinish).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import REPO
from testbed.nfsbed import ENV, BedError, Cluster
from tests.harness import require, require_root

MARKER = "nfsbed"
STATE = REPO / ".cache" / "nfsbed" / "session"
UP_LOG = STATE.parent / "session-up.log"
UP_TIMEOUT = 1800  # a hang guard: cold image build + 3 TCG boots on a loaded machine
_session: dict = {"proc": None, "owned": False}


def wanted(item) -> bool:
    return item.get_closest_marker(MARKER) is not None or "nfs_bed" in getattr(item, "fixturenames", ())


def _can_boot() -> bool:
    return os.geteuid() == 0 and Path("/usr/bin/qemu-system-x86_64").exists()


def start_early(session) -> None:
    """pytest_collection_finish: start booting the bed in the background if a selected test wants it."""
    if session.config.option.collectonly or os.environ.get(ENV) or _session["proc"]:
        return
    if not _can_boot() or not any(wanted(item) for item in session.items):
        return
    _start()
    sys.stderr.write(f"\n[nfsbed] booting the shared NFS test bed in the background (log: {UP_LOG})\n")


def _wait_for_background(echo) -> None:
    proc = _session["proc"]
    t0 = time.monotonic()
    shown = 0
    while proc.poll() is None:
        lines = UP_LOG.read_text(errors="replace").splitlines()
        for line in lines[shown:]:
            echo(line)
        shown = len(lines)
        if time.monotonic() - t0 > UP_TIMEOUT:
            proc.kill()
            pytest.fail(f"the NFS test bed did not come up within {UP_TIMEOUT} s; see {UP_LOG}", pytrace=False)
        time.sleep(1)
    for line in UP_LOG.read_text(errors="replace").splitlines()[shown:]:
        echo(line)
    if proc.returncode != 0:
        pytest.fail(f"the NFS test bed failed to come up (exit {proc.returncode}); see {UP_LOG}:\n"
                    + "\n".join(UP_LOG.read_text(errors="replace").splitlines()[-40:]), pytrace=False)


def get(pytestconfig) -> Cluster:
    """The session's bed: attached ($LOCKD_NFS_BED), booted in the background, or booted now."""
    require_root()
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def echo(msg: str) -> None:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(msg + "\n")

    if os.environ.get(ENV) and not _session["owned"]:
        try:
            return Cluster.attach(os.environ[ENV])
        except BedError as err:
            pytest.fail(f"{ENV} is set but names no running bed: {err}", pytrace=False)
    require(_can_boot(), "qemu-system-x86_64 (scripts/install-deps.sh) to boot the NFS test bed")
    if _session["proc"] is None:
        _start()
    _wait_for_background(echo)
    os.environ[ENV] = str(STATE)
    return Cluster.attach(STATE)


def _start() -> None:
    """Start ``python -m testbed.nfsbed up STATE`` in the background (a bed left by a killed session goes first)."""
    UP_LOG.parent.mkdir(parents=True, exist_ok=True)
    if (STATE / "state.json").exists():
        subprocess.run([sys.executable, "-m", "testbed.nfsbed", "down", str(STATE)], cwd=REPO, capture_output=True)
    with open(UP_LOG, "w") as log:
        _session["proc"] = subprocess.Popen([sys.executable, "-m", "testbed.nfsbed", "up", str(STATE)],
                                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
    _session["owned"] = True


def shutdown() -> None:
    """pytest_sessionfinish: take down the bed this session booted (never an attached one)."""
    if not _session["owned"]:
        return
    proc = _session["proc"]
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(60)
    subprocess.run([sys.executable, "-m", "testbed.nfsbed", "down", str(STATE)], cwd=REPO, capture_output=True)
    if os.environ.get(ENV) == str(STATE):
        del os.environ[ENV]
    _session.update(proc=None, owned=False)
