"""The lease_info and lease modules against a REAL lock daemon process.

Our daemon (and, for the fallback, Debian's C virtlockd) runs on private
sockets (testbed/daemons.py); leases are taken with the lock protocol
exactly as libvirt takes them (lockd.client), on behalf of stand-in owner
processes. The modules run through `ansible` as they would on a hypervisor.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from lockd.client import LockClient
from testbed.daemons import C_VIRTLOCKD, fake_pid, stand_in_owner, start_daemon

VM1_UUID = "11111111-1111-4111-8111-111111111111"
VM2_UUID = "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def daemon(tmp_path):
    with start_daemon("py", tmp_path / "daemon") as d:
        yield d


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "extra.img"
    path.write_bytes(b"\0" * 65536)
    return str(path)


@pytest.fixture
def vm1(daemon, owner, disk):
    """vm1 (the stand-in owner) holds `disk` the way libvirt acquires it; the connection stays open."""
    client = LockClient(str(daemon.sock))
    client.register(VM1_UUID, "vm1", 1, owner.pid)
    client.acquire("", disk, 0)
    yield owner
    client.close()


def admin(daemon) -> dict:
    return {"socket": str(daemon.admin_sock)}


# -- lease_info -----------------------------------------------------------------

def test_lease_info_lists_the_lease_with_its_owner_and_daemon_facts(run_module, daemon, vm1, disk):
    res = run_module("lease_info", admin(daemon))
    assert not res.get("failed"), res
    assert res["changed"] is False
    assert res["source"] == "admin_socket"
    assert res["daemon"]["server"] == "lockd" and res["daemon"]["leases"] == 1
    [lease] = res["leases"]
    assert (lease["lockspace"], lease["resource"], lease["shared"]) == ("", disk, False)
    [holder] = lease["owners"]
    assert (holder["uuid"], holder["name"], holder["pid"], holder["alive"]) == (VM1_UUID, "vm1", vm1.pid, True)
    assert [ls["path"] for ls in res["lockspaces"]] == [""]


def test_lease_info_filters(run_module, daemon, vm1, disk, tmp_path):
    link = tmp_path / "alias.img"
    link.symlink_to(disk)
    assert len(run_module("lease_info", dict(admin(daemon), path=str(link)))["leases"]) == 1
    assert len(run_module("lease_info", dict(admin(daemon), owner_uuid=VM1_UUID, owner_pid=vm1.pid))["leases"]) == 1
    assert run_module("lease_info", dict(admin(daemon), owner_name="vm2"))["leases"] == []
    assert run_module("lease_info", dict(admin(daemon), resource="/no/such/disk"))["leases"] == []


def test_lease_info_check_mode_reports_the_same_and_changes_nothing(run_module, daemon, vm1, disk):
    res = run_module("lease_info", admin(daemon), check=True)
    assert res["changed"] is False and [lease["resource"] for lease in res["leases"]] == [disk]


# F_OFD_SETLK on byte 0 in a child process, which then waits for stdin to close.
_HOLD_OFD = (
    "import fcntl, os, struct, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "kind = fcntl.F_WRLCK if sys.argv[2] == 'write' else fcntl.F_RDLCK\n"
    "fcntl.fcntl(fd, getattr(fcntl, 'F_OFD_SETLK', 37), struct.pack('hhqqi4x', kind, os.SEEK_SET, 0, 1, 0))\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def foreign_lock():
    """Lock files the way another host's daemon would: OFD locks held by child processes we own."""
    children = []

    def hold(path: str, kind: str = "write") -> None:
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_OFD, path, kind],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "locked", f"the child could not lock {path} (exit {proc.poll()})"

    yield hold
    for proc in children:
        proc.kill()
        proc.wait()


