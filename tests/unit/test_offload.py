"""Storage calls in worker threads (lockd.storage, lockd.offload), with real
threads, real files and a stall we control: the program's replies come later,
a call past its deadline gets the timeout error, a late lock is undone, and
other filesystems keep serving meanwhile.

``storage_workers = "all"`` treats the local filesystem as a network one, so
no NFS is needed; the stall is an Event the worker waits on before the real
call (tests/daemon/test_hung_storage.py does the same with a real FUSE
filesystem whose daemon is stopped)."""
import os
import threading
import time

import pytest

from lockd import protocol as P
from lockd import rpc
from lockd.deferred import Pending
from lockd.lockspace import Locks
from lockd.loop import EventLoop
from lockd.offload import Offload
from lockd.program import LockProgram
from lockd.state import DaemonState, Recorder
from lockd.storage import Storage
from lockd.storefiles import StoreFiles
from lockd.systemd import Notifier
from tests.unit.test_program import CFG, OWNER_PID, FakeConn, locked_elsewhere, ok, register

TIMEOUT = 0.4


class WaitingConn(FakeConn):
    """A connection that collects the replies that come later."""

    def __init__(self, pid=OWNER_PID):
        super().__init__(pid)
        self.fd = 5
        self.replies = []

    def resume(self, pending):
        if self.fd >= 0:             # as LockConn: a closed connection gets nothing
            self.replies.append(pending.frame)


class Rig:
    """DaemonState + LockProgram + Storage on a real event loop."""

    def __init__(self, mode="all", timeout=TIMEOUT):
        self.loop = EventLoop()
        self.state = DaemonState(dict(CFG), Locks("ofd"), Recorder(None, Notifier(""), False), self.loop)
        self.prog = LockProgram(self.state)
        self.storage = Storage(self.loop, self.state.locks, timeout, mode)
        self.state.storage = self.storage
        self.prog.offload = Offload(self.state, self.storage)

    def call(self, conn, proc, payload):
        frame = P.encode_call(proc, 7, payload)
        r = self.prog.dispatch(conn, bytearray(frame), 0, len(frame))
        if isinstance(r, Pending):
            r.attach(conn, len(frame))
            if r.frame is not None:
                conn.resume(r)
        elif r is not None:
            conn.replies.append(r)
        return r

    def run_until(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout

        def check():
            if pred() or time.monotonic() > deadline:
                self.loop.stop()
            else:
                self.loop.call_later(0.01, check)
        self.loop.call_later(0, check)
        self.loop.run()
        assert pred(), "timed out waiting"

    def reply(self, conn, proc, payload, timeout=5.0):
        n = len(conn.replies)
        self.call(conn, proc, payload)
        self.run_until(lambda: len(conn.replies) > n, timeout)
        return conn.replies[n]

    def close(self):
        self.storage.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def stall(monkeypatch):
    """gate.clear() stalls every open on a worker until gate.set()."""
    gate = threading.Event()
    gate.set()
    real = StoreFiles.open_locked

    def slow(self, *args):
        gate.wait()
        return real(self, *args)
    monkeypatch.setattr(StoreFiles, "open_locked", slow)
    yield gate
    gate.set()


def error_of(frame) -> rpc.RPCError:
    return rpc.RPCError.decode(frame, rpc.HEADER_SIZE)


def disk_in(d, name="disk.img"):
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(b"\0" * 512)
    return str(p)


def test_acquire_and_release_are_answered_from_the_worker(rig, tmp_path):
    disk = disk_in(tmp_path)
    conn = WaitingConn()
    register(rig.prog, conn)
    pending = rig.call(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))
    assert isinstance(pending, Pending), "a network store answers later"
    rig.run_until(lambda: conn.replies)
    assert conn.replies == [ok(P.PROC_ACQUIRE_RESOURCE)]
    assert locked_elsewhere(disk)
    assert rig.reply(conn, P.PROC_RELEASE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_RELEASE_RESOURCE)
    assert not locked_elsewhere(disk)
    assert rig.state.requests[P.PROC_ACQUIRE_RESOURCE] == 1 and rig.state.latency.snapshot()["count"] == 3


def test_a_call_past_its_deadline_fails_and_its_late_lock_is_undone(rig, tmp_path, stall):
    disk = disk_in(tmp_path)
    conn = WaitingConn()
    register(rig.prog, conn)
    stall.clear()
    t0 = time.monotonic()
    frame = rig.reply(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))
    took = time.monotonic() - t0
    err = error_of(frame)
    assert err.code == rpc.ERR_OPERATION_TIMEOUT
    mount = rig.storage.stores[os.stat(disk).st_dev].mount
    assert err.message == ("Timed out during operation: Lockspace resource '%s' on %s did not answer within "
                           "%g s" % (disk, mount, TIMEOUT))
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 1.0
    # stalled: the next call is refused at once, and status says which lockspace
    t1 = time.monotonic()
    other = WaitingConn(OWNER_PID + 1)
    register(rig.prog, other, OWNER_PID + 1, "vm2")
    refused = error_of(rig.reply(other, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)))
    assert time.monotonic() - t1 < 0.2 and "has not answered for" in refused.message
    stalled = rig.state.status()["stalled_lockspaces"]
    assert [(s["lockspace"], s["mount"], s["pending_calls"]) for s in stalled] == [("", mount, 1)]
    # the storage answers: the lock it took is given back, nothing is held
    stall.set()
    rig.run_until(lambda: rig.prog.offload.late_undone == 1)
    assert not locked_elsewhere(disk), "a lock that came after the client was told 'failed' leaked"
    assert rig.state.locks.count() == 0 and rig.state.status()["stalled_lockspaces"] == []
    assert rig.reply(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_ACQUIRE_RESOURCE)


