#!/usr/bin/python
# Copyright (c) 2026, lockd.virtlockd maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


DOCUMENTATION = r"""
module: lease_info
short_description: List the disk leases held by the VM lock daemon
version_added: 0.1.0
description:
  - Lists the leases (locked disks or lease files) that the lock daemon holds for running VMs, with their owners,
    plus the daemon's lockspaces and facts.
  - Talks to the lockd admin socket. Filters select leases by lockspace, resource, disk path or owner.
  - When the host runs libvirt's C C(virtlockd), which has no lease query, the module falls back to reading
    C(/proc/locks), the daemon's open files and the configured lockspace directories, and says so in
    RV(source). Lease owners are unknown in that case.
  - From the admin socket it also reports, in RV(held_elsewhere), the lease files in the lockspace directories
    that are locked by someone other than this daemon, for example by the lock daemon of another host sharing
    the storage. They are found with a read-only lock query (C(F_OFD_GETLK)); no lock is taken, no file created.
  - Never changes anything.
author:
  - lockd.virtlockd maintainers (@lockd)
extends_documentation_fragment:
  - lockd.virtlockd._lockd
  - lockd.virtlockd._lockd.attributes
  - lockd.virtlockd._lockd.info_module
options:
  lockspace:
    description:
      - Only leases in this lockspace. V("") is the default (direct) lockspace, where the disk itself is locked;
        otherwise a lockspace directory such as V(/var/lib/libvirt/lockd/files).
    type: str
  resource:
    description:
      - Only the lease on this resource name (the disk path in the direct lockspace, a sha256 hex name in a
        file lockspace).
    type: str
  path:
    description:
      - Only the lease whose locked file is this file. Compared by device and inode, so a symlink or another
        path to the same disk matches too.
    type: path
  owner_uuid:
    description:
      - Only leases held by the domain with this UUID.
    type: str
  owner_name:
    description:
      - Only leases held by the domain with this name.
    type: str
  owner_pid:
    description:
      - Only leases held by this process (the QEMU process of the domain).
    type: int
  fallback:
    description:
      - When the admin socket belongs to libvirt's C C(virtlockd), read leases from C(/proc/locks) and the
        lockspace directories instead of failing.
      - The owner filters cannot be applied in that case; the module then returns no leases and warns.
    type: bool
    default: true
  lockspace_dirs:
    description:
      - Lockspace directories to scan in the fallback.
      - Defaults to the C(file_lockspace_dir), C(lvm_lockspace_dir) and C(scsi_lockspace_dir) set in
        O(qemu_lockd_conf).
      - From the admin socket, these directories are scanned for RV(held_elsewhere) in addition to the
        daemon's own lockspace directories (there is no default from O(qemu_lockd_conf) then).
    type: list
    elements: path
  qemu_lockd_conf:
    description:
      - The libvirt lockd plugin configuration that names the lockspace directories for the fallback.
    type: path
    default: /etc/libvirt/qemu-lockd.conf
  pid_file:
    description:
      - Pid file of the C C(virtlockd), used in the fallback to find the daemon's locks. If it does not name a
        running process, the module looks for a process called C(virtlockd).
    type: path
    default: /run/virtlockd.pid
seealso:
  - module: lockd.virtlockd.lease
"""

EXAMPLES = r"""
---
- name: List every lease on the hypervisor
  lockd.virtlockd.lease_info:
  become: true
  register: leases

- name: Who holds the shared data disk (any path to it matches)?
  lockd.virtlockd.lease_info:
    path: /var/lib/libvirt/images/extra.img
  become: true
  register: extra

- name: Show the holder
  ansible.builtin.debug:
    msg: "{{ extra.leases | map(attribute='owners') | flatten | map(attribute='name') | list }}"

- name: Leases of one VM
  lockd.virtlockd.lease_info:
    owner_name: vm1
  become: true
  register: vm1_leases
"""

