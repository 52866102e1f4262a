"""Differential: procedures 1-8, their success paths and every error of spec §3.3/§3.4.

Each scenario runs against the C virtlockd and against ours; the replies
(raw bytes, errors included) must be identical. Nothing is normalised.
"""
from __future__ import annotations

import os

import pytest

from lockd import protocol as P
from testbed.wire import UUID_A, UUID_B

SHARED, AUTO = P.ACQUIRE_SHARED, P.ACQUIRE_AUTOCREATE
pytestmark = pytest.mark.c_daemon


# -- REGISTER / RESTRICT ------------------------------------------------------

def test_register(differential):
    def sc(r):
        c = r.conn()
        r.rec("register id 0 (refused: 'not registered')", c.register(UUID_A, "vm1", 0, r.fake_pid(1)))
        r.rec("acquire after failed register", c.acquire("", r.path("disk1.img")))
        r.rec("register flags 1", c.register(UUID_A, "vm1", 1, r.fake_pid(1), flags=1))
        r.rec("register flags 0x80000000", c.register(UUID_A, "vm1", 1, r.fake_pid(1), flags=0x80000000))
        r.rec("register ok", c.register(UUID_A, "vm1", 1, r.fake_pid(1)))
        r.rec("re-register overwrites (other owner)", c.register(UUID_B, "vm2", 2, r.fake_pid(2)))
        r.rec("register pid 0 (Xen-style)", c.register(UUID_B, "vm2", 2, 0))
        r.rec("register empty name", c.register(UUID_B, "", 2, r.fake_pid(2)))
        r.rec("register id 0xffffffff", c.register(UUID_B, "x", 0xFFFFFFFF, r.fake_pid(2)))
    differential(sc)


def test_restrict(differential):
    def sc(r):
        c = r.conn()
        r.rec("restrict unregistered", c.restrict())
        r.rec("restrict bad flags unregistered (flags check wins)", c.restrict(2))
        r.rec("register", c.register(UUID_A, "vm1", 1, r.fake_pid(1)))
        r.rec("restrict flags 1", c.restrict(1))
        r.rec("restrict", c.restrict())
        # every call on a restricted connection is denied ...
        r.rec("register after restrict", c.register(UUID_A, "vm1", 1, r.fake_pid(1)))
        r.rec("restrict again", c.restrict())
        r.rec("new after restrict", c.new(r.path("ls-new")))
        r.rec("create_resource after restrict", c.create_resource("", r.path("disk1.img")))
        r.rec("delete_resource after restrict", c.delete_resource("", r.path("disk1.img")))
        r.rec("acquire after restrict", c.acquire("", r.path("disk1.img")))
        r.rec("release after restrict", c.release("", r.path("disk1.img")))
        r.rec("create_lockspace after restrict", c.create_lockspace(r.path("ls")))
        # ... except that the flags check comes first (spec §3.3 order)
        r.rec("acquire bad flags after restrict", c.acquire("", r.path("disk1.img"), 4))
        r.rec("release bad flags after restrict", c.release("", r.path("disk1.img"), 1))
        r.rec_exists("ls")
        # the restricted connection holds nothing: another client may lock
        c2 = r.registered()
        r.rec("other connection acquire", c2.acquire("", r.path("disk1.img")))
    differential(sc)


def test_unregistered_calls(differential):
    def sc(r):
        c = r.conn()
        r.rec("new unregistered", c.new(r.path("ls")))
        r.rec("create_resource unregistered", c.create_resource("", r.path("disk1.img")))
        r.rec("delete_resource unregistered", c.delete_resource("", r.path("disk1.img")))
        r.rec("acquire unregistered", c.acquire("", r.path("disk1.img")))
        r.rec("release unregistered", c.release("", r.path("disk1.img")))
        r.rec("acquire unregistered bad flags (flags first)", c.acquire("", r.path("disk1.img"), 8))
        r.rec("create_lockspace needs no registration", c.create_lockspace(r.path("ls")))
        r.rec_exists("ls")
    differential(sc)


# -- NEW / CREATE_LOCKSPACE ---------------------------------------------------

