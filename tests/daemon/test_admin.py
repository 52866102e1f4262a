"""The admin interface of a running daemon: queries, release and adoption with
their refusals, malformed requests, and virtlockctl in both output forms."""
import json
import socket
import subprocess
import sys

import pytest

from lockd.adminclient import AdminError
from lockd.client import LockError
from testbed.daemons import fake_pid

from .conftest import UUID1, UUID2, admin, client_for, wait_for


def raw(d, line: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(d.admin_sock))
    try:
        s.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass            # the daemon answered and hung up before reading it all
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf) if buf else {}


def ctl(d, *args):
    return subprocess.run([sys.executable, "-m", "lockd.ctl", "-s", str(d.admin_sock), *args],
                          capture_output=True, text=True, timeout=30)


def test_queries(daemon, disk, owner, tmp_path):
    c = client_for(daemon, UUID1, "vm1", owner.pid, oid=7)
    c.create_lockspace(str(tmp_path / "ls"))
    c.acquire("", disk)
    c.acquire(str(tmp_path / "ls"), "f" * 64, 3)
    a = admin(daemon)
    leases = a.call("leases")["leases"]
    assert {x["resource"] for x in leases} == {disk, "f" * 64}
    o = leases[0]["owners"][0]
    assert (o["uuid"], o["name"], o["id"], o["pid"], o["alive"]) == (UUID1, "vm1", 7, owner.pid, True)
    assert o["start_time"] > 0 and o["since"] > 0
    # filters
    assert [x["resource"] for x in a.call("leases", path=disk)["leases"]] == [disk]
    import os
    os.symlink(disk, tmp_path / "alias.img")
    assert [x["resource"] for x in a.call("leases", path=str(tmp_path / "alias.img"))["leases"]] == [disk]
    assert len(a.call("leases", owner_uuid=UUID1.upper())["leases"]) == 2
    assert a.call("leases", owner_name="nobody")["leases"] == []
    assert len(a.call("leases", owner_pid=owner.pid, lockspace=str(tmp_path / "ls"))["leases"]) == 1
    shared = a.call("leases", resource="f" * 64)["leases"][0]
    assert shared["shared"] and shared["autocreate"]
    assert {ls["path"] for ls in a.call("lockspaces")["lockspaces"]} == {"", str(tmp_path / "ls")}
    clients = a.call("clients")["clients"]
    assert clients[0]["owner"]["name"] == "vm1" and clients[0]["registered"]
    st = a.call("status")
    assert st["leases"] == 2 and st["owners"] == 1 and st["lock_type"] == "ofd" and st["socket_activated"]


def test_release_refuses_while_owner_runs(daemon, disk, owner):
    client_for(daemon, UUID1, "vm1", owner.pid).acquire("", disk)
    a = admin(daemon)
    with pytest.raises(AdminError) as ei:
        a.call("release", lockspace="", resource=disk)
    assert ei.value.code == "owner-alive" and str(owner.pid) in ei.value.message and "force" in ei.value.message
    with pytest.raises(AdminError) as ei:
        a.call("release", owner_uuid=UUID1)
    assert ei.value.code == "owner-alive"
    dry = a.call("release", owner_pid=owner.pid, force=True, dry_run=True)
    assert dry["changed"] and dry["released"][0]["resource"] == disk
    assert len(a.call("leases")["leases"]) == 1          # dry run changed nothing
    done = a.call("release", lockspace="", resource=disk, force=True)
    assert done["changed"] and a.call("leases")["leases"] == []
    again = a.call("release", lockspace="", resource=disk, force=True)
    assert again == {"changed": False, "released": []}   # idempotent
    client_for(daemon, UUID2, "vm2", fake_pid()).acquire("", disk)


def test_release_of_dead_owner_needs_no_force(daemon, disk):
    pid = fake_pid()
    client_for(daemon, UUID1, "vm1", pid).acquire("", disk)
    r = admin(daemon).call("release", owner_pid=pid)
    assert r["changed"] and [x["resource"] for x in r["released"]] == [disk]


def test_acquire_adopts_running_vm(daemon, disk, owner):
    a = admin(daemon)
    args = dict(lockspace="", resource=disk, owner={"uuid": UUID1, "name": "vm1", "id": 4, "pid": owner.pid})
    assert a.call("acquire", dry_run=True, **args) == {"changed": True, "lease": None}
    assert a.call("leases")["leases"] == []
    r = a.call("acquire", **args)
    assert r["changed"] and r["lease"]["owners"][0]["pid"] == owner.pid
    assert a.call("acquire", **args)["changed"] is False          # idempotent
    with pytest.raises(LockError) as ei:
        client_for(daemon, UUID2, "vm2", fake_pid()).acquire("", disk)
    assert ei.value.code == 87
    with pytest.raises(AdminError) as ei:
        a.call("acquire", lockspace="", resource=disk,
               owner={"uuid": UUID2, "name": "vm2", "id": 5, "pid": _other_live_pid()})
    assert ei.value.code == "busy" and "is locked" in ei.value.message
    # adopted leases follow the process: released when it exits
    owner.kill()
    owner.wait()
    wait_for(lambda: a.call("leases")["leases"] == [], what="adopted lease released on exit")


