"""Intended differences: where ours deliberately beats the C virtlockd.

These are NOT differential failures. Each test runs the same scenario on both
daemons and asserts the C daemon's known slip (so the scenario is shown to
exercise it) and our fix. libvirt cannot observe any of these differences
through its lock plugin.
"""
from __future__ import annotations

import os

import pytest

from lockd import protocol as P
from lockd import rpc
from tests.diff.test_owner_eof import until_acquired
from testbed.wire import UUID_A, UUID_B, describe, error_of, probe_setlk

SHARED = P.ACQUIRE_SHARED
pytestmark = pytest.mark.c_daemon

OK_LEN = 28


def is_ok(out) -> bool:
    return isinstance(out, bytes) and len(out) == OK_LEN


def is_busy(out) -> bool:
    e = error_of(out)
    return e is not None and e.code == rpc.ERR_RESOURCE_BUSY and e.message.endswith("is locked")


def test_release_all_for_owner_removes_every_entry(on_daemon):
    """Spec §8.3: the same owner holds a SHARED resource twice and dies. C
    removes one entry, so the disk stays locked forever; ours removes all."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("shared 1", lv.acquire("", r.path("disk2.img"), SHARED))
        r.rec("shared 2 (same owner)", lv.acquire("", r.path("disk2.img"), SHARED))
        lv.close()
        o.close()
        r.rec("owner exit", o.wait(15))
        other = r.registered(UUID_B, "vm2", 2)
        r.rec("exclusive after the owner died", other.acquire("", r.path("disk2.img")))

    c = dict(on_daemon("c", sc))
    py = dict(on_daemon("py", sc))
    assert is_busy(c["exclusive after the owner died"]), "C was expected to leak one shared entry"
    assert is_ok(py["exclusive after the owner died"]), describe(py["exclusive after the owner died"])


@pytest.mark.parametrize("alias", ["symlink", "hardlink", "dotdot path", "double slash"])
def test_alias_of_held_disk_is_refused(on_daemon, alias):
    """Issue 3 §4: a second VM reaching a locked disk through another path.
    C keys resources by the path string and lets it through; ours refuses it
    with the usual busy error, and the first VM's kernel lock is never lost."""
    def sc(r):
        disk = r.path("disk1.img")
        if alias == "symlink":
            other_path = r.path("disk1-link.img")
            os.symlink(disk, other_path)
        elif alias == "hardlink":
            other_path = r.path("disk1-hard.img")
            os.link(disk, other_path)
        elif alias == "dotdot path":
            other_path = r.path("sub/../disk1.img")
            (r.tree / "sub").mkdir()
        else:
            other_path = disk.replace("/tree/", "/tree//")
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        r.rec("vm1 acquire", a.acquire("", disk))
        r.rec("probe while vm1 holds", probe_setlk(disk))
        r.rec("vm2 acquire via alias", b.acquire("", other_path))
        r.rec("vm2 release via alias", b.release("", other_path))
        r.rec("probe after the alias was released", probe_setlk(disk))
        r.rec("vm1 still refuses others by name", b.acquire("", disk))

    c = dict(on_daemon("c", sc))
    py = dict(on_daemon("py", sc))
    assert c["probe while vm1 holds"] == py["probe while vm1 holds"] == "locked"
    # C: the alias gets through, and releasing it drops vm1's POSIX lock.
    assert is_ok(c["vm2 acquire via alias"]), describe(c["vm2 acquire via alias"])
    assert c["probe after the alias was released"] == "free"
    # Ours: refused with the ordinary busy error; vm1's kernel lock stays.
    assert is_busy(py["vm2 acquire via alias"]), describe(py["vm2 acquire via alias"])
    assert py["probe after the alias was released"] == "locked"
    assert is_busy(py["vm1 still refuses others by name"])


def test_owner_kill_sequence_is_asynchronous(on_daemon):
    """Spec §4.6: C runs its SIGTERM..SIGKILL loop (up to 3 s) on the main loop
    and serves nobody meanwhile. Ours serves other clients while the owner,
    which ignores SIGTERM, is still alive, and its leases are already free."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1, ignore_sigterm=True)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("acquire", lv.acquire("", r.path("disk1.img")))
        other = r.registered(UUID_B, "vm2", 2)   # connected before the EOF
        o.close()
        # Retry while refused (the daemon may read our request before the EOF).
        # C answers nothing until its kill loop is over (owner dead by SIGKILL);
        # ours answers, and the lease is free, while the owner still lives.
        r.rec("other acquire right after the owner's EOF",
              until_acquired(r, other, "", r.path("disk1.img")))
        r.rec("owner alive when that reply arrived", o.proc.poll() is None)
        r.rec("owner exit", o.wait(20))

    c = dict(on_daemon("c", sc))
    py = dict(on_daemon("py", sc))
    assert c["owner alive when that reply arrived"] == "False"
    assert c["owner exit"] == py["owner exit"] == "-9"
    assert py["owner alive when that reply arrived"] == "True"
    assert is_ok(py["other acquire right after the owner's EOF"]), \
        describe(py["other acquire right after the owner's EOF"])
