# SPDX-License-Identifier: GPL-3.0-or-later
"""In-process micro-benchmark of our daemon's per-RPC path (no event loop, no
client, no scheduler noise): what one ACQUIRE + RELEASE costs in Python.

    .venv/bin/python -m bench.micro            # timing, then a cProfile of the same loop
    .venv/bin/python -m bench.micro --n 50000 --no-profile

It builds a real `lockd.server.Server` on a `DaemonState` (journal in a
temporary state dir), attaches one side of a socketpair as a lock connection
that REGISTERed a fake owner, and feeds it precomputed ACQUIRE/RELEASE frames
through `LockConn.process` + `flush` (the code path a readable socket takes
after `recv()`), draining the replies from the other side. This is the part of
"daemon CPU per RPC" that Python code spends; the rest is epoll_wait/read/
write in the kernel (compare with `strace -c -p <pid>` under `make bench`).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench import _path  # noqa: F401
from bench import wire


def build(tmp: Path):
    from lockd.config import DEFAULTS
    from lockd.journal import Journal
    from lockd.lockspace import Locks
    from lockd.loop import EventLoop
    from lockd.program import LockProgram
    from lockd.server import LockConn, Server
    from lockd.state import DaemonState, Recorder
    from lockd.systemd import Notifier

    state_dir = tmp / "state"
    state_dir.mkdir()
    journal = Journal(str(state_dir / "journal"))
    journal.open()
    cfg = dict(DEFAULTS, state_dir=str(state_dir))
    state = DaemonState(cfg, Locks(cfg.get("lock_type", "ofd")), Recorder(journal, Notifier(""), False),
                        EventLoop(), privileged=False)
    srv = Server(state, LockProgram(state))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    c = LockConn(srv, ours, -1, os.geteuid()).start()
    return srv, c, theirs


def feeder(c):
    """What the loop does with a readable socket's bytes."""
    rbuf, process, flush = c.rbuf, c.process, c.flush

    def feed(data: bytes) -> None:
        rbuf.extend(data)
        process()
        flush()
    return feed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="acquire+release pairs")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="lockd-micro-"))
    disk = wire.lease_files(tmp / "disks", "micro", 1)[0]
    srv, c, peer = build(tmp)
    fake = wire.fake_pid_base()
    process = feeder(c)
    process(wire.register(0, fake, 0))
    peer.recv(4096)
    acq, rel = wire.acquire(disk, 1), wire.release(disk, 2)
    ok_a, ok_r = wire.ok_reply(acq), wire.ok_reply(rel)
    recv = peer.recv

    def loop(n):
        for _ in range(n):
            process(acq)
            if recv(4096) != ok_a:
                raise SystemExit("unexpected reply to ACQUIRE")
            process(rel)
            if recv(4096) != ok_r:
                raise SystemExit("unexpected reply to RELEASE")

    loop(1000)  # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    loop(args.n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the loop's own recv() costs ~1 us per RPC; it is included
    print("in-process: %.1f us CPU per RPC (%.1f us wall), %d acquire+release pairs, %s"
          % (cpu / args.n / 2 * 1e6, wall / args.n / 2 * 1e6, args.n, sys.version.split()[0]))
    if not args.no_profile:
        prof = cProfile.Profile()
        prof.enable()
        loop(args.n)
        prof.disable()
        st = pstats.Stats(prof)
        st.sort_stats("tottime").print_stats(18)
        calls = sum(v[1] for v in st.stats.values())
        print("function calls per RPC: %.1f" % (calls / args.n / 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