RETURN = r"""
source:
  description:
    - Where the information comes from. V(admin_socket) is the lockd admin protocol.
      V(proc_locks) is the read-only fallback for libvirt's C C(virtlockd) (O(fallback=true)).
  returned: success
  type: str
  choices: [admin_socket, proc_locks]
  sample: admin_socket
leases:
  description: The leases that match every filter given.
  returned: success
  type: list
  elements: dict
  contains:
    lockspace:
      description: The lockspace key as libvirt sent it; V("") for the default (direct) lockspace.
      type: str
      sample: ""
    resource:
      description: The resource name (disk path in direct mode, sha256 hex in a file lockspace).
      type: str
      sample: /var/lib/libvirt/images/extra.img
    path:
      description: The file that is locked.
      type: str
      sample: /var/lib/libvirt/images/extra.img
    dev:
      description: Device number of the locked file.
      type: int
      sample: 64768
    ino:
      description: Inode number of the locked file.
      type: int
      sample: 131
    shared:
      description: Whether the lease is shared (several readers or C(<shareable/>) disks) rather than exclusive.
      type: bool
      sample: false
    owners:
      description:
        - The processes holding the lease, with C(uuid), C(name), C(id), C(pid), C(start_time), C(alive),
          C(since) and C(connected).
        - Empty in the C(proc_locks) fallback, where owners are unknown.
      type: list
      elements: dict
      sample:
        - uuid: 11111111-1111-4111-8111-111111111111
          name: vm1
          id: 3
          pid: 8280
          alive: true
    holder:
      description:
        - Only in the C(proc_locks) fallback. V(daemon) if this host's C(virtlockd) holds the lock,
          V(other) if someone else does (for example another host sharing the lockspace directory).
      type: str
      returned: when RV(source) is V(proc_locks)
      sample: daemon
held_elsewhere:
  description:
    - Lease files in the lockspace directories (the daemon's lockspaces and O(lockspace_dirs)) whose byte 0 is
      locked in the kernel by someone other than this daemon, such as the lock daemon of another host on shared
      storage. The daemon's own leases (compared by device and inode) are not listed here.
    - Found with a read-only lock query; the files are not locked or created.
    - The O(lockspace), O(resource) and O(path) filters apply. Owners of these locks are unknown, so when
      O(owner_uuid), O(owner_name) or O(owner_pid) is given the list is empty.
  returned: when RV(source) is V(admin_socket)
  type: list
  elements: dict
  contains:
    lockspace:
      description: The lockspace key (the daemon's lockspace path, or the directory from O(lockspace_dirs)).
      type: str
      sample: /var/lib/libvirt/lockd/files
    resource:
      description: The file name of the lease file (a sha256 hex name in a file lockspace).
      type: str
      sample: 5b1c2f0e9d0c7a3f8f2b4f3d6e1a9c8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a
    path:
      description: The lease file.
      type: str
      sample: /var/lib/libvirt/lockd/files/5b1c2f0e9d0c7a3f8f2b4f3d6e1a9c8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a
    dev:
      description: Device number of the lease file.
      type: int
      sample: 64768
    ino:
      description: Inode number of the lease file.
      type: int
      sample: 393
    mode:
      description: V(exclusive) for a write lock, V(shared) for a read lock.
      type: str
      choices: [exclusive, shared]
      sample: exclusive
    holder:
      description:
        - Who holds the lock, as far as this host can tell. V(another host or process) unless the kernel names a
          process this host can see (a POSIX lock), then V(process PID).
      type: str
      sample: another host or process
    holder_pid:
      description: The pid of the holder when the kernel names one, else V(null) (OFD locks, other hosts).
      type: int
      sample: null
lockspaces:
  description: The daemon's lockspaces (the default one has C(path) V("")).
  returned: success
  type: list
  elements: dict
  sample:
    - path: ""
      directory: null
      resources: 1
      persistent: true
daemon:
  description:
    - Facts about the lock daemon. From the admin socket these are the C(status) facts (C(version), C(pid),
      C(uptime), C(lock_type), C(socket_activated), C(fdstore), counts, C(recovered_leases), C(lost_leases)).
    - In the fallback, C(server=libvirt-virtlockd) and the C(pid) if found.
  returned: success
  type: dict
  sample:
    server: lockd
    version: 0.1.0
    pid: 1234
    lock_type: ofd
    leases: 1
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lockd.virtlockd.plugins.module_utils._lockd_admin import (
    AdminClient,
    AdminError,
    filter_leases,
    find_c_daemon_pid,
    probe_lockspace_files,
    proc_locks_leases,
    read_lockspace_dirs,
)


FILTERS = ("lockspace", "resource", "path", "owner_uuid", "owner_name", "owner_pid")
OWNER_FILTERS = ("owner_uuid", "owner_name", "owner_pid")


def query_admin(module: AnsibleModule, filters: dict) -> dict:
    with AdminClient(module.params["socket"], timeout=module.params["timeout"]) as client:
        hello = client.call("hello")
        status = client.call("status")
        lockspaces = client.call("lockspaces")["lockspaces"]
        leases = client.call("leases", **filters)["leases"]
        own = client.call("leases")["leases"] if filters else leases
    daemon = dict(status)
    daemon["server"] = hello.get("server", "lockd")
    daemon.setdefault("version", hello.get("version"))
    held = held_elsewhere(module, filters, lockspaces, own)
    return {
        "source": "admin_socket", "leases": leases, "held_elsewhere": held, "lockspaces": lockspaces, "daemon": daemon,
    }


def held_elsewhere(module: AnsibleModule, filters: dict, lockspaces: list, own_leases: list) -> list:
    """Lease files in the lockspace directories locked by someone other than this daemon."""
    if any(name in filters for name in OWNER_FILTERS):
        return []  # owners of foreign locks are unknown
    dirs = []
    known = set()
    for lockspace in lockspaces:
        directory = lockspace.get("directory")
        if directory and os.path.normpath(directory) not in known:
            known.add(os.path.normpath(directory))
            dirs.append((lockspace["path"], directory))
    for directory in module.params["lockspace_dirs"] or []:
        if os.path.normpath(directory) not in known:
            known.add(os.path.normpath(directory))
            dirs.append((directory, directory))
    skip = {(lease["dev"], lease["ino"]) for lease in own_leases if lease.get("dev") is not None}
    found = filter_leases(
        probe_lockspace_files(dirs, skip),
        lockspace=filters.get("lockspace"), resource=filters.get("resource"), path=filters.get("path"),
    )
    return [
        {
            "lockspace": entry["lockspace"], "resource": entry["resource"], "path": entry["path"],
            "dev": entry["dev"], "ino": entry["ino"],
            "mode": "shared" if entry["mode"] == "READ" else "exclusive",
            "holder": f"process {entry['pid']}" if entry["pid"] else "another host or process",
            "holder_pid": entry["pid"],
        }
        for entry in found
    ]


def query_fallback(module: AnsibleModule, filters: dict) -> dict:
    dirs = module.params["lockspace_dirs"]
    if dirs is None:
        dirs = read_lockspace_dirs(module.params["qemu_lockd_conf"])
    pid = find_c_daemon_pid(module.params["pid_file"])
    try:
        leases = proc_locks_leases(dirs, pid, exclude=(module.params["pid_file"],))
    except OSError as exc:
        module.fail_json(msg=f"cannot read the C virtlockd's locks from /proc: {exc}; run as root (become: true)")
    used_owner_filters = [name for name in OWNER_FILTERS if name in filters]
    if used_owner_filters:
        module.warn(
            f"libvirt's C virtlockd does not expose lease owners, so the filter(s) {', '.join(used_owner_filters)} "
            "match nothing; filter by lockspace, resource or path instead"
        )
        leases = []
    else:
        leases = filter_leases(
            leases, lockspace=filters.get("lockspace"), resource=filters.get("resource"), path=filters.get("path")
        )
    lockspaces = [{"path": "", "directory": None, "resources": None, "persistent": False}]
    lockspaces += [{"path": d, "directory": d, "resources": None, "persistent": False} for d in dirs]
    daemon = {"server": "libvirt-virtlockd", "pid": pid, "leases": len(leases)}
    return {"source": "proc_locks", "leases": leases, "lockspaces": lockspaces, "daemon": daemon}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/libvirt/virtlockd-admin-sock"},
            "timeout": {"type": "float", "default": 30},
            "lockspace": {"type": "str"},
            "resource": {"type": "str"},
            "path": {"type": "path"},
            "owner_uuid": {"type": "str"},
            "owner_name": {"type": "str"},
            "owner_pid": {"type": "int"},
            "fallback": {"type": "bool", "default": True},
            "lockspace_dirs": {"type": "list", "elements": "path"},
            "qemu_lockd_conf": {"type": "path", "default": "/etc/libvirt/qemu-lockd.conf"},
            "pid_file": {"type": "path", "default": "/run/virtlockd.pid"},
        },
        supports_check_mode=True,
    )
    filters = {name: module.params[name] for name in FILTERS if module.params[name] is not None}
    try:
        result = query_admin(module, filters)
    except AdminError as exc:
        if exc.code == "not-lockd" and module.params["fallback"]:
            result = query_fallback(module, filters)
        else:
            module.fail_json(msg=f"cannot list leases: {exc.message}", error_code=exc.code)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
