"""LockProgram with raw frames: no sockets, no daemon. Replies are compared
byte for byte with the frames rpc.py builds (which tests/unit/test_codec.py
checks against the real libvirt trace), and locks are checked from outside."""
import fcntl
import os
import struct

import pytest

from lockd import protocol as P
from lockd import rpc, xdr
from lockd.journal import Journal
from lockd.lockspace import Locks
from lockd.loop import EventLoop
from lockd.program import DROP, LockProgram
from lockd.state import DaemonState, Recorder
from lockd.systemd import Notifier

UUID = bytes(range(16))
OWNER_PID = 4000123          # above pid_max: never a real process
CFG = {"max_clients": 10, "admin_max_clients": 10}


class FakeConn:
    """What dispatch needs of a connection."""

    def __init__(self, pid=OWNER_PID):
        self.pid = pid
        self.owner = None
        self.own = False
        self.restricted = False
        self.skip = 0


def make_program(journal=None):
    state = DaemonState(dict(CFG), Locks("ofd"), Recorder(journal, Notifier(""), False), EventLoop())
    return LockProgram(state), state


def call(prog, conn, proc, payload=b"", serial=7):
    frame = P.encode_call(proc, serial, payload)
    return prog.dispatch(conn, bytearray(frame), 0, len(frame))


def ok(proc, serial=7):
    return rpc.reply_ok_frame(P.PROGRAM, 1, proc, serial)


def error(proc, err, serial=7):
    return rpc.reply_error_frame(P.PROGRAM, 1, proc, serial, err)


def register(prog, conn, pid=OWNER_PID, name="vm1"):
    return call(prog, conn, P.PROC_REGISTER, P.encode_register(P.Owner(UUID, name, 3, pid)))


def locked_elsewhere(path) -> bool:
    """An outside OFD probe: would a writer get byte 0 now?"""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))   # F_OFD_SETLK
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 512)
    return str(p)


def test_acquire_release_cycle(disk):
    prog, state = make_program()
    conn = FakeConn()
    assert register(prog, conn) == ok(P.PROC_REGISTER)
    assert call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_ACQUIRE_RESOURCE)
    assert locked_elsewhere(disk)
    assert call(prog, FakeConn(), P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == \
        error(P.PROC_ACQUIRE_RESOURCE, P.err_unregistered())
    other = FakeConn(OWNER_PID + 1)
    register(prog, other, OWNER_PID + 1, "vm2")
    assert call(prog, other, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == \
        error(P.PROC_ACQUIRE_RESOURCE, P.err_busy(disk))
    assert call(prog, conn, P.PROC_RELEASE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_RELEASE_RESOURCE)
    assert not locked_elsewhere(disk)
    assert call(prog, conn, P.PROC_RELEASE_RESOURCE, P.encode_resource("", disk)) == \
        error(P.PROC_RELEASE_RESOURCE, P.err_not_locked(disk))
    assert state.requests[P.PROC_ACQUIRE_RESOURCE] == 3 and state.request_errors == 3
    assert state.latency.snapshot()["count"] == 7


def test_checks_in_libvirts_order(disk, tmp_path):
    prog, _ = make_program()
    conn = FakeConn()
    register(prog, conn)
    assert call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk, 4)) == \
        error(P.PROC_ACQUIRE_RESOURCE, P.err_flags(P.PROC_ACQUIRE_RESOURCE, 4))
    assert call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource(str(tmp_path / "nols"), "x")) == \
        error(P.PROC_ACQUIRE_RESOURCE, P.err_no_lockspace(str(tmp_path / "nols")))
    assert call(prog, conn, P.PROC_RESTRICT, xdr.u32(0)) == ok(P.PROC_RESTRICT)
    assert call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == \
        error(P.PROC_ACQUIRE_RESOURCE, P.err_restricted())
    assert register(prog, conn) == error(P.PROC_REGISTER, P.err_restricted())


def test_indirect_lockspace_and_autocreate(tmp_path):
    prog, state = make_program()
    conn = FakeConn()
    register(prog, conn)
    ls = str(tmp_path / "lockspace")
    assert call(prog, conn, P.PROC_CREATE_LOCKSPACE, xdr.string(ls)) == ok(P.PROC_CREATE_LOCKSPACE)
    assert call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource(ls, "abc", P.ACQUIRE_AUTOCREATE)) == \
        ok(P.PROC_ACQUIRE_RESOURCE)
    assert locked_elsewhere(os.path.join(ls, "abc"))
    assert state.locks.holds(OWNER_PID)
    assert state.release_owner(OWNER_PID)
    assert not os.path.exists(os.path.join(ls, "abc"))      # autocreated lease files go with the lease


def test_what_earns_no_reply_or_a_drop():
    prog, _ = make_program()
    conn = FakeConn()
    ping = rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PING, rpc.MESSAGE, 0, rpc.OK)
    pong = rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PONG, rpc.MESSAGE, 0, rpc.OK)
    assert prog.dispatch(conn, bytearray(ping), 0, len(ping)) == pong
    reply = rpc.encode_frame(P.PROGRAM, 1, 1, rpc.REPLY, 0, rpc.OK)
    assert prog.dispatch(conn, bytearray(reply), 0, len(reply)) is None
    assert prog.dispatch(conn, bytearray(20), 0, 20) is DROP                   # shorter than a header
    fds = rpc.encode_frame(P.PROGRAM, 1, 1, rpc.CALL_WITH_FDS, 0, rpc.OK, xdr.u32(33))
    assert prog.dispatch(conn, bytearray(fds), 0, len(fds)) is DROP            # too many fds
    unknown = rpc.encode_frame(0x12345678, 1, 1, rpc.CALL, 5, rpc.OK)
    assert prog.dispatch(conn, bytearray(unknown), 0, len(unknown)) == \
        rpc.reply_error_frame(0x12345678, 1, 1, 5, P.err_unknown_program(0x12345678, 1))
    assert call(prog, conn, 9) == error(9, P.err_unknown_proc(9))
    bad_status = rpc.encode_frame(P.PROGRAM, 1, 1, rpc.CALL, 7, rpc.ERROR)
    assert prog.dispatch(conn, bytearray(bad_status), 0, len(bad_status)) == error(1, P.err_status(1))
    assert call(prog, conn, P.PROC_REGISTER, b"\0\0") == error(P.PROC_REGISTER, P.err_decode())


def test_acquire_is_refused_and_undone_when_the_journal_cannot_take_it(disk, tmp_path):
    journal = Journal("/dev/full")            # every write: ENOSPC
    journal.open()
    prog, state = make_program(journal)
    conn = FakeConn()
    register(prog, conn)
    reply = call(prog, conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))
    err = rpc.RPCError.decode(reply, rpc.HEADER_SIZE)
    assert err.message == "Unable to save lease state to /dev/full: No space left on device"
    assert not locked_elsewhere(disk), "a lease was kept that was not answered OK"
    assert state.locks.count() == 0 and not state.locks.holds(OWNER_PID)
    assert state.recorder.degraded and journal.pending == []
