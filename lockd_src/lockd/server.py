# SPDX-License-Identifier: GPL-3.0-or-later
"""Listening sockets and connections.

One accept path serves both socket kinds (lock and admin): peer credentials,
a per-kind client limit and a connection factory. Over ``max_clients``,
libvirt stops accepting and new clients hang forever; lockd holds an
over-limit client for a grace period in case a slot frees up, then answers
its first call with a clear error.

A :class:`Conn` reads into a ``bytearray`` that is parsed in place (a 32 MiB
frame costs linear time, not quadratic), handles every whole frame of a read,
and sends its replies with one ``send``.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections import deque
from typing import Callable, Dict, Optional, Tuple

from . import rpc
from .errors import Fatal
from .loop import EPOLLERRHUP, EPOLLIN, EPOLLOUT
from .deferred import Pending
from .program import DROP, LockProgram
from .state import DaemonState

log = logging.getLogger("lockd")

_UCRED = struct.Struct("3i")
READ_SIZE = 65536            # libvirt's initial message buffer size
READ_MAX = 1 << 20           # at most this much per read while a big frame arrives
PAUSED_READ_MAX = 1 << 20    # read no more than this ahead while a request waits for storage
ACCEPT_ERROR_EVERY = 5.0     # seconds between two log lines about the same accept error


def peer_cred(sock: socket.socket) -> Tuple[int, int, int]:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return (pid if pid > 0 else -1), uid, gid


def bind_unix(path: str) -> socket.socket:
    """Bind a listening socket at ``path`` (without socket activation)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        # libvirt unlinks whatever is there; if a daemon still serves that path
        # every new client would silently go to us instead: refuse.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            raise Fatal("another daemon is already serving %s; stop it first (systemctl stop "
                        "virtlockd.socket virtlockd.service) or use socket activation" % path)
        except OSError:
            pass  # stale: nobody listens
        finally:
            probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise Fatal("Failed to bind socket to '%s': %s" % (path, e.strerror)) from None
    finally:
        os.umask(old)
    s.listen(socket.SOMAXCONN)
    return s


