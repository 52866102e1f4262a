# SPDX-License-Identifier: GPL-3.0-or-later
"""The lease watchdog's decisions, on their own: no threads, no clock, no I/O.

:class:`Decider` is fed what the probes saw (:meth:`probe_started`,
:meth:`probe_done`) and the time (:meth:`tick`), and says which leases change
state and why. :mod:`lockd.watchdog` runs the probes and the clock and
:mod:`lockd.fencing` acts on the decisions. tests/unit/test_leasewatch.py
drives it with a fake clock.

A lease on a network filesystem is

``held``      the server answered within the deadline and nobody else holds our byte;
``at_risk``   no probe round trip has succeeded for ``io_timeout + interval``
              seconds, or one has been waiting for ``io_timeout`` (the server
              may be unreachable: in ``nfs_lease_time`` it may grant our lock
              to another host);
``lost``      the server said so (``EIO``), or ``F_OFD_GETLK`` shows someone
              else holding our byte, or the server was silent for longer than
              its lease time (it may have granted the lock elsewhere meanwhile,
              and we cannot know);
``fenced``    its owners were killed or stopped because of that (set by
              :mod:`lockd.fencing`).

``at_risk`` goes back to ``held`` only when a probe succeeds again less than
``nfs_lease_time`` after the last success before the silence, and the lock
itself is still ours. ``lost`` never goes back.
"""
from __future__ import annotations

import errno
from typing import Dict, Hashable, List, NamedTuple, Optional, Tuple

HELD, AT_RISK, LOST, FENCED = "held", "at_risk", "lost", "fenced"
STATES = (HELD, AT_RISK, LOST, FENCED)
LOST_ERRNOS = frozenset((errno.EIO, errno.ESTALE, errno.ENOLCK))

# what a probe saw for one lease
OK, CONFLICT = "ok", "conflict"


class Decision(NamedTuple):
    """A lease changes state."""

    lease: Hashable
    old: str
    new: str
    reason: str
    at: float


class StoreWatch:
    """The probe history of one filesystem."""

    __slots__ = ("key", "last_ok", "inflight", "silent_since", "last_gap")

    def __init__(self, key: Hashable, now: float) -> None:
        self.key = key
        self.last_ok = now              # start of the last round trip that succeeded
        self.inflight: Optional[float] = None
        self.silent_since: Optional[float] = None   # last_ok when the store went at risk
        self.last_gap = 0.0             # seconds between the last two successes (the server's view of us)


class LeaseWatch:
    """One watched lease: its store, state and why."""

    __slots__ = ("store", "state", "reason", "since")

    def __init__(self, store: Hashable, now: float) -> None:
        self.store = store
        self.state = HELD
        self.reason = ""
        self.since = now


class Decider:
    """The watchdog's state machine (see the module docstring)."""

    def __init__(self, io_timeout: float, interval: float, lease_time: float) -> None:
        self.io_timeout = io_timeout
        self.interval = interval
        self.lease_time = lease_time
        self.stores: Dict[Hashable, StoreWatch] = {}
        self.leases: Dict[Hashable, LeaseWatch] = {}

    # -- what is watched ---------------------------------------------------------------

    def add(self, lease: Hashable, store: Hashable, now: float, state: str = HELD, reason: str = "") -> None:
        if store not in self.stores:
            self.stores[store] = StoreWatch(store, now)
        w = self.leases[lease] = LeaseWatch(store, now)
        w.state, w.reason = state, reason

    def remove(self, lease: Hashable) -> None:
        w = self.leases.pop(lease, None)
        if w is not None and not any(x.store == w.store for x in self.leases.values()):
            self.stores.pop(w.store, None)

    def state(self, lease: Hashable) -> str:
        w = self.leases.get(lease)
        return w.state if w is not None else HELD

    def on_store(self, store: Hashable) -> List[Hashable]:
        return [k for k, w in self.leases.items() if w.store == store]

    def mark(self, lease: Hashable, state: str, reason: str, now: float) -> Optional[Decision]:
        w = self.leases.get(lease)
        if w is None or w.state == state:
            return None
        d = Decision(lease, w.state, state, reason, now)
        w.state, w.reason, w.since = state, reason, now
        return d

    # -- what the probes saw -----------------------------------------------------------

    def probe_started(self, store: Hashable, now: float) -> None:
        s = self.stores.get(store)
        if s is not None:
            s.inflight = now

    def probe_done(self, store: Hashable, started: float, ended: float, err: Optional[int],
                   results: List[Tuple[Hashable, object]]) -> List[Decision]:
        """A probe round ended: ``err`` is the errno of the server round trip
        (None: answered); ``results`` are (lease, OK | CONFLICT | errno)."""
        s = self.stores.get(store)
        if s is None:
            return []
        s.inflight = None
        out: List[Decision] = []
        if err is not None:
            if err in LOST_ERRNOS:
                for lease in self.on_store(store):
                    self._to(out, lease, LOST, "the server answered %s" % errno.errorcode.get(err, err), ended)
            return out                     # any other error: no news; the deadline decides
        gap = ended - s.last_ok
        s.last_gap = gap
        was_silent = s.silent_since is not None
        s.last_ok = started
        s.silent_since = None
        for lease, what in results:
            if what == CONFLICT:
                self._to(out, lease, LOST, "F_OFD_GETLK shows another holder of our byte", ended)
            elif isinstance(what, int) and what in LOST_ERRNOS:
                self._to(out, lease, LOST, "the lock answered %s" % errno.errorcode.get(what, what), ended)
        if was_silent:
            for lease in self.on_store(store):
                w = self.leases[lease]
                if w.state not in (AT_RISK, FENCED):
                    continue
                if gap >= self.lease_time:
                    self._to(out, lease, LOST, "the server was silent for %.0f s, longer than its lease time "
                             "(%g s): it may have granted the lock elsewhere" % (gap, self.lease_time), ended)
                elif w.state == AT_RISK:
                    self._to(out, lease, HELD, "the server answers again after %.1f s (within its lease "
                             "time of %g s): the lock is still ours" % (gap, self.lease_time), ended)
        return out

    def tick(self, now: float, stalled: Optional[Dict[Hashable, float]] = None) -> List[Decision]:
        """The clock: leases on a silent filesystem go at risk. ``stalled``:
        stores whose storage calls are past their deadline (seconds waited)."""
        out: List[Decision] = []
        for key, s in self.stores.items():
            reason = None
            if s.inflight is not None and now - s.inflight >= self.io_timeout:
                reason = "a probe has waited %.1f s for the server (io_timeout %g s)" % (
                    now - s.inflight, self.io_timeout)
            elif now - s.last_ok >= self.io_timeout + self.interval:
                reason = "no probe answered for %.1f s (io_timeout %g s + probe interval %g s)" % (
                    now - s.last_ok, self.io_timeout, self.interval)
            elif stalled and key in stalled:
                reason = "a storage call has waited %.1f s (io_timeout %g s)" % (stalled[key], self.io_timeout)
            if reason is None:
                continue
            if s.silent_since is None:
                s.silent_since = s.last_ok
            for lease in self.on_store(key):
                if self.leases[lease].state == HELD:
                    self._to(out, lease, AT_RISK, reason, now)
        return out

    def _to(self, out: List[Decision], lease: Hashable, state: str, reason: str, now: float) -> None:
        w = self.leases[lease]
        if w.state == state or w.state == LOST or (w.state == FENCED and state != LOST):
            return          # lost is final; fenced moves only to lost
        d = self.mark(lease, state, reason, now)
        if d is not None:
            out.append(d)
