"""The lock_manager role on a real systemd host (systemd-nspawn, Debian 12) with
real libvirt and QEMU: check mode, adoption of running VMs (and a conflict
between two of them), idempotence, and removal.

The Molecule scenarios (extensions/molecule/) cover convergence on Debian 12/13 and the
two-VMs test; this file covers what only this role does on live hosts.
Tests run in file order and share one host.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.collection.conftest import venv_tool
from tests.harness import require, require_root
from testbed.nspawn import Cluster

pytestmark = [pytest.mark.systemd, pytest.mark.libvirt, pytest.mark.slow]

HOST = "cr1"
IMAGES = "/var/lib/libvirt/images"
DOMAIN = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{images}/shared.img'/><target dev='vdb' bus='virtio'/><alias name='ua-shared'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{images}/{name}.img'/><target dev='vdc' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{images}/{name}-ro.img'/><target dev='vdd' bus='virtio'/><readonly/></disk>
    <memballoon model='none'/>
  </devices>
  <qemu:override><qemu:device alias='ua-shared'><qemu:frontend>
    <qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend></qemu:device></qemu:override>
</domain>
"""
ROLE_PLAY = """- hosts: all
  become: true
  gather_facts: false
  roles:
    - role: lockd.virtlockd.lock_manager
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory, collection_tree):
    require_root()
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        require(shutil.which(tool), f"{tool} (scripts/install-deps.sh)")
    cluster = Cluster.create(tmp_path_factory.mktemp("role-host"), {HOST: "bookworm"})
    try:
        for name in ("vma", "vmb"):
            cluster.exec(HOST, f"truncate -s 16M {IMAGES}/{name}.img {IMAGES}/{name}-ro.img")
            cluster.exec(HOST, ["virsh", "define", "/dev/stdin"], input=DOMAIN.format(name=name, images=IMAGES))
        cluster.exec(HOST, f"truncate -s 16M {IMAGES}/shared.img")
        yield cluster
    finally:
        cluster.exec(HOST, "virsh destroy vma; virsh destroy vmb", check=False)
        cluster.destroy()


@pytest.fixture(scope="module")
def play(host, ansible_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("role-plays")
    h = host.host(HOST)
    inventory = workdir / "inventory.ini"
    inventory.write_text(
        f"{HOST} ansible_host={h.address} ansible_user=root ansible_ssh_private_key_file={host.run.key} "
        "ansible_python_interpreter=/usr/bin/python3 "
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n")
    env = dict(ansible_env, ANSIBLE_PIPELINING="1", ANSIBLE_HOST_KEY_CHECKING="0",
               ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3")

    def run(extra_vars: dict | None = None, check: bool = False):
        playbook = workdir / "role.yml"
        playbook.write_text(ROLE_PLAY)
        cmd = [venv_tool("ansible-playbook"), "-i", str(inventory), str(playbook),
               "-e", json.dumps(extra_vars or {})]
        if check:
            cmd.append("--check")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        recap = re.search(rf"{HOST}\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
        assert recap, out[-4000:]
        return proc.returncode, int(recap.group(2)), out

    return run


def sh(host, cmd, check=True):
    return host.exec(HOST, cmd, check=check)


def leases(host) -> list[dict]:
    out = sh(host, "virtlockctl --json leases").stdout
    data = json.loads(out)
    return data["leases"] if isinstance(data, dict) else data


def qemu_pid(host, name) -> int:
    return int(sh(host, f"cat /run/libvirt/qemu/{name}.pid").stdout.strip())


def test_check_mode_on_a_fresh_host_changes_nothing(host, play):
    rc, changed, out = play(check=True)
    assert rc == 0, out[-4000:]
    assert changed > 0, "check mode must report what it would change"
    assert sh(host, "test -e /etc/systemd/system/virtlockd.service", check=False).returncode != 0
    assert sh(host, "test -e /usr/local/lib/lockd", check=False).returncode != 0


def test_running_vms_sharing_a_writable_disk_are_reported(host, play):
    # Both VMs start while libvirt has no lock manager (Debian's default "nop").
    sh(host, "virsh start vma && virsh start vmb")
    rc, _, out = play()
    assert rc != 0, "adopting two writers of one disk must fail the host"
    assert f"Lockspace resource '{IMAGES}/shared.img' is locked" in out, out[-4000:]


def test_after_one_vm_stops_the_other_is_adopted(host, play):
    sh(host, "virsh destroy vmb")
    rc, _, out = play()
    assert rc == 0, out[-4000:]
    pid = qemu_pid(host, "vma")
    held = {lease["resource"]: lease for lease in leases(host)}
    assert set(held) == {f"{IMAGES}/shared.img", f"{IMAGES}/vma.img"}, "read-only disks get no lease"
    for lease in held.values():
        assert [(o["name"], o["pid"]) for o in lease["owners"]] == [("vma", pid)]


def test_second_run_changes_nothing(host, play):
    rc, changed, out = play()
    assert rc == 0 and changed == 0, out[-4000:]


def test_an_adopted_disk_refuses_a_second_vm(host):
    proc = sh(host, "virsh start vmb", check=False)
    assert proc.returncode != 0
    assert f"resource busy: Lockspace resource '{IMAGES}/shared.img' is locked" in proc.stderr


def test_removal_is_refused_while_vms_hold_leases(host, play):
    rc, _, out = play({"lock_manager_state": "absent"})
    assert rc != 0 and "holds 2 lease(s)" in out and "vma" in out, out[-4000:]
    assert sh(host, "test -e /usr/local/lib/lockd/lockd/daemon.py", check=False).returncode == 0


def test_removal_hands_over_to_the_distribution_virtlockd(host, play):
    sh(host, "virsh destroy vma")
    rc, _, out = play({"lock_manager_state": "absent"})
    assert rc == 0, out[-4000:]
    assert sh(host, "test -e /usr/local/lib/lockd", check=False).returncode != 0
    assert "ExecStart=/usr/sbin/virtlockd" in sh(host, "systemctl cat virtlockd.service").stdout
    assert sh(host, "systemctl is-active virtlockd.socket virtlockd-admin.socket").returncode == 0
    assert 'lock_manager = "lockd"' in sh(host, "grep ^lock_manager /etc/libvirt/qemu.conf").stdout
    rc, changed, out = play({"lock_manager_state": "absent"})
    assert rc == 0 and changed == 0, out[-4000:]


def test_site_playbook_rolls_out_verifies_and_summarises(host, play, ansible_env, tmp_path):
    inventory = tmp_path / "hypervisors.ini"
    h = host.host(HOST)
    inventory.write_text(
        f"[hypervisors]\n{HOST} ansible_host={h.address} ansible_user=root ansible_ssh_private_key_file={host.run.key} "
        "ansible_python_interpreter=/usr/bin/python3 "
        "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n")
    env = dict(ansible_env, ANSIBLE_PIPELINING="1", ANSIBLE_HOST_KEY_CHECKING="0")
    proc = subprocess.run([venv_tool("ansible-playbook"), "-i", str(inventory), "lockd.virtlockd.site"],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(rf'"{HOST}: lockd [0-9.]+ pid [0-9]+, 0 lease\(s\) held', out), out[-3000:]
    assert "ExecStart=/usr/local/sbin/virtlockd" in sh(host, "systemctl cat virtlockd.service").stdout


def test_site_preflight_refuses_a_host_without_systemd(ansible_env, tmp_path):
    """This machine runs libvirt but not systemd as PID 1: the rollout must stop before touching it."""
    with open("/proc/1/comm") as handle:
        if handle.read().strip() == "systemd":
            pytest.skip("this machine boots systemd; the preflight refusal needs a host without it")
    inventory = tmp_path / "local.ini"
    inventory.write_text("[hypervisors]\nlocalhost ansible_connection=local ansible_python_interpreter=/usr/bin/python3\n")
    proc = subprocess.run([venv_tool("ansible-playbook"), "-i", str(inventory), "--check", "lockd.virtlockd.site"],
                          env=ansible_env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "is not booted with systemd" in out, out[-3000:]
    assert 'localhost: FAILED at \\"Preflight - systemd must be PID 1\\"' in out, "the summary must say why"
    assert "lock_manager : " not in out, "the role must not run on a refused host"


def test_adoption_in_an_indirect_lockspace_protects_like_libvirt(host, play):
    """With file_lockspace_dir, libvirt leases sha256(disk path) in that directory; adoption must
    take exactly that lease, or libvirt would not see it and a second VM would start."""
    import hashlib
    lockspace = "/var/lib/libvirt/lockd/files"
    sh(host, "sed -i 's/^lock_manager = .*/lock_manager = \"nop\"/' /etc/libvirt/qemu.conf && systemctl restart libvirtd")
    sh(host, "virsh start vma")
    rc, _, out = play({"lock_manager_file_lockspace_dir": lockspace})
    assert rc == 0, out[-4000:]
    pid = qemu_pid(host, "vma")
    held = {(lease["lockspace"], lease["resource"]): lease for lease in leases(host)}
    shared = hashlib.sha256(f"{IMAGES}/shared.img".encode()).hexdigest()
    own = hashlib.sha256(f"{IMAGES}/vma.img".encode()).hexdigest()
    assert set(held) == {(lockspace, shared), (lockspace, own)}
    assert [o["pid"] for o in held[(lockspace, shared)]["owners"]] == [pid]
    proc = sh(host, "virsh start vmb", check=False)
    assert proc.returncode != 0
    assert f"resource busy: Lockspace resource '{shared}' is locked" in proc.stderr
    sh(host, "virsh destroy vma")
