"""Admin protocol conformance (docs/admin-protocol.md) against a real daemon.

There is ONE admin client: `plugins/module_utils/_lockd_admin.py` is the
source (the Ansible modules cannot import lockd) and the daemon package ships
a byte-identical copy, `lockd/adminclient.py` (virtlockctl uses it). Both are
run here: the module_utils file as the modules load it, and the installed copy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

import lockd.adminclient
from lockd.client import LockClient
from testbed.daemons import C_VIRTLOCKD, fake_pid, stand_in_owner, start_daemon

REPO = Path(__file__).resolve().parents[2]
OPS = {"hello", "status", "lockspaces", "leases", "clients", "release", "acquire"}
UUID1 = "11111111-1111-4111-8111-111111111111"
UUID2 = "22222222-2222-4222-8222-222222222222"


def _module_utils_client():
    spec = importlib.util.spec_from_file_location(
        "lockd_virtlockd_module_utils_admin", REPO / "plugins/module_utils/_lockd_admin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MU = _module_utils_client()
CLIENTS = {
    "lockd.adminclient": (lockd.adminclient.AdminClient, lockd.adminclient.AdminError),
    "module_utils": (MU.AdminClient, MU.AdminError),
}


def test_lockd_ships_a_byte_identical_copy_of_the_admin_client():
    source = (REPO / "plugins/module_utils/_lockd_admin.py").read_bytes()
    copy = (REPO / "lockd_src/lockd/adminclient.py").read_bytes()
    assert copy == source, ("lockd_src/lockd/adminclient.py differs from its source: "
                            "cp plugins/module_utils/_lockd_admin.py lockd_src/lockd/adminclient.py")


def test_module_utils_client_does_not_import_lockd():
    source = (REPO / "plugins/module_utils/_lockd_admin.py").read_text()
    assert "import lockd" not in source and "from lockd" not in source


@pytest.fixture(params=sorted(CLIENTS))
def client_cls(request):
    return CLIENTS[request.param]


@pytest.fixture(scope="module")
def shared_dir():
    # World-traversable, so the non-root test can reach the socket.
    path = Path(tempfile.mkdtemp(prefix="lockd-conformance-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(shared_dir):
    workdir = Path(tempfile.mkdtemp(dir=shared_dir))
    with start_daemon("py", workdir) as d:
        yield d


@pytest.fixture
def disk(daemon):
    path = daemon.workdir / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return str(path)


@pytest.fixture
def held(daemon, owner, disk):
    c = LockClient(str(daemon.sock))
    c.register(UUID1, "vm1", 1, owner.pid)
    c.acquire("", disk, 0)
    yield owner
    c.close()


def call(client_cls, daemon, op, **args):
    cls, _ = client_cls
    client = cls(str(daemon.admin_sock), timeout=10)
    try:
        return client.call(op, **args)
    finally:
        client.close()


def error_of(client_cls, path, op, **args):
    cls, err = client_cls
    client = cls(str(path), timeout=10)
    try:
        with pytest.raises(err) as info:
            client.call(op, **args)
    finally:
        client.close()
    assert isinstance(info.value.code, str) and info.value.message
    return info.value


def test_hello(client_cls, daemon):
    res = call(client_cls, daemon, "hello")
    assert res["protocol"] == 1 and res["server"] == "lockd" and OPS <= set(res["ops"])


def test_status_keys(client_cls, daemon):
    res = call(client_cls, daemon, "status")
    for key in ("version", "pid", "started", "uptime", "lock_type", "socket_activated", "fdstore", "clients",
                "max_clients", "admin_clients", "admin_max_clients", "owners", "leases", "lockspaces",
                "recovered_leases", "lost_leases"):
        assert key in res, key
    assert res["pid"] == daemon.pid and res["socket_activated"] is True


def test_several_requests_on_one_connection(client_cls, daemon, held, disk):
    cls, _ = client_cls
    client = cls(str(daemon.admin_sock), timeout=10)
    try:
        assert client.call("hello")["server"] == "lockd"
        assert [lease["resource"] for lease in client.call("leases")["leases"]] == [disk]
        assert client.call("lockspaces")["lockspaces"][0]["path"] == ""
        assert any(c["registered"] for c in client.call("clients")["clients"])
    finally:
        client.close()


def test_leases_and_filters(client_cls, daemon, held, disk):
    [lease] = call(client_cls, daemon, "leases")["leases"]
    assert (lease["lockspace"], lease["resource"], lease["path"], lease["shared"]) == ("", disk, disk, False)
    [o] = lease["owners"]
    assert (o["uuid"], o["name"], o["id"], o["pid"], o["alive"]) == (UUID1, "vm1", 1, held.pid, True)
    link = Path(disk).with_name("alias.img")
    link.symlink_to(disk)
    assert len(call(client_cls, daemon, "leases", path=str(link))["leases"]) == 1
    assert len(call(client_cls, daemon, "leases", owner_pid=held.pid, owner_uuid=UUID1)["leases"]) == 1
    assert call(client_cls, daemon, "leases", owner_name="other")["leases"] == []


@pytest.mark.parametrize("op,args,code", [
    ("no-such-op", {}, "unknown-op"),
    ("leases", {"owner_nmae": "vm1"}, "invalid-argument"),
    ("leases", {"owner_pid": "not-an-int"}, "invalid-argument"),
    ("release", {}, "invalid-argument"),
    ("release", {"lockspace": "/no/such/lockspace", "resource": "x"}, "not-found"),
    ("acquire", {"resource": "/x", "owner": {"uuid": UUID2, "name": "vm2", "id": 2, "pid": 0}}, "invalid-argument"),
])
def test_error_codes(client_cls, daemon, op, args, code):
    assert error_of(client_cls, daemon.admin_sock, op, **args).code == code


def test_release_rules(client_cls, daemon, held, disk):
    err = error_of(client_cls, daemon.admin_sock, "release", lockspace="", resource=disk)
    assert err.code == "owner-alive" and str(held.pid) in err.message
    dry = call(client_cls, daemon, "release", lockspace="", resource=disk, force=True, dry_run=True)
    assert dry["changed"] is True and [lease["resource"] for lease in dry["released"]] == [disk]
    assert len(call(client_cls, daemon, "leases")["leases"]) == 1
    done = call(client_cls, daemon, "release", owner_uuid=UUID1, force=True)
    assert done["changed"] is True and call(client_cls, daemon, "leases")["leases"] == []
    again = call(client_cls, daemon, "release", owner_pid=held.pid, force=True)
    assert again == {"changed": False, "released": []}


def test_acquire_on_behalf(client_cls, daemon, owner, disk):
    args = {"lockspace": "", "resource": disk, "owner": {"uuid": UUID2, "name": "vm2", "id": 2, "pid": owner.pid}}
    assert call(client_cls, daemon, "acquire", dry_run=True, **args)["changed"] is True
    assert call(client_cls, daemon, "leases")["leases"] == []
    res = call(client_cls, daemon, "acquire", **args)
    assert res["changed"] is True and res["lease"]["owners"][0]["pid"] == owner.pid
    assert call(client_cls, daemon, "acquire", **args)["changed"] is False
    other = stand_in_owner()
    try:
        err = error_of(client_cls, daemon.admin_sock, "acquire", lockspace="", resource=disk,
                       owner={"uuid": UUID1, "name": "vm1", "id": 1, "pid": other.pid})
    finally:
        other.kill()
        other.wait()
    assert err.code == "busy" and f"Lockspace resource '{disk}' is locked" in err.message


def test_no_daemon(client_cls, tmp_path):
    assert error_of(client_cls, tmp_path / "missing", "hello").code == "no-daemon"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead"))  # bound, never listening: ECONNREFUSED
    try:
        assert error_of(client_cls, tmp_path / "dead", "hello").code == "no-daemon"
    finally:
        dead.close()


@pytest.mark.c_daemon
def test_c_virtlockd_is_recognised(client_cls, tmp_path):
    assert os.path.exists(C_VIRTLOCKD), "libvirt-daemon must be installed (scripts/install-deps.sh)"
    with start_daemon("c", tmp_path / "c") as c:
        err = error_of(client_cls, c.admin_sock, "hello")
    assert err.code == "not-lockd"
    assert "does not speak the lockd admin protocol" in err.message and "C virtlockd" in err.message


def test_permission_denied_for_non_root(client_cls, daemon):
    os.chmod(daemon.workdir, 0o755)
    os.chmod(daemon.admin_sock, 0o777)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, call, report the error code
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            cls, err = client_cls
            try:
                cls(str(daemon.admin_sock), timeout=10).call("leases")
                code = "no-error"
            except err as exc:
                code = exc.code
            os.write(write_fd, code.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        code = pipe.read()
    os.waitpid(pid, 0)
    assert code == "permission-denied"


# -- server-side framing rules (client independent) -------------------------------

def raw(daemon, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.admin_sock))
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data.splitlines()[0])


@pytest.mark.parametrize("payload,code", [
    (b"not json\n", "bad-request"),
    (b'{"v": 1}\n', "bad-request"),
    (b'{"v": 2, "id": 5, "op": "hello"}\n', "unsupported-version"),
])
def test_bad_requests(daemon, payload, code):
    res = raw(daemon, payload)
    assert res["ok"] is False and res["error"]["code"] == code


def test_id_is_echoed(daemon):
    res = raw(daemon, b'{"v": 1, "id": "abc", "op": "hello"}\n')
    assert res["ok"] is True and res["id"] == "abc" and res["v"] == 1