def test_lease_info_reports_lease_files_held_elsewhere(run_module, daemon, owner, foreign_lock, tmp_path):
    lockspace = tmp_path / "files"
    lockspace.mkdir()
    extra_dir = tmp_path / "extra-lockspace"   # not a daemon lockspace: only through lockspace_dirs
    extra_dir.mkdir()
    own, foreign, reader, idle = "a" * 64, "f" * 64, "e" * 64, "0" * 64
    for name in (foreign, reader, idle):
        (lockspace / name).write_bytes(b"")
    (extra_dir / foreign).write_bytes(b"")
    client = LockClient(str(daemon.sock))
    try:
        client.register(VM1_UUID, "vm1", 1, owner.pid)
        client.create_lockspace(str(lockspace))
        client.acquire(str(lockspace), own, 2)          # AUTOCREATE, as libvirt's indirect mode
        foreign_lock(str(lockspace / foreign), "write")  # "another host" holds these lease files
        foreign_lock(str(lockspace / reader), "read")
        foreign_lock(str(extra_dir / foreign), "write")
        before = sorted(os.listdir(lockspace))

        res = run_module("lease_info", admin(daemon))
        assert not res.get("failed"), res
        assert res["changed"] is False and res["source"] == "admin_socket"
        assert [(lease["lockspace"], lease["resource"]) for lease in res["leases"]] == [(str(lockspace), own)]
        held = {(e["lockspace"], e["resource"], e["mode"]): e for e in res["held_elsewhere"]}
        assert set(held) == {(str(lockspace), foreign, "exclusive"), (str(lockspace), reader, "shared")}, \
            "the daemon's own lease file and the unlocked file must not be listed"
        entry = held[(str(lockspace), foreign, "exclusive")]
        assert entry["path"] == str(lockspace / foreign)
        assert entry["holder"] == "another host or process" and entry["holder_pid"] is None
        assert (entry["dev"], entry["ino"]) == (os.stat(lockspace / foreign).st_dev,
                                                os.stat(lockspace / foreign).st_ino)
        assert sorted(os.listdir(lockspace)) == before, "lease_info must not create or remove files"

        more = run_module("lease_info", dict(admin(daemon), lockspace_dirs=[str(extra_dir), str(lockspace)]))
        assert sorted((e["lockspace"], e["resource"]) for e in more["held_elsewhere"]) == sorted(
            [(str(lockspace), foreign), (str(lockspace), reader), (str(extra_dir), foreign)])

        by_resource = run_module("lease_info", dict(admin(daemon), resource=foreign))
        assert by_resource["leases"] == [] and [e["path"] for e in by_resource["held_elsewhere"]] == [
            str(lockspace / foreign)]
        link = tmp_path / "alias"
        link.symlink_to(lockspace / reader)
        by_path = run_module("lease_info", dict(admin(daemon), path=str(link)))
        assert [e["resource"] for e in by_path["held_elsewhere"]] == [reader]
        assert run_module("lease_info", dict(admin(daemon), lockspace=""))["held_elsewhere"] == []
        assert run_module("lease_info", dict(admin(daemon), owner_name="vm1"))["held_elsewhere"] == []

        check = run_module("lease_info", admin(daemon), check=True)
        assert check["changed"] is False and check["held_elsewhere"] == res["held_elsewhere"]
    finally:
        client.close()


# -- lease: state=released --------------------------------------------------------

def test_release_is_refused_while_the_owner_runs(run_module, daemon, vm1, disk):
    res = run_module("lease", dict(admin(daemon), resource=disk))
    assert res["failed"] and res["error_code"] == "owner-alive"
    assert "force" in res["msg"] and str(vm1.pid) in res["msg"]
    assert len(run_module("lease_info", admin(daemon))["leases"]) == 1, "a refused release must not release"


def test_release_check_mode_diff_then_release_then_idempotent(run_module, daemon, vm1, disk):
    args = dict(admin(daemon), resource=disk, force=True)
    check = run_module("lease", args, check=True, diff=True)
    assert check["changed"] is True and [lease["resource"] for lease in check["released"]] == [disk]
    assert f"vm1 uuid={VM1_UUID} pid={vm1.pid}" in check["_stdout"], "the diff names the holder"
    assert len(run_module("lease_info", admin(daemon))["leases"]) == 1, "check mode must not release"

    done = run_module("lease", args)
    assert done["changed"] is True and not done.get("failed")
    assert run_module("lease_info", admin(daemon))["leases"] == []
    assert vm1.poll() is None, "releasing a lease must not kill the VM"

    again = run_module("lease", args)
    assert again["changed"] is False and again["released"] == []


@pytest.mark.parametrize("selector", ["owner_uuid", "owner_pid"])
def test_release_by_owner(run_module, daemon, vm1, disk, selector):
    value = VM1_UUID if selector == "owner_uuid" else vm1.pid
    res = run_module("lease", dict(admin(daemon), force=True, **{selector: value}))
    assert res["changed"] is True and [lease["resource"] for lease in res["released"]] == [disk]
    assert run_module("lease", dict(admin(daemon), force=True, **{selector: value}))["changed"] is False


def test_release_needs_exactly_one_selector(run_module, daemon):
    res = run_module("lease", dict(admin(daemon), resource="/x", owner_pid=1))
    assert res["failed"] and "exactly one selector" in res["msg"]


def test_release_in_an_unknown_lockspace_is_an_error(run_module, daemon):
    res = run_module("lease", dict(admin(daemon), lockspace="/no/such/lockspace", resource="abc"))
    assert res["failed"] and res["error_code"] == "not-found"
    assert "/no/such/lockspace" in res["msg"]


# -- lease: state=acquired (adoption) ----------------------------------------------

def test_acquire_adopts_check_mode_then_idempotent(run_module, daemon, owner, disk):
    args = dict(admin(daemon), state="acquired", resource=disk, owner_uuid=VM2_UUID, owner_name="vm2",
                owner_id=7, owner_pid=owner.pid)
    check = run_module("lease", args, check=True, diff=True)
    assert check["changed"] is True and f"vm2 uuid={VM2_UUID} pid={owner.pid}" in check["_stdout"]
    assert run_module("lease_info", admin(daemon))["leases"] == [], "check mode must not acquire"

    done = run_module("lease", args)
    assert done["changed"] is True
    assert [(o["name"], o["pid"]) for o in done["lease"]["owners"]] == [("vm2", owner.pid)]
    assert run_module("lease", args)["changed"] is False


