"""Differential: malformed and unexpected input (spec §2.4, §2.6, §2.9).

For each input the transcript records what came back: a reply frame, or
"EOF" when the daemon closed the connection without replying. After each
input a keepalive PING on the same connection shows whether the connection is
still served and whether anything else was sent (`barrier()`), with no
sleeping. The runner's witness then proves the daemon is alive and another
client's lease is intact (see conftest).
"""
from __future__ import annotations

import socket
import struct

import pytest

from lockd import protocol as P
from lockd import rpc, xdr
from testbed.wire import PING, UUID_A, raw_header, register_args, res_args

pytestmark = pytest.mark.c_daemon

LOCK, V = P.PROGRAM, P.PROGRAM_VERSION


FRAMING = {
    # length word < 4: "packet too small" -> connection closed, no reply
    "length 0": struct.pack(">I", 0),
    "length 3": struct.pack(">I", 3),
    # length 4..27: header cannot be decoded -> closed
    "length 4 (no header)": struct.pack(">I", 4),
    "length 27 (short header)": struct.pack(">I", 27) + b"\0" * 23,
    # (length - 4) > 32 MiB -> closed without reading the body
    "length 32MiB+5 (too large)": struct.pack(">I", rpc.MESSAGE_MAX + 5),
    "length 0xffffffff": struct.pack(">I", 0xFFFFFFFF),
    "length 0x80000000": struct.pack(">I", 0x80000000),
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_framing_errors(differential, case):
    def sc(r):
        c = r.conn()
        c.send(FRAMING[case])
        r.rec(case, c.recv())
    differential(sc)


def test_truncated_frames(differential):
    """The peer stops sending mid-frame and half-closes: EOF, no reply, no harm."""
    disk_args = res_args("", "/nonexistent")
    full = P.encode_call(P.PROC_ACQUIRE_RESOURCE, 0, disk_args)

    def sc(r):
        for cut in (1, 3, 4, 10, 27, 28, len(full) - 1):
            c = r.conn()
            c.send(full[:cut])
            c.sock.shutdown(socket.SHUT_WR)
            r.rec(f"truncated after {cut} bytes", c.recv())
        c = r.conn()
        c.send(struct.pack(">I", 1000) + full[4:])  # claims more than it sends
        c.sock.shutdown(socket.SHUT_WR)
        r.rec("length word larger than the data sent", c.recv())
    differential(sc)


def test_length_shorter_than_payload(differential):
    """Length word covers the header only, args follow as the 'next frame'."""
    def sc(r):
        c = r.conn()
        body = register_args(UUID_A, "vm1", 1, r.fake_pid(1))
        frame = P.encode_call(P.PROC_REGISTER, 0, body)
        c.send(struct.pack(">I", 28) + frame[4:28])
        r.rec("register with no payload (decode error)", c.recv())
        r.rec("connection still served", repr(c.barrier()))
        # what follows the short frame is parsed as a new frame: send a real one
        c.send(P.encode_call(P.PROC_REGISTER, 1, body))
        r.rec("next real call", c.recv())
    differential(sc)


HEADERS = {
    "unknown program, CALL": raw_header(0x12345678, 1, 1, rpc.CALL, 5, rpc.OK),
    "unknown program > 2^31 (printed signed)": raw_header(0xDEADBEEF, 1, 1, rpc.CALL, 5, rpc.OK),
    "unknown program, CALL_WITH_FDS": raw_header(0x12345678, 1, 1, rpc.CALL_WITH_FDS, 5, rpc.OK,
                                                 payload=xdr.u32(0)),
    "unknown program, MESSAGE (dropped)": raw_header(0x12345678, 1, 1, rpc.MESSAGE, 5, rpc.OK),
    "unknown program, REPLY (dropped)": raw_header(0x12345678, 1, 1, rpc.REPLY, 5, rpc.OK),
    "lock program version 2": raw_header(LOCK, 2, 1, rpc.CALL, 6, rpc.OK),
    "lock program version 0": raw_header(LOCK, 0, 1, rpc.CALL, 6, rpc.OK),
    "proc 0 (hole)": raw_header(LOCK, V, 0, rpc.CALL, 7, rpc.OK),
    "proc 9 (past the table)": raw_header(LOCK, V, 9, rpc.CALL, 7, rpc.OK),
    "proc -1": raw_header(LOCK, V, -1, rpc.CALL, 7, rpc.OK),
    "proc 0x7fffffff": raw_header(LOCK, V, 0x7FFFFFFF, rpc.CALL, 7, rpc.OK),
    "proc -2147483648": raw_header(LOCK, V, -0x80000000, rpc.CALL, 7, rpc.OK),
    "CALL with status ERROR": raw_header(LOCK, V, P.PROC_RESTRICT, rpc.CALL, 8, rpc.ERROR,
                                         payload=xdr.u32(0)),
    "CALL with status CONTINUE": raw_header(LOCK, V, P.PROC_RESTRICT, rpc.CALL, 8, rpc.CONTINUE,
                                            payload=xdr.u32(0)),
    "CALL with status 7": raw_header(LOCK, V, P.PROC_RESTRICT, rpc.CALL, 8, 7, payload=xdr.u32(0)),
    "type REPLY to lock program": raw_header(LOCK, V, P.PROC_REGISTER, rpc.REPLY, 9, rpc.OK),
    "type MESSAGE to lock program": raw_header(LOCK, V, P.PROC_REGISTER, rpc.MESSAGE, 9, rpc.OK),
    "type STREAM to lock program": raw_header(LOCK, V, P.PROC_REGISTER, rpc.STREAM, 9, rpc.OK),
    "type REPLY_WITH_FDS to lock program": raw_header(LOCK, V, P.PROC_REGISTER, rpc.REPLY_WITH_FDS, 9, rpc.OK),
    "type STREAM_HOLE to lock program": raw_header(LOCK, V, P.PROC_REGISTER, rpc.STREAM_HOLE, 9, rpc.OK),
    "type 99 to lock program": raw_header(LOCK, V, P.PROC_REGISTER, 99, 9, rpc.OK),
    "type -1 to lock program": raw_header(LOCK, V, P.PROC_REGISTER, -1, 9, rpc.OK),
    "CALL_WITH_FDS claiming 0 fds, RESTRICT": raw_header(LOCK, V, P.PROC_RESTRICT, rpc.CALL_WITH_FDS, 9,
                                                         rpc.OK, payload=xdr.u32(0) + xdr.u32(0)),
    "CALL_WITH_FDS claiming 33 fds": raw_header(LOCK, V, P.PROC_RESTRICT, rpc.CALL_WITH_FDS, 9,
                                                rpc.OK, payload=xdr.u32(33) + xdr.u32(0)),
    "keepalive PING": PING,
    "keepalive PONG (ignored)": raw_header(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PONG, rpc.MESSAGE, 0, rpc.OK),
    "keepalive proc 3 (ignored)": raw_header(rpc.KEEPALIVE_PROGRAM, 1, 3, rpc.MESSAGE, 0, rpc.OK),
    "keepalive PING as CALL": raw_header(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PING, rpc.CALL, 3, rpc.OK),
    "keepalive version 2 PING": raw_header(rpc.KEEPALIVE_PROGRAM, 2, rpc.KEEPALIVE_PING, rpc.MESSAGE, 0, rpc.OK),
    "keepalive PING with serial 5": raw_header(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PING, rpc.MESSAGE, 5, rpc.OK),
    "admin program on the lock socket": raw_header(0x06900690, 1, 1, rpc.CALL, 1, rpc.OK),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_bad_headers(differential, case):
    """One unexpected header per connection. The reply (or its absence) is
    read through a PING barrier, so 'no reply' is observed, not assumed."""
    def sc(r):
        c = r.conn()
        c.send(HEADERS[case])
        r.rec(case + ": frames before PONG", repr([o.hex() if isinstance(o, bytes) else o
                                                   for o in c.barrier()]))
        # The connection is still usable for real work afterwards (or closed: then EOF).
        r.rec(case + ": then REGISTER", c.register(UUID_A, "vm1", 1, r.fake_pid(1)))
    differential(sc)


def _payloads(r):
    disk = r.path("disk1.img")
    good_reg = register_args(UUID_A, "vm1", 1, r.fake_pid(1))
    return {
        "register: empty payload": (P.PROC_REGISTER, b""),
        "register: truncated uuid": (P.PROC_REGISTER, good_reg[:10]),
        "register: name length beyond payload": (P.PROC_REGISTER, UUID_A + xdr.u32(1000) + b"abcd"),
        "register: missing flags": (P.PROC_REGISTER, good_reg[:-4]),
        "register: trailing garbage": (P.PROC_REGISTER, good_reg + b"\xde\xad\xbe\xef"),
        "register: name 65537 bytes": (P.PROC_REGISTER, UUID_A + xdr.string("n" * 65537)
                                       + xdr.u32(1) + xdr.u32(r.fake_pid(1)) + xdr.u32(0)),
        "register: name 65536 bytes (ok)": (P.PROC_REGISTER, UUID_A + xdr.string("n" * 65536)
                                            + xdr.u32(1) + xdr.u32(r.fake_pid(1)) + xdr.u32(0)),
        "register: name length 0xffffffff": (P.PROC_REGISTER, UUID_A + xdr.u32(0xFFFFFFFF) + b"\0" * 16),
        "register: nonzero padding": (P.PROC_REGISTER, UUID_A + xdr.u32(3) + b"vm1\xff"
                                      + xdr.u32(1) + xdr.u32(r.fake_pid(1)) + xdr.u32(0)),
        "register: NUL inside name": (P.PROC_REGISTER, UUID_A + xdr.string(b"v\0m") + xdr.u32(1)
                                      + xdr.u32(r.fake_pid(1)) + xdr.u32(0)),
        "register: invalid UTF-8 name": (P.PROC_REGISTER, UUID_A + xdr.string(b"\xff\xfe")
                                         + xdr.u32(1) + xdr.u32(r.fake_pid(1)) + xdr.u32(0)),
        "restrict: empty payload": (P.PROC_RESTRICT, b""),
        "restrict: 2 bytes": (P.PROC_RESTRICT, b"\0\0"),
        "acquire: path only": (P.PROC_ACQUIRE_RESOURCE, xdr.string("")),
        "acquire: path 65537 bytes": (P.PROC_ACQUIRE_RESOURCE, res_args("p" * 65537, "x")),
        "acquire: name 65537 bytes": (P.PROC_ACQUIRE_RESOURCE, res_args("", "n" * 65537)),
        "acquire: missing flags": (P.PROC_ACQUIRE_RESOURCE, res_args("", disk)[:-4]),
        "acquire: garbage": (P.PROC_ACQUIRE_RESOURCE, b"\x13\x37" * 9),
        "release: truncated": (P.PROC_RELEASE_RESOURCE, res_args("", disk)[:-6]),
        "create_lockspace: empty": (P.PROC_CREATE_LOCKSPACE, b""),
        "create_lockspace: trailing flags word": (P.PROC_CREATE_LOCKSPACE, xdr.string(r.path("ls")) + xdr.u32(0)),
        "create_lockspace: path 65537 bytes": (P.PROC_CREATE_LOCKSPACE, xdr.string("q" * 65537)),
        "new: missing flags": (P.PROC_NEW, xdr.string(r.path("ls2"))),
        "delete_resource: garbage": (P.PROC_DELETE_RESOURCE, b"\xff" * 40),
    }


def test_garbage_payloads(differential):
    """Undecodable payloads get 'Unable to decode message payload' (spec §2.6);
    every case is sent on a registered connection and on a fresh one."""
    def sc(r):
        c = r.registered()
        for label, (proc, payload) in _payloads(r).items():
            c.send(P.encode_call(proc, 50, payload))
            r.rec(label, c.recv())
            if c.closed:
                c = r.registered()
        fresh = r.conn()
        for label, (proc, payload) in _payloads(r).items():
            fresh.send(P.encode_call(proc, 51, payload))
            r.rec("fresh conn, " + label, fresh.recv())
        # the state a good register on `c` produced afterwards is still sane
        r.rec("acquire on registered conn after garbage", c.acquire("", r.path("disk1.img")))
    differential(sc)


def test_max_frame(differential):
    """A frame of exactly the maximum size (32 MiB + length word) is read in full
    and its payload rejected; the connection then still works."""
    def sc(r):
        c = r.registered()
        payload = b"\0" * (rpc.MESSAGE_MAX - 24)
        frame = raw_header(LOCK, V, P.PROC_ACQUIRE_RESOURCE, rpc.CALL, 60, rpc.OK, payload=payload)
        assert len(frame) == rpc.MESSAGE_MAX + 4
        c.send(frame)
        r.rec("32 MiB frame of zeros (acquire path='' name='' then 32 MiB of trailing zeros)", c.recv())
        r.rec("then PING", repr(c.barrier()))
    differential(sc)


def test_bad_frame_between_good_calls(differential):
    """A client's held lease survives its own later protocol errors."""
    def sc(r):
        c = r.registered()
        disk = r.path("disk1.img")
        r.rec("acquire", c.acquire("", disk))
        c.send(raw_header(LOCK, V, 42, rpc.CALL, 2, rpc.OK))
        r.rec("unknown proc", c.recv())
        c.send(struct.pack(">I", 2))
        r.rec("then a fatal framing error", c.recv())
        other = r.registered(name="vm3", oid=3)
        r.rec("lease of the dropped connection's owner still held", other.acquire("", disk))
    differential(sc)
