# SPDX-License-Identifier: GPL-3.0-or-later
"""The lock program (``0x0EA7BEEF``): dispatch and the eight procedures.

No sockets here: :meth:`LockProgram.dispatch` takes a connection object
(``owner``, ``own``, ``restricted``, peer ``pid``, ``skip``) and one whole
frame, and returns the reply frame. That makes every procedure testable with
raw frames (tests/unit/test_program.py). The wire behaviour is libvirt's
(spec 2.7-2.9, 4): replies, error tuples and what earns no reply at all.

Follow a lease from here: :meth:`LockProgram.acquire` ->
:meth:`lockd.state.DaemonState.acquire` -> :meth:`lockd.lockspace.Locks.acquire`
(``fcntl``) -> :meth:`lockd.state.Recorder.acquired` (journal, fd store).
On a network filesystem a procedure returns a :class:`~lockd.deferred.Pending`
from :mod:`lockd.offload` and its reply comes later.
"""
from __future__ import annotations

import logging
from time import perf_counter
from typing import Union

from . import protocol as P
from . import rpc, xdr
from .protocol import decode_resource_at
from .state import DaemonState

log = logging.getLogger("lockd")

DROP = object()       # dispatch result: close the connection, send nothing

_PROGRAM = P.PROGRAM
_KEEPALIVE = rpc.KEEPALIVE_PROGRAM
_CALL = rpc.CALL
_PONG = rpc.encode_frame(_KEEPALIVE, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PONG, rpc.MESSAGE, 0, rpc.OK)
_ACQUIRE_FLAGS = P.ALLOWED_FLAGS[P.PROC_ACQUIRE_RESOURCE]

Reply = Union[bytes, None, object]


