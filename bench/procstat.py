# SPDX-License-Identifier: GPL-3.0-or-later
"""What the kernel says about a process: CPU seconds, RSS, and the locks in
/proc/locks on a set of files (the kernel's view of the leases)."""
from __future__ import annotations

import os
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


def exec_marker(pid: int) -> tuple:
    """(startcode, startstack): both are re-randomised by every execve()."""
    f = _stat_fields(pid)
    return int(f[23]), int(f[25])             # fields 26 and 28 of proc(5)


def rss_kib(pid: int) -> int:
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def fd_count(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def inode_keys(paths: Iterable[str]) -> set:
    """The 'MAJ:MIN:INODE' keys /proc/locks uses for these files."""
    keys = set()
    for p in paths:
        st = os.stat(p)
        keys.add("%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    return keys


def locked_count(keys: set) -> int:
    """How many of the files (by inode key) hold at least one lock right now."""
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "1: POSIX  ADVISORY  WRITE 123 fe:00:456 0 0" ; blocked waiters have "->"
            if len(parts) >= 6 and parts[1] != "->" and parts[5] in keys:
                held.add(parts[5])
    return len(held)
