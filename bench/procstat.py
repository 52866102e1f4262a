# SPDX-License-Identifier: GPL-3.0-or-later
"""What the kernel says about a process: CPU seconds, RSS, and whether the kernel
sees a set of files locked (its view of the leases)."""
from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list:
    # comm may contain spaces and parentheses: split after the last ')'
    return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of every thread of `pid` (plus reaped children if asked)."""
    f = _stat_fields(pid)
    ticks = int(f[11]) + int(f[12])          # fields 14, 15 of proc(5)
    if children:
        ticks += int(f[13]) + int(f[14])     # cutime, cstime
    return ticks / CLK_TCK


def cpu_split(pid: int) -> tuple:
    """(user seconds, system seconds) of every thread of `pid`."""
    f = _stat_fields(pid)
    return int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK


def exec_marker(pid: int) -> tuple:
    """(startcode, startstack): both are re-randomised by every execve()."""
    f = _stat_fields(pid)
    return int(f[23]), int(f[25])             # fields 26 and 28 of proc(5)


def rss_kib(pid: int) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def nofile_limits(pid: int) -> tuple:
    """(soft, hard) RLIMIT_NOFILE of a running process."""
    for line in Path("/proc/%d/limits" % pid).read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise RuntimeError("no 'Max open files' for pid %d" % pid)


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


_FLOCK = struct.Struct("@hhqqi4x")     # struct flock on Linux x86_64/aarch64


def is_locked(path: str) -> bool:
    """Does any lock (POSIX or OFD, any process) cover byte 0 of `path`?

    Asks the kernel with F_OFD_GETLK for a write lock on byte 0: it reports a
    conflicting lock of any kind. Opening and closing the file here cannot
    drop the daemon's locks: POSIX locks only die when their *own* process
    closes an fd. (Reading /proc/locks instead is not a snapshot: it is read
    a page at a time while the list changes, so lines get skipped.)
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
    finally:
        os.close(fd)
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def locked_count(paths: Iterable[str]) -> int:
    """How many of these files are locked right now (the kernel's view of the leases)."""
    return sum(1 for p in set(paths) if is_locked(p))
