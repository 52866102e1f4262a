"""The SIGUSR1 hand-over without an exec: save a running state, load it back
in the same process, apply it to a fresh state, and compare."""
import os
import socket

from lockd import handover
from lockd import protocol as P
from lockd.journal import Journal
from lockd.lockspace import Locks
from lockd.loop import EventLoop
from lockd.program import LockProgram
from lockd.server import LockConn, Server
from lockd.state import DaemonState, Recorder
from lockd.systemd import Notifier

UUID = bytes(range(16))
CFG = {"max_clients": 10, "admin_max_clients": 10}


def fresh(tmp_path, name):
    journal = Journal(str(tmp_path / ("%s.jsonl" % name)))
    journal.open()
    state = DaemonState(dict(CFG), Locks("ofd"), Recorder(journal, Notifier(""), False), EventLoop())
    return state, Server(state, LockProgram(state))


def test_save_load_apply_round_trip(tmp_path):
    state, server = fresh(tmp_path, "old")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock"))
    listener.listen()
    server.add_listener(listener, "lock")
    a, peer = socket.socketpair()
    conn = LockConn(server, a, os.getpid(), 0).start()
    owner = P.Owner(UUID, "vm1", 3, 4000321)
    conn.owner, conn.restricted = owner, True
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0")
    ls = state.create_lockspace(str(tmp_path / "ls"))
    state.acquire(state.locks.default, str(disk), state.owners.identify(owner), 0)
    state.acquire(ls, "lease1", state.owners.identify(owner), P.ACQUIRE_AUTOCREATE)
    half = P.encode_call(P.PROC_RESTRICT, 9)[:10]
    conn.rbuf += half                                       # a request half read
    path = str(tmp_path / handover.STATE_FILE)
    fds = handover.save(state, server, None, path)
    assert set(fds) >= {conn.fd, listener.fileno()} and len(fds) == 4

    data = handover.load(path)
    assert data is not None and not os.path.exists(path)    # read once, then gone
    # the new image owns the fds now; the old objects let go without closing
    lfd = listener.detach()
    a.detach()
    state.loop.handlers.clear()

    state2, server2 = fresh(tmp_path, "new")
    handover.apply(state2, server2, data)
    assert sorted((r.lockspace.key, r.name, r.fd) for r in state2.locks.resources()) == \
        sorted((r.lockspace.key, r.name, r.fd) for r in state.locks.resources())
    [conn2] = state2.clients.values()
    assert conn2.owner == owner and conn2.restricted and bytes(conn2.rbuf) == half
    assert state2.owners.get(4000321).name == "vm1"
    assert list(server2.listeners) == [lfd]
    peer.close()


def test_load_refuses_another_pids_file(tmp_path):
    path = tmp_path / handover.STATE_FILE
    path.write_text('{"magic": "1", "format": %d}' % handover.FORMAT)
    assert handover.load(str(path)) is None
    path.write_text("{not json")
    assert handover.load(str(path)) is None
    assert handover.load(str(tmp_path / "absent")) is None
