# SPDX-License-Identifier: GPL-3.0-or-later
"""A reply that comes later.

A lock procedure whose storage call runs in a worker (:mod:`lockd.offload`)
returns a :class:`Pending` instead of finishing. The connection keeps the
request's frame at the head of its read buffer and handles no further request
until the reply is there (libvirt's per-connection ordering); then
:meth:`Pending.resolve` has the reply built and the connection resumes.

``redo`` says what a live re-exec does with a request still pending: one
that has changed nothing yet (an acquire waiting for its open and lock) stays
in the read buffer and the new image runs it again; one whose change is made
and recorded already (a release waiting for its unlock) is answered OK first.
"""
from __future__ import annotations

from typing import Callable, Optional


class Pending:
    """One deferred reply. Whoever dispatched the request sets ``finish(err)
    -> frame``; whoever does the work calls ``resolve(err)``, in either order;
    the connection that waits gets ``resume(self)`` once both happened."""

    __slots__ = ("conn", "size", "redo", "what", "done", "err", "finish", "frame")

    def __init__(self, redo: bool = True, what: str = "") -> None:
        self.conn = None
        self.size = 0                   # bytes of the request frame at the head of conn.rbuf
        self.redo = redo
        self.what = what
        self.done = False
        self.err: Optional[Exception] = None
        self.finish: Optional[Callable[[Optional[Exception]], bytes]] = None
        self.frame: Optional[bytes] = None

    @property
    def orphaned(self) -> bool:
        """The connection that asked went away: nobody will read the answer."""
        return self.conn is not None and self.conn.fd < 0

    def set_finish(self, finish: Callable[[Optional[Exception]], bytes]) -> None:
        self.finish = finish
        if self.done:
            self.frame = finish(self.err)

    def attach(self, conn, size: int) -> None:
        """The connection waits on this request (``size`` bytes of its frame)."""
        self.conn = conn
        self.size = size

    def resolve(self, err: Optional[Exception] = None) -> None:
        """Answer now: OK (``err`` None) or ``err``. Only the first answer counts."""
        if self.done:
            return
        self.done = True
        self.err = err
        if self.finish is not None:
            self.frame = self.finish(err)
            if self.conn is not None:
                self.conn.resume(self)


def settle_for_exec(conn) -> None:
    """Before a live re-exec, for a connection waiting on ``conn.pending``: a
    request whose change is made already is answered now; one that changed
    nothing stays at the head of ``conn.rbuf`` for the new image to run again."""
    p = conn.pending
    if p is None:
        return
    conn.pending = None
    if not p.redo:
        p.resolve(None)            # no-op if it was answered already
        del conn.rbuf[:p.size]
        conn.wbuf += p.frame
