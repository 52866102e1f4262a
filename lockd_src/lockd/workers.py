# SPDX-License-Identifier: GPL-3.0-or-later
"""Worker threads for filesystem calls that may hang, and the way back to the loop.

A :class:`Worker` runs the :class:`Call` objects of one filesystem, in order,
on its own thread. The event loop gives each call a deadline; whichever comes
first, the call's end or its deadline, decides (a compare-and-set under the
worker's lock): a call that ends in time is *done* and its result is applied
on the loop; a call past its deadline is *abandoned*, the client is told, and
when it does end, its ``undo`` runs right there on the worker (a lock that
arrives after the client was told "failed" is unlocked and closed, never
kept). A call abandoned before it started is never run.

Results come back through :class:`Completions`: a queue plus a wakeup fd
(``eventfd``, or a pipe on Python < 3.10) registered with the event loop, so
the loop learns of them on its next turn, never by polling.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from .loop import EPOLLIN

log = logging.getLogger("lockd")

QUEUED, RUNNING, DONE, ABANDONED = "queued", "running", "done", "abandoned"


class Completions:
    """Callbacks posted by threads, run on the event loop (thread-safe ``post``)."""

    def __init__(self, loop) -> None:
        self.items: collections.deque = collections.deque()
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._signal = (1).to_bytes(8, "little")
        else:
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)
            self._signal = b"!"
        self.loop = loop
        loop.add_handler(self.rfd, EPOLLIN, self._on_wakeup)

    def post(self, fn: Callable, *args) -> None:
        """From any thread: run ``fn(*args)`` on the loop soon."""
        self.items.append((fn, args))
        try:
            os.write(self.wfd, self._signal)
        except BlockingIOError:
            pass          # already signalled (pipe full): the loop will drain everything
        except OSError:
            pass          # closed: the daemon is stopping

    def _on_wakeup(self, fd: int, ev: int) -> None:
        try:
            while os.read(fd, 4096):
                if self.rfd == self.wfd:
                    break     # an eventfd reads its whole counter at once
        except BlockingIOError:
            pass
        self.run_pending()

    def run_pending(self) -> None:
        items = self.items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:
                log.exception("internal error applying a storage result %r", fn)

    def close(self) -> None:
        self.loop.remove_handler(self.rfd)
        os.close(self.rfd)
        if self.wfd != self.rfd:
            os.close(self.wfd)


class Call:
    """One filesystem call: ``fn(*args)`` on a worker, ``on_done(call)`` on the loop.

    ``undo(result)`` runs on the worker when the call ends after it was
    abandoned. ``abandonable`` is False for clean-up calls (unlock and close
    of a released lease): those always run, however late.
    """

    __slots__ = ("fn", "args", "on_done", "undo", "what", "abandonable", "state", "submitted",
                 "started", "ended", "result", "error", "timer")

    def __init__(self, fn: Callable, args: tuple, on_done: Optional[Callable[["Call"], None]],
                 what: str, undo: Optional[Callable[[Any], None]] = None, abandonable: bool = True) -> None:
        self.fn = fn
        self.args = args
        self.on_done = on_done
        self.undo = undo
        self.what = what
        self.abandonable = abandonable
        self.state = QUEUED
        self.submitted = time.monotonic()
        self.started: Optional[float] = None
        self.ended: Optional[float] = None
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.timer = None


class Worker:
    """One thread running the calls of one filesystem in order."""

    def __init__(self, name: str, completions: Completions) -> None:
        self.name = name
        self.completions = completions
        self.lock = threading.Lock()
        self.queue: collections.deque = collections.deque()
        self.wake = threading.Condition(self.lock)
        self.current: Optional[Call] = None
        self.stopping = False
        self.calls = 0
        self.late = 0
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, call: Call) -> Call:
        with self.lock:
            self.queue.append(call)
            self.wake.notify()
        return call

    def abandon(self, call: Call) -> bool:
        """From the loop, at the call's deadline: True if the call was still
        queued or running (it is abandoned now), False if it ended in time."""
        with self.lock:
            if call.state in (QUEUED, RUNNING) and call.abandonable:
                call.state = ABANDONED
                return True
            return False

    def backlog(self) -> int:
        """Calls queued or running."""
        return len(self.queue) + (self.current is not None)

    def running_since(self) -> Optional[float]:
        """When the call running now was submitted (monotonic), if one runs:
        its client has been waiting since then."""
        cur = self.current
        return cur.submitted if cur is not None else None

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.stopping:
                    self.wake.wait()
                if not self.queue:
                    return
                call = self.queue.popleft()
                if call.state == ABANDONED:
                    skipped = True
                else:
                    skipped = False
                    call.state = RUNNING
                    call.started = time.monotonic()
                    self.current = call
            if skipped:
                self._post(call)
                continue
            result, error = None, None
            try:
                result = call.fn(*call.args)
            except BaseException as e:     # an RPCError (busy, ENOENT...) or anything else: the loop decides
                error = e
            with self.lock:
                self.current = None
                call.ended = time.monotonic()
                late = call.state == ABANDONED
                if not late:
                    call.state = DONE
                self.calls += 1
            call.result, call.error = result, error
            if late:
                self.late += 1
                if error is None and call.undo is not None:
                    try:
                        call.undo(result)
                    except Exception:
                        log.exception("undoing the late result of %s failed", call.what)
            self._post(call)

    def _post(self, call: Call) -> None:
        if call.on_done is not None:
            self.completions.post(call.on_done, call)
