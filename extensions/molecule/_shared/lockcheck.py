"""Checks shared by the Molecule scenarios' testinfra tests (imported through
each scenario's tests/conftest.py). Everything runs on the host under test
through testinfra's ``host`` (ssh)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time

IMAGES = "/var/lib/libvirt/images"
EXTRA = f"{IMAGES}/extra.img"
FILES_LOCKSPACE = "/var/lib/libvirt/lockd/files"
# playbooks/smoke_test.yml's fixed UUIDs
UUIDS = {"vm1": "5eb1a7e0-0c4b-4d1e-9a3f-10c4d0000001", "vm2": "5eb1a7e0-0c4b-4d1e-9a3f-10c4d0000002"}


def busy_message(resource: str) -> str:
    return f"resource busy: Lockspace resource '{resource}' is locked"


def indirect_name(path: str = EXTRA) -> str:
    """libvirt's lease name in a file lockspace: sha256 of the path string."""
    return hashlib.sha256(path.encode()).hexdigest()


def state(host, vm: str) -> str:
    return host.run(f"virsh domstate {vm}").stdout.strip()


def start(host, vm: str):
    return host.run(f"virsh start {vm}")


def destroy(host, vm: str) -> None:
    host.run(f"virsh destroy {vm}")


def qemu_pid(host, vm: str) -> int:
    return int(host.check_output(f"cat /run/libvirt/qemu/{vm}.pid"))


def daemon_pid(host) -> int:
    return int(host.check_output("systemctl show -P MainPID virtlockd.service"))


def ctl_leases(host) -> list[dict]:
    return json.loads(host.check_output("virtlockctl --json leases"))["leases"]


def lease_info(host, **filters) -> dict:
    args = " ".join(f"{k}={v}" for k, v in filters.items())
    res = host.ansible("lockd.virtlockd.lease_info", args, check=False)
    assert not res.get("failed"), res
    return res


def lease_info_many(names: list[str], **filters) -> dict[str, dict]:
    """lease_info on several hosts in ONE ``ansible`` run (as testinfra's
    ``host.ansible`` does for one host: ``--tree``), {host name: result}.
    Each ``ansible`` start costs seconds on a loaded 2-core machine."""
    args = " ".join(f"{k}={v}" for k, v in filters.items())
    with tempfile.TemporaryDirectory() as tree:
        cmd = ["ansible", "--tree", tree, "-i", os.environ["MOLECULE_INVENTORY_FILE"],
               "-m", "lockd.virtlockd.lease_info", ",".join(names)]
        if args:
            cmd[-1:-1] = ["--args", args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        results = {}
        for name in names:
            try:
                with open(os.path.join(tree, name)) as f:
                    results[name] = json.load(f)
            except FileNotFoundError:
                raise AssertionError(f"lease_info gave no result for {name}: {proc.stdout}{proc.stderr}") from None
    for name, res in results.items():
        assert not res.get("failed"), (name, res)
    return results


def owners_of(leases: list[dict]) -> list[tuple]:
    return sorted((o["uuid"], o["pid"]) for lease in leases for o in lease["owners"])


def daemon_fd_locks(host, pid: int) -> list[str]:
    """The lock lines of every fd of *pid* (kernel's /proc/PID/fdinfo view)."""
    out = host.check_output(f"grep -h '^lock:' /proc/{pid}/fdinfo/* 2>/dev/null || true")
    return out.splitlines()


def inode(host, path: str) -> int:
    return int(host.check_output(f"stat -c %i {path}"))


def proc_locks_on(host, path: str) -> list[str]:
    ino = inode(host, path)
    return [line for line in host.check_output("cat /proc/locks").splitlines()
            if line.split()[5].endswith(f":{ino}")]


def wait_for(pred, what: str, timeout: float = 30.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")


def redefine_disk(host, vm: str, flag: str) -> None:
    """Redefine *vm* with <shareable/> or <readonly/> on the shared disk."""
    xml = host.check_output(f"virsh dumpxml --inactive {vm}")
    for old in ("<shareable/>", "<readonly/>"):
        xml = xml.replace(old, "")
    xml = xml.replace("<target dev='vdb'", f"{flag}<target dev='vdb'", 1)
    assert flag in xml, xml
    host.check_output(f"cat > /tmp/{vm}.xml <<'XML'\n{xml}\nXML\nvirsh define /tmp/{vm}.xml")
