"""Fixtures for the collection tests: the ansible_collections tree, ansible
commands from the venv, and modules run the way Ansible runs them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.collection import tree

# Modules run on the managed host's interpreter. The system python3 is what a
# hypervisor has; it also works for an unprivileged become user (the venv's
# interpreter lives under /root).
TARGET_PYTHON = "/usr/bin/python3"


def venv_tool(name: str) -> str:
    """An ansible tool from the running interpreter's venv (make test puts it on PATH)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make venv` (requirements/ansible.txt)")
    return found


@pytest.fixture(scope="session")
def collection_tree() -> Path:
    return tree.prepare()


@pytest.fixture(scope="session")
def ansible_env(collection_tree, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("ansible-home")
    env = dict(os.environ)
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(tree.COLLECTIONS_ROOT),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_HOME=str(home),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        ANSIBLE_PYTHON_INTERPRETER=TARGET_PYTHON,
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    return env


class ModuleRunner:
    """Run one lockd.virtlockd module on localhost with `ansible`, return its result dict."""

    def __init__(self, env: dict, workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.count = 0

    def __call__(self, module: str, args: dict, check: bool = False, diff: bool = False,
                 become_user: str | None = None) -> dict:
        self.count += 1
        tree_dir = self.workdir / f"result-{self.count}"
        env = dict(self.env, ANSIBLE_CALLBACKS_ENABLED="ansible.builtin.tree",
                   ANSIBLE_CALLBACK_TREE_DIR=str(tree_dir), ANSIBLE_LOAD_CALLBACK_PLUGINS="1")
        cmd = [venv_tool("ansible"), "localhost", "-c", "local", "-i", "localhost,",
               "-m", f"lockd.virtlockd.{module}", "-a", json.dumps(args)]
        if check:
            cmd.append("--check")
        if diff:
            cmd.append("--diff")
        if become_user:
            # nobody's shell is nologin; su needs an explicit shell.
            cmd += ["--become", "--become-method", "su", "--become-user", become_user,
                    "-e", "ansible_become_flags='-s /bin/sh'"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        result_file = tree_dir / "localhost"
        assert result_file.exists(), f"no module result; ansible said:\n{proc.stdout}\n{proc.stderr}"
        result = json.loads(result_file.read_text())
        result["_stdout"] = proc.stdout
        result["_stderr"] = proc.stderr
        # The tree callback drops the `failed` flag; `ansible` exits 2 on a failed task.
        result.setdefault("failed", proc.returncode != 0)
        assert proc.returncode in (0, 2), f"ansible exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return result


@pytest.fixture
def run_module(ansible_env, tmp_path) -> ModuleRunner:
    return ModuleRunner(ansible_env, tmp_path)
