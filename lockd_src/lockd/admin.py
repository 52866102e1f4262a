# SPDX-License-Identifier: GPL-3.0-or-later
"""The admin interface: JSON lines on the admin socket (docs/admin-protocol.md).

:class:`AdminConn` reads request lines and :func:`handle_line` answers them;
the operations work on a :class:`~lockd.state.DaemonState` and nothing else.
The client side is :mod:`lockd.adminclient`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import uuid as uuidlib
from typing import Any, Dict, List, Optional

from . import __version__, adminstorage
from . import owners as own
from . import protocol as P
from . import rpc
from .deferred import Pending
from .lockspace import AUTOCREATE, SHARED, Resource
from .server import Conn, Endpoint
from .state import DaemonState

log = logging.getLogger("lockd.admin")

VERSION = 1
MAX_LINE = 1 << 20
OPS = ("hello", "status", "lockspaces", "leases", "clients", "release", "acquire", "resume")


class AdminError(Exception):
    """A refused admin request: ``code`` is stable (docs/admin-protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- connections


class AdminConn(Conn):
    """A connection on the admin socket: one JSON request per line, answered in order."""

    __slots__ = ("pending",)

    def __init__(self, state: DaemonState, sock: socket.socket, pid: int, uid: int) -> None:
        super().__init__(state, sock, pid, uid, state.admins)
        self.pending: Optional[Pending] = None

    def process(self) -> None:
        if self.pending is not None:
            return                  # answered in order: the next line waits for this one
        buf = self.rbuf
        pos = 0
        while self.fd >= 0:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos >= MAX_LINE:
                    self._too_long()
                    return
                break
            if nl - pos + 1 > MAX_LINE:
                self._too_long()
                return
            line = bytes(buf[pos:nl])
            pos = nl + 1
            if line.strip():
                out = handle_line(self.state, line)
                if isinstance(out, Pending):
                    if out.frame is None:
                        del buf[:pos]
                        self.pending = out
                        out.attach(self, 0)
                        return
                    self.wbuf += out.frame
                else:
                    self.send(out)
        del buf[:pos]

    def resume(self, pending: Pending) -> None:
        if self.pending is not pending or self.fd < 0:
            return
        self.pending = None
        self.wbuf += pending.frame
        if self.rbuf:
            self.process()
        if self.wbuf and self.fd >= 0:
            self.flush()

    def _too_long(self) -> None:
        self.send(_error_response(None, "bad-request", "request line longer than %d bytes" % MAX_LINE))
        self.flush()
        self.close()

    def send(self, obj: dict) -> None:
        self.wbuf += _line(obj)


def endpoint(state: DaemonState) -> Endpoint:
    """The admin socket's part of the server's accept path."""
    return Endpoint("admin", state.admins, "admin_max_clients",
                    lambda sock, pid, uid: AdminConn(state, sock, pid, uid).start(),
                    lambda sock, uid: _refuse(sock, "permission-denied",
                                              "the lockd admin socket is for root only (your uid is %d); "
                                              "run the command as root" % uid),
                    lambda sock, pid, uid: _refuse(sock, "internal",
                                                   "too many admin clients (%d); retry later or raise "
                                                   "admin_max_clients" % state.cfg["admin_max_clients"]))


def _error_response(rid, code: str, message: str) -> dict:
    return {"v": VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}}


def _refuse(sock: socket.socket, code: str, message: str) -> None:
    try:
        sock.setblocking(True)
        sock.settimeout(1.0)
        sock.sendall((json.dumps(_error_response(None, code, message)) + "\n").encode())
    except OSError:
        pass
    sock.close()


