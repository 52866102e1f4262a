# SPDX-License-Identifier: GPL-3.0-or-later
"""The live re-exec (SIGUSR1, ``systemctl reload``): hand everything to a new image.

The running daemon writes its whole state to a file in ``state_dir`` and execs
itself with every fd kept: the listening sockets, each client connection
(with half-read requests and half-written replies), each lease fd and the pid
file. The new image finds the file (written by its own pid), takes every fd
back and serves on: same pid, same locks, same connections. As in gunicorn's
arbiter, the shape is save -> exec -> load -> apply.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import socket
import sys
import time
from typing import List, Optional

from . import protocol as P
from .deferred import settle_for_exec
from .journal import write_atomic
from .owners import OwnerInfo
from .server import LockConn, Server
from .state import DaemonState

log = logging.getLogger("lockd")

STATE_FILE = "restart-exec.json"
# Private to this package; lists, not dicts, because with 10,000 VMs it holds
# tens of thousands of entries.
FORMAT = 3


def exec_argv() -> List[str]:
    argv0 = sys.argv[0]
    if argv0.endswith("__main__.py") or argv0 == "-m":
        return [sys.executable, "-m", "lockd"] + sys.argv[1:]
    return [sys.executable, argv0] + sys.argv[1:]


def save(state: DaemonState, server: Server, pidfile_fd: Optional[int], path: str) -> List[int]:
    """Write the state file; returns every fd the new image must inherit."""
    fds: List[int] = []
    clients = []
    for c in state.clients.values():
        o = c.owner
        clients.append([c.fd, c.id, c.pid, c.uid, c.restricted, c.own, c.connected_at, c.rbuf.hex(),
                        c.wbuf.hex(), None if o is None else [o.uuid.hex(), o.name, o.id, o.pid], c.skip])
        fds.append(c.fd)
    resources = []
    for res in state.locks.resources():
        resources.append([res.lockspace.key, res.name, res.path, res.fd, res.flags, res.fdname, res.dev,
                          res.ino, [[p, res.since.get(p, 0.0)] for p in res.owners]])
        fds.append(res.fd)
    owners = []
    for info in state.owners.infos.values():
        owners.append(dict(info.to_json(), pin=info.pin, journaled=info.journaled))
        if info.pin is not None:
            fds.append(info.pin)
    listeners = [[fd, entry[1]] for fd, entry in server.listeners.items()]
    fds.extend(server.listeners)
    journal = state.recorder.journal
    data = {
        "magic": str(os.getpid()), "format": FORMAT, "listeners": listeners, "clients": clients,
        "lockspaces": [k for k in state.locks.lockspaces if k], "resources": resources, "owners": owners,
        "fd_seq": state.recorder.fd_seq, "started": state.started, "socket_activated": state.socket_activated,
        "recovered": state.recovered, "lost": state.lost, "next_client_id": state.next_client_id,
        "pidfile_fd": pidfile_fd, "fdstore": state.recorder.fdstore, "lock_type": state.locks.lock_type,
        "journal_lines": journal.lines if journal else 0,
    }
    if pidfile_fd is not None:
        fds.append(pidfile_fd)
    write_atomic(path, json.dumps(data, separators=(",", ":")).encode(), 0o600, fsync=False)
    return fds


def load(path: str) -> Optional[dict]:
    """Read and unlink the state file; None unless this very pid wrote it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        data = json.loads(raw)
    except ValueError:
        log.critical("restart exec file %s is corrupt; cold start (connections inherited across the "
                     "re-exec are lost)", path)
        return None
    if not isinstance(data, dict) or data.get("magic") != str(os.getpid()):
        log.warning("Found restart exec file with old magic %s vs wanted %d",
                    data.get("magic") if isinstance(data, dict) else None, os.getpid())
        return None
    if data.get("format") != FORMAT:
        log.critical("restart exec file %s has format %r, this version reads %d; cold start",
                     path, data.get("format"), FORMAT)
        return None
    return data


