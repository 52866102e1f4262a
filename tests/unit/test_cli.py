"""The virtlockd command line: libvirt's flags and clear start-up errors."""
import subprocess
import sys

import pytest


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lockd", *args], capture_output=True, text=True, timeout=30, **kw)


def test_version():
    r = run("-V")
    assert r.returncode == 0 and "(libvirt)" in r.stdout and "lockd 0.1.0" in r.stdout


def test_help_lists_libvirt_flags():
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--daemon", "--config", "--pid-file", "--timeout", "--verbose", "--version", "--help"):
        assert flag in r.stdout
    assert "/run/libvirt/virtlockd-sock" in r.stdout


def test_unknown_option_exits_1():
    r = run("--frobnicate")
    assert r.returncode == 1 and "Usage" in r.stderr


@pytest.mark.parametrize("value", ["abc", "-5"])
def test_bad_timeout(value):
    r = run("-t", value)
    assert r.returncode == 1 and "Invalid value for timeout" in r.stderr


def test_malformed_config_names_file_and_line(tmp_path):
    conf = tmp_path / "v.conf"
    conf.write_text('log_level = 3\nmax_clients = = 5\n')
    r = run("-f", str(conf), "-p", str(tmp_path / "pid"))
    assert r.returncode == 1
    assert "Can't load config file: %s:2:" % conf in r.stderr


def test_second_instance_refused_by_pid_file(tmp_path):
    conf = tmp_path / "v.conf"
    conf.write_text('state_dir = "%s"\n' % (tmp_path / "state"))
    import fcntl
    import os
    pid = tmp_path / "pid"
    fd = os.open(pid, os.O_WRONLY | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    try:
        r = run("-f", str(conf), "-p", str(pid))
    finally:
        os.close(fd)
    assert r.returncode == 1 and "Failed to acquire pid file" in r.stderr


def test_ctl_reports_missing_daemon(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lockd.ctl", "-s", str(tmp_path / "nosock"), "status"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no-daemon" in r.stderr and "systemctl start virtlockd-admin.socket" in r.stderr
