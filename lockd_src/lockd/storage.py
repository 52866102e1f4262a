# SPDX-License-Identifier: GPL-3.0-or-later
"""Which filesystem each lockspace and disk directory is on, and its worker.

A :class:`Store` is one filesystem (one ``st_dev``). On a network filesystem
(:mod:`lockd.fstype`) it has one :class:`~lockd.workers.Worker` thread that
runs every call on it in order, each with a deadline of ``io_timeout``
seconds; on a local one nothing changes: the calls stay on the event loop.

:class:`Storage` maps a directory to its store. A directory is looked up once:
from the mount table alone when its path lies under a network mount, else by a
``statfs`` + ``stat`` in the worker of the mount its path lies on (a symlink
may lead into a network filesystem, and then that first look could hang too).
The answers are cached and the cache is dropped when the mount table changes
(``/proc/self/mountinfo`` is watched with ``EPOLLPRI``). The fast path of a
local acquire is one set lookup (:attr:`Storage.local_dirs`).

A store whose running call is past its deadline is *stalled*: new calls on it
are refused at once (a hung worker is never given new work and never blocks
other filesystems, each of which has its own), clean-up calls still queue, and
``status`` lists it under ``stalled_lockspaces``.
"""
from __future__ import annotations

import logging
import os
import select
import time
from typing import Callable, Dict, List, Optional

from . import fstype, leasefile
from . import protocol as P
from .lockspace import LockSpace, Locks, Resource
from .storefiles import StoreFiles
from .workers import Call, Completions, Worker

log = logging.getLogger("lockd")

MODES = ("network", "all", "none")
Continuation = Callable[[Optional["Store"], Optional[Exception]], None]


class Store:
    """One filesystem: its mount, whether calls on it go to a worker, and that worker."""

    def __init__(self, storage: "Storage", dev: int, mount: str, fstype_name: str, network: bool) -> None:
        self.storage = storage
        self.dev = dev
        self.mount = mount
        self.fstype = fstype_name
        self.network = network
        self.worker: Optional[Worker] = None
        self.files = StoreFiles(storage.locks.lock_type)
        self.timeouts = 0            # calls that missed their deadline
        self.stalled_wall: Optional[float] = None     # time.time() the stalled call started

    def __repr__(self) -> str:
        return "<Store %s (%s)%s>" % (self.mount, self.fstype, " network" if self.network else "")

    @property
    def label(self) -> str:
        return "%s (%s)" % (self.mount, self.fstype)

    def submit(self, call: Call, deadline: Optional[Callable[[Call], None]] = None) -> Call:
        """Queue ``call``; ``deadline(call)`` runs on the loop if it is still
        queued or running ``io_timeout`` seconds from now."""
        if self.worker is None:
            self.worker = Worker("lockd-io %s" % self.mount, self.storage.completions)
        if deadline is not None:
            call.timer = self.storage.loop.call_later(self.storage.timeout, self._deadline, call, deadline)
        return self.worker.submit(call)

    def _deadline(self, call: Call, then: Callable[[Call], None]) -> None:
        if self.worker.abandon(call):
            self.timeouts += 1
            if self.stalled_wall is None and call.started is not None:
                self.stalled_wall = time.time() - (time.monotonic() - call.submitted)
                log.error("storage %s: a %s has not answered for %g s; new calls there are refused until it "
                          "answers", self.label, call.what, self.storage.timeout)
            then(call)

    def stalled_for(self) -> Optional[float]:
        """Seconds the running call has been waiting (since it was queued),
        once that is past the deadline."""
        w = self.worker
        since = w.running_since() if w is not None else None
        if since is None:
            if self.stalled_wall is not None:
                log.warning("storage %s answers again (it had stalled since %s)", self.label,
                            time.ctime(self.stalled_wall))
                self.stalled_wall = None
            return None
        waited = time.monotonic() - since
        return waited if waited >= self.storage.timeout else None

    def backlog(self) -> int:
        return self.worker.backlog() if self.worker is not None else 0

    def refuse_if_stalled(self, what: str) -> None:
        """Raise libvirt's error at once when this filesystem is stalled."""
        waited = self.stalled_for()
        if waited is not None:
            raise P.err_storage_stalled(what, self.mount, waited, self.backlog())


