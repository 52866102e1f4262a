"""Run every Molecule scenario (``molecule test -s <name>``) as one pytest test.

The scenarios live in ``extensions/molecule/<name>/`` and boot systemd-nspawn hosts
through ``testbed/nspawn.py``. While a scenario runs, its steps
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

from tests.harness import require, require_root
from testbed.nspawn import prepare_rootfs

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / ".cache" / "molecule-logs"
SCENARIOS = sorted(p.parent.name for p in (REPO / "extensions" / "molecule").glob("*/molecule.yml"))
# Lines worth echoing live: Molecule's step lines and Ansible's task/recap lines.
PROGRESS = re.compile(r"(➜|^\s*│?\s*(TASK|PLAY|RUNNING HANDLER) \[|fatal:|FAILED|failed=[1-9]|"
                      r"Idempotence|^\s*│?\s*\S+\s+: ok=|\b(PASSED|FAILED|ERROR)\b|\d+ (passed|failed))")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TIMEOUT = 900


class _Live:
    """Write progress lines to the terminal while pytest captures output."""

    def __init__(self, pytestconfig):
        self.capman = pytestconfig.pluginmanager.getplugin("capturemanager")

    def __call__(self, msg: str) -> None:
        with self.capman.global_and_fixture_disabled():
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()


@pytest.mark.systemd
@pytest.mark.libvirt
@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario, pytestconfig, tmp_path_factory):
    require_root()
    venv_bin = Path(sys.executable).parent
    molecule = shutil.which("molecule", path=f"{venv_bin}:{os.environ.get('PATH', '')}")
    require(molecule, "molecule (make venv, requirements/ansible.txt)")
    require(shutil.which("systemd-nspawn"), "systemd-nspawn (scripts/install-deps.sh)")
    _echo = _Live(pytestconfig)
    prepare_rootfs(pytestconfig=pytestconfig)  # instant when cached; shows a cold build's progress
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{scenario}.log"
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    # A private ephemeral dir per run: Molecule's default one is keyed by the
    # project path only, so two test runs on one machine would destroy each
    # other's hosts in their first `destroy` step.
    ephemeral = tmp_path_factory.mktemp(f"molecule-{scenario}")
    env["MOLECULE_EPHEMERAL_DIRECTORY"] = str(ephemeral)
    env.update(NO_COLOR="1", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PY_COLORS="0",
               MOLECULE_NO_LOG="false", PYTHONUNBUFFERED="1")
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
