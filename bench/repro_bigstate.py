# SPDX-License-Identifier: GPL-3.0-or-later
"""Reproducer: SIGUSR1 re-exec of our daemon with a large state.

    .venv/bin/python -m bench.repro_bigstate                 # 8,000 leases on ~950-char paths
    .venv/bin/python -m bench.repro_bigstate --leases 2000 --depth 1

Found by the benchmark work (2026-11-26): the re-exec state file grows with
the number of leases times the path length; `restore_from_exec()` read at
most 10 MiB of it, so a larger state was truncated, judged corrupt, and the
new image cold-started: the inherited lock socket was never served again
(clients hang) while the kernel locks stayed held by the leaked fds. Fixed in
1c3920d ("compact state format read whole"); kept as a regression check. The daemon runs in
a private mount namespace with a tmpfs /run, so a cold start cannot take over
the host's /run/libvirt/virtlockd-sock.

Exit status 0 when the daemon serves again and every lease survived, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import _path  # noqa: F401
from bench import loadgen, procstat, scenarios, wire
from bench.run import raise_nofile
from bench.scenarios import Ctx, Params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.repro_bigstate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leases", type=int, default=8000, help="4 per owner")
    ap.add_argument("--depth", type=int, default=8, help="directory levels of ~110 chars each")
    args = ap.parse_args(argv)
    from testbed.daemons import start_daemon

    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="lockd-bigstate-"))
    deep = work / "disks"
    for i in range(args.depth):
        deep = deep / ("d%d-%s" % (i, "x" * 110))
    files = wire.lease_files(deep, "big", args.leases)
    argv_ = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0" "$@"', sys.executable, "-m", "lockd"]
    d = start_daemon("py", work / "py", conf={"max_clients": 12000, "state_dir": "/run/virtlockd"},
                     env={"PYTHONPATH": str(_path.ROOT / "lockd_src")}, argv=argv_)
    ok = True
    try:
        ctx = Ctx(str(d.sock), d.pid, work / "disks", Params(timeout=20.0), print)
        n = args.leases // 4
        scripts = [[wire.register(300_000 + i, ctx.fake_pid + 300_000 + i, 0)]
                   + [wire.acquire(files[i * 4 + j], 1 + j) for j in range(4)] for i in range(n)]
        holders, _ = scenarios._open_owners(ctx, scripts, "big")
        try:
            print("%d leases on %d-char paths held; locked in the kernel: %d"
                  % (n * 4, len(files[0]), procstat.locked_count(files[:n * 4])))
            os.kill(d.pid, signal.SIGUSR1)
            time.sleep(3)
            try:
                s = wire.connect(ctx.sock, 10)
                wire.call_ok(s, wire.register(1, ctx.fake_pid, 0), "REGISTER after re-exec")
                s.close()
                print("served again after re-exec")
            except Exception as exc:  # noqa: BLE001
                ok = False
                print("NOT served again after re-exec: %s" % exc)
            if ok:
                w = loadgen.Worker("prober", loadgen.prober, ctx.sock, files[:n * 4], 399_998,
                                   ctx.fake_pid + 399_998, 32, 30.0)
                probe = w.recv(timeout=120)[1]
                w.join(10)
                print("conflicting ACQUIREs refused: %d of %d" % (probe["busy"], n * 4))
                ok = probe["busy"] == n * 4
        finally:
            scenarios.close_owners(holders)
    finally:
        d.close()
        print("daemon log:\n" + d.log_tail(10))
        shutil.rmtree(work, ignore_errors=True)
    print("RESULT: %s" % ("ok" if ok else "FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
