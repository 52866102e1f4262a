#!/usr/bin/python
# Copyright (c) 2026, lockd.virtlockd maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


DOCUMENTATION = r"""
module: lease
short_description: Release a VM disk lease, or take one on behalf of a running VM
version_added: 0.1.0
description:
  - With O(state=released), releases one lease (O(lockspace) and O(resource)) or every lease of one owner
    (O(owner_uuid) or O(owner_pid)). Use it to clean up after a VM whose leases were left behind.
    The lock daemon refuses to take a lease from a VM that is still running unless O(force=true).
  - With O(state=acquired), takes a lease for a process that is already running (adoption). The
    lockd.virtlockd.lock_manager role uses this to protect the disks of VMs that were running before locking
    was enabled. The lease is released when that process exits.
  - Talks to the lockd admin socket; libvirt's C C(virtlockd) has no such interface.
author:
  - lockd.virtlockd maintainers (@lockd)
extends_documentation_fragment:
  - lockd.virtlockd._lockd
  - lockd.virtlockd._lockd.attributes
attributes:
  check_mode:
    support: full
    details:
      - The daemon evaluates the request without acting on it (a dry run), so check mode reports exactly what
        would change, including refusals.
  diff_mode:
    support: full
    details:
      - The diff shows the holders of the affected leases before and after.
  idempotent:
    support: full
options:
  state:
    description:
      - V(released) makes sure the selected leases are not held. Releasing a lease that is not held is not a change.
      - V(acquired) makes sure the owner holds the lease on O(resource).
    type: str
    choices: [released, acquired]
    default: released
  lockspace:
    description:
      - The lockspace of O(resource). V("") is the default (direct) lockspace, in which the resource is the disk
        path. Otherwise the lockspace directory, for example V(/var/lib/libvirt/lockd/files).
      - Naming a lockspace the daemon does not have is an error.
    type: str
    default: ""
  resource:
    description:
      - The resource to release or acquire. With O(state=released), select a lease by O(resource), or by
        O(owner_uuid), or by O(owner_pid); exactly one of the three.
      - Required with O(state=acquired).
    type: str
  owner_uuid:
    description:
      - The domain UUID of the owner.
      - With O(state=released), releases every lease that this domain holds.
      - Required with O(state=acquired).
    type: str
  owner_pid:
    description:
      - The owner process (the domain's QEMU process).
      - With O(state=released), releases every lease that this process holds.
      - Required with O(state=acquired); the process must be running.
    type: int
  owner_name:
    description:
      - The domain name of the owner. Required with O(state=acquired).
    type: str
  owner_id:
    description:
      - The libvirt domain id of the owner (C(virsh domid), a positive number). Required with O(state=acquired).
    type: int
  shared:
    description:
      - Take a shared lease instead of an exclusive one (disks marked C(<shareable/>)). Only used with
        O(state=acquired).
    type: bool
    default: false
  autocreate:
    description:
      - Create the lease file in the lockspace directory if it does not exist (indirect lockspaces, as libvirt
        does with C(auto_disk_leases)). Only used with O(state=acquired).
    type: bool
    default: false
  force:
    description:
      - Release even if an owner that would lose a lease is still running. That VM then runs without
        protection of its disk, so stop it first whenever you can.
    type: bool
    default: false
seealso:
  - module: lockd.virtlockd.lease_info
"""

EXAMPLES = r"""
---
- name: Release a lease left behind by a VM that no longer runs
  lockd.virtlockd.lease:
    resource: /var/lib/libvirt/images/extra.img
    state: released
  become: true

- name: Release every lease of a domain, even though its QEMU still runs
  lockd.virtlockd.lease:
    owner_uuid: 11111111-1111-4111-8111-111111111111
    state: released
    force: true
  become: true

- name: Adopt the writable disk of a VM that was running before locking was enabled
  lockd.virtlockd.lease:
    state: acquired
    resource: /var/lib/libvirt/images/vm1.qcow2
    owner_uuid: 11111111-1111-4111-8111-111111111111
    owner_name: vm1
    owner_id: 3
    owner_pid: 8280
  become: true
"""

