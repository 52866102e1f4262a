"""The daemon runs on every Python a managed host may have: 3.9 to 3.13.

Each interpreter runs the real daemon from the source tree (standard library
only, no install) on private sockets; the test exercises register, acquire,
the busy error, a live re-exec and the admin socket."""
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from lockd.adminclient import AdminClient
from lockd.client import LockClient, LockError
from testbed.daemons import fake_pid, start_daemon

from .conftest import wait_for

SRC = str(Path(__file__).resolve().parents[2] / "lockd_src")
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


def interpreter(minor: str) -> str:
    found = sorted(PYENV.glob("3.%s.*/bin/python3" % minor.split(".")[1])) if PYENV.is_dir() else []
    if found:
        return str(found[-1])
    exe = shutil.which("python" + minor)
    if exe is None:
        pytest.skip("no Python %s on this machine (pyenv versions or python%s on PATH)" % (minor, minor))
    return exe


@pytest.mark.parametrize("minor", ["3.9", "3.10", "3.11", "3.12", "3.13"])
def test_daemon_on_python(minor, tmp_path):
    py = interpreter(minor)
    version = subprocess.run([py, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == minor
    disk = tmp_path / "disk.img"
    disk.write_text("")
    with start_daemon("py", tmp_path / "d", {"log_level": 2}, env={"PYTHONPATH": SRC},
                      argv=[py, "-m", "lockd"]) as d:
        c = LockClient(str(d.sock))
        c.register("11111111-1111-4111-8111-111111111111", "vm1", 1, fake_pid())
        c.acquire("", str(disk))
        os.kill(d.pid, signal.SIGUSR1)
        wait_for(lambda: "re-exec complete" in d.log_tail(100), what="re-exec")
        with pytest.raises(LockError) as ei:
            c.acquire("", str(disk))          # answered by the re-exec'ed image
        assert ei.value.code == 87
        st = AdminClient(str(d.admin_sock)).call("status")
        assert st["leases"] == 1 and st["pid"] == d.pid
