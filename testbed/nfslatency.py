"""Cross-host fcntl lock latency on the NFS test bed (figures, not asserts).

Run on a bed that is up (``python -m testbed.nfsbed up DIR``)::

    python -m testbed.nfslatency DIR [--rounds 40]

Prints medians, measured inside the hypervisor guests on their own clocks
(guest clocks are not synchronised, so nothing compares two guests' times):

* ``pair``: one F_OFD_SETLK + F_OFD_UNLCK on byte 0 of a file on the NFS
  lockspace (no contention), and the same on the guest's local disk;
* ``refused``: a conflicting F_OFD_SETLK from hv2 while hv1 holds the lock
  (what a refused acquire costs: the lock request's round trip, EAGAIN);
* ``handoff``: hv1 and hv2 pass two locks back and forth (ping-pong): hv1
  releases "ping" and polls "pong", which hv2 releases as soon as it holds
  "ping". Half of hv1's round trip is one cross-host handoff, including the
  poll interval (1 ms) of the waiting side.
"""
from __future__ import annotations

import argparse
import json
import sys

from testbed.nfsbed import LOCKSPACE_MOUNT, Cluster

PY = r'''
import fcntl, json, os, statistics, struct, sys, time
F_OFD_GETLK, F_OFD_SETLK = 36, 37
def lk(fd, kind):
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", kind, 0, 0, 1, 0)); return True
    except OSError:
        return False
def take(fd):
    while not lk(fd, fcntl.F_WRLCK):
        time.sleep(0.001)
def opn(p):
    return os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
mode, d, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
if mode == "pair":
    for where, path in (("nfs", d + "/pair"), ("local", "/root/pair")):
        fd = opn(path); ts = []
        for _ in range(n):
            t = time.perf_counter(); assert lk(fd, fcntl.F_WRLCK); lk(fd, fcntl.F_UNLCK); ts.append(time.perf_counter() - t)
        out[where] = statistics.median(ts) * 1e3
elif mode == "hold":
    fd = opn(d + "/held"); assert lk(fd, fcntl.F_WRLCK)
    open("/root/holding", "w").close(); time.sleep(n)
elif mode == "refused":
    fd = opn(d + "/held"); ts = []
    for _ in range(n):
        t = time.perf_counter(); ok = lk(fd, fcntl.F_WRLCK); ts.append(time.perf_counter() - t); assert not ok
    out["refused"] = statistics.median(ts) * 1e3
elif mode in ("ping", "pong"):
    ping, pong = opn(d + "/ping"), opn(d + "/pong")
    if mode == "ping":
        take(ping)
        while not os.path.exists(d + "/pong-ready"):
            time.sleep(0.01)
        ts = []
        for _ in range(n):
            t = time.perf_counter(); lk(ping, fcntl.F_UNLCK); take(pong); ts.append(time.perf_counter() - t)
            lk(pong, fcntl.F_UNLCK); take(ping); time.sleep(0.3)
        out["handoff"] = statistics.median(ts) / 2 * 1e3
        open(d + "/done", "w").close()
    else:
        take(pong); open(d + "/pong-ready", "w").close()
        while not os.path.exists(d + "/done"):
            if lk(ping, fcntl.F_WRLCK):
                lk(pong, fcntl.F_UNLCK); lk(ping, fcntl.F_UNLCK); take(pong); time.sleep(0.15)
            time.sleep(0.001)
print(json.dumps(out))
'''


def _py(bed: Cluster, host: str, mode: str, d: str, n: int, wait: bool = True):
    script = f"cat > /root/lat.py <<'EOF'\n{PY}\nEOF\npython3 /root/lat.py {mode} {d} {n}"
    if not wait:
        return bed.spawn(host, script)
    return json.loads(bed.run(host, script, timeout=900).out.strip().splitlines()[-1])


def measure(bed: Cluster, rounds: int = 40) -> dict:
    d = f"{LOCKSPACE_MOUNT}/.latency"
    bed.run("hv1", f"rm -rf {d}; mkdir -p {d}; rm -f /root/holding")
    res = {"hv1_" + k: v for k, v in _py(bed, "hv1", "pair", d, rounds).items()}
    res.update({"hv2_" + k: v for k, v in _py(bed, "hv2", "pair", d, rounds).items()})
    holder = _py(bed, "hv1", "hold", d, 600, wait=False)
    bed.run("hv1", "while [ ! -e /root/holding ]; do sleep 0.1; done", timeout=120)
    res.update(_py(bed, "hv2", "refused", d, rounds))
    bed.run("hv1", "pkill -f 'lat.py hold' || true")
    holder.wait(60)
    pong = _py(bed, "hv2", "pong", d, 0, wait=False)
    res.update(_py(bed, "hv1", "ping", d, max(5, rounds // 4)))
    pong.wait(120)
    bed.run("hv1", f"rm -rf {d}")
    return {k: round(v, 2) for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.nfslatency", description=__doc__.split("\n")[0])
    ap.add_argument("state_dir")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    bed = Cluster.attach(args.state_dir)
    res = measure(bed, args.rounds)
    print(f"NFS lock latency, medians in ms (accel {bed.state['accel']}, lease {bed.lease_time} s):")
    print(f"  lock+unlock pair on NFS: hv1 {res['hv1_nfs']}, hv2 {res['hv2_nfs']}; "
          f"on the guest's local disk: hv1 {res['hv1_local']}, hv2 {res['hv2_local']}")
    print(f"  conflicting lock refused (EAGAIN) across hosts: {res['refused']}")
    print(f"  cross-host handoff (release on one host -> acquired on the other, 1 ms poll): {res['handoff']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
