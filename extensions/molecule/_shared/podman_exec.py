"""testinfra reaches podman hosts with ``podman exec``, not one Ansible run per command.

testinfra's Ansible backend runs commands itself only on ssh, docker and lxc
hosts. On any other connection (Molecule's podman driver writes
``ansible_connection: podman``) every ``host.run`` becomes an ad-hoc
``ansible -m shell`` run: about 3 s each on a busy 2-core machine, minutes
per test file. :func:`install` maps such hosts to testinfra's own podman
backend (~0.1 s a command); ``host.ansible(...)`` still runs the module
through Ansible and the scenario's inventory. Hosts on other connections are
left alone.
"""
from __future__ import annotations

import testinfra
from testinfra.utils import ansible_runner

PODMAN_CONNECTIONS = ("podman", "containers.podman.podman")
_ansible_host = ansible_runner.get_ansible_host


def podman_host(config, inventory, host, *args, **kwargs):
    """testinfra's get_ansible_host, with podman hosts on the podman backend."""
    hostvars = inventory.get("_meta", {}).get("hostvars", {}).get(host, {})
    if hostvars.get("ansible_connection") not in PODMAN_CONNECTIONS:
        return _ansible_host(config, inventory, host, *args, **kwargs)
    user = hostvars.get("ansible_user")
    container = hostvars.get("ansible_host", host)
    return testinfra.get_host(f"podman://{user}@{container}" if user else f"podman://{container}")


def install() -> None:
    ansible_runner.get_ansible_host = podman_host
