# SPDX-License-Identifier: GPL-3.0-or-later
"""The load generator: forked worker processes on raw UNIX sockets.

Every worker is a plain `os.fork()` of the bench driver that talks to it over
two pipes (length-prefixed pickles). Frames are built before the clock
starts; the hot loops only do send/recv/compare. The driver measures each
worker's CPU from /proc so the report can say how much of the 2 cores the
client itself used.

Workers:
  acqrel_worker   ACQUIRE+RELEASE cycles on its own connections (blocking loop
                  for one connection, epoll for several); records per-RPC
                  latency inside the measurement window.
  vmstart_worker  libvirt's VM start+stop sequence, one VM at a time, with a
                  stand-in child as the QEMU process (see below).
  holder          opens many owner connections in pipelined batches (idle
                  VMs, 10,000 owners with leases), keeps them open until told.
  prober          conflicting ACQUIREs against a list of leases (is every lease
                  still held?).
"""
from __future__ import annotations

import array
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import time
import traceback
from typing import Callable, Optional, Sequence

from bench import wire
from bench.wire import BenchError

_HDR = struct.Struct(">I")
PONG = bytes.fromhex("0000001c" "6b656570" "00000001" "00000002" "00000002" "00000000" "00000000")


class Chan:
    """One end of a worker <-> driver pipe pair."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def send(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HDR.pack(len(data)) + data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def _read(self, n: int, deadline: Optional[float]) -> bytes:
        buf = b""
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                    raise TimeoutError
            chunk = os.read(self.rfd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def recv(self, timeout: Optional[float] = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        n = _HDR.unpack(self._read(4, deadline))[0]
        return pickle.loads(self._read(n, deadline))

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class Worker:
    """A forked process running `target(chan, *args)`."""

    def __init__(self, name: str, target: Callable, *args):
        self.name = name
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            code = 0
            chan = Chan(p2c_r, c2p_w)
            try:
                os.close(p2c_w)
                os.close(c2p_r)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles ^C and cleans up
                target(chan, *args)
            except BaseException as exc:  # noqa: BLE001 - report everything to the driver
                code = 1
                try:
                    chan.send(("error", "%s: %s\n%s" % (type(exc).__name__, exc, traceback.format_exc())))
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(p2c_r)
        os.close(c2p_w)
        self.pid = pid
        self.chan = Chan(c2p_r, p2c_w)
        self.exit_code: Optional[int] = None

    def send(self, obj) -> None:
        self.chan.send(obj)

    def recv(self, timeout: Optional[float] = None, expect: Optional[str] = None):
        try:
            msg = self.chan.recv(timeout)
        except TimeoutError:
            raise BenchError("worker %s (pid %d) sent nothing within %s s (the daemon may hang)"
                             % (self.name, self.pid, timeout)) from None
        except EOFError:
            self.join(1)
            raise BenchError("worker %s (pid %d) died (exit %s) without a report"
                             % (self.name, self.pid, self.exit_code)) from None
        if msg[0] == "error":
            self.join(5)
            raise BenchError("worker %s failed: %s" % (self.name, msg[1]))
        if expect is not None and msg[0] != expect:
            raise BenchError("worker %s: expected %r, got %r" % (self.name, expect, msg[0]))
        return msg

    def cpu(self) -> float:
        from bench.procstat import cpu_seconds
        try:
            return cpu_seconds(self.pid, children=True)
        except (FileNotFoundError, ProcessLookupError):
            return 0.0

    def join(self, timeout: float = 30.0) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while self.exit_code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        self.chan.close()
        return self.exit_code

    def kill(self) -> None:
        if self.exit_code is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.join(10)


def kill_all(workers: Sequence[Worker]) -> None:
    for w in workers:
        w.kill()


# ---------------------------------------------------------------------------
# acqrel: ACQUIRE + RELEASE cycles
# ---------------------------------------------------------------------------

def acqrel_worker(chan: Chan, sock_path: str, owners: Sequence[tuple]) -> None:
    """owners: (owner number, fake pid, lease name) per connection."""
    socks = []
    for n, pid, _name in owners:
        s = wire.connect(sock_path)
        wire.call_ok(s, wire.register(n, pid, 0), "REGISTER")
        s.settimeout(None)
        socks.append(s)
    acq = [wire.acquire(name, 1) for _, _, name in owners]
    rel = [wire.release(name, 2) for _, _, name in owners]
    exp_acq = wire.ok_reply(acq[0])     # replies carry no resource name: same for all
    exp_rel = wire.ok_reply(rel[0])
    chan.send(("ready",))
    _, start_ns, end_ns, hard_end = chan.recv()
    lat = array.array("q")
    ops = 0
    errors = []
    clock = time.monotonic_ns
    ll = lat.append

    if len(socks) == 1:
        s = socks[0]
        a, r = acq[0], rel[0]
        send, recv = s.send, s.recv
        while True:
            t0 = clock()
            if t0 >= end_ns:
                break
            send(a)
            d = recv(4096)
            t1 = clock()
            if d != exp_acq:
                d = _finish(s, d)
                if d != exp_acq:
                    errors.append(wire.describe_reply(d))
                    break
            send(r)
            d = recv(4096)
            t2 = clock()
            if d != exp_rel:
                d = _finish(s, d)
                if d != exp_rel:
                    errors.append(wire.describe_reply(d))
                    break
            if t0 >= start_ns:
                ll(t1 - t0)
                ll(t2 - t1)
                ops += 2
    else:
        ep = select.epoll()
        by_fd = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            # [socket, phase (0: acquire in flight, 1: release in flight), sent at, index]
            by_fd[s.fileno()] = [s, 0, clock(), i]
            ep.register(s.fileno(), select.EPOLLIN)
            s.send(acq[i])
        poll = ep.poll
        active = len(socks)
        while active:
            events = poll(1.0)
            if not events and clock() > hard_end:
                errors.append("no reply for 1 s after the end of the run")
                break
            for fd, _ in events:
                st = by_fd[fd]
                s = st[0]
                d = s.recv(4096)
                now = clock()
                exp = exp_rel if st[1] else exp_acq
                if d != exp:
                    s.setblocking(True)
                    d = _finish(s, d)
                    s.setblocking(False)
                    if d != exp:
                        errors.append(wire.describe_reply(d))
                        ep.unregister(fd)
                        active -= 1
                        continue
                if start_ns <= st[2] and now < end_ns:
                    ll(now - st[2])
                    ops += 1
                if st[1]:
                    if now >= end_ns:
                        ep.unregister(fd)
                        active -= 1
                        continue
                    st[1] = 0
                    s.send(acq[st[3]])
                else:
                    st[1] = 1
                    s.send(rel[st[3]])
                st[2] = clock()
        ep.close()
    chan.send(("done", {"ops": ops, "lat": lat.tobytes(), "errors": errors}))
    for s in socks:
        s.close()
    chan.recv()  # wait for "exit" so the driver reads our CPU before we go


def _finish(s: socket.socket, d: bytes) -> bytes:
    """Complete a reply that arrived in pieces (rare on UNIX sockets)."""
    if not d:
        raise BenchError("daemon closed the connection")
    while len(d) < 4 or len(d) < struct.unpack_from(">I", d, 0)[0]:
        more = s.recv(65536)
        if not more:
            raise BenchError("daemon closed the connection mid-reply")
        d += more
    return d


# ---------------------------------------------------------------------------
# vmstart: libvirt's VM start + stop sequence
# ---------------------------------------------------------------------------

class StandIns:
    """Stand-in QEMU processes: each connects once (so its pid is the peer pid
    the daemon sees) and lives until `reap()`. Uses the small C helper
    bench/standin.c when it could be built, else forks this (Python) process."""

    def __init__(self, sock_path: str, helper: Optional[str]):
        self.sock_path = sock_path
        self.proc = None
        if helper:
            self.ctl, theirs = socket.socketpair()
            self.proc = subprocess.Popen([helper, sock_path, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                         start_new_session=True, stdin=subprocess.DEVNULL)
            theirs.close()

    def spawn(self) -> tuple:
        if self.proc is None:
            return self._fork()
        self.ctl.sendall(b"S\0\0\0\0")
        data, fds, _, _ = socket.recv_fds(self.ctl, 8, 1)
        if len(data) != 8:
            raise BenchError("stand-in helper died (exit %s)" % self.proc.poll())
        pid, err = struct.unpack("ii", data)
        if err or not fds:
            raise BenchError("stand-in could not connect to %s: %s" % (self.sock_path, os.strerror(err)))
        return pid, socket.socket(fileno=fds[0])

    def reap(self, pid: int) -> None:
        if self.proc is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        self.ctl.sendall(b"K" + struct.pack("i", pid))
        if self.ctl.recv(1) != b"D":
            raise BenchError("stand-in helper died (exit %s)" % self.proc.poll())

    def close(self) -> None:
        if self.proc is not None:
            self.ctl.close()
            self.proc.wait(10)

    def _fork(self) -> tuple:
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            try:
                a.connect(self.sock_path)
                os.write(w, b"k")
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        os.close(w)
        ok = os.read(r, 1)
        os.close(r)
        if ok != b"k":
            os.waitpid(child, 0)
            a.close()
            raise BenchError("stand-in owner could not connect to %s" % self.sock_path)
        return child, a


def vmstart_worker(chan: Chan, sock_path: str, worker: int, disk_sets: Sequence[Sequence[str]],
                   helper: Optional[str] = None) -> None:
    """One VM at a time, like one libvirtd worker thread.

    start: a stand-in QEMU (a child process, see StandIns) connects conn A; we REGISTER its
           pid as the owner and RESTRICT (A stays open, as in QEMU); conn B
           does REGISTER + ACQUIRE of the VM's 4 disks and closes.
    stop:  the stand-in dies (SIGKILL, reaped), then A closes: the daemon sees
           EOF from the owner (peer pid == owner pid) and releases its leases;
           its kill loop gets ESRCH at once because the pid is already gone.
           The pid cannot be reused before the daemon handles that EOF: pids
           are handed out cyclically and a wrap-around takes tens of
           thousands of forks.
    """
    n_sets = len(disk_sets)
    owner_no = 1_000_000 + worker * 100_000
    frames = []
    for k, disks in enumerate(disk_sets):
        frames.append([wire.acquire(d, 1 + j) for j, d in enumerate(disks)])
    exp_acq = [wire.ok_reply(f) for f in frames[0]]
    exp_reg = wire.ok_reply(wire.register(0, 1, 0))
    exp_res = wire.ok_reply(wire.restrict(1))
    restrict = wire.restrict(1)
    standins = StandIns(sock_path, helper)
    chan.send(("ready",))
    _, start_ns, end_ns, hard_end = chan.recv()
    clock = time.monotonic_ns
    cycles = 0
    lat_cycle = array.array("q")
    lat_start = array.array("q")
    lat_rpc = array.array("q")
    errors = []
    busy = 0
    i = 0
    while True:
        t0 = clock()
        if t0 >= end_ns:
            break
        in_window = t0 >= start_ns
        disks = frames[i % n_sets]
        owner_no += 1
        i += 1
        # --- start ---
        child, a = standins.spawn()
        try:
            reg = wire.register(owner_no, child, 0)
            t = clock()
            d = wire.call(a, reg)
            t1 = clock()
            if d != exp_reg:
                raise BenchError("REGISTER on conn A: " + wire.describe_reply(d))
            d = wire.call(a, restrict)
            t2 = clock()
            if d != exp_res:
                raise BenchError("RESTRICT: " + wire.describe_reply(d))
            if in_window:
                lat_rpc.append(t1 - t)
                lat_rpc.append(t2 - t1)
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(sock_path)
            t = clock()
            d = wire.call(b, reg)
            t1 = clock()
            if d != exp_reg:
                raise BenchError("REGISTER on conn B: " + wire.describe_reply(d))
            if in_window:
                lat_rpc.append(t1 - t)
            for j, f in enumerate(disks):
                t = clock()
                d = wire.call(b, f)
                t1 = clock()
                if d != exp_acq[j]:
                    if wire.is_busy(d):
                        busy += 1    # an earlier VM on this disk set not yet released
                    else:
                        raise BenchError("ACQUIRE: " + wire.describe_reply(d))
                if in_window:
                    lat_rpc.append(t1 - t)
            b.close()
            t_started = clock()
        finally:
            # --- stop: QEMU dies, its inherited connection closes ---
            standins.reap(child)
            a.close()
        t_end = clock()
        if in_window and t_end <= end_ns:
            cycles += 1
            lat_cycle.append(t_end - t0)
            lat_start.append(t_started - t0)
    standins.close()
    chan.send(("done", {"ops": cycles, "lat": lat_cycle.tobytes(), "lat_start": lat_start.tobytes(),
                        "lat_rpc": lat_rpc.tobytes(), "busy": busy, "errors": errors}))
    chan.recv()


# ---------------------------------------------------------------------------
# holder: many connected owners
# ---------------------------------------------------------------------------

def holder(chan: Chan, sock_path: str, scripts: Sequence[Sequence[bytes]], batch: int,
           timeout: float) -> None:
    """Open len(scripts) connections in batches of `batch`, run each one's call
    script (pipelined across the batch), report, then hold them open until the
    driver says "close"."""
    chan.recv()  # "go"
    t0 = time.monotonic()
    socks = []
    bad = []
    for lo in range(0, len(scripts), batch):
        chunk = []
        for _ in scripts[lo:lo + batch]:
            try:
                chunk.append(wire.connect(sock_path, timeout))
            except socket.timeout:
                raise BenchError("connect() to the daemon hung for %.0f s after %d connections"
                                 % (timeout, len(socks) + len(chunk))) from None
        socks.extend(chunk)
        for i, frame, reply in wire.run_rounds(chunk, scripts[lo:lo + batch], timeout):
            bad.append((lo + i, wire.describe_reply(reply)))
    chan.send(("ready", {"seconds": time.monotonic() - t0, "connections": len(socks),
                         "bad": bad[:5], "n_bad": len(bad)}))
    while True:
        msg = chan.recv()
        if msg[0] == "close":
            for s in socks:
                s.close()
            chan.send(("closed",))
            return
        if msg[0] == "check":
            # Is every connection still served? A keepalive PING on each is
            # harmless; pipelined so a poll()-based daemon is not charged
            # O(connections) per ping.
            ping = bytes.fromhex("0000001c" "6b656570" "00000001" "00000001" "00000002" "00000000" "00000000")
            lost = 0
            for lo in range(0, len(socks), 1000):
                chunk = socks[lo:lo + 1000]
                try:
                    bad = wire.run_rounds(chunk, [[ping]] * len(chunk), timeout, expected=[[PONG]] * len(chunk))
                    lost += len(bad)
                except (OSError, BenchError):
                    lost += len(chunk)
            chan.send(("checked", {"lost_connections": lost}))


def prober(chan: Chan, sock_path: str, names: Sequence[str], owner_no: int, pid: int,
           nconns: int, timeout: float) -> None:
    """A different owner tries to take every lease: each must be busy."""
    socks = [wire.connect(sock_path, timeout) for _ in range(nconns)]
    for s in socks:
        wire.call_ok(s, wire.register(owner_no, pid, 0), "REGISTER")
    per = [names[i::nconns] for i in range(nconns)]
    scripts = [[wire.acquire(n, 1 + j) for j, n in enumerate(p)] for p in per]
    bad = wire.run_rounds(socks, scripts, timeout)
    other = []
    for i, frame, reply in bad:
        if not wire.is_busy(reply):
            other.append(wire.describe_reply(reply))
    # run_rounds returns only the replies that were not OK: the rest were granted,
    # i.e. the lease had been lost. (The daemon is thrown away afterwards.)
    granted = len(names) - len(bad)
    for s in socks:
        s.close()
    chan.send(("probed", {"probed": len(names), "busy": len(bad) - len(other), "granted": granted,
                          "other": other[:5]}))
