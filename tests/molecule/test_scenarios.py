"""Run every Molecule scenario (``molecule test -s <name>``) as one pytest test.

The scenarios live in ``extensions/molecule/<name>/``: most boot systemd-nspawn
hosts through ``testbed/nspawn.py``, the NFS ones attach to the session's
multi-kernel bed (``testbed/nfsbed.py``, booted in the background as soon as
collection selects one of them), ``podman`` runs Molecule's podman driver
(its containers must not outlive the run, nor touch the machine's network
settings: checked here). While a scenario runs, its steps
(create, converge, idempotence, verify, destroy) and Ansible tasks are echoed
to the terminal, prefixed with the scenario name. The full log goes to
``.cache/molecule-logs/<scenario>.log``; on failure its tail is in the report.

Run one scenario by hand::

    PATH=$PWD/.venv/bin:$PATH molecule test -s two_vms_one_disk
    make test PYTEST_ARGS="tests/molecule -k two_vms"
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import nfs_bed, require, require_root
from testbed.nspawn import prepare_rootfs

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / ".cache" / "molecule-logs"
SCENARIOS = sorted(p.parent.name for p in (REPO / "extensions" / "molecule").glob("*/molecule.yml"))
# Scenarios on the multi-kernel NFS test bed (QEMU guests, testbed/nfsbed.py):
# they share the session's one bed (tests/harness/nfs_bed.py, $LOCKD_NFS_BED).
NFS_SCENARIOS = {"nfs_cluster", "nfs_partition"}
# Lines worth echoing live: Molecule's step lines and Ansible's task/recap lines.
PROGRESS = re.compile(r"(➜|^\s*│?\s*(TASK|PLAY|RUNNING HANDLER) \[|fatal:|FAILED|failed=[1-9]|"
                      r"Idempotence|^\s*│?\s*\S+\s+: ok=|\b(PASSED|FAILED|ERROR)\b|\d+ (passed|failed)|"
                      r"^\[(podman-images|build-rootfs)\])")
# Molecule 26 logs this for a collection with a root molecule/ directory.
MIGRATE_WARNING = "should migrate"
PODMAN = "podman"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# A hang guard, not a speed limit: on this 2-core machine at load average 15
# the podman scenario took ~16 min (3 min at load 5); pytest.ini's 900 s
# default killed it mid-verify.
TIMEOUT = 1800


class _Live:
    """Write progress lines to the terminal while pytest captures output."""

    def __init__(self, pytestconfig):
        self.capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def __call__(self, msg: str) -> None:
        with self.capman.global_and_fixture_disabled():
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()


class _PodmanHost:
    """What the podman scenario may change on this machine, before and after a run."""

    def __init__(self, suffix: str):
        self.suffix = suffix
        self.before = self.snapshot()

    @staticmethod
    def snapshot() -> dict:
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        return {
            "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
            "bridges": sorted(m for m in re.findall(r"^\d+: ([^:@]+)", links, re.M)
                              if m.startswith(("cni-podman", "podman"))),
        }

    def ours(self) -> list[str]:
        names = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"],
                               capture_output=True, text=True).stdout.split()
        return [n for n in names if n.endswith(self.suffix)]

    def remove_ours(self) -> None:
        for name in self.ours():
            subprocess.run(["podman", "rm", "--force", "--time", "5", name], capture_output=True)

    def assert_contained(self) -> None:
        left = self.ours()
        self.remove_ours()
        assert not left, f"the podman scenario left containers behind: {left}"
        assert self.snapshot() == self.before, (
            f"the podman scenario changed the machine's network: {self.before} -> {self.snapshot()}")


def _prerequisites(scenario: str, pytestconfig) -> None:
    require_root()
    if scenario in NFS_SCENARIOS:
        nfs_bed.get(pytestconfig)  # boots (or waits for) the session's bed, sets $LOCKD_NFS_BED
        return
    if scenario == PODMAN:
        require(shutil.which("podman"), "podman (scripts/install-deps.sh)")
        # The images come from the nspawn rootfs tarballs (dependency.sh runs
        # scripts/build-rootfs.sh; instant when cached).
        return
    require(shutil.which("systemd-nspawn"), "systemd-nspawn (scripts/install-deps.sh)")
    prepare_rootfs(pytestconfig=pytestconfig)  # instant when cached; shows a cold build's progress


@pytest.mark.systemd
@pytest.mark.libvirt
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("scenario", [pytest.param(s, marks=pytest.mark.nfsbed) if s in NFS_SCENARIOS else s
                                      for s in SCENARIOS])
def test_molecule_scenario(scenario, pytestconfig, tmp_path_factory):
    venv_bin = Path(sys.executable).parent
    molecule = shutil.which("molecule", path=f"{venv_bin}:{os.environ.get('PATH', '')}")
    require(molecule, "molecule (make venv, requirements/ansible.txt)")
    _prerequisites(scenario, pytestconfig)
    _echo = _Live(pytestconfig)
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{scenario}.log"
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    # A private ephemeral dir per run: Molecule's default one is keyed by the
    # project path only, so two test runs on one machine would destroy each
    # other's hosts in their first `destroy` step. Container names are global:
    # a per-run suffix keeps two podman runs apart the same way.
    ephemeral = tmp_path_factory.mktemp(f"molecule-{scenario}")
    env["MOLECULE_EPHEMERAL_DIRECTORY"] = str(ephemeral)
    env["LOCKD_PODMAN_SUFFIX"] = f"-{os.getpid()}"
    env.update(NO_COLOR="1", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PY_COLORS="0",
               MOLECULE_NO_LOG="false", PYTHONUNBUFFERED="1")
    podman_host = _PodmanHost(env["LOCKD_PODMAN_SUFFIX"]) if scenario == PODMAN else None
    t0 = time.monotonic()
    _echo(f"\n[molecule {scenario}] molecule test -s {scenario} (log: {log_path.relative_to(REPO)})")
    tail: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([molecule, "test", "-s", scenario], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = ANSI.sub("", raw.rstrip("\n"))
                log.write(line + "\n")
                tail.append(line)
                del tail[:-200]
                if PROGRESS.search(line):
                    _echo(f"[molecule {scenario} {time.monotonic() - t0:5.0f}s] {line.strip(' │')}")
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                # Molecule was killed mid-run: make sure its hosts do not outlive it.
                if podman_host:
                    podman_host.remove_ours()
                elif scenario in NFS_SCENARIOS:
                    subprocess.run([sys.executable, "-m", "testbed.nfsbed", "release",
                                    str(ephemeral / "nfsbed")], cwd=REPO)
                else:
                    subprocess.run([sys.executable, "-m", "testbed.nspawn", "destroy",
                                    str(ephemeral / "nspawn")], cwd=REPO)
    took = time.monotonic() - t0
    _echo(f"[molecule {scenario}] {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f} s")
    assert rc == 0, (f"molecule test -s {scenario} failed (exit {rc}); full log {log_path}\n"
                     + "\n".join(tail[-120:]))
    # Molecule treats a verify step that finds no test file as a success.
    text = log_path.read_text()
    assert "Skipping, no tests found" not in text, f"a verify step of {scenario} found no tests (see {log_path})"
    assert re.search(r"\d+ passed", text), f"no testinfra test ran in {scenario} (see {log_path})"
    assert MIGRATE_WARNING not in text, f"Molecule warns about the layout in {scenario} (see {log_path})"
    if podman_host:
        podman_host.assert_contained()
        assert "Trying to pull" not in text, f"the podman scenario pulled an image (see {log_path})"