class Conn:
    """One accepted connection: a non-blocking socket, a read buffer parsed in
    place by :meth:`process`, and a write buffer sent by :meth:`flush`."""

    __slots__ = ("state", "loop", "sock", "fd", "id", "pid", "uid", "rbuf", "wbuf", "connected_at",
                 "mask", "want", "registry")

    def __init__(self, state: DaemonState, sock: socket.socket, pid: int, uid: int,
                 registry: Dict[int, "Conn"], cid: Optional[int] = None) -> None:
        self.state = state
        self.loop = state.loop
        self.sock = sock
        self.fd = sock.fileno()
        if cid is None:
            cid = state.next_client_id
            state.next_client_id += 1
        self.id = cid
        self.pid = pid
        self.uid = uid
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.connected_at = time.time()
        self.mask = EPOLLIN
        self.want = READ_SIZE
        self.registry = registry
        registry[self.fd] = self

    def start(self) -> "Conn":
        """Serve it: register with the loop (an adopted conn may have a reply pending)."""
        self.mask = EPOLLOUT if self.wbuf else EPOLLIN
        self.loop.add_handler(self.fd, self.mask, self.on_event)
        return self

    def on_event(self, fd: int, ev: int) -> None:
        if ev & EPOLLOUT:
            if not self.flush():
                return
            if self.rbuf:
                self.process()
            if not ev & (EPOLLIN | EPOLLERRHUP):
                if self.wbuf and self.fd >= 0:
                    self.flush()
                return
        if ev & (EPOLLIN | EPOLLERRHUP):
            try:
                data = self.sock.recv(self.want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data:
                self.eof()
                return
            self.rbuf += data
            self.process()
        if self.wbuf and self.fd >= 0:
            self.flush()

    def process(self) -> None:
        """Consume whole requests from ``rbuf``, queue replies in ``wbuf``."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Send what is queued; True when all of it went."""
        if not self.wbuf:
            return True
        self.state.recorder.flush()       # journal before OK: the records go first
        try:
            n = self.sock.send(self.wbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.close()
            return False
        del self.wbuf[:n]
        if self.wbuf:
            if self.mask != EPOLLOUT:   # one outstanding reply: read on once it is written
                self.mask = EPOLLOUT
                self.loop.modify(self.fd, EPOLLOUT)
            return False
        if self.mask != EPOLLIN:
            self.mask = EPOLLIN
            self.loop.modify(self.fd, EPOLLIN)
        return True

    def close(self) -> None:
        if self.fd < 0:
            return
        fd = self.fd
        self.loop.forget_handler(fd)      # closing the only reference removes it from epoll
        self.registry.pop(fd, None)
        try:
            self.sock.close()
        except OSError:
            pass
        self.fd = -1
        self.closed()

    def close_after_replies(self) -> None:
        """Close for a broken stream, but first send the replies to the
        requests before it (libvirt answers each request as it comes)."""
        if self.wbuf:
            self.flush()
        self.close()

    def eof(self) -> None:
        """The peer closed its side."""
        self.close()

    def closed(self) -> None:
        """After close: what the connection's going away means."""


class LockConn(Conn):
    """A connection on the lock socket: libvirt's lockd.so plugin, or QEMU's own."""

    __slots__ = ("server", "program", "restricted", "owner", "own", "skip", "pending", "eof_seen")

    def __init__(self, server: "Server", sock: socket.socket, pid: int, uid: int,
                 cid: Optional[int] = None) -> None:
        super().__init__(server.state, sock, pid, uid, server.state.clients, cid)
        self.server = server
        self.program = server.program
        self.restricted = False
        self.owner = None        # protocol.Owner, set by REGISTER
        self.own = False         # peer pid == registered owner pid
        self.skip = 0            # in-band bytes of passed fds still to discard
        self.pending: Optional[Pending] = None   # the request at the head of rbuf waits for storage
        self.eof_seen = False    # the peer closed while a request waited: answer, then close

    def process(self) -> None:
        if self.pending is not None:
            if len(self.rbuf) > PAUSED_READ_MAX and self.mask == EPOLLIN:
                self.mask = 0                    # a flood while we wait: stop reading until resume()
                self.loop.modify(self.fd, 0)
            return
        buf = self.rbuf
        end = len(buf)
        pos = 0
        dispatch = self.program.dispatch
        while pos < end:
            if self.skip:
                # each fd passed with CALL_WITH_FDS comes with one byte of
                # in-band data after the frame; recv() already dropped the fd
                k = min(self.skip, end - pos)
                self.skip -= k
                pos += k
                continue
            if end - pos < 4:
                break
            try:
                n = rpc.frame_length(buf, pos)
            except rpc.FrameError as e:
                log.debug("client %d: %s; closing", self.id, e)
                self.close_after_replies()
                return
            if end - pos < n:
                self.want = min(max(READ_SIZE, n - (end - pos)), READ_MAX)
                break
            reply = dispatch(self, buf, pos, n)
            if reply is not None:
                if reply is DROP:
                    self.close_after_replies()
                    return
                if reply.__class__ is Pending:
                    if reply.frame is None:
                        # libvirt's order: no further request until this one is answered
                        del buf[:pos]
                        self.pending = reply
                        reply.attach(self, n)
                        return
                    reply = reply.frame
                self.wbuf += reply
            pos += n
            if self.fd < 0:
                return
        else:
            self.want = READ_SIZE
        if pos:
            del buf[:pos]

    def resume(self, pending: Pending) -> None:
        """The reply to the request we wait on is there: send it, go on."""
        if self.pending is not pending or self.fd < 0:
            return
        self.pending = None
        del self.rbuf[:pending.size]
        self.wbuf += pending.frame
        if self.eof_seen:
            self.loop.add_handler(self.fd, EPOLLIN, self.on_event)
            self.mask = EPOLLIN
        elif self.mask == 0:
            self.mask = EPOLLIN
            self.loop.modify(self.fd, EPOLLIN)
        if self.rbuf:
            self.process()
        if self.eof_seen:
            self.eof()
        elif self.wbuf and self.fd >= 0:
            self.flush()

    def eof(self) -> None:
        if self.pending is None or self.fd < 0:
            if self.eof_seen:
                self.close_after_replies()     # the answers to what waited go out first
            else:
                self.close()
            return
        # As libvirt, which answers every request it read before it sees the
        # EOF: the one waiting for storage is answered first. Meanwhile the
        # fd leaves epoll (a hung-up socket would be reported on every turn).
        self.eof_seen = True
        self.loop.remove_handler(self.fd)

    def closed(self) -> None:
        if self.own and self.owner is not None:
            self.state.owners.own_connection_closed(self.owner.pid)
        self.server.slot_freed()


class Endpoint:
    """One kind of listening socket: its connections, its limit and what an
    accepted client becomes (or how it is told no)."""

    def __init__(self, kind: str, registry: Dict[int, Conn], limit_key: str,
                 factory: Callable[[socket.socket, int, int], Conn],
                 deny: Callable[[socket.socket, int], None],
                 over_limit: Callable[[socket.socket, int, int], None]) -> None:
        self.kind = kind
        self.registry = registry
        self.limit_key = limit_key
        self.factory = factory
        self.deny = deny
        self.over_limit = over_limit


class Server:
    """The listening sockets, the accept path and the max_clients queue."""

    def __init__(self, state: DaemonState, program: LockProgram) -> None:
        self.state = state
        self.program = program
        self.loop = state.loop
        self.listeners: Dict[int, Tuple[socket.socket, str]] = {}
        self.endpoints: Dict[str, Endpoint] = {
            "lock": Endpoint("lock", state.clients, "max_clients",
                             lambda sock, pid, uid: LockConn(self, sock, pid, uid).start(),
                             lambda sock, uid: sock.close(), self._queue_over_limit),
        }
        self.waiting: deque = deque()         # (sock, pid, uid) accepted over max_clients
        self._accept_errors: Dict[int, list] = {}
        self.loop.on_handler_error = self._drop_fd

    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.kind] = endpoint

    def add_listener(self, sock: socket.socket, kind: str) -> None:
        sock.setblocking(False)
        self.listeners[sock.fileno()] = (sock, kind)
        self.loop.add_handler(sock.fileno(), EPOLLIN, self._on_accept)

    def _drop_fd(self, fd: int) -> None:
        conn = self.state.clients.get(fd) or self.state.admins.get(fd)
        if conn is not None:
            conn.close()

    # -- the accept path ----------------------------------------------------------

    def _on_accept(self, fd: int, ev: int) -> None:
        # One accept per readiness event: epoll is level-triggered, so another
        # waiting client is reported on the next turn, and the common case (one
        # client) saves a failing accept() and its exception.
        lsock, kind = self.listeners[fd]
        try:
            sock = lsock.accept()[0]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._accept_failed(kind, e)
            return
        try:
            pid, uid, _gid = peer_cred(sock)
        except OSError:
            sock.close()
            return
        ep = self.endpoints[kind]
        if not self.state.peer_allowed(uid):
            log.warning("Disallowing %s client pid %d with uid %d", kind, pid, uid)
            ep.deny(sock, uid)
            return
        sock.setblocking(False)
        if len(ep.registry) >= self.state.cfg[ep.limit_key]:
            ep.over_limit(sock, pid, uid)
            return
        ep.factory(sock, pid, uid)

    def _accept_failed(self, kind: str, e: OSError) -> None:
        if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.error("cannot accept a %s client: %s", kind, e.strerror)
            return
        # Out of fds: say so once every few seconds (with a count), and stop
        # accepting for a moment instead of spinning on a level-triggered socket.
        now = time.monotonic()
        last = self._accept_errors.setdefault(e.errno, [0.0, 0])
        last[1] += 1
        if now - last[0] >= ACCEPT_ERROR_EVERY:
            log.error("cannot accept a %s client: %s (%d time(s) since the last report); raise LimitNOFILE "
                      "or max_clients' headroom", kind, e.strerror, last[1])
            last[0], last[1] = now, 0
        for lfd in self.listeners:
            self.loop.modify(lfd, 0)
        self.loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        for lfd in self.listeners:
            if lfd in self.loop.handlers:
                self.loop.modify(lfd, EPOLLIN)

    # -- over max_clients ---------------------------------------------------------

    def _queue_over_limit(self, sock: socket.socket, pid: int, uid: int) -> None:
        entry = (sock, pid, uid)
        self.waiting.append(entry)
        self.state.waiting = len(self.waiting)
        self.loop.call_later(self.state.cfg.get("max_clients_grace", 2), self._reject_over_limit, entry)

    def slot_freed(self) -> None:
        """A lock client went (or max_clients was raised): admit who waits."""
        while self.waiting and len(self.state.clients) < self.state.cfg["max_clients"]:
            sock, pid, uid = self.waiting.popleft()
            LockConn(self, sock, pid, uid).start().on_event(sock.fileno(), EPOLLIN)
        self.state.waiting = len(self.waiting)

    def _reject_over_limit(self, entry) -> None:
        try:
            self.waiting.remove(entry)
        except ValueError:
            return  # admitted meanwhile
        self.state.waiting = len(self.waiting)
        sock, pid, _uid = entry
        msg = ("Too many active clients (%d), dropping connection from pid %d: "
               "raise max_clients in virtlockd.conf (and LimitNOFILE) to serve more VMs"
               % (self.state.cfg["max_clients"], pid))
        log.error("%s", msg)
        try:
            data = sock.recv(4096)
            if len(data) >= rpc.HEADER_SIZE:
                h = rpc.decode_header(data[:rpc.HEADER_SIZE])
                if h.type == rpc.CALL:
                    sock.send(rpc.reply_error(h, rpc.rpc_error(msg)))
        except (OSError, rpc.FrameError):
            pass
        sock.close()

    # -- stop -----------------------------------------------------------------------

    def close_all(self) -> None:
        """Graceful stop: close connections but keep every lease (and never kill
        an owner): the leases stay in the fd store and journal for the next start."""
        for c in list(self.state.clients.values()):
            c.own = False            # not an owner EOF: the daemon is going away
            c.close()
        for a in list(self.state.admins.values()):
            a.close()
        for entry in list(self.waiting):
            entry[0].close()
        self.waiting.clear()
        self.state.waiting = 0
