# Copyright (c) 2026, lockd.virtlockd maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Print, as JSON, the leases libvirt would hold for the running VMs.

Used by the lock_manager role to adopt VMs that were running before locking
was enabled. Read-only: runs `virsh list`, `virsh domuuid/domid`,
`virsh domblklist --details` and `virsh dumpxml`, and reads the QEMU pid files
in /run/libvirt/qemu/. Mirrors libvirt's lockd plugin: read-only disks get no
lease, <shareable/> disks a shared one; with file_lockspace_dir the resource is
the sha256 of the disk path in that directory, else the disk path itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET


def virsh(args, *command):
    proc = subprocess.run([args.virsh, "-c", args.uri, *command], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(command)} failed: {proc.stderr.strip()}")
    return proc.stdout


def domain_leases(args, name):
    uuid = virsh(args, "domuuid", name).strip()
    dom_id = virsh(args, "domid", name).strip()
    with open(f"/run/libvirt/qemu/{name}.pid", encoding="ascii") as handle:
        pid = int(handle.read().strip())
    xml = ET.fromstring(virsh(args, "dumpxml", name))
    flags = {}
    for disk in xml.findall("./devices/disk"):
        target = disk.find("target")
        if target is not None:
            flags[target.get("dev")] = {
                "readonly": disk.find("readonly") is not None or disk.get("device") == "cdrom",
                "shareable": disk.find("shareable") is not None,
            }
    leases, skipped = [], []
    # domblklist --details: Type Device Target Source
    for line in virsh(args, "domblklist", "--details", name).splitlines()[2:]:
        fields = line.split(None, 3)
        if len(fields) < 4:
            continue
        disk_type, device, target, path = fields
        info = flags.get(target, {"readonly": device == "cdrom", "shareable": False})
        if path == "-" or info["readonly"]:
            continue
        if disk_type not in ("file", "block", "volume"):
            skipped.append({"domain": name, "path": path, "reason": f"{disk_type} disks are not leased by lockd"})
            continue
        owner = {"owner_uuid": uuid, "owner_name": name, "owner_id": int(dom_id) if dom_id.isdigit() else 0,
                 "owner_pid": pid}
        is_block = False
        try:
            is_block = stat.S_ISBLK(os.stat(path).st_mode)
        except OSError:
            pass
        if is_block and (args.lvm_lockspace_dir or args.scsi_lockspace_dir):
            skipped.append({"domain": name, "path": path,
                            "reason": "LVM/SCSI lockspace leases are not adopted; restart the VM to lease it"})
            continue
        if args.file_lockspace_dir:
            lease = {"lockspace": args.file_lockspace_dir, "resource": hashlib.sha256(path.encode()).hexdigest(),
                     "autocreate": True}
        else:
            lease = {"lockspace": "", "resource": path, "autocreate": False}
        lease.update(owner, path=path, shared=info["shareable"])
        leases.append(lease)
    return leases, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--virsh", default="virsh")
    parser.add_argument("--uri", default="qemu:///system")
    parser.add_argument("--auto-disk-leases", default="1")
    parser.add_argument("--file-lockspace-dir", default="")
    parser.add_argument("--lvm-lockspace-dir", default="")
    parser.add_argument("--scsi-lockspace-dir", default="")
    args = parser.parse_args()
    result = {"domains": [], "leases": [], "skipped": []}
    if args.auto_disk_leases != "1":
        print(json.dumps(result))
        return 0
    try:
        names = [n for n in virsh(args, "list", "--name", "--state-running").splitlines() if n.strip()]
        for name in names:
            leases, skipped = domain_leases(args, name.strip())
            result["domains"].append(name.strip())
            result["leases"].extend(leases)
            result["skipped"].extend(skipped)
    except (RuntimeError, OSError, ValueError, ET.ParseError) as exc:
        print(f"cannot list the running VMs: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