def test_new(differential):
    def sc(r):
        c = r.registered()
        r.rec("new default lockspace", c.new(""))
        r.rec("new flags 1", c.new(r.path("ls1"), 1))
        r.rec("new", c.new(r.path("ls1")))
        r.rec_exists("ls1")
        r.rec("new again (already exists)", c.new(r.path("ls1")))
        r.rec("new nested", c.new(r.path("a/b/c")))
        r.rec_exists("a/b/c")
        r.rec("create_lockspace of a NEW one (idempotent)", c.create_lockspace(r.path("ls1")))
        r.rec("new of a CREATE_LOCKSPACE one", c.new(r.path("ls1")))
        r.rec("trailing slash is another lockspace", c.new(r.path("ls1") + "/"))
        r.rec("acquire in NEW lockspace", c.acquire(r.path("ls1"), "lease", AUTO))
        r.rec_exists("ls1/lease")
    differential(sc)


def test_new_on_file(differential):
    """NEW on a path that is a file: the C code ignores the mkdir result (spec §3.4)."""
    def sc(r):
        r.mkfile("plainfile")
        c = r.registered()
        r.rec("new on a regular file", c.new(r.path("plainfile")))
        r.rec("new below a regular file", c.new(r.path("plainfile/sub")))
        r.rec("acquire in it", c.acquire(r.path("plainfile"), "x", AUTO))
    differential(sc)


def test_create_lockspace(differential):
    def sc(r):
        c = r.conn()
        r.rec("create default lockspace is a no-op", c.create_lockspace(""))
        r.rec("create", c.create_lockspace(r.path("ls")))
        r.rec_exists("ls")
        r.rec("mode of created dir", oct(os.stat(r.path("ls")).st_mode & 0o777))
        r.rec("create again (idempotent)", c.create_lockspace(r.path("ls")))
        r.rec("create nested", c.create_lockspace(r.path("x/y/z")))
        r.rec("mode of nested parent", oct(os.stat(r.path("x")).st_mode & 0o777))
        r.mkfile("afile")
        r.rec("on a regular file (not a directory)", c.create_lockspace(r.path("afile")))
        r.rec("below a regular file (ENOTDIR)", c.create_lockspace(r.path("afile/sub")))
        os.symlink(r.path("ls"), r.path("ls-link"))
        r.rec("via a symlink to a directory", c.create_lockspace(r.path("ls-link")))
        r.rec("relative path", c.create_lockspace("relative-dir-lockd-test"))
        r.rec("second call on same connection", c.create_lockspace(r.path("ls2")))
    differential(sc)


def test_existing_dir_created_lockspace(differential):
    def sc(r):
        (r.tree / "pre").mkdir(mode=0o751)
        c = r.conn()
        r.rec("create on existing dir", c.create_lockspace(r.path("pre")))
        r.rec("existing dir mode untouched", oct(os.stat(r.path("pre")).st_mode & 0o777))
    differential(sc)


# -- CREATE_RESOURCE / DELETE_RESOURCE ---------------------------------------

def test_create_delete_resource(differential):
    def sc(r):
        c = r.registered()
        ls = r.path("ls")
        r.rec("create_resource, no lockspace", c.create_resource(ls, "foo"))
        r.rec("delete_resource, no lockspace", c.delete_resource(ls, "foo"))
        r.rec("create_lockspace", c.create_lockspace(ls))
        r.rec("create_resource flags 1", c.create_resource(ls, "foo", 1))
        r.rec("delete_resource flags 2", c.delete_resource(ls, "foo", 2))
        r.rec("create_resource", c.create_resource(ls, "foo"))
        r.rec_exists("ls/foo")
        r.rec("mode", oct(os.stat(r.path("ls/foo")).st_mode & 0o777))
        r.rec("create_resource again (touch)", c.create_resource(ls, "foo"))
        r.rec("acquire", c.acquire(ls, "foo"))
        r.rec("create_resource while held", c.create_resource(ls, "foo"))
        r.rec("delete_resource while held", c.delete_resource(ls, "foo"))
        r.rec_exists("ls/foo")
        r.rec("release", c.release(ls, "foo"))
        r.rec_exists("ls/foo")
        r.rec("delete_resource", c.delete_resource(ls, "foo"))
        r.rec_exists("ls/foo")
        r.rec("delete_resource missing (ENOENT ignored)", c.delete_resource(ls, "foo"))
        (r.tree / "ls" / "adir").mkdir()
        r.rec("delete_resource of a directory (EISDIR)", c.delete_resource(ls, "adir"))
        r.rec("create_resource in default lockspace, full path", c.create_resource("", r.path("new.img")))
        r.rec_exists("new.img")
        r.rec("create_resource in missing dir", c.create_resource("", r.path("nodir/x.img")))
        r.rec("delete_resource default lockspace", c.delete_resource("", r.path("new.img")))
        r.rec_exists("new.img")
    differential(sc)


