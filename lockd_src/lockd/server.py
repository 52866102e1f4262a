# SPDX-License-Identifier: GPL-3.0-or-later
"""Connections, owners and the event loop.

One thread, one ``epoll``: the cost of an event does not depend on how many
clients are connected (the C daemon polls every client on every turn). Slow
things never block the loop: the owner kill sequence runs on timers and
pidfds instead of ``sleep()``.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import struct
import time
from collections import deque
from typing import Callable, Dict, List, Optional

from . import owners as own
from . import protocol as P
from .protocol import decode_resource_at
from . import rpc, xdr
from .journal import Journal
from .lockspace import Listener, Locks, Resource
from .systemd import Notifier

log = logging.getLogger("lockd")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERRHUP = select.EPOLLERR | select.EPOLLHUP

_LEN = struct.Struct(">I")
_HDR = struct.Struct(">IIIiiIi")
_UCRED = struct.Struct("3i")
_DROP = object()             # dispatch result: close the connection, no reply

PROGRAM = P.PROGRAM
KEEPALIVE = rpc.KEEPALIVE_PROGRAM
MAX_FRAME = rpc.MESSAGE_MAX + rpc.MESSAGE_LEN_MAX
PONG = rpc.encode_frame(KEEPALIVE, rpc.KEEPALIVE_VERSION, rpc.KEEPALIVE_PONG, rpc.MESSAGE, 0, rpc.OK)

# kill sequence for an owner whose own connection closed while it held leases
# (spec 4.6): SIGTERM now, SIGKILL after 1.6 s, give up after 3 s.
KILL_AFTER = 1.6
GIVE_UP_AFTER = 3.0
OWNER_SWEEP = 60.0           # forget owners without leases or connections this often


def peer_cred(sock: socket.socket):
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return (pid if pid > 0 else -1), uid, gid


class LockConn:
    """A connection on the lock socket (libvirt's lockd.so plugin, or QEMU)."""

    __slots__ = ("sock", "fd", "id", "pid", "uid", "rbuf", "wbuf", "restricted", "owner",
                 "own", "connected_at", "mask", "skip")

    def __init__(self, sock, cid, pid, uid):
        self.sock = sock
        self.fd = sock.fileno()
        self.id = cid
        self.pid = pid
        self.uid = uid
        self.rbuf = b""
        self.wbuf = b""
        self.restricted = False
        self.owner: Optional[P.Owner] = None    # set by REGISTER
        self.own = False                        # peer pid == registered owner pid
        self.connected_at = time.time()
        self.mask = EPOLLIN
        self.skip = 0         # in-band bytes of passed fds still to discard


class Server(Listener):
    def __init__(self, cfg: dict, locks: Locks, notifier: Notifier, journal: Optional[Journal],
                 fdstore: bool = False, privileged: bool = True) -> None:
        self.cfg = cfg
        self.locks = locks
        locks.listener = self
        self.notifier = notifier
        self.journal = journal
        self.fdstore = fdstore
        self.privileged = privileged
        self.euid = os.geteuid()
        self.ep = select.epoll()
        self.handlers: Dict[int, Callable[[int, int], None]] = {}
        self.listeners: Dict[int, tuple] = {}          # fd -> (socket, kind)
        self.clients: Dict[int, LockConn] = {}
        self.admins: Dict[int, object] = {}
        self.waiting: deque = deque()                  # accepted over max_clients
        self.owners: Dict[int, own.OwnerInfo] = {}
        self.owner_leases: Dict[int, int] = {}
        self.watches: Dict[int, int] = {}              # pidfd -> pid (connectionless owners)
        self.owner_watch: Dict[int, int] = {}          # pid -> pidfd
        self.kills: Dict[int, int] = {}                # pid -> pidfd of a running kill sequence
        self.timers: list = []
        self._seq = itertools.count()
        self.next_client_id = 1
        self.fd_seq = 0
        self.started = time.time()
        self.socket_activated = False
        self.recovered = 0
        self.lost: List[dict] = []
        self.stopping = False
        self.accepting = True
        self.signals: List[int] = []
        self.on_signal: Callable[[int], None] = lambda signo: None
        self.idle_timeout = 0
        self._idle_since = time.monotonic()
        self._wakeup_r = None
        self.live = 0            # journal entries that a snapshot would hold
        self.call_later(OWNER_SWEEP, self._sweep_owners)
        self.procs = {
            P.PROC_REGISTER: self._register,
            P.PROC_RESTRICT: self._restrict,
            P.PROC_NEW: self._new,
            P.PROC_CREATE_RESOURCE: self._create_resource,
            P.PROC_DELETE_RESOURCE: self._delete_resource,
            P.PROC_ACQUIRE_RESOURCE: self._acquire,
            P.PROC_RELEASE_RESOURCE: self._release,
            P.PROC_CREATE_LOCKSPACE: self._create_lockspace,
        }

    # -- plumbing ------------------------------------------------------------

    def add_handler(self, fd: int, mask: int, fn: Callable[[int, int], None]) -> None:
        self.handlers[fd] = fn
        self.ep.register(fd, mask)

    def remove_handler(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay: float, fn: Callable, *args) -> list:
        entry = [time.monotonic() + delay, next(self._seq), fn, args]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[2] = None

    def add_listener(self, sock: socket.socket, kind: str) -> None:
        sock.setblocking(False)
        self.listeners[sock.fileno()] = (sock, kind)
        self.add_handler(sock.fileno(), EPOLLIN, self._on_accept_lock if kind == "lock" else self._on_accept_admin)

    def install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup_r = r
        signal.set_wakeup_fd(w)

        def flag(signo, _frame):
            self.signals.append(signo)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP):
            signal.signal(s, flag)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.add_handler(r, EPOLLIN, self._on_wakeup)

    def _on_wakeup(self, fd: int, ev: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass
        sigs, self.signals = self.signals, []
        for s in sigs:
            self.on_signal(s)

    # -- main loop ---------------------------------------------------------------

    def run(self) -> None:
        poll = self.ep.poll
        handlers = self.handlers
        timers = self.timers
        while not self.stopping:
            timeout = -1
            if timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            if self.idle_timeout:
                timeout = 1.0 if timeout < 0 else min(timeout, 1.0)
            try:
                events = poll(timeout)
            except InterruptedError:
                events = ()
            for fd, ev in events:
                h = handlers.get(fd)
                if h is not None:
                    try:
                        h(fd, ev)
                    except Exception:
                        # never die on one connection's trouble
                        log.exception("internal error handling fd %d; dropping it", fd)
                        c = self.clients.get(fd)
                        if c is not None:
                            self.drop(c)
            if self.signals and self._wakeup_r is None:
                self._on_wakeup(-1, 0)
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    fn, args = heapq.heappop(timers)[2:]
                    if fn is not None:
                        try:
                            fn(*args)
                        except Exception:
                            log.exception("internal error in timer %r", fn)
            if self.idle_timeout:
                self._check_idle()
            j = self.journal
            if j is not None and j.pending:
                j.flush()

    def _check_idle(self) -> None:
        if self.clients or self.admins or self.waiting or self.locks.count():
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since >= self.idle_timeout:
            log.info("no clients and no leases for %d s: exiting (--timeout)", self.idle_timeout)
            self.stopping = True

    # -- accepting ----------------------------------------------------------------

    def _peer_allowed(self, uid: int) -> bool:
        return uid == 0 if self.privileged else uid == self.euid

    def _on_accept_lock(self, fd: int, ev: int) -> None:
        # One accept per readiness event: epoll is level-triggered, so another
        # waiting client is reported on the next turn, and the common case (one
        # client) saves a failing accept() and its exception.
        try:
            sock = self.listeners[fd][0].accept()[0]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                log.error("cannot accept a lock client: %s; raise LimitNOFILE", e.strerror)
                self._pause_accepting(0.1)
            return
        try:
            pid, uid, _gid = peer_cred(sock)
        except OSError:
            sock.close()
            return
        if not self._peer_allowed(uid):
            log.warning("Disallowing client pid %d with uid %d", pid, uid)
            sock.close()
            return
        sock.setblocking(False)
        if len(self.clients) >= self.cfg["max_clients"]:
            self._queue_over_limit(sock, pid, uid)
            return
        self._add_client(sock, pid, uid)

    def _add_client(self, sock, pid, uid) -> LockConn:
        c = LockConn(sock, self.next_client_id, pid, uid)
        self.next_client_id += 1
        self.clients[c.fd] = c
        self.add_handler(c.fd, EPOLLIN, self._on_client)
        return c

    def _pause_accepting(self, delay: float) -> None:
        for lfd, entry in self.listeners.items():
            if entry[1] == "lock" and lfd in self.handlers:
                self.ep.modify(lfd, 0)
        self.call_later(delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        for lfd, entry in self.listeners.items():
            if entry[1] == "lock" and lfd in self.handlers:
                self.ep.modify(lfd, EPOLLIN)

    # max_clients: libvirt stops accepting and lets new clients hang forever.
    # We hold an over-limit client for a grace period in case a slot frees up,
    # then answer its first call with a clear error instead of hanging.
    def _queue_over_limit(self, sock, pid, uid) -> None:
        entry = (sock, pid, uid)
        self.waiting.append(entry)
        self.call_later(self.cfg.get("max_clients_grace", 2), self._reject_over_limit, entry)

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.clients) < self.cfg["max_clients"]:
            sock, pid, uid = self.waiting.popleft()
            c = self._add_client(sock, pid, uid)
            self._on_client(c.fd, EPOLLIN)

    def _reject_over_limit(self, entry) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return  # admitted meanwhile
        sock, pid, _uid = entry
        msg = ("Too many active clients (%d), dropping connection from pid %d: "
               "raise max_clients in virtlockd.conf (and LimitNOFILE) to serve more VMs"
               % (self.cfg["max_clients"], pid))
        log.error("%s", msg)
        try:
            data = sock.recv(4096)
            if len(data) >= 28:
                h = rpc.decode_header(data)
                if h.type == rpc.CALL:
                    sock.send(rpc.reply_error(h, rpc.rpc_error(msg)))
        except OSError:
            pass
        sock.close()

    # -- lock connections -------------------------------------------------------

    def _on_client(self, fd: int, ev: int) -> None:
        c = self.clients.get(fd)
        if c is None:
            return
        if ev & EPOLLOUT:
            if not self._flush(c):
                return
            if not (ev & (EPOLLIN | EPOLLERRHUP)) and not c.rbuf:
                return
        if ev & (EPOLLIN | EPOLLERRHUP):
            try:
                data = os.read(fd, 65536)    # libvirt's initial message buffer size
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drop(c)
                return
            if not data:
                self.drop(c)
                return
            buf = c.rbuf + data if c.rbuf else data
        else:
            buf = c.rbuf
        self._process(c, buf)

    def _process(self, c: LockConn, buf: bytes) -> None:
        pos = 0
        end = len(buf)
        while end - pos >= 4 or (c.skip and end > pos):
            if c.skip:
                # each fd passed with CALL_WITH_FDS comes with one byte of
                # in-band data after the frame; read() already dropped the fd
                k = min(c.skip, end - pos)
                c.skip -= k
                pos += k
                continue
            n = _LEN.unpack_from(buf, pos)[0]
            if n < 4 or n > MAX_FRAME:
                log.debug("client %d: bad frame length %d; closing", c.id, n)
                self.drop(c)
                return
            if end - pos < n:
                break
            if n < 28:
                log.debug("client %d: Unable to decode message header; closing", c.id)
                self.drop(c)
                return
            out = self.dispatch(c, buf, pos, n)
            pos += n
            if out is not None:
                if out is _DROP:
                    self.drop(c)
                    return
                if not self._send(c, out):
                    c.rbuf = buf[pos:]
                    return     # one outstanding reply: read on once it is written
            if c.fd < 0:
                return
        c.rbuf = buf[pos:] if pos < end else b""

    def _send(self, c: LockConn, data: bytes) -> bool:
        j = self.journal
        if j is not None and j.pending:
            j.flush()
        if c.wbuf:
            c.wbuf += data
            return False
        try:
            n = os.write(c.fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.drop(c)
            return False
        if n == len(data):
            return True
        c.wbuf = data[n:]
        c.mask = EPOLLOUT
        self.ep.modify(c.fd, EPOLLOUT)
        return False

    def _flush(self, c: LockConn) -> bool:
        try:
            n = os.write(c.fd, c.wbuf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.drop(c)
            return False
        c.wbuf = c.wbuf[n:]
        if c.wbuf:
            return False
        c.mask = EPOLLIN
        self.ep.modify(c.fd, EPOLLIN)
        if c.rbuf:
            buf, c.rbuf = c.rbuf, b""
            self._process(c, buf)
        return True

    def dispatch(self, c: LockConn, buf: bytes, pos: int, n: int):
        prog, vers, proc, mtype, serial, status = _HDR.unpack_from(buf, pos)[1:]
        body_at = pos + 28
        if mtype == rpc.CALL_WITH_FDS:
            # libvirt reads the fd count and the fds before routing the call
            if n < 32:
                return _DROP      # "Unable to decode number of FDs"
            nfds = _LEN.unpack_from(buf, body_at)[0]
            if nfds > rpc.MESSAGE_NUM_FDS_MAX:
                return _DROP      # "Received too many FDs"
            c.skip += nfds
            body_at += 4
            mtype = rpc.CALL      # the fds themselves are closed: no procedure takes any
        if prog == PROGRAM and vers == 1:
            if mtype == rpc.CALL:
                if status != rpc.OK:
                    err = P.err_status(status)
                else:
                    handler = self.procs.get(proc)
                    if handler is None:
                        err = P.err_unknown_proc(proc)
                    else:
                        try:
                            handler(c, buf, body_at, pos + n)
                            return _HDR.pack(28, prog, vers, proc, rpc.REPLY, serial, rpc.OK)
                        except rpc.RPCError as e:
                            err = e
                        except xdr.XDRError:
                            err = P.err_decode()
                body = err.encode()
                return _HDR.pack(28 + len(body), prog, vers, proc, rpc.REPLY, serial, rpc.ERROR) + body
            return None           # REPLY/MESSAGE/STREAM...: libvirt sends nothing back
        if prog == KEEPALIVE and vers == rpc.KEEPALIVE_VERSION and mtype == rpc.MESSAGE:
            return PONG if proc == rpc.KEEPALIVE_PING else None
        if mtype == rpc.CALL:
            body = P.err_unknown_program(prog, vers).encode()
            return _HDR.pack(28 + len(body), prog, vers, proc, rpc.REPLY, serial, rpc.ERROR) + body
        return None

    def drop(self, c: LockConn) -> None:
        if c.fd < 0:
            return
        fd = c.fd
        # closing the only reference to the socket removes it from the epoll set
        self.handlers.pop(fd, None)
        self.clients.pop(fd, None)
        try:
            c.sock.close()
        except OSError:
            pass
        c.fd = -1
        if c.own and c.owner is not None:
            self._own_conn_closed(c.owner.pid)
        if self.waiting:
            self._admit_waiting()

    # -- procedures -----------------------------------------------------------------

    @staticmethod
    def _check(c: LockConn, proc: int, flags: int) -> None:
        if flags & ~P.ALLOWED_FLAGS[proc]:
            raise P.err_flags(proc, flags)
        if c.restricted:
            raise P.err_restricted()
        if c.owner is None:
            raise P.err_unregistered()

    def _register(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        owner, flags = P.decode_register(xdr.Decoder(buf, pos, end))
        if flags:
            raise P.err_flags(P.PROC_REGISTER, flags)
        if c.restricted:
            raise P.err_restricted()
        if owner.id == 0:
            raise P.err_unregistered()
        if owner.pid & 0x80000000:
            owner.pid -= 1 << 32             # pid_t in libvirt
        if c.own and c.owner is not None:
            self._own_conn_closed(c.owner.pid, release=False)
        c.owner = owner
        c.own = owner.pid == c.pid
        if c.own:
            info = self._owner_info(owner)
            info.connected += 1
            if info.pin is None:
                # the peer *is* the owner: pin that very process, so a later
                # kill sequence can never hit a newcomer that reused the pid
                info.pin = own.pidfd_open(owner.pid)
            self._unwatch(owner.pid)

    def _restrict(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        self._check(c, P.PROC_RESTRICT, xdr.Decoder(buf, pos, end).u32())
        c.restricted = True

    def _new(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        path, flags = P.decode_new(xdr.Decoder(buf, pos, end))
        self._check(c, P.PROC_NEW, flags)
        self.locks.new_lockspace(path)

    def _resource_call(self, c: LockConn, buf: bytes, pos: int, end: int, proc: int):
        path, name, flags = decode_resource_at(buf, pos, end)[0]
        self._check(c, proc, flags)
        ls = self.locks.lockspaces.get(path)
        if ls is None:
            raise P.err_no_lockspace(path)
        return ls, name, flags

    def _create_resource(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        ls, name = self._resource_call(c, buf, pos, end, P.PROC_CREATE_RESOURCE)[:2]
        self.locks.create_resource(ls, name)

    def _delete_resource(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        ls, name = self._resource_call(c, buf, pos, end, P.PROC_DELETE_RESOURCE)[:2]
        self.locks.delete_resource(ls, name)

    def _acquire(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        ls, name, flags = self._resource_call(c, buf, pos, end, P.PROC_ACQUIRE_RESOURCE)
        owner = c.owner
        pid = owner.pid
        info = self.owners.get(pid)
        if info is None or info.uuid != owner.uuid or info.name != owner.name or info.id != owner.id:
            info = self._owner_info(owner)
        if not info.connected and pid not in self.owner_leases:
            info.start_time = own.start_time(pid)   # the pid may have been reused meanwhile
        self.locks.acquire(ls, name, pid, flags)

    def _release(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        ls, name = self._resource_call(c, buf, pos, end, P.PROC_RELEASE_RESOURCE)[:2]
        self.locks.release(ls, name, c.owner.pid)

    def _create_lockspace(self, c: LockConn, buf: bytes, pos: int, end: int) -> None:
        path = P.decode_create_lockspace(xdr.Decoder(buf, pos, end))
        if c.restricted:
            raise P.err_restricted()
        self.locks.create_lockspace(path)

    # -- owners -----------------------------------------------------------------------

    def _owner_info(self, owner: P.Owner) -> own.OwnerInfo:
        info = self.owners.get(owner.pid)
        if info is None or info.uuid != owner.uuid or info.name != owner.name or info.id != owner.id:
            started = info.start_time if info is not None else own.start_time(owner.pid)
            connected = info.connected if info is not None else 0
            if info is not None and info.pin is not None:
                os.close(info.pin)
            info = own.OwnerInfo(owner.pid, owner.uuid, owner.name, owner.id, started, connected)
            self.owners[owner.pid] = info
            if self.journal is not None and self.owner_leases.get(owner.pid):
                self.journal.append(dict(info.to_json(), t="own"))
                info.journaled = True
        return info

    def _forget_owner_if_idle(self, pid: int) -> None:
        # the record itself is kept for a while (cheap re-use by the next
        # lease of the same owner) and dropped by _sweep_owners
        info = self.owners.get(pid)
        if info is not None and not info.connected and not self.owner_leases.get(pid):
            self._unwatch(pid)

    def _sweep_owners(self) -> None:
        for pid in [p for p, i in self.owners.items() if not i.connected and p not in self.owner_leases]:
            info = self.owners.pop(pid)
            if info.pin is not None:
                os.close(info.pin)
            self._unwatch(pid)
        self.call_later(OWNER_SWEEP, self._sweep_owners)

    def _own_conn_closed(self, pid: int, release: bool = True) -> None:
        info = self.owners.get(pid)
        if info is not None and info.connected > 0:
            info.connected -= 1
        if not release:
            return
        touched = self.locks.release_owner(pid)
        if touched:
            log.info("owner pid %d closed its connection: released %d leases", pid, len(touched))
            self._start_kill(pid)
        self._forget_owner_if_idle(pid)

    def _watch(self, pid: int) -> None:
        """Release ``pid``'s leases when it exits (owners without a connection)."""
        if pid in self.owner_watch:
            return
        pidfd = own.pidfd_open(pid)
        if pidfd is None:
            return
        self.owner_watch[pid] = pidfd
        self.watches[pidfd] = pid
        self.add_handler(pidfd, EPOLLIN, self._on_owner_exit)

    def _unwatch(self, pid: int) -> None:
        pidfd = self.owner_watch.pop(pid, None)
        if pidfd is not None:
            self.watches.pop(pidfd, None)
            self.remove_handler(pidfd)
            os.close(pidfd)

    def _on_owner_exit(self, pidfd: int, ev: int) -> None:
        pid = self.watches.get(pidfd)
        if pid is None:
            return
        self._unwatch(pid)
        touched = self.locks.release_owner(pid)
        log.info("owner pid %d exited: released %d leases", pid, len(touched))
        self._forget_owner_if_idle(pid)

    def _start_kill(self, pid: int) -> None:
        if pid <= 1 or pid in self.kills:
            return
        info = self.owners.get(pid)
        if info is not None and info.pin is not None:
            pidfd = os.dup(info.pin)      # the very process that registered
        else:
            pidfd = own.pidfd_open(pid)
            if pidfd is None:
                return               # already gone
        # A pidfd opened now pins whatever process has this pid *now*. If the
        # owner died and its pid was reused before we saw the EOF, that is
        # someone else: compare the start time recorded at registration.
        started = info.start_time if info is not None else None
        if (info is None or info.pin is None) and started is not None and own.start_time(pid) != started:
            log.info("owner pid %d already exited (the pid now belongs to another process): nothing to kill",
                     pid)
            os.close(pidfd)
            return
        log.info("killing owner pid %d: its connection closed while it held leases", pid)
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            os.close(pidfd)
            return
        except OSError as e:
            log.warning("Failed to kill off pid %d: %s", pid, e.strerror)
        self.kills[pid] = pidfd
        self.add_handler(pidfd, EPOLLIN, lambda fd, ev, pid=pid: self._kill_done(pid))
        self.call_later(KILL_AFTER, self._kill_hard, pid, pidfd)
        self.call_later(GIVE_UP_AFTER, self._kill_done, pid, pidfd, True)

    def _kill_hard(self, pid: int, pidfd: int) -> None:
        if self.kills.get(pid) != pidfd:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass

    def _kill_done(self, pid: int, pidfd: Optional[int] = None, timed_out: bool = False) -> None:
        fd = self.kills.get(pid)
        if fd is None or (pidfd is not None and fd != pidfd):
            return
        if timed_out:
            log.error("Failed to kill off pid %d: still alive %.1f s after SIGTERM", pid, GIVE_UP_AFTER)
        del self.kills[pid]
        self.remove_handler(fd)
        os.close(fd)

    # -- persistence hooks (Listener) ------------------------------------------------------

    def lockspace_added(self, ls) -> None:
        self.live += 1
        if self.journal is not None:
            self.journal.append({"t": "ls", "key": ls.key})

    def _count_lease(self, owner: int, delta: int) -> None:
        n = self.owner_leases.get(owner, 0) + delta
        if n > 0:
            self.owner_leases[owner] = n
        else:
            self.owner_leases.pop(owner, None)

    def _journal_acq(self, res: Resource, owner: int) -> None:
        self.live += 1
        j = self.journal
        if j is None:
            return
        info = self.owners.get(owner)
        if info is not None and not info.journaled:
            j.append(dict(info.to_json(), t="own"))
            info.journaled = True
        j.acq(res.lockspace.key, res.name, res.path, res.flags, owner, res.since.get(owner, 0.0),
              res.fdname, res.dev, res.ino)
        if j.lines > 2 * self.live + 4096:
            self.compact()

    def resource_added(self, res: Resource, owner: int) -> None:
        self.fd_seq += 1
        res.fdname = "lease-%d" % self.fd_seq
        if self.fdstore:
            self.notifier.fdstore(res.fd, res.fdname)
        self.owner_added(res, owner)

    def owner_added(self, res: Resource, owner: int) -> None:
        leases = self.owner_leases
        leases[owner] = leases.get(owner, 0) + 1
        self._journal_acq(res, owner)
        self._ensure_watched(owner)

    def _ensure_watched(self, owner: int) -> None:
        # An owner without its own connection (adopted, recovered, or a QEMU
        # that closed its inherited socket early) is released when it exits.
        info = self.owners.get(owner)
        if info is not None and not info.connected and owner not in self.owner_watch \
                and owner <= own.PID_MAX:
            self._watch(owner)

    def owner_removed(self, res: Resource, owner: int, count: int) -> None:
        self._count_lease(owner, -count)
        self.live -= count
        if self.journal is not None and res.owners:
            # (when the last owner goes, the "gone" record that follows says it all)
            self.journal.rel(res.lockspace.key, res.name, owner)

    def resource_removed(self, res: Resource) -> None:
        if self.fdstore and res.fdname:
            self.notifier.fdstore_remove(res.fdname)
        if self.journal is not None:
            self.journal.gone(res.lockspace.key, res.name)

    def snapshot_records(self) -> List[dict]:
        recs: List[dict] = [{"t": "ls", "key": k} for k in self.locks.lockspaces if k]
        for pid, info in self.owners.items():
            info.journaled = pid in self.owner_leases
            if info.journaled:
                recs.append(dict(info.to_json(), t="own"))
        for res in self.locks.resources():
            for owner in res.owners:
                recs.append({"t": "acq", "ls": res.lockspace.key, "name": res.name, "path": res.path,
                             "flags": res.flags, "owner": owner, "since": res.since.get(owner, 0.0),
                             "fdname": res.fdname, "dev": res.dev, "ino": res.ino})
        recs.append({"t": "seq", "fdseq": self.fd_seq})
        self.live = len(recs) - 1
        return recs

    def compact(self) -> None:
        if self.journal is not None:
            self.journal.rewrite(self.snapshot_records())

    # -- shutdown -----------------------------------------------------------------------

    def close_all(self) -> None:
        """Graceful stop: close connections but keep every lease (and never kill
        an owner): the leases stay in the fd store/journal for the next start."""
        for c in list(self.clients.values()):
            c.own = False            # not an owner EOF: the daemon is going away
            self.drop(c)
        for a in list(self.admins.values()):
            a.close()
        for entry in list(self.waiting):
            entry[0].close()
        self.waiting.clear()

    # -- admin (implemented in admin.py) ---------------------------------------------------

    def _on_accept_admin(self, fd: int, ev: int) -> None:
        from .admin import accept_admin
        accept_admin(self, self.listeners[fd][0])

    def status(self) -> dict:
        leases = self.locks.count()
        return {
            "pid": os.getpid(), "started": self.started, "uptime": round(time.time() - self.started, 3),
            "lock_type": self.locks.lock_type, "socket_activated": self.socket_activated,
            "fdstore": self.fdstore, "clients": len(self.clients), "max_clients": self.cfg["max_clients"],
            "admin_clients": len(self.admins), "admin_max_clients": self.cfg["admin_max_clients"],
            "owners": len(self.owner_leases), "leases": leases,
            "lockspaces": len(self.locks.lockspaces), "recovered_leases": self.recovered,
            "lost_leases": list(self.lost),
        }
