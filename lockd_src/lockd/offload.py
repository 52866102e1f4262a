# SPDX-License-Identifier: GPL-3.0-or-later
"""The lock procedures whose storage calls run in a worker.

:class:`~lockd.program.LockProgram` hands a request here when its lockspace
or disk directory is not known to be local (``Storage.local_dirs``). The
directory's store is looked up (once; :mod:`lockd.storage`); on a local store
the procedure runs on the loop as before, on a network store its filesystem
call is queued on the store's worker and the request gets a
:class:`~lockd.deferred.Pending` reply:

* the table is changed on the loop only, once the call is back in time;
* a call past its deadline is answered with ``Timed out during operation:
  Lockspace resource '<name>' on <mount> did not answer within <n> s``; if it
  ends later its result is undone on the worker (a late lock is unlocked and
  closed, never kept): the client was told "failed";
* a lock that comes back for a connection that has gone is undone too;
* a release changes the table and the journal at once and waits for its
  unlock (so that another host can take the disk as soon as the client is
  told OK); the unlock itself always runs, however late.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from . import protocol as P
from . import rpc
from .deferred import Pending
from .lockspace import LockSpace
from .owners import OwnerInfo
from .state import DaemonState
from .storage import Storage, Store
from .workers import ABANDONED, Call

log = logging.getLogger("lockd")


def _rpc_error(err: BaseException, what: str) -> rpc.RPCError:
    if isinstance(err, rpc.RPCError):
        return err
    if isinstance(err, OSError):
        return P.err_system("Unable to access %s" % what, err)
    log.error("storage call for %s failed: %r", what, err)
    return rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_LOCKSPACE, "%s: %s" % (what, err))


class Offload:
    """Runs lock procedures against a :class:`~lockd.storage.Storage`."""

    def __init__(self, state: DaemonState, storage: Storage) -> None:
        self.state = state
        self.storage = storage
        self.locks = state.locks
        self.loop = storage.loop
        self.local_dirs = storage.local_dirs          # read by LockProgram on the hot path
        self.network_devs = storage.network_devs
        self.late_undone = 0

    # -- the frame of every procedure ----------------------------------------------------

    def _run(self, directory: str, what: str, redo: bool, local: Callable[[], None],
             remote: Callable[[Store, Pending], None]) -> Optional[Pending]:
        """``local()`` now if the directory is known to be local (returns
        None); else a Pending that ``remote(store, pending)`` (or ``local()``,
        once the look-up says local) resolves."""
        store = self.storage.quick(directory)
        if store is not None and not store.network:
            local()
            return None
        p = Pending(redo, what)
        if store is None:
            self.storage.classify(directory, lambda s, err: self._go(p, s, err, local, remote))
        else:
            self._go(p, store, None, local, remote)
        return p

    def _go(self, p: Pending, store: Optional[Store], err: Optional[BaseException],
            local: Callable[[], None], remote: Callable[[Store, Pending], None]) -> None:
        if err is None:
            try:
                if store.network:
                    remote(store, p)
                    return
                local()
            except Exception as e:           # noqa: BLE001 - every path must answer the client
                err = e
        p.resolve(None if err is None else _rpc_error(err, p.what))

    def _timeout(self, what: str, store: Store) -> rpc.RPCError:
        return P.err_storage_timeout(what, store.mount, self.storage.timeout)

    def _simple(self, store: Store, p: Pending, what: str, fn, args: tuple,
                then: Optional[Callable[[], None]] = None, ignore_errors: bool = False) -> None:
        """One call whose late result needs no undo; ``then()`` applies it."""
        store.refuse_if_stalled(what)

        def done(call: Call) -> None:
            if call.state == ABANDONED:
                return
            call.timer.cancel()
            if call.error is not None and not ignore_errors:
                p.resolve(_rpc_error(call.error, what))
                return
            if call.error is None and then is not None:
                then()
            p.resolve(None)
        store.submit(Call(fn, args, done, "%s of %s" % (p.what, what)),
                     lambda call: p.resolve(self._timeout(what, store)))

    # -- ACQUIRE_RESOURCE ------------------------------------------------------------------

    def acquire(self, ls: LockSpace, name: str, info: OwnerInfo, flags: int) -> Optional[Pending]:
        if name in ls.resources:
            self.state.acquire(ls, name, info, flags)      # a shared join or busy: memory only
            return None
        return self._run(self.storage.dir_of(ls, name), "acquire", True,
                         lambda: self.state.acquire(ls, name, info, flags),
                         lambda store, p: self._acquire_remote(store, p, ls, name, info, flags))

    def _acquire_remote(self, store: Store, p: Pending, ls: LockSpace, name: str, info: OwnerInfo,
                        flags: int) -> None:
        what = "Lockspace resource '%s'" % name
        store.refuse_if_stalled(what)
        path = ls.path_of(name)
        store.submit(Call(store.files.open_locked, (path, name, flags),
                          lambda call: self._acquired(call, store, p, ls, name, info, flags),
                          "acquire of %s" % path, undo=store.files.drop),
                     lambda call: p.resolve(self._timeout(what, store)))

    def _acquired(self, call: Call, store: Store, p: Pending, ls: LockSpace, name: str,
                  info: OwnerInfo, flags: int) -> None:
        if call.state == ABANDONED:
            if call.error is None:
                self.late_undone += 1
                log.warning("storage %s: the lock on %s came %.1f s after its deadline; the client had been "
                            "told it failed, so it was unlocked and closed again", store.label, call.args[0],
                            (call.ended or 0) - (call.started or 0) - self.storage.timeout)
            return
        call.timer.cancel()
        if call.error is not None:
            p.resolve(_rpc_error(call.error, "Lockspace resource '%s'" % name))
            return
        if p.orphaned or self.locks.lockspaces.get(ls.key) is not ls or name in ls.resources:
            # nobody waits for it any more, or another acquire of the name got
            # there first (shared leases): this open file description goes
            store.submit(Call(store.files.drop, (call.result,), None, "undo of %s" % call.args[0],
                              abandonable=False))
            if p.orphaned:
                p.resolve(None)
                return
            try:
                self.state.acquire(self.locks.get(ls.key), name, info, flags)
            except rpc.RPCError as e:
                p.resolve(e)
                return
            p.resolve(None)
            return
        try:
            res = self.state.acquire(ls, name, info, flags, opened=call.result)
        except rpc.RPCError as e:
            p.resolve(e)           # the journal refused it; DaemonState undid it (its unlock is queued)
            return
        self.storage.held(res, store)
        p.resolve(None)

    # -- RELEASE_RESOURCE ------------------------------------------------------------------

    def release(self, ls: LockSpace, name: str, pid: int) -> Optional[Pending]:
        """The lease goes from the table and the journal now; the reply waits
        for its unlock (at most ``io_timeout``)."""
        captured: list = []
        self.storage.capture = captured
        try:
            self.state.release(ls, name, pid)
        except BaseException:
            self.storage.capture = None
            for store, call in captured:
                store.submit(call)           # never lose an unlock
            raise
        self.storage.capture = None
        if not captured:
            return None             # other owners still share it: nothing to unlock yet
        what = "Lockspace resource '%s'" % name
        p = Pending(False, "release")
        stalled = None
        for store, call in captured:
            try:
                store.refuse_if_stalled(what)
            except rpc.RPCError as e:
                stalled = e
            timer = self.loop.call_later(self.storage.timeout,
                                         lambda st=store: p.resolve(self._timeout(what, st)))
            call.on_done = lambda c, t=timer: (t.cancel(), p.resolve(None))
            store.submit(call)
        if stalled is not None:
            raise stalled
        return p

    # -- the rest --------------------------------------------------------------------------

    def create_resource(self, ls: LockSpace, name: str) -> Optional[Pending]:
        return self._resource_file(ls, name, "create", self.locks.create_resource, "create_resource")

    def delete_resource(self, ls: LockSpace, name: str) -> Optional[Pending]:
        return self._resource_file(ls, name, "delete", self.locks.delete_resource, "delete_resource")

    def _resource_file(self, ls: LockSpace, name: str, verb: str, local, remote: str) -> Optional[Pending]:
        """CREATE/DELETE_RESOURCE: busy if held (memory), then the file call."""
        if name in ls.resources:
            raise P.err_busy(name)
        return self._run(self.storage.dir_of(ls, name), verb, True, lambda: local(ls, name),
                         lambda store, p: self._simple(store, p, "Lockspace resource '%s'" % name,
                                                       getattr(store.files, remote), (ls.path_of(name), name)))

    def create_lockspace(self, key: str) -> Optional[Pending]:
        if key in self.locks.lockspaces:
            return None
        return self._run(key, "create", True, lambda: self.state.create_lockspace(key),
                         lambda store, p: self._simple(store, p, "Lockspace %s" % key, store.files.make_dir,
                                                       (key,), then=lambda: self._add_lockspace(key)))

    def new_lockspace(self, key: str) -> Optional[Pending]:
        if key == "":
            raise P.err_default_exists()
        if key in self.locks.lockspaces:
            raise P.err_lockspace_exists(key)
        # like libvirt, a directory that cannot be made is no error (acquires fail later)
        return self._run(key, "create", True, lambda: self.state.new_lockspace(key),
                         lambda store, p: self._simple(store, p, "Lockspace %s" % key, store.files.make_dir,
                                                       (key,), then=lambda: self._add_lockspace(key),
                                                       ignore_errors=True))

    def _add_lockspace(self, key: str) -> None:
        if key not in self.locks.lockspaces:
            self.locks.add_lockspace(key)
            self.state.recorder.lockspace_added(key)