# -- ACQUIRE / RELEASE --------------------------------------------------------

def test_acquire_release_exclusive(differential):
    def sc(r):
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        disk = r.path("disk1.img")
        r.rec("a acquire", a.acquire("", disk))
        r.rec("a acquire again (same owner, exclusive: busy)", a.acquire("", disk))
        r.rec("b acquire (busy)", b.acquire("", disk))
        r.rec("b acquire shared (busy)", b.acquire("", disk, SHARED))
        r.rec("b release (owner does not hold)", b.release("", disk))
        r.rec("a release", a.release("", disk))
        r.rec("a release again (not locked)", a.release("", disk))
        r.rec("b acquire now", b.acquire("", disk))
        r.rec_exists("disk1.img")
        r.rec("release with SHARED flag (flags error)", b.release("", disk, SHARED))
        r.rec("release with AUTOCREATE flag (flags error)", b.release("", disk, AUTO))
        r.rec("acquire flags 4", a.acquire("", disk, 4))
        r.rec("acquire flags 7 (only unsupported bits reported)", a.acquire("", disk, 7))
        r.rec("acquire flags 0xffffffff", a.acquire("", disk, 0xFFFFFFFF))
        r.rec("acquire in missing lockspace", a.acquire(r.path("nols"), "x"))
        r.rec("release in missing lockspace", a.release(r.path("nols"), "x"))
    differential(sc)


def test_acquire_shared(differential):
    def sc(r):
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        disk = r.path("disk2.img")
        r.rec("a shared", a.acquire("", disk, SHARED))
        r.rec("b shared", b.acquire("", disk, SHARED))
        r.rec("a shared again (duplicate entry)", a.acquire("", disk, SHARED))
        r.rec("b exclusive (busy)", b.acquire("", disk))
        r.rec("a release 1", a.release("", disk))
        r.rec("b exclusive still busy", b.acquire("", disk))
        r.rec("a release 2", a.release("", disk))
        r.rec("a release 3 (owner does not hold)", a.release("", disk))
        r.rec("b release", b.release("", disk))
        r.rec("now free: a exclusive", a.acquire("", disk))
        r.rec("b shared against exclusive (busy)", b.acquire("", disk, SHARED))
    differential(sc)


def test_acquire_open_failures(differential):
    def sc(r):
        c = r.registered()
        r.rec("missing disk (ENOENT)", c.acquire("", r.path("missing.img")))
        (r.tree / "adir").mkdir()
        r.rec("a directory (EISDIR)", c.acquire("", r.path("adir")))
        r.mkfile("f")
        r.rec("below a file (ENOTDIR)", c.acquire("", r.path("f/x")))
        r.rec("autocreate in default lockspace creates the file", c.acquire("", r.path("auto.img"), AUTO))
        r.rec_exists("auto.img")
        r.rec("autocreate in missing dir", c.acquire("", r.path("nodir/x"), AUTO))
        r.rec("empty name in default lockspace", c.acquire("", ""))
        r.rec("release of a failed acquire (not locked)", c.release("", r.path("missing.img")))
        os.symlink(r.path("nowhere"), r.path("dangling"))
        r.rec("dangling symlink", c.acquire("", r.path("dangling")))
        r.rec("dangling symlink with autocreate", c.acquire("", r.path("dangling"), AUTO))
        r.rec_exists("nowhere")
    differential(sc)


