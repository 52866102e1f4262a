# SPDX-License-Identifier: GPL-3.0-or-later
"""The table (ours vs C, ratios, issue-6 goals with pass/fail), the markdown
report and the PNG chart."""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from bench.scenarios import median_dict

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Goal:
    name: str
    target: str
    value: str
    ok: Optional[bool]          # None: could not be evaluated (missing figures)


@dataclass
class Summary:
    rows: list                  # (section, metric, c, ours, ratio, goal, ok)
    goals: List[Goal]
    table_text: str
    markdown_table: str


def _med(results: dict, scenario: str, level: Optional[str], kind: str) -> Optional[dict]:
    node = results.get(scenario, {})
    if level is not None:
        node = node.get(level, {})
    runs = [r for r in node.get(kind, []) if "error" not in r]
    return median_dict(runs) if runs else None


def _fmt(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            s = "{:,.0f}".format(v)
        elif abs(v) >= 100:
            s = "%.0f" % v
        elif abs(v) >= 10:
            s = "%.1f" % v
        else:
            s = "%.2f" % v
    else:
        s = "{:,}".format(v) if isinstance(v, int) else str(v)
    return s + unit


def _ratio(c, ours) -> Optional[float]:
    if c in (None, 0) or ours is None:
        return None
    try:
        if math.isnan(c) or math.isnan(ours):
            return None
    except TypeError:
        return None
    return ours / c


def build(results: dict, kinds: list) -> Summary:
    rows = []
    goals: List[Goal] = []

    # g(key) remembers the key so that row() can add the spread of the
    # per-round ratios (C and ours of the same A/B round ran back to back).
    ctx = {"node": None, "key": None}

    def rounds_spread():
        node, key = ctx["node"], ctx["key"]
        ctx["key"] = None
        if node is None or key is None:
            return ""
        rs = [_ratio(a.get(key), b.get(key)) for a, b in zip(node.get("c", []), node.get("py", []))
              if "error" not in a and "error" not in b and isinstance(a.get(key), (int, float))]
        rs = [r for r in rs if r is not None]
        if len(rs) < 2:
            return ""
        return "%.2f-%.2f" % (min(rs), max(rs))

    def row(section, metric, c, ours, goal_txt="", cmp=None, goal_name=None):
        ratio = _ratio(c, ours)
        spread = rounds_spread()
        ok = None
        if cmp is not None and ratio is not None:
            ok = cmp(ratio)
        rows.append((section, metric, c, ours, ratio, spread, goal_txt, ok))
        if goal_txt:
            goals.append(Goal(goal_name or "%s %s" % (section, metric), goal_txt,
                              "-" if ratio is None else "%.2fx" % ratio
                              + (" (rounds %s)" % spread if spread else ""), ok))

    def getter(node, c, o):
        ctx["node"] = node

        def g(k):
            ctx["key"] = k
            return (c or {}).get(k), (o or {}).get(k)
        return g

    for lvl in sorted(results.get("acqrel", {}), key=int):
        c, o = _med(results, "acqrel", lvl, "c"), _med(results, "acqrel", lvl, "py")
        g = getter(results["acqrel"][lvl], c, o)
        sec = "acqrel %s client%s" % (lvl, "" if lvl == "1" else "s")
        in_goal = int(lvl) <= 16
        row(sec, "pairs/s", *g("pairs_s"), ">= 1.0x" if in_goal else "", (lambda r: r >= 1.0) if in_goal else None)
        row(sec, "p50 us/RPC", *g("p50_us"))
        row(sec, "p99 us/RPC", *g("p99_us"), "<= 1.0x", lambda r: r <= 1.0)
        row(sec, "daemon CPU us/RPC", *g("cpu_us_rpc"))
        row(sec, "  of which user space", *g("user_us_rpc"))
        row(sec, "client CPU cores", *g("client_cores"))
    for lvl in sorted(results.get("vmstart", {}), key=int):
        c, o = _med(results, "vmstart", lvl, "c"), _med(results, "vmstart", lvl, "py")
        g = getter(results["vmstart"][lvl], c, o)
        sec = "vmstart %s client%s" % (lvl, "" if lvl == "1" else "s")
        row(sec, "cycles/s", *g("cycles_s"))
        row(sec, "p50 ms/cycle", *g("p50_ms"))
        row(sec, "p99 ms/cycle", *g("p99_ms"), "<= 1.0x", lambda r: r <= 1.0)
        row(sec, "daemon CPU us/cycle", *g("cpu_us_cycle"), "<= 1.0x", lambda r: r <= 1.0)
        row(sec, "client CPU cores", *g("client_cores"))
    for n in sorted(results.get("idle", {}), key=int):
        c, o = _med(results, "idle", n, "c"), _med(results, "idle", n, "py")
        g = getter(results["idle"][n], c, o)
        sec = "idle %s owners" % "{:,}".format(int(n))
        row(sec, "pairs/s (1 client)", *g("pairs_s"))
        row(sec, "p99 us/RPC", *g("p99_us"))
        if int(n) == 1000:
            row(sec, "daemon CPU us/RPC", *g("cpu_us_rpc"), "<= 0.2x", lambda r: r <= 0.2,
                "daemon CPU/RPC with 1,000 idle owners")
        else:
            row(sec, "daemon CPU us/RPC", *g("cpu_us_rpc"))
        if (c or {}).get("vm_cycles_s") is not None or (o or {}).get("vm_cycles_s") is not None:
            row(sec, "vmstart 4 clients: cycles/s", *g("vm_cycles_s"))
            row(sec, "vmstart 4 clients: p99 ms/cycle", *g("vm_p99_ms"))
            row(sec, "vmstart 4 clients: CPU us/cycle", *g("vm_cpu_us_cycle"))
    if results.get("scale"):
        c, o = _med(results, "scale", None, "c"), _med(results, "scale", None, "py")
        n = (o or c or {}).get("owners", 0)
        sec = "scale %s owners" % "{:,}".format(int(n))
        g = getter(results["scale"], c, o)
        row(sec, "time to connect all (s)", *g("connect_s"))
        row(sec, "RSS idle (MB)", *g("rss_idle_mb"))
        row(sec, "RSS with all owners (MB)", *g("rss_mb"), "<= 1.5x", lambda r: r <= 1.5)
        row(sec, "kB per owner", *g("kb_per_owner"))
        row(sec, "daemon CPU to connect (s)", *g("cpu_s"))
        for kind, d in (("c", c), ("py", o)):
            if kind in kinds:
                runs = results["scale"].get(kind, [])
                hang = any(r.get("hang") or r.get("unanswered") for r in runs) or not runs
                if kind == "py":
                    goals.append(Goal("%s owners connect, nothing hangs" % "{:,}".format(int(n)), "no hang",
                                      "hang" if hang else "ok", not hang))
    if results.get("reexec"):
        c, o = _med(results, "reexec", None, "c"), _med(results, "reexec", None, "py")
        n = (o or c or {}).get("leases", 0)
        sec = "reexec %s leases" % "{:,}".format(int(n))
        g = getter(results["reexec"], c, o)
        row(sec, "serving again after (s)", *g("serving_s"))
        row(sec, "  of which until exec() (s)", *g("exec_s"))
        row(sec, "leases lost", *g("lost_leases"))
        if o is not None:
            goals.append(Goal("re-exec with %s leases serves again" % "{:,}".format(int(n)), "< 0.5 s",
                              "%.3f s" % o["serving_s"], o["serving_s"] < 0.5))
            goals.append(Goal("re-exec loses no lease", "0 lost", str(o["lost_leases"]), o["lost_leases"] == 0))
        elif "py" in kinds:
            err = (results["reexec"].get("py") or [{}])[0].get("error", "no result")
            goals.append(Goal("re-exec serves again", "< 0.5 s", "failed: " + err.splitlines()[0][:60], False))
    if results.get("limit"):
        def verdict(kind):
            runs = results["limit"].get(kind) or []
            if not runs:
                return None
            r = runs[0]
            return ("answered in %.1f s" % r["seconds"]) if r["answered"] else "no reply (hangs)"
        any_run = next(iter(results["limit"].values()))[0]
        rows.append(("limit: max_clients=%d" % any_run["max_clients"],
                     "client %d gets" % (any_run["max_clients"] + 1), verdict("c"), verdict("py"), None, "", "",
                     None))
        if results["limit"].get("py"):
            r = results["limit"]["py"][0]
            goals.append(Goal("at max_clients the daemon answers (no hang)", "answers",
                              r["answer"][:60], r["answered"]))
    if "py" in kinds:
        mc, unit_hard = default_limits()
        if mc is not None:
            goals.append(Goal("default max_clients serves 10,000 VMs", ">= 10,000", "{:,}".format(mc), mc >= 10000))
        if unit_hard is not None:
            # one connection plus up to 4 leases per VM
            goals.append(Goal("unit LimitNOFILE (hard) for 10,000 VMs", ">= 50,000", "{:,}".format(unit_hard),
                              unit_hard >= 50000))
    table_text = _text_table(rows, goals)
    md = _md_table(rows)
    return Summary(rows, goals, table_text, md)


def default_limits() -> tuple:
    """(default max_clients, hard LimitNOFILE of the shipped unit), None where unknown."""
    mc = hard = None
    try:
        from lockd.config import DEFAULTS
        mc = int(DEFAULTS["max_clients"])
    except Exception:  # noqa: BLE001 - our package may be incomplete
        pass
    unit = ROOT / "lockd_src" / "lockd" / "data" / "units" / "virtlockd.service"
    try:
        for line in unit.read_text().splitlines():
            if line.strip().startswith("LimitNOFILE="):
                v = line.split("=", 1)[1].strip()
                hard = int(v.split(":")[-1]) if v != "infinity" else 1 << 30
    except (OSError, ValueError):
        pass
    return mc, hard


def _mark(ok: Optional[bool]) -> str:
    return {True: "PASS", False: "FAIL", None: ""}[ok]


def _text_table(rows, goals) -> str:
    head = ("scenario", "metric", "C", "ours", "ours/C", "per round", "goal", "")
    lines = [head]
    for sec, metric, c, o, ratio, spread, goal, ok in rows:
        lines.append((sec, metric, _fmt(c), _fmt(o), "-" if ratio is None else "%.2fx" % ratio, spread, goal,
                      _mark(ok)))
    w = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for k, l in enumerate(lines):
        out.append("  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i]) for i, x in enumerate(l)).rstrip())
        if k == 0:
            out.append("-" * len(out[0]))
    out.append("")
    out.append("Goals of issue 6 (ratios are ours / C in the same run):")
    for g in goals:
        out.append("  [%s] %-46s %-10s %s" % (_mark(g.ok) or " ?? ", g.name, g.target, g.value))
    return "\n".join(out)


def _md_table(rows) -> str:
    out = ["| scenario | metric | C virtlockd | lockd (ours) | ours/C | ours/C per round | goal | |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    for sec, metric, c, o, ratio, spread, goal, ok in rows:
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            sec, metric, _fmt(c), _fmt(o), "-" if ratio is None else "%.2f×" % ratio, spread.replace("-", "–"), goal,
            {True: "✅ pass", False: "❌ fail", None: ""}[ok]))
    return "\n".join(out)


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = "%.0f GiB" % (kb / 1024 / 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cver = subprocess.run(["/usr/sbin/virtlockd", "-V"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        cver = "?"
    try:
        osr = dict(l.split("=", 1) for l in Path("/etc/os-release").read_text().splitlines() if "=" in l)
        distro = osr.get("PRETTY_NAME", "?").strip('"')
    except OSError:
        distro = "?"
    try:
        git = ["git", "-C", str(ROOT)]
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        src = subprocess.run(git + ["log", "-1", "--format=%h", "--", "lockd_src"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "lockd_src"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        rev = "%s (lockd_src at %s%s)" % (rev, src, ", with uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": "%s, %d cores" % (cpu, os.cpu_count() or 0), "memory": mem, "kernel": platform.release(),
            "os": distro, "python": "%s (%s)" % (platform.python_version(), sys.executable),
            "c_daemon": cver, "commit": rev}


def write_docs(results: dict, summary: Summary, out_dir: Path, kinds: list) -> list:
    written = []
    info = results.get("machine") or machine_info()
    png = out_dir / "benchmarks.png"
    if chart(results, png):
        written.append(png)
    notes = ROOT / "bench" / "profile-notes.md"
    p = results["params"]
    md = [
        "# Benchmarks: lockd against Debian's C virtlockd",
        "",
        "Generated by `make bench%s` (bench/, issue 6). Do not edit by hand: re-run it."
        % (" QUICK=1" if results["mode"] == "quick" else ""),
        "",
        "| | |", "|---|---|",
        "| date | %s |" % info["date"],
        "| machine | %s, %s RAM |" % (info["cpu"], info["memory"]),
        "| OS / kernel | %s / %s |" % (info["os"], info["kernel"]),
        "| Python (ours) | %s |" % info["python"],
        "| C daemon | %s (Debian package) |" % info["c_daemon"],
        "| commit | %s |" % info["commit"],
        "| load average (1 min) at the daemon starts | %s |" % (
            "%.1f–%.1f (median %.1f) on %d cores" % (min(results["loadavg"]), max(results["loadavg"]),
                                                   sorted(results["loadavg"])[len(results["loadavg"]) // 2],
                                                   os.cpu_count() or 0)
            if results.get("loadavg") else "not recorded"),
        "| mode | %s; %d A/B rounds (median quoted) for acqrel/vmstart/idle, %d for scale/reexec |"
        % (results["mode"], p["rounds"], p["heavy_rounds"]),
        "",
        "![chart](benchmarks.png)",
        "",
        "## Goals (issue 6)",
        "",
        "| goal | target | measured | |", "|---|---|---|---|",
    ]
    for g in summary.goals:
        md.append("| %s | %s | %s | %s |" % (g.name, g.target, g.value,
                                             {True: "✅ pass", False: "❌ fail", None: "?"}[g.ok]))
    if results.get("failed"):
        md += ["", "**Failed runs:**", ""] + ["- `%s`" % f.splitlines()[0] for f in results["failed"]]
    md += ["", "## All figures", "",
           "Ratios are ours / C, medians over the rounds. \"daemon CPU\" is utime+stime of the daemon "
           "process from `/proc/<pid>/stat` over the measurement window divided by the operations "
           "completed in it: the most machine-independent figure. \"client CPU cores\" is what the "
           "load generator itself used of the 2 cores (it competes with the daemon). "
           "\"ours/C per round\" is the range of the ratio over the A/B rounds (each C run and the "
           "run of ours after it were back to back): a wide range means the machine was noisy and a "
           "pass/fail near 1.0× is not significant.", "",
           summary.markdown_table, "",
           "## What each scenario does", "",
           "Both daemons get the same `virtlockd.conf` (`max_clients = %d`, because the C default of "
           "1024 makes the 1024th VM's connection hang, which would make the scale scenario "
           "meaningless; ours additionally gets `state_dir = \"/run/virtlockd\"`), private sockets by "
           "socket activation (`testbed/daemons.py`), each in its own mount namespace with a "
           "fresh tmpfs on `/run` (as on a systemd host), and RLIMIT_NOFILE raised to the hard limit "
           "(%d here). Leases are in the default (direct) lockspace on empty files that "
           "stand in for disk images, like libvirt's default configuration." % (p["max_clients"], results.get("nofile", 0)), "",
           "- **acqrel**: N connections, each a registered owner (fake pid above `pid_max`) doing "
           "ACQUIRE + RELEASE of its own lease in a closed loop for %.1f s after %.1f s warm-up; "
           "spread over %d client processes (epoll, precomputed frames)." % (p["acqrel_secs"], p["warmup"],
                                                                             p["acqrel_workers"]),
           "- **vmstart**: libvirt's sequence per VM, N VMs in flight (one client process each): a "
           "stand-in QEMU (forked child) connects conn A, which does REGISTER (owner pid = the "
           "child) + RESTRICT and stays open; conn B does REGISTER + ACQUIRE × 4 disks and closes; "
           "stop = the child dies and conn A closes, so the daemon releases on the owner's EOF and its "
           "kill loop finds the pid already gone. Cycle = start + stop, as the client sees it.",
           "- **idle**: acqrel with 1 client while 0 / 1,000 / 5,000 other owners sit connected "
           "(REGISTER + RESTRICT, like running VMs); with %s idle owners also vmstart at 4 clients "
           "(VM starts on a busy host)." % "{:,}".format(p.get("idle_vmstart_at", 0)),
           "- **scale**: %s owners connect, REGISTER and ACQUIRE 1–4 leases each (pipelined in "
           "batches of %d per client process, %d connections per process) and stay connected. "
           "Every connection is then pinged (keepalive) to show that none hangs."
           % ("{:,}".format(p["scale_owners"]), p["holder_batch"], p["holder_conns"])
           + (" **Here the leases are SHARED ones on %s disk files**: both daemons hold one fd per "
              "connection and per locked file, the hard RLIMIT_NOFILE of this machine is %d and cannot "
              "be raised (no CAP_SYS_RESOURCE), so 10,000 connections plus 25,000 exclusive leases "
              "(35,000 fds) do not fit. It is still 10,000 owners × 1–4 lease entries each."
              % ("{:,}".format(_scale_files(results)), results.get("nofile", 0))
              if _scale_files(results) else ""),
           "- **reexec**: %s owners × %d leases held; SIGUSR1; we wait until the process has "
           "exec'd (text and stack addresses in `/proc/<pid>/stat` change), then time a REGISTER on a "
           "new connection. No lease lost = the kernel still reports a lock on every lease file (`F_OFD_GETLK`) and a "
           "conflicting ACQUIRE from another owner is refused for every lease."
           % ("{:,}".format(p["reexec_owners"]), p["leases_per_reexec_owner"]),
           "- **limit**: a daemon started with `max_clients = %d` holds that many owners; one more "
           "client connects and sends REGISTER. Does it get an answer within %.0f s, or hang?"
           % (p["limit_clients"], p["limit_wait"]),
           "", "Owner pids: owners that are closed while holding leases use fake pids above "
           "`/proc/sys/kernel/pid_max`, so the owner-EOF kill loop can never hit a real process; "
           "vmstart's stand-in children are killed and reaped before their connection closes.", "",
           "## How to reproduce", "",
           "```sh",
           "make bench            # full run, ~10 minutes, rewrites docs/benchmarks.{md,png,json}",
           "make bench QUICK=1    # every scenario with tiny counts (<1 min), output in a temp dir",
           ".venv/bin/python -m bench --only acqrel,idle --daemons py   # a subset",
           "```", "",
           "The machine is shared and noisy: C and ours run alternately (A B A B) and medians are "
           "quoted; compare ratios from the same run rather than absolute figures across runs.", ""]
    if notes.exists():
        md += [notes.read_text().rstrip(), ""]
    path = out_dir / "benchmarks.md"
    path.write_text("\n".join(md))
    written.insert(0, path)
    return written


def _scale_files(results: dict) -> int:
    """Number of shared lease files if the scale scenario had to share, else 0."""
    for runs in results.get("scale", {}).values():
        for r in runs:
            if r.get("shared"):
                return r["files"]
    return 0


def chart(results: dict, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (requirements/bench.txt); no chart written")
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {"c": "#888888", "py": "#1f77b4"}
    labels = {"c": "C virtlockd", "py": "lockd (ours)"}

    def series(scn, key):
        out = {}
        for kind in ("c", "py"):
            xs, ys = [], []
            for lvl in sorted(results.get(scn, {}), key=int):
                m = _med(results, scn, lvl, kind)
                if m and key in m:
                    xs.append(int(lvl))
                    ys.append(m[key])
            if xs:
                out[kind] = (xs, ys)
        return out

    for ax, scn, key, title, ylabel in (
            (axes[0][0], "acqrel", "pairs_s", "acquire+release pairs/s", "pairs/s"),
            (axes[0][1], "vmstart", "cycles_s", "VM start+stop cycles/s (4 disks)", "cycles/s"),
            (axes[1][0], "idle", "cpu_us_rpc", "daemon CPU per RPC vs idle owners", "µs CPU / RPC")):
        for kind, (xs, ys) in series(scn, key).items():
            ax.plot(xs, ys, marker="o", color=colors[kind], label=labels[kind])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("idle connected owners" if scn == "idle" else "concurrent clients")
        levels = sorted({x for xs, _ in series(scn, key).values() for x in xs})
        if scn != "idle":
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
        else:
            ax.set_xscale("symlog", linthresh=100)
            ax.set_yscale("log")
        if levels:
            ax.set_xticks(levels)
            ax.set_xticklabels(["{:,}".format(v) for v in levels])
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend()
    ax = axes[1][1]
    bars, vals, cols = [], [], []
    for kind in ("c", "py"):
        m = _med(results, "scale", None, kind)
        if m:
            bars.append("%s\nRSS MB" % labels[kind])
            vals.append(m["rss_mb"])
            cols.append(colors[kind])
    for kind in ("c", "py"):
        m = _med(results, "scale", None, kind)
        if m:
            bars.append("%s\nconnect s" % labels[kind])
            vals.append(m["connect_s"])
            cols.append(colors[kind])
    if bars:
        ax.bar(range(len(bars)), vals, color=cols)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(bars, fontsize=8)
        for i, v in enumerate(vals):
            ax.annotate(_fmt(float(v)), (i, v), ha="center", va="bottom", fontsize=8)
    n = (_med(results, "scale", None, "py") or _med(results, "scale", None, "c") or {}).get("owners", 0)
    ax.set_title("scale: %s owners with 1-4 leases" % "{:,}".format(int(n)))
    date = (results.get("machine") or {}).get("date") or datetime.date.today().isoformat()
    fig.suptitle("lockd vs C virtlockd (%s run, %s)" % (results["mode"], date))
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True
