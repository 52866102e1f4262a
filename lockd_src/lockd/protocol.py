# SPDX-License-Identifier: GPL-3.0-or-later
"""The lock program (``lock_protocol.x``): constants, argument structs, errors.

Single source of truth for everything on the lock socket above the RPC
frame. Error helpers reproduce virtlockd's exact tuples (spec section 3).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from . import rpc, xdr

_U32 = struct.Struct(">I")

PROGRAM = 0x0EA7BEEF
PROGRAM_VERSION = 1
STRING_MAX = 65536
UUID_BUFLEN = 16

ACQUIRE_SHARED = 1
ACQUIRE_AUTOCREATE = 2

PROC_REGISTER = 1
PROC_RESTRICT = 2
PROC_NEW = 3
PROC_CREATE_RESOURCE = 4
PROC_DELETE_RESOURCE = 5
PROC_ACQUIRE_RESOURCE = 6
PROC_RELEASE_RESOURCE = 7
PROC_CREATE_LOCKSPACE = 8
PROC_TABLE_SIZE = 9          # procedure 0 is a hole

PROC_NAMES = {
    PROC_REGISTER: "Register",
    PROC_RESTRICT: "Restrict",
    PROC_NEW: "New",
    PROC_CREATE_RESOURCE: "CreateResource",
    PROC_DELETE_RESOURCE: "DeleteResource",
    PROC_ACQUIRE_RESOURCE: "AcquireResource",
    PROC_RELEASE_RESOURCE: "ReleaseResource",
    PROC_CREATE_LOCKSPACE: "CreateLockSpace",
}

# Flags each procedure accepts; CREATE_LOCKSPACE has no flags field at all.
ALLOWED_FLAGS = {
    PROC_REGISTER: 0,
    PROC_RESTRICT: 0,
    PROC_NEW: 0,
    PROC_CREATE_RESOURCE: 0,
    PROC_DELETE_RESOURCE: 0,
    PROC_ACQUIRE_RESOURCE: ACQUIRE_SHARED | ACQUIRE_AUTOCREATE,
    PROC_RELEASE_RESOURCE: 0,
}

# Default socket paths of the privileged daemon (spec 2.1, 4.10).
LOCK_SOCKET = "/run/libvirt/virtlockd-sock"
ADMIN_SOCKET = "/run/libvirt/virtlockd-admin-sock"
PID_FILE = "/run/virtlockd.pid"
CONFIG_FILE = "/etc/libvirt/virtlockd.conf"
LOCK_FD_NAME = "virtlockd.socket"
ADMIN_FD_NAME = "virtlockd-admin.socket"


@dataclass
class Owner:
    """A lock owner as REGISTER describes it: the domain and its QEMU pid."""

    uuid: bytes
    name: str
    id: int
    pid: int


class ResourceArgs(NamedTuple):
    """The arguments of every resource procedure."""

    path: str
    name: str
    flags: int


def _nn_string(d: xdr.Decoder) -> str:
    return d.string(STRING_MAX)


def decode_register(d: xdr.Decoder):
    uuid = d.fixed_opaque(UUID_BUFLEN)
    name = _nn_string(d)
    oid = d.u32()
    pid = d.u32()
    flags = d.u32()
    return Owner(uuid, name, oid, pid), flags


def decode_flags(d: xdr.Decoder):
    return d.u32()


def decode_new(d: xdr.Decoder):
    path = _nn_string(d)
    return path, d.u32()


def decode_resource(d: xdr.Decoder) -> ResourceArgs:
    args, d.pos = decode_resource_at(d.buf, d.pos, d.end)
    return args


def decode_resource_at(buf: bytes, pos: int, end: int):
    """The hot path (ACQUIRE/RELEASE): inlined XDR for path, name and flags.
    Returns (ResourceArgs, position after them)."""
    unpack = _U32.unpack_from
    if pos + 4 > end:
        raise xdr.XDRError("short buffer at offset %d" % pos)
    n = unpack(buf, pos)[0]
    a = pos + 4
    pos = a + n + (-n & 3)
    if n > STRING_MAX or pos + 4 > end:
        raise xdr.XDRError("bad or truncated string at offset %d" % (a - 4))
    m = unpack(buf, pos)[0]
    b = pos + 4
    pos = b + m + (-m & 3)
    if m > STRING_MAX or pos + 4 > end:
        raise xdr.XDRError("bad or truncated string at offset %d" % (b - 4))
    path = buf[a:a + n]
    name = buf[b:b + m]
    if b"\0" in path:                     # C strings end at the first NUL (see xdr.Decoder.string)
        path = path[:path.index(b"\0")]
    if b"\0" in name:
        name = name[:name.index(b"\0")]
    return ResourceArgs(path.decode("utf-8", "surrogateescape"), name.decode("utf-8", "surrogateescape"),
                        unpack(buf, pos)[0]), pos + 4


def decode_create_lockspace(d: xdr.Decoder) -> str:
    return _nn_string(d)


# --- encoders (used by the client library and the tests) -------------------

def encode_register(owner: Owner, flags: int = 0) -> bytes:
    return b"".join((xdr.fixed_opaque(owner.uuid), xdr.string(owner.name), xdr.u32(owner.id),
                     xdr.u32(owner.pid), xdr.u32(flags)))


def encode_resource(path: str, name: str, flags: int = 0) -> bytes:
    return xdr.string(path) + xdr.string(name) + xdr.u32(flags)


def encode_call(proc: int, serial: int, payload: bytes = b"") -> bytes:
    return rpc.encode_frame(PROGRAM, PROGRAM_VERSION, proc, rpc.CALL, serial, rpc.OK, payload)


# --- errors, exactly as virtlockd raises them -----------------------------

def err_flags(proc: int, flags: int) -> rpc.RPCError:
    func = "virLockSpaceProtocolDispatch" + PROC_NAMES[proc]
    unsupported = flags & ~ALLOWED_FLAGS[proc] & 0xFFFFFFFF
    return rpc.RPCError(rpc.ERR_INVALID_ARG, rpc.FROM_RPC,
                        "unsupported flags (0x%x) in function %s" % (unsupported, func),
                        rpc.LEVEL_ERROR, func, "flags", None, 0, 0)


def err_restricted() -> rpc.RPCError:
    return rpc.error(rpc.ERR_OPERATION_DENIED, rpc.FROM_RPC, "lock manager connection has been restricted")


def err_unregistered() -> rpc.RPCError:
    return rpc.error(rpc.ERR_OPERATION_INVALID, rpc.FROM_RPC, "lock owner details have not been registered")


def err_no_lockspace(path: str) -> rpc.RPCError:
    return rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_RPC, "Lockspace for path %s does not exist" % path)


def err_default_exists() -> rpc.RPCError:
    return rpc.error(rpc.ERR_OPERATION_INVALID, rpc.FROM_RPC, "the default lockspace already exists")


def err_lockspace_exists(path: str) -> rpc.RPCError:
    return rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_RPC, "Lockspace for path %s already exists" % path)


def err_busy(name: str) -> rpc.RPCError:
    return rpc.error(rpc.ERR_RESOURCE_BUSY, rpc.FROM_LOCKSPACE, "Lockspace resource '%s' is locked" % name)


def err_not_locked(name: str) -> rpc.RPCError:
    return rpc.error(rpc.ERR_RESOURCE_BUSY, rpc.FROM_LOCKSPACE, "Lockspace resource '%s' is not locked" % name)


def err_not_owner(pid: int) -> rpc.RPCError:
    return rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_LOCKSPACE, "owner %d does not hold the resource lock" % pid)


def err_not_dir(path: str) -> rpc.RPCError:
    return rpc.error(rpc.ERR_INTERNAL_ERROR, rpc.FROM_LOCKSPACE, "Lockspace location %s exists, but is not a directory" % path)


def err_system(text: str, exc: OSError) -> rpc.RPCError:
    return rpc.system_error(rpc.FROM_LOCKSPACE, text, exc.errno or 0, os.strerror(exc.errno or 0))


def err_touch(path: str, exc: OSError) -> rpc.RPCError:
    # raised by virFileTouch in virfile.c, whose error domain is VIR_FROM_NONE
    return rpc.system_error(0, "cannot create file '%s'" % path, exc.errno or 0, os.strerror(exc.errno or 0))


def err_storage_timeout(what: str, mount: str, seconds: float) -> rpc.RPCError:
    """lockd only: a storage call on a network filesystem missed its deadline
    (``what``: "Lockspace resource 'name'" or "Lockspace /dir")."""
    return rpc.error(rpc.ERR_OPERATION_TIMEOUT, rpc.FROM_LOCKSPACE,
                     "%s on %s did not answer within %g s" % (what, mount, seconds))


def err_storage_stalled(what: str, mount: str, waited: float, pending: int) -> rpc.RPCError:
    """lockd only: the filesystem has a call past its deadline; new calls are
    refused at once instead of queueing behind it."""
    return rpc.error(rpc.ERR_OPERATION_TIMEOUT, rpc.FROM_LOCKSPACE,
                     "%s on %s did not answer: that filesystem has not answered for %.0f s (%d call(s) "
                     "waiting); retry when its server answers again" % (what, mount, waited, pending))


def err_decode() -> rpc.RPCError:
    return rpc.rpc_error("Unable to decode message payload")


def err_unknown_proc(proc: int) -> rpc.RPCError:
    return rpc.rpc_error("unknown procedure: %d" % proc)


def err_unknown_program(prog: int, vers: int) -> rpc.RPCError:
    # libvirt formats both with %d, so a large program number prints negative
    return rpc.rpc_error("Cannot find program %d version %d" % (_signed(prog), _signed(vers)))


def err_status(status: int) -> rpc.RPCError:
    return rpc.rpc_error("Unexpected message status %u" % (status & 0xFFFFFFFF))


def _signed(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v
