# SPDX-License-Identifier: GPL-3.0-or-later
"""A lock-protocol client that performs what libvirt's ``lockd.so`` plugin does.

Used by the tests, the benchmarks and ``virtlockctl``. Each ``LockClient`` is
one connection; serial numbers start at 0 per connection, as in libvirt.
"""
from __future__ import annotations

import socket
import uuid as uuidlib
from typing import Optional, Union

from . import protocol as P
from . import rpc, xdr


class LockError(Exception):
    """The daemon answered a call with an error (a ``virNetMessageError``)."""

    def __init__(self, err: rpc.RPCError) -> None:
        super().__init__(err.message)
        self.error = err
        self.code = err.code
        self.domain = err.domain
        self.message = err.message
        self.level = err.level
        self.str1, self.str2, self.str3 = err.str1, err.str2, err.str3
        self.int1, self.int2 = err.int1, err.int2


class ConnectionClosed(Exception):
    """The daemon closed the connection without replying."""


def _uuid_bytes(u: Union[str, bytes, uuidlib.UUID]) -> bytes:
    if isinstance(u, uuidlib.UUID):
        return u.bytes
    if isinstance(u, bytes):
        if len(u) != 16:
            raise ValueError("a UUID is 16 bytes")
        return u
    return uuidlib.UUID(u).bytes


class LockClient:
    """One connection to a lock daemon, speaking the lock program as libvirt does."""

    def __init__(self, path: str = P.LOCK_SOCKET, timeout: Optional[float] = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.serial = 0
        self.buf = b""

    # -- raw access ------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> bytes:
        """One whole frame, or b"" if the daemon closed the connection."""
        while True:
            if len(self.buf) >= 4:
                n = rpc.frame_length(self.buf)
                if len(self.buf) >= n:
                    frame, self.buf = self.buf[:n], self.buf[n:]
                    return frame
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return b""
            self.buf += data

    def call_raw(self, frame: bytes) -> bytes:
        self.send_raw(frame)
        return self.recv_frame()

    def call(self, proc: int, payload: bytes = b"") -> None:
        serial = self.serial
        self.serial += 1
        reply = self.call_raw(P.encode_call(proc, serial, payload))
        if not reply:
            raise ConnectionClosed("virtlockd closed the connection without replying to procedure %d" % proc)
        h = rpc.decode_header(reply)
        if h.serial != serial or h.proc != proc or h.type != rpc.REPLY:
            raise ConnectionClosed("unexpected reply %r to procedure %d serial %d" % (h, proc, serial))
        if h.status == rpc.ERROR:
            raise LockError(rpc.RPCError.decode(reply, 28))

    # -- the plugin's procedures -------------------------------------------

    def register(self, uuid, name: str, id: int, pid: int, flags: int = 0) -> None:
        self.call(P.PROC_REGISTER, P.encode_register(P.Owner(_uuid_bytes(uuid), name, id, pid), flags))

    def restrict(self, flags: int = 0) -> None:
        self.call(P.PROC_RESTRICT, xdr.u32(flags))

    def new_lockspace(self, path: str, flags: int = 0) -> None:
        self.call(P.PROC_NEW, xdr.string(path) + xdr.u32(flags))

    def create_resource(self, lockspace: str, name: str, flags: int = 0) -> None:
        self.call(P.PROC_CREATE_RESOURCE, P.encode_resource(lockspace, name, flags))

    def delete_resource(self, lockspace: str, name: str, flags: int = 0) -> None:
        self.call(P.PROC_DELETE_RESOURCE, P.encode_resource(lockspace, name, flags))

    def acquire(self, lockspace: str, name: str, flags: int = 0) -> None:
        self.call(P.PROC_ACQUIRE_RESOURCE, P.encode_resource(lockspace, name, flags))

    def release(self, lockspace: str, name: str, flags: int = 0) -> None:
        self.call(P.PROC_RELEASE_RESOURCE, P.encode_resource(lockspace, name, flags))

    def create_lockspace(self, path: str) -> None:
        self.call(P.PROC_CREATE_LOCKSPACE, xdr.string(path))

    def ping(self) -> bool:
        """Keepalive PING; True if a PONG came back."""
        reply = self.call_raw(rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_VERSION,
                                               rpc.KEEPALIVE_PING, rpc.MESSAGE, 0, rpc.OK))
        return bool(reply) and rpc.decode_header(reply).proc == rpc.KEEPALIVE_PONG

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "LockClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- libvirt's sequences (spec 5.5) -------------------------------------------

def start_vm(path: str, uuid, name: str, id: int, pid: int, disks, lockspace: str = "",
             flags: int = 0) -> LockClient:
    """What libvirt does to start a VM: the owner's own connection
    (REGISTER + RESTRICT, kept open; returned) and one short-lived connection
    that acquires every disk. Only meaningful when the caller *is* ``pid``."""
    holder = LockClient(path)
    holder.register(uuid, name, id, pid)
    holder.restrict()
    with LockClient(path) as c:
        c.register(uuid, name, id, pid)
        for disk in disks:
            c.acquire(lockspace, disk, flags)
    return holder