class LockProgram:
    """The procedure table and the eight procedures of the lock program."""

    def __init__(self, state: DaemonState) -> None:
        self.state = state
        self.locks = state.locks
        self.owners = state.owners
        # lockd.offload.Offload when storage calls may go to workers (set by the daemon)
        self.offload = None
        # indexed by procedure number; 0 is a hole, as in lock_protocol.x
        self.procs = (None, self.register, self.restrict, self.new, self.create_resource,
                      self.delete_resource, self.acquire, self.release, self.create_lockspace)
        assert len(self.procs) == P.PROC_TABLE_SIZE

    def dispatch(self, conn, buf, pos: int, n: int) -> Reply:
        """Reply to the frame of ``n`` bytes at ``pos``: a frame, ``None`` (no
        reply, as libvirt sends none) or :data:`DROP`."""
        try:
            prog, vers, proc, mtype, serial, status = rpc.header_at(buf, pos, n)
        except rpc.FrameError:
            log.debug("client pid %d: Unable to decode message header; closing", conn.pid)
            return DROP
        body = pos + rpc.HEADER_SIZE
        if mtype == rpc.CALL_WITH_FDS:
            # libvirt reads the fd count and the fds before routing the call
            if n < rpc.HEADER_SIZE + 4:
                return DROP       # "Unable to decode number of FDs"
            nfds = rpc.LEN.unpack_from(buf, body)[0]
            if nfds > rpc.MESSAGE_NUM_FDS_MAX:
                return DROP       # "Received too many FDs"
            conn.skip += nfds
            body += 4
            mtype = _CALL         # the fds themselves are closed: no procedure takes any
        if prog == _PROGRAM and vers == P.PROGRAM_VERSION:
            if mtype != _CALL:
                return None       # REPLY/MESSAGE/STREAM...: libvirt sends nothing back
            if status != rpc.OK:
                return rpc.reply_error_frame(prog, vers, proc, serial, P.err_status(status))
            if not 0 < proc < P.PROC_TABLE_SIZE:
                return rpc.reply_error_frame(prog, vers, proc, serial, P.err_unknown_proc(proc))
            state = self.state
            t0 = perf_counter()
            later = None
            try:
                later = self.procs[proc](conn, buf, body, pos + n)
                err = None
            except rpc.RPCError as e:
                err = e
            except xdr.XDRError:
                err = P.err_decode()
            if later is not None:
                # a storage call runs in a worker: the reply comes later (lockd.offload)
                later.set_finish(lambda e: self._finish(prog, vers, proc, serial, t0, e))
                return later
            state.latency.observe(perf_counter() - t0)
            state.requests[proc] += 1
            if err is None:
                return rpc.reply_ok_frame(prog, vers, proc, serial)
            state.request_errors += 1
            return rpc.reply_error_frame(prog, vers, proc, serial, err)
        if prog == _KEEPALIVE and vers == rpc.KEEPALIVE_VERSION and mtype == rpc.MESSAGE:
            return _PONG if proc == rpc.KEEPALIVE_PING else None
        if mtype == _CALL:
            return rpc.reply_error_frame(prog, vers, proc, serial, P.err_unknown_program(prog, vers))
        return None

    def _finish(self, prog: int, vers: int, proc: int, serial: int, t0: float, err) -> bytes:
        """The reply of a request answered later (a :class:`~lockd.deferred.Pending`)."""
        state = self.state
        state.latency.observe(perf_counter() - t0)
        state.requests[proc] += 1
        if err is None:
            return rpc.reply_ok_frame(prog, vers, proc, serial)
        state.request_errors += 1
        if not isinstance(err, rpc.RPCError):
            err = rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_LOCKSPACE, str(err))
        return rpc.reply_error_frame(prog, vers, proc, serial, err)

    # -- checks every procedure but REGISTER and CREATE_LOCKSPACE makes ----------

    @staticmethod
    def _check(conn, proc: int, flags: int) -> None:
        if flags & ~P.ALLOWED_FLAGS[proc]:
            raise P.err_flags(proc, flags)
        if conn.restricted:
            raise P.err_restricted()
        if conn.owner is None:
            raise P.err_unregistered()

    # -- the hot procedures: one VM start is REGISTER + ACQUIRE per disk -------------

    def register(self, conn, buf, pos: int, end: int) -> None:
        owner, flags = P.decode_register(xdr.Decoder(buf, pos, end))
        if flags:
            raise P.err_flags(P.PROC_REGISTER, flags)
        if conn.restricted:
            raise P.err_restricted()
        if owner.id == 0:
            raise P.err_unregistered()
        if owner.pid & 0x80000000:
            owner.pid -= 1 << 32             # pid_t in libvirt
        if conn.own and conn.owner is not None:
            self.owners.own_connection_closed(conn.owner.pid, release=False)
        conn.owner = owner
        conn.own = owner.pid == conn.pid
        if conn.own:
            self.owners.own_connection_opened(owner)

    def acquire(self, conn, buf, pos: int, end: int):
        path, name, flags = decode_resource_at(buf, pos, end)[0]
        owner = conn.owner
        if flags & ~_ACQUIRE_FLAGS or conn.restricted or owner is None:
            self._check(conn, P.PROC_ACQUIRE_RESOURCE, flags)
        ls = self.locks.get(path)
        off = self.offload
        if off is not None and (ls.directory or name.rpartition("/")[0] or "/") not in off.local_dirs:
            return off.acquire(ls, name, self.owners.for_acquire(owner), flags)
        self.state.acquire(ls, name, self.owners.for_acquire(owner), flags)
        return None

    def release(self, conn, buf, pos: int, end: int):
        path, name, flags = decode_resource_at(buf, pos, end)[0]
        self._check(conn, P.PROC_RELEASE_RESOURCE, flags)
        ls = self.locks.get(path)
        off = self.offload
        if off is not None and off.network_devs:
            res = ls.resources.get(name)
            if res is not None and res.dev in off.network_devs:
                return off.release(ls, name, conn.owner.pid)
        self.state.release(ls, name, conn.owner.pid)
        return None

    # -- the rest ----------------------------------------------------------------

    def restrict(self, conn, buf, pos: int, end: int) -> None:
        self._check(conn, P.PROC_RESTRICT, xdr.Decoder(buf, pos, end).u32())
        conn.restricted = True

    def new(self, conn, buf, pos: int, end: int):
        path, flags = P.decode_new(xdr.Decoder(buf, pos, end))
        self._check(conn, P.PROC_NEW, flags)
        if self.offload is not None:
            return self.offload.new_lockspace(path)
        self.state.new_lockspace(path)
        return None

    def create_resource(self, conn, buf, pos: int, end: int):
        path, name, flags = decode_resource_at(buf, pos, end)[0]
        self._check(conn, P.PROC_CREATE_RESOURCE, flags)
        if self.offload is not None:
            return self.offload.create_resource(self.locks.get(path), name)
        self.locks.create_resource(self.locks.get(path), name)
        return None

    def delete_resource(self, conn, buf, pos: int, end: int):
        path, name, flags = decode_resource_at(buf, pos, end)[0]
        self._check(conn, P.PROC_DELETE_RESOURCE, flags)
        if self.offload is not None:
            return self.offload.delete_resource(self.locks.get(path), name)
        self.locks.delete_resource(self.locks.get(path), name)
        return None

    def create_lockspace(self, conn, buf, pos: int, end: int):
        path = P.decode_create_lockspace(xdr.Decoder(buf, pos, end))
        if conn.restricted:
            raise P.err_restricted()
        if self.offload is not None:
            return self.offload.create_lockspace(path)
        self.state.create_lockspace(path)
        return None