def test_other_filesystems_keep_serving_while_one_hangs(tmp_path, stall):
    rig = Rig(mode="network")          # tmp_path is local: the fast path
    try:
        hung = rig.storage.store_for(-42, "/nfs", "nfs4", True)      # a network store that hangs
        rig.storage.dirs[str(tmp_path / "nfs")] = hung
        nfs_disk = disk_in(tmp_path / "nfs")
        local_disk = disk_in(tmp_path / "local")
        conn, other = WaitingConn(), WaitingConn(OWNER_PID + 1)
        register(rig.prog, conn)
        register(rig.prog, other, OWNER_PID + 1, "vm2")
        stall.clear()
        assert isinstance(rig.call(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", nfs_disk)), Pending)
        # the local disk's first acquire looks its directory up in a worker, then it is the fast path
        assert rig.reply(other, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", local_disk)) == \
            ok(P.PROC_ACQUIRE_RESOURCE)
        assert rig.reply(other, P.PROC_RELEASE_RESOURCE, P.encode_resource("", local_disk)) == \
            ok(P.PROC_RELEASE_RESOURCE)
        # answered at once, on the loop, while the NFS acquire still waits
        assert rig.call(other, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", local_disk)) == \
            ok(P.PROC_ACQUIRE_RESOURCE)
        assert not conn.replies
        rig.run_until(lambda: conn.replies)
        assert error_of(conn.replies[0]).code == rpc.ERR_OPERATION_TIMEOUT
    finally:
        stall.set()
        rig.close()


def test_a_lock_for_a_connection_that_went_away_is_undone(rig, tmp_path, stall):
    disk = disk_in(tmp_path)
    conn = WaitingConn()
    register(rig.prog, conn)
    stall.clear()
    rig.call(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))
    conn.fd = -1                      # the client hung up while its lock was being taken
    stall.set()
    store = rig.storage.stores[os.stat(disk).st_dev]
    rig.run_until(lambda: store.backlog() == 0 and conn.replies == [] and not locked_elsewhere(disk))
    assert rig.state.locks.count() == 0


def test_busy_and_shared_answers_come_from_the_worker_too(rig, tmp_path):
    disk = disk_in(tmp_path)
    a, b = WaitingConn(), WaitingConn(OWNER_PID + 1)
    register(rig.prog, a)
    register(rig.prog, b, OWNER_PID + 1, "vm2")
    assert rig.reply(a, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_ACQUIRE_RESOURCE)
    # held: the table answers busy without a storage call
    assert error_of(rig.reply(b, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))).code == \
        rpc.ERR_RESOURCE_BUSY
    # an alias (hard link) of the held disk: the worker's own index refuses it
    alias = os.path.join(os.path.dirname(disk), "alias.img")
    os.link(disk, alias)
    assert error_of(rig.reply(b, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", alias))).message == \
        "resource busy: Lockspace resource '%s' is locked" % alias
    assert rig.reply(a, P.PROC_RELEASE_RESOURCE, P.encode_resource("", disk)) == ok(P.PROC_RELEASE_RESOURCE)
    sh = P.ACQUIRE_SHARED
    assert rig.reply(a, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk, sh)) == ok(P.PROC_ACQUIRE_RESOURCE)
    assert rig.reply(b, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk, sh)) == ok(P.PROC_ACQUIRE_RESOURCE)


def test_indirect_lockspace_calls_go_to_the_worker(rig, tmp_path):
    conn = WaitingConn()
    register(rig.prog, conn)
    from lockd import xdr
    ls = str(tmp_path / "lockspace")
    assert rig.reply(conn, P.PROC_CREATE_LOCKSPACE, xdr.string(ls)) == ok(P.PROC_CREATE_LOCKSPACE)
    assert os.path.isdir(ls) and ls in rig.state.locks.lockspaces
    assert rig.reply(conn, P.PROC_CREATE_RESOURCE, P.encode_resource(ls, "r1")) == ok(P.PROC_CREATE_RESOURCE)
    assert os.path.exists(os.path.join(ls, "r1"))
    auto = P.ACQUIRE_AUTOCREATE
    assert rig.reply(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource(ls, "r2", auto)) == \
        ok(P.PROC_ACQUIRE_RESOURCE)
    assert locked_elsewhere(os.path.join(ls, "r2"))
    assert rig.reply(conn, P.PROC_RELEASE_RESOURCE, P.encode_resource(ls, "r2")) == ok(P.PROC_RELEASE_RESOURCE)
    assert not os.path.exists(os.path.join(ls, "r2"))        # autocreated: deleted with the lease
    assert rig.reply(conn, P.PROC_DELETE_RESOURCE, P.encode_resource(ls, "r1")) == ok(P.PROC_DELETE_RESOURCE)
    assert not os.path.exists(os.path.join(ls, "r1"))


def test_an_owner_exit_queues_its_unlocks(rig, tmp_path):
    disk = disk_in(tmp_path)
    conn = WaitingConn()
    register(rig.prog, conn)
    rig.reply(conn, P.PROC_ACQUIRE_RESOURCE, P.encode_resource("", disk))
    rig.state.release_owner(OWNER_PID)
    store = rig.storage.stores[os.stat(disk).st_dev]
    rig.run_until(lambda: store.backlog() == 0)
    assert not locked_elsewhere(disk) and rig.state.locks.count() == 0
