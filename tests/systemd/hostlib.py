"""Helpers for tests inside an nspawn host: install our daemon, define tiny VMs.

The daemon is installed the simple way (no Ansible): the package
``lockd_src/lockd`` is copied to ``/usr/local/lib/lockd/lockd``, the console
scripts named in ``lockd_src/pyproject.toml`` become small wrappers in
``/usr/local/sbin`` and the unit files from ``lockd_src/lockd/data/units/`` go
to ``/etc/systemd/system`` (the role's installed layout, docs/architecture.md),
where they override Debian's C virtlockd units of the same names.
"""
from __future__ import annotations

import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "lockd_src"
UNITS = ("virtlockd.service", "virtlockd.socket", "virtlockd-admin.socket")
IMAGES = "/var/lib/libvirt/images"
EXTRA = f"{IMAGES}/extra.img"
BUSY = f"resource busy: Lockspace resource '{EXTRA}' is locked"

DOMAIN = """<domain type='{type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vdb' bus='virtio'/>
      {extra}
      <alias name='ua-extra'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <qemu:override><qemu:device alias='ua-extra'><qemu:frontend>
    <qemu:property name='share-rw' type='bool' value='true'/>
  </qemu:frontend></qemu:device></qemu:override>
</domain>
"""
UUIDS = {"vm1": "11111111-1111-4111-8111-111111111111", "vm2": "22222222-2222-4222-8222-222222222222"}


def console_scripts() -> dict[str, str]:
    data = tomllib.loads((SRC / "pyproject.toml").read_text())
    return dict(data["project"]["scripts"])


def install_daemon(cluster, host: str) -> None:
    """Copy our daemon and its units into *host*, replacing Debian's virtlockd."""
    cluster.copy_in(host, SRC / "lockd", "/usr/local/lib/lockd/lockd")
    for name, target in console_scripts().items():
        module, _, func = target.partition(":")
        wrapper = (
            "#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/usr/local/lib/lockd')\n"
            f"from {module} import {func}\nsys.exit({func}())\n"
        )
        cluster.exec(host, f"cat > /usr/local/sbin/{name} && chmod 0755 /usr/local/sbin/{name}", input=wrapper)
    for unit in UNITS:
        cluster.copy_in(host, SRC / "lockd" / "data" / "units" / unit, f"/etc/systemd/system/{unit}")
    # The sockets Debian started at boot are re-created from our unit files.
    cluster.exec(host, "systemctl daemon-reload && systemctl stop virtlockd.service; "
                       "systemctl restart virtlockd.socket virtlockd-admin.socket")


def enable_lockd_in_qemu(cluster, host: str, indirect: bool = False) -> None:
    conf = "lock_manager = \"lockd\"\n"
    cluster.exec(host, "sed -i '/^lock_manager/d' /etc/libvirt/qemu.conf && cat >> /etc/libvirt/qemu.conf", input=conf)
    lockd = "auto_disk_leases = 1\nrequire_lease_for_disks = 0\n"
    if indirect:
        lockd += 'file_lockspace_dir = "/var/lib/libvirt/lockd/files"\n'
        cluster.exec(host, "mkdir -p /var/lib/libvirt/lockd/files && chmod 0700 /var/lib/libvirt/lockd/files")
    cluster.exec(host, "cat > /etc/libvirt/qemu-lockd.conf", input=lockd)
    cluster.exec(host, "systemctl restart libvirtd.service")
    wait_for(lambda: cluster.exec(host, "virsh -q list", check=False).returncode == 0, "libvirtd answers")


def define_vms(cluster, host: str, extra: str = "") -> None:
    """vm1 and vm2, diskless but for the shared extra.img (share-rw, so lockd decides)."""
    dtype = "kvm" if cluster.exec(host, "test -c /dev/kvm", check=False).returncode == 0 else "qemu"
    cluster.exec(host, f"test -e {EXTRA} || truncate -s 100M {EXTRA}")
    for name, uuid in UUIDS.items():
        xml = DOMAIN.format(type=dtype, name=name, uuid=uuid, disk=EXTRA, extra=extra)
        cluster.exec(host, f"virsh -q destroy {name} >/dev/null 2>&1; virsh -q undefine {name} >/dev/null 2>&1; "
                           f"cat > /tmp/{name}.xml && virsh -q define /tmp/{name}.xml", input=xml)


def start(cluster, host: str, vm: str):
    return cluster.exec(host, ["virsh", "start", vm], check=False)


def state(cluster, host: str, vm: str) -> str:
    return cluster.exec(host, ["virsh", "domstate", vm], check=False).stdout.strip()


def qemu_pid(cluster, host: str, vm: str) -> int:
    return int(cluster.exec(host, f"cat /run/libvirt/qemu/{vm}.pid").stdout.strip())


def daemon_pid(cluster, host: str) -> int:
    return int(cluster.exec(host, "systemctl show -P MainPID virtlockd.service").stdout.strip())


def wait_for(pred, what: str, timeout: float = 30.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")
