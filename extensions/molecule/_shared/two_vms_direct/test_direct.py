"""Direct mode: the disk image itself is the lock (after playbooks/smoke_test.yml).

Shared by the scenarios two_vms_one_disk (nspawn) and podman: each runs
../_shared/smoke.yml as a side effect, then `verify ../_shared/two_vms_direct`."""
import lockcheck as lc

BUSY = lc.busy_message(lc.EXTRA)


def test_vm1_running(host):
    assert lc.state(host, "vm1") == "running"


def test_vm2_refused_by_the_lock_manager(host):
    r = lc.start(host, "vm2")
    assert r.rc != 0, "vm2 STARTED on a disk vm1 is writing: the disk is not protected"
    assert BUSY in r.stderr, r.stderr
    assert lc.state(host, "vm1") == "running"


def test_virtlockctl_shows_vm1_lease(host):
    leases = [lease for lease in lc.ctl_leases(host) if lease["path"] == lc.EXTRA]
    assert len(leases) == 1, leases
    lease = leases[0]
    assert lease["lockspace"] == "" and lease["resource"] == lc.EXTRA and lease["shared"] is False
    assert lc.owners_of([lease]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    assert host.file(lc.EXTRA).inode == lease["ino"]


def test_lease_info_module_shows_vm1_lease(host):
    res = lc.lease_info(host, path=lc.EXTRA)
    assert res["source"] == "admin_socket"
    assert lc.owners_of(res["leases"]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    assert [lease["owners"][0]["name"] for lease in res["leases"]] == ["vm1"]


def test_proc_locks_shows_our_daemon_holding_the_disk(host):
    ino = lc.inode(host, lc.EXTRA)
    # A write lock on byte 0 of extra.img in the kernel's table...
    held = [line for line in lc.proc_locks_on(host, lc.EXTRA)
            if "WRITE" in line and line.split()[-2:] == ["0", "0"]]
    assert held, lc.proc_locks_on(host, lc.EXTRA)
    # ...and it belongs to an open file of our daemon (OFD locks show pid -1
    # in /proc/locks, so look at the daemon's own fds).
    mine = [line for line in lc.daemon_fd_locks(host, lc.daemon_pid(host))
            if f":{ino} " in line and "WRITE" in line]
    assert mine, "virtlockd holds no lock on extra.img"


def test_vm2_starts_after_vm1_is_destroyed(host):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(host, "vm2").rc == 0, "vm2 starts once vm1 is gone")
    assert lc.state(host, "vm2") == "running"
    # ...and now vm1 is the one refused.
    r = lc.start(host, "vm1")
    assert r.rc != 0 and BUSY in r.stderr, r.stderr
    lc.destroy(host, "vm2")


def test_shareable_disk_both_run(host):
    for vm in ("vm1", "vm2"):
        lc.redefine_disk(host, vm, "<shareable/>")
    try:
        for vm in ("vm1", "vm2"):
            r = lc.start(host, vm)
            assert r.rc == 0, r.stderr
        leases = [lease for lease in lc.ctl_leases(host) if lease["path"] == lc.EXTRA]
        assert len(leases) == 1 and leases[0]["shared"] is True, leases
        assert {o for o, _ in lc.owners_of(leases)} == set(lc.UUIDS.values())
    finally:
        for vm in ("vm1", "vm2"):
            lc.destroy(host, vm)


def test_readonly_disk_both_run(host):
    for vm in ("vm1", "vm2"):
        lc.redefine_disk(host, vm, "<readonly/>")
    try:
        for vm in ("vm1", "vm2"):
            r = lc.start(host, vm)
            assert r.rc == 0, r.stderr
        # libvirt sends no acquire for read-only disks.
        assert [lease for lease in lc.ctl_leases(host) if lease["path"] == lc.EXTRA] == []
    finally:
        for vm in ("vm1", "vm2"):
            lc.destroy(host, vm)
