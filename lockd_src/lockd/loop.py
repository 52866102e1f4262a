# SPDX-License-Identifier: GPL-3.0-or-later
"""The event loop: one thread, one ``epoll``, timers.

The cost of an event does not depend on how many clients are connected (the
C daemon polls every client on every turn). Nothing slow runs on the loop:
waits are timers or pidfds, never ``sleep()``.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from typing import Callable, Dict, List, Optional

log = logging.getLogger("lockd")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERRHUP = select.EPOLLERR | select.EPOLLHUP

Handler = Callable[[int, int], None]


class Timer:
    """A pending ``call_later``; ``cancel()`` makes it a no-op."""

    __slots__ = ("when", "seq", "fn", "args")

    def __init__(self, when: float, seq: int, fn: Callable, args: tuple) -> None:
        self.when = when
        self.seq = seq
        self.fn: Optional[Callable] = fn
        self.args = args

    def __lt__(self, other: "Timer") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.fn = None


class EventLoop:
    """``epoll`` with per-fd handlers, timers and per-turn hooks.

    A handler is ``fn(fd, events)``. An exception in a handler never ends the
    loop: it is logged and ``on_handler_error(fd)`` lets the owner of the fd
    drop it. Hooks in ``after_turn`` run once per turn, after every event and
    timer of that turn (the journal flush lives there).
    """

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: Dict[int, Handler] = {}
        self.timers: List[Timer] = []
        self._seq = itertools.count()
        self.stopping = False
        self.after_turn: List[Callable[[], None]] = []
        self.on_handler_error: Callable[[int], None] = lambda fd: None
        self.max_wait: Optional[float] = None      # wake up at least this often (idle timeout checks)
        self._signals: List[int] = []
        self._wakeup_r: Optional[int] = None
        self._wakeup_w: Optional[int] = None
        self.on_signal: Callable[[int], None] = lambda signo: None

    # -- fds ------------------------------------------------------------------

    def add_handler(self, fd: int, mask: int, fn: Handler) -> None:
        self.handlers[fd] = fn
        self.ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def remove_handler(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def forget_handler(self, fd: int) -> None:
        """For an fd about to be closed: closing it removes it from the epoll set."""
        self.handlers.pop(fd, None)

    # -- timers ---------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable, *args) -> Timer:
        t = Timer(time.monotonic() + delay, next(self._seq), fn, args)
        heapq.heappush(self.timers, t)
        return t

    # -- signals --------------------------------------------------------------

    def catch_signals(self, signals) -> None:
        """Deliver ``signals`` to ``on_signal`` from the loop, never from a handler.

        The C-level handler only records the number; ``signal.set_wakeup_fd``
        wakes ``epoll`` so the signal is handled on this turn.
        """
        if self._wakeup_r is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._wakeup_r, self._wakeup_w = r, w
            self.add_handler(r, EPOLLIN, self._on_wakeup)
        signal.set_wakeup_fd(self._wakeup_w)
        for s in signals:
            signal.signal(s, self._record_signal)

    def _record_signal(self, signo, _frame) -> None:
        self._signals.append(signo)

    def release_signals(self) -> None:
        """Stop waking the loop for signals (before an exec)."""
        signal.set_wakeup_fd(-1)

    def _on_wakeup(self, fd: int, ev: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass
        self.dispatch_signals()

    def dispatch_signals(self) -> None:
        sigs, self._signals = self._signals, []
        for s in sigs:
            self.on_signal(s)

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop()``; returns with every handler still registered."""
        self.stopping = False
        poll = self.ep.poll
        handlers = self.handlers
        timers = self.timers
        hooks = self.after_turn
        while not self.stopping:
            timeout = -1.0
            if timers:
                timeout = max(0.0, timers[0].when - time.monotonic())
            if self.max_wait is not None:
                timeout = self.max_wait if timeout < 0 else min(timeout, self.max_wait)
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
                        self.on_handler_error(fd)
            if self._signals:
                self.dispatch_signals()
            if timers:
                self._run_timers()
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    log.exception("internal error in %r", hook)

    def _run_timers(self) -> None:
        timers = self.timers
        now = time.monotonic()
        while timers and timers[0].when <= now:
            t = heapq.heappop(timers)
            fn = t.fn
            if fn is not None:
                try:
                    fn(*t.args)
                except Exception:
                    log.exception("internal error in timer %r", fn)

    def stop(self) -> None:
        self.stopping = True
