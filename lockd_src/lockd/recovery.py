# SPDX-License-Identifier: GPL-3.0-or-later
"""Cold start: take back the leases a previous daemon held.

From fds systemd kept in its fd store (no gap at all: the open file
description, and with it the OFD lock, never closed), or by re-locking from
the journal (a gap while no daemon ran). A lease that was answered OK but
cannot be re-taken is listed in ``lost_leases`` and logged at CRITICAL.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from . import leasefile
from . import owners as own
from .journal import replay
from .owners import OwnerInfo
from .rpc import RPCError
from .state import DaemonState

log = logging.getLogger("lockd")


def recover(state: DaemonState, journal_path: str, stored: Dict[str, int]) -> None:
    """Rebuild ``state`` from the journal at ``journal_path`` and the fd-store
    entries ``stored`` (``{name: fd}``; consumed)."""
    data = replay(journal_path)
    locks, owners, recorder = state.locks, state.owners, state.recorder
    infos = {int(k): OwnerInfo.from_json(v) for k, v in data["owners"].items()}
    seq = data.get("next_fd", 0)
    for name in stored:
        if name.startswith("lease-"):
            try:
                seq = max(seq, int(name[6:]))
            except ValueError:
                pass
    recorder.fd_seq = seq
    for key in data["lockspaces"]:
        try:
            state.create_lockspace(key)
        except RPCError as e:
            log.error("could not restore lockspace %s: %s", key, e)
    for (lskey, name), r in data["resources"].items():
        fd = stored.pop(r["fdname"], None) if r.get("fdname") else None
        alive = [(pid, since) for pid, since in r["owners"]
                 if own.alive(pid, infos[pid].start_time if pid in infos else None)]
        desc = "lease %r in lockspace %r" % (name, lskey)
        if not alive:
            if fd is not None:
                _drop_stale_fd(state, fd, r)
            log.info("%s: its owners are gone; released", desc)
            continue
        for pid, _since in alive:
            if pid in infos and owners.get(pid) is None:
                owners.adopt(infos[pid])
        try:
            ls = state.create_lockspace(lskey)
        except RPCError as e:
            _lost(state, r, alive, "lockspace cannot be restored: %s" % e, fd)
            continue
        if fd is not None:
            st = os.fstat(fd)
            if r.get("ino") is not None and (st.st_dev, st.st_ino) != (r["dev"], r["ino"]):
                log.warning("%s: the stored fd is for another file; re-locking by path", desc)
                os.close(fd)
                fd = None
        try:
            if fd is not None:
                res = locks.restore(ls, name, r["path"], fd, r["flags"], alive)
                res.fdname = r["fdname"]
            else:
                _relock(state, ls, name, r["flags"], alive)
                log.warning("%s re-locked from the journal (it was unprotected while no daemon ran)", desc)
            state.recovered += 1
        except (RPCError, OSError) as e:
            _lost(state, r, alive, str(e), None)
            continue
        for pid, _since in alive:
            owners.ensure_watched(pid)
    for name, fd in stored.items():
        if name.startswith("lease-"):
            log.warning("fd store entry %s is not in the journal; dropping it", name)
            recorder.notifier.fdstore_remove(name)
        else:
            log.error("Some activation file descriptors are unclaimed: %s", name)
        os.close(fd)
    if state.recovered or state.lost:
        log.warning("recovery: %d leases taken back, %d lost", state.recovered, len(state.lost))


def _relock(state: DaemonState, ls, name: str, flags: int, alive: List[Tuple[int, float]]) -> None:
    first, since = alive[0]
    info = state.owners.get(first) or OwnerInfo(first, bytes(16), "", 0, own.start_time(first))
    res = state.acquire(ls, name, info, flags, when=since)
    for pid, since in alive[1:]:
        state.locks.add_owner(res, pid, since)


def _drop_stale_fd(state: DaemonState, fd: int, r: dict) -> None:
    # unlocking explicitly matters: systemd's copy shares this lock
    leasefile.discard(fd, r["path"], r["flags"], state.locks.lock_type)
    if r.get("fdname"):
        state.recorder.notifier.fdstore_remove(r["fdname"])


def _lost(state: DaemonState, r: dict, alive, reason: str, fd: Optional[int]) -> None:
    entry = {"lockspace": r["ls"], "resource": r["name"], "path": r["path"],
             "owners": [a[0] for a in alive], "reason": reason}
    state.lost.append(entry)
    log.critical("LEASE LOST: %r in lockspace %r held by pid(s) %s could not be re-taken: %s. "
                 "That VM now runs WITHOUT lock protection; check for a second writer and stop one.",
                 r["name"], r["ls"], ", ".join(str(p) for p in entry["owners"]), reason)
    if fd is not None:
        os.close(fd)
