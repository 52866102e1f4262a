"""Indirect mode: file_lockspace_dir, lease files named by sha256 of the disk path."""
import lockcheck as lc

NAME = lc.indirect_name(lc.EXTRA)
LEASE_FILE = f"{lc.FILES_LOCKSPACE}/{NAME}"
BUSY = lc.busy_message(NAME)


def test_qemu_lockd_conf_is_indirect(host):
    conf = host.file("/etc/libvirt/qemu-lockd.conf").content_string
    assert f'file_lockspace_dir = "{lc.FILES_LOCKSPACE}"' in conf


def test_vm1_running(host):
    assert lc.state(host, "vm1") == "running"


def test_vm2_refused_by_the_lock_manager(host):
    r = lc.start(host, "vm2")
    assert r.rc != 0, "vm2 STARTED on a disk vm1 is writing: the disk is not protected"
    assert BUSY in r.stderr, r.stderr


def test_lease_file_and_lease(host):
    assert host.file(LEASE_FILE).exists
    leases = [lease for lease in lc.ctl_leases(host) if lease["resource"] == NAME]
    assert len(leases) == 1, lc.ctl_leases(host)
    assert leases[0]["lockspace"] == lc.FILES_LOCKSPACE and leases[0]["path"] == LEASE_FILE
    assert lc.owners_of(leases) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    res = lc.lease_info(host, resource=NAME)
    assert lc.owners_of(res["leases"]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]


def test_the_lease_file_is_locked_not_the_image(host):
    ino = lc.inode(host, LEASE_FILE)
    mine = lc.daemon_fd_locks(host, lc.daemon_pid(host))
    assert any(f":{ino} " in line and "WRITE" in line for line in mine), mine
    img = lc.inode(host, lc.EXTRA)
    assert not any(f":{img} " in line for line in mine), "indirect mode must not lock the image itself"


def test_vm2_starts_after_vm1_is_destroyed(host):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(host, "vm2").rc == 0, "vm2 starts once vm1 is gone")
    r = lc.start(host, "vm1")
    assert r.rc != 0 and BUSY in r.stderr, r.stderr
    lc.destroy(host, "vm2")
