# SPDX-License-Identifier: GPL-3.0-or-later
"""Fencing: what happens to a VM whose lease is at risk or lost.

``on_lockfailure`` in ``virtlockd.conf`` (the values of libvirt's domain XML
``<on_lockfailure>``, which libvirt's own lockd plugin ignores):

``poweroff``  SIGKILL every owner of the lease, through the pidfd that pins
              the very process that registered (a reused pid is never hit).
              The default: the VM stops writing before the NFS server can
              give its disk to another host (docs/design.md, "Fencing").
``pause``     SIGSTOP them. They are listed (``status`` -> ``fencing.paused``)
              and ``virtlockctl resume`` continues them, but only once every
              lease of theirs is ``held`` again (re-taken after the server
              answered within its lease time).
``ignore``    log only (the measured window with two writers is yours).

Every decision is logged at CRITICAL with the disk, the owner, the reason and
the timeline, kept in ``status`` and appended to ``<state_dir>/fencing.jsonl``
(read back at start, so a restarted daemon still reports it and still knows
which VMs it stopped).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import time
from typing import Dict, Optional

from .journal import write_atomic
from .leasewatch import AT_RISK, FENCED, HELD, LOST, Decision
from .lockspace import Resource
from .owners import Owners, alive, start_time

log = logging.getLogger("lockd")

FILE = "fencing.jsonl"
KEEP = 200                   # decisions kept in memory and in the file
SIGNALS = {"poweroff": signal.SIGKILL, "pause": signal.SIGSTOP}


class Fencer:
    """Carries out ``on_lockfailure`` and remembers what it did."""

    def __init__(self, owners: Owners, policy: str, path: Optional[str]) -> None:
        self.owners = owners
        self.policy = policy
        self.path = path
        self.history: collections.deque = collections.deque(maxlen=KEEP)
        self.paused: Dict[int, dict] = {}        # pid -> what we know of the VM we stopped
        self.states: Dict[tuple, dict] = {}      # (lockspace, resource) -> last non-held state record

    # -- the file -------------------------------------------------------------------

    def load(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("cannot read %s: %s; fencing history starts empty", self.path, e.strerror)
            return
        for line in lines:
            try:
                rec = json.loads(line) if line.strip() else None
            except ValueError:
                continue          # a torn line
            if not isinstance(rec, dict):
                continue
            self._fold(rec)
        for pid, p in list(self.paused.items()):
            if not alive(pid, p.get("start_time")):
                del self.paused[pid]

    def _fold(self, rec: dict) -> None:
        t = rec.get("t")
        if t == "decision":
            self.history.append(rec)
            key = (rec.get("lockspace"), rec.get("resource"))
            if rec.get("state") == HELD:
                self.states.pop(key, None)
            else:
                self.states[key] = rec
        elif t == "paused":
            self.paused[rec["pid"]] = rec
        elif t == "resumed":
            self.paused.pop(rec.get("pid"), None)

    def _append(self, rec: dict) -> None:
        self._fold(rec)
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, ("\n" + json.dumps(rec, separators=(",", ":"))).encode())
            finally:
                os.close(fd)
            if os.path.getsize(self.path) > 1 << 20:
                self._compact()
        except OSError as e:
            log.error("cannot record a fencing decision in %s: %s", self.path, e.strerror)

    def _compact(self) -> None:
        recs = list(self.history) + list(self.paused.values())
        write_atomic(self.path, "\n".join(json.dumps(r, separators=(",", ":")) for r in recs).encode(),
                     fsync=False)

    def remembered(self, res: Resource) -> Optional[dict]:
        """The last recorded non-held state of this lease (it survives restarts)."""
        rec = self.states.get((res.lockspace.key, res.name))
        if rec is None or rec.get("at", 0) < min(res.since.values(), default=0):
            return None           # taken again since then: that was another lease
        return rec

    # -- decisions --------------------------------------------------------------------

    def decide(self, res: Resource, d: Decision, store: str, timeline: dict) -> Optional[str]:
        """Act on one decision; returns FENCED when owners were signalled."""
        pids = list(dict.fromkeys(res.owners))
        owners = [self._owner(pid) for pid in pids]
        action = "none"
        fenced = False
        if d.new in (AT_RISK, LOST):
            action = self.policy
            if self.policy in SIGNALS:
                for o in owners:
                    fenced |= self._signal(o, SIGNALS[self.policy], res)
                if not fenced:
                    action += " (no owner left to signal)"
        state = FENCED if fenced else d.new
        rec = {"t": "decision", "at": round(time.time(), 3), "lockspace": res.lockspace.key,
               "resource": res.name, "path": res.path, "store": store, "old": d.old, "state": state,
               "verdict": d.new, "reason": d.reason, "action": action, "owners": owners, "timeline": timeline}
        if d.new in (AT_RISK, LOST):
            log.critical("LEASE %s: disk %s (lockspace %r, resource %r) on %s, owner(s) %s: %s. Action: %s "
                         "(on_lockfailure = %s). Timeline: %s", d.new.upper().replace("_", " "), res.path,
                         res.lockspace.key, res.name, store,
                         ", ".join("%s pid %d" % (o["name"] or "?", o["pid"]) for o in owners) or "none",
                         d.reason, action, json.dumps(timeline, sort_keys=True), self.policy)
        else:
            log.warning("lease %s (lockspace %r) on %s is %s again: %s", res.path, res.lockspace.key, store,
                        d.new, d.reason)
        self.history.append(rec)
        self._append(rec)
        return FENCED if fenced else None

    def _owner(self, pid: int) -> dict:
        info = self.owners.get(pid)
        return {"pid": pid, "name": info.name if info else None, "uuid": info.uuid_str if info else None,
                "start_time": info.start_time if info else start_time(pid)}

    def _signal(self, owner: dict, sig: int, res: Resource) -> bool:
        pid = owner["pid"]
        if sig == signal.SIGSTOP and pid in self.paused:
            return True
        pidfd = self.owners.pidfd_of(pid)
        if pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except OSError as e:
            log.error("fencing: cannot send signal %d to owner pid %d: %s", sig, pid, e.strerror)
            return False
        finally:
            os.close(pidfd)
        if sig == signal.SIGSTOP:
            self._append(dict(owner, t="paused", since=round(time.time(), 3), lockspace=res.lockspace.key,
                              resource=res.name))
        return True

    # -- resume ---------------------------------------------------------------------------

    def resume(self, pid: int, leases_held: bool) -> dict:
        """SIGCONT a VM we paused, if every lease of it is held again."""
        p = self.paused.get(pid)
        if p is None:
            raise LookupError("pid %d was not paused by lockd" % pid)
        if not leases_held:
            raise PermissionError("pid %d still has leases that are not held (at risk, lost or not re-taken); "
                                  "it stays stopped. Stop that VM instead, or wait until its storage answers" % pid)
        pidfd = self.owners.pidfd_of(pid)
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            finally:
                os.close(pidfd)
        self._append({"t": "resumed", "pid": pid, "at": round(time.time(), 3)})
        log.warning("fencing: owner pid %d (%s) resumed: its leases are held again", pid, p.get("name"))
        return p

    def status(self) -> dict:
        return {"policy": self.policy, "paused": list(self.paused.values()), "decisions": list(self.history)[-50:]}