def handle_line(state: DaemonState, line: bytes) -> dict:
    rid = None
    try:
        try:
            req = json.loads(line)
        except ValueError as e:
            raise AdminError("bad-request", "the request is not valid JSON: %s" % e) from None
        if not isinstance(req, dict):
            raise AdminError("bad-request", "the request must be a JSON object")
        rid = req.get("id")
        if isinstance(rid, (dict, list)):
            rid = None
            raise AdminError("bad-request", "id must be an integer or a string")
        v = req.get("v")
        if not isinstance(v, int) or isinstance(v, bool):
            raise AdminError("bad-request", "missing or non-integer protocol version 'v'")
        if v != VERSION:
            raise AdminError("unsupported-version",
                             "protocol version %r is not supported; this daemon speaks version %d" % (v, VERSION))
        op = req.get("op")
        if not isinstance(op, str):
            raise AdminError("bad-request", "missing or non-string 'op'")
        args = req.get("args", {})
        if not isinstance(args, dict):
            raise AdminError("bad-request", "'args' must be a JSON object")
        fn = _OPS.get(op)
        if fn is None:
            raise AdminError("unknown-op", "unknown operation %r; known operations: %s" % (op, ", ".join(OPS)))
        result = fn(state, _Args(op, args))
        if isinstance(result, tuple):       # (Pending, answer(err) -> result): storage in a worker
            return _later(rid, *result)
        return {"v": VERSION, "id": rid, "ok": True, "result": result}
    except AdminError as e:
        return _error_response(rid, e.code, e.message)
    except Exception as e:  # never let one request take the daemon down
        log.exception("admin request failed")
        return _error_response(rid, "internal", str(e))


def _later(rid, pending: Pending, answer) -> Pending:
    def finish(err) -> bytes:
        try:
            return _line({"v": VERSION, "id": rid, "ok": True, "result": answer(err)})
        except AdminError as e:
            return _line(_error_response(rid, e.code, e.message))
    pending.set_finish(finish)
    return pending


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


class _Args:
    """Typed access to request arguments; unknown names are an error."""

    def __init__(self, op: str, args: Dict[str, Any]) -> None:
        self.op = op
        self.args = args
        self.used = set()

    def get(self, name: str, kind, default=None, required: bool = False):
        self.used.add(name)
        if name not in self.args or self.args[name] is None:
            if required:
                raise AdminError("invalid-argument", "%s needs argument %r" % (self.op, name))
            return default
        v = self.args[name]
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok:
            raise AdminError("invalid-argument", "argument %r of %s must be %s, got %r"
                             % (name, self.op, {str: "a string", int: "an integer", bool: "a boolean",
                                                dict: "an object"}.get(kind, kind), v))
        return v

    def done(self) -> None:
        extra = sorted(set(self.args) - self.used)
        if extra:
            raise AdminError("invalid-argument", "%s does not take argument(s) %s" % (self.op, ", ".join(extra)))


def _owner_obj(state, res: Optional[Resource], pid: int) -> dict:
    info = state.owners.get(pid)
    started = info.start_time if info else None
    return {
        "uuid": info.uuid_str if info else None, "name": info.name if info else None,
        "id": info.id if info else None, "pid": pid, "start_time": started,
        "alive": own.alive(pid, started), "since": res.since.get(pid) if res is not None else None,
        "connected": bool(info and info.connected),
    }


def lease_obj(state, res: Resource) -> dict:
    return {
        "lockspace": res.lockspace.key, "resource": res.name, "path": res.path,
        "dev": res.dev, "ino": res.ino, "shared": bool(res.flags & SHARED),
        "autocreate": bool(res.flags & AUTOCREATE),
        "state": state.watchdog.state_of(res) if state.watchdog is not None else "held",
        "owners": [_owner_obj(state, res, pid) for pid in dict.fromkeys(res.owners)],
    }


def _op_hello(state, a: _Args) -> dict:
    a.done()
    return {"protocol": VERSION, "server": "lockd", "version": __version__, "ops": list(OPS)}


def _op_status(state, a: _Args) -> dict:
    a.done()
    st = state.status()
    st["version"] = __version__
    return st


def _op_lockspaces(state, a: _Args) -> dict:
    a.done()
    return {"lockspaces": [{"path": ls.key, "directory": ls.directory, "resources": len(ls.resources),
                            "persistent": True}
                           for ls in state.locks.lockspaces.values()]}


