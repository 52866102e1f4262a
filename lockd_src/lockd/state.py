# SPDX-License-Identifier: GPL-3.0-or-later
"""What the daemon holds, and how it is written down.

:class:`DaemonState` is the explicit state object (as uvicorn's
``ServerState``): the lock table, the owners, the recorder, the connections
and the counters. The lock program, the admin operations, recovery and the
hand-over all work on it, so a cold start and a re-exec end in the same place.
Its lease operations change the lock table *and* write the change down, so no
caller can forget one of the two.

:class:`Recorder` writes down what the daemon holds: journal records and
systemd's fd store. "Journal before OK": an acquire is written before its reply
is built; if the journal cannot take it, the acquire is undone and answered with
an error, so nothing is locked that was not answered OK. Other records (a
release, an owner's exit) are written before the next reply or at the end of the
loop turn; if that fails the daemon goes on serving from memory, says so at
CRITICAL, shows the journal as degraded and retries.
"""
from __future__ import annotations

import bisect
import logging
import os
import time
from typing import Dict, List, Optional

from . import protocol as P
from .journal import Journal
from .lockspace import LockSpace, Locks, Resource
from .owners import OwnerInfo, Owners
from .systemd import Notifier

log = logging.getLogger("lockd")

RETRY_EVERY = 1.0            # seconds between attempts to write a degraded journal
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Recorder:
    """The journal and the fd store, kept in step with the lock table."""

    def __init__(self, journal: Optional[Journal], notifier: Notifier, fdstore: bool) -> None:
        self.journal = journal
        self.notifier = notifier
        self.fdstore = fdstore
        self.fd_seq = 0
        self.degraded: Optional[str] = None       # why the journal is behind, while it is
        self.degraded_since: Optional[float] = None
        self.write_failures = 0
        self.loop = None
        self.locks: Optional[Locks] = None
        self.owners: Optional[Owners] = None
        self._retry = None

    def bind(self, loop, locks: Locks, owners: Owners) -> None:
        self.loop = loop
        self.locks = locks
        self.owners = owners

    @property
    def active(self) -> bool:
        return self.journal is not None and self.journal.is_open

    # -- records --------------------------------------------------------------

    def lockspace_added(self, key: str) -> None:
        if self.active:
            self.journal.append({"t": "ls", "key": key})

    def owner_changed(self, info: OwnerInfo) -> None:
        if self.active:
            self.journal.append(dict(info.to_json(), t="own"))
            info.journaled = True

    def acquired(self, res: Resource, info: OwnerInfo) -> None:
        """Write the new entry (the last of ``res.owners``) now. Raises the
        libvirt-style error to answer with when the journal cannot take it;
        the caller then undoes the acquire."""
        new = res.fdname is None
        if new:
            self.fd_seq += 1
            res.fdname = "lease-%d" % self.fd_seq
        j = self.journal
        if self.active:
            mark = j.mark()
            own_record = not info.journaled
            if own_record:
                j.append(dict(info.to_json(), t="own"))
            j.acq(res.lockspace.key, res.name, res.path, res.flags, info.pid, res.since.get(info.pid, 0.0),
                  res.fdname, res.dev, res.ino)
            try:
                j.commit(mark)
            except OSError as e:
                if new:
                    res.fdname = None
                self._failed(e)
                raise P.err_system("Unable to save lease state to %s" % j.path, e) from None
            info.journaled = True
            self._written()
        if new and self.fdstore:
            self.notifier.fdstore(res.fd, res.fdname)
        if self.active and j.lines > 2 * self._live() + 4096:
            self.compact()

    def released(self, res: Resource, pid: int) -> None:
        """One owner's entries of ``res`` went; the resource too if it is closed."""
        gone = res.fd < 0
        if gone and self.fdstore and res.fdname:
            self.notifier.fdstore_remove(res.fdname)
        if self.active:
            if gone:
                self.journal.gone(res.lockspace.key, res.name)
            else:
                self.journal.rel(res.lockspace.key, res.name, pid)

    # -- writing --------------------------------------------------------------

    def flush(self) -> None:
        """Write pending records (before any reply; at the end of each turn)."""
        j = self.journal
        if j is None or not (j.pending or j.tampered):
            return
        try:
            j.flush()
        except OSError as e:
            self._failed(e)
            return
        self._written()
        if j.tampered:
            log.critical("journal %s was truncated or replaced while in use: rewriting it from memory", j.path)
            self.compact()

    def _failed(self, e: OSError) -> None:
        self.write_failures += 1
        if self.degraded is None:
            self.degraded_since = time.time()
            log.critical("cannot write the lease journal %s: %s. Serving from memory: every lease is still "
                         "held, but a daemon crash now would lose the unwritten ones; free space in %s "
                         "(or make it writable)", self.journal.path, e.strerror, os.path.dirname(self.journal.path))
        self.degraded = "%s: %s" % (self.journal.path, e.strerror)
        if self.loop is not None and self._retry is None:
            self._retry = self.loop.call_later(RETRY_EVERY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self.degraded is not None:
            self.flush()
            if self.degraded is not None and self._retry is None and self.loop is not None:
                self._retry = self.loop.call_later(RETRY_EVERY, self._retry_now)

    def _written(self) -> None:
        if self.degraded is not None and not self.journal.pending:
            log.warning("lease journal %s is writable again: %d write failure(s) since %s, nothing lost",
                        self.journal.path, self.write_failures, time.ctime(self.degraded_since))
            self.degraded = None
            self.degraded_since = None

    def _live(self) -> int:
        return self.locks.entries + len(self.locks.lockspaces) + len(self.owners.infos)

    def snapshot_records(self) -> List[dict]:
        locks, owners = self.locks, self.owners
        recs: List[dict] = [{"t": "ls", "key": k} for k in locks.lockspaces if k]
        for pid, info in owners.infos.items():
            info.journaled = locks.holds(pid)
            if info.journaled:
                recs.append(dict(info.to_json(), t="own"))
        for res in locks.resources():
            for owner in res.owners:
                recs.append({"t": "acq", "ls": res.lockspace.key, "name": res.name, "path": res.path,
                             "flags": res.flags, "owner": owner, "since": res.since.get(owner, 0.0),
                             "fdname": res.fdname, "dev": res.dev, "ino": res.ino})
        recs.append({"t": "seq", "fdseq": self.fd_seq})
        return recs

    def compact(self) -> bool:
        """Rewrite the journal as a snapshot of memory; False if that failed
        (the old journal and its pending records are kept)."""
        if self.journal is None:
            return True
        try:
            self.journal.rewrite(self.snapshot_records())
        except OSError as e:
            log.warning("cannot compact the lease journal %s: %s; appending to the old one",
                        self.journal.path, e.strerror)
            self._failed(e)
            return False
        self._written()
        return True

    def status(self) -> dict:
        j = self.journal
        return {"state": "degraded" if self.degraded else "ok", "path": j.path if j else None,
                "reason": self.degraded, "since": self.degraded_since,
                "pending_records": len(j.pending) if j else 0, "write_failures": self.write_failures}


class Histogram:
    """Request latencies in fixed buckets (cumulative in :meth:`snapshot`)."""

    def __init__(self, bounds=LATENCY_BUCKETS) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> dict:
        cum, total = [], 0
        for c in self.counts[:-1]:
            total += c
            cum.append(total)
        return {"buckets": self.bounds, "counts": cum, "sum": round(self.sum, 6),
                "count": total + self.counts[-1]}


class DaemonState:
    """Everything the daemon holds and knows; see the module docstring."""

    def __init__(self, cfg: dict, locks: Locks, recorder: Recorder, loop, privileged: bool = True) -> None:
        self.cfg = cfg
        self.locks = locks
        self.recorder = recorder
        self.loop = loop
        self.privileged = privileged
        self.owners = Owners(loop, locks.holds, self.release_owner)
        self.owners.on_new_identity = recorder.owner_changed
        recorder.bind(loop, locks, self.owners)
        self.clients: Dict[int, object] = {}      # fd -> lock-socket connection
        self.admins: Dict[int, object] = {}       # fd -> admin connection
        self.waiting = 0                          # clients over max_clients, waiting for a slot
        self.next_client_id = 1
        self.started = time.time()
        self.socket_activated = False
        self.recovered = 0
        self.lost: List[dict] = []
        self.requests = [0] * P.PROC_TABLE_SIZE
        self.request_errors = 0
        self.latency = Histogram()
        self.storage = None                       # lockd.storage.Storage: network filesystems' workers
        self.watchdog = None                      # lockd.watchdog.Watchdog: leases on network filesystems
        self.offload = None                       # lockd.offload.Offload: procedures with storage in workers

    def peer_allowed(self, uid: int) -> bool:
        """Root only (an unprivileged daemon serves its own uid)."""
        return uid == 0 if self.privileged else uid == os.geteuid()

    # -- lease operations: the lock table and the record of it, together -------

    def create_lockspace(self, key: str) -> LockSpace:
        new = key not in self.locks.lockspaces
        ls = self.locks.create_lockspace(key)
        if new:
            self.recorder.lockspace_added(key)
        return ls

    def new_lockspace(self, key: str) -> None:
        if self.locks.new_lockspace(key) is not None:
            self.recorder.lockspace_added(key)

    def acquire(self, ls: LockSpace, name: str, info: OwnerInfo, flags: int,
                when: Optional[float] = None, opened=None) -> Resource:
        if opened is None:
            res = self.locks.acquire(ls, name, info.pid, flags, when)
        else:   # opened and locked by a storage worker (lockd.offload)
            res = self.locks.acquire(ls, name, info.pid, flags, when, opened=opened)
        try:
            self.recorder.acquired(res, info)
        except Exception:
            self.locks.release(ls, name, info.pid)   # nothing is locked that was not answered OK
            raise
        self.owners.ensure_watched(info.pid)
        return res

    def release(self, ls: LockSpace, name: str, pid: int) -> Resource:
        res = self.locks.release(ls, name, pid)
        self.recorder.released(res, pid)
        return res

    def release_owner(self, pid: int) -> List[Resource]:
        touched = self.locks.release_owner(pid)
        for res in touched:
            self.recorder.released(res, pid)
        return touched

    def remove(self, res: Resource) -> List[int]:
        owners = self.locks.remove_resource(res)
        for pid in owners:
            self.recorder.released(res, pid)
        return owners

    # -- facts ----------------------------------------------------------------

    def status(self) -> dict:
        by_proc = {P.PROC_NAMES[i]: n for i, n in enumerate(self.requests) if i in P.PROC_NAMES}
        return {
            "pid": os.getpid(), "started": self.started, "uptime": round(time.time() - self.started, 3),
            "lock_type": self.locks.lock_type, "socket_activated": self.socket_activated,
            "fdstore": self.recorder.fdstore, "clients": len(self.clients), "max_clients": self.cfg["max_clients"],
            "admin_clients": len(self.admins), "admin_max_clients": self.cfg["admin_max_clients"],
            "owners": len(self.locks.by_owner), "leases": self.locks.count(),
            "lockspaces": len(self.locks.lockspaces), "recovered_leases": self.recovered,
            "lost_leases": list(self.lost),
            "requests": {"total": sum(self.requests), "errors": self.request_errors, "by_proc": by_proc},
            "latency": self.latency.snapshot(),
            "journal": self.recorder.status(),
            "stalled_lockspaces": self.storage.stalled() if self.storage is not None else [],
            "storage": self.storage.summary() if self.storage is not None else [],
            "fencing": self.watchdog.status() if self.watchdog is not None else None,
        }
