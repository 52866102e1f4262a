"""The kernel facts behind the proposed migration hand-off (docs/design.md,
section 7), tested on real OFD locks: the source daemon keeps its lease
*shared* from the source's pause until its QEMU exits, marked with a beacon
lock that names the VM; the destination daemon, refused the exclusive lock,
recognises its own VM's beacon, joins the shared lock and converts it to an
exclusive one once the source lets go.

Each open file description below stands for one daemon (OFD locks conflict
between descriptions, inside one process too); a separate prober process
polls byte 0 with F_OFD_GETLK all along, as a third host would see it.
The functions here are the protocol's reference steps, for the daemon hook
described in the design.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import struct
import subprocess
import sys
import time

import pytest

F_OFD_GETLK, F_OFD_SETLK = 36, 37
FLOCK = struct.Struct("hhqqi4x")
# Beacon bytes lie far beyond any disk or lease file: base + 48 bits of
# sha256(uuid). Below 2**63 - 1 (OFFSET_MAX), so NFS (NLM4, NFSv4) carries them too.
BEACON_BASE = 1 << 62
BEACON_SPAN = 1 << 48
VM1 = bytes.fromhex("11111111111141118111111111111111")
VM3 = bytes.fromhex("33333333333343338333333333333333")

PROBER = r"""
import fcntl, os, struct, sys
F = struct.Struct("hhqqi4x")
fd = os.open(sys.argv[1], os.O_RDWR)
req = F.pack(fcntl.F_WRLCK, 0, 0, 1, 0)
seen = {fcntl.F_UNLCK: 0, fcntl.F_RDLCK: 0, fcntl.F_WRLCK: 0}
print("ready", flush=True)
os.set_blocking(0, False)
while True:
    seen[F.unpack(fcntl.fcntl(fd, 36, req))[0]] += 1
    try:
        if os.read(0, 1) == b"":
            break
    except BlockingIOError:
        pass
print(seen[fcntl.F_UNLCK], seen[fcntl.F_RDLCK], seen[fcntl.F_WRLCK])
"""


def beacon(uuid: bytes) -> int:
    return BEACON_BASE + int.from_bytes(hashlib.sha256(uuid).digest()[:6], "big")


def setlk(fd: int, kind: int, start: int = 0) -> bool:
    """Non-blocking OFD lock of one byte; False when another holder refuses it."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def getlk(fd: int, start: int = 0, length: int = 1) -> tuple[int, int]:
    """(type, start) of the first lock of another holder that would refuse a write lock."""
    kind, _whence, found, _len, _pid = FLOCK.unpack(
        fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)))
    return kind, found


# -- the protocol steps (what each daemon would do) ------------------------

def begin_handoff(fd: int, uuid: bytes) -> None:
    """Source, on RELEASE while the owner (paused QEMU) lives: exclusive ->
    shared in place (never unlocked), then the beacon naming the VM."""
    assert setlk(fd, fcntl.F_RDLCK)
    assert setlk(fd, fcntl.F_RDLCK, beacon(uuid))


def take_over(fd: int, uuid: bytes) -> bool:
    """Destination, on ACQUIRE refused with EAGAIN: join the shared lock only
    if the holder is our own VM's hand-off (its beacon is held)."""
    if getlk(fd, beacon(uuid))[0] == fcntl.F_UNLCK:
        return False                      # someone else's lease: resource busy
    if not setlk(fd, fcntl.F_RDLCK):
        return False                      # held exclusively: resource busy
    if getlk(fd, beacon(uuid))[0] == fcntl.F_UNLCK:   # the source let go meanwhile
        return setlk(fd, fcntl.F_WRLCK)
    return True


def end_handoff(fd: int) -> bool:
    """Source, when its QEMU exits (or the hand-off times out). Returns whether
    the lease file may be deleted (indirect mode): only if nobody shares it."""
    alone = setlk(fd, fcntl.F_WRLCK)
    fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))  # byte 0 and beacon
    return alone


def complete_takeover(fd: int) -> bool:
    """Destination, on a timer while taking over: shared -> exclusive in place."""
    return setlk(fd, fcntl.F_WRLCK)


# -- tests ------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "extra.img"
    path.write_bytes(b"\0" * 4096)
    fds = []

    def open_fd() -> int:
        fds.append(os.open(path, os.O_RDWR))
        return fds[-1]

    yield path, open_fd
    for fd in set(fds):
        with contextlib.suppress(OSError):   # the test closed some itself
            os.close(fd)


class Prober:
    """A separate process polling byte 0 with F_OFD_GETLK until stopped."""

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> tuple[int, int, int]:
        out, _ = self.proc.communicate("", timeout=30)
        free, shared, exclusive = map(int, out.split())
        return free, shared, exclusive


