"""listen_fds_with_names() and the notifier, in the style of gunicorn's
tests/test_systemd.py: the environment is set by the test, fds are not real."""
import os
import socket

import pytest

from lockd import systemd


@pytest.fixture
def no_fd_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(systemd.os, "set_inheritable", lambda fd, flag: calls.append((fd, flag)))
    return calls


def env(monkeypatch, pid, fds, names=None):
    monkeypatch.setenv("LISTEN_PID", str(pid))
    monkeypatch.setenv("LISTEN_FDS", str(fds))
    if names is None:
        monkeypatch.delenv("LISTEN_FDNAMES", raising=False)
    else:
        monkeypatch.setenv("LISTEN_FDNAMES", names)


def test_names_in_order(monkeypatch, no_fd_calls):
    env(monkeypatch, os.getpid(), 3, "virtlockd-admin.socket:virtlockd.socket:lease-7")
    assert systemd.listen_fds_with_names() == {3: "virtlockd-admin.socket", 4: "virtlockd.socket", 5: "lease-7"}
    assert no_fd_calls == [(3, False), (4, False), (5, False)]
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert k not in os.environ             # unset, so a child never inherits them


def test_missing_names_are_unknown(monkeypatch, no_fd_calls):
    env(monkeypatch, os.getpid(), 2)
    assert systemd.listen_fds_with_names() == {3: "unknown", 4: "unknown"}


@pytest.mark.parametrize("pid, fds", [(1, 2), ("x", 2), (None, "y"), (None, 0)])
def test_not_for_us(monkeypatch, no_fd_calls, pid, fds):
    env(monkeypatch, os.getpid() if pid is None else pid, fds, "a:b")
    assert systemd.listen_fds_with_names() == {}
    assert no_fd_calls == []


def test_notify_sends_datagrams(tmp_path):
    path = str(tmp_path / "notify")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    n = systemd.Notifier(path)
    assert n.enabled and n.ready("serving 0 leases")
    assert rx.recv(512) == b"READY=1\nSTATUS=serving 0 leases"
    assert n.fdstore_remove("lease-3")
    assert rx.recv(512) == b"FDSTOREREMOVE=1\nFDNAME=lease-3"
    n.close()
    rx.close()
    assert not systemd.Notifier("").enabled and not systemd.Notifier("").ready()
