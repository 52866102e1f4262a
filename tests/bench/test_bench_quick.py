# SPDX-License-Identifier: GPL-3.0-or-later
"""`make bench QUICK=1` inside `make test`, so the benchmark harness cannot rot.

Runs every scenario with tiny counts against both daemons and checks that the
run completed and produced a complete report. It asserts structure only, never
speed: timings on a shared 2-core machine are not a test result (the figures
are in docs/benchmarks.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("acqrel", "vmstart", "idle", "scale", "reexec", "limit")

pytestmark = [pytest.mark.c_daemon]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the benchmark needs root (the C virtlockd only serves uid 0 peers)")
    if not Path("/usr/sbin/virtlockd").exists():
        pytest.skip("/usr/sbin/virtlockd missing: run `make deps`")
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    return proc, out


def test_quick_run_succeeds(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, "python -m bench --quick failed:\n%s\n%s" % (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "Goals of issue 6" in proc.stdout
    assert "Next step:" in proc.stdout


def test_every_scenario_measured_both_daemons(quick_run):
    proc, out = quick_run
    results = json.loads((out / "benchmarks.json").read_text())
    assert results["mode"] == "quick"
    assert results["failed"] == []
    for scenario in SCENARIOS:
        assert scenario in results, "scenario %s missing from the results" % scenario
    for level, by_kind in list(results["acqrel"].items()) + list(results["vmstart"].items()) \
            + list(results["idle"].items()):
        for kind in ("c", "py"):
            runs = by_kind[kind]
            assert runs, (level, kind)
            for r in runs:
                ops = r.get("rpcs", r.get("cycles"))
                assert ops and ops > 0, (level, kind, r)
                assert r["client_cores"] >= 0
    for level, by_kind in results["vmstart"].items():
        for kind in ("c", "py"):
            for r in by_kind[kind]:
                # stopping a VM (owner EOF) released its disks
                assert r["leaked"] == 0, (level, kind, r)
    for kind in ("c", "py"):
        scale = results["scale"][kind][0]
        assert "error" not in scale, scale
        assert scale["unanswered"] == 0 and not scale["hang"]
        assert scale["rss_mb"] > 0
        reexec = results["reexec"][kind][0]
        assert "error" not in reexec, reexec
        # the prober must have been refused on every lease: otherwise the
        # harness's lease check (or the daemon) is broken
        assert reexec["probe_busy"] == reexec["leases"], reexec
        # the kernel-side check must see every lease locked before the re-exec
        assert reexec["locked_before"] == reexec["leases"], reexec
        assert reexec["lost_leases"] == 0, reexec
        limit = results["limit"][kind][0]
        assert limit["max_clients"] > 0 and limit["answer"], limit


def test_report_written(quick_run):
    _, out = quick_run
    md = (out / "benchmarks.md").read_text()
    assert "| scenario | metric | C virtlockd | lockd (ours) |" in md
    assert "## Goals (issue 6)" in md
    assert "make bench" in md
    png = out / "benchmarks.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "chart missing (matplotlib?)"
