"""Static checks of the collection: ansible-test sanity, ansible-lint,
antsibull-docs, the changelog, build + offline install + ansible-doc, and the
role's defaults against its argument specs and the daemon's defaults."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.collection import tree
from tests.collection.conftest import venv_tool

REPO = tree.REPO
ROLE = REPO / "roles" / "lock_manager"

# ansible-test downloads a get-pip.py from ci-files.testing.ansible.com to
# bootstrap pip into its per-test venvs; that host is unreachable here. This
# stand-in bootstraps the same way from the interpreter's bundled ensurepip
# wheel; the pinned sanity requirements still come from PyPI.
GET_PIP_STANDIN = '''"""Stand-in for get-pip.py: bootstrap pip from this interpreter's bundled ensurepip wheel."""
import glob
import os
import sys

import ensurepip

wheel = sorted(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl")))[-1]
sys.path.insert(0, wheel)
from pip._internal.cli.main import main  # noqa: E402

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.exit(main(["install", "--upgrade", "--force-reinstall"] + args))
'''


def run(cmd, cwd, env=None, timeout=900):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    return proc.returncode, output


def ansible_test_home() -> Path:
    """A private HOME for ansible-test: its venvs are cached in .cache/ between runs."""
    home = REPO / ".cache" / "ansible-test-home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # ansible-core 2.19 (requirements/ansible.txt) bootstraps pip 24.2.
    (cache / "get_pip_24_2.py").write_text(GET_PIP_STANDIN)
    return home


def test_ansible_test_sanity(collection_tree, ansible_env):
    """Every sanity test for Python 3.11 (the controller), no ignore file, each in its pinned venv."""
    assert not (collection_tree / "tests" / "sanity").exists(), "no ignore files allowed"
    env = dict(ansible_env, HOME=str(ansible_test_home()))
    rc, out = run([venv_tool("ansible-test"), "sanity", "--python", "3.11", "--venv", "--requirements",
                   "--color", "no"], cwd=collection_tree, env=env)
    failures = [line for line in out.splitlines() if "ERROR" in line or "FATAL" in line]
    assert "All targets skipped" not in out, "ansible-test saw no files in the tree"
    assert 'Running sanity test "validate-modules"' in out, out[-3000:]
    assert rc == 0, "ansible-test sanity failed:\n" + "\n".join(failures or out.splitlines()[-40:])


# The interpreters of the target hosts: RHEL 9 (3.9) and Debian 13 (3.13);
# Debian 12 (3.11) gets the full run above. Modules and module_utils must
# compile and import there too.
TARGET_PYTHONS = ("3.9", "3.13")


def find_python(version: str) -> str | None:
    """A working python<version>: pyenv's real binaries first (its shims may not resolve), then PATH."""
    candidates = [str(p) for p in sorted(Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python{version}"))]
    candidates.append(shutil.which(f"python{version}") or "")
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", TARGET_PYTHONS)
def test_ansible_test_compile_and_import_on_target_pythons(collection_tree, ansible_env, version):
    python = find_python(version)
    assert python, f"python{version} not found (the CI image carries pyenv 3.9-3.13)"
    env = dict(ansible_env, HOME=str(ansible_test_home()),
               PATH=f"{Path(python).parent}:{ansible_env['PATH']}")
    rc, out = run([venv_tool("ansible-test"), "sanity", "--test", "compile", "--test", "import",
                   "--python", version, "--venv", "--requirements", "--color", "no"], cwd=collection_tree, env=env)
    assert f'Running sanity test "import" on Python {version}' in out, out[-3000:]
    failures = [line for line in out.splitlines() if "ERROR" in line or "FATAL" in line]
    assert rc == 0, f"ansible-test compile/import on {version} failed:\n" + "\n".join(failures or out.splitlines()[-40:])


def test_ansible_lint_production_profile(collection_tree, ansible_env, tmp_path):
    # A private HOME: ansible-lint puts ~/.ansible/collections first on the
    # collections path, where a stale install of this collection would shadow the tree.
    env = dict(ansible_env, HOME=str(tmp_path))
    rc, out = run([venv_tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
                  cwd=collection_tree, env=env)
    assert rc == 0, out[-6000:]
    assert "Profile 'production' was required, and it passed" in out


def test_antsibull_docs_lint(collection_tree, ansible_env):
    rc, out = run([venv_tool("antsibull-docs"), "lint-collection-docs", "--plugin-docs", "."],
                  cwd=collection_tree, env=ansible_env)
    assert rc == 0, out[-6000:]


def test_changelog_fragments_lint(ansible_env):
    rc, out = run([venv_tool("antsibull-changelog"), "lint"], cwd=REPO, env=ansible_env)
    assert rc == 0, out


def test_build_offline_install_and_ansible_doc(tmp_path, ansible_env):
    """The release tarball carries lockd_src (the role installs from it) and installs with no network."""
    rc, out = run([venv_tool("ansible-galaxy"), "collection", "build", "--output-path", tmp_path, "--force"],
                  cwd=REPO, env=ansible_env)
    assert rc == 0, out
    [tarball] = tmp_path.glob("lockd-virtlockd-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    for required in ("lockd_src/lockd/daemon.py", "lockd_src/lockd/data/units/virtlockd.service",
                     "roles/lock_manager/tasks/main.yml", "plugins/modules/lease.py",
                     "plugins/module_utils/_lockd_admin.py", "playbooks/site.yml", "meta/runtime.yml"):
        assert required in names, f"{required} missing from {tarball.name}"
    leaked = sorted(n for n in names if n.split("/")[0] in (".venv", "tests", "ansible_collections", ".git")
                    or "__pycache__" in n or n.endswith(".pyc"))
    assert not leaked, f"build_ignore lets these through: {leaked[:10]}"

    install_root = tmp_path / "installed"
    # --offline: no Galaxy server is contacted (the collection has no dependencies).
    # --force: an installed copy elsewhere on the collections path must not make this a no-op.
    env = dict(ansible_env, ANSIBLE_COLLECTIONS_PATH=str(install_root), HOME=str(tmp_path))
    rc, out = run([venv_tool("ansible-galaxy"), "collection", "install", "--offline", "--force", "-p", install_root,
                   tarball], cwd=tmp_path, env=env)
    assert rc == 0, out
    assert (install_root / "ansible_collections/lockd/virtlockd/lockd_src/lockd/daemon.py").exists()

    for module in ("lease_info", "lease"):
        rc, out = run([venv_tool("ansible-doc"), f"lockd.virtlockd.{module}"], cwd=tmp_path, env=env)
        assert rc == 0, out
        assert "EXAMPLES" in out and "RETURN VALUES" in out and "socket" in out, out[:2000]
    rc, out = run([venv_tool("ansible-doc"), "-t", "role", "lockd.virtlockd.lock_manager"], cwd=tmp_path, env=env)
    assert rc == 0 and "lock_manager_file_lockspace_dir" in out, out[:2000]


def test_role_defaults_match_argument_specs():
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(specs), (
        f"only in defaults: {sorted(set(defaults) - set(specs))}; only in argument_specs: "
        f"{sorted(set(specs) - set(defaults))}")
    for name, value in defaults.items():
        assert specs[name].get("default") == value, f"{name}: defaults {value!r} != argument_specs {specs[name].get('default')!r}"
        assert specs[name].get("description"), f"{name} is not documented"


def test_role_defaults_match_the_daemon_defaults():
    """virtlockd.conf values the role writes agree with lockd.config.DEFAULTS (single source of truth)."""
    from lockd.config import DEFAULTS
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    for key in ("log_level", "log_filters", "log_outputs", "max_clients", "admin_max_clients"):
        assert defaults[f"lock_manager_{key}"] == DEFAULTS[key], key
    # "" means "leave it to the daemon", so the daemon's own default applies.
    assert defaults["lock_manager_state_dir"] == "" and defaults["lock_manager_lock_type"] == ""
    specs = yaml.safe_load((ROLE / "meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert DEFAULTS["lock_type"] in specs["lock_manager_lock_type"]["choices"]
    assert defaults["lock_manager_io_timeout"] == 0 and defaults["lock_manager_on_lockfailure"] == ""
    assert defaults["lock_manager_nfs_lease_time"] == DEFAULTS["nfs_lease_time"]
    from lockd.config import ON_LOCKFAILURE
    assert specs["lock_manager_on_lockfailure"]["choices"] == [""] + list(ON_LOCKFAILURE)


def test_unit_files_come_from_the_package():
    """The role templates the package's unit files (single source) and points them at its wrapper."""
    units = REPO / "lockd_src/lockd/data/units"
    service = (units / "virtlockd.service").read_text()
    assert "ExecStart=/usr/local/sbin/virtlockd" in service, "the role installs the daemon as /usr/local/sbin/virtlockd"
    assert "ExecReload=" in service and "USR1" in service
    role_vars = yaml.safe_load((ROLE / "vars/main.yml").read_text())
    assert sorted(role_vars["__lock_manager_units"]) == sorted(p.name for p in units.iterdir())
