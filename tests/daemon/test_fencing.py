"""The lease watchdog and fencing with real threads, a real owner process and
a filesystem we can stall (testbed/stallfs.py: FUSE, served by a process we
SIGSTOP, like an unreachable NFS server on a hard mount).

io_timeout = 2 s: the probes run every 0.5 s and a lease whose server is
silent is fenced within io_timeout + interval + tick + kill margin = 3.5 s.
The multi-kernel NFS version of this (real server, real lease expiry, hv2
taking the disk) is molecule/nfs_partition on the NFS test bed."""
import os
import subprocess
import time

import pytest

from lockd.adminclient import AdminError
from testbed import stallfs
from tests.daemon.conftest import UUID1, admin, client_for, wait_for
from tests.unit.test_lockspace import probe_lock

IO_TIMEOUT = 2
FENCE_WITHIN = IO_TIMEOUT + IO_TIMEOUT / 4 + 0.5 + 0.5
AUTO = 2

pytestmark = pytest.mark.skipif(stallfs.available() is not None, reason=str(stallfs.available()))


@pytest.fixture
def fs(tmp_path):
    with stallfs.StallFS(tmp_path / "backing", tmp_path / "mnt") as f:
        yield f


def daemon_with(tmp_path, fs, policy):
    from testbed.daemons import start_daemon
    return start_daemon("py", tmp_path / "d", {"log_level": 2, "io_timeout": IO_TIMEOUT,
                                               "on_lockfailure": policy})


def proc_state(pid) -> str:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def hold(d, fs, owner, name="disk1"):
    ls = str(fs.mountpoint / "lockspace")
    c = client_for(d, UUID1, "vm1", owner.pid)
    c.create_lockspace(ls)
    c.acquire(ls, name, AUTO)
    assert probe_lock(fs.backing / "lockspace" / name) == "busy"
    return c, ls


def lease_states(d):
    return {x["resource"]: x["state"] for x in admin(d).call("leases")["leases"]}


def test_poweroff_kills_the_owner_when_its_server_goes_silent(tmp_path, fs, owner):
    with daemon_with(tmp_path, fs, "poweroff") as d:
        c, ls = hold(d, fs, owner)
        assert lease_states(d) == {"disk1": "held"}
        time.sleep(1.5)                       # a few healthy probe rounds
        assert owner.poll() is None
        fs.stall()
        t0 = time.monotonic()
        wait_for(lambda: owner.poll() is not None, timeout=FENCE_WITHIN + 3, what="owner killed")
        took = time.monotonic() - t0
        print("owner SIGKILLed %.2f s after its storage stopped answering (budget %.1f s)" % (took, FENCE_WITHIN))
        assert took <= FENCE_WITHIN + 1.0, "fenced %.1f s after the cut (budget %.1f s)" % (took, FENCE_WITHIN)
        assert owner.returncode == -9
        log = d.log_tail(80)
        assert "LEASE AT RISK: disk %s/disk1" % ls in log and "Action: poweroff" in log
        fencing = admin(d).call("status")["fencing"]
        dec = [x for x in fencing["decisions"] if x["resource"] == "disk1"][-1]
        assert dec["state"] == "fenced" and dec["action"] == "poweroff" and dec["owners"][0]["pid"] == owner.pid
        tl = dec["timeline"]
        assert tl["last_answer"] < tl["decided"] < tl["server_may_grant_elsewhere"]
        fs.resume()
        # the owner is gone: its lease goes, and the unlock reaches the "server"
        wait_for(lambda: lease_states(d) == {}, what="lease released")
        wait_for(lambda: not (fs.backing / "lockspace" / "disk1").exists(), what="lease file unlocked, deleted")
        # the decision survives a restart (fencing.jsonl in state_dir)
        d.stop()
        d.restart()
        assert any(x["state"] == "fenced" for x in admin(d).call("status")["fencing"]["decisions"])


def test_pause_stops_the_owner_and_resume_waits_for_the_lease(tmp_path, fs, owner):
    with daemon_with(tmp_path, fs, "pause") as d:
        hold(d, fs, owner)
        time.sleep(1.0)
        fs.stall()
        wait_for(lambda: proc_state(owner.pid) == "T", timeout=FENCE_WITHIN + 3, what="owner stopped")
        st = admin(d).call("status")["fencing"]
        assert [p["pid"] for p in st["paused"]] == [owner.pid]
        assert lease_states(d) == {"disk1": "fenced"}
        with pytest.raises(AdminError) as e:
            admin(d).call("resume", owner_pid=owner.pid)
        assert e.value.code == "busy" and "stays stopped" in e.value.message
        fs.resume()            # the server answers again well within its lease time: re-taken
        wait_for(lambda: lease_states(d) == {"disk1": "held"}, what="lease re-taken")
        assert proc_state(owner.pid) == "T", "lockd never continues a VM by itself"
        r = admin(d).call("resume", owner_pid=owner.pid)
        assert r["changed"] and [p["pid"] for p in r["resumed"]] == [owner.pid]
        wait_for(lambda: proc_state(owner.pid) in ("S", "R"), what="owner continued")
        assert admin(d).call("status")["fencing"]["paused"] == []
        assert probe_lock(fs.backing / "lockspace" / "disk1") == "busy"


def test_a_lock_taken_by_another_host_is_lost_for_good(tmp_path, fs, owner):
    with daemon_with(tmp_path, fs, "ignore") as d:
        hold(d, fs, owner)
        fs.drop_locks()         # the server expired our state ...
        os.stat(fs.mountpoint)  # (the FUSE daemon applies it before its next request)
        thief = subprocess.Popen(["python3", "-c", (
            "import fcntl,os,struct,sys,time\n"
            "fd=os.open(sys.argv[1],os.O_RDWR)\n"
            "fcntl.fcntl(fd,37,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,1,0))\n"
            "print('taken',flush=True); time.sleep(60)\n"), str(fs.backing / "lockspace" / "disk1")],
            stdout=subprocess.PIPE)
        try:
            assert thief.stdout.readline().strip() == b"taken"      # ... and another host took the disk
            wait_for(lambda: lease_states(d) == {"disk1": "lost"}, timeout=5, what="lease lost")
            assert owner.poll() is None, "on_lockfailure = ignore: log only"
            assert "LEASE LOST: disk" in d.log_tail(50) and "another holder" in d.log_tail(50)
            time.sleep(1.5)
            assert lease_states(d) == {"disk1": "lost"}, "a lost lease is never believed held again"
        finally:
            thief.kill()
            thief.wait()
        time.sleep(1.0)
        assert lease_states(d) == {"disk1": "lost"}


def test_eio_from_the_server_fences(tmp_path, fs, owner):
    with daemon_with(tmp_path, fs, "poweroff") as d:
        hold(d, fs, owner)
        fs.fail_io()
        wait_for(lambda: owner.poll() is not None, timeout=5, what="owner killed")
        assert "LEASE LOST" in d.log_tail(50) and "EIO" in d.log_tail(50)
        fs.fail_io()
