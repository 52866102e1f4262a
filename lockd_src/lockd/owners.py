# SPDX-License-Identifier: GPL-3.0-or-later
"""Lock owners (the QEMU processes): who they are, when they go, and the kill sequence.

libvirt identifies a lock owner by pid alone. A pid is reused after the
process exits, so the daemon also records the start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) and treats a pid whose start time
changed as a different, dead owner. An owner that registered on its own
connection is pinned with a pidfd, so the kill sequence can never hit a
process that reused its pid.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from . import protocol as P
from .loop import EPOLLIN

log = logging.getLogger("lockd")

# kill sequence for an owner whose own connection closed while it held leases
# (spec 4.6): SIGTERM now, SIGKILL after 1.6 s, give up after 3 s.
KILL_AFTER = 1.6
GIVE_UP_AFTER = 3.0
SWEEP_EVERY = 60.0           # forget owners without leases or connections this often


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

    def same(self, owner: P.Owner) -> bool:
        """Is ``owner`` (as REGISTER sent it) this very owner?"""
        return self.uuid == owner.uuid and self.name == owner.name and self.id == owner.id


class Owners:
    """Every owner the daemon knows, with the pidfds that watch them.

    It takes what it needs as arguments: the event loop (handlers, timers),
    ``holds(pid)`` (does the pid hold a lease?) and ``release(pid)`` (drop every
    lease of the pid; returns what was dropped). ``on_new_identity(info)`` is
    called when an owner that holds leases changes identity (the journal
    records it).
    """

    def __init__(self, loop, holds: Callable[[int], bool], release: Callable[[int], list]) -> None:
        self.loop = loop
        self.holds = holds
        self.release = release
        self.on_new_identity: Callable[[OwnerInfo], None] = lambda info: None
        self.infos: Dict[int, OwnerInfo] = {}
        self.watches: Dict[int, int] = {}          # pidfd -> pid (connectionless owners)
        self.watch_of: Dict[int, int] = {}         # pid -> pidfd
        self.kills: Dict[int, int] = {}            # pid -> pidfd of a running kill sequence
        self.sweep_timer = loop.call_later(SWEEP_EVERY, self.sweep)

    def get(self, pid: int) -> Optional[OwnerInfo]:
        return self.infos.get(pid)

    # -- identity -----------------------------------------------------------

    def identify(self, owner: P.Owner) -> OwnerInfo:
        """The record for ``owner``: the known one if it is the same owner,
        else a new one (a pid re-registered by another domain)."""
        info = self.infos.get(owner.pid)
        if info is not None and info.same(owner):
            return info
        started = info.start_time if info is not None else start_time(owner.pid)
        connected = info.connected if info is not None else 0
        if info is not None and info.pin is not None:
            os.close(info.pin)
        info = OwnerInfo(owner.pid, owner.uuid, owner.name, owner.id, started, connected)
        self.infos[owner.pid] = info
        if self.holds(owner.pid):
            self.on_new_identity(info)
        return info

    def own_connection_opened(self, owner: P.Owner) -> OwnerInfo:
        """REGISTER on a connection whose peer *is* the owner (QEMU's own)."""
        info = self.identify(owner)
        info.connected += 1
        if info.pin is None:
            # pin that very process, so a later kill sequence can never hit a
            # newcomer that reused the pid
            info.pin = pidfd_open(owner.pid)
        self.unwatch(owner.pid)
        return info

    def for_acquire(self, owner: P.Owner) -> OwnerInfo:
        info = self.identify(owner)
        if not info.connected and not self.holds(owner.pid):
            info.start_time = start_time(owner.pid)   # the pid may have been reused meanwhile
        return info

    def adopt(self, info: OwnerInfo) -> None:
        """Put back a record (recovery, hand-over)."""
        self.infos[info.pid] = info

    # -- going away ---------------------------------------------------------

    def own_connection_closed(self, pid: int, release: bool = True) -> None:
        """The owner's own connection closed. With ``release`` (an EOF, not a
        re-register or a daemon stop) its leases go and it is killed."""
        info = self.infos.get(pid)
        if info is not None and info.connected > 0:
            info.connected -= 1
        if not release:
            return
        touched = self.release(pid)
        if touched:
            log.info("owner pid %d closed its connection: released %d leases", pid, len(touched))
            self.start_kill(pid)
        self.forget_if_idle(pid)

    def forget_if_idle(self, pid: int) -> None:
        # the record itself is kept for a while (cheap re-use by the next
        # lease of the same owner) and dropped by sweep()
        info = self.infos.get(pid)
        if info is not None and not info.connected and not self.holds(pid):
            self.unwatch(pid)

    def sweep(self) -> None:
        for pid in [p for p, i in self.infos.items() if not i.connected and not self.holds(p)]:
            info = self.infos.pop(pid)
            if info.pin is not None:
                os.close(info.pin)
            self.unwatch(pid)
        self.sweep_timer = self.loop.call_later(SWEEP_EVERY, self.sweep)

    # -- pidfd watches ------------------------------------------------------

    def ensure_watched(self, pid: int) -> None:
        """An owner without its own connection (adopted, recovered, or a QEMU
        that closed its inherited socket early) is released when it exits."""
        info = self.infos.get(pid)
        if info is not None and not info.connected and pid not in self.watch_of and pid <= PID_MAX:
            pidfd = pidfd_open(pid)
            if pidfd is None:
                return
            self.watch_of[pid] = pidfd
            self.watches[pidfd] = pid
            self.loop.add_handler(pidfd, EPOLLIN, self._on_exit)

    def unwatch(self, pid: int) -> None:
        pidfd = self.watch_of.pop(pid, None)
        if pidfd is not None:
            self.watches.pop(pidfd, None)
            self.loop.remove_handler(pidfd)
            os.close(pidfd)

    def _on_exit(self, pidfd: int, ev: int) -> None:
        pid = self.watches.get(pidfd)
        if pid is None:
            return
        self.unwatch(pid)
        touched = self.release(pid)
        log.info("owner pid %d exited: released %d leases", pid, len(touched))
        self.forget_if_idle(pid)

    # -- the kill sequence --------------------------------------------------

    def pidfd_of(self, pid: int) -> Optional[int]:
        """A pidfd of the very process that registered as ``pid`` (the caller
        closes it), or None if that process is gone."""
        if pid <= 1:
            return None
        info = self.infos.get(pid)
        if info is not None and info.pin is not None:
            return os.dup(info.pin)      # the very process that registered
        pidfd = pidfd_open(pid)
        if pidfd is None:
            return None              # already gone
        # A pidfd opened now pins whatever process has this pid *now*. If
        # the owner died and its pid was reused meanwhile, that is someone
        # else: compare the start time recorded at registration.
        started = info.start_time if info is not None else None
        if started is not None and start_time(pid) != started:
            log.info("owner pid %d already exited (the pid now belongs to another process): "
                     "nothing to signal", pid)
            os.close(pidfd)
            return None
        return pidfd

    def start_kill(self, pid: int) -> None:
        if pid <= 1 or pid in self.kills:
            return
        pidfd = self.pidfd_of(pid)
        if pidfd is None:
            return
        log.info("killing owner pid %d: its connection closed while it held leases", pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            os.close(pidfd)
            return
        except OSError as e:
            log.warning("Failed to kill off pid %d: %s", pid, e.strerror)
        self.kills[pid] = pidfd
        self.loop.add_handler(pidfd, EPOLLIN, lambda fd, ev: self._kill_done(pid, fd))
        self.loop.call_later(KILL_AFTER, self._kill_hard, pid, pidfd)
        self.loop.call_later(GIVE_UP_AFTER, self._kill_done, pid, pidfd, True)

    def _kill_hard(self, pid: int, pidfd: int) -> None:
        if self.kills.get(pid) != pidfd:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass

    def _kill_done(self, pid: int, pidfd: int, timed_out: bool = False) -> None:
        if self.kills.get(pid) != pidfd:
            return
        if timed_out:
            log.error("Failed to kill off pid %d: still alive %.1f s after SIGTERM", pid, GIVE_UP_AFTER)
        del self.kills[pid]
        self.loop.remove_handler(pidfd)
        os.close(pidfd)

    def stop_all(self) -> None:
        """Close every watch and kill sequence (before a re-exec; the new
        image watches again)."""
        for pid, pidfd in list(self.kills.items()):
            self._kill_done(pid, pidfd)
        for pid in list(self.watch_of):
            self.unwatch(pid)

    def watch_all(self) -> None:
        for pid in list(self.infos):
            if self.holds(pid):
                self.ensure_watched(pid)