def _other_live_pid():
    import os
    return os.getppid()


@pytest.mark.parametrize("args,code", [
    (dict(lockspace="", resource="/x", owner={"uuid": UUID1, "name": "v", "id": 1, "pid": 4000000}),
     "invalid-argument"),                                              # not a running process
    (dict(lockspace="", resource="relative", owner={"uuid": UUID1, "name": "v", "id": 1, "pid": 1}),
     "invalid-argument"),
    (dict(lockspace="", resource="/x", owner={"uuid": "nope", "name": "v", "id": 1, "pid": 1}),
     "invalid-argument"),
    (dict(lockspace="", resource="/x", owner={"uuid": UUID1, "name": "v", "id": 0, "pid": 1}),
     "invalid-argument"),
    (dict(lockspace="", resource="/x"), "invalid-argument"),
    (dict(lockspace="", resource="/does/not/exist", owner={"uuid": UUID1, "name": "v", "id": 1, "pid": 1}),
     "not-found"),
])
def test_acquire_refusals(daemon, args, code):
    with pytest.raises(AdminError) as ei:
        admin(daemon).call("acquire", **args)
    assert ei.value.code == code, ei.value.message


@pytest.mark.parametrize("line,code", [
    (b"not json\n", "bad-request"),
    (b"[1,2]\n", "bad-request"),
    (b'{"op":"status"}\n', "bad-request"),
    (b'{"v":2,"op":"status"}\n', "unsupported-version"),
    (b'{"v":1,"op":"frobnicate"}\n', "unknown-op"),
    (b'{"v":1,"op":"leases","args":{"owner_pdi":1}}\n', "invalid-argument"),
    (b'{"v":1,"op":"leases","args":{"owner_pid":"1"}}\n', "invalid-argument"),
    (b'{"v":1,"op":"release","args":{}}\n', "invalid-argument"),
    (b'{"v":1,"op":"release","args":{"owner_pid":1,"owner_uuid":"x"}}\n', "invalid-argument"),
    (b'{"v":1,"op":"release","args":{"lockspace":"/nope","resource":"x"}}\n', "not-found"),
    (b'{"v":1,"op":"status","args":[]}\n', "bad-request"),
])
def test_bad_requests(daemon, line, code):
    resp = raw(daemon, line)
    assert resp["ok"] is False and resp["error"]["code"] == code
    assert admin(daemon).call("hello")["protocol"] == 1          # daemon unharmed


def test_oversized_line_closes(daemon):
    # exactly 1 MiB without a newline: the daemon has read it all when it answers, so no RST races the reply
    resp = raw(daemon, b"x" * (1 << 20))
    assert resp["error"]["code"] == "bad-request"


def test_id_is_echoed_and_pipelining_works(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(daemon.admin_sock))
    s.sendall(b'{"v":1,"id":"a","op":"hello"}\n{"v":1,"id":2,"op":"status"}\n')
    buf = b""
    while buf.count(b"\n") < 2:
        buf += s.recv(65536)
    first, second = (json.loads(x) for x in buf.splitlines())
    assert first["id"] == "a" and second["id"] == 2 and second["result"]["pid"] == daemon.pid


def test_virtlockctl_both_forms(daemon, disk, owner):
    client_for(daemon, UUID1, "vm1", owner.pid).acquire("", disk)
    r = ctl(daemon, "leases")
    assert r.returncode == 0
    assert "RESOURCE" in r.stdout and disk in r.stdout and "vm1(pid %d)" % owner.pid in r.stdout
    j = json.loads(ctl(daemon, "--json", "leases").stdout)
    assert j["leases"][0]["owners"][0]["uuid"] == UUID1
    st = ctl(daemon, "status")
    assert "leases: 1 held by 1 owners" in st.stdout
    assert json.loads(ctl(daemon, "--json", "status").stdout)["leases"] == 1
    refused = ctl(daemon, "release", "--lockspace", "", "--resource", disk)
    assert refused.returncode == 1 and "owner-alive" in refused.stderr
    ok = ctl(daemon, "release", "--lockspace", "", "--resource", disk, "--force")
    assert ok.returncode == 0 and "released %s" % disk in ok.stdout
    assert ctl(daemon, "leases").stdout.strip() == "no leases"
    assert "LOCKSPACE" in ctl(daemon, "lockspaces").stdout
    assert json.loads(ctl(daemon, "--json", "clients").stdout)["clients"] == []
