"""The CI template users copy (.github/workflows/molecule.yml): actionlint
passes (with shellcheck on its run: scripts), it runs the podman scenario from
the installed collection, and it pins what requirements/ansible.txt pins."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.harness import require_tool
from tests.molecule.test_scenarios import REPO

WORKFLOW = REPO / ".github" / "workflows" / "molecule.yml"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def actionlint(path: Path) -> subprocess.CompletedProcess:
    require_tool("shellcheck", "shellcheck")  # actionlint checks run: scripts with it when found
    assert ACTIONLINT.exists(), "actionlint missing: make venv (requirements/test.txt)"
    return subprocess.run([str(ACTIONLINT), "-no-color", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_actionlint_passes():
    proc = actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_copy(tmp_path):
    """The check above can fail: an unquoted shell variable and an unknown
    context both make actionlint exit non-zero."""
    broken = tmp_path / ".github" / "workflows" / "molecule.yml"
    broken.parent.mkdir(parents=True)
    unquoted = 'cd "$COLLECTIONS/ansible_collections/lockd/virtlockd"'
    assert unquoted in WORKFLOW.read_text()
    text = WORKFLOW.read_text().replace(unquoted, unquoted.replace('"', ""))
    text = text.replace("${{ github.workspace }}", "${{ githubb.workspace }}")
    broken.write_text(text)
    proc = actionlint(broken)
    assert proc.returncode != 0, proc.stdout
    assert "githubb" in proc.stdout and "SC2086" in proc.stdout, proc.stdout


def test_it_runs_the_podman_scenario_from_the_installed_collection():
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["podman"]["steps"]
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "ansible-galaxy collection install" in scripts
    assert re.search(r'cd "\$COLLECTIONS/ansible_collections/lockd/virtlockd"', scripts)
    assert "MOLECULE_GLOB='extensions/molecule/*/molecule.yml' molecule test -s podman" in scripts
    assert "apt-get install -y -q podman" in scripts


def test_it_pins_what_the_test_suite_uses():
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements/ansible.txt").read_text(), re.M))
    used = dict(re.findall(r"\b([a-z][a-z-]+)(?:\[podman\])?==([0-9][^\s\"]*)", WORKFLOW.read_text()))
    assert set(used) == {"molecule", "molecule-plugins", "ansible", "pytest-testinfra"}, used
    for name, version in used.items():
        assert pinned.get(name) == version, f"{name}=={version} in the workflow, {pinned.get(name)} in requirements"
