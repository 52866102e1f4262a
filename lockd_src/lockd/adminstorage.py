# SPDX-License-Identifier: GPL-3.0-or-later
"""Admin operations that touch network storage or fencing (:mod:`lockd.admin`).

An adoption (``acquire``) on a network filesystem goes through
:mod:`lockd.offload` like a lock-protocol acquire: its answer comes later (a
:class:`~lockd.deferred.Pending`), and the admin connection waits for it
without blocking the loop. ``resume`` continues VMs that fencing paused.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .deferred import Pending
from .leasewatch import HELD
from .owners import OwnerInfo
from .rpc import RPCError


def acquire(state, key: str, name: str, info: OwnerInfo, flags: int) -> Optional[Pending]:
    """Create the lockspace if needed, then acquire, both through the
    offload; None when it all happened on the loop (local storage)."""
    off = state.offload
    outer = Pending(False, "admin acquire")

    def then_acquire(err: Optional[Exception] = None) -> bytes:
        if err is not None:
            outer.resolve(err)
            return b""
        try:
            p = off.acquire(state.locks.get(key), name, info, flags)
        except RPCError as e:
            outer.resolve(e)
            return b""
        if p is None:
            outer.resolve(None)
        else:
            p.set_finish(lambda e: outer.resolve(e) or b"")
        return b""

    if key not in state.locks.lockspaces:
        p1 = off.create_lockspace(key)
        if p1 is not None:
            p1.set_finish(then_acquire)
            return outer
    then_acquire()
    if outer.done and outer.err is not None:
        raise outer.err
    return None if outer.done else outer


def resume(state, owner_pid: Optional[int], owner_uuid: Optional[str]) -> Tuple[list, list]:
    """SIGCONT the paused VM ``owner_pid`` (or those of ``owner_uuid``, or all)
    whose leases are all held again: (resumed, refused). LookupError for a
    pid that fencing did not pause."""
    wd = state.watchdog
    if wd is None:
        raise LookupError("no lease is watched here (no network filesystem)")
    paused = wd.fencer.paused
    pids = [owner_pid] if owner_pid is not None else \
        [p for p, x in paused.items() if owner_uuid in (None, x.get("uuid"))]
    resumed, refused = [], []
    for pid in pids:
        held = all(wd.state_of(r) == HELD for r in state.locks.by_owner.get(pid, ()))
        try:
            resumed.append(wd.fencer.resume(pid, held))
        except PermissionError as e:
            refused.append({"pid": pid, "reason": str(e)})
    return resumed, refused