def _matching(state, a: _Args) -> List[Resource]:
    lockspace = a.get("lockspace", str)
    resource = a.get("resource", str)
    path = a.get("path", str)
    owner_uuid = a.get("owner_uuid", str)
    owner_name = a.get("owner_name", str)
    owner_pid = a.get("owner_pid", int)
    ino = None
    # no stat() under a network mount: on a hung NFS server it would block the loop
    store = state.storage.quick(os.path.dirname(path)) if path is not None and state.storage else None
    if path is not None and (store is None or not store.network):
        try:
            st = os.stat(path)
            ino = (st.st_dev, st.st_ino)
        except OSError:
            pass
    pids = None
    if owner_uuid is not None or owner_name is not None:
        if owner_uuid is not None:
            owner_uuid = _norm_uuid(owner_uuid)
        pids = {pid for pid, info in state.owners.infos.items()
                if (owner_uuid is None or info.uuid_str == owner_uuid)
                and (owner_name is None or info.name == owner_name)}
    out = []
    for res in state.locks.resources():
        if lockspace is not None and res.lockspace.key != lockspace:
            continue
        if resource is not None and res.name != resource:
            continue
        if path is not None:
            if ino is not None:
                if (res.dev, res.ino) != ino:
                    continue
            elif res.path != path:
                continue
        if owner_pid is not None and owner_pid not in res.owners:
            continue
        if pids is not None and not pids.intersection(res.owners):
            continue
        out.append(res)
    return out


def _norm_uuid(s: str) -> str:
    try:
        return str(uuidlib.UUID(s))
    except ValueError:
        raise AdminError("invalid-argument", "%r is not a UUID" % s) from None


def _op_leases(state, a: _Args) -> dict:
    res = _matching(state, a)
    a.done()
    return {"leases": [lease_obj(state, r) for r in res]}


def _op_clients(state, a: _Args) -> dict:
    a.done()
    out = []
    for c in state.clients.values():
        o = c.owner
        out.append({"id": c.id, "pid": c.pid, "uid": c.uid, "restricted": c.restricted,
                    "registered": o is not None,
                    "owner": None if o is None else {"uuid": own.fmt_uuid(o.uuid),
                                                     "name": o.name, "id": o.id, "pid": o.pid},
                    "connected_at": c.connected_at})
    return {"clients": out}


def _op_release(state, a: _Args) -> dict:
    lockspace = a.get("lockspace", str)
    resource = a.get("resource", str)
    owner_uuid = a.get("owner_uuid", str)
    owner_pid = a.get("owner_pid", int)
    force = a.get("force", bool, False)
    dry_run = a.get("dry_run", bool, False)
    a.done()
    given = [lockspace is not None or resource is not None, owner_uuid is not None, owner_pid is not None]
    if sum(given) != 1:
        raise AdminError("invalid-argument",
                         "release needs exactly one selector: lockspace+resource, owner_uuid or owner_pid")
    if given[0]:
        if lockspace is None or resource is None:
            raise AdminError("invalid-argument", "release by lease needs both lockspace and resource")
        ls = state.locks.lockspaces.get(lockspace)
        if ls is None:
            raise AdminError("not-found", "no lockspace %r; list them with the lockspaces operation" % lockspace)
        res = ls.resources.get(resource)
        targets = [(res, list(dict.fromkeys(res.owners)))] if res is not None else []
    else:
        if owner_uuid is not None:
            u = _norm_uuid(owner_uuid)
            pids = {pid for pid, info in state.owners.infos.items() if info.uuid_str == u}
        else:
            pids = {owner_pid}
        targets = [(r, [p for p in dict.fromkeys(r.owners) if p in pids])
                   for r in state.locks.resources() if pids.intersection(r.owners)]
    if not force:
        for res, pids in targets:
            for pid in pids:
                info = state.owners.get(pid)
                if own.alive(pid, info.start_time if info else None):
                    raise AdminError(
                        "owner-alive",
                        "lease %r in lockspace %r is held by running process %d (%s); stop that VM first, "
                        "or pass force=true to release it anyway (the VM then runs unprotected)"
                        % (res.name, res.lockspace.key, pid, info.name if info else "unknown owner"))
    released = [lease_obj(state, target[0]) for target in targets]
    if not dry_run:
        for res, pids in targets:
            if res.fd < 0:
                continue
            if given[0] or set(res.owners) <= set(pids):
                state.remove(res)
            else:
                for pid in pids:
                    while pid in res.owners:
                        state.release(res.lockspace, res.name, pid)
            for pid in pids:
                state.owners.forget_if_idle(pid)
        for lease in released:
            log.warning("admin released lease %r in lockspace %r (force=%s)", lease["resource"],
                        lease["lockspace"], force)
    return {"changed": bool(targets), "released": released}