def test_a_beacon_far_beyond_the_file_names_the_vm(disk):
    path, open_fd = disk
    src, other = open_fd(), open_fd()
    assert setlk(src, fcntl.F_WRLCK)
    assert getlk(other, BEACON_BASE, BEACON_SPAN)[0] == fcntl.F_UNLCK
    begin_handoff(src, VM1)
    # One query over the whole beacon range finds the hand-off and which VM it is for.
    kind, start = getlk(other, BEACON_BASE, BEACON_SPAN)
    assert (kind, start) == (fcntl.F_RDLCK, beacon(VM1))
    assert getlk(other, beacon(VM3))[0] == fcntl.F_UNLCK
    assert os.path.getsize(path) == 4096, "a lock far beyond EOF must not grow the file"


def test_conversions_never_leave_the_byte_free(disk):
    path, open_fd = disk
    src, third = open_fd(), open_fd()
    assert setlk(src, fcntl.F_WRLCK)
    prober = Prober(path)
    for _ in range(3000):
        assert setlk(src, fcntl.F_RDLCK)
        assert not setlk(third, fcntl.F_WRLCK), "a writer got in during a shared phase"
        assert setlk(src, fcntl.F_WRLCK)
    free, shared, exclusive = prober.stop()
    assert free == 0, f"byte 0 was seen unlocked {free} times during in-place conversions"
    assert shared + exclusive > 1000, "the prober hardly ran"


def test_handoff_between_two_daemons_has_no_free_instant(disk):
    """Ping-pong migrations: each round the destination becomes the next source."""
    path, open_fd = disk
    holder = open_fd()
    assert setlk(holder, fcntl.F_WRLCK)
    third = open_fd()
    prober = Prober(path)
    for _ in range(300):
        begin_handoff(holder, VM1)                    # source pauses: RELEASE
        assert not setlk(third, fcntl.F_WRLCK)         # a third writer is refused...
        assert not take_over(third, VM3)               # ...and is not VM1: no takeover either
        dest = open_fd()
        assert not setlk(dest, fcntl.F_WRLCK)          # destination resumes: ACQUIRE refused...
        assert take_over(dest, VM1)                    # ...but it is VM1's own hand-off
        assert not setlk(third, fcntl.F_WRLCK)
        assert getlk(third, 0)[0] == fcntl.F_RDLCK     # the shared phase, seen synchronously
        assert not complete_takeover(dest)             # the source still shares
        assert not end_handoff(holder)                # source QEMU exits: keep the lease file
        os.close(holder)
        assert complete_takeover(dest)
        assert not setlk(third, fcntl.F_WRLCK)
        holder = dest
    free, shared, exclusive = prober.stop()
    print(f"prober: {free} free, {shared} shared, {exclusive} exclusive observations")
    assert free == 0, f"byte 0 was seen unlocked {free} times during 300 hand-offs"
    # The shared phase is checked in the loop: the prober, a separate process,
    # may miss it entirely on a loaded machine (seen: 0 shared of ~2,500).
    assert exclusive > 0, (free, shared, exclusive)


def test_the_prober_sees_a_release_then_acquire_gap(disk):
    """The control: what libvirt's release-at-pause, acquire-at-resume does today
    (with a 2 ms gap; ~10 to 300 ms measured in docs/reliability.md)."""
    path, open_fd = disk
    holder = open_fd()
    assert setlk(holder, fcntl.F_WRLCK)
    prober = Prober(path)
    for _ in range(20):
        os.close(holder)
        time.sleep(0.002)
        holder = open_fd()
        assert setlk(holder, fcntl.F_WRLCK)
    free, _shared, _exclusive = prober.stop()
    assert free > 0, "the prober missed 20 gaps of 2 ms: the hand-off tests above would prove nothing"


def test_failed_migration_the_source_takes_its_lease_back(disk):
    path, open_fd = disk
    src, dest = open_fd(), open_fd()
    assert setlk(src, fcntl.F_WRLCK)
    begin_handoff(src, VM1)
    # The destination QEMU died before its ACQUIRE: the source resumes (ACQUIRE by the same owner).
    assert setlk(src, fcntl.F_WRLCK)
    fcntl.fcntl(src, F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, beacon(VM1), 1, 0))
    assert getlk(dest, BEACON_BASE, BEACON_SPAN)[0] == fcntl.F_UNLCK
    assert not take_over(dest, VM1), "no hand-off in progress any more: plain resource busy"


def test_once_the_destination_runs_the_source_cannot_resume(disk):
    path, open_fd = disk
    src, dest = open_fd(), open_fd()
    assert setlk(src, fcntl.F_WRLCK)
    begin_handoff(src, VM1)
    assert take_over(dest, VM1)
    assert not setlk(src, fcntl.F_WRLCK), "the source resumed beside a running destination"
