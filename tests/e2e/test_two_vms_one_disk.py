"""Issue 2, end to end: two VMs, one disk, with real libvirtd 9.0.0 + QEMU
and our lock daemon. Every VM start goes through libvirt's unmodified lockd.so
plugin; the refusals come from our daemon (QEMU's own image locking is
neutralised with share-rw, see shared/notes/real-libvirt.md)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from lockd.adminclient import AdminClient
from testbed.libvirt import ADMIN_SOCK, EXTRA, LEASE_DIR, UUIDS, lease_name

pytestmark = [pytest.mark.libvirt, pytest.mark.slow]

BUSY = f"error: resource busy: Lockspace resource '{EXTRA}' is locked"


def byte0_locks(env, path):
    """Locks on byte 0 of `path` (the lease byte; QEMU's own locks are at 100+)."""
    return [l for l in env.locks_on(path) if l["start"] == "0" and l["end"] == "0"]


def admin_leases():
    with AdminClient(str(ADMIN_SOCK)) as a:
        return a.call("leases")["leases"]


def test_vm2_refused_while_vm1_runs(lv):
    lv.define("vm1")
    lv.define("vm2")
    lv.start("vm1")
    assert lv.running("vm1")
    res = lv.start("vm2", check=False)
    assert not res.ok
    assert res.error_lines == ["error: Failed to start domain 'vm2'", BUSY], res.stderr
    assert lv.state("vm2") == "shut off"
    assert lv.running("vm1"), "the refused start must not disturb vm1"


def test_vm2_starts_after_vm1_destroyed(lv):
    lv.define("vm1")
    lv.define("vm2")
    lv.start("vm1")
    assert not lv.start("vm2", check=False).ok
    lv.destroy("vm1")
    res = lv.start("vm2", check=False)
    assert res.ok, res.stderr
    # ... and now vm1 is the one refused
    res = lv.start("vm1", check=False)
    assert res.error_lines[-1:] == [BUSY], res.stderr


def test_proc_locks_show_our_daemon_holding_the_lease(lv):
    lv.define("vm1")
    lv.start("vm1")
    pid = lv.lockd_pid
    locks = byte0_locks(lv, EXTRA)
    assert len(locks) == 1 and locks[0]["type"] == "WRITE", locks
    # Ours takes OFD locks by default: /proc/locks lists them with pid -1; the
    # daemon's own fdinfo ties the lock to the daemon process.
    if locks[0]["kind"] == "OFDLCK":
        fdinfo = lv.daemon_lock_fds(pid, EXTRA)
        assert any("OFDLCK" in l and "WRITE" in l and l.rstrip().endswith(" 0 0") for l in fdinfo), fdinfo
    else:
        assert locks[0]["kind"] == "POSIX" and locks[0]["pid"] == pid, locks
    # The root disk is locked too (every writable disk gets a lease).
    assert byte0_locks(lv, "/var/lib/libvirt/images/vm1.qcow2")
    lv.destroy("vm1")
    assert byte0_locks(lv, EXTRA) == []


def test_admin_interface_shows_the_lease(lv):
    lv.define("vm1")
    lv.start("vm1")
    qemu = lv.qemu_pid("vm1")
    leases = [l for l in admin_leases() if l.get("path") == str(EXTRA)]
    assert len(leases) == 1, admin_leases()
    lease = leases[0]
    assert lease["shared"] is False
    assert [(o["uuid"], o["name"], o["pid"]) for o in lease["owners"]] == [(UUIDS["vm1"], "vm1", qemu)]
    st = os.stat(EXTRA)
    assert (lease["dev"], lease["ino"]) == (st.st_dev, st.st_ino)


def test_shareable_disk_both_run_with_shared_locks(lv):
    lv.define("vm1", mode="shareable")
    lv.define("vm2", mode="shareable")
    lv.start("vm1")
    res = lv.start("vm2", check=False)
    assert res.ok, res.stderr
    assert lv.running("vm1") and lv.running("vm2")
    locks = byte0_locks(lv, EXTRA)
    assert locks and all(l["type"] == "READ" for l in locks), locks
    lease = [l for l in admin_leases() if l.get("path") == str(EXTRA)]
    assert len(lease) == 1 and lease[0]["shared"] is True
    assert sorted(o["name"] for o in lease[0]["owners"]) == ["vm1", "vm2"]
    # A read-write user of the same disk is refused while they run.
    lv.define("vm3")
    res = lv.start("vm3", check=False)
    assert res.error_lines[-1:] == [BUSY], res.stderr


def test_readonly_disk_both_run_and_take_no_lease(lv):
    lv.define("vm1", mode="readonly")
    lv.define("vm2", mode="readonly")
    lv.start("vm1")
    res = lv.start("vm2", check=False)
    assert res.ok, res.stderr
    # libvirt's lockd plugin never sends read-only disks (spec §5.4).
    assert byte0_locks(lv, EXTRA) == []
    assert [l for l in admin_leases() if l.get("path") == str(EXTRA)] == []


def test_sigkill_of_qemu_releases_its_locks(lv):
    lv.define("vm1")
    lv.define("vm2")
    lv.start("vm1")
    qemu = lv.qemu_pid("vm1")
    t0 = time.monotonic()
    os.kill(qemu, signal.SIGKILL)
    # QEMU's inherited connection closes with the process: the lease goes.
    lv.wait_for("the lease on extra.img to be released", lambda: byte0_locks(lv, EXTRA) == [])
    released_ms = (time.monotonic() - t0) * 1000
    print(f"lease released {released_ms:.0f} ms after SIGKILL of QEMU")
    lv.wait_for("vm1 to be seen as stopped", lambda: not lv.running("vm1"))
    res = lv.start("vm2", check=False)
    assert res.ok, res.stderr


def test_libvirtd_restart_keeps_the_locks(lv):
    lv.define("vm1")
    lv.define("vm2")
    lv.start("vm1")
    qemu = lv.qemu_pid("vm1")
    lv.restart_libvirtd()
    assert lv.running("vm1") and lv.qemu_pid("vm1") == qemu
    res = lv.start("vm2", check=False)
    assert res.error_lines[-1:] == [BUSY], res.stderr
    assert len(byte0_locks(lv, EXTRA)) == 1


def test_sigusr1_live_reexec_keeps_the_locks(lv):
    """ExecReload=kill -USR1: the daemon re-execs in place (same pid), keeps the
    lease fds, vm1's connection and the listening socket."""
    lv.define("vm1")
    lv.define("vm2")
    lv.start("vm1")
    pid = lv.lockd_pid
    before = byte0_locks(lv, EXTRA)
    start_before, stack_before = _stat(pid)
    lv.signal_lock_daemon(signal.SIGUSR1)

    # exec() gives the process a new, randomised stack (stat field startstack)
    # while pid and start time stay; then it must serve its admin socket again.
    def reexeced():
        if _stat(pid)[1] == stack_before:
            return False
        try:
            with AdminClient(str(ADMIN_SOCK), timeout=2) as a:
                return a.call("status")["pid"] == pid
        except Exception:  # noqa: BLE001 - not serving yet
            return False
    lv.wait_for("the re-exec'd daemon to serve", reexeced)
    assert lv.lockd_pid == pid and lv.lock_daemon_alive()
    assert _stat(pid)[0] == start_before       # the same process, not a restart
    assert byte0_locks(lv, EXTRA) == before
    res = lv.start("vm2", check=False)
    assert res.error_lines[-1:] == [BUSY], res.stderr
    # vm1's own connection survived the exec: when vm1 goes, its lease goes.
    lv.destroy("vm1")
    lv.wait_for("vm1's lease to go", lambda: byte0_locks(lv, EXTRA) == [])
    assert lv.start("vm2", check=False).ok


def _stat(pid):
    """(start time, start of stack) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[19], fields[25]


def test_indirect_mode_lease_files_by_sha256(lv):
    lv.set_indirect(True)          # qemu-lockd.conf + libvirtd restart
    try:
        lv.define("vm1")
        lv.define("vm2")
        lv.start("vm1")
        name = lease_name(EXTRA)
        lease_file = LEASE_DIR / name
        assert name == "63f5125b45b3f453e015a66ec81a437595d5cbc4d724170c510f59c1acb091c8"
        assert lease_file.exists()
        assert oct(lease_file.stat().st_mode & 0o777) == "0o600" and lease_file.stat().st_size == 0
        # In indirect mode the lease file is locked, not the image.
        assert len(byte0_locks(lv, lease_file)) == 1
        assert byte0_locks(lv, EXTRA) == []
        res = lv.start("vm2", check=False)
        assert res.error_lines[-1:] == [f"error: resource busy: Lockspace resource '{name}' is locked"], res.stderr
        lv.destroy("vm1")
        # lease files are unlinked on release (spec §4.4, AUTOCREATE)
        lv.wait_for("the lease file to be removed", lambda: not lease_file.exists(), timeout=10)
        res = lv.start("vm2", check=False)
        assert res.ok, res.stderr
        assert lease_file.exists()
    finally:
        lv.stop_all_domains()
        lv.set_indirect(False)


def test_control_without_lock_manager_vm2_starts(lv):
    """Negative control: with lock_manager = "nop" the same two domains both
    start. This proves the refusals above come from the lock manager, not
    from QEMU's own image locking (which share-rw disables)."""
    lv.set_lock_manager("nop")
    try:
        lv.define("vm1")
        lv.define("vm2")
        lv.start("vm1")
        res = lv.start("vm2", check=False)
        assert res.ok, res.stderr
        assert byte0_locks(lv, EXTRA) == []
    finally:
        lv.stop_all_domains()
        lv.set_lock_manager("lockd")
