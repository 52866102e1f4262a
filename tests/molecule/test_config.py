"""The Molecule layout, without booting anything: the base config is the one
Molecule 26 reads, no scenario fights it, the podman scenario runs without it,
and the collection tarball ships only the scenario a user can run."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.molecule.test_scenarios import MIGRATE_WARNING, NFS_SCENARIOS, REPO, SCENARIOS

MOLECULE_DIR = REPO / "extensions" / "molecule"
BASE = MOLECULE_DIR / "config.yml"
PODMAN = MOLECULE_DIR / "podman"
# Legacy provisioner keys that Molecule 26 moves into `ansible:` AFTER merging
# the base config: one of them in a molecule.yml REPLACES the base config's
# whole ansible.<key> (molecule/config.py _migrate_user_config).
LEGACY = ("ansible_args", "config_options", "env", "playbooks")
# Runnable from an installed collection (no testbed/, no nspawn, no root tools
# beyond podman): the only scenario the tarball carries.
SHIPPED = {"podman"}
PODMAN_NEEDS = ("extensions/molecule/_shared/lockcheck.py", "extensions/molecule/_shared/podman_exec.py",
                "extensions/molecule/_shared/smoke.yml", "extensions/molecule/_shared/two_vms_direct/test_direct.py",
                "extensions/molecule/podman/dependency.sh", "extensions/molecule/podman/Containerfile",
                "extensions/molecule/README.md")


def venv_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merge(base: dict, top: dict) -> dict:
    """Molecule's merge of a base config and a molecule.yml (molecule.util.merge_dicts)."""
    from molecule import util
    return util.merge_dicts(copy.deepcopy(base), copy.deepcopy(top))


@pytest.fixture(scope="module")
def molecule_list(tmp_path_factory) -> str:
    # A private HOME: a ~/.config/molecule/config.yml there would be read instead.
    env = dict(os.environ, HOME=str(tmp_path_factory.mktemp("home")), NO_COLOR="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run([venv_tool("molecule"), "list", "--format", "plain"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_molecule_reads_the_base_config_and_the_collection_layout(molecule_list):
    assert f"Found config file {BASE}" in molecule_list, molecule_list
    assert "Scenarios will be used from 'extensions/molecule'" in molecule_list, molecule_list
    assert MIGRATE_WARNING not in molecule_list, molecule_list


def test_every_scenario_is_listed_with_its_driver(molecule_list):
    # Plain format: instance, driver, provisioner, scenario, created, converged.
    drivers = {scenario: driver for driver, scenario
               in re.findall(r"^\S+\s+(\S+)\s+ansible\s+(\S+)\s", molecule_list, re.M)}
    assert set(drivers) == set(SCENARIOS), molecule_list
    for scenario, driver in drivers.items():
        assert driver == ("podman" if scenario == "podman" else "default"), (scenario, driver)


def test_no_scenario_uses_legacy_provisioner_keys():
    offenders = []
    for path in [BASE, *sorted(MOLECULE_DIR.glob("*/molecule.yml"))]:
        legacy = sorted(set(LEGACY) & set((load(path) or {}).get("provisioner") or {}))
        if legacy:
            offenders.append(f"{path.relative_to(REPO)}: provisioner.{', provisioner.'.join(legacy)}")
    assert not offenders, ("write these under `ansible:` (cfg, env, playbooks, executor.args.ansible_playbook); "
                           "Molecule would replace the base config's with them:\n" + "\n".join(offenders))


def test_nspawn_scenarios_inherit_the_shared_create_and_destroy():
    """nspawn scenarios inherit the base config's create/destroy; the NFS ones
    share the test bed's (attach to $LOCKD_NFS_BED or boot)."""
    for path in sorted(MOLECULE_DIR.glob("*/molecule.yml")):
        if path.parent == PODMAN:
            continue
        config = merge(load(BASE), load(path))
        assert config["driver"]["name"] == "default", path
        kind = "nfsbed_" if path.parent.name in NFS_SCENARIOS else ""
        for step in ("create", "destroy"):
            assert config["ansible"]["playbooks"][step] == f"../_shared/{kind}{step}.yml", path
            assert (path.parent / config["ansible"]["playbooks"][step]).resolve().exists(), path


def test_the_podman_scenario_does_not_depend_on_the_base_config():
    """From an installed collection Molecule reads no base config: the podman
    scenario must mean the same with and without it."""
    podman = load(PODMAN / "molecule.yml")
    assert merge(load(BASE), podman) == podman
    # No create.yml/destroy.yml of its own: Molecule falls back to the driver's.
    for step in ("create", "destroy"):
        assert not (PODMAN / podman["ansible"]["playbooks"][step]).exists()


def test_podman_platforms_run_local_systemd_images():
    podman = load(PODMAN / "molecule.yml")
    assert [p["image"] for p in podman["platforms"]] == ["localhost/lockd-virtlockd:bookworm",
                                                         "localhost/lockd-virtlockd:trixie"]
    for p in podman["platforms"]:
        assert p["pre_build_image"] is True and p["privileged"] is True and p["network"] == "none", p
        assert p["command"] == "/lib/systemd/systemd" and p["systemd"] == "always", p
    assert "dependency.sh" in podman["dependency"]["command"]
    assert podman["scenario"]["test_sequence"][0] == "dependency"


def _shell_words(text: str, name: str) -> set[str]:
    match = re.search(rf'{name}=\(\n(.*?)\n\)', text, re.S)
    assert match, f"{name}=( ... ) not found"
    return {w for line in match.group(1).splitlines() for w in line.split("#")[0].split()}


def test_containerfile_packages_are_in_the_nspawn_rootfs():
    """With the rootfs base the image build runs with --network none: every
    package the Containerfile wants must already be in the rootfs."""
    build = (REPO / "scripts" / "build-rootfs.sh").read_text()
    rootfs = _shell_words(build, "PACKAGES")
    suite_pkgs = dict(re.findall(r'\[(\w+)\]="([^"]*)"', build))
    containerfile = (PODMAN / "Containerfile").read_text()
    common = set(re.search(r'pkgs="([^"]+)"', containerfile).group(1).replace("\\\n", " ").split())
    trixie = set(re.search(r'trixie\) pkgs="\$pkgs ([^"]+)"', containerfile).group(1).split())
    assert common <= rootfs, f"not in scripts/build-rootfs.sh PACKAGES: {sorted(common - rootfs)}"
    assert trixie <= rootfs | set(suite_pkgs["trixie"].split()), sorted(trixie)


def test_the_tarball_ships_only_the_scenarios_an_installed_collection_can_run(tmp_path):
    proc = subprocess.run([venv_tool("ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [tarball] = tmp_path.glob("lockd-virtlockd-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    shipped = {n.split("/")[2] for n in names if re.fullmatch(r"extensions/molecule/[^/]+/molecule\.yml", n)}
    assert shipped == SHIPPED, (f"scenarios in {tarball.name}: {sorted(shipped)}; a scenario that needs this "
                                "repository (nspawn, testbed/) gets a build_ignore line in galaxy.yml")
    missing = [n for n in PODMAN_NEEDS if n not in names]
    assert not missing, f"the podman scenario needs these in the tarball: {missing}"
    nspawn_only = [n for n in names if n.startswith("extensions/molecule/")
                   and n.rsplit("/", 1)[-1] in ("config.yml", "create.yml", "destroy.yml")]
    assert not nspawn_only, f"only the nspawn scenarios use these: {nspawn_only}"
