"""Indirect mode over real NFS: hv1 and hv2 are QEMU guests with their own
kernels, mounting nfs:/srv/lockd at /var/lib/libvirt/lockd and nfs:/srv/images
at /var/lib/libvirt/images. The lease files are on the NFS lockspace.

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


def test_two_kernels_one_nfs_server(host, hv2):
    # Separate kernels (not one kernel with bind mounts, as in shared_storage)...
    boot_ids = {h.file("/proc/sys/kernel/random/boot_id").content_string for h in (host, hv2)}
    assert len(boot_ids) == 2
    # ...both mounting the same NFS exports (NFSv4.2, with real locking: no nolock/local_lock).
    for h in (host, hv2):
        for mnt, export in (("/var/lib/libvirt/lockd", "nfs:/srv/lockd"), (lc.IMAGES, "nfs:/srv/images")):
            line = h.check_output(f"findmnt -n -o SOURCE,FSTYPE,OPTIONS {mnt}")
            source, fstype, options = line.split()
            assert (source, fstype) == (export, "nfs4"), line
            assert "vers=4.2" in options and "local_lock=none" in options, line
    assert host.file(lc.EXTRA).inode == hv2.file(lc.EXTRA).inode
    for h in (host, hv2):
        assert f'file_lockspace_dir = "{lc.FILES_LOCKSPACE}"' in h.file("/etc/libvirt/qemu-lockd.conf").content_string


def test_vm1_runs_on_hv1(host, hv2):
    assert lc.state(host, "vm1") == "running"
    assert lc.state(hv2, "vmb") == "shut off"


def test_vm_on_hv2_refused_while_vm1_runs_on_hv1(host, hv2):
    r = lc.start(hv2, "vmb")
    assert r.rc != 0, "vmb STARTED on hv2 on the disk vm1 writes on hv1: NFS storage is not protected"
    assert BUSY in r.stderr, r.stderr
    assert lc.state(host, "vm1") == "running"


def test_lease_info_on_hv1_shows_the_lease(host):
    res = lc.lease_info(host, resource=NAME)
    assert res["source"] == "admin_socket"
    assert lc.owners_of(res["leases"]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    assert res["leases"][0]["path"] == LEASE_FILE
    assert res["held_elsewhere"] == []


def test_on_hv2_the_lease_file_is_held_elsewhere(host, hv2):
    res = lc.lease_info(hv2, resource=NAME)
    assert res["source"] == "admin_socket"
    assert res["leases"] == []
    assert [(e["lockspace"], e["resource"], e["path"], e["mode"]) for e in res["held_elsewhere"]] == [
        (lc.FILES_LOCKSPACE, NAME, LEASE_FILE, "exclusive")], res
    # Over NFS the other host's lock has no local pid.
    assert res["held_elsewhere"][0]["holder"] == "another host or process"
    assert [lease for lease in lc.ctl_leases(hv2) if lease["resource"] == NAME] == []
    assert hv2.check_output(GETLK.format(LEASE_FILE)) == "locked"


def test_vm_on_hv2_starts_once_vm1_stops(host, hv2):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(hv2, "vmb").rc == 0, "vmb starts on hv2 once vm1 is gone", timeout=60)
    # Now hv1 is the one refused, and hv2 holds the lease.
    r = lc.start(host, "vm1")
    assert r.rc != 0 and BUSY in r.stderr, r.stderr
    assert lc.owners_of([lease for lease in lc.ctl_leases(hv2) if lease["resource"] == NAME]) == [
        (VMB, lc.qemu_pid(hv2, "vmb"))]
    assert host.check_output(GETLK.format(LEASE_FILE)) == "locked"
    lc.destroy(hv2, "vmb")
    # Released: the daemon unlinks the lease file, or leaves it unlocked.
    lc.wait_for(lambda: host.check_output(f"test -e {LEASE_FILE} || echo gone; test -e {LEASE_FILE} && "
                                          + GETLK.format(LEASE_FILE) + " || true") in ("gone", "unlocked"),
                "the lease file is free once vmb stops", timeout=60)
