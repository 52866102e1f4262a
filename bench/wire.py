# SPDX-License-Identifier: GPL-3.0-or-later
"""Precomputed lock-protocol frames and the small socket helpers the load
generator needs. Constants and encoders come from `lockd.protocol` and
`lockd.rpc` (the single source of truth); nothing here re-declares them.

Owner pids: every owner that the benchmark registers on a connection it
later closes uses a *fake* pid above kernel.pid_max (`fake_pid_base()`),
so the daemons' owner-EOF kill loop (spec 4.6) can never hit a real process.
The vmstart scenario needs a real owner (a stand-in child, see loadgen).
"""
from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import time
from pathlib import Path
from typing import Optional, Sequence

from bench import _path  # noqa: F401  (puts lockd_src on sys.path when not installed)
from lockd import protocol as P
from lockd import rpc as R
from lockd import xdr

_LEN = struct.Struct(">I")


class BenchError(RuntimeError):
    """A scenario cannot continue: a daemon answered wrongly, hung or died."""


def fake_pid_base() -> int:
    """First pid that no process can ever have (kernel.pid_max is an upper bound)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1000


def owner_uuid(n: int) -> bytes:
    return hashlib.md5(b"lockd-bench-%d" % n).digest()


def register(n: int, pid: int, serial: int = 0) -> bytes:
    """REGISTER for owner number n (name vm<n>, id n+1) with owner pid `pid`."""
    owner = P.Owner(owner_uuid(n), "vm%d" % n, n + 1, pid)
    return P.encode_call(P.PROC_REGISTER, serial, P.encode_register(owner))


def restrict(serial: int = 1) -> bytes:
    return P.encode_call(P.PROC_RESTRICT, serial, xdr.u32(0))


def acquire(name: str, serial: int, lockspace: str = "", flags: int = 0) -> bytes:
    return P.encode_call(P.PROC_ACQUIRE_RESOURCE, serial, P.encode_resource(lockspace, name, flags))


def release(name: str, serial: int, lockspace: str = "") -> bytes:
    return P.encode_call(P.PROC_RELEASE_RESOURCE, serial, P.encode_resource(lockspace, name, 0))


def ok_reply(call: bytes) -> bytes:
    """The exact 28-byte success reply the daemon must send for `call`."""
    _, prog, vers, proc, _, serial, _ = R.HEADER.unpack_from(call, 0)
    return R.encode_frame(prog, vers, proc, R.REPLY, serial, R.OK)


def describe_reply(reply: bytes) -> str:
    """Human text for an unexpected reply (error replies are decoded)."""
    if len(reply) < 28:
        return "short reply (%d bytes): %s" % (len(reply), reply.hex())
    h = R.decode_header(reply)
    if h.status == R.ERROR:
        try:
            err = R.RPCError.decode(reply, 28)
            return "error reply to proc %d: code %d domain %d: %s" % (h.proc, err.code, err.domain, err.message)
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return "undecodable error reply to proc %d (%s)" % (h.proc, exc)
    return "unexpected reply %s" % reply[:64].hex()


def is_busy(reply: bytes) -> bool:
    if len(reply) < 28 or R.decode_header(reply).status != R.ERROR:
        return False
    return R.RPCError.decode(reply, 28).code == R.ERR_RESOURCE_BUSY


def connect(path: str, timeout: Optional[float] = 30.0) -> socket.socket:
    """Blocking connect that waits for room in the daemon's listen backlog.

    A non-blocking AF_UNIX connect fails with EAGAIN at once when the backlog
    is full (the C daemon shrinks it to 30), so Python's settimeout() cannot be
    used for it; the kernel bounds a blocking connect by SO_SNDTIMEO instead.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if timeout is not None:
            sec = int(timeout)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                         struct.pack("ll", sec, int((timeout - sec) * 1e6)))
        try:
            s.connect(path)
        except BlockingIOError:
            raise socket.timeout("connect to %s waited %.0f s for the daemon to accept" % (path, timeout)) from None
        s.settimeout(timeout)
    except BaseException:
        s.close()
        raise
    return s


def recv_frame(s: socket.socket) -> bytes:
    """One whole reply frame from a blocking socket."""
    buf = s.recv(65536)
    if not buf:
        raise BenchError("daemon closed the connection instead of replying")
    while True:
        if len(buf) >= 4:
            n = _LEN.unpack_from(buf, 0)[0]
            if len(buf) >= n:
                return buf
        more = s.recv(65536)
        if not more:
            raise BenchError("daemon closed the connection in the middle of a reply")
        buf += more


def call(s: socket.socket, frame: bytes) -> bytes:
    s.sendall(frame)
    return recv_frame(s)


def call_ok(s: socket.socket, frame: bytes, what: str = "") -> None:
    reply = call(s, frame)
    if reply != ok_reply(frame):
        raise BenchError("%s: %s" % (what or "call", describe_reply(reply)))


def run_rounds(socks: Sequence[socket.socket], scripts: Sequence[Sequence[bytes]],
               timeout: float, expected: Optional[Sequence[Sequence[bytes]]] = None) -> list:
    """Pipeline short call sequences over many connections.

    scripts[i] is the list of frames for socks[i]. Round r sends frame r on
    every connection that has one, then collects every reply (expected[i][r],
    default the plain OK reply to the call; the daemons
    answer one call per connection at a time, so this keeps the whole batch in
    flight, the way many VMs starting together would). Returns the list of
    (conn index, frame, reply) that were not the plain OK reply. Raises
    BenchError if a reply does not come within `timeout` seconds (a hang).
    """
    bad = []
    rounds = max((len(sc) for sc in scripts), default=0)
    ep = select.epoll()
    try:
        for r in range(rounds):
            pending = {}
            for i, (s, sc) in enumerate(zip(socks, scripts)):
                if r < len(sc):
                    s.sendall(sc[r])
                    pending[s.fileno()] = [i, b""]
                    ep.register(s.fileno(), select.EPOLLIN)
            deadline = time.monotonic() + timeout
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        "%d of %d connections got no reply within %.0f s in round %d "
                        "(the daemon hangs, e.g. at its max_clients limit)"
                        % (len(pending), len(socks), timeout, r + 1))
                for fd, _ in ep.poll(min(left, 1.0)):
                    st = pending.get(fd)
                    if st is None:
                        continue
                    i = st[0]
                    data = socks[i].recv(65536)
                    if not data:
                        raise BenchError("daemon closed connection %d (round %d) without a reply" % (i, r + 1))
                    st[1] += data
                    buf = st[1]
                    if len(buf) >= 4 and len(buf) >= _LEN.unpack_from(buf, 0)[0]:
                        frame = scripts[i][r]
                        want = expected[i][r] if expected is not None else ok_reply(frame)
                        if buf != want:
                            bad.append((i, frame, buf))
                        ep.unregister(fd)
                        del pending[fd]
    finally:
        ep.close()
    return bad


def lease_files(directory: Path, prefix: str, count: int) -> list:
    """Create (once) and return `count` empty disk-image stand-ins."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = directory / ("%s-%05d.img" % (prefix, i))
        if not p.exists():
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        paths.append(str(p))
    return paths
