# SPDX-License-Identifier: GPL-3.0-or-later
"""libvirt's generic "virNet" RPC layer: frame, header, error struct, limits.

Values come from libvirt's ``virnetprotocol.x`` and ``virerror.h``
(spec sections 2.2-2.9). This module is the single source of truth for them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from . import xdr

# Size limits (virnetprotocol.x)
MESSAGE_INITIAL = 65536
MESSAGE_MAX = 33554432            # frame size excluding the 4-byte length word
MESSAGE_HEADER_MAX = 24
MESSAGE_PAYLOAD_MAX = 33554408
MESSAGE_LEN_MAX = 4
MESSAGE_STRING_MAX = 4194304      # strings inside virNetMessageError
MESSAGE_NUM_FDS_MAX = 32

# enum virNetMessageType
CALL = 0
REPLY = 1
MESSAGE = 2
STREAM = 3
CALL_WITH_FDS = 4
REPLY_WITH_FDS = 5
STREAM_HOLE = 6

# enum virNetMessageStatus
OK = 0
ERROR = 1
CONTINUE = 2

# Keepalive program
KEEPALIVE_PROGRAM = 0x6B656570
KEEPALIVE_VERSION = 1
KEEPALIVE_PING = 1
KEEPALIVE_PONG = 2

# virErrorNumber values used by virtlockd
ERR_INTERNAL_ERROR = 1
ERR_INVALID_ARG = 8
ERR_OPERATION_DENIED = 29
ERR_SYSTEM_ERROR = 38
ERR_RPC = 39
ERR_OPERATION_INVALID = 55
ERR_CONFIG_UNSUPPORTED = 67
ERR_OPERATION_TIMEOUT = 68
ERR_RESOURCE_BUSY = 87

# virErrorDomain values
FROM_RPC = 7
FROM_CONF = 9
FROM_LOCKING = 42
FROM_LOCKSPACE = 51
FROM_ADMIN = 62

# virErrorLevel
LEVEL_ERROR = 2

# Message templates that prefix the detail text (libvirt 9.0.0 spelling).
TEMPLATES = {
    ERR_INTERNAL_ERROR: "internal error: %s",
    ERR_INVALID_ARG: "invalid argument: %s",
    ERR_OPERATION_DENIED: "operation forbidden: %s",
    ERR_SYSTEM_ERROR: "%s",
    ERR_RPC: "%s",
    ERR_OPERATION_INVALID: "Requested operation is not valid: %s",
    ERR_CONFIG_UNSUPPORTED: "unsupported configuration: %s",
    ERR_OPERATION_TIMEOUT: "Timed out during operation: %s",
    ERR_RESOURCE_BUSY: "resource busy: %s",
}

HEADER = struct.Struct(">IIIiiIi")   # length, prog, vers, proc, type, serial, status
HEADER_SIZE = HEADER.size           # 28: the length word plus the 24-byte header
LEN = struct.Struct(">I")
FRAME_MAX = MESSAGE_MAX + MESSAGE_LEN_MAX


class FrameError(Exception):
    """The byte stream cannot be framed; the connection must be closed."""


@dataclass
class Header:
    """The six header fields after the length word."""

    prog: int
    vers: int
    proc: int
    type: int
    serial: int
    status: int


@dataclass
class RPCError(Exception):
    """A ``virNetMessageError``: what a failed call replies with."""

    code: int
    domain: int
    message: Optional[str]
    level: int = LEVEL_ERROR
    str1: Optional[str] = None
    str2: Optional[str] = None
    str3: Optional[str] = None
    int1: int = -1
    int2: int = -1

    def __str__(self) -> str:
        return self.message or "Unknown error"

    def encode(self) -> bytes:
        return b"".join((
            xdr.i32(self.code), xdr.i32(self.domain), xdr.optional_string(self.message),
            xdr.i32(self.level), b"\0\0\0\0",                 # dom: absent
            xdr.optional_string(self.str1), xdr.optional_string(self.str2),
            xdr.optional_string(self.str3), xdr.i32(self.int1), xdr.i32(self.int2),
            b"\0\0\0\0",                                        # net: absent
        ))

    @classmethod
    def decode(cls, buf: bytes, pos: int = 0) -> "RPCError":
        d = xdr.Decoder(buf, pos)

        def s():
            return d.string(MESSAGE_STRING_MAX)
        code = d.i32()
        domain = d.i32()
        message = d.optional(s)
        level = d.i32()
        d.optional(lambda: (s(), d.fixed_opaque(16), d.i32()))
        str1, str2, str3 = d.optional(s), d.optional(s), d.optional(s)
        int1, int2 = d.i32(), d.i32()
        d.optional(lambda: (s(), d.fixed_opaque(16)))
        return cls(code, domain, message, level, str1, str2, str3, int1, int2)


def error(code: int, domain: int, detail: str) -> RPCError:
    """An error as ``virReportError`` raises it: template + detail."""
    template = TEMPLATES[code]
    return RPCError(code, domain, template % detail, LEVEL_ERROR, template, detail, None, -1, -1)


def system_error(domain: int, text: str, errno_: int, strerror: str) -> RPCError:
    """An error as ``virReportSystemError`` raises it."""
    message = "%s: %s" % (text, strerror)
    return RPCError(ERR_SYSTEM_ERROR, domain, message, LEVEL_ERROR, "%s", message, None, errno_, -1)


def rpc_error(detail: str) -> RPCError:
    return error(ERR_RPC, FROM_RPC, detail)


def encode_frame(prog: int, vers: int, proc: int, mtype: int, serial: int, status: int,
                 payload: bytes = b"") -> bytes:
    return HEADER.pack(HEADER_SIZE + len(payload), prog, vers, proc, mtype, serial, status) + payload


# -- replies: the request path builds every reply with these two ----------------

def reply_ok_frame(prog: int, vers: int, proc: int, serial: int) -> bytes:
    """A REPLY with status OK and no payload (every lock procedure returns void)."""
    return HEADER.pack(HEADER_SIZE, prog, vers, proc, REPLY, serial, OK)


def reply_error_frame(prog: int, vers: int, proc: int, serial: int, err: RPCError) -> bytes:
    body = err.encode()
    return HEADER.pack(HEADER_SIZE + len(body), prog, vers, proc, REPLY, serial, ERROR) + body


def reply_ok(h: Header, payload: bytes = b"") -> bytes:
    return encode_frame(h.prog, h.vers, h.proc, REPLY, h.serial, OK, payload)


def reply_error(h: Header, err: RPCError) -> bytes:
    return reply_error_frame(h.prog, h.vers, h.proc, h.serial, err)


# -- framing: the request path and the clients use these -------------------------

def frame_length(buf, pos: int = 0) -> int:
    """Total frame length from the length word at ``pos``, validated like libvirt
    (``virNetMessageDecodeLength``); a bad one means the stream is lost."""
    n = LEN.unpack_from(buf, pos)[0]
    if n < MESSAGE_LEN_MAX:
        raise FrameError("packet %d bytes received from server too small, want %d" % (n, MESSAGE_LEN_MAX))
    if n > FRAME_MAX:
        raise FrameError("packet %d bytes received from server too large, want %d" % (n, MESSAGE_MAX))
    return n


def header_at(buf, pos: int, n: int):
    """``(prog, vers, proc, type, serial, status)`` of the whole frame of ``n``
    bytes at ``pos`` (``virNetMessageDecodeHeader``)."""
    if n < HEADER_SIZE:
        raise FrameError("Unable to decode message header")
    return HEADER.unpack_from(buf, pos)[1:]


def decode_header(frame: bytes) -> Header:
    return Header(*header_at(frame, 0, len(frame)))
