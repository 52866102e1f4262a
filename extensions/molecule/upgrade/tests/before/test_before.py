"""Before the upgrade: vm1 holds its lease, vm2 is refused. Records vm1's QEMU
pid and the daemon's pid for tests/after."""
import json

import lockcheck as lc

STATE = "/root/molecule-upgrade-state.json"


def test_vm1_holds_the_lease_and_vm2_is_refused(host):
    assert lc.state(host, "vm1") == "running"
    r = lc.start(host, "vm2")
    assert r.rc != 0 and lc.busy_message(lc.EXTRA) in r.stderr, r.stderr
    leases = [lease for lease in lc.ctl_leases(host) if lease["path"] == lc.EXTRA]
    assert lc.owners_of(leases) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    status = json.loads(host.check_output("virtlockctl --json status"))
    assert "+molecule.upgrade" not in status["version"]
    record = {"qemu_pid": lc.qemu_pid(host, "vm1"), "daemon_pid": lc.daemon_pid(host),
              "version": status["version"]}
    host.check_output(f"echo '{json.dumps(record)}' > {STATE}")
