"""A lockspace on a filesystem that stops answering (testbed/stallfs.py: a FUSE
filesystem whose daemon is SIGSTOPped blocks every call, like an NFS hard
mount whose server is gone). lockd runs the calls on it in a worker thread
with a deadline (lockd.storage), so:

* the direct lockspace and a second, local lockspace keep serving;
* an acquire in the hung lockspace is answered with the timeout error in time;
* ``status`` / ``virtlockctl status`` list the stalled lockspace;
* when the filesystem answers again, the lock that came too late is given
  back: lock state matches what the clients were told (checked from outside,
  on the backing files, as another host would).
"""
import json
import os
import subprocess
import sys
import time

import pytest

from lockd.client import LockError
from testbed import stallfs
from tests.daemon.conftest import UUID1, UUID2, admin, client_for, fake_pid, wait_for
from tests.unit.test_lockspace import probe_lock

IO_TIMEOUT = 2
AUTO = 2     # ACQUIRE_AUTOCREATE

pytestmark = pytest.mark.skipif(stallfs.available() is not None, reason=str(stallfs.available()))


@pytest.fixture
def fs(tmp_path):
    with stallfs.StallFS(tmp_path / "backing", tmp_path / "mnt") as f:
        yield f
        if f.stalled:
            f.resume()


@pytest.fixture
def hung_daemon(tmp_path, fs):
    from testbed.daemons import start_daemon
    with start_daemon("py", tmp_path / "d", {"log_level": 2, "io_timeout": IO_TIMEOUT}) as d:
        yield d
        if fs.stalled:
            fs.resume()


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
        return time.monotonic() - t0, None
    except LockError as e:
        return time.monotonic() - t0, e


def test_a_hung_lockspace_never_stalls_the_others(hung_daemon, fs, tmp_path, disk):
    d = hung_daemon
    nfs_ls = str(fs.mountpoint / "lockspace")
    local_ls = str(tmp_path / "local-lockspace")
    vm1 = client_for(d, UUID1, "vm1", fake_pid())
    vm1.create_lockspace(nfs_ls)
    vm1.create_lockspace(local_ls)
    vm1.acquire(nfs_ls, "held", AUTO)
    assert probe_lock(fs.backing / "lockspace" / "held") == "busy"
    vm2 = client_for(d, UUID2, "vm2", fake_pid())

    fs.stall()
    took, err = timed(lambda: vm2.acquire(nfs_ls, "late", AUTO))
    assert err is not None and IO_TIMEOUT * 0.9 <= took < IO_TIMEOUT + 1.5, (took, err)
    assert str(err) == ("Timed out during operation: Lockspace resource 'late' on %s did not answer within %d s"
                        % (fs.mountpoint, IO_TIMEOUT))
    # the direct lockspace and the local lockspace answer as usual meanwhile
    took, err = timed(lambda: vm2.acquire("", disk))
    assert err is None and took < 1.0, (took, err)
    took, err = timed(lambda: vm2.acquire(local_ls, "local", AUTO))
    assert err is None and took < 1.0, (took, err)
    assert probe_lock(disk) == "busy" and probe_lock(os.path.join(local_ls, "local")) == "busy"
    # a new call on the stalled filesystem is refused at once
    took, err = timed(lambda: vm2.acquire(nfs_ls, "other", AUTO))
    assert err is not None and took < 1.0 and "has not answered for" in str(err), (took, err)
    status = admin(d).call("status")
    stalled = status["stalled_lockspaces"]
    assert [s["lockspace"] for s in stalled] == [nfs_ls] and stalled[0]["mount"] == str(fs.mountpoint)
    assert stalled[0]["pending_calls"] >= 1 and stalled[0]["since"] <= time.time() - IO_TIMEOUT + 0.5
    out = subprocess.run([sys.executable, "-m", "lockd.ctl", "-s", str(d.admin_sock), "status"],
                         capture_output=True, text=True, timeout=30)
    assert "STALLED %s on %s" % (nfs_ls, fs.mountpoint) in out.stdout, out.stdout

    fs.resume()
    # the lock that came after the client was told "failed" is given back; the held one stays
    wait_for(lambda: probe_lock(fs.backing / "lockspace" / "late") == "free", what="late lock undone")
    wait_for(lambda: admin(d).call("status")["stalled_lockspaces"] == [], what="stall cleared")
    assert probe_lock(fs.backing / "lockspace" / "held") == "busy"
    leases = {(x["lockspace"], x["resource"]) for x in admin(d).call("leases")["leases"]}
    assert leases == {(nfs_ls, "held"), ("", disk), (local_ls, "local")}
    assert "came" in d.log_tail(50) and "after its deadline" in d.log_tail(50)
    # and the lockspace serves again
    vm2.acquire(nfs_ls, "late", AUTO)
    assert probe_lock(fs.backing / "lockspace" / "late") == "busy"
    vm2.release(nfs_ls, "late")
    assert not (fs.backing / "lockspace" / "late").exists()    # autocreated: deleted with the lease


def test_a_release_waits_for_its_unlock_and_times_out_cleanly(hung_daemon, fs):
    d = hung_daemon
    nfs_ls = str(fs.mountpoint / "lockspace")
    vm1 = client_for(d, UUID1, "vm1", fake_pid())
    vm1.create_lockspace(nfs_ls)
    vm1.acquire(nfs_ls, "r", AUTO)
    fs.stall()
    took, err = timed(lambda: vm1.release(nfs_ls, "r"))
    assert err is not None and took < IO_TIMEOUT + 1.5 and "did not answer within" in str(err), (took, err)
    # released in the table at once; the unlock is queued and runs when the server answers
    assert admin(d).call("leases")["leases"] == []
    assert probe_lock(fs.backing / "lockspace" / "r") == "busy"   # our unlock waits with the server
    fs.resume()
    # the queued unlink + unlock + close ran (autocreated: the file goes with the lease)
    wait_for(lambda: not (fs.backing / "lockspace" / "r").exists(), what="queued unlock")


def test_statfs_calls_a_fuse_mount_network(fs):
    from lockd import fstype
    info = fstype.classify(str(fs.mountpoint), fstype.read_mounts())
    assert info.magic == 0x65735546 and info.network and info.mount == str(fs.mountpoint)
    assert info.fstype == "fuse.stallfs"
    assert fstype.is_network(0x6969, "?"), "NFS's f_type"
    assert json.dumps(fstype.NETWORK_MAGIC[0x6969]) == '"nfs"'


def test_a_request_followed_by_eof_is_answered_before_the_close(daemon, tmp_path):
    """The first request in a new directory waits for its look-up in a
    worker; a client that sends it and closes its side at once still gets the
    answer, as from libvirt's daemon (which answers before it reads the EOF)."""
    import socket as so
    from lockd import protocol as P
    from testbed.wire import EOF, UUID_A, Conn, register_args, res_args
    disk = tmp_path / "fresh-dir" / "disk.img"
    disk.parent.mkdir()
    disk.write_bytes(b"\0" * 512)
    with Conn(daemon.sock) as c:
        c.send(P.encode_call(P.PROC_REGISTER, 1, register_args(UUID_A, "vm", 1, fake_pid()))
               + P.encode_call(P.PROC_ACQUIRE_RESOURCE, 2, res_args("", str(disk))))
        c.sock.shutdown(so.SHUT_WR)
        first, second, third = c.recv(), c.recv(), c.recv()
    assert len(first) == 28 and len(second) == 28 and third == EOF
