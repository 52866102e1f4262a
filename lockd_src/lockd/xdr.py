# SPDX-License-Identifier: GPL-3.0-or-later
"""XDR primitives (RFC 4506), the subset libvirt's RPC uses.

Decoding works on a memoryview-free ``bytes`` buffer with an explicit
offset so that the hot path stays a handful of ``struct.unpack_from`` calls.
"""
from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")


class XDRError(ValueError):
    """The bytes do not decode as the expected XDR type."""


def pad4(n: int) -> int:
    """Bytes of zero padding after ``n`` bytes of opaque data."""
    return (4 - (n & 3)) & 3


class Decoder:
    """Reads XDR values from ``buf[pos:end]``, advancing ``pos``."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def _take(self, n: int) -> int:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise XDRError("short buffer: need %d bytes at offset %d, have %d" % (n, pos, self.end - pos))
        self.pos = pos + n
        return pos

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self._take(4))[0]

    def i32(self) -> int:
        return _I32.unpack_from(self.buf, self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self._take(8))[0]

    def i64(self) -> int:
        return _I64.unpack_from(self.buf, self._take(8))[0]

    def boolean(self) -> bool:
        v = self.i32()
        if v not in (0, 1):
            raise XDRError("invalid bool %d" % v)
        return bool(v)

    def fixed_opaque(self, n: int) -> bytes:
        pos = self._take(n + pad4(n))
        return bytes(self.buf[pos:pos + n])

    def opaque(self, maxlen: int) -> bytes:
        n = self.u32()
        if n > maxlen:
            raise XDRError("opaque length %d exceeds maximum %d" % (n, maxlen))
        return self.fixed_opaque(n)

    def string(self, maxlen: int) -> str:
        # libvirt decodes into a C string: whatever follows a NUL is invisible
        # to it, so cut there too. Decode leniently: never die on odd bytes.
        raw = self.opaque(maxlen)
        if b"\0" in raw:
            raw = raw[:raw.index(b"\0")]
        return raw.decode("utf-8", "surrogateescape")

    def optional(self, decode_value):
        present = self.u32()
        if present == 0:
            return None
        if present != 1:
            raise XDRError("invalid optional discriminant %d" % present)
        return decode_value()

    def done(self) -> bool:
        return self.pos == self.end


def u32(v: int) -> bytes:
    return _U32.pack(v & 0xFFFFFFFF)


def i32(v: int) -> bytes:
    return _I32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def i64(v: int) -> bytes:
    return _I64.pack(v)


def boolean(v: bool) -> bytes:
    return _I32.pack(1 if v else 0)


def fixed_opaque(data: bytes) -> bytes:
    return data + b"\0" * pad4(len(data))


def opaque(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data + b"\0" * pad4(len(data))


def string(s: str | bytes) -> bytes:
    if isinstance(s, str):
        s = s.encode("utf-8", "surrogateescape")
    return opaque(s)


def optional_string(s: str | bytes | None) -> bytes:
    if s is None:
        return b"\0\0\0\0"
    return b"\0\0\0\1" + string(s)