def _op_acquire(state, a: _Args) -> dict:
    lockspace = a.get("lockspace", str, "")
    resource = a.get("resource", str, required=True)
    shared = a.get("shared", bool, False)
    autocreate = a.get("autocreate", bool, False)
    owner = a.get("owner", dict, required=True)
    dry_run = a.get("dry_run", bool, False)
    a.done()
    oa = _Args("acquire owner", owner)
    ouuid = _norm_uuid(oa.get("uuid", str, required=True))
    oname = oa.get("name", str, required=True)
    oid = oa.get("id", int, required=True)
    opid = oa.get("pid", int, required=True)
    oa.done()
    if oid <= 0:
        raise AdminError("invalid-argument", "owner id must be a positive domain id, got %d" % oid)
    started = own.start_time(opid)
    if started is None or not own.alive(opid, started):
        raise AdminError("invalid-argument", "owner pid %d is not a running process; adoption is only for "
                                             "running VMs" % opid)
    if not resource or "\0" in resource or (lockspace and "/" in resource):
        raise AdminError("invalid-argument", "invalid resource name %r" % resource)
    if lockspace == "" and not resource.startswith("/"):
        raise AdminError("invalid-argument", "resources in the default lockspace are absolute disk paths")
    flags = (SHARED if shared else 0) | (AUTOCREATE if autocreate else 0)
    ls = state.locks.lockspaces.get(lockspace)
    res = ls.resources.get(resource) if ls is not None else None
    if res is not None and opid in res.owners and bool(res.flags & SHARED) == shared:
        return {"changed": False, "lease": lease_obj(state, res)}
    if res is not None and not (res.flags & SHARED and shared):
        raise AdminError("busy", "resource busy: Lockspace resource '%s' is locked (held by pid %s)"
                         % (resource, ", ".join(str(p) for p in dict.fromkeys(res.owners))))
    if dry_run:
        return {"changed": True, "lease": None}

    def answer(err: Optional[Exception]) -> dict:
        if err is not None:
            code = "busy" if getattr(err, "code", None) == rpc.ERR_RESOURCE_BUSY else \
                "not-found" if getattr(err, "int1", None) == errno.ENOENT else "internal"
            state.owners.forget_if_idle(opid)
            raise AdminError(code, getattr(err, "message", None) or str(err) or "acquire failed")
        log.warning("admin adopted lease %r in lockspace %r for pid %d (%s)", resource, lockspace, opid, oname)
        return {"changed": True, "lease": lease_obj(state, state.locks.get(lockspace).resources[resource])}

    try:
        info = state.owners.identify(P.Owner(uuidlib.UUID(ouuid).bytes, oname, oid, opid))
        if state.offload is not None:      # network storage: maybe answered later
            later = adminstorage.acquire(state, lockspace, resource, info, flags)
            if later is not None:
                return (later, answer)
        else:
            state.acquire(ls if ls is not None else state.create_lockspace(lockspace), resource, info, flags)
    except rpc.RPCError as e:
        return answer(e)
    return answer(None)


def _op_resume(state, a: _Args) -> dict:
    """Continue VMs that fencing paused, once every lease of theirs is held again."""
    owner_pid, owner_uuid = a.get("owner_pid", int), a.get("owner_uuid", str)
    a.done()
    try:
        resumed, refused = adminstorage.resume(state, owner_pid, owner_uuid and _norm_uuid(owner_uuid))
    except LookupError as e:
        raise AdminError("not-found", "%s; `virtlockctl status` lists the paused VMs" % e) from None
    if refused and not resumed:
        raise AdminError("busy", "; ".join(r["reason"] for r in refused))
    return {"changed": bool(resumed), "resumed": resumed, "refused": refused}


_OPS = {
    "hello": _op_hello, "status": _op_status, "lockspaces": _op_lockspaces, "leases": _op_leases,
    "clients": _op_clients, "release": _op_release, "acquire": _op_acquire, "resume": _op_resume,
}
