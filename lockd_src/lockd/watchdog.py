# SPDX-License-Identifier: GPL-3.0-or-later
"""The lease watchdog: probes of every network filesystem that holds a lease.

One :class:`Prober` thread per network filesystem (:mod:`lockd.storage`)
makes a round trip to the server every ``io_timeout / 4`` seconds, on its
own fds, so a hung call never blocks the event loop or the storage worker:

1. ``statvfs()`` of the mount: on NFS a ``FSSTAT``/``GETATTR`` that the client
   never answers from its caches, so it reaches the server (and blocks, on a
   hard mount, while the server is unreachable);
2. ``F_OFD_GETLK`` on a ``dup()`` of each lease fd (the same open file
   description, so our own lock is not a conflict): the NFS client asks the
   server (``LOCKT``) unless it holds a delegation; it reports a conflict when
   another host holds our byte (our lock was lost), or ``EIO``.

``fstat`` is not a probe: the NFS attribute cache answers it for seconds
without asking the server. Writing to a heartbeat file would reach the
server too, but would write into the users' directories (direct mode locks
the disk images themselves); the NFS test bed measures what each of these
really sends (issue 12).

The decisions are :mod:`lockd.leasewatch`'s; :mod:`lockd.fencing` carries
them out. A lease whose owners were paused is re-taken (``F_OFD_SETLK`` again
on its fd, a no-op for a lock the server still holds for us) once its server
answers within its lease time; only then may ``virtlockctl resume`` go on.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, Optional

from .fencing import Fencer
from .filelock import F_RDLCK, F_UNLCK, F_WRLCK, get_lock
from .leasewatch import CONFLICT, FENCED, HELD, LOST, OK, STATES, Decider
from .lockspace import SHARED, Resource
from .storage import Storage, Store
from .workers import ABANDONED, Call

log = logging.getLogger("lockd")

TICK = 0.5                   # seconds between two looks at the probes' deadlines
KILL_MARGIN = 0.5            # seconds a SIGKILL and the owner's exit may take


def wall(mono: Optional[float]) -> Optional[float]:
    return None if mono is None else round(time.time() - (time.monotonic() - mono), 3)


class Prober:
    """The probe thread of one network filesystem."""

    def __init__(self, store: Store, interval: float, done) -> None:
        self.store = store
        self.path = store.mount
        self.interval = interval
        self.done = done
        self.leases: tuple = ()             # ((res, dup fd, lock kind), ...): replaced by the loop
        self.closing: list = []             # dup fds the loop dropped; closed here between rounds
        self.inflight: Optional[float] = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lockd-probe %s" % self.path, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            started = self.inflight = time.monotonic()
            err = None
            results = []
            try:
                os.statvfs(self.path)
            except OSError as e:
                err = e.errno
            if err is None:
                for res, fd, kind in self.leases:
                    try:
                        results.append((res, OK if get_lock(fd, kind, "ofd") == F_UNLCK else CONFLICT))
                    except OSError as e:
                        results.append((res, e.errno))
            self.inflight = None
            self.done(self, started, time.monotonic(), err, results)
            while self.closing:
                os.close(self.closing.pop())
        while self.closing:
            os.close(self.closing.pop())


class Watchdog:
    """Probers, the deadline clock and fencing, for every lease on a network filesystem."""

    def __init__(self, state, storage: Storage, fencer: Fencer, io_timeout: float, lease_time: float) -> None:
        self.state = state
        self.storage = storage
        self.loop = storage.loop
        self.fencer = fencer
        self.io_timeout = float(io_timeout)
        self.interval = self.io_timeout / 4
        self.lease_time = float(lease_time)
        self.decider = Decider(self.io_timeout, self.interval, self.lease_time)
        self.probers: Dict[int, Prober] = {}
        self.dups: Dict[Resource, int] = {}
        self.retaking: set = set()
        self.ofd = state.locks.lock_type == "ofd"
        storage.watcher = self
        self.timer = self.loop.call_later(TICK, self._tick)
        budget = self.fence_within()
        if budget > self.lease_time / 2:
            log.warning("fencing budget: a lost NFS server is noticed and its VMs fenced within %.1f s "
                        "(io_timeout %g s + probe interval %g s + %g s), more than half of nfs_lease_time "
                        "(%g s): lower io_timeout, or raise the server's lease time", budget, self.io_timeout,
                        self.interval, TICK + KILL_MARGIN, self.lease_time)

    def fence_within(self) -> float:
        """Seconds from the server's last answer to the owners' kill, at most."""
        return self.io_timeout + self.interval + TICK + KILL_MARGIN

    # -- what is watched (called by storage and offload on the loop) -------------------------

    def watch(self, res: Resource, store: Store) -> None:
        if res in self.dups or res.fd < 0:
            return
        rec = self.fencer.remembered(res)
        self.decider.add(res, store.dev, time.monotonic(), rec["state"] if rec else HELD,
                         rec["reason"] if rec else "")
        self.dups[res] = os.dup(res.fd) if self.ofd else -1
        prober = self.probers.get(store.dev)
        if prober is None:
            prober = self.probers[store.dev] = Prober(store, self.interval,
                                                      lambda *a: self.storage.completions.post(self._probed, *a))
        self._publish(prober)

    def forget(self, res: Resource) -> None:
        if res not in self.dups:
            return
        self.decider.remove(res)
        fd = self.dups.pop(res)
        prober = self.probers.get(res.dev)
        if prober is not None:
            if fd >= 0:
                prober.closing.append(fd)
            self._publish(prober)
            if not prober.leases:
                prober.stopping.set()
                del self.probers[res.dev]
        elif fd >= 0:
            os.close(fd)

    def _publish(self, prober: Prober) -> None:
        # POSIX locks (fd -1): a dup closed later would drop the lock; the server alone is probed
        prober.leases = tuple((r, fd, F_RDLCK if r.flags & SHARED else F_WRLCK)
                              for r, fd in self.dups.items() if r.dev == prober.store.dev and fd >= 0)

    def state_of(self, res: Resource) -> str:
        return self.decider.state(res)

    # -- results and the clock -----------------------------------------------------------------

    def _probed(self, prober: Prober, started: float, ended: float, err, results) -> None:
        if self.probers.get(prober.store.dev) is not prober:
            return
        results = [(r, what) for r, what in results if r in self.dups]
        self._apply(self.decider.probe_done(prober.store.dev, started, ended, err, results))
        if err is None:
            self._retake(prober.store, dict(results))

    def _tick(self) -> None:
        self.timer = self.loop.call_later(TICK, self._tick)
        stalled = {}
        for dev, prober in self.probers.items():
            s = self.decider.stores.get(dev)
            if s is not None:
                s.inflight = prober.inflight
            waited = prober.store.stalled_for()
            if waited is not None:
                stalled[dev] = waited
        self._apply(self.decider.tick(time.monotonic(), stalled))

    def _apply(self, decisions) -> None:
        for d in decisions:
            res = d.lease
            s = self.decider.stores.get(self.decider.leases[res].store) if res in self.decider.leases else None
            store = self.storage.stores.get(res.dev)
            last = s.last_ok if s is not None else None
            timeline = {"last_answer": wall(last), "decided": wall(d.at),
                        "deadline": wall(last + self.io_timeout + self.interval) if last is not None else None,
                        "server_may_grant_elsewhere": wall(last + self.lease_time) if last is not None else None}
            if self.fencer.decide(res, d, store.label if store else "?", timeline) == FENCED and d.old != FENCED:
                self.decider.mark(res, FENCED, d.reason, time.monotonic())

    def _retake(self, store: Store, results: dict) -> None:
        """Paused owners' leases whose server answered in time: take the lock again."""
        s = self.decider.stores.get(store.dev)
        if s is None or s.last_gap >= self.lease_time:
            return
        for res in self.decider.on_store(store.dev):
            w = self.decider.leases[res]
            if w.state != FENCED or res in self.retaking or results.get(res, OK) != OK \
                    or not any(pid in self.fencer.paused for pid in res.owners):
                continue
            self.retaking.add(res)
            store.submit(Call(store.files.reassert, (res.fd, res.flags), lambda c, r=res: self._retaken(c, r),
                              "re-take of %s" % res.path), lambda c: None)

    def _retaken(self, call: Call, res: Resource) -> None:
        self.retaking.discard(res)
        if res not in self.dups or call.state == ABANDONED:
            return
        if call.error is None:
            d = self.decider.mark(res, HELD, "re-taken after its server answered within its lease time",
                                  time.monotonic())
        else:
            d = self.decider.mark(res, LOST, "could not be re-taken: %s" % call.error, time.monotonic())
        if d is not None:
            self._apply([d])

    def close(self) -> None:
        self.timer.cancel()
        for p in self.probers.values():
            p.stopping.set()

    def status(self) -> dict:
        counts = dict.fromkeys(STATES, 0)
        for w in self.decider.leases.values():
            counts[w.state] += 1
        return dict(self.fencer.status(), io_timeout=self.io_timeout, probe_interval=self.interval,
                    nfs_lease_time=self.lease_time, fence_within=self.fence_within(), watched=counts)
