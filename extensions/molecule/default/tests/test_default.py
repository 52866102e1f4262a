"""The role lockd.virtlockd.lock_manager on a clean Debian 12 and Debian 13 host.

Runs on each platform of molecule/default (testinfra ``host`` fixture).
The tests run in file order; the socket-activation test stops the daemon
on purpose and checks that the first connection brings it back.
"""
import json

import pytest

UNITS = ("virtlockd.service", "virtlockd.socket", "virtlockd-admin.socket")
LOCK_SOCK = "/run/libvirt/virtlockd-sock"
ADMIN_SOCK = "/run/libvirt/virtlockd-admin-sock"
CONNECT = ("python3 -c 'import socket,sys; s = socket.socket(socket.AF_UNIX); "
           "s.connect(sys.argv[1]); s.close()' {}")


def show(host, prop, unit="virtlockd.service"):
    return host.check_output(f"systemctl show -P {prop} {unit}").strip()


def test_systemd_is_pid1(host):
    assert host.check_output("cat /proc/1/comm") == "systemd"
    assert host.run("systemctl is-system-running").stdout.strip() in ("running", "degraded")


@pytest.mark.parametrize("unit", UNITS)
def test_our_units_override_the_distribution(host, unit):
    assert host.file(f"/etc/systemd/system/{unit}").exists
    assert show(host, "FragmentPath", unit) == f"/etc/systemd/system/{unit}"


def test_daemon_installed(host):
    for cmd in ("/usr/local/sbin/virtlockd", "/usr/local/sbin/virtlockctl"):
        f = host.file(cmd)
        assert f.exists and f.user == "root" and f.mode & 0o111, cmd
    assert "/usr/local/sbin/virtlockd" in show(host, "ExecStart")
    assert host.file("/usr/local/lib/lockd/lockd/server.py").exists


@pytest.mark.parametrize("unit", ("virtlockd.socket", "virtlockd-admin.socket"))
def test_sockets_enabled_and_listening(host, unit):
    s = host.service(unit)
    assert s.is_enabled and s.is_running
    path = LOCK_SOCK if unit == "virtlockd.socket" else ADMIN_SOCK
    assert host.socket(f"unix://{path}").is_listening
    assert host.file(path).mode == 0o600


def test_socket_activation_on_first_connect(host):
    host.check_output("systemctl stop virtlockd.service")
    assert host.run("systemctl is-active virtlockd.service").stdout.strip() == "inactive"
    # Stopping the service leaves the sockets listening...
    assert host.socket(f"unix://{LOCK_SOCK}").is_listening
    # ...and the first connection starts the daemon with both named sockets.
    host.check_output(CONNECT.format(LOCK_SOCK))
    host.check_output("for i in $(seq 100); do systemctl is-active -q virtlockd.service && exit 0; sleep 0.1; done; exit 1")
    pid = show(host, "MainPID")
    env = host.check_output(f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert "LISTEN_FDS=2" in env.splitlines()
    names = next(line for line in env.splitlines() if line.startswith("LISTEN_FDNAMES=")).split("=", 1)[1]
    assert sorted(names.split(":")) == ["virtlockd-admin.socket", "virtlockd.socket"]


def test_type_notify_readiness(host):
    assert show(host, "Type") == "notify"
    assert show(host, "ActiveState") == "active" and show(host, "SubState") == "running"
    # STATUS= comes only through sd_notify: systemd shows it as "Status:" in systemctl status.
    status_text = show(host, "StatusText")
    assert status_text, "the daemon sent no STATUS= notification"
    assert f'Status: "{status_text}"' in host.check_output("systemctl status --no-pager virtlockd.service")
    assert int(show(host, "FileDescriptorStoreMax")) > 0


def test_qemu_conf_uses_lockd(host):
    conf = host.file("/etc/libvirt/qemu.conf").content_string
    active = [line.strip() for line in conf.splitlines() if line.strip().startswith("lock_manager")]
    assert active == ['lock_manager = "lockd"']


def test_qemu_lockd_conf(host):
    conf = host.file("/etc/libvirt/qemu-lockd.conf")
    assert conf.exists and conf.user == "root"
    settings = {k.strip(): v.strip() for k, _, v in
                (line.partition("=") for line in conf.content_string.splitlines())
                if k.strip() and not k.strip().startswith("#")}
    assert settings["auto_disk_leases"] == "1"
    assert settings["require_lease_for_disks"] == "0"
    assert "file_lockspace_dir" not in settings  # direct mode by default


def test_virtlockd_conf_managed(host):
    conf = host.file("/etc/libvirt/virtlockd.conf")
    assert conf.exists
    assert "Ansible managed" in conf.content_string or "ansible" in conf.content_string.lower()
    assert "max_clients = 16384" in conf.content_string


def test_virtlockctl_answers(host):
    human = host.run("virtlockctl status")
    assert human.rc == 0, human.stderr
    status = json.loads(host.check_output("virtlockctl --json status"))
    assert status["pid"] == int(show(host, "MainPID"))
    assert status["socket_activated"] is True
    assert status["leases"] == 0


def test_libvirt_still_runs(host):
    assert host.run("virsh -q list --all").rc == 0
