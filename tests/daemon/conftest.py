import os
import subprocess
import time

import pytest

from lockd.adminclient import AdminClient
from lockd.client import LockClient
from testbed.daemons import fake_pid, start_daemon  # noqa: F401  (fake_pid: re-exported for the tests)
from tests.unit.test_lockspace import probe_lock  # noqa: F401  (shared with the daemon tests)

UUID1 = "11111111-1111-4111-8111-111111111111"
UUID2 = "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def daemon(tmp_path):
    with start_daemon("py", tmp_path / "d", {"log_level": 2}) as d:
        yield d


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def client_for(d, uuid, name, pid, oid=1):
    c = LockClient(str(d.sock), timeout=10)
    c.register(uuid, name, oid, pid)
    return c


def admin(d):
    return AdminClient(str(d.admin_sock), timeout=10)


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for " + what)
