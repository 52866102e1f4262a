"""What systemd's fd store keeps, on the systemd versions we deploy to.

The lease-survival design (docs/design.md, docs/notes-systemd-fdstore.md)
rests on these facts; if a systemd update changes them, these tests say so
before the daemon tests do. The probe service stores one fd that holds an OFD
lock; a second process then tries to take the same lock.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.systemd.conftest import HOSTS

pytestmark = pytest.mark.systemd

PROBE = Path(__file__).with_name("fdstore_probe.py")
SOCKETS = {
    "fdprobe.socket": "[Socket]\nListenStream=/run/fdprobe.sock\nFileDescriptorName=fdprobe.socket\nService=fdprobe.service\n",
    "fdprobe-admin.socket": "[Socket]\nListenStream=/run/fdprobe-admin.sock\nFileDescriptorName=fdprobe-admin.socket\nService=fdprobe.service\n",
}
TRY_LOCK = r"""
import fcntl, os, struct
fd = os.open("/var/lib/fdprobe/lease", os.O_RDWR)
try:
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
    print("free")
except BlockingIOError:
    print("held")
"""


class Probe:
    def __init__(self, cluster, host, preserve=None, sockets=False):
        self.c, self.h = cluster, host
        self.c.copy_in(host, PROBE, "/usr/local/bin/fdprobe.py")
        unit = "[Unit]\nDescription=fd store probe\n"
        if sockets:
            unit += "Requires=fdprobe.socket fdprobe-admin.socket\nAfter=fdprobe.socket fdprobe-admin.socket\n"
            for name, text in SOCKETS.items():
                self.sh(f"cat > /etc/systemd/system/{name}", input=text)
        unit += ("[Service]\nType=notify\nNotifyAccess=main\nFileDescriptorStoreMax=8\n"
                 "Restart=on-failure\nRestartSec=100ms\nExecStart=/usr/bin/python3 /usr/local/bin/fdprobe.py\n")
        if preserve:
            unit += f"FileDescriptorStorePreserve={preserve}\n"
        self.sh("cat > /etc/systemd/system/fdprobe.service", input=unit)
        self.sh("rm -f /run/fdprobe.log /var/lib/fdprobe/lease; systemctl daemon-reload")
        if sockets:
            self.sh("systemctl start fdprobe.socket fdprobe-admin.socket")
            self.sh("python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"/run/fdprobe.sock\")'")
        else:
            self.sh("systemctl start fdprobe.service")
        self.wait_start(1)

    def sh(self, cmd, input=None):
        return self.c.exec(self.h, cmd, input=input).stdout

    def starts(self):
        text = self.sh("cat /run/fdprobe.log 2>/dev/null || true")
        return [json.loads(line) for line in text.splitlines()]

    def wait_start(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.starts()
            if len(s) >= n and self.sh("systemctl is-active fdprobe.service || true").strip() == "active":
                return s[n - 1]
            time.sleep(0.05)
        raise AssertionError(f"fdprobe start #{n} not seen; log: {self.starts()}\n"
                             + self.sh("systemctl status fdprobe.service --no-pager || true"))

    def lock(self):
        return self.sh(f"python3 -c '{TRY_LOCK}'").strip()

    def wait_free(self, timeout=10):
        # systemd releases a stopped unit's resources (the fd store) from its
        # release queue, just after the stop job returns: poll.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lock() == "free":
                return "free"
            time.sleep(0.05)
        return "held"

    def cleanup(self):
        self.sh("systemctl stop fdprobe.service fdprobe.socket fdprobe-admin.socket 2>/dev/null; "
                "rm -f /etc/systemd/system/fdprobe*; systemctl daemon-reload; systemctl reset-failed")


@pytest.fixture(params=list(HOSTS))
def host(request):
    return request.param


@pytest.fixture
def probe_factory(cluster):
    made = []

    def make(host, **kw):
        p = Probe(cluster, host, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        p.cleanup()


def test_fd_store_survives_sigkill_and_lock_held_in_gap(probe_factory, host):
    p = probe_factory(host)
    assert p.starts()[0].get("stored"), p.starts()
    p.sh("systemctl kill -s SIGKILL fdprobe.service")
    # Between the kill and the restart, PID 1's copy of the fd keeps the OFD lock.
    assert p.lock() == "held"
    second = p.wait_start(2)
    assert second["names"] == ["lease"] and second["fds"]["lease"] == "/var/lib/fdprobe/lease", second
    assert p.lock() == "held"


def test_fd_store_survives_systemctl_restart(probe_factory, host):
    p = probe_factory(host)
    p.sh("systemctl restart fdprobe.service")
    second = p.wait_start(2)
    assert second["names"] == ["lease"], second


def test_fd_store_after_stop_start_without_preserve_is_lost(probe_factory, host):
    p = probe_factory(host)
    p.sh("systemctl stop fdprobe.service")
    assert p.wait_free() == "free", "stop flushes the fd store (FileDescriptorStorePreserve=restart behaviour)"
    p.sh("systemctl start fdprobe.service")
    second = p.wait_start(2)
    assert second["listen_fds"] == 0 and second.get("stored"), second


def test_socket_fds_come_first_names_in_any_order(probe_factory, host):
    p = probe_factory(host, sockets=True)
    first = p.starts()[0]
    assert sorted(first["names"]) == ["fdprobe-admin.socket", "fdprobe.socket"], first
    p.sh("systemctl kill -s SIGKILL fdprobe.service")
    second = p.wait_start(2)
    assert second["listen_fds"] == 3, second
    assert sorted(second["names"][:2]) == ["fdprobe-admin.socket", "fdprobe.socket"], second
    assert second["names"][2] == "lease", second


def test_preserve_yes_keeps_store_across_stop_on_257_only(probe_factory, host):
    p = probe_factory(host, preserve="yes", sockets=True)
    p.sh("systemctl stop fdprobe.service")
    if HOSTS[host] == "bookworm":
        # systemd 252 ignores the key ("Unknown key ... ignoring") and flushes the store.
        assert p.wait_free() == "free"
        assert "FileDescriptorStorePreserve" in p.sh("journalctl -b --no-pager -u fdprobe.service -o cat; journalctl -b --no-pager -o cat | grep -i 'unknown key' || true")
    else:
        assert p.lock() == "held"
    p.sh("python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"/run/fdprobe.sock\")'")
    second = p.wait_start(2)
    assert ("lease" in second["names"]) == (HOSTS[host] == "trixie"), second
