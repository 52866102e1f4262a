# SPDX-License-Identifier: GPL-3.0-or-later
"""Lockspaces, resources and the file locks themselves.

This is where a lease is taken: :meth:`Locks.acquire`, called by
:meth:`lockd.program.LockProgram.acquire` (see docs/architecture.md).

Semantics follow libvirt's ``virlockspace.c`` (spec 4.3-4.4) with two
deliberate improvements that libvirt cannot observe:

* **OFD locks** (``F_OFD_SETLK``, :mod:`lockd.filelock`) by default instead of classic POSIX locks.
  They belong to the open file description, so closing some other fd of the
  same file never drops them, two descriptions of one file conflict even inside
  this process (a symlink or hardlink to a held disk is refused by the
  kernel too), and a copy of the fd kept by systemd keeps the lock alive while
  the daemon restarts.
* **Alias-proof resources**: every held resource is indexed by (device, inode),
  so a second name for the same file conflicts like the first name would.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from . import leasefile
from . import protocol as P
from .filelock import F_RDLCK, F_WRLCK, set_lock
from .rpc import RPCError

SHARED = P.ACQUIRE_SHARED
AUTOCREATE = P.ACQUIRE_AUTOCREATE


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
    """A directory of lease files (indirect mode), or the default lockspace
    (``directory`` None) whose resource names are the disk paths themselves."""

    __slots__ = ("key", "directory", "resources")

    def __init__(self, key: str, directory: Optional[str]) -> None:
        self.key = key
        self.directory = directory
        self.resources: Dict[str, Resource] = {}

    def path_of(self, name: str) -> str:
        return name if self.directory is None else self.directory + "/" + name


class Locks:
    """All lockspaces of the daemon, the default (direct) one included, and
    the indexes over their held resources.

    This is the lock table and nothing else: it opens, locks, unlocks and
    closes files. Who is told about a change (journal, fd store) is the
    caller's business (:mod:`lockd.state`); every mutating method returns what
    it changed.
    """

    def __init__(self, lock_type: str = "ofd") -> None:
        self.lock_type = lock_type
        self.default = LockSpace("", None)
        self.lockspaces: Dict[str, LockSpace] = {"": self.default}
        self.by_inode: Dict[Tuple[int, int], List[Resource]] = {}
        # owner pid -> its resources (ordered set): an owner's EOF costs O(its leases)
        self.by_owner: Dict[int, Dict[Resource, None]] = {}
        self.entries = 0         # (resource, owner) entries, repeats included
        # how a lease file is given up: here, or queued on a storage worker (lockd.storage)
        self.on_discard: Callable[[Resource], None] = self.discard_file

    # -- the indexes: every change of the table goes through these four -------

    def _index(self, res: Resource) -> None:
        res.lockspace.resources[res.name] = res
        self.by_inode.setdefault((res.dev, res.ino), []).append(res)

    def _unindex(self, res: Resource) -> None:
        ls = res.lockspace
        if ls.resources.get(res.name) is res:
            del ls.resources[res.name]
        peers = self.by_inode.get((res.dev, res.ino))
        if peers is not None:
            peers.remove(res)
            if not peers:
                del self.by_inode[(res.dev, res.ino)]

    def add_owner(self, res: Resource, owner: int, when: Optional[float] = None) -> None:
        res.add_owner(owner, when)
        self.by_owner.setdefault(owner, {})[res] = None
        self.entries += 1

    def _remove_owner(self, res: Resource, owner: int, every: bool) -> int:
        """Remove one entry of ``owner`` (or all of them); returns how many."""
        before = len(res.owners)
        if every:
            res.owners = [p for p in res.owners if p != owner]
        else:
            res.owners.remove(owner)
        if owner not in res.owners:
            res.since.pop(owner, None)
            held = self.by_owner.get(owner)
            if held is not None:
                held.pop(res, None)
                if not held:
                    del self.by_owner[owner]
        removed = before - len(res.owners)
        self.entries -= removed
        return removed

    def holds(self, owner: int) -> bool:
        """Does ``owner`` hold any lease?"""
        return owner in self.by_owner

    # -- lockspaces ---------------------------------------------------------

    def get(self, key: str) -> LockSpace:
        """The lockspace ``key``, or libvirt's "does not exist" error."""
        ls = self.lockspaces.get(key)
        if ls is None:
            raise P.err_no_lockspace(key)
        return ls

    def create_lockspace(self, key: str) -> LockSpace:
        """CREATE_LOCKSPACE: idempotent; the default lockspace always exists."""
        ls = self.lockspaces.get(key)
        if ls is not None:
            return ls
        leasefile.make_dir(key)
        ls = self.lockspaces[key] = LockSpace(key, key)
        return ls

    def add_lockspace(self, key: str) -> LockSpace:
        """A lockspace whose directory is known to exist (the hand-over)."""
        ls = self.lockspaces.get(key)
        if ls is None:
            ls = self.lockspaces[key] = LockSpace(key, key)
        return ls

    def new_lockspace(self, key: str) -> Optional[LockSpace]:
        """NEW: an existing lockspace is an error; like libvirt, a directory
        that cannot be made is not (acquires in it fail later)."""
        if key == "":
            raise P.err_default_exists()
        if key in self.lockspaces:
            raise P.err_lockspace_exists(key)
        try:
            leasefile.make_dir(key)
        except RPCError:
            return None   # libvirt replies success but adds no lockspace
        ls = self.lockspaces[key] = LockSpace(key, key)
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
        if not exists:
            leasefile.touch(path)   # libvirt's "touch" of an existing file changes nothing

    def delete_resource(self, ls: LockSpace, name: str) -> None:
        leasefile.delete(self._unheld_path(ls, name)[0])

    def acquire(self, ls: LockSpace, name: str, owner: int, flags: int,
                when: Optional[float] = None, opened: Optional[Tuple[int, os.stat_result]] = None) -> Resource:
        """Take the lease ``name`` for ``owner``: **this is where a lease is taken**.

        A resource already held shared gains one more owner entry; otherwise
        the file is opened and locked (``F_OFD_SETLK`` on byte 0), or
        ``opened`` is that file, opened and locked already by a storage worker.
        Raises the libvirt error to reply with. The new entry is the last of
        ``res.owners``.
        """
        res = ls.resources.get(name)
        if res is not None:
            if res.flags & SHARED and flags & SHARED:
                self.add_owner(res, owner, when)
                return res
            raise P.err_busy(name)

        path = name if ls.directory is None else ls.directory + "/" + name
        if opened is not None:
            return self._add(ls, name, path, opened[0], flags, opened[1], owner, when)
        if self.lock_type != "ofd" and not flags & AUTOCREATE:
            # POSIX locks: opening and closing an alias of a held file would
            # drop our lock on it, so check before open(); OFD locks do not
            # care and the check after open() is enough
            self._check_alias_by_path(path, name, flags)
        fd, st = leasefile.open_locked(path, name, F_RDLCK if flags & SHARED else F_WRLCK, flags,
                                       self.lock_type, lambda st: self._check_alias(st, name, flags))
        return self._add(ls, name, path, fd, flags, st, owner, when)

    def _add(self, ls: LockSpace, name: str, path: str, fd: int, flags: int, st: os.stat_result,
             owner: int, when: Optional[float]) -> Resource:
        res = Resource(ls, name, path, fd, flags, st.st_dev, st.st_ino)
        self._index(res)
        self.add_owner(res, owner, when)
        return res

    def restore(self, ls: LockSpace, name: str, path: str, fd: int, flags: int,
                owners: List[Tuple[int, float]], dev: Optional[int] = None,
                ino: Optional[int] = None) -> Resource:
        """Put back a lease whose fd already holds the lock: after a live
        re-exec (same process, same open file description: pass ``dev``/``ino``
        and nothing is touched), or from systemd's fd store (the lock is
        re-asserted, a no-op for an OFD lock we already own)."""
        if dev is None or ino is None:
            st = os.fstat(fd)
            dev, ino = st.st_dev, st.st_ino
            set_lock(fd, F_RDLCK if flags & SHARED else F_WRLCK, self.lock_type)
        res = Resource(ls, name, path, fd, flags, dev, ino)
        self._index(res)
        for pid, since in owners:
            self.add_owner(res, pid, since)
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

    def release(self, ls: LockSpace, name: str, owner: int) -> Resource:
        """Drop one entry of ``owner``; the resource is closed (``fd == -1``)
        when it was the last."""
        res = ls.resources.get(name)
        if res is None:
            raise P.err_not_locked(name)
        if owner not in res.owners:
            raise P.err_not_owner(owner)
        self._remove_owner(res, owner, every=False)
        if not res.owners:
            self._destroy(res)
        return res

    def release_owner(self, owner: int) -> List[Resource]:
        """Drop every entry of ``owner`` everywhere (libvirt drops only one per
        resource, which leaves a twice-acquired shared lease stuck)."""
        touched = list(self.by_owner.get(owner, ()))
        for res in touched:
            self._remove_owner(res, owner, every=True)
            if not res.owners:
                self._destroy(res)
        return touched

    def remove_resource(self, res: Resource) -> List[int]:
        """Drop a lease whatever its owners (admin release); returns them."""
        owners = list(dict.fromkeys(res.owners))
        for owner in owners:
            self._remove_owner(res, owner, every=True)
        self._destroy(res)
        return owners

    def _destroy(self, res: Resource) -> None:
        self._unindex(res)
        self.on_discard(res)
        res.fd = -1

    def discard_file(self, res: Resource) -> None:
        """Give the lease file up now (delete if autocreated, unlock, close)."""
        leasefile.discard(res.fd, res.path, res.flags, self.lock_type)

    # -- queries --------------------------------------------------------------

    def resources(self):
        for ls in self.lockspaces.values():
            yield from ls.resources.values()

    def count(self) -> int:
        """Number of held resources."""
        return sum(len(ls.resources) for ls in self.lockspaces.values())
