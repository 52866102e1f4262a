"""Differential: what happens when connections close (spec §4.6), peer
credentials (§4.2) and max_clients back-pressure.

The owner is a stand-in child process (testbed/owner_stub.py) that
connects by itself, so its SO_PEERCRED pid equals the pid it REGISTERs, like
the connection libvirt leaks into QEMU. Both daemons are allowed to kill it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lockd import protocol as P
from testbed.wire import EOF, PING, PONG, UUID_A, UUID_B, Conn

SHARED, AUTO = P.ACQUIRE_SHARED, P.ACQUIRE_AUTOCREATE
pytestmark = pytest.mark.c_daemon


def settle(r) -> None:
    """Let the daemon process the EOFs we caused before we look.

    Two keepalive round trips on a fresh connection: the daemon has then run
    its event loop at least twice after our close(), and a closed socket's EOF
    is ready before the new connection even exists. Both daemons handle the
    EOF (release + first SIGTERM) synchronously within that loop iteration.
    """
    with Conn(r.daemon.sock) as c:
        for _ in range(2):
            c.send(PING)
            assert c.recv() == PONG


def until_acquired(r, conn, path, name, flags=0, timeout=10.0):
    """Retry a refused ACQUIRE until it succeeds (the release after an owner's
    death may be asynchronous); record only the final reply."""
    deadline = time.monotonic() + timeout
    while True:
        out = conn.acquire(path, name, flags)
        if out == EOF or len(out) == 28 or time.monotonic() > deadline:
            return out
        time.sleep(0.01)


def test_owner_close_releases_and_kills(differential):
    """The owner's own connection closes while the owner lives: everything it
    holds is released, then the owner is killed (SIGTERM first)."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)     # libvirtd's short-lived connection
        r.rec("acquire disk1", lv.acquire("", r.path("disk1.img")))
        r.rec("acquire disk2 shared", lv.acquire("", r.path("disk2.img"), SHARED))
        lv.create_lockspace(r.path("ls"))
        r.rec("acquire lease auto", lv.acquire(r.path("ls"), "lease", AUTO))
        lv.close()
        other = r.registered(UUID_B, "vm2", 2)
        r.rec("other: disk1 busy while the owner lives", other.acquire("", r.path("disk1.img")))
        o.close()
        r.rec("owner exit status (killed by SIGTERM = -15)", o.wait(15))
        r.rec("other: disk1 now", until_acquired(r, other, "", r.path("disk1.img")))
        r.rec("other: disk2 exclusive now", until_acquired(r, other, "", r.path("disk2.img")))
        r.rec_exists("ls/lease")
    differential(sc)


def test_owner_exits(differential):
    """QEMU exits (the normal case): its connection closes, leases are released."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("acquire", lv.acquire("", r.path("disk1.img")))
        lv.close()
        o.exit()
        r.rec("owner exit status", o.wait(15))
        other = r.registered(UUID_B, "vm2", 2)
        r.rec("other acquire after owner exit", until_acquired(r, other, "", r.path("disk1.img")))
    differential(sc)


def test_owner_close_holding_nothing_is_not_killed(differential):
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        o.close()
        settle(r)
        r.rec("owner still alive", o.alive())
    differential(sc)


def test_owner_ignoring_sigterm_gets_sigkill(differential):
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1, ignore_sigterm=True)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("acquire", lv.acquire("", r.path("disk1.img")))
        o.close()
        r.rec("owner exit status (SIGKILL = -9)", o.wait(20))
    differential(sc)


def test_unrestricted_owner_connection(differential):
    """Restriction is irrelevant to the EOF rule: peer pid == owner pid is."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1, restrict=False)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("acquire", lv.acquire("", r.path("disk1.img")))
        o.close()
        r.rec("owner exit status", o.wait(15))
    differential(sc)


def test_non_owner_close_keeps_leases(differential):
    """Leases belong to the owner pid: closing libvirtd's connection (peer pid
    != owner pid) releases nothing and kills nobody."""
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        r.rec("acquire", lv.acquire("", r.path("disk1.img")))
        lv.close()
        settle(r)
        r.rec("owner alive", o.alive())
        other = r.registered(UUID_B, "vm2", 2)
        r.rec("still held", other.acquire("", r.path("disk1.img")))
    differential(sc)


def test_owner_eof_leaves_other_shared_holders(differential):
    def sc(r):
        o = r.owner(uuid=UUID_A, name="vm1", oid=1)
        lv = r.registered(UUID_A, "vm1", 1, pid=o.pid)
        b = r.registered(UUID_B, "vm2", 2)
        r.rec("owner shared", lv.acquire("", r.path("disk2.img"), SHARED))
        r.rec("b shared", b.acquire("", r.path("disk2.img"), SHARED))
        o.close()
        r.rec("owner exit status", o.wait(15))
        settle(r)
        c = r.registered(UUID_B, "vm3", 3)
        r.rec("exclusive still refused (b holds it)", c.acquire("", r.path("disk2.img")))
        r.rec("b release", b.release("", r.path("disk2.img")))
        r.rec("exclusive now", c.acquire("", r.path("disk2.img")))
    differential(sc)


def test_non_root_peer_is_disconnected(differential):
    """Spec §4.2: a privileged daemon only serves uid 0; others are closed
    without a reply. The peer is a child process running as 'nobody'."""
    code = (
        "import os,socket,sys\n"
        "os.setgid(65534);os.setuid(65534)\n"
        "s=socket.socket(socket.AF_UNIX);s.settimeout(15);s.connect(sys.argv[1])\n"
        "d=b''\n"
        "try:\n s.sendall(bytes.fromhex(sys.argv[2])); d=s.recv(4096)\n"
        "except (BrokenPipeError, ConnectionResetError): pass\n"
        "print('EOF' if not d else d.hex())"
    )
    # BrokenPipe/ECONNRESET and an empty read all mean "closed without a reply":
    # which one we see depends only on whether the daemon closed before or
    # after our PING arrived, a race that says nothing about the protocol.

    def sc(r):
        os.chmod(r.daemon.sock, 0o777)
        ping = PING.hex()
        res = subprocess.run([sys.executable, "-c", code, str(r.daemon.sock), ping],
                             capture_output=True, text=True, timeout=30)
        r.rec("uid 65534 peer sends PING", res.stdout.strip() or res.stderr.strip()[-200:])
        os.chmod(r.daemon.sock, 0o600)
    out = differential(sc)
    assert ("uid 65534 peer sends PING", EOF) in out


def test_max_clients_back_pressure(differential):
    """At max_clients the daemon stops accepting: a further client queues
    (no reply) and is served as soon as another client disconnects."""
    def sc(r):
        # The witness holds one slot; fill the others.
        held = [r.conn() for _ in range(2)]
        for c in held:
            c.send(PING)
            assert c.recv() == PONG
        waiting = r.conn()
        waiting.send(PING)
        # The daemon has run its loop after our connect (answers on held[0]) ...
        held[0].send(PING)
        r.rec("held client served", held[0].recv())
        # ... and still has not answered the queued client.
        waiting.sock.setblocking(False)
        try:
            early = waiting.sock.recv(100)
            r.rec("queued client got", early.hex() or "EOF")
        except BlockingIOError:
            r.rec("queued client got", "nothing yet")
        waiting.sock.setblocking(True)
        waiting.sock.settimeout(15)
        held[1].close()
        r.rec("queued client served after a slot freed", waiting.recv())
        held[0].close()   # free slots for the runner's witness probe
        waiting.close()
    differential(sc, conf={"max_clients": 3})