def test_autocreate_deletion_rules(differential):
    """Lease files: exclusive+AUTOCREATE unlinked on release; shared+AUTOCREATE
    unlinked by the last holder; without AUTOCREATE never deleted (spec §4.4)."""
    def sc(r):
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        ls = r.path("leases")
        r.rec("create_lockspace", a.create_lockspace(ls))
        r.rec("excl auto", a.acquire(ls, "L1", AUTO))
        r.rec_exists("leases/L1")
        r.rec("mode", oct(os.stat(r.path("leases/L1")).st_mode & 0o777))
        r.rec("size", os.stat(r.path("leases/L1")).st_size)
        r.rec("b excl auto busy", b.acquire(ls, "L1", AUTO))
        r.rec("release", a.release(ls, "L1"))
        r.rec_exists("leases/L1")
        r.rec("shared auto a", a.acquire(ls, "L2", SHARED | AUTO))
        r.rec("shared auto b", b.acquire(ls, "L2", SHARED | AUTO))
        r.rec("excl auto busy", b.acquire(ls, "L2", AUTO))
        r.rec_exists("leases/L2")
        r.rec("release a", a.release(ls, "L2"))
        r.rec_exists("leases/L2")
        r.rec("release b", b.release(ls, "L2"))
        r.rec_exists("leases/L2")
        r.rec("create_resource L3", a.create_resource(ls, "L3"))
        r.rec("acquire L3 without autocreate", a.acquire(ls, "L3"))
        r.rec("release L3", a.release(ls, "L3"))
        r.rec_exists("leases/L3")
        r.rec("acquire missing lease without autocreate", a.acquire(ls, "L4"))
        r.rec_exists("leases/L4")
        r.rec("autocreate on existing file", a.acquire(ls, "L3", AUTO))
        r.rec("release it (auto: deleted)", a.release(ls, "L3"))
        r.rec_exists("leases/L3")
        r.rec("shared without auto on a lease file", a.acquire(ls, "L5", SHARED))
    differential(sc)


def test_first_flags_win(differential):
    """Which flags value is remembered: a shared+auto resource then a shared request."""
    def sc(r):
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        ls = r.path("leases")
        a.create_lockspace(ls)
        r.rec("a shared|auto", a.acquire(ls, "X", SHARED | AUTO))
        r.rec("b shared only", b.acquire(ls, "X", SHARED))
        r.rec("a release", a.release(ls, "X"))
        r.rec("b release (last: file deleted per the first flags)", b.release(ls, "X"))
        r.rec_exists("leases/X")
    differential(sc)


def test_lockspaces_are_separate(differential):
    def sc(r):
        a = r.registered(UUID_A, "vm1", 1)
        b = r.registered(UUID_B, "vm2", 2)
        for d in ("ls1", "ls2"):
            a.create_lockspace(r.path(d))
        r.rec("a ls1/X", a.acquire(r.path("ls1"), "X", AUTO))
        r.rec("b ls2/X (other lockspace)", b.acquire(r.path("ls2"), "X", AUTO))
        r.rec("b release in wrong lockspace", b.release(r.path("ls1"), "X"))
        r.rec("a release ls2 (does not hold)", a.release(r.path("ls2"), "X"))
    differential(sc)


def test_owner_identity_is_registered_pid(differential):
    """Locks belong to the registered owner pid, not to the connection (spec §1)."""
    def sc(r):
        disk = r.path("disk1.img")
        c1 = r.registered(UUID_A, "vm1", 1)
        r.rec("c1 acquire", c1.acquire("", disk))
        c1.close()
        c2 = r.registered(UUID_A, "vm1", 1)       # same owner, new connection
        r.rec("same owner, new conn: acquire (busy)", c2.acquire("", disk))
        r.rec("same owner, new conn: release", c2.release("", disk))
        c3 = r.registered(UUID_B, "vm2", 2)
        r.rec("other owner acquire", c3.acquire("", disk))
        c3.close()
        c4 = r.registered(UUID_B, "other-name", 5, r.fake_pid(2))  # same pid, other uuid/name
        r.rec("same pid, other name: release", c4.release("", disk))
    differential(sc)


def test_pipelined_calls(differential):
    """Several calls in one write: answered one by one, in order."""
    def sc(r):
        from testbed.wire import register_args, res_args
        c = r.conn()
        disk = r.path("disk1.img")
        frames = (P.encode_call(P.PROC_REGISTER, 0, register_args(UUID_A, "vm1", 1, r.fake_pid(1)))
                  + P.encode_call(P.PROC_ACQUIRE_RESOURCE, 1, res_args("", disk))
                  + P.encode_call(P.PROC_ACQUIRE_RESOURCE, 2, res_args("", disk))
                  + P.encode_call(P.PROC_RELEASE_RESOURCE, 3, res_args("", disk)))
        c.send(frames)
        for i in range(4):
            r.rec(f"pipelined reply {i}", c.recv())
        r.rec("serials are echoed, not checked: serial 77",
              (c.send(P.encode_call(P.PROC_RESTRICT, 77, b"\0\0\0\0")), c.recv())[1])
    differential(sc)


