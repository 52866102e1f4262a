# SPDX-License-Identifier: GPL-3.0-or-later
"""The five scenarios of issue 6. Each takes a running `Daemon` (from
testbed/daemons.py) and returns a flat dict of figures.

Daemon CPU comes from /proc/<pid>/stat (utime+stime, all threads) read at the
start and end of the measurement window; the client's CPU the same way from
the worker processes (plus their reaped stand-in children).
"""
from __future__ import annotations

import array
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from bench import loadgen, procstat, wire
from bench.loadgen import Worker
from bench.wire import BenchError


@dataclass
class Params:
    acqrel_levels: Sequence[int] = (1, 4, 16, 64)
    acqrel_secs: float = 2.0
    acqrel_workers: int = 2             # client processes; connections are spread over them
    vmstart_levels: Sequence[int] = (1, 4, 16, 64)
    vmstart_secs: float = 2.0
    idle_counts: Sequence[int] = (0, 1000, 5000)
    idle_secs: float = 2.0
    idle_vmstart_at: int = 1000         # also VM start+stop (4 clients) with this many idle owners
    scale_owners: int = 10_000
    reexec_owners: int = 2_500          # x 4 leases = 10,000 leases
    leases_per_reexec_owner: int = 4
    holder_batch: int = 250             # connections set up together per holder process
    holder_conns: int = 2_500           # connections per holder process
    warmup: float = 0.3
    rounds: int = 4                     # A B A B ... rounds of acqrel/vmstart/idle
    heavy_rounds: int = 1               # rounds of scale/reexec (fresh daemon each)
    timeout: float = 120.0              # a reply later than this counts as a hang
    max_clients: int = 12_000           # both daemons; C's default 1024 hangs at the 1024th VM
    limit_clients: int = 100            # the limit scenario's max_clients
    limit_wait: float = 6.0             # how long the client over the limit waits for an answer

    @classmethod
    def quick(cls) -> "Params":
        return cls(acqrel_levels=(1, 4), acqrel_secs=0.3, vmstart_levels=(1, 4), vmstart_secs=0.3,
                   idle_counts=(0, 100), idle_secs=0.3, idle_vmstart_at=100, scale_owners=200, reexec_owners=50,
                   holder_batch=50, holder_conns=100, warmup=0.05, rounds=1, heavy_rounds=1,
                   timeout=30.0, limit_clients=20, limit_wait=4.0)


@dataclass
class Ctx:
    sock: str
    pid: int
    disks: Path                          # where the disk-image stand-ins live
    params: Params
    log: Callable[[str], None]
    standin: Optional[str] = None        # the compiled bench/standin.c, if any
    fake_pid: int = field(default_factory=wire.fake_pid_base)


def _pct(values: array.array, q: float) -> float:
    if not values:
        return float("nan")
    vs = sorted(values)
    return vs[min(len(vs) - 1, int(q * len(vs)))]


def _lat(blob_list: List[bytes]) -> array.array:
    out = array.array("q")
    for b in blob_list:
        a = array.array("q")
        a.frombytes(b)
        out.extend(a)
    return out


