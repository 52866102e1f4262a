"""Differential test machinery: run one scenario against the C virtlockd and
against ours, and compare the two transcripts byte for byte.

Each run gets a fresh daemon and a fresh file tree at the SAME absolute path
(`TREE`): resource names and file paths appear verbatim in error messages, so
both daemons must see identical paths. The runs are sequential, never
concurrent: the C daemon's POSIX locks on the tree's files would otherwise
make ours report "busy" for reasons that have nothing to do with ours.

Around every scenario a *witness* client registers its own owner, takes an
exclusive lease and keeps its connection open. Afterwards the runner checks,
for both daemons, that the daemon is still alive, that the witness connection
still answers, and that the witness's lease is still held (a third client is
refused). So every bad-input case also proves "the daemon never dies, other
clients' leases and connections are unaffected".
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from tests.harness import require_c_virtlockd, require_root

# Imports lockd (the package under test): if it is missing, collection fails loudly.
from testbed.daemons import Daemon, start_daemon
from testbed.wire import EOF, UUID_B, UUID_W, Conn, Outcome, StandInOwner, describe

BASE = Path(f"/tmp/lockd-diff-{os.getpid()}")
TREE = BASE / "tree"
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())

Transcript = List[Tuple[str, "Outcome"]]


class Run:
    """What a scenario sees: one daemon, the tree, a transcript to fill."""

    def __init__(self, daemon: "Daemon", tree: Path):
        self.daemon = daemon
        self.kind = daemon.kind
        self.tree = tree
        self.transcript: Transcript = []
        self._conns: list = []
        self._owners: list = []

    # connections and owners
    def conn(self) -> "Conn":
        c = Conn(self.daemon.sock)
        self._conns.append(c)
        return c

    def registered(self, uuid: bytes = UUID_B, name: str = "vm2", oid: int = 2, pid: int = 0) -> "Conn":
        """A connection with a REGISTERed fake owner (the reply is recorded)."""
        c = self.conn()
        self.rec(f"register {name}", c.register(uuid, name, oid, pid or self.fake_pid(oid)))
        return c

    def owner(self, **kw) -> "StandInOwner":
        o = StandInOwner(self.daemon.sock, **kw)
        self._owners.append(o)
        for i, r in enumerate(o.replies):
            self.rec(f"stand-in owner setup call {i}", r)
        return o

    @staticmethod
    def fake_pid(i: int = 0) -> int:
        """Deterministic pids no process can have (same in both runs: they appear in messages)."""
        return PID_MAX + 100 + i

    # files
    def path(self, rel: str) -> str:
        return str(self.tree / rel)

    def mkfile(self, rel: str, size: int = 4096) -> str:
        p = self.tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            f.truncate(size)
        return str(p)

    def rec(self, label: str, out: "Outcome | str | bool | int | None") -> None:
        if isinstance(out, (bool, int)) or out is None:
            out = repr(out)
        self.transcript.append((label, out))

    def rec_exists(self, rel: str) -> None:
        self.rec(f"exists {rel}", (self.tree / rel).exists())

    def cleanup(self) -> None:
        for c in self._conns:
            c.close()
        for o in self._owners:
            o.kill()


def _fresh_tree() -> None:
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    os.chmod(BASE, 0o755)
    for name in ("disk1.img", "disk2.img", "witness.img"):
        with open(TREE / name, "wb") as f:
            f.truncate(1 << 20)


def run_scenario(kind: str, scenario: Callable[[Run], None], workdir: Path, conf=None) -> Transcript:
    _fresh_tree()
    # Daemon sockets live under BASE (mode 0755) so that a non-root test peer
    # can reach them; `workdir` only names the run.
    ddir = BASE / "daemons" / f"{workdir.name}-{kind}"
    if ddir.exists():
        shutil.rmtree(ddir)
    with start_daemon(kind, ddir, conf) as d:
        run = Run(d, TREE)
        witness = Conn(d.sock)
        try:
            run.rec("witness register", witness.register(UUID_W, "witness", 77, Run.fake_pid(77)))
            run.rec("witness acquire", witness.acquire("", run.path("witness.img")))
            scenario(run)
            # -- the daemon survived and other clients are unaffected --
            if not d.alive():
                raise AssertionError(f"{kind} daemon died during the scenario:\n{d.log_tail()}")
            run.rec("witness connection still served (frames before PONG)", repr(witness.barrier()))
            with Conn(d.sock) as probe:
                probe.register(UUID_B, "probe", 99, Run.fake_pid(99))
                run.rec("witness lease still held (probe acquire)", probe.acquire("", run.path("witness.img")))
        finally:
            run.cleanup()
            witness.close()
    return run.transcript


def compare(c: Transcript, py: Transcript) -> None:
    if c == py:
        return
    lines = ["C virtlockd and lockd disagree:"]
    for i in range(max(len(c), len(py))):
        cl, co = c[i] if i < len(c) else ("(missing)", "")
        pl, po = py[i] if i < len(py) else ("(missing)", "")
        mark = "  " if (cl, co) == (pl, po) else "!!"
        lines.append(f"{mark} step {i}: {cl}")
        if mark == "!!":
            lines.append(f"     C : {describe(co) if not isinstance(co, str) else co}")
            lines.append(f"     py: {describe(po) if not isinstance(po, str) else po}")
            if isinstance(co, bytes) and isinstance(po, bytes):
                lines.append(f"     C  hex: {co.hex()}")
                lines.append(f"     py hex: {po.hex()}")
    raise AssertionError("\n".join(lines))


@pytest.fixture
def differential(tmp_path):
    """differential(scenario) runs it on both daemons, asserts identical
    transcripts, and returns the (shared) transcript for extra assertions."""
    require_root()
    require_c_virtlockd()

    def run(scenario: Callable[[Run], None], conf=None) -> Transcript:
        c = run_scenario("c", scenario, tmp_path, conf)
        # LOCKD_DIFF_SELFTEST=1 compares the C daemon with itself: it shows that
        # the scenarios are deterministic (a differential test that flaps on C
        # alone proves nothing about ours).
        py = run_scenario("c" if os.environ.get("LOCKD_DIFF_SELFTEST") == "1" else "py",
                          scenario, tmp_path / "second", conf)
        compare(c, py)
        # The shared invariants hold (for both, since they are equal):
        assert c[-2][1] == "[]", f"witness connection broken: {c[-2]}"
        assert b"is locked" in c[-1][1], f"witness lease lost: {describe(c[-1][1])}"
        return c

    yield run
    if BASE.exists():
        shutil.rmtree(BASE, ignore_errors=True)


@pytest.fixture
def on_daemon(tmp_path):
    """on_daemon(kind, scenario) runs a scenario on one daemon (for ours-only tests)."""
    require_root()

    def run(kind: str, scenario: Callable[[Run], None], conf=None) -> Transcript:
        if kind == "c":
            require_c_virtlockd()
        return run_scenario(kind, scenario, tmp_path, conf)

    yield run
    if BASE.exists():
        shutil.rmtree(BASE, ignore_errors=True)
