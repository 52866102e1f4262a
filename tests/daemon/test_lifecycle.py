"""Daemon life cycle of ours: crash recovery from the journal, owner watching,
live re-exec under load, SIGHUP, the asynchronous kill sequence, max_clients,
peer credentials. (The same faults against the C daemon are in tests/reliability.)"""
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
import time

import pytest

from lockd.client import ConnectionClosed, LockClient, LockError
from lockd import protocol as P
from testbed.daemons import fake_pid, start_daemon
from testbed.wire import StandInOwner

from .conftest import UUID1, UUID2, admin, client_for, probe_lock, wait_for

AUTO = P.ACQUIRE_AUTOCREATE


def test_sigkill_then_restart_takes_leases_back(daemon, disk, owner, tmp_path):
    lsdir = str(tmp_path / "lockspace")
    c = client_for(daemon, UUID1, "vm1", owner.pid)
    c.create_lockspace(lsdir)
    c.acquire("", disk)
    c.acquire(lsdir, "a" * 64, AUTO)
    c.close()
    daemon.kill(signal.SIGKILL)
    daemon.wait(10)
    daemon.restart()
    st = admin(daemon).call("status")
    assert st["recovered_leases"] == 2 and st["lost_leases"] == []
    # the named lockspace survived too: no CREATE_LOCKSPACE needed (C: "does not exist")
    other = client_for(daemon, UUID2, "vm2", fake_pid())
    for ls, name, flags in (("", disk, 0), (lsdir, "a" * 64, AUTO)):
        with pytest.raises(LockError) as ei:
            other.acquire(ls, name, flags)
        assert ei.value.message == "resource busy: Lockspace resource '%s' is locked" % name
    assert probe_lock(disk) == "busy"
    # the owner has no connection any more: its exit releases the leases (pidfd)
    owner.kill()
    owner.wait()
    wait_for(lambda: not admin(daemon).call("leases")["leases"], what="leases released after owner exit")
    other.acquire("", disk)
    assert not os.path.exists(os.path.join(lsdir, "a" * 64))


def test_restart_drops_leases_of_dead_owners(daemon, disk):
    c = client_for(daemon, UUID1, "vm1", fake_pid())      # a pid that cannot be alive
    c.acquire("", disk)
    daemon.kill(signal.SIGKILL)
    daemon.wait(10)
    daemon.restart()
    assert admin(daemon).call("status")["recovered_leases"] == 0
    client_for(daemon, UUID2, "vm2", fake_pid()).acquire("", disk)


