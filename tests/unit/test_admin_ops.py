"""Admin operations through handle_line, on a DaemonState and nothing else."""
import json
import subprocess
import sys

import pytest

from lockd import admin
from lockd.lockspace import Locks
from lockd.loop import EventLoop
from lockd.state import DaemonState, Recorder
from lockd.systemd import Notifier

UUID = "11111111-1111-4111-8111-111111111111"


@pytest.fixture
def state():
    return DaemonState({"max_clients": 10, "admin_max_clients": 10}, Locks("ofd"),
                       Recorder(None, Notifier(""), False), EventLoop())


@pytest.fixture
def vm():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def ask(state, op, rid=1, **args):
    return admin.handle_line(state, json.dumps({"v": 1, "id": rid, "op": op, "args": args}).encode())


def test_hello_and_status(state):
    hello = ask(state, "hello")
    assert hello["ok"] and hello["result"]["ops"] == list(admin.OPS) and hello["id"] == 1
    status = ask(state, "status")["result"]
    assert status["leases"] == 0 and status["journal"]["state"] == "ok"
    assert status["requests"] == {"total": 0, "errors": 0, "by_proc": {
        "Register": 0, "Restrict": 0, "New": 0, "CreateResource": 0, "DeleteResource": 0,
        "AcquireResource": 0, "ReleaseResource": 0, "CreateLockSpace": 0}}


@pytest.mark.parametrize("line, code", [
    (b"not json", "bad-request"),
    (b"[1]", "bad-request"),
    (b'{"v": 2, "op": "hello"}', "unsupported-version"),
    (b'{"v": 1, "op": "nope"}', "unknown-op"),
    (b'{"v": 1, "op": "hello", "args": {"x": 1}}', "invalid-argument"),
    (b'{"v": 1, "op": "leases", "args": {"owner_pid": "1"}}', "invalid-argument"),
])
def test_bad_requests(state, line, code):
    resp = admin.handle_line(state, line)
    assert resp["ok"] is False and resp["error"]["code"] == code


def test_adopt_list_and_release(state, vm, tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0")
    owner = {"uuid": UUID, "name": "vm1", "id": 4, "pid": vm.pid}
    got = ask(state, "acquire", resource=str(disk), owner=owner)["result"]
    assert got["changed"] and got["lease"]["owners"][0]["name"] == "vm1"
    assert ask(state, "acquire", resource=str(disk), owner=owner)["result"]["changed"] is False
    [lease] = ask(state, "leases", owner_uuid=UUID)["result"]["leases"]
    assert lease["path"] == str(disk) and lease["owners"][0]["alive"]
    refused = ask(state, "release", lockspace="", resource=str(disk))
    assert refused["error"]["code"] == "owner-alive"
    done = ask(state, "release", owner_pid=vm.pid, force=True)["result"]
    assert done["changed"] and state.locks.count() == 0
