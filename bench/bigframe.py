# SPDX-License-Identifier: GPL-3.0-or-later
"""What one maximal frame costs a daemon: the protocol allows 32 MiB.

    .venv/bin/python -m bench.bigframe                 # C virtlockd and ours, 3 rounds each
    .venv/bin/python -m bench.bigframe --rounds 5 --lockd-src /path/to/other/lockd_src

Each daemon is started the way `make bench` starts it (socket activation,
private tmpfs /run). One connection sends a single CALL of the protocol's
maximum size (a 32 MiB ACQUIRE_RESOURCE whose payload is zeros) in 1 MiB
writes; the daemon answers it with an error. The figure is the daemon's own
CPU time (utime + stime from /proc) from the first byte to the reply, so the
client's cost is not in it. Prints the median and range per daemon, and the
ratio. A receive path that re-copies its buffer on every read is quadratic
here (seconds of CPU); a linear one costs a few tens of milliseconds.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import _path  # noqa: F401
from bench import procstat
from bench.wire import BenchError

FRAME = 32 * 1024 * 1024 + 4      # MESSAGE_MAX plus the length word: the largest legal frame
CHUNK = 1 << 20


def big_call() -> bytes:
    from lockd import protocol as P
    return P.encode_call(P.PROC_ACQUIRE_RESOURCE, 1, bytes(FRAME - 28))


def one_round(kind: str, workdir: Path, tag: str, frame: bytes, lockd_src) -> float:
    from bench.run import start
    from bench.scenarios import Params
    if lockd_src:
        os.environ["LOCKD_BENCH_SRC"] = str(lockd_src)
    with start(kind, workdir, tag, Params()) as d:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(str(d.sock))
        time.sleep(0.2)                       # let accept() settle: measure the frame only
        cpu0 = procstat.cpu_seconds(d.pid)
        view = memoryview(frame)
        for i in range(0, len(frame), CHUNK):
            s.sendall(view[i:i + CHUNK])
        reply = s.recv(65536)
        cpu = procstat.cpu_seconds(d.pid) - cpu0
        s.close()
        if len(reply) < 28:
            raise BenchError("%s sent no reply to the 32 MiB frame" % kind)
    return cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bigframe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--daemons", default="c,py")
    ap.add_argument("--lockd-src", type=Path, help="run ours from this lockd_src (e.g. an older checkout)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.bigframe: must run as root (like make bench)", file=sys.stderr)
        return 2
    frame = big_call()
    workdir = Path(tempfile.mkdtemp(prefix="lockd-bigframe-"))
    kinds = args.daemons.split(",")
    figures = {k: [] for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds:               # A B A B
            cpu = one_round(kind, workdir, "big%d" % rnd, frame, args.lockd_src if kind == "py" else None)
            figures[kind].append(cpu)
            print("[bigframe] round %d %-3s %.3f s daemon CPU" % (rnd + 1, kind, cpu), flush=True)
    print("\none 32 MiB frame, daemon CPU seconds (median, min-max over %d rounds):" % args.rounds)
    for kind, xs in figures.items():
        print("  %-3s %.3f  (%.3f-%.3f)" % (kind, statistics.median(xs), min(xs), max(xs)))
    if "c" in figures and "py" in figures and statistics.median(figures["c"]) > 0:
        print("  ours/C: %.2fx" % (statistics.median(figures["py"]) / statistics.median(figures["c"])))
    print("Next step: record the figures in bench/profile-notes.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
