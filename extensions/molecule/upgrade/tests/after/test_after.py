"""After the rollout of a new daemon version, a SIGKILL and a restart: the
lease survives each, vm1 is never killed, vm2 stays refused. Tests run in
file order and build on each other."""
import json

import lockcheck as lc

STATE = "/root/molecule-upgrade-state.json"
BUSY = lc.busy_message(lc.EXTRA)


def before(host):
    return json.loads(host.check_output(f"cat {STATE}"))


def assert_still_protected(host):
    rec = before(host)
    assert lc.state(host, "vm1") == "running"
    assert lc.qemu_pid(host, "vm1") == rec["qemu_pid"], "vm1's QEMU was killed or replaced"
    leases = [lease for lease in lc.ctl_leases(host) if lease["path"] == lc.EXTRA]
    assert lc.owners_of(leases) == [(lc.UUIDS["vm1"], rec["qemu_pid"])], leases
    r = lc.start(host, "vm2")
    assert r.rc != 0, "vm2 STARTED next to vm1: the lease was lost"
    assert BUSY in r.stderr, r.stderr


def wait_new_daemon(host, old_pid):
    def ready():
        pid = lc.daemon_pid(host)
        active = host.run("systemctl is-active virtlockd.service").stdout.strip() == "active"
        return pid if active and pid not in (0, old_pid) else 0
    return lc.wait_for(ready, f"virtlockd.service active again with a pid other than {old_pid}")


def test_new_version_was_rolled_out_by_reload(host):
    rec = before(host)
    status = json.loads(host.check_output("virtlockctl --json status"))
    assert status["version"] == rec["version"] + "+molecule.upgrade"
    # A reload is an in-place re-exec: systemd's main pid did not change.
    assert lc.daemon_pid(host) == rec["daemon_pid"]
    assert host.run("systemctl show -P NRestarts virtlockd.service").stdout.strip() == "0"
    log = host.check_output("journalctl -b --no-pager -o cat -u virtlockd.service")
    assert "Reloaded" in log or "Reloading" in log, log[-2000:]


def test_lease_survived_the_upgrade(host):
    assert_still_protected(host)


def test_lease_survives_sigkill_of_the_daemon(host):
    old = lc.daemon_pid(host)
    host.check_output("systemctl kill -s SIGKILL virtlockd.service")
    wait_new_daemon(host, old)
    assert_still_protected(host)


def test_lease_survives_systemctl_restart(host):
    old = lc.daemon_pid(host)
    host.check_output("systemctl restart virtlockd.service")
    wait_new_daemon(host, old)
    assert_still_protected(host)


def test_vm2_starts_once_vm1_stops(host):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(host, "vm2").rc == 0, "vm2 starts once vm1 is gone")
    lc.destroy(host, "vm2")