RETURN = r"""
released:
  description:
    - The leases that were released (or would be, in check mode), each as returned by
      lockd.virtlockd.lease_info.
  returned: when O(state=released)
  type: list
  elements: dict
  sample:
    - lockspace: ""
      resource: /var/lib/libvirt/images/extra.img
      path: /var/lib/libvirt/images/extra.img
      shared: false
      owners:
        - name: vm1
          pid: 8280
          alive: false
lease:
  description: The lease after the acquire (in check mode, as it would be), as returned by lockd.virtlockd.lease_info.
  returned: when O(state=acquired)
  type: dict
  sample:
    lockspace: ""
    resource: /var/lib/libvirt/images/vm1.qcow2
    shared: false
    owners:
      - uuid: 11111111-1111-4111-8111-111111111111
        name: vm1
        pid: 8280
        alive: true
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.lockd.virtlockd.plugins.module_utils._lockd_admin import (
    AdminClient,
    AdminError,
)


HINTS = {
    "busy": "Another VM holds this disk: two writers would corrupt it. Find the holder with "
            "lockd.virtlockd.lease_info and stop one of them.",
    "not-found": "List the daemon's lockspaces and leases with lockd.virtlockd.lease_info.",
    "not-lockd": "This module needs lockd's admin interface; deploy lockd with the lockd.virtlockd.lock_manager role.",
    "permission-denied": "The admin socket serves root only: use become=true.",
    "no-daemon": "Deploy or start the lock daemon (lockd.virtlockd.lock_manager role).",
}


def holders(leases: list[dict]) -> dict:
    """The diff view: one key per lease, listing who holds it."""
    view = {}
    for lease in leases:
        key = f"{lease.get('lockspace') or '(direct)'}:{lease.get('resource')}"
        view[key] = sorted(
            f"{o.get('name')} uuid={o.get('uuid')} pid={o.get('pid')}" + ("" if o.get("alive", True) else " (dead)")
            for o in lease.get("owners", [])
        )
    return view


def release(module: AnsibleModule, client: AdminClient) -> dict:
    params = module.params
    if params["resource"] is not None:
        selector = {"lockspace": params["lockspace"], "resource": params["resource"]}
    elif params["owner_uuid"] is not None:
        selector = {"owner_uuid": params["owner_uuid"]}
    else:
        selector = {"owner_pid": params["owner_pid"]}
    before = client.call("leases", **selector)["leases"]
    result = client.call("release", force=params["force"], dry_run=module.check_mode, **selector)
    released = result.get("released", [])
    if module.check_mode:
        gone = {(lease["lockspace"], lease["resource"]) for lease in released}
        after = [lease for lease in before if (lease["lockspace"], lease["resource"]) not in gone]
    else:
        after = client.call("leases", **selector)["leases"]
    return {
        "changed": bool(result.get("changed")),
        "released": released,
        "diff": {"before": holders(before), "after": holders(after)},
    }


def acquire(module: AnsibleModule, client: AdminClient) -> dict:
    params = module.params
    before = client.call("leases", lockspace=params["lockspace"], resource=params["resource"])["leases"]
    result = client.call(
        "acquire",
        lockspace=params["lockspace"],
        resource=params["resource"],
        shared=params["shared"],
        autocreate=params["autocreate"],
        owner={
            "uuid": params["owner_uuid"],
            "name": params["owner_name"],
            "id": params["owner_id"],
            "pid": params["owner_pid"],
        },
        dry_run=module.check_mode,
    )
    lease = result.get("lease")
    if lease is None:
        # A dry run does not build the lease; show what it would look like.
        owner = {"uuid": params["owner_uuid"], "name": params["owner_name"], "id": params["owner_id"],
                 "pid": params["owner_pid"], "alive": True}
        base = before[0] if before else {"lockspace": params["lockspace"], "resource": params["resource"],
                                         "shared": params["shared"], "owners": []}
        lease = dict(base, owners=list(base.get("owners", [])) + [owner])
    return {
        "changed": bool(result.get("changed")),
        "lease": lease,
        "diff": {"before": holders(before), "after": holders([lease])},
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/libvirt/virtlockd-admin-sock"},
            "timeout": {"type": "float", "default": 30},
            "state": {"type": "str", "default": "released", "choices": ["released", "acquired"]},
            "lockspace": {"type": "str", "default": ""},
            "resource": {"type": "str"},
            "owner_uuid": {"type": "str"},
            "owner_pid": {"type": "int"},
            "owner_name": {"type": "str"},
            "owner_id": {"type": "int"},
            "shared": {"type": "bool", "default": False},
            "autocreate": {"type": "bool", "default": False},
            "force": {"type": "bool", "default": False},
        },
        required_if=[
            ("state", "acquired", ("resource", "owner_uuid", "owner_name", "owner_id", "owner_pid")),
        ],
        supports_check_mode=True,
    )
    params = module.params
    if params["state"] == "released":
        given = [name for name in ("resource", "owner_uuid", "owner_pid") if params[name] is not None]
        if len(given) != 1:
            module.fail_json(
                msg="state=released needs exactly one selector: resource (with lockspace), owner_uuid or owner_pid; "
                    f"got {', '.join(given) if given else 'none'}"
            )
    try:
        with AdminClient(params["socket"], timeout=params["timeout"]) as client:
            if params["state"] == "released":
                result = release(module, client)
            else:
                result = acquire(module, client)
    except AdminError as exc:
        hint = HINTS.get(exc.code, "")
        if "become" in exc.message or "force" in exc.message:
            hint = ""  # the daemon's message already says what to do
        module.fail_json(msg=f"{exc.message} {hint}".strip(), error_code=exc.code)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