def test_acquire_conflict_is_reported_busy(run_module, daemon, vm1, disk):
    other = stand_in_owner()
    try:
        res = run_module("lease", dict(admin(daemon), state="acquired", resource=disk, owner_uuid=VM2_UUID,
                                       owner_name="vm2", owner_id=2, owner_pid=other.pid))
    finally:
        other.kill()
        other.wait()
    assert res["failed"] and res["error_code"] == "busy"
    assert f"Lockspace resource '{disk}' is locked" in res["msg"]


def test_acquire_for_a_dead_process_is_refused(run_module, daemon, disk):
    res = run_module("lease", dict(admin(daemon), state="acquired", resource=disk, owner_uuid=VM2_UUID,
                                   owner_name="vm2", owner_id=2, owner_pid=fake_pid()))
    assert res["failed"] and res["error_code"] == "invalid-argument"


# -- error paths: no daemon, permission denied, not lockd ------------------------------

@pytest.mark.parametrize("module,args", [("lease_info", {}), ("lease", {"resource": "/x"})])
def test_no_daemon(run_module, tmp_path, module, args):
    res = run_module(module, dict(args, socket=str(tmp_path / "missing-sock")))
    assert res["failed"] and res["error_code"] == "no-daemon"
    assert "virtlockd-admin.socket" in res["msg"] or "lock daemon" in res["msg"]


def test_permission_denied_by_the_socket_file(run_module, daemon):
    """An unprivileged user cannot even connect (EACCES on the socket path)."""
    os.chmod(daemon.workdir, 0o755)
    os.chmod(daemon.admin_sock, 0o755)
    res = run_module("lease_info", admin(daemon), become_user="nobody")
    assert res["failed"] and res["error_code"] == "permission-denied", res
    assert "root" in res["msg"]


def test_permission_denied_by_the_daemon(run_module, owner, disk):
    """The socket is world-writable, so the daemon's SO_PEERCRED check must refuse nobody."""
    workdir = Path(tempfile.mkdtemp(prefix="lockd-perm-"))  # reachable by nobody, unlike pytest's tmp
    try:
        os.chmod(workdir, 0o755)
        with start_daemon("py", workdir / "d") as daemon:
            os.chmod(daemon.workdir, 0o755)
            os.chmod(daemon.admin_sock, 0o777)
            client = LockClient(str(daemon.sock))
            client.register(VM1_UUID, "vm1", 1, owner.pid)
            client.acquire("", disk, 0)
            res = run_module("lease", dict(admin(daemon), resource=disk, force=True), become_user="nobody")
            assert res["failed"] and res["error_code"] == "permission-denied", res
            assert not res["msg"].startswith("permission denied connecting"), "the refusal must come from the daemon"
            assert len(run_module("lease_info", admin(daemon))["leases"]) == 1
            client.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- libvirt's C virtlockd: lease_info falls back, lease explains -------------------------

def _hold_posix_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
    return fd


@pytest.mark.c_daemon
def test_c_virtlockd_fallback_and_refusal(run_module, tmp_path, disk):
    assert os.path.exists(C_VIRTLOCKD), "libvirt-daemon must be installed (scripts/install-deps.sh)"
    lockspace = tmp_path / "lockspace"
    lockspace.mkdir()
    foreign = lockspace / ("f" * 64)
    foreign.write_bytes(b"")
    with start_daemon("c", tmp_path / "c") as c:
        client = LockClient(str(c.sock))
        client.register(str(uuid.uuid4()), "vm1", 1, fake_pid())
        client.acquire("", disk, 0)
        client.create_lockspace(str(lockspace))
        client.acquire(str(lockspace), "a" * 64, 2)  # AUTOCREATE, as libvirt's indirect mode
        fd = _hold_posix_lock(str(foreign))           # "another host" holds this lease file
        try:
            base = {"socket": str(c.admin_sock), "pid_file": str(c.pidfile), "lockspace_dirs": [str(lockspace)]}
            res = run_module("lease_info", base)
            assert not res.get("failed"), res
            assert res["source"] == "proc_locks" and res["changed"] is False
            held = {(lease["lockspace"], lease["resource"], lease["holder"]) for lease in res["leases"]}
            assert held == {("", disk, "daemon"), (str(lockspace), "a" * 64, "daemon"),
                            (str(lockspace), "f" * 64, "other")}
            assert len(run_module("lease_info", dict(base, path=disk))["leases"]) == 1

            owner_filter = run_module("lease_info", dict(base, owner_name="vm1"))
            assert owner_filter["leases"] == [] and "does not expose lease owners" in owner_filter["_stderr"]

            strict = run_module("lease_info", dict(base, fallback=False))
            assert strict["failed"] and strict["error_code"] == "not-lockd"

            res = run_module("lease", {"socket": str(c.admin_sock), "resource": disk, "force": True})
            assert res["failed"] and res["error_code"] == "not-lockd"
            assert "C virtlockd" in res["msg"]
        finally:
            os.close(fd)
            client.close()