def test_long_names(differential):
    def sc(r):
        c = r.registered()
        ls = r.path("ls")
        c.create_lockspace(ls)
        r.rec("name 255 bytes (autocreate)", c.acquire(ls, "n" * 255, AUTO))
        r.rec("name 256 bytes (ENAMETOOLONG)", c.acquire(ls, "n" * 256, AUTO))
        r.rec("name 65536 bytes (decodes, then fails)", c.acquire(ls, "n" * 65536, AUTO))
        r.rec("non-ASCII name", c.acquire(ls, "d\u00e9j\u00e0-vu", AUTO))
        r.rec_exists("ls/d\u00e9j\u00e0-vu")
        r.rec("name with slash", c.acquire(ls, "sub/x", AUTO))
    differential(sc)


def test_nul_inside_strings(differential):
    """XDR strings may contain NUL bytes; the C daemon uses them as C strings,
    i.e. cut at the first NUL, in file paths and in messages alike."""
    from lockd import xdr

    def raw(c, proc, payload):
        return c.call(proc, payload)

    def sc(r):
        c = r.registered()
        ls = r.path("ls")
        nul = lambda s: s.encode() + b"\0junk"   # noqa: E731
        r.rec("create_lockspace 'ls\\0junk'", raw(c, P.PROC_CREATE_LOCKSPACE, xdr.string(nul(ls))))
        r.rec_exists("ls")
        r.rec("acquire missing '\\0' name", raw(c, P.PROC_ACQUIRE_RESOURCE,
                                               xdr.string(b"") + xdr.string(nul(r.path("missing"))) + xdr.u32(0)))
        r.rec("acquire disk1 with NUL suffix", raw(c, P.PROC_ACQUIRE_RESOURCE,
                                                   xdr.string(b"") + xdr.string(nul(r.path("disk1.img"))) + xdr.u32(0)))
        r.rec("acquire disk1 plain (same resource?)", c.acquire("", r.path("disk1.img")))
        r.rec("release with NUL suffix", raw(c, P.PROC_RELEASE_RESOURCE,
                                             xdr.string(b"") + xdr.string(nul(r.path("disk1.img"))) + xdr.u32(0)))
        r.rec("lockspace path with NUL suffix", raw(c, P.PROC_ACQUIRE_RESOURCE,
                                                    xdr.string(nul(ls)) + xdr.string(b"lease") + xdr.u32(P.ACQUIRE_AUTOCREATE)))
        r.rec_exists("ls/lease")
        r.rec("name with NUL in a lockspace", raw(c, P.PROC_ACQUIRE_RESOURCE,
                                                  xdr.string(ls) + xdr.string(b"le\0ase2") + xdr.u32(P.ACQUIRE_AUTOCREATE)))
        r.rec_exists("ls/le")
    differential(sc)


def test_locks_held_by_another_host(differential):
    """fcntl conflicts with a lock held outside the daemon (another host's
    virtlockd on shared storage): EAGAIN/EACCES -> busy, and the shared lease
    file is not deleted while another host still holds it (spec §4.4)."""
    from testbed.wire import ForeignLock

    def sc(r):
        c = r.registered()
        ls = r.path("leases")
        c.create_lockspace(ls)
        with ForeignLock(r.path("disk1.img")):
            r.rec("exclusive while another host holds it exclusively", c.acquire("", r.path("disk1.img")))
            r.rec("shared while another host holds it exclusively", c.acquire("", r.path("disk1.img"), SHARED))
        r.rec("exclusive once the other host let go", c.acquire("", r.path("disk1.img")))
        r.rec("release", c.release("", r.path("disk1.img")))
        r.mkfile("leases/L")
        with ForeignLock(r.path("leases/L"), shared=True):
            r.rec("shared|auto next to another host's shared lock", c.acquire(ls, "L", SHARED | AUTO))
            r.rec("release: upgrade to exclusive fails, so no unlink", c.release(ls, "L"))
            r.rec_exists("leases/L")
            r.rec("exclusive|auto against the other host's shared lock", c.acquire(ls, "L", AUTO))
        r.rec("shared|auto alone", c.acquire(ls, "L", SHARED | AUTO))
        r.rec("release alone: deleted", c.release(ls, "L"))
        r.rec_exists("leases/L")
    differential(sc)
