# SPDX-License-Identifier: GPL-3.0-or-later
"""Lockspaces, resources and the file locks themselves.

This is where a lease is taken: :meth:`Locks.acquire`.

Semantics follow libvirt's ``virlockspace.c`` (spec 4.3-4.4) with two
deliberate improvements that libvirt cannot observe:

* **OFD locks** (``F_OFD_SETLK``) by default instead of classic POSIX locks.
  They belong to the open file description, so closing some other fd of the
  same file never drops them, two descriptions of one file conflict even inside
  this process (a symlink or hardlink to a held disk is refused by the
  kernel too), and a copy of the fd kept by systemd keeps the lock alive while
  the daemon restarts.
* **Alias-proof resources**: every held resource is indexed by (device, inode),
  so a second name for the same file conflicts like the first name would.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from typing import Dict, List, Optional, Tuple

from . import protocol as P
from .rpc import RPCError

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_FLOCK = struct.Struct("hhqqi4x")   # struct flock on Linux (x86_64, aarch64)

SHARED = P.ACQUIRE_SHARED
AUTOCREATE = P.ACQUIRE_AUTOCREATE


_LOCK_ARGS = {k: _FLOCK.pack(k, os.SEEK_SET, 0, 1, 0) for k in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)}
_fcntl = fcntl.fcntl


def set_lock(fd: int, kind: int, lock_type: str) -> None:
    """Non-blocking lock of byte 0, length 1 (``kind``: F_RDLCK/F_WRLCK/F_UNLCK)."""
    _fcntl(fd, F_OFD_SETLK if lock_type == "ofd" else fcntl.F_SETLK, _LOCK_ARGS[kind])


def probe_lock_type(preferred: str) -> str:
    """``preferred`` if the kernel supports it, else classic POSIX locks."""
    if preferred != "ofd":
        return preferred
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
        return "ofd"
    except OSError as e:
        # pipes reject file locks with EINVAL on some kernels: then try a file
        if e.errno != errno.EINVAL:
            return "posix"
    finally:
        os.close(r)
        os.close(w)
    import tempfile
    with tempfile.TemporaryFile() as f:
        try:
            fcntl.fcntl(f.fileno(), F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
            return "ofd"
        except OSError:
            return "posix"


def _makedirs(path: str, mode: int) -> None:
    parent = os.path.dirname(path.rstrip("/"))
    if parent and parent != path and not os.path.isdir(parent):
        _makedirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
        return
    os.chmod(path, mode)


class Resource:
    """One held lease: a locked file with its owner pids (repeats allowed)."""

    __slots__ = ("lockspace", "name", "path", "fd", "flags", "owners", "since", "dev", "ino", "fdname")

    def __init__(self, lockspace: "LockSpace", name: str, path: str, fd: int, flags: int,
                 dev: int, ino: int) -> None:
        self.lockspace = lockspace
        self.name = name
        self.path = path
        self.fd = fd
        self.flags = flags
        self.owners: List[int] = []
        self.since: Dict[int, float] = {}
        self.dev = dev
        self.ino = ino
        self.fdname: Optional[str] = None

    @property
    def shared(self) -> bool:
        return bool(self.flags & SHARED)

    def add_owner(self, pid: int, when: Optional[float] = None) -> None:
        self.owners.append(pid)
        self.since.setdefault(pid, time.time() if when is None else when)


class LockSpace:
    __slots__ = ("key", "directory", "resources")

    def __init__(self, key: str, directory: Optional[str]) -> None:
        self.key = key
        self.directory = directory
        self.resources: Dict[str, Resource] = {}

    def path_of(self, name: str) -> str:
        return name if self.directory is None else self.directory + "/" + name


class Listener:
    """Hooks for persistence (journal, systemd fd store). Default: nothing."""

    def lockspace_added(self, ls: LockSpace) -> None: ...
    def resource_added(self, res: Resource, owner: int) -> None: ...
    def owner_added(self, res: Resource, owner: int) -> None: ...
    def owner_removed(self, res: Resource, owner: int, count: int) -> None: ...
    def resource_removed(self, res: Resource) -> None: ...


class Locks:
    """All lockspaces of the daemon, the default (direct) one included."""

    def __init__(self, lock_type: str = "ofd", listener: Optional[Listener] = None) -> None:
        self.lock_type = lock_type
        self.listener = listener or Listener()
        self.default = LockSpace("", None)
        self.lockspaces: Dict[str, LockSpace] = {"": self.default}
        self.by_inode: Dict[Tuple[int, int], List[Resource]] = {}
        # owner pid -> its resources (ordered set): an owner's EOF costs O(its leases)
        self.by_owner: Dict[int, Dict[Resource, None]] = {}

    def add_owner(self, res: Resource, owner: int, when: Optional[float] = None) -> None:
        res.add_owner(owner, when)
        self.by_owner.setdefault(owner, {})[res] = None

    def _unindex_owner(self, res: Resource, owner: int) -> None:
        held = self.by_owner.get(owner)
        if held is not None:
            held.pop(res, None)
            if not held:
                del self.by_owner[owner]

    # -- lockspaces ---------------------------------------------------------

    def get(self, key: str) -> LockSpace:
        ls = self.lockspaces.get(key)
        if ls is None:
            raise P.err_no_lockspace(key)
        return ls

    def _make_dir(self, directory: str) -> None:
        # as virLockSpaceNew: any stat failure means "create it", with every
        # missing component made 0700 (virFileMakePathWithMode)
        try:
            st = os.stat(directory)
        except OSError:
            try:
                _makedirs(directory, 0o700)
            except OSError as e:
                raise P.err_system("Unable to create lockspace %s" % directory, e) from None
            return
        if not stat.S_ISDIR(st.st_mode):
            raise P.err_not_dir(directory)

    def create_lockspace(self, key: str) -> LockSpace:
        """CREATE_LOCKSPACE: idempotent; the default lockspace always exists."""
        ls = self.lockspaces.get(key)
        if ls is not None:
            return ls
        self._make_dir(key)
        ls = LockSpace(key, key)
        self.lockspaces[key] = ls
        self.listener.lockspace_added(ls)
        return ls

    def new_lockspace(self, key: str) -> Optional[LockSpace]:
        """NEW: an existing lockspace is an error; like libvirt, a directory
        that cannot be made is not (acquires in it fail later)."""
        if key == "":
            raise P.err_default_exists()
        if key in self.lockspaces:
            raise P.err_lockspace_exists(key)
        try:
            self._make_dir(key)
        except RPCError:
            return None   # libvirt replies success but adds no lockspace
        ls = LockSpace(key, key)
        self.lockspaces[key] = ls
        self.listener.lockspace_added(ls)
        return ls

    # -- resources ----------------------------------------------------------

    def _unheld_path(self, ls: LockSpace, name: str):
        """CREATE/DELETE_RESOURCE: busy if held, here or under another name for
        the same file. Returns (path, whether the file exists)."""
        if name in ls.resources:
            raise P.err_busy(name)
        path = ls.path_of(name)
        try:
            st = os.stat(path)
        except OSError:
            return path, False
        if self.by_inode.get((st.st_dev, st.st_ino)):
            raise P.err_busy(name)
        return path, True

    def create_resource(self, ls: LockSpace, name: str) -> None:
        path, exists = self._unheld_path(ls, name)
        if exists:
            return  # libvirt's "touch" of an existing file changes nothing
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise P.err_touch(path, e) from None
        os.close(fd)

    def delete_resource(self, ls: LockSpace, name: str) -> None:
        path = self._unheld_path(ls, name)[0]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise P.err_system("Unable to delete lockspace resource %s" % path, e) from None

    def acquire(self, ls: LockSpace, name: str, owner: int, flags: int,
                when: Optional[float] = None) -> Resource:
        res = ls.resources.get(name)
        if res is not None:
            if res.flags & SHARED and flags & SHARED:
                self.add_owner(res, owner, when)
                self.listener.owner_added(res, owner)
                return res
            raise P.err_busy(name)

        path = name if ls.directory is None else ls.directory + "/" + name
        kind = F_RDLCK if flags & SHARED else F_WRLCK
        if flags & AUTOCREATE:
            fd, st = self._open_autocreate(path, name, kind, flags)
        else:
            if self.lock_type != "ofd":
                # POSIX locks: opening and closing an alias of a held file would
                # drop our lock on it, so check before open(); OFD locks do not
                # care and the check after open() below is enough
                self._check_alias_by_path(path, name, flags)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as e:
                raise P.err_system("Unable to open resource %s" % path, e) from None
            try:
                st = os.fstat(fd)
                self._check_alias(st, name, flags)
                self._lock(fd, kind, name, path)
            except BaseException:
                os.close(fd)
                raise

        res = Resource(ls, name, path, fd, flags, st.st_dev, st.st_ino)
        self.add_owner(res, owner, when)
        ls.resources[name] = res
        self.by_inode.setdefault((res.dev, res.ino), []).append(res)
        self.listener.resource_added(res, owner)
        return res

    def adopt(self, ls: LockSpace, name: str, path: str, fd: int, flags: int,
              owners: List[Tuple[int, float]]) -> Resource:
        """Take over an fd that already holds the lock (re-exec, fd store)."""
        st = os.fstat(fd)
        kind = fcntl.F_RDLCK if flags & SHARED else fcntl.F_WRLCK
        set_lock(fd, kind, self.lock_type)   # a no-op for an OFD we already own
        res = Resource(ls, name, path, fd, flags, st.st_dev, st.st_ino)
        for pid, since in owners:
            self.add_owner(res, pid, since)
        ls.resources[name] = res
        self.by_inode.setdefault((res.dev, res.ino), []).append(res)
        return res

    def _check_alias_by_path(self, path: str, name: str, flags: int) -> None:
        # stat before open: in POSIX mode even opening and closing an alias
        # would drop the lock we hold on it.
        try:
            st = os.stat(path)
        except OSError:
            return  # open() reports the error with libvirt's wording
        self._check_alias(st, name, flags)

    def _check_alias(self, st: os.stat_result, name: str, flags: int) -> None:
        held = self.by_inode.get((st.st_dev, st.st_ino))
        if not held:
            return
        if self.lock_type == "ofd" and flags & SHARED and all(r.flags & SHARED for r in held):
            return  # shared beside shared through another name is fine
        raise P.err_busy(name)

    def _lock(self, fd: int, kind: int, name: str, path: str) -> None:
        try:
            set_lock(fd, kind, self.lock_type)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise P.err_busy(name) from None
            raise P.err_system("Unable to acquire lock on '%s'" % path, e) from None

    def _open_autocreate(self, path: str, name: str, kind: int, flags: int):
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
            except OSError as e:
                raise P.err_system("Unable to open/create resource %s" % path, e) from None
            try:
                try:
                    b = os.fstat(fd)
                except OSError as e:
                    raise P.err_system("Unable to check status of pid file '%s'" % path, e) from None
                self._check_alias(b, name, flags)
                self._lock(fd, kind, name, path)
                try:
                    a = os.stat(path)
                except OSError:
                    os.close(fd)
                    continue  # deleted under us by the previous holder: retry
                if a.st_dev == b.st_dev and a.st_ino == b.st_ino:
                    return fd, b
                os.close(fd)  # replaced under us: retry on the new file
            except BaseException:
                try:
                    os.close(fd)
                except OSError:
                    pass
                raise

    def release(self, ls: LockSpace, name: str, owner: int) -> None:
        res = ls.resources.get(name)
        if res is None:
            raise P.err_not_locked(name)
        try:
            i = res.owners.index(owner)
        except ValueError:
            raise P.err_not_owner(owner) from None
        del res.owners[i]
        if owner not in res.owners:
            res.since.pop(owner, None)
            self._unindex_owner(res, owner)
        self.listener.owner_removed(res, owner, 1)
        if not res.owners:
            self._destroy(res)

    def release_owner(self, owner: int) -> List[Resource]:
        """Drop every entry of ``owner`` everywhere (libvirt drops only one per
        resource, which leaves a twice-acquired shared lease stuck)."""
        touched = list(self.by_owner.pop(owner, ()))
        for res in touched:
            before = len(res.owners)
            res.owners = [p for p in res.owners if p != owner]
            res.since.pop(owner, None)
            self.listener.owner_removed(res, owner, before - len(res.owners))
            if not res.owners:
                self._destroy(res)
        return touched

    def remove_resource(self, res: Resource) -> None:
        """Drop a lease whatever its owners (admin release)."""
        for owner in list(dict.fromkeys(res.owners)):
            before = len(res.owners)
            res.owners = [p for p in res.owners if p != owner]
            res.since.pop(owner, None)
            self._unindex_owner(res, owner)
            self.listener.owner_removed(res, owner, before - len(res.owners))
        self._destroy(res)

    def _destroy(self, res: Resource) -> None:
        ls = res.lockspace
        if ls.resources.get(res.name) is res:
            del ls.resources[res.name]
        peers = self.by_inode.get((res.dev, res.ino))
        if peers is not None:
            peers.remove(res)
            if not peers:
                del self.by_inode[(res.dev, res.ino)]
        if res.flags & AUTOCREATE:
            delete = True
            if res.flags & SHARED:
                # only delete when nobody else (another host) shares it
                try:
                    set_lock(res.fd, fcntl.F_WRLCK, self.lock_type)
                except OSError:
                    delete = False
            if delete:
                try:
                    os.unlink(res.path)
                except OSError:
                    pass
        # Unlock explicitly: a copy of this open file description may live on
        # elsewhere (systemd's fd store until it processes FDSTOREREMOVE), and
        # with OFD locks that copy would keep the lock after our close().
        try:
            set_lock(res.fd, fcntl.F_UNLCK, self.lock_type)
        except OSError:
            pass
        self.listener.resource_removed(res)
        os.close(res.fd)
        res.fd = -1

    # -- queries --------------------------------------------------------------

    def resources(self):
        for ls in self.lockspaces.values():
            yield from ls.resources.values()

    def count(self) -> int:
        """Number of held resources."""
        return sum(len(ls.resources) for ls in self.lockspaces.values())

    def owners_of(self, owner: int) -> List[Resource]:
        return list(self.by_owner.get(owner, ()))