def apply(state: DaemonState, server: Server, data: dict) -> None:
    """Take every fd of the state file back into ``state`` and ``server``."""
    locks, owners = state.locks, state.owners
    set_inheritable = os.set_inheritable
    for fd, kind in data["listeners"]:
        set_inheritable(fd, False)
        server.add_listener(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), kind)
    for key in data["lockspaces"]:
        locks.add_lockspace(key)
    for o in data["owners"]:
        info = OwnerInfo.from_json(o)
        info.journaled = o["journaled"]      # the journal is carried over as it is
        info.pin = o["pin"]
        if info.pin is not None:
            set_inheritable(info.pin, False)
        owners.adopt(info)
    for lskey, name, path, fd, flags, fdname, dev, ino, res_owners in data["resources"]:
        # the same process keeps the same open file descriptions: the locks are
        # still ours, no fstat or re-lock needed
        set_inheritable(fd, False)
        res = locks.restore(locks.lockspaces[lskey], name, path, fd, flags, res_owners, dev, ino)
        res.fdname = fdname
    conns = []
    for fd, cid, pid, uid, restricted, is_own, connected_at, rbuf, wbuf, o, skip in data["clients"]:
        set_inheritable(fd, False)
        conn = LockConn(server, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), pid, uid, cid)
        conn.restricted = restricted
        conn.connected_at = connected_at
        conn.skip = skip
        if o is not None:
            conn.owner = P.Owner(bytes.fromhex(o[0]), o[1], o[2], o[3])
            conn.own = is_own
            if is_own:
                info = owners.get(conn.owner.pid)
                if info is not None and info.same(conn.owner):
                    info.connected += 1
                else:
                    owners.own_connection_opened(conn.owner)
        conn.rbuf = bytearray.fromhex(rbuf)
        conn.wbuf = bytearray.fromhex(wbuf)
        conns.append(conn.start())
    state.recorder.fd_seq = data["fd_seq"]
    state.started = data["started"]
    state.socket_activated = data["socket_activated"]
    state.recovered = data["recovered"]
    state.lost = data["lost"]
    state.next_client_id = data["next_client_id"]
    if state.recorder.journal is not None:
        state.recorder.journal.lines = data["journal_lines"]
    owners.watch_all()
    # requests that were half read go on (a half-written reply first goes out)
    for conn in conns:
        if conn.rbuf and not conn.wbuf:
            conn.process()
            if conn.fd >= 0 and conn.wbuf:
                conn.flush()


def reexec(state: DaemonState, server: Server, pidfile_fd: Optional[int], path: str) -> None:
    """Exec a new image of the daemon in place. Returns only if that failed,
    with everything as it was: the running image serves on."""
    if state.storage is not None and not state.storage.quiesce(1.0):
        log.critical("re-exec refused: storage calls on %s have not answered; an exec now could hang in the "
                     "kernel. Still serving with the running image; retry when the storage answers",
                     ", ".join(state.storage.busy_mounts()))
        return
    state.recorder.notifier.reloading()
    for a in list(state.admins.values()):
        a.close()
    state.owners.stop_all()
    for c in list(state.clients.values()):
        settle_for_exec(c)        # requests waiting for storage: answered, or run again by the new image
        if c.wbuf:
            c.flush()             # what cannot be sent now is saved in the state
    t0 = time.monotonic()
    gc.disable()                  # tens of thousands of short-lived objects: no cyclic GC passes
    try:
        state.recorder.flush()
        fds = save(state, server, pidfile_fd, path)
    except OSError as e:
        gc.enable()
        log.critical("re-exec refused: cannot write the hand-over state to %s: %s; still serving with "
                     "the running image and every lease", path, e.strerror)
        state.owners.watch_all()
        return
    for fd in fds:
        os.set_inheritable(fd, True)
    journal = state.recorder.journal
    if journal is not None:
        journal.close()
    argv = exec_argv()
    log.info("re-exec: %s (state of %d clients and %d leases written in %.0f ms)", " ".join(argv),
             len(state.clients), state.locks.count(), (time.monotonic() - t0) * 1000)
    for h in logging.getLogger("lockd").handlers:
        h.flush()
    state.loop.release_signals()
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        gc.enable()
        log.error("re-exec of %s failed: %s; continuing with the running image", argv[0], e.strerror)
        for fd in fds:
            os.set_inheritable(fd, False)
        try:
            os.unlink(path)
        except OSError:
            pass
        if journal is not None:
            journal.open()
        state.owners.watch_all()
        state.loop.catch_signals(())