def test_lease_taken_during_the_gap_is_reported_lost(daemon, disk, owner):
    client_for(daemon, UUID1, "vm1", owner.pid).acquire("", disk)
    daemon.kill(signal.SIGKILL)
    daemon.wait(10)
    # without systemd's fd store the lock is free until the daemon is back:
    # someone grabs it meanwhile
    grabber = subprocess.Popen([sys.executable, "-c",
                                "import fcntl,os,struct,sys,time\n"
                                "fd=os.open(sys.argv[1],os.O_RDWR)\n"
                                "fcntl.fcntl(fd,fcntl.F_OFD_SETLK,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,1,0))\n"
                                "print('held',flush=True); time.sleep(60)\n", disk],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert grabber.stdout.readline().strip() == "held"
        daemon.restart()
        st = admin(daemon).call("status")
        assert st["recovered_leases"] == 0
        assert [x["resource"] for x in st["lost_leases"]] == [disk]
        assert st["lost_leases"][0]["owners"] == [owner.pid]
        assert "LEASE LOST" in daemon.log_tail(200)
    finally:
        grabber.kill()
        grabber.wait()


def test_reexec_under_load_loses_nothing(daemon, disk, tmp_path):
    lsdir = str(tmp_path / "ls")
    holder = client_for(daemon, UUID1, "vm1", fake_pid())
    holder.create_lockspace(lsdir)
    holder.acquire("", disk)
    errors, done = [], []
    stop = threading.Event()

    def loop(i):
        try:
            c = client_for(daemon, UUID2, "w%d" % i, fake_pid())
            n = 0
            while not stop.is_set():
                c.acquire(lsdir, "r%d" % i, AUTO)
                c.release(lsdir, "r%d" % i)
                n += 1
            done.append(n)
        except Exception as e:        # any error a client sees is a failure
            errors.append(repr(e))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    pid = daemon.pid
    for _ in range(3):
        time.sleep(0.3)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(done) == 20 and all(n > 0 for n in done)
    assert daemon.alive() and daemon.pid == pid
    with pytest.raises(LockError):
        client_for(daemon, UUID2, "vm2", fake_pid()).acquire("", disk)
    assert "re-exec complete" in daemon.log_tail(400)


def test_sighup_reloads_config_and_keeps_running(daemon):
    assert admin(daemon).call("status")["max_clients"] == 16384
    daemon.conf_path.write_text(daemon.conf_path.read_text() + "max_clients = 77\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: admin(daemon).call("status")["max_clients"] == 77, what="config reload")
    daemon.conf_path.write_text(daemon.conf_path.read_text() + "max_clients = = 1\n")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "keeping the old configuration" in daemon.log_tail(50), what="reload error logged")
    assert admin(daemon).call("status")["max_clients"] == 77


def test_kill_sequence_is_asynchronous(daemon, disk):
    """An owner that ignores SIGTERM: the C daemon blocks every client for up to
    3 s; ours keeps serving and SIGKILLs the owner after 1.6 s."""
    stub = StandInOwner(daemon.sock, ignore_sigterm=True)
    client_for(daemon, UUID1, "vm1", stub.pid).acquire("", disk)
    stub.close()                     # its connection closes while it holds a lease
    # while the owner is still alive (SIGTERM ignored), other clients are served
    with LockClient(str(daemon.sock), timeout=10) as c:
        assert c.ping()
        c.register(UUID2, "vm2", 2, fake_pid())
        c.acquire("", disk)          # released at once on EOF, before the kill ends
    assert stub.proc.poll() is None
    assert stub.wait(10) == -signal.SIGKILL


def test_graceful_stop_never_kills_owners(daemon, disk):
    stub = StandInOwner(daemon.sock)
    client_for(daemon, UUID1, "vm1", stub.pid).acquire("", disk)
    assert daemon.stop() == 0
    assert stub.alive()              # the C daemon SIGTERMs every lock owner here
    daemon.restart()
    assert admin(daemon).call("status")["recovered_leases"] == 1
    stub.kill()


def test_max_clients_answers_clearly(tmp_path):
    with start_daemon("py", tmp_path / "d", {"max_clients": 2, "max_clients_grace": 1}) as d:
        a = LockClient(str(d.sock))
        b = LockClient(str(d.sock))
        assert a.ping() and b.ping()
        c = LockClient(str(d.sock), timeout=10)
        with pytest.raises(LockError) as ei:
            c.register(UUID1, "vm", 1, fake_pid())
        assert "Too many active clients (2)" in ei.value.message and "max_clients" in ei.value.message
        # a slot freed during the grace period is handed to the waiting client
        late = LockClient(str(d.sock), timeout=10)
        t = threading.Timer(0.2, a.close)
        t.start()
        late.register(UUID1, "vm", 1, fake_pid())
        t.join()


@pytest.mark.parametrize("which", ["lock", "admin"])
def test_non_root_peer_is_refused(daemon, which):
    path = str(daemon.sock if which == "lock" else daemon.admin_sock)
    code = ("import os,socket,sys\nos.setgid(65534); os.setuid(65534)\n"
            "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.settimeout(5)\ntry:\n s.sendall(bytes.fromhex(sys.argv[2]))\nexcept (BrokenPipeError, ConnectionResetError):\n print('EOF'); sys.exit(0)\n"
            "d=b''\ntry:\n while True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nexcept ConnectionResetError: pass\n"
            "print(d.decode(errors='replace') if d else 'EOF')\n")
    ping = "0000001c6b656570000000010000000100000002000000000000000"+"0"
    payload = ping if which == "lock" else b'{"v":1,"op":"hello"}\n'.hex()
    # let uid 65534 reach the socket (pytest's tmp dirs are 0700); the daemon,
    # not the file mode, must be what refuses it
    d = os.path.dirname(path)
    while d.startswith("/tmp/") and d != "/tmp":
        os.chmod(d, 0o755)
        d = os.path.dirname(d)
    os.chmod(path, 0o777)
    r = subprocess.run([sys.executable, "-c", code, path, payload], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if which == "lock":
        assert r.stdout.strip() == "EOF"      # closed silently, like libvirt
    else:
        assert "permission-denied" in r.stdout and "root only" in r.stdout
    assert admin(daemon).call("hello")["server"] == "lockd"


def test_idle_timeout_exits_only_without_clients_and_leases(tmp_path, disk, owner):
    with start_daemon("py", tmp_path / "t", argv=[sys.executable, "-m", "lockd", "-t", "1"]) as d:
        c = client_for(d, UUID1, "vm1", owner.pid)
        c.acquire("", disk)
        c.close()          # not the owner's own connection: the lease stays
        time.sleep(2.5)
        assert d.alive()   # a lease is held, so no idle exit (the C daemon would exit)
        client_for(d, UUID1, "vm1", owner.pid).release("", disk)
        assert d.wait(10) == 0


def test_reexec_keeps_a_half_sent_request_bigger_than_10mib_of_state(daemon, disk):
    """A client in the middle of sending a large frame when SIGUSR1 arrives: the
    partial frame (hex in the state file: > 10 MiB, the C reader's cap) survives
    the re-exec and the call is answered once the rest arrives."""
    holder = client_for(daemon, UUID1, "vm1", fake_pid())
    holder.acquire("", disk)
    from lockd import rpc
    name = "x" * 60000
    payload = P.encode_resource("", name, 0) * 120              # ~7 MiB of arguments
    frame = P.encode_call(P.PROC_ACQUIRE_RESOURCE, 5, payload)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.sock))
    s.sendall(frame[:6 << 20])
    wait_for(lambda: admin(daemon).call("status")["clients"] >= 2, what="client accepted")
    time.sleep(0.5)                                             # let the daemon buffer it
    os.kill(daemon.pid, signal.SIGUSR1)
    wait_for(lambda: "re-exec complete" in daemon.log_tail(50), what="re-exec")
    s.sendall(frame[6 << 20:])
    s.settimeout(10)
    reply = b""
    while len(reply) < 28 or len(reply) < int.from_bytes(reply[:4], "big"):
        reply += s.recv(65536)
    h = rpc.decode_header(reply)
    assert (h.proc, h.serial, h.type) == (P.PROC_ACQUIRE_RESOURCE, 5, rpc.REPLY)
    # unregistered connection: the daemon decoded the whole frame and answered
    assert rpc.RPCError.decode(reply, 28).message.endswith("lock owner details have not been registered")
    with pytest.raises(LockError):
        client_for(daemon, UUID2, "vm2", fake_pid()).acquire("", disk)


