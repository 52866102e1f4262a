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

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lockd.virtlockd.plugins.module_utils._lockd_admin import (
    AdminClient,
    AdminError,
    filter_leases,
    find_c_daemon_pid,
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
    daemon = dict(status)
    daemon["server"] = hello.get("server", "lockd")
    daemon.setdefault("version", hello.get("version"))
    return {"source": "admin_socket", "leases": leases, "lockspaces": lockspaces, "daemon": daemon}


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
