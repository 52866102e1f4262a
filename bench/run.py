# SPDX-License-Identifier: GPL-3.0-or-later
"""Driver: start the daemons, run the scenarios interleaved (A B A B), print
progress and the table, write docs/benchmarks.md + docs/benchmarks.png."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from bench import _path  # noqa: F401
from bench import report, scenarios
from bench.scenarios import Ctx, Params
from bench.wire import BenchError

KINDS = {"c": "C virtlockd", "py": "lockd (ours)"}
NOFILE = 65536        # 10,000 connections + 25,000 lease fds in one daemon

_t_start = time.monotonic()


def log(msg: str) -> None:
    el = time.monotonic() - _t_start
    print("[bench %2d:%02d] %s" % (el // 60, el % 60, msg), flush=True)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE for us, hence for the daemons and the workers we fork."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        # not root (or nr_open too small): take what the hard limit allows
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def daemon_conf(p: Params, max_clients: Optional[int] = None) -> dict:
    # Same settings for both; C ignores the keys it does not know (state_dir
    # is added by the harness for ours only).
    return {"max_clients": max_clients or p.max_clients, "admin_max_clients": 64, "log_level": 3}


LOADAVG: list = []      # 1-minute load average at each daemon start: how noisy the machine was


def start(kind: str, workdir: Path, tag: str, p: Params, max_clients: Optional[int] = None):
    LOADAVG.append(os.getloadavg()[0])
    from testbed.daemons import DaemonError, start_daemon
    conf = daemon_conf(p, max_clients)
    env = argv = None
    if kind == "py":
        # PYTHONPATH: ours must import `lockd` even when bench runs outside the venv.
        # LOCKD_BENCH_SRC runs another tree's lockd (an older commit, for before/after figures).
        env = {"PYTHONPATH": os.environ.get("LOCKD_BENCH_SRC") or str(_path.ROOT / "lockd_src")}
        # Same sandbox as the C daemon: a private mount namespace with a fresh
        # tmpfs on /run. Its state (journal, re-exec file) lives in /run/virtlockd
        # on tmpfs as in production, and should it ever fall back to its default
        # socket paths it cannot take over the host's /run/libvirt/virtlockd-sock.
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0" "$@"', sys.executable, "-m", "lockd"]
        conf["state_dir"] = "/run/virtlockd"
    try:
        d = start_daemon(kind, workdir / ("%s-%s" % (kind, tag)), conf=conf, env=env, argv=argv, timeout=30)
    except DaemonError as exc:
        raise BenchError("%s did not start: %s" % (KINDS[kind], exc)) from None
    log("%s started (pid %d) for %s" % (KINDS[kind], d.pid, tag))
    return d


def build_standin(workdir: Path) -> Optional[str]:
    """Compile bench/standin.c (cheap stand-in QEMU processes for vmstart)."""
    src = Path(__file__).resolve().parent / "standin.c"
    exe = workdir / "standin"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        r = subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True)
        if r.returncode == 0:
            return str(exe)
        log("WARNING: cannot compile %s:\n%s" % (src, r.stderr))
    log("WARNING: no C compiler (apt package gcc, see scripts/install-deps.sh): vmstart forks the "
        "Python worker per VM instead, which costs ~1 ms client CPU per cycle and lowers cycles/s "
        "for both daemons")
    return None


def run_light_round(kind: str, rnd: int, workdir: Path, p: Params, only: set, out: dict,
                    standin: Optional[str]) -> None:
    d = start(kind, workdir, "round%d" % rnd, p)
    ctx = Ctx(str(d.sock), d.pid, workdir / "disks", p, log, standin)
    try:
        if "acqrel" in only:
            for c in p.acqrel_levels:
                r = scenarios.acqrel(ctx, c)
                out.setdefault("acqrel", {}).setdefault(str(c), {}).setdefault(kind, []).append(r)
                log("%-4s acqrel   %3d clients: %8.0f pairs/s  p50 %6.1f us  p99 %7.1f us  "
                    "daemon %5.1f us CPU/RPC  client %.2f cores"
                    % (kind, c, r["pairs_s"], r["p50_us"], r["p99_us"], r["cpu_us_rpc"], r["client_cores"]))
        if "vmstart" in only:
            for c in p.vmstart_levels:
                r = scenarios.vmstart(ctx, c)
                out.setdefault("vmstart", {}).setdefault(str(c), {}).setdefault(kind, []).append(r)
                log("%-4s vmstart  %3d clients: %8.0f cycles/s p50 %6.2f ms  p99 %7.2f ms  "
                    "daemon %5.0f us CPU/cycle  client %.2f cores%s"
                    % (kind, c, r["cycles_s"], r["p50_ms"], r["p99_ms"], r["cpu_us_cycle"], r["client_cores"],
                       "  WARNING: %d disks still locked after every VM stopped" % r["leaked"]
                       if r["leaked"] else ""))
        if "idle" in only:
            r = scenarios.idle(ctx)
            for n, v in r.items():
                out.setdefault("idle", {}).setdefault(n, {}).setdefault(kind, []).append(v)
                log("%-4s idle %5s owners: %8.0f pairs/s  p99 %7.1f us  daemon %6.1f us CPU/RPC"
                    % (kind, n, v["pairs_s"], v["p99_us"], v["cpu_us_rpc"]))
    finally:
        d.close()


def run_heavy(kind: str, rnd: int, workdir: Path, p: Params, only: set, out: dict) -> None:
    if "scale" in only:
        d = start(kind, workdir, "scale%d" % rnd, p)
        ctx = Ctx(str(d.sock), d.pid, workdir / "disks", p, log)
        try:
            try:
                r = scenarios.scale(ctx)
            except BenchError as exc:
                r = {"hang": True, "error": str(exc)}
                log("%-4s scale FAILED: %s" % (kind, exc))
            else:
                log("%-4s scale %d owners / %d leases%s: connected in %.1f s, RSS %.1f -> %.1f MB "
                    "(%.2f kB/owner), %d unanswered"
                    % (kind, r["owners"], r["leases"],
                       " (shared, on %d files)" % r["files"] if r["shared"] else "",
                       r["connect_s"], r["rss_idle_mb"], r["rss_mb"], r["kb_per_owner"], r["unanswered"]))
            out.setdefault("scale", {}).setdefault(kind, []).append(r)
        finally:
            d.close()
    if "reexec" in only:
        d = start(kind, workdir, "reexec%d" % rnd, p)
        ctx = Ctx(str(d.sock), d.pid, workdir / "disks", p, log)
        try:
            try:
                r = scenarios.reexec(ctx, d)
            except BenchError as exc:
                r = {"error": str(exc)}
                log("%-4s reexec FAILED: %s" % (kind, exc))
            else:
                log("%-4s reexec with %d leases: exec after %.3f s, serving again after %.3f s, "
                    "locks %d -> %d, probe busy %d/%d, lost %d"
                    % (kind, r["leases"], r["exec_s"], r["serving_s"], r["locked_before"],
                       r["locked_after"], r["probe_busy"], r["leases"], r["lost_leases"]))
            out.setdefault("reexec", {}).setdefault(kind, []).append(r)
        finally:
            d.close()
    if "limit" in only:
        d = start(kind, workdir, "limit%d" % rnd, p, max_clients=p.limit_clients)
        ctx = Ctx(str(d.sock), d.pid, workdir / "disks", p, log)
        try:
            r = scenarios.limit(ctx)
            log("%-4s limit: connection %d with max_clients=%d: %s after %.1f s"
                % (kind, p.limit_clients + 1, p.limit_clients, r["answer"], r["seconds"]))
            out.setdefault("limit", {}).setdefault(kind, []).append(r)
        finally:
            d.close()


def _kinds_in(node: dict) -> set:
    out = set()
    for k, v in node.items():
        if k in KINDS:
            out.add(k)
        elif isinstance(v, dict):
            out |= _kinds_in(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="every scenario with tiny counts (under a minute); writes nothing to docs/")
    ap.add_argument("--only", default="acqrel,vmstart,idle,scale,reexec,limit",
                    help="comma-separated scenarios (default: all)")
    ap.add_argument("--daemons", default="c,py", help="comma-separated: c, py (default: both)")
    ap.add_argument("--rounds", type=int, help="A B A B rounds of acqrel/vmstart/idle")
    ap.add_argument("--out", type=Path, help="directory for benchmarks.md/.png/.json "
                    "(default: docs/ for a full run, a temporary directory for --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    ap.add_argument("--report-only", type=Path, metavar="JSON",
                    help="no measurements: rewrite benchmarks.md/.png from a benchmarks.json of an earlier run")
    args = ap.parse_args(argv)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        kinds = sorted({k for sc in ("acqrel", "scale", "reexec") for k in _kinds_in(results.get(sc, {}))})
        summary = report.build(results, kinds)
        print(summary.table_text)
        out_dir = args.out or args.report_only.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in report.write_docs(results, summary, out_dir, kinds):
            log("wrote %s" % f)
        return 0

    p = Params.quick() if args.quick else Params()
    if args.rounds:
        p.rounds = args.rounds
    only = set(args.only.split(","))
    unknown = only - {"acqrel", "vmstart", "idle", "scale", "reexec", "limit"}
    kinds = args.daemons.split(",")
    if unknown or not set(kinds) <= set(KINDS):
        ap.error("unknown scenario or daemon: %s" % (sorted(unknown) or kinds))
    if os.geteuid() != 0:
        print("bench: must run as root (the C virtlockd only serves uid 0 peers and needs a "
              "private mount namespace); run `sudo make bench`", file=sys.stderr)
        return 2
    if "c" in kinds and not Path("/usr/sbin/virtlockd").exists():
        print("bench: /usr/sbin/virtlockd is missing; run `make deps` (apt package libvirt-daemon)",
              file=sys.stderr)
        return 2
    nofile = raise_nofile()
    root = Path(__file__).resolve().parent.parent
    out_dir = args.out or (root / "docs" if not args.quick else Path(tempfile.mkdtemp(prefix="lockd-bench-out-")))
    workdir = Path(tempfile.mkdtemp(prefix="lockd-bench-"))
    mode = "quick" if args.quick else "full"
    log("%s run: daemons %s, scenarios %s, %d round(s), RLIMIT_NOFILE %d, work dir %s"
        % (mode, ",".join(kinds), ",".join(sorted(only)), p.rounds, nofile, workdir))

    standin = build_standin(workdir) if only & {"vmstart", "idle"} else None
    results: dict = {"mode": mode, "machine": report.machine_info(), "standin": "C helper" if standin else "python fork", "nofile": nofile, "params": {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in vars(p).items()}}
    failed = []
    try:
        for rnd in range(1, p.rounds + 1):
            for kind in kinds:      # A B A B
                if only & {"acqrel", "vmstart", "idle"}:
                    log("round %d/%d: %s" % (rnd, p.rounds, KINDS[kind]))
                    try:
                        run_light_round(kind, rnd, workdir, p, only, results, standin)
                    except BenchError as exc:
                        failed.append("%s round %d: %s" % (kind, rnd, exc))
                        log("%s round %d FAILED: %s" % (kind, rnd, exc))
        for rnd in range(1, p.heavy_rounds + 1):
            for kind in kinds:
                if only & {"scale", "reexec", "limit"}:
                    log("heavy round %d/%d: %s" % (rnd, p.heavy_rounds, KINDS[kind]))
                    try:
                        run_heavy(kind, rnd, workdir, p, only, results)
                    except BenchError as exc:
                        failed.append("%s heavy round %d: %s" % (kind, rnd, exc))
                        log("%s heavy round %d FAILED: %s" % (kind, rnd, exc))
    except KeyboardInterrupt:
        log("interrupted; stopping daemons and workers")
        return 130
    finally:
        from testbed.daemons import kill_all_leftovers
        kill_all_leftovers()
        if args.keep:
            log("work dir kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    for sc in ("scale", "reexec"):
        for kind, runs in results.get(sc, {}).items():
            for r in runs:
                if "error" in r:
                    failed.append("%s %s: %s" % (kind, sc, r["error"]))
    results["failed"] = failed
    results["loadavg"] = LOADAVG
    summary = report.build(results, kinds)
    print()
    print(summary.table_text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str))
    written = report.write_docs(results, summary, out_dir, kinds)
    print()
    for f in written:
        log("wrote %s" % f)
    if failed:
        log("FAILED: %d scenario run(s) failed:" % len(failed))
        for f in failed:
            print("  - " + f.splitlines()[0])
        print("Next step: read the daemon logs (re-run with --keep) and fix the failure above.")
        return 1
    passed = sum(1 for g in summary.goals if g.ok is True)
    missed = [g for g in summary.goals if g.ok is False]
    log("done in %.0f s: %d goal(s) met, %d missed%s"
        % (time.monotonic() - _t_start, passed, len(missed),
           "" if not missed else ": " + "; ".join(g.name for g in missed)))
    if mode == "full":
        print("Next step: review %s and commit it with docs/benchmarks.png." % (out_dir / "benchmarks.md"))
    else:
        print("Next step: `make bench` for the real figures (about 10 minutes).")
    return 0