def test_refuses_to_steal_a_served_socket(tmp_path):
    """Without socket activation the daemon binds its paths itself; if another
    daemon still answers there it must not unlink and replace that socket."""
    rt = tmp_path / "rt"
    (rt / "libvirt").mkdir(parents=True)
    d = str(tmp_path)
    while d.startswith("/tmp/") and d != "/tmp":
        os.chmod(d, 0o755)
        d = os.path.dirname(d)
    os.chmod(rt, 0o777)
    os.chmod(rt / "libvirt", 0o777)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(rt), HOME=str(rt),
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "lockd_src"))
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    first = subprocess.Popen(drop + ["/usr/bin/python3", "-m", "lockd"], env=env, cwd="/",
                             stderr=subprocess.PIPE, text=True)
    try:
        sock = rt / "libvirt" / "virtlockd-sock"
        def serving():
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(sock))
                return True
            except OSError:
                return False
            finally:
                probe.close()
        wait_for(serving, what="first daemon serving its socket")
        second = subprocess.run(drop + ["/usr/bin/python3", "-m", "lockd", "-p", str(rt / "other.pid")],
                                env=env, cwd="/", capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert "another daemon is already serving %s" % sock in second.stderr
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))                      # still the first daemon's socket
        c.close()
    finally:
        first.terminate()
        first.wait(10)
