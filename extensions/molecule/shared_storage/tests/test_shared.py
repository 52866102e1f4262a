"""hv1 and hv2 share /var/lib/libvirt/images and /var/lib/libvirt/lockd.

The tests run from hv1 (``testinfra_hosts``) and reach hv2 through a second
testinfra host, so that each check can look at both sides.
"""
import os

import lockcheck as lc
import pytest
import testinfra

testinfra_hosts = ["ansible://hv1"]

NAME = lc.indirect_name(lc.EXTRA)
LEASE_FILE = f"{lc.FILES_LOCKSPACE}/{NAME}"
BUSY = lc.busy_message(NAME)
VMB = "5eb1a7e0-0c4b-4d1e-9a3f-10c4d00000b2"
# F_OFD_GETLK on byte 0: who (if anyone) holds a lock that would conflict with ours.
GETLK = ("python3 -c 'import fcntl,os,struct,sys; fd=os.open(sys.argv[1],os.O_RDWR); "
         "r=fcntl.fcntl(fd,36,struct.pack(\"hhqqi4x\",fcntl.F_WRLCK,0,0,1,0)); "
         "t=struct.unpack(\"hhqqi4x\",r)[0]; print(\"unlocked\" if t==fcntl.F_UNLCK else \"locked\")' {}")


@pytest.fixture(scope="module")
def hv2():
    return testinfra.get_host("ansible://hv2", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def test_storage_is_shared(host, hv2):
    assert host.file(lc.EXTRA).inode == hv2.file(lc.EXTRA).inode
    assert host.file(lc.FILES_LOCKSPACE).is_directory and hv2.file(lc.FILES_LOCKSPACE).is_directory
    for h in (host, hv2):
        assert f'file_lockspace_dir = "{lc.FILES_LOCKSPACE}"' in h.file("/etc/libvirt/qemu-lockd.conf").content_string


def test_vm1_runs_on_hv1(host, hv2):
    assert lc.state(host, "vm1") == "running"
    assert lc.state(hv2, "vmb") == "shut off"


def test_vm_on_hv2_refused_while_vm1_runs_on_hv1(host, hv2):
    r = lc.start(hv2, "vmb")
    assert r.rc != 0, "vmb STARTED on hv2 on the disk vm1 writes on hv1: shared storage is not protected"
    assert BUSY in r.stderr, r.stderr
    assert lc.state(host, "vm1") == "running"


def test_lease_info_on_hv1_shows_the_lease(host):
    res = lc.lease_info(host, resource=NAME)
    assert res["source"] == "admin_socket"
    assert lc.owners_of(res["leases"]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    assert res["leases"][0]["path"] == LEASE_FILE


def test_on_hv2_the_lease_file_is_held_elsewhere(host, hv2):
    # hv2's daemon holds no lease on it...
    res = lc.lease_info(hv2, resource=NAME)
    assert res["source"] == "admin_socket"
    assert res["leases"] == []
    # ...and lease_info says the shared lease file is held elsewhere (by hv1's daemon).
    assert [(e["lockspace"], e["resource"], e["path"], e["mode"]) for e in res["held_elsewhere"]] == [
        (lc.FILES_LOCKSPACE, NAME, LEASE_FILE, "exclusive")], res
    assert res["held_elsewhere"][0]["holder"] == "another host or process"
    # hv1 holds it itself, so there it is a lease, not held elsewhere.
    assert lc.lease_info(host, resource=NAME)["held_elsewhere"] == []
    assert [lease for lease in lc.ctl_leases(hv2) if lease["resource"] == NAME] == []
    # ...yet the shared lease file is locked, by hv1's daemon.
    assert hv2.file(LEASE_FILE).exists
    assert hv2.check_output(GETLK.format(LEASE_FILE)) == "locked"


def test_vm_on_hv2_starts_once_vm1_stops(host, hv2):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(hv2, "vmb").rc == 0, "vmb starts on hv2 once vm1 is gone")
    # Now hv1 is the one refused, and hv2 holds the lease.
    r = lc.start(host, "vm1")
    assert r.rc != 0 and BUSY in r.stderr, r.stderr
    assert lc.owners_of([lease for lease in lc.ctl_leases(hv2) if lease["resource"] == NAME]) == [
        (VMB, lc.qemu_pid(hv2, "vmb"))]
    lc.destroy(hv2, "vmb")
