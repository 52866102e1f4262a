"""The migration checks, run in both modes: tests/direct and tests/indirect
import every test below and give the ``lease`` fixture (where the lease
lives in that mode).

Order matters (pytest keeps it): vm1 starts on hv1; hv1 -> hv2 -> hv1; a
migration whose destination QEMU is killed mid-transfer; a migration during
which the source lock daemon is SIGKILLed (vm1 ends on hv2).

Each migration runs on the source host through ``testbed/migration.py``
(installed by setup.yml), which watches byte 0 of the lease from a process
that holds nothing and reports every moment nobody holds it exclusively.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import lockcheck as lc
import pytest
import testinfra

HELPER = "python3 /usr/local/libexec/lockd-molecule/migration.py"
VM1 = lc.UUIDS["vm1"]
# migrate-setspeed for the failure paths: the guest's 32 MiB of RAM data then
# take ~4 s to transfer, time enough to hit the transfer and, after a daemon
# SIGKILL, for systemd to restart it long before the switchover.
SLOW_MIB_S = 8


@dataclass(frozen=True)
class Lease:
    """Where vm1's lease on extra.img lives: the resource libvirt names and
    the file whose byte 0 is locked."""

    resource: str
    path: str
    indirect: bool

    @property
    def busy(self) -> str:
        return lc.busy_message(self.resource)


DIRECT = Lease(lc.EXTRA, lc.EXTRA, False)
INDIRECT = Lease(lc.indirect_name(), f"{lc.FILES_LOCKSPACE}/{lc.indirect_name()}", True)


@pytest.fixture(scope="module")
def hosts(host):
    hv2 = testinfra.get_host("ansible://hv2", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])
    return {"hv1": host, "hv2": hv2}


@pytest.fixture(scope="module")
def pids():
    """vm1's QEMU pid per host, as the tests learn them."""
    return {}


def migrate(src, dest: str, lease: Lease, *extra: str) -> dict:
    out = src.check_output(f"{HELPER} migrate vm1 {dest} --watch {lease.path} {' '.join(extra)}")
    return json.loads(out)


def running(host) -> list[str]:
    return host.check_output("virsh list --name").split()


def assert_held_by(hosts, lease: Lease, on: str) -> None:
    """vm1 runs on *on* with the lease; the other host runs nothing and holds nothing."""
    off = "hv2" if on == "hv1" else "hv1"
    h_on, h_off = hosts[on], hosts[off]
    assert "vm1" in running(h_on) and lc.state(h_on, "vm1") == "running"
    assert "vm1" not in running(h_off), f"virsh list on {off} still shows vm1"
    pid = lc.qemu_pid(h_on, "vm1")

    # From the outside: a second writer's F_SETLK is refused, seen from both hosts.
    for h in (h_on, h_off):
        assert h.check_output(f"{HELPER} probe {lease.path}") == "locked"

    # The kernel: the lock sits on an fd of the holder's daemon, none of the other's.
    ino = lc.inode(h_on, lease.path)
    mine = [line for line in lc.daemon_fd_locks(h_on, lc.daemon_pid(h_on)) if f":{ino} " in line]
    assert mine and all("WRITE" in line for line in mine), f"{on}'s daemon holds no write lock on {lease.path}"
    theirs = [line for line in lc.daemon_fd_locks(h_off, lc.daemon_pid(h_off)) if f":{ino} " in line]
    assert theirs == [], f"{off}'s daemon still holds a lock on {lease.path}: {theirs}"

    # The daemons: lease_info on the holder shows vm1's QEMU, the other has no lease.
    info = lc.lease_info_many([on, off], resource=lease.resource)
    res, other = info[on], info[off]
    assert res["source"] == "admin_socket"
    assert lc.owners_of(res["leases"]) == [(VM1, pid)], res["leases"]
    assert res["leases"][0]["path"] == lease.path
    assert other["leases"] == [], f"{off} still has a lease: {other['leases']}"
    if lease.indirect:
        # ...and sees the shared lease file locked by someone else (the holder).
        assert [(e["path"], e["mode"]) for e in other["held_elsewhere"]] == [(lease.path, "exclusive")], other

    # vm2 on the same disk is refused on either host, with libvirt's exact message.
    for h in (h_on, h_off):
        r = lc.start(h, "vm2")
        assert r.rc != 0, f"vm2 STARTED while vm1 runs on {on}: the disk is not protected"
        assert lease.busy in r.stderr, r.stderr
    assert lc.qemu_pid(h_on, "vm1") == pid


def assert_one_switchover(res: dict) -> None:
    """The watcher saw at most one moment without an exclusive holder (the
    switchover, between the source's release and the destination's acquire)
    and ended on an exclusive holder."""
    assert res["rc"] == 0, res
    assert len(res["free"]) <= 1 and res["shared"] == [], res
    assert res["final"] == "exclusive", res


def test_vm1_runs_on_hv1(hosts, lease, pids):
    assert_held_by(hosts, lease, "hv1")
    pids["hv1"] = lc.qemu_pid(hosts["hv1"], "vm1")


def test_live_migration_hv1_to_hv2(hosts, lease, pids):
    res = migrate(hosts["hv1"], "hv2", lease)
    assert_one_switchover(res)
    assert res["dest_state"] == "running (migrated)", res
    assert_held_by(hosts, lease, "hv2")
    pids["hv2"] = lc.qemu_pid(hosts["hv2"], "vm1")


def test_live_migration_back_hv2_to_hv1(hosts, lease, pids):
    res = migrate(hosts["hv2"], "hv1", lease)
    assert_one_switchover(res)
    assert_held_by(hosts, lease, "hv1")
    pids["hv1"] = lc.qemu_pid(hosts["hv1"], "vm1")


def test_destination_qemu_killed_mid_transfer_leaves_vm1_and_its_lease_on_the_source(hosts, lease, pids):
    res = migrate(hosts["hv1"], "hv2", lease, f"--speed {SLOW_MIB_S}", "--fault kill-dest-qemu")
    fault = res["fault"]
    assert fault["applied"] and fault["ok"], res
    assert fault["sent_bytes"] > 0
    assert res["rc"] != 0, f"the migration succeeded although the destination QEMU was killed: {res}"
    # The source never paused, so it never released: not one free instant.
    assert res["free"] == [] and res["shared"] == [] and res["final"] == "exclusive", res
    assert res["source_state"].startswith("running"), res
    assert lc.qemu_pid(hosts["hv1"], "vm1") == pids["hv1"], "vm1's QEMU on hv1 was replaced"
    assert_held_by(hosts, lease, "hv1")


def test_source_lock_daemon_sigkilled_mid_transfer_loses_no_lease(hosts, lease, pids):
    res = migrate(hosts["hv1"], "hv2", lease, f"--speed {SLOW_MIB_S}", "--fault kill-lock-daemon")
    fault = res["fault"]
    assert fault["applied"] and fault["ok"], res
    assert fault["new_pid"] not in (0, fault["old_pid"]), f"systemd did not restart the daemon: {fault}"
    # Back from the fd store with vm1's QEMU as owner, while the transfer still ran...
    assert lc.owners_of([le for le in fault["leases_after_restart"] if le["resource"] == lease.resource]) == [
        (VM1, pids["hv1"])], fault
    switchover = [start for start, _ in res["free"]]
    assert all(start > fault["at_ms"] + fault["restarted_after_ms"] for start in switchover), (
        f"the disk was free while the source daemon was down: {res}")
    # ...and the migration then completed and moved the lease as usual.
    assert_one_switchover(res)
    assert_held_by(hosts, lease, "hv2")
