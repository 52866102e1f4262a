"""The Owners registry with a fake event loop: the kill sequence, pidfd
watches, pid reuse, forget and sweep. The processes are real children."""
import subprocess
import sys
import time

import pytest

from lockd import owners as own
from lockd import protocol as P
from lockd.owners import GIVE_UP_AFTER, KILL_AFTER, Owners

UUID = bytes(range(16))


class FakeLoop:
    """Records handlers and timers; the test fires them."""

    def __init__(self):
        self.handlers = {}
        self.timers = []

    def add_handler(self, fd, mask, fn):
        self.handlers[fd] = fn

    def remove_handler(self, fd):
        self.handlers.pop(fd, None)

    def call_later(self, delay, fn, *args):
        self.timers.append((delay, fn, args))

    def fire(self, delay):
        for d, fn, args in [t for t in self.timers if t[0] == delay]:
            self.timers.remove((d, fn, args))
            fn(*args)


@pytest.fixture
def child():
    # ignores SIGTERM, so the sequence must go on to SIGKILL
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def registry(held):
    loop = FakeLoop()
    released = []

    def release(pid):
        released.append(pid)
        touched = sorted(held.pop(pid, set()))
        return touched

    return Owners(loop, lambda pid: pid in held, release), loop, released


def test_kill_sequence_terms_then_kills_the_pinned_owner(child):
    held = {child.pid: {"disk"}}
    owners, loop, released = registry(held)
    info = owners.own_connection_opened(P.Owner(UUID, "vm1", 1, child.pid))
    assert info.pin is not None and info.connected == 1
    owners.own_connection_closed(child.pid)          # EOF while it holds a lease
    assert released == [child.pid] and child.pid in owners.kills
    time.sleep(0.2)
    assert child.poll() is None                      # SIGTERM ignored
    loop.fire(KILL_AFTER)                            # SIGKILL
    assert child.wait(timeout=5) == -9
    pidfd = owners.kills[child.pid]
    loop.handlers[pidfd](pidfd, 1)                   # the pidfd reports the exit
    assert child.pid not in owners.kills and pidfd not in loop.handlers
    loop.fire(GIVE_UP_AFTER)                         # a late give-up timer is harmless


def test_no_kill_without_leases_or_on_reregister(child):
    owners, loop, released = registry({})
    owners.own_connection_opened(P.Owner(UUID, "vm1", 1, child.pid))
    owners.own_connection_closed(child.pid, release=False)
    owners.own_connection_closed(child.pid)
    assert not owners.kills and child.poll() is None


def test_a_reused_pid_is_never_killed(child):
    held = {child.pid: {"disk"}}
    owners, loop, released = registry(held)
    # registered on libvirt's connection (not its own): no pin, only the start time
    info = owners.identify(P.Owner(UUID, "vm1", 1, child.pid))
    info.start_time = (info.start_time or 0) + 12345     # as if the pid now belonged to someone else
    owners.start_kill(child.pid)
    assert not owners.kills and child.poll() is None


def test_connectionless_owner_is_released_when_it_exits(child):
    held = {child.pid: {"disk"}}
    owners, loop, released = registry(held)
    owners.identify(P.Owner(UUID, "vm1", 1, child.pid))
    owners.ensure_watched(child.pid)
    pidfd = owners.watch_of[child.pid]
    child.kill()
    child.wait()
    loop.handlers[pidfd](pidfd, 1)
    assert released == [child.pid] and child.pid not in owners.watch_of


def test_identity_change_is_reported_and_sweep_forgets_idle_owners(child):
    held = {child.pid: {"disk"}}
    owners, loop, _ = registry(held)
    seen = []
    owners.on_new_identity = seen.append
    first = owners.identify(P.Owner(UUID, "vm1", 1, child.pid))
    assert owners.identify(P.Owner(UUID, "vm1", 1, child.pid)) is first
    second = owners.identify(P.Owner(UUID, "vm1-renamed", 2, child.pid))
    assert second is not first and seen == [first, second]
    held.clear()
    owners.sweep()
    assert owners.get(child.pid) is None


def test_start_time_and_alive(child):
    started = own.start_time(child.pid)
    assert started and own.alive(child.pid, started)
    assert not own.alive(child.pid, started + 1)
    assert own.start_time(own.PID_MAX + 1) is None