def _sleep_until(t: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


def _timed(ctx: Ctx, workers: List[Worker], secs: float) -> dict:
    """Release the ready workers together and measure daemon + client CPU over the window."""
    p = ctx.params
    try:
        for w in workers:
            w.recv(timeout=p.timeout, expect="ready")
        start = time.monotonic() + p.warmup
        end = start + secs
        for w in workers:
            w.send(("go", int(start * 1e9), int(end * 1e9), int((end + p.timeout) * 1e9)))
        _sleep_until(start)
        u0, s0 = procstat.cpu_split(ctx.pid)
        c0 = sum(w.cpu() for w in workers)
        _sleep_until(end)
        u1, s1 = procstat.cpu_split(ctx.pid)
        c1 = sum(w.cpu() for w in workers)
        results = [w.recv(timeout=p.timeout + secs, expect="done")[1] for w in workers]
        for w in workers:
            w.send(("exit",))
        for w in workers:
            if w.join(p.timeout) is None:
                raise BenchError("worker %s did not exit" % w.name)
    except BaseException:
        loadgen.kill_all(workers)
        raise
    errors = [e for r in results for e in r.get("errors", [])]
    if errors:
        raise BenchError("%d bad replies, first: %s" % (len(errors), errors[0]))
    return {"secs": secs, "daemon_cpu": (u1 - u0) + (s1 - s0), "daemon_user": u1 - u0,
            "client_cpu": c1 - c0, "results": results}


# ---------------------------------------------------------------------------

def acqrel(ctx: Ctx, clients: int) -> dict:
    p = ctx.params
    names = wire.lease_files(ctx.disks, "acqrel", clients)
    owners = [(i, ctx.fake_pid + i, names[i]) for i in range(clients)]
    nw = min(clients, p.acqrel_workers)
    workers = [Worker("acqrel-%d" % k, loadgen.acqrel_worker, ctx.sock, owners[k::nw]) for k in range(nw)]
    run = _timed(ctx, workers, p.acqrel_secs)
    lat = _lat([r["lat"] for r in run["results"]])
    ops = sum(r["ops"] for r in run["results"])
    if ops == 0:
        raise BenchError("no operation completed in %.1f s" % p.acqrel_secs)
    return {
        "pairs_s": ops / 2 / p.acqrel_secs,
        "p50_us": _pct(lat, 0.50) / 1e3,
        "p99_us": _pct(lat, 0.99) / 1e3,
        "cpu_us_rpc": run["daemon_cpu"] / ops * 1e6,
        "user_us_rpc": run["daemon_user"] / ops * 1e6,
        "daemon_cores": run["daemon_cpu"] / p.acqrel_secs,
        "client_cores": run["client_cpu"] / p.acqrel_secs,
        "rpcs": ops,
    }


def vmstart(ctx: Ctx, clients: int) -> dict:
    p = ctx.params
    sets_per_worker = 8
    files = wire.lease_files(ctx.disks, "vm", clients * sets_per_worker * 4)
    workers = []
    for w in range(clients):
        base = w * sets_per_worker * 4
        sets = [files[base + 4 * k: base + 4 * k + 4] for k in range(sets_per_worker)]
        workers.append(Worker("vmstart-%d" % w, loadgen.vmstart_worker, ctx.sock, w, sets, ctx.standin))
    run = _timed(ctx, workers, p.vmstart_secs)
    # Every VM was stopped: once the daemon has handled the last EOFs, no disk
    # may still be locked (proves the owner-EOF release path ran, for both).
    deadline = time.monotonic() + 5.0
    while True:
        leaked = procstat.locked_count(files)
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cyc = _lat([r["lat"] for r in run["results"]])
    start = _lat([r["lat_start"] for r in run["results"]])
    rpc = _lat([r["lat_rpc"] for r in run["results"]])
    n = sum(r["ops"] for r in run["results"])
    if n == 0:
        raise BenchError("no VM start+stop cycle completed in %.1f s" % p.vmstart_secs)
    return {
        "cycles_s": n / p.vmstart_secs,
        "p50_ms": _pct(cyc, 0.50) / 1e6,
        "p99_ms": _pct(cyc, 0.99) / 1e6,
        "start_p99_ms": _pct(start, 0.99) / 1e6,
        "rpc_p99_us": _pct(rpc, 0.99) / 1e3,
        "cpu_us_cycle": run["daemon_cpu"] / n * 1e6,
        "daemon_cores": run["daemon_cpu"] / p.vmstart_secs,
        "client_cores": run["client_cpu"] / p.vmstart_secs,
        "busy": sum(r["busy"] for r in run["results"]),
        "leaked": leaked,
        "cycles": n,
    }


def _open_owners(ctx: Ctx, scripts: List[List[bytes]], tag: str) -> tuple:
    """Fork holder processes for the owner scripts; returns (holders, seconds to set all up)."""
    p = ctx.params
    holders = [Worker("%s-%d" % (tag, k), loadgen.holder, ctx.sock, scripts[lo:lo + p.holder_conns],
                      p.holder_batch, p.timeout)
               for k, lo in enumerate(range(0, len(scripts), p.holder_conns))]
    try:
        t0 = time.monotonic()
        for h in holders:
            h.send(("go",))
        reports = [h.recv(timeout=p.timeout * 5, expect="ready")[1] for h in holders]
        secs = time.monotonic() - t0
    except BaseException:
        loadgen.kill_all(holders)
        raise
    n_bad = sum(r["n_bad"] for r in reports)
    if n_bad:
        close_owners(holders)
        first = next(r["bad"][0] for r in reports if r["bad"])
        raise BenchError("%d of the %s owners' calls failed, first: owner %d: %s" % (n_bad, tag, *first))
    return holders, secs


def close_owners(holders: List[Worker]) -> None:
    for h in holders:
        try:
            h.send(("close",))
            h.recv(timeout=60, expect="closed")
        except BenchError:
            pass
        h.join(30)
    loadgen.kill_all(holders)


def idle(ctx: Ctx) -> dict:
    """acqrel with 1 client while N owners (REGISTER + RESTRICT, like a running
    VM's inherited connection) sit idle."""
    p = ctx.params
    out = {}
    holders: List[Worker] = []
    have = 0
    try:
        for n in sorted(p.idle_counts):
            if n > have:
                scripts = [[wire.register(100_000 + i, ctx.fake_pid + 100_000 + i, 0), wire.restrict(1)]
                           for i in range(have, n)]
                hs, secs = _open_owners(ctx, scripts, "idle")
                holders += hs
                have = n
                ctx.log("  %d idle owners connected in %.1f s" % (n, secs))
            names = wire.lease_files(ctx.disks, "acqrel", 1)
            w = Worker("idle-acqrel", loadgen.acqrel_worker, ctx.sock, [(0, ctx.fake_pid, names[0])])
            run = _timed(ctx, [w], p.idle_secs)
            lat = _lat([r["lat"] for r in run["results"]])
            ops = sum(r["ops"] for r in run["results"])
            if ops == 0:
                raise BenchError("no operation completed with %d idle owners" % n)
            out[str(n)] = {"pairs_s": ops / 2 / p.idle_secs, "p50_us": _pct(lat, 0.5) / 1e3,
                      "p99_us": _pct(lat, 0.99) / 1e3, "cpu_us_rpc": run["daemon_cpu"] / ops * 1e6,
                      "user_us_rpc": run["daemon_user"] / ops * 1e6,
                      "client_cores": run["client_cpu"] / p.idle_secs, "rpcs": ops}
            if n == p.idle_vmstart_at and n:
                vm = vmstart(ctx, 4)
                out[str(n)].update({"vm_cycles_s": vm["cycles_s"], "vm_p99_ms": vm["p99_ms"],
                                    "vm_cpu_us_cycle": vm["cpu_us_cycle"]})
    finally:
        close_owners(holders)
    return out


def scale(ctx: Ctx) -> dict:
    """N owners connect, REGISTER and ACQUIRE 1-4 leases each, and stay connected.

    Both daemons hold one fd per connection and one per locked file. When the
    hard RLIMIT_NOFILE cannot hold N + all leases (a sandbox without
    CAP_SYS_RESOURCE: `ulimit -Hn` 20000), the leases are SHARED ones on a
    pool of files that fits, like <shareable/> disks: still N x 1-4 lease
    entries, fewer kernel locks. The result says which mode ran.
    """
    import resource
    p = ctx.params
    n = p.scale_owners
    counts = [1 + i % 4 for i in range(n)]
    total = sum(counts)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    room = hard - n - 500
    shared = room < total
    if shared and room < 100:
        raise BenchError("RLIMIT_NOFILE hard limit %d cannot hold %d connections" % (hard, n))
    files = wire.lease_files(ctx.disks, "scale", room if shared else total)
    scripts, k = [], 0
    for i, c in enumerate(counts):
        sc = [wire.register(200_000 + i, ctx.fake_pid + 200_000 + i, 0)]
        for j in range(c):
            sc.append(wire.acquire(files[k % len(files)], 1 + j, flags=1 if shared else 0))
            k += 1
        scripts.append(sc)
    rss0 = procstat.rss_kib(ctx.pid)
    nofile_soft = procstat.nofile_limits(ctx.pid)[0]
    cpu0 = procstat.cpu_seconds(ctx.pid)
    holders, secs = _open_owners(ctx, scripts, "scale")
    try:
        cpu1 = procstat.cpu_seconds(ctx.pid)
        rss1 = procstat.rss_kib(ctx.pid)
        fds = procstat.fd_count(ctx.pid)
        locked = procstat.locked_count(files)
        lost = 0
        for h in holders:
            h.send(("check",))
        for h in holders:
            lost += h.recv(timeout=p.timeout * 2, expect="checked")[1]["lost_connections"]
    finally:
        close_owners(holders)
    return {"owners": n, "leases": total, "files": len(files), "shared": shared, "connect_s": secs, "rss_idle_mb": rss0 / 1024,
            "rss_mb": rss1 / 1024, "kb_per_owner": (rss1 - rss0) / n, "daemon_fds": fds,
            "cpu_s": cpu1 - cpu0, "locked_files": locked, "nofile_soft": nofile_soft, "unanswered": lost, "hang": False}


def reexec(ctx: Ctx, daemon) -> dict:
    """SIGUSR1 with N x 4 leases held: time until a new connection is served,
    and whether every lease survived (kernel locks + the daemon's table)."""
    p = ctx.params
    n, per = p.reexec_owners, p.leases_per_reexec_owner
    files = wire.lease_files(ctx.disks, "reexec", n * per)
    scripts = [[wire.register(300_000 + i, ctx.fake_pid + 300_000 + i, 0)]
               + [wire.acquire(files[i * per + j], 1 + j) for j in range(per)] for i in range(n)]
    holders, secs = _open_owners(ctx, scripts, "reexec")
    try:
        before = procstat.locked_count(files)
        marker = procstat.exec_marker(ctx.pid)
        probe_frame = wire.register(399_999, ctx.fake_pid + 399_999, 0)
        t0 = time.monotonic()
        os.kill(ctx.pid, signal.SIGUSR1)
        # Wait until the process has exec'd (its text and stack move), so the
        # probe below cannot be answered by the old image.
        while True:
            try:
                if procstat.exec_marker(ctx.pid) != marker:
                    break
            except (FileNotFoundError, ProcessLookupError):
                raise BenchError("the daemon process vanished on SIGUSR1 (exit %s):\n%s"
                                 % (daemon.wait(1), daemon.log_tail())) from None
            if time.monotonic() - t0 > p.timeout:
                raise BenchError("no exec within %.0f s of SIGUSR1" % p.timeout)
            time.sleep(0.0005)
        t_exec = time.monotonic() - t0
        s = wire.connect(ctx.sock, p.timeout)
        try:
            wire.call_ok(s, probe_frame, "REGISTER after re-exec")
        finally:
            s.close()
        serving = time.monotonic() - t0
        if not daemon.alive():
            raise BenchError("daemon died after re-exec:\n" + daemon.log_tail())
        after = procstat.locked_count(files)
        lost_conns = 0
        for h in holders:
            h.send(("check",))
        for h in holders:
            lost_conns += h.recv(timeout=p.timeout * 2, expect="checked")[1]["lost_connections"]
        w = Worker("prober", loadgen.prober, ctx.sock, files, 399_998, ctx.fake_pid + 399_998,
                   min(64, len(files)), p.timeout)
        try:
            probe = w.recv(timeout=p.timeout * 5, expect="probed")[1]
        finally:
            w.join(30)
            w.kill()
    finally:
        close_owners(holders)
    return {"leases": len(files), "owners": n, "setup_s": secs, "exec_s": t_exec, "serving_s": serving,
            "locked_before": before, "locked_after": after, "probe_busy": probe["busy"],
            "probe_granted": probe["granted"], "probe_other": probe["other"],
            "lost_connections": lost_conns,
            "lost_leases": max(len(files) - after, probe["granted"] + len(probe["other"]))}


def median_dict(runs: List[dict]) -> dict:
    """Per-key median over rounds (numbers only; other values from the first run)."""
    if not runs:
        return {}
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
        elif isinstance(v, dict):
            out[k] = median_dict([r[k] for r in runs])
        else:
            out[k] = v
    return out


def limit(ctx: Ctx) -> dict:
    """One connection more than max_clients: does the daemon answer or let it hang?

    The daemon must have been started with max_clients = params.limit_clients.
    """
    p = ctx.params
    n = p.limit_clients
    scripts = [[wire.register(400_000 + i, ctx.fake_pid + 400_000 + i, 0), wire.restrict(1)] for i in range(n)]
    holders, _ = _open_owners(ctx, scripts, "limit")
    try:
        t0 = time.monotonic()
        try:
            s = wire.connect(ctx.sock, p.limit_wait)
        except OSError as exc:
            return {"max_clients": n, "answered": True, "seconds": time.monotonic() - t0,
                    "answer": "connect refused: %s" % exc}
        try:
            s.settimeout(p.limit_wait)
            s.sendall(wire.register(499_999, ctx.fake_pid + 499_999, 0))
            try:
                reply = wire.recv_frame(s)
                answer = "OK (served)" if reply == wire.ok_reply(wire.register(0, 1, 0)) \
                    else wire.describe_reply(reply)
                answered = True
            except BenchError as exc:
                answer, answered = "connection closed (%s)" % exc, True
            except OSError:   # includes socket.timeout
                answer, answered = "no reply within %.0f s (hang)" % p.limit_wait, False
        finally:
            s.close()
        return {"max_clients": n, "answered": answered, "seconds": time.monotonic() - t0, "answer": answer}
    finally:
        close_owners(holders)