class Storage:
    """Directory -> :class:`Store`, the stores, the shared completion channel."""

    def __init__(self, loop, locks: Locks, io_timeout: float, mode: str = "network") -> None:
        if mode not in MODES:
            raise ValueError("storage_workers must be one of %s" % ", ".join(MODES))
        self.loop = loop
        self.locks = locks
        self.timeout = float(io_timeout)
        self.mode = mode
        self.completions = Completions(loop)
        self.mounts: List[fstype.Mount] = fstype.read_mounts()
        self.stores: Dict[int, Store] = {}
        self.dirs: Dict[str, Store] = {}
        self.local_dirs: set = set()              # the fast path: directories on local stores
        self.network_devs: set = set()
        self.waiting: Dict[str, List[Continuation]] = {}
        self.generation = 0
        self.capture: Optional[list] = None      # (store, call) of discards, while a release runs
        self._mountinfo_fd: Optional[int] = None
        self.watcher = None                       # lockd.watchdog.Watchdog, when leases are watched
        locks.on_discard = self.discard
        self._watch_mounts()

    # -- the mount table -----------------------------------------------------------

    def _watch_mounts(self) -> None:
        try:
            fd = os.open(fstype.MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            self.loop.add_handler(fd, select.EPOLLPRI, self._mounts_changed)
        except OSError:
            os.close(fd)
            return
        self._mountinfo_fd = fd

    def _mounts_changed(self, fd: int = -1, ev: int = 0) -> None:
        mounts = fstype.read_mounts()
        if mounts == self.mounts:
            return            # epoll reports the table once when first watched
        self.mounts = mounts
        self.generation += 1
        self.dirs.clear()
        self.local_dirs.clear()
        for store in self.stores.values():
            m = fstype.mount_of_dev(self.mounts, store.dev)
            if m is not None:
                store.mount, store.fstype = m.point, m.fstype
        log.debug("mount table changed: directories will be looked up again")

    def close(self) -> None:
        for store in self.stores.values():
            if store.worker is not None:
                store.worker.stop()
        if self._mountinfo_fd is not None:
            self.loop.remove_handler(self._mountinfo_fd)
            os.close(self._mountinfo_fd)
            self._mountinfo_fd = None
        self.completions.close()

    # -- stores --------------------------------------------------------------------

    def store_for(self, dev: int, mount: str, fstype_name: str, network: bool) -> Store:
        store = self.stores.get(dev)
        if store is None:
            network = self.mode == "all" or (network and self.mode == "network")
            store = self.stores[dev] = Store(self, dev, mount, fstype_name, network)
            if store.network:
                self.network_devs.add(dev)
                log.info("storage %s: calls there run in a worker thread with a %g s deadline",
                         store.label, self.timeout)
        return store

    def _store_of_mount(self, m: Optional[fstype.Mount]) -> Store:
        if m is None:
            return self.store_for(-1, "/", "?", False)
        return self.store_for(m.dev, m.point, m.fstype, fstype.is_network(None, m.fstype))

    def store_of_dev(self, dev: int) -> Optional[Store]:
        """The store of a file we hold (by its st_dev), from the mount table alone."""
        store = self.stores.get(dev)
        if store is None:
            m = fstype.mount_of_dev(self.mounts, dev)
            if m is not None:
                store = self._store_of_mount(m)
        return store

    @staticmethod
    def dir_of(ls: LockSpace, name: str) -> str:
        return ls.directory if ls.directory is not None else (name.rpartition("/")[0] or "/")

    # -- looking a directory up ---------------------------------------------------------

    def quick(self, directory: str) -> Optional[Store]:
        """``directory``'s store if it is known without touching any
        filesystem (cached, or under a network mount); else None: call
        :meth:`classify`."""
        store = self.dirs.get(directory)
        if store is None:
            lexical = self._store_of_mount(fstype.mount_of_path(self.mounts, directory))
            if lexical.network:
                self._learn(directory, lexical, self.generation)
                store = lexical
        return store

    def classify(self, directory: str, then: Continuation) -> None:
        """Look ``directory`` up in the worker of the mount its path lies on;
        ``then(store, None)`` or ``then(None, error)`` runs on the loop later."""
        waiters = self.waiting.get(directory)
        if waiters is not None:
            waiters.append(then)
            return
        lexical = self._store_of_mount(fstype.mount_of_path(self.mounts, directory))
        try:
            lexical.refuse_if_stalled("Lockspace %s" % directory)
        except Exception as e:
            self.completions.post(then, None, e)
            return
        self.waiting[directory] = [then]
        gen = self.generation
        lexical.submit(Call(fstype.classify, (directory, self.mounts),
                            lambda call: self._classified(directory, gen, call), "look-up of %s" % directory),
                       lambda call: self._lookup_failed(directory, P.err_storage_timeout(
                           "Lockspace %s" % directory, lexical.mount, self.timeout)))

    def _classified(self, directory: str, gen: int, call: Call) -> None:
        if call.error is not None:
            if self.waiting.get(directory) is not None:
                self._lookup_failed(directory, call.error)
            return
        info: fstype.FsInfo = call.result
        store = self.store_for(info.dev, info.mount, info.fstype, info.network)
        self._learn(directory, store, gen)
        for then in self.waiting.pop(directory, ()):
            then(store, None)

    def _lookup_failed(self, directory: str, err: Exception) -> None:
        for then in self.waiting.pop(directory, ()):
            then(None, err)

    def _learn(self, directory: str, store: Store, gen: int) -> None:
        if gen != self.generation:
            return            # the mount table changed meanwhile: look it up again next time
        self.dirs[directory] = store
        if not store.network:
            self.local_dirs.add(directory)

    # -- the lock table's hook: releasing a lease --------------------------------------

    def discard(self, res: Resource) -> None:
        """``Locks`` calls this to give up a lease file: on a network store
        the unlink/unlock/close is queued on its worker (it always runs, however
        late); a release that waits for it takes it from :attr:`capture`."""
        store = self.stores.get(res.dev) if res.dev in self.network_devs else None
        if store is None:
            leasefile.discard(res.fd, res.path, res.flags, self.locks.lock_type)
            return
        if self.watcher is not None:
            self.watcher.forget(res)
        call = Call(store.files.discard, (res.fd, res.path, res.flags, res.dev, res.ino), None,
                    "release of %s" % res.path, abandonable=False)
        if self.capture is not None:
            self.capture.append((store, call))     # the caller submits it, with its on_done
            return
        store.submit(call)

    def adopt_held(self) -> None:
        """Leases taken before the stores existed (recovery, hand-over): their
        network stores learn about them, in order with every later call."""
        for res in self.locks.resources():
            store = self.store_of_dev(res.dev)
            if store is not None and store.network:
                store.submit(Call(store.files.seed, (res.fd, res.dev, res.ino, res.flags), None,
                                  "seed", abandonable=False))
                self.held(res, store)

    def held(self, res: Resource, store: Store) -> None:
        """A lease on a network store is held now: the watchdog watches it."""
        if self.watcher is not None:
            self.watcher.watch(res, store)

    def quiesce(self, timeout: float) -> bool:
        """Before a live re-exec (the loop is stopped): apply what the workers
        finished, wait up to ``timeout`` s for the rest; True when none is busy."""
        deadline = time.monotonic() + timeout
        while True:
            self.completions.run_pending()
            if not self.busy_mounts():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def busy_mounts(self) -> List[str]:
        return [s.label for s in self.stores.values() if s.backlog()]

    # -- facts ---------------------------------------------------------------------------

    def stalled(self) -> List[dict]:
        """``status``'s ``stalled_lockspaces``: one entry per lockspace (``""``
        for the direct one) on a filesystem that has stopped answering."""
        out = []
        for store in self.stores.values():
            waited = store.stalled_for() if store.network or store.worker is not None else None
            if waited is None:
                continue
            keys = set()
            for d, s in self.dirs.items():
                if s is store:
                    keys.add(d if d in self.locks.lockspaces else "")
            for res in self.locks.resources():
                if res.dev == store.dev:
                    keys.add(res.lockspace.key)
            since = store.stalled_wall or (time.time() - waited)
            for key in sorted(keys) or [None]:
                out.append({"lockspace": key, "mount": store.mount, "fstype": store.fstype,
                            "since": round(since, 3), "waited": round(waited, 1),
                            "pending_calls": store.backlog()})
        return out

    def summary(self) -> List[dict]:
        return [{"mount": s.mount, "fstype": s.fstype, "dev": s.dev, "worker": s.worker is not None,
                 "network": s.network, "timeouts": s.timeouts, "pending_calls": s.backlog(),
                 "late_calls": s.worker.late if s.worker is not None else 0}
                for s in self.stores.values() if s.network or s.worker is not None]
