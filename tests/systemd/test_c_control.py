"""Control: the same checks against Debian's C virtlockd under the same systemd.

tests/systemd/test_daemon.py asserts that leases survive SIGKILL of the lock
daemon. To show that this check can fail (a test that cannot fail proves
nothing), it is run here against libvirt's own virtlockd, which keeps its
locks only in its process (shared/notes/systemd-hosts.md): after SIGKILL,
vm2 starts next to vm1. Runs before our daemon is installed on sd12.
"""
from __future__ import annotations

import pytest

from tests.systemd import hostlib as hl
from tests.systemd.test_daemon import assert_protected

pytestmark = [pytest.mark.systemd, pytest.mark.libvirt, pytest.mark.c_daemon]

HOST = "sd12"


def test_c_virtlockd_loses_the_lease_on_sigkill(cluster):
    frag = cluster.exec(HOST, "systemctl show -P FragmentPath virtlockd.service").stdout.strip()
    assert frag.startswith(("/lib/systemd/", "/usr/lib/systemd/")), f"not Debian's unit: {frag}"
    hl.enable_lockd_in_qemu(cluster, HOST)
    hl.define_vms(cluster, HOST)
    try:
        assert hl.start(cluster, HOST, "vm1").returncode == 0
        qpid = hl.qemu_pid(cluster, HOST, "vm1")
        exe = cluster.exec(HOST, f"readlink /proc/{hl.daemon_pid(cluster, HOST)}/exe").stdout.strip()
        assert exe == "/usr/sbin/virtlockd", exe
        assert_protected(cluster, HOST, qpid)  # the C daemon protects vm1 while it lives...
        cluster.exec(HOST, "systemctl kill -s SIGKILL virtlockd.service")
        # ...and loses everything with its process: the next start re-activates
        # it through the socket, with no memory of vm1's lease.
        with pytest.raises(AssertionError, match="vm2 was not refused"):
            assert_protected(cluster, HOST, qpid)
        assert hl.state(cluster, HOST, "vm2") == "running", "vm2 runs next to vm1 on the same disk"
    finally:
        cluster.exec(HOST, "virsh -q destroy vm1; virsh -q destroy vm2; true")
