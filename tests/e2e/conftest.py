"""End to end: real libvirtd 9.0.0 + QEMU (TCG) using OUR lock daemon on
/run/libvirt/virtlockd-sock. libvirtd starts once per session (its first start
probes QEMU for ~8 s); each test starts from all domains shut off, direct mode.
"""
from __future__ import annotations

import os

import pytest

from tests.harness import require, require_root
from testbed.libvirt import shared_env


@pytest.fixture(scope="session")
def libvirt_env():
    require_root()
    for tool in ("/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/qemu-system-x86_64"):
        require(os.access(tool, os.X_OK), f"{tool} (scripts/install-deps.sh)")
    # Torn down at session end (tests/conftest.py) or when another suite
    # needs different settings.
    return shared_env(lock_daemon="py")


@pytest.fixture
def lv(libvirt_env):
    """The session's environment, reset to: every domain shut off, direct mode,
    lock_manager = "lockd", lock daemon running."""
    # shared_env() again: another suite may have swapped the environment.
    env = shared_env(lock_daemon="py")
    env.stop_all_domains()
    if not env.lock_daemon_alive():
        env.start_lock_daemon()
    env.set_lock_manager("lockd")
    env.set_indirect(False)
    yield env
    env.stop_all_domains()
