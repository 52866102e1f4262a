# SPDX-License-Identifier: GPL-3.0-or-later
"""``virtlockctl``: list and release leases of a running lockd daemon."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List

from . import __version__
from . import protocol as P
from .adminclient import AdminClient, AdminError


def _table(rows: List[List[str]], headers: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    fmt = "  ".join("%%-%ds" % w for w in widths)
    lines = [fmt % tuple(headers)] + [fmt % tuple(str(x) for x in r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _ago(ts) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    if s < 120:
        return "%ds" % s
    if s < 7200:
        return "%dm" % (s // 60)
    return "%dh" % (s // 3600)


def _owners(lease) -> str:
    return ", ".join("%s(pid %s%s)" % (o.get("name") or "?", o["pid"], "" if o.get("alive") else ", gone")
                     for o in lease["owners"])


def human(cmd: str, result: dict) -> str:
    if cmd == "status":
        r = result
        lines = ["lockd %s, pid %d, up %s" % (r["version"], r["pid"], _ago(r["started"])),
                 "locks: %s%s%s" % (r["lock_type"], ", fd store" if r["fdstore"] else "",
                                    ", socket activated" if r["socket_activated"] else ""),
                 "clients: %d of %d, admin clients: %d" % (r["clients"], r["max_clients"], r["admin_clients"]),
                 "leases: %d held by %d owners in %d lockspaces" % (r["leases"], r["owners"], r["lockspaces"]),
                 "recovered at start: %d, lost: %d" % (r["recovered_leases"], len(r["lost_leases"]))]
        for lost in r["lost_leases"]:
            lines.append("  LOST %s (lockspace %r, pids %s): %s"
                         % (lost["resource"], lost["lockspace"], lost["owners"], lost["reason"]))
        stalled = r.get("stalled_lockspaces", [])
        if stalled:
            lines.append("stalled storage: %d lockspace(s)" % len(stalled))
        for s in stalled:
            lines.append("  STALLED %s on %s (%s): no answer for %.0f s, %d call(s) waiting"
                         % (s["lockspace"] if s["lockspace"] else "(direct)", s["mount"], s["fstype"],
                            s["waited"], s["pending_calls"]))
        f = r.get("fencing")
        if f:
            w = f["watched"]
            lines.append("network leases: %d held, %d at risk, %d lost, %d fenced (on_lockfailure %s, fenced "
                         "within %.1f s of the server's silence, NFS lease time %g s)"
                         % (w["held"], w["at_risk"], w["lost"], w["fenced"], f["policy"], f["fence_within"],
                            f["nfs_lease_time"]))
            for p in f["paused"]:
                lines.append("  PAUSED %s pid %d since %s (lease %s): `virtlockctl resume --owner-pid %d` once "
                             "it is held again" % (p.get("name") or "?", p["pid"], _ago(p.get("since")),
                                                   p.get("resource"), p["pid"]))
            for d in f["decisions"][-5:]:
                lines.append("  %s %s: %s -> %s (%s), action %s"
                             % (time.strftime("%H:%M:%S", time.localtime(d["at"])), d["resource"], d["old"],
                                d["state"], d["reason"], d["action"]))
        return "\n".join(lines)
    if cmd == "leases":
        rows = [[lease["lockspace"] or "(direct)", lease["resource"], "shared" if lease["shared"] else "exclusive",
                 lease.get("state", "held").upper().replace("_", " "),
                 _owners(lease), ", ".join(o.get("uuid") or "?" for o in lease["owners"]),
                 _ago(min((o.get("since") or 0) for o in lease["owners"]) if lease["owners"] else 0)]
                for lease in result["leases"]]
        if not rows:
            return "no leases"
        return _table(rows, ["LOCKSPACE", "RESOURCE", "MODE", "STATE", "OWNERS", "UUID", "AGE"])
    if cmd == "resume":
        out = ["resumed %s pid %d" % (p.get("name") or "?", p["pid"]) for p in result["resumed"]]
        out += ["still stopped: pid %d: %s" % (r["pid"], r["reason"]) for r in result["refused"]]
        return "\n".join(out) or "no paused VM"
    if cmd == "lockspaces":
        return _table([[ls["path"] or "(direct)", ls["resources"]] for ls in result["lockspaces"]],
                      ["LOCKSPACE", "LEASES"])
    if cmd == "clients":
        rows = [[c["id"], c["pid"], c["uid"], "yes" if c["restricted"] else "no",
                 (c["owner"]["name"] + " pid %d" % c["owner"]["pid"]) if c["owner"] else "-", _ago(c["connected_at"])]
                for c in result["clients"]]
        return _table(rows, ["ID", "PID", "UID", "RESTRICTED", "OWNER", "AGE"]) if rows else "no clients"
    if cmd in ("release", "acquire"):
        if cmd == "acquire":
            return ("acquired %s" % result["lease"]["resource"]) if result["changed"] and result["lease"] else \
                ("would acquire" if result["changed"] else "already held by that owner: nothing to do")
        if not result["released"]:
            return "nothing to release"
        verb = "released" if result["changed"] else "would release"
        return "\n".join("%s %s (lockspace %s, owners %s)" % (verb, x["resource"], x["lockspace"] or "(direct)",
                                                              _owners(x)) for x in result["released"])
    return json.dumps(result, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="virtlockctl", description="Inspect and release leases held by lockd.")
    ap.add_argument("-s", "--socket", default=P.ADMIN_SOCKET, help="admin socket (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the raw JSON result")
    ap.add_argument("-V", "--version", action="version", version="virtlockctl (lockd) " + __version__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="daemon facts")
    sub.add_parser("lockspaces", help="list lockspaces")
    sub.add_parser("clients", help="list lock-socket clients")
    lp = sub.add_parser("leases", help="list leases")
    lp.add_argument("--lockspace")
    lp.add_argument("--resource")
    lp.add_argument("--path", help="a disk path; matches by device and inode")
    lp.add_argument("--owner-uuid")
    lp.add_argument("--owner-name")
    lp.add_argument("--owner-pid", type=int)
    rp = sub.add_parser("release", help="release a lease, or all leases of an owner")
    rp.add_argument("--lockspace", help="with --resource; '' is the direct lockspace")
    rp.add_argument("--resource")
    rp.add_argument("--owner-uuid")
    rp.add_argument("--owner-pid", type=int)
    rp.add_argument("--force", action="store_true", help="release even though the owner is still running")
    rp.add_argument("--dry-run", action="store_true")
    aq = sub.add_parser("acquire", help="take a lease on behalf of a running VM (adoption)")
    aq.add_argument("--lockspace", default="")
    aq.add_argument("--resource", required=True)
    aq.add_argument("--shared", action="store_true")
    aq.add_argument("--autocreate", action="store_true")
    aq.add_argument("--owner-uuid", required=True)
    aq.add_argument("--owner-name", required=True)
    aq.add_argument("--owner-id", type=int, required=True)
    aq.add_argument("--owner-pid", type=int, required=True)
    aq.add_argument("--dry-run", action="store_true")
    rs = sub.add_parser("resume", help="continue VMs that fencing paused (only once their leases are held again)")
    rs.add_argument("--owner-pid", type=int)
    rs.add_argument("--owner-uuid")
    a = ap.parse_args(argv)

    args = {}
    if a.cmd == "leases":
        args = {k: v for k, v in (("lockspace", a.lockspace), ("resource", a.resource), ("path", a.path),
                                  ("owner_uuid", a.owner_uuid), ("owner_name", a.owner_name),
                                  ("owner_pid", a.owner_pid)) if v is not None}
    elif a.cmd == "release":
        if a.resource is not None:
            args = {"lockspace": a.lockspace or "", "resource": a.resource}
        elif a.owner_uuid is not None:
            args = {"owner_uuid": a.owner_uuid}
        elif a.owner_pid is not None:
            args = {"owner_pid": a.owner_pid}
        else:
            ap.error("release needs --resource (with --lockspace), --owner-uuid or --owner-pid")
        args.update(force=a.force, dry_run=a.dry_run)
    elif a.cmd == "resume":
        args = {k: v for k, v in (("owner_pid", a.owner_pid), ("owner_uuid", a.owner_uuid)) if v is not None}
    elif a.cmd == "acquire":
        args = {"lockspace": a.lockspace, "resource": a.resource, "shared": a.shared, "autocreate": a.autocreate,
                "dry_run": a.dry_run, "owner": {"uuid": a.owner_uuid, "name": a.owner_name, "id": a.owner_id,
                                                "pid": a.owner_pid}}
    try:
        with AdminClient(a.socket) as c:
            result = c.call(a.cmd, **args)
    except AdminError as e:
        if a.json:
            print(json.dumps({"ok": False, "error": {"code": e.code, "message": e.message}}))
        sys.stderr.write("virtlockctl: %s: %s\n" % (e.code, e.message))
        return 2 if e.code in ("no-daemon", "not-lockd", "permission-denied", "timeout") else 1
    print(json.dumps(result, indent=2, sort_keys=True) if a.json else human(a.cmd, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
