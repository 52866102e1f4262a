"""Raw-socket access to a lock daemon for differential and fault tests.

Requests are built with the package's own encoders and constants
(`lockd.protocol`, `lockd.rpc`, `lockd.xdr`: the single source of truth), but
every reply is kept as raw bytes: the tests compare what the C virtlockd and
ours put on the wire, not what a decoder makes of it. `describe()` renders a
frame for humans (assertion messages only).
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Union

from lockd import protocol as P
from lockd import rpc, xdr

EOF = "EOF"          # the daemon closed the connection without replying
Outcome = Union[bytes, str]

UUID_A = bytes.fromhex("11111111111141118111111111111111")
UUID_B = bytes.fromhex("22222222222242228222222222222222")
UUID_W = bytes.fromhex("77777777777747778777777777777777")

PING = rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PING,
                        rpc.MESSAGE, 0, rpc.OK)
PONG = rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PONG,
                        rpc.MESSAGE, 0, rpc.OK)


def register_args(uuid: bytes, name: str, oid: int, pid: int, flags: int = 0) -> bytes:
    return P.encode_register(P.Owner(uuid, name, oid, pid), flags)


def flags_args(flags: int = 0) -> bytes:
    return xdr.u32(flags)


def new_args(path: str, flags: int = 0) -> bytes:
    return xdr.string(path) + xdr.u32(flags)


def res_args(path: str, name: str, flags: int = 0) -> bytes:
    return P.encode_resource(path, name, flags)


def lockspace_args(path: str) -> bytes:
    return xdr.string(path)


def raw_header(prog: int, vers: int, proc: int, mtype: int, serial: int, status: int,
               length: Optional[int] = None, payload: bytes = b"") -> bytes:
    """A frame with every header field (and optionally the length word) chosen freely."""
    n = 28 + len(payload) if length is None else length
    return struct.pack(">IIIiiIi", n & 0xFFFFFFFF, prog & 0xFFFFFFFF, vers & 0xFFFFFFFF,
                       _s32(proc), _s32(mtype), serial & 0xFFFFFFFF, _s32(status)) + payload


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def describe(out: Outcome) -> str:
    """Human rendering of a reply (for assertion messages)."""
    if isinstance(out, str):
        return out
    if len(out) < 28:
        return f"short frame {out.hex()}"
    h = rpc.decode_header(out)
    text = (f"len={len(out)} prog={h.prog:#x} vers={h.vers} proc={h.proc} type={h.type} "
            f"serial={h.serial} status={h.status}")
    if h.status == rpc.ERROR:
        try:
            e = rpc.RPCError.decode(out, 28)
            text += (f" code={e.code} domain={e.domain} level={e.level} message={e.message!r} "
                     f"str1={e.str1!r} str2={e.str2!r} str3={e.str3!r} int1={e.int1} int2={e.int2}")
        except Exception as exc:  # noqa: BLE001 - describing garbage is fine
            text += f" (undecodable error payload: {exc})"
    return text


def error_of(out: Outcome) -> Optional[rpc.RPCError]:
    if isinstance(out, bytes) and len(out) >= 28 and rpc.decode_header(out).status == rpc.ERROR:
        return rpc.RPCError.decode(out, 28)
    return None


class Conn:
    """One client connection speaking raw frames."""

    def __init__(self, path: Union[str, os.PathLike], timeout: float = 15.0):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking connect: with a timeout set, an AF_UNIX connect to a full
        # listen backlog fails at once with EAGAIN instead of waiting its turn.
        self.sock.connect(self.path)
        self.sock.settimeout(timeout)
        self.serial = 0
        self.closed = False

    # -- low level --------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return buf
            buf += chunk
        return buf

    def recv(self) -> Outcome:
        """One whole frame, or EOF. A socket timeout raises (the daemon hung)."""
        head = self._recv_exact(4)
        if len(head) < 4:
            return EOF
        n = struct.unpack(">I", head)[0]
        body = self._recv_exact(n - 4)
        if len(body) < n - 4:
            return EOF
        return head + body

    # -- calls ------------------------------------------------------------
    def call(self, proc: int, payload: bytes = b"") -> Outcome:
        frame = P.encode_call(proc, self.serial, payload)
        self.serial += 1
        try:
            self.send(frame)
        except (BrokenPipeError, ConnectionResetError):
            return EOF
        return self.recv()

    def register(self, uuid: bytes, name: str, oid: int, pid: int, flags: int = 0) -> Outcome:
        return self.call(P.PROC_REGISTER, register_args(uuid, name, oid, pid, flags))

    def restrict(self, flags: int = 0) -> Outcome:
        return self.call(P.PROC_RESTRICT, flags_args(flags))

    def new(self, path: str, flags: int = 0) -> Outcome:
        return self.call(P.PROC_NEW, new_args(path, flags))

    def create_resource(self, path: str, name: str, flags: int = 0) -> Outcome:
        return self.call(P.PROC_CREATE_RESOURCE, res_args(path, name, flags))

    def delete_resource(self, path: str, name: str, flags: int = 0) -> Outcome:
        return self.call(P.PROC_DELETE_RESOURCE, res_args(path, name, flags))

    def acquire(self, path: str, name: str, flags: int = 0) -> Outcome:
        return self.call(P.PROC_ACQUIRE_RESOURCE, res_args(path, name, flags))

    def release(self, path: str, name: str, flags: int = 0) -> Outcome:
        return self.call(P.PROC_RELEASE_RESOURCE, res_args(path, name, flags))

    def create_lockspace(self, path: str) -> Outcome:
        return self.call(P.PROC_CREATE_LOCKSPACE, lockspace_args(path))

    def barrier(self) -> "list[Outcome]":
        """Send a keepalive PING and return every frame that arrives before the PONG.

        Requests on one connection are handled strictly in order, so this shows
        deterministically (no sleeping) whether an earlier message got a reply:
        [] means it did not. [..., EOF] means the daemon closed the connection.
        """
        try:
            self.send(PING)
        except (BrokenPipeError, ConnectionResetError):
            return [EOF]
        seen: list[Outcome] = []
        while True:
            out = self.recv()
            if out == PONG:
                return seen
            seen.append(out)
            if out == EOF:
                return seen

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_setlk(path: Union[str, os.PathLike]) -> str:
    """Another process tries F_SETLK (write lock, byte 0, length 1, non-blocking)
    on `path`, as a second host or a second daemon would. Returns "locked" when
    the kernel refuses (someone holds the lease byte), "free" when it was taken
    (and released again as the probe exits)."""
    code = ("import fcntl,os,sys\n"
            "fd=os.open(sys.argv[1],os.O_RDWR)\n"
            "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,1,0,0); print('free')\n"
            "except OSError: print('locked')\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()


class ForeignLock:
    """Another process (think: virtlockd on another host sharing the storage)
    holding a POSIX lock on byte 0 of `path` until close()."""

    def __init__(self, path: Union[str, os.PathLike], shared: bool = False):
        code = ("import fcntl,os,sys\n"
                "fd=os.open(sys.argv[1],os.O_RDWR)\n"
                "fcntl.lockf(fd,(fcntl.LOCK_SH if sys.argv[2]=='1' else fcntl.LOCK_EX)|fcntl.LOCK_NB,1,0,0)\n"
                "print('held',flush=True)\n"
                "sys.stdin.read()\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path), "1" if shared else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "held":
            self.close()
            raise RuntimeError(f"could not take the foreign lock on {path}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)

    def __enter__(self) -> "ForeignLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OWNER_STUB = Path(__file__).with_name("owner_stub.py")
_OWNERS: "list[StandInOwner]" = []


def kill_all_owners() -> int:
    """Kill every stand-in owner this process started (session teardown)."""
    n = 0
    for o in _OWNERS:
        if o.proc.poll() is None:
            o.kill()
            n += 1
    _OWNERS.clear()
    return n


class StandInOwner:
    """A child process that connects to the daemon itself, REGISTERs its own pid
    and RESTRICTs, like the connection libvirt leaks into QEMU. Its peer pid
    equals its owner pid, so closing its connection triggers the daemon's
    release-all-for-owner and kill sequence (spec §4.6) on this process, which
    we own and may lose.

    Commands: `close()` closes the connection but keeps the process alive,
    `exit()` makes it exit (like QEMU exiting), `alive()` asks it to answer
    over its stdin/stdout pipe (a dead or dying process cannot).
    """

    def __init__(self, sock: Union[str, os.PathLike], uuid: bytes = UUID_A, name: str = "vm1",
                 oid: int = 1, ignore_sigterm: bool = False, restrict: bool = True):
        args = [sys.executable, str(_OWNER_STUB), str(sock), uuid.hex(), name, str(oid),
                "1" if restrict else "0", "1" if ignore_sigterm else "0"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pid = self.proc.pid
        _OWNERS.append(self)
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"owner stub failed to start: {first}")
        # Replies to REGISTER and RESTRICT, as the stub saw them.
        self.replies: list[Outcome] = [EOF if h == EOF else bytes.fromhex(h) for h in first[1:]]
        # Reap promptly: a zombie still answers kill(pid, 0), which would keep
        # the C daemon's kill loop spinning for its full 3 s.
        self._reaper = threading.Thread(target=self.proc.wait, daemon=True)
        self._reaper.start()

    def _cmd(self, cmd: str) -> str:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return self.proc.stdout.readline().strip()
        except (BrokenPipeError, ValueError):
            return ""

    def close(self) -> None:
        """Close the stub's daemon connection. The daemon may kill the stub
        before it can even answer, so the answer is not required."""
        answer = self._cmd("close")
        assert answer in ("closed", ""), f"owner stub answered {answer!r}"

    def exit(self) -> None:
        self._cmd("exit")
        self.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None and self._cmd("status") == "alive"

    def wait(self, timeout: float) -> Optional[int]:
        self._reaper.join(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)
