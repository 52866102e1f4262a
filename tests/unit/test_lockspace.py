"""The seven cases of libvirt's tests/virlockspacetest.c (spec 8.1), run
against lockd.lockspace, for both lock types, plus what we do better."""
import fcntl
import os
import subprocess
import sys

import pytest

from lockd import lockspace as L
from lockd.rpc import RPCError

OWNER = 4000001          # above pid_max: never a real process
OTHER = 4000002


@pytest.fixture(params=["ofd", "posix"])
def locks(request):
    return L.Locks(request.param)


def busy(fn, *a):
    with pytest.raises(RPCError) as ei:
        fn(*a)
    assert ei.value.code == 87 and ei.value.domain == 51
    return ei.value


def test_1_lockspace_creation(locks, tmp_path):
    d = tmp_path / "lockspace"
    locks.create_lockspace(str(d))
    assert d.is_dir()
    assert oct(d.stat().st_mode & 0o777) == "0o700"


def test_2_resource_lifecycle(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.create_resource(ls, "foo")
    assert (tmp_path / "ls" / "foo").exists()
    locks.delete_resource(ls, "foo")
    assert not (tmp_path / "ls" / "foo").exists()


def test_3_lock_exclusive(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.create_resource(ls, "foo")
    locks.acquire(ls, "foo", OWNER, 0)
    assert (tmp_path / "ls" / "foo").exists()
    busy(locks.acquire, ls, "foo", OWNER, 0)          # same owner twice: busy, as in libvirt
    busy(locks.delete_resource, ls, "foo")
    locks.release(ls, "foo", OWNER)
    locks.delete_resource(ls, "foo")
    assert not (tmp_path / "ls" / "foo").exists()


def test_4_lock_shared(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.create_resource(ls, "foo")
    locks.acquire(ls, "foo", OWNER, L.SHARED)
    busy(locks.acquire, ls, "foo", OWNER, 0)
    locks.acquire(ls, "foo", OWNER, L.SHARED)
    busy(locks.delete_resource, ls, "foo")
    locks.release(ls, "foo", OWNER)
    busy(locks.delete_resource, ls, "foo")
    locks.release(ls, "foo", OWNER)
    locks.delete_resource(ls, "foo")
    assert not (tmp_path / "ls" / "foo").exists()


def test_5_lock_exclusive_autocreate(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.acquire(ls, "foo", OWNER, L.AUTOCREATE)
    assert (tmp_path / "ls" / "foo").exists()
    locks.release(ls, "foo", OWNER)
    assert not (tmp_path / "ls" / "foo").exists()


def test_6_lock_shared_autocreate(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.acquire(ls, "foo", OWNER, L.SHARED | L.AUTOCREATE)
    busy(locks.acquire, ls, "foo", OWNER, L.AUTOCREATE)
    assert (tmp_path / "ls" / "foo").exists()
    locks.acquire(ls, "foo", OWNER, L.SHARED | L.AUTOCREATE)
    locks.release(ls, "foo", OWNER)
    assert (tmp_path / "ls" / "foo").exists()
    locks.release(ls, "foo", OWNER)
    assert not (tmp_path / "ls" / "foo").exists()


def test_7_full_path_default_lockspace(locks, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 512)
    ls = locks.default
    locks.acquire(ls, str(disk), OWNER, 0)
    busy(locks.acquire, ls, str(disk), OWNER, 0)
    locks.release(ls, str(disk), OWNER)
    locks.acquire(ls, str(disk), OWNER, 0)
    locks.release(ls, str(disk), OWNER)
    assert disk.exists()   # without AUTOCREATE the file is never deleted


# --- errors with libvirt's exact wording -------------------------------------

def test_errors(locks, tmp_path):
    with pytest.raises(RPCError) as ei:
        locks.get("/nope")
    assert ei.value.message == "internal error: Lockspace for path /nope does not exist"
    e = busy(locks.release, locks.default, "/x", OWNER)
    assert e.message == "resource busy: Lockspace resource '/x' is not locked"
    with pytest.raises(RPCError) as ei:
        locks.acquire(locks.default, str(tmp_path / "missing"), OWNER, 0)
    assert ei.value.code == 38 and ei.value.int1 == 2
    assert ei.value.message == "Unable to open resource %s: No such file or directory" % (tmp_path / "missing")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RPCError) as ei:
        locks.create_lockspace(str(f))
    assert ei.value.message == "internal error: Lockspace location %s exists, but is not a directory" % f
    disk = tmp_path / "d"
    disk.write_text("")
    locks.acquire(locks.default, str(disk), OWNER, 0)
    with pytest.raises(RPCError) as ei:
        locks.release(locks.default, str(disk), OTHER)
    assert ei.value.message == "internal error: owner %d does not hold the resource lock" % OTHER
    assert ei.value.domain == 51


# --- what lockd does better ---------------------------------------------------

def test_release_owner_drops_every_entry(locks, tmp_path):
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    locks.acquire(ls, "foo", OWNER, L.SHARED | L.AUTOCREATE)
    locks.acquire(ls, "foo", OWNER, L.SHARED | L.AUTOCREATE)   # same shared disk listed twice
    locks.acquire(ls, "foo", OTHER, L.SHARED | L.AUTOCREATE)
    touched = locks.release_owner(OWNER)
    assert len(touched) == 1
    assert ls.resources["foo"].owners == [OTHER]
    locks.release_owner(OTHER)
    assert "foo" not in ls.resources
    assert not (tmp_path / "ls" / "foo").exists()


@pytest.mark.parametrize("alias", ["symlink", "hardlink"])
def test_alias_refused(locks, tmp_path, alias):
    disk = tmp_path / "disk.img"
    disk.write_text("")
    other = tmp_path / "other.img"
    (os.symlink if alias == "symlink" else os.link)(disk, other)
    locks.acquire(locks.default, str(disk), OWNER, 0)
    e = busy(locks.acquire, locks.default, str(other), OTHER, 0)
    assert e.message == "resource busy: Lockspace resource '%s' is locked" % other
    # the refused alias never touched the kernel lock on the original
    assert probe_lock(disk) == "busy"


def test_shared_through_alias_is_shared(tmp_path):
    locks = L.Locks("ofd")
    disk = tmp_path / "disk.img"
    disk.write_text("")
    os.symlink(disk, tmp_path / "link.img")
    locks.acquire(locks.default, str(disk), OWNER, L.SHARED)
    locks.acquire(locks.default, str(tmp_path / "link.img"), OTHER, L.SHARED)
    os.link(disk, tmp_path / "hard.img")
    busy(locks.acquire, locks.default, str(tmp_path / "hard.img"), OWNER, 0)


def test_closing_other_fd_never_drops_lock(tmp_path):
    """POSIX locks vanish when *any* fd of the file is closed in the holder;
    OFD locks (our default) do not."""
    locks = L.Locks("ofd")
    disk = tmp_path / "disk.img"
    disk.write_text("")
    locks.acquire(locks.default, str(disk), OWNER, 0)
    fd = os.open(disk, os.O_RDWR)
    os.close(fd)
    assert probe_lock(disk) == "busy"


def probe_lock(path) -> str:
    """Try the lock from another process, as another host or daemon would."""
    code = ("import fcntl,os,struct,sys\n"
            "fd=os.open(sys.argv[1],os.O_RDWR)\n"
            "try:\n fcntl.fcntl(fd,fcntl.F_SETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,1,0)); print('free')\n"
            "except OSError: print('busy')\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_autocreate_recreated_file_is_retried(tmp_path):
    """The inode re-check: a lease file replaced under us is locked anew."""
    locks = L.Locks("ofd")
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    res = locks.acquire(ls, "foo", OWNER, L.AUTOCREATE)
    st = os.stat(tmp_path / "ls" / "foo")
    assert (res.dev, res.ino) == (st.st_dev, st.st_ino)
    assert probe_lock(tmp_path / "ls" / "foo") == "busy"
    locks.release(ls, "foo", OWNER)
    assert not (tmp_path / "ls" / "foo").exists()


def test_new_lockspace_errors(locks, tmp_path):
    with pytest.raises(RPCError) as ei:
        locks.new_lockspace("")
    assert ei.value.message == "Requested operation is not valid: the default lockspace already exists"
    locks.new_lockspace(str(tmp_path / "a"))
    with pytest.raises(RPCError) as ei:
        locks.new_lockspace(str(tmp_path / "a"))
    assert ei.value.message == "internal error: Lockspace for path %s already exists" % (tmp_path / "a")
    assert locks.create_lockspace(str(tmp_path / "a")) is locks.lockspaces[str(tmp_path / "a")]


def test_owner_index_stays_consistent(tmp_path):
    """Random acquire/release/release_owner sequences: the owner index always
    equals what a full scan of the lockspaces says."""
    import random
    rng = random.Random(7)
    locks = L.Locks("ofd")
    ls = locks.create_lockspace(str(tmp_path / "ls"))
    owners = [4000001, 4000002, 4000003]
    names = ["a", "b", "c", "d"]
    for _ in range(3000):
        op = rng.random()
        owner, name = rng.choice(owners), rng.choice(names)
        try:
            if op < 0.5:
                locks.acquire(ls, name, owner, L.AUTOCREATE | (L.SHARED if rng.random() < 0.7 else 0))
            elif op < 0.9:
                locks.release(ls, name, owner)
            else:
                locks.release_owner(owner)
        except RPCError:
            pass
        scan = {}
        for res in locks.resources():
            for pid in res.owners:
                scan.setdefault(pid, set()).add(res)
        assert {pid: set(held) for pid, held in locks.by_owner.items()} == scan


def test_release_unlocks_even_if_a_copy_of_the_fd_lives_on(tmp_path):
    """systemd's fd store holds a copy of each lease fd until it processes
    FDSTOREREMOVE: the release itself must drop the OFD lock, or an immediate
    re-acquire would find the disk still locked."""
    locks = L.Locks("ofd")
    disk = tmp_path / "disk.img"
    disk.write_text("")
    res = locks.acquire(locks.default, str(disk), OWNER, 0)
    copy = os.dup(res.fd)                     # what systemd keeps
    try:
        locks.release(locks.default, str(disk), OWNER)
        assert probe_lock(disk) == "free"
        locks.acquire(locks.default, str(disk), OTHER, 0)
    finally:
        os.close(copy)
