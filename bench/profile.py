# SPDX-License-Identifier: GPL-3.0-or-later
"""Profile our daemon under benchmark load with py-spy (requirements/bench.txt).

    .venv/bin/python -m bench.profile                       # acqrel 4 clients, vmstart 4, idle 1,000
    .venv/bin/python -m bench.profile --scenario acqrel --clients 1 --seconds 8

py-spy samples the daemon from outside (--nonblocking, so it does not slow
it down) while the load generator drives it; the result is printed as the
top functions by own time ("self") and by time including callees ("total"),
and the raw collapsed stacks are written next to it for flame graphs
(https://www.speedscope.app accepts them).
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _path  # noqa: F401
from bench import scenarios
from bench.run import daemon_conf, log, raise_nofile
from bench.scenarios import Ctx, Params


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy is not installed: `make venv` (requirements/bench.txt)")
    return exe


def summarize(raw: Path, top: int = 15) -> str:
    own = collections.Counter()
    incl = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples"
    out = ["%d samples" % total, "", "  self%  function (file:line)"]
    out += ["  %5.1f  %s" % (100.0 * c / total, f) for f, c in own.most_common(top)]
    out += ["", "  total%  function (file:line), including callees"]
    out += ["  %5.1f  %s" % (100.0 * c / total, f) for f, c in incl.most_common(top + 10)]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("acqrel", "vmstart", "idle"), action="append",
                    help="default: acqrel, vmstart and idle")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--idle", type=int, default=1000, help="idle owners for --scenario idle")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lockd-profile")
    args = ap.parse_args(argv)
    from testbed.daemons import start_daemon

    raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lockd-profile-"))
    p = Params(acqrel_secs=args.seconds, vmstart_secs=args.seconds, idle_secs=args.seconds,
               idle_counts=(args.idle,), warmup=0.5)
    standin = None
    from bench.run import build_standin
    try:
        for scn in args.scenario or ["acqrel", "vmstart", "idle"]:
            d = start_daemon("py", work / scn, conf=daemon_conf(p),
                             env={"PYTHONPATH": str(_path.ROOT / "lockd_src")})
            ctx = Ctx(str(d.sock), d.pid, work / "disks", p, log)
            if scn == "vmstart" and standin is None:
                standin = build_standin(work)
            ctx.standin = standin
            raw = args.out / ("%s.collapsed" % scn)
            try:
                spy = None
                if scn == "idle":
                    # connect the idle owners first, profile only the measured part
                    holders, _ = scenarios._open_owners(
                        ctx, [[scenarios.wire.register(100_000 + i, ctx.fake_pid + 100_000 + i, 0),
                               scenarios.wire.restrict(1)] for i in range(args.idle)], "idle")
                    p2 = Params(**{**vars(p), "idle_counts": (0,)})
                    ctx.params = p2
                spy = subprocess.Popen([py_spy(), "record", "--nonblocking", "--rate", "250", "--format", "raw",
                                        "--pid", str(d.pid), "--duration", str(int(args.seconds + 1)),
                                        "--output", str(raw)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
                time.sleep(0.3)
                if scn == "acqrel":
                    r = scenarios.acqrel(ctx, args.clients)
                elif scn == "vmstart":
                    r = scenarios.vmstart(ctx, args.clients)
                else:
                    r = scenarios.idle(ctx)["0"]
                    scenarios.close_owners(holders)
                _, err = spy.communicate(timeout=args.seconds + 60)
                if spy.returncode:
                    log("py-spy failed: %s" % err.strip())
                    continue
            finally:
                d.close()
            log("%s %s: %s" % (scn, "%d clients" % args.clients if scn != "idle" else "%d idle owners" % args.idle,
                               ", ".join("%s %.1f" % (k, v) for k, v in r.items() if isinstance(v, float))))
            print(summarize(raw))
            print("raw stacks: %s\n" % raw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
