# SPDX-License-Identifier: GPL-3.0-or-later
"""One lease file on disk: make its directory, create, open and lock, delete.

Every filesystem call the lock table makes on a lockspace or disk path is
here, with libvirt's error wording (``virlockspace.c``): these are the calls
that can block on a hung network filesystem.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Tuple

from . import protocol as P
from .filelock import F_UNLCK, F_WRLCK, set_lock

AUTOCREATE = P.ACQUIRE_AUTOCREATE
SHARED = P.ACQUIRE_SHARED
AliasCheck = Callable[[os.stat_result], None]


def make_dir(directory: str) -> None:
    """As virLockSpaceNew: any stat failure means "create it", with every
    missing component made 0700 (virFileMakePathWithMode)."""
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


def touch(path: str) -> None:
    """CREATE_RESOURCE's "touch" (an existing file is left as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise P.err_touch(path, e) from None
    os.close(fd)


def delete(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise P.err_system("Unable to delete lockspace resource %s" % path, e) from None


def lock(fd: int, kind: int, name: str, path: str, lock_type: str) -> None:
    try:
        set_lock(fd, kind, lock_type)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise P.err_busy(name) from None
        raise P.err_system("Unable to acquire lock on '%s'" % path, e) from None


def open_locked(path: str, name: str, kind: int, flags: int, lock_type: str,
                check_alias: AliasCheck) -> Tuple[int, os.stat_result]:
    """Open ``path`` and lock byte 0 (``kind``); ``check_alias(stat)`` refuses a
    file already held under another name. Returns (fd, stat of the file)."""
    if flags & AUTOCREATE:
        return _open_autocreate(path, name, kind, lock_type, check_alias)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise P.err_system("Unable to open resource %s" % path, e) from None
    try:
        st = os.fstat(fd)
        check_alias(st)
        lock(fd, kind, name, path, lock_type)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_autocreate(path: str, name: str, kind: int, lock_type: str,
                     check_alias: AliasCheck) -> Tuple[int, os.stat_result]:
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
            check_alias(b)
            lock(fd, kind, name, path, lock_type)
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


def discard(fd: int, path: str, flags: int, lock_type: str) -> None:
    """Give a lease file up: delete an autocreated one (unless another host
    still shares it), unlock, close."""
    if flags & AUTOCREATE:
        delete_it = True
        if flags & SHARED:
            # only delete when nobody else (another host) shares it
            try:
                set_lock(fd, F_WRLCK, lock_type)
            except OSError:
                delete_it = False
        if delete_it:
            try:
                os.unlink(path)
            except OSError:
                pass
    # Unlock explicitly: a copy of this open file description may live on
    # elsewhere (systemd's fd store until it processes FDSTOREREMOVE), and with
    # OFD locks that copy would keep the lock after our close().
    try:
        set_lock(fd, F_UNLCK, lock_type)
    except OSError:
        pass
    os.close(fd)
