# SPDX-License-Identifier: GPL-3.0-or-later
"""Owner identity: a pid plus its process start time, and pidfd watching.

libvirt identifies a lock owner by pid alone. A pid is reused after the
process exits, so the daemon also records the start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) and treats a pid whose start time
changed as a different, dead owner.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 22   # the kernel's upper bound


PID_MAX = _pid_max()     # no process can have a larger pid: skip /proc and pidfd for those


def start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    if pid <= 0 or pid > PID_MAX:
        return None
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, started: Optional[int]) -> bool:
    """Is the process that was ``pid`` at ``started`` still running?"""
    now = start_time(pid)
    if now is None:
        return False
    if started is not None and now != started:
        return False
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
        state = data[data.rindex(b")") + 2:data.rindex(b")") + 3]
        return state not in (b"Z", b"X")
    except OSError:
        return False


def pidfd_open(pid: int) -> Optional[int]:
    if pid <= 0 or pid > PID_MAX or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    os.set_inheritable(fd, False)
    return fd


def fmt_uuid(b: bytes) -> str:
    """8-4-4-4-12 text of 16 raw bytes (what uuid.UUID prints, without the object)."""
    h = bytes(b).hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


@dataclass
class OwnerInfo:
    """What REGISTER told us about an owner, plus what we learned."""

    pid: int
    uuid: bytes
    name: str
    id: int
    start_time: Optional[int] = None
    connected: int = 0               # number of its own (peer pid == owner pid) connections
    pin: Optional[int] = None        # pidfd of the process itself, taken while its own connection is open
    first_seen: float = field(default_factory=time.time)
    journaled: bool = False          # an "own" record is in the current journal

    @property
    def uuid_str(self) -> str:
        return fmt_uuid(self.uuid)

    def to_json(self) -> dict:
        return {"pid": self.pid, "uuid": self.uuid_str, "name": self.name, "id": self.id,
                "start_time": self.start_time}

    @classmethod
    def from_json(cls, d: dict) -> "OwnerInfo":
        return cls(d["pid"], bytes.fromhex(d["uuid"].replace("-", "")), d["name"], d["id"], d.get("start_time"))
