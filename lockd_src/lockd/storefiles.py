# SPDX-License-Identifier: GPL-3.0-or-later
"""The worker side of one network filesystem: its calls and its alias index.

:class:`StoreFiles` belongs to one worker thread (:mod:`lockd.workers`) and
is only ever used from it. Every open, lock, unlink and close on that
filesystem goes through it, in order, so its index of the files it holds
locked is exact for that filesystem without any locking: an alias of a held
file (symlink, hardlink, bind mount: same device and inode) is refused
before it is opened, as :class:`lockd.lockspace.Locks` does on the loop for
local files. That matters for POSIX locks, where opening and closing an
alias would drop the lock on the original.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

from . import leasefile
from . import protocol as P
from .filelock import F_RDLCK, F_UNLCK, F_WRLCK, set_lock

log = logging.getLogger("lockd")

SHARED = P.ACQUIRE_SHARED
AUTOCREATE = P.ACQUIRE_AUTOCREATE
Opened = Tuple[int, os.stat_result]


class StoreFiles:
    """The lease files one worker holds open and locked, by (dev, ino)."""

    def __init__(self, lock_type: str) -> None:
        self.lock_type = lock_type
        self.held: Dict[Tuple[int, int], Dict[int, int]] = {}    # (dev, ino) -> {fd: flags}

    def seed(self, fd: int, dev: int, ino: int, flags: int) -> None:
        """A lease taken before this worker existed (recovery, hand-over)."""
        self.held.setdefault((dev, ino), {})[fd] = flags

    def _forget(self, fd: int, dev: int, ino: int) -> None:
        fds = self.held.get((dev, ino))
        if fds is not None:
            fds.pop(fd, None)
            if not fds:
                del self.held[(dev, ino)]

    def _check(self, st: os.stat_result, name: str, flags: int) -> None:
        held = self.held.get((st.st_dev, st.st_ino))
        if not held:
            return
        if self.lock_type == "ofd" and flags & SHARED and all(f & SHARED for f in held.values()):
            return
        raise P.err_busy(name)

    # -- the calls (each one runs on the worker) --------------------------------

    def open_locked(self, path: str, name: str, flags: int) -> Opened:
        if self.lock_type != "ofd" and not flags & AUTOCREATE:
            try:
                self._check(os.stat(path), name, flags)
            except OSError:
                pass          # open() reports it with libvirt's wording
        fd, st = leasefile.open_locked(path, name, F_RDLCK if flags & SHARED else F_WRLCK, flags,
                                       self.lock_type, lambda s: self._check(s, name, flags))
        self.held.setdefault((st.st_dev, st.st_ino), {})[fd] = flags
        return fd, st

    def drop(self, opened: Opened) -> None:
        """Undo an open+lock nobody will use: unlock and close, never unlink
        (the file may be another holder's by now)."""
        fd, st = opened
        self._forget(fd, st.st_dev, st.st_ino)
        try:
            set_lock(fd, F_UNLCK, self.lock_type)
        except OSError:
            pass
        os.close(fd)

    def discard(self, fd: int, path: str, flags: int, dev: int, ino: int) -> None:
        """A released lease: as :func:`lockd.leasefile.discard`."""
        self._forget(fd, dev, ino)
        leasefile.discard(fd, path, flags, self.lock_type)

    def _unheld(self, path: str, name: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if self.held.get((st.st_dev, st.st_ino)):
            raise P.err_busy(name)
        return True

    def create_resource(self, path: str, name: str) -> None:
        if not self._unheld(path, name):
            leasefile.touch(path)

    def delete_resource(self, path: str, name: str) -> None:
        self._unheld(path, name)
        leasefile.delete(path)

    @staticmethod
    def make_dir(directory: str) -> None:
        leasefile.make_dir(directory)

    def reassert(self, fd: int, flags: int) -> None:
        """Take our own lock again on the same open file description (a no-op
        for a lock we still hold; EAGAIN when someone else holds it now)."""
        set_lock(fd, F_RDLCK if flags & SHARED else F_WRLCK, self.lock_type)
