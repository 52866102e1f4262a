# SPDX-License-Identifier: GPL-3.0-or-later
"""The lock primitive: a non-blocking ``fcntl`` lock of byte 0, length 1.

lockd takes **OFD locks** (``F_OFD_SETLK``) where the kernel has them and
classic POSIX locks otherwise (``lock_type = "posix"``, or an old kernel).
libvirt's C daemon takes POSIX locks on the same byte, so both conflict with
each other across processes and, on NFS, across hosts.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile

F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK
FLOCK = struct.Struct("hhqqi4x")   # struct flock on Linux (x86_64, aarch64)

_LOCK_ARGS = {k: FLOCK.pack(k, os.SEEK_SET, 0, 1, 0) for k in (F_RDLCK, F_WRLCK, F_UNLCK)}
_fcntl = fcntl.fcntl


def set_lock(fd: int, kind: int, lock_type: str) -> None:
    """Non-blocking lock of byte 0, length 1 (``kind``: F_RDLCK/F_WRLCK/F_UNLCK)."""
    _fcntl(fd, F_OFD_SETLK if lock_type == "ofd" else fcntl.F_SETLK, _LOCK_ARGS[kind])


def get_lock(fd: int, kind: int, lock_type: str) -> int:
    """Would ``kind`` on byte 0 conflict? Returns the conflicting lock's type,
    or F_UNLCK when nothing else holds it (our own OFD lock never conflicts)."""
    res = _fcntl(fd, F_OFD_GETLK if lock_type == "ofd" else fcntl.F_GETLK, _LOCK_ARGS[kind])
    return FLOCK.unpack(res)[0]


def probe_lock_type(preferred: str) -> str:
    """``preferred`` if the kernel supports it, else classic POSIX locks."""
    if preferred != "ofd":
        return preferred
    r, w = os.pipe()
    try:
        fcntl.fcntl(r, F_OFD_GETLK, _LOCK_ARGS[F_WRLCK])
        return "ofd"
    except OSError as e:
        # pipes reject file locks with EINVAL on some kernels: then try a file
        if e.errno != errno.EINVAL:
            return "posix"
    finally:
        os.close(r)
        os.close(w)
    with tempfile.TemporaryFile() as f:
        try:
            fcntl.fcntl(f.fileno(), F_OFD_GETLK, _LOCK_ARGS[F_WRLCK])
            return "ofd"
        except OSError:
            return "posix"
