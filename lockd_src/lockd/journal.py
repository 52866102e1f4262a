# SPDX-License-Identifier: GPL-3.0-or-later
"""The state journal: what the daemon holds, so a new process can take it back.

An append-only file of JSON lines in ``state_dir``. Appends are single
``write()`` calls on an ``O_APPEND`` fd; compaction writes a snapshot to a
temporary file and renames it over the journal, so a reader always sees either
the old or the new file. A torn last line (crash in mid-append) is ignored.
See docs/design.md for how this fits with the systemd fd store.
"""
from __future__ import annotations

import json
import logging
import os
from json.encoder import encode_basestring_ascii as _q
from typing import Dict, List, Optional

log = logging.getLogger("lockd.journal")

FORMAT = 1


def write_atomic(path: str, data: bytes, mode: int = 0o600, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file.
    (``fsync`` only matters for power loss, not for a crash of the daemon.)"""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.lines = 0
        # Records of one event are written together by flush(), which the
        # server calls before it sends any reply: a client never sees "OK"
        # for something the journal does not have yet.
        self.pending: List[str] = []

    def flush(self) -> None:
        if self.pending:
            data = "".join(self.pending).encode()
            self.pending = []
            if self.fd is not None:
                os.write(self.fd, data)

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def append(self, rec: dict) -> None:
        if self.fd is None:
            return
        self.pending.append(json.dumps(rec, separators=(",", ":")) + "\n")
        self.lines += 1

    # Hot-path records, formatted without json.dumps (same JSON on disk).
    def acq(self, ls: str, name: str, path: str, flags: int, owner: int, since: float,
            fdname: Optional[str], dev: int, ino: int) -> None:
        if self.fd is None:
            return
        self.pending.append('{"t":"acq","ls":%s,"name":%s,"path":%s,"flags":%d,"owner":%d,"since":%r,'
                            '"fdname":%s,"dev":%d,"ino":%d}\n'
                            % (_q(ls), _q(name), _q(path), flags, owner, since,
                               _q(fdname) if fdname else "null", dev, ino))
        self.lines += 1

    def rel(self, ls: str, name: str, owner: int) -> None:
        if self.fd is None:
            return
        self.pending.append('{"t":"rel","ls":%s,"name":%s,"owner":%d,"all":true}\n'
                            % (_q(ls), _q(name), owner))
        self.lines += 1

    def gone(self, ls: str, name: str) -> None:
        if self.fd is None:
            return
        self.pending.append('{"t":"gone","ls":%s,"name":%s}\n' % (_q(ls), _q(name)))
        self.lines += 1

    def rewrite(self, records: List[dict]) -> None:
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        self.pending = []       # the snapshot supersedes them
        header = json.dumps({"t": "hdr", "format": FORMAT}) + "\n"
        # the journal lives in /run (tmpfs): no fsync; atomic rename is what matters
        write_atomic(self.path, (header + body).encode(), fsync=False)
        if self.fd is not None:
            os.close(self.fd)
        self.open()
        self.lines = len(records) + 1

    def close(self) -> None:
        self.flush()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def replay(path: str) -> Dict:
        """Fold the journal into ``{"lockspaces": [...], "resources": {...}, "owners": {...}}``."""
        state = {"lockspaces": [], "resources": {}, "owners": {}, "next_fd": 0}
        try:
            with open(path, "rb") as f:
                raw = f.read().split(b"\n")
        except FileNotFoundError:
            return state
        for i, line in enumerate(raw):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                log.warning("journal %s line %d is torn or corrupt and was ignored", path, i + 1)
                continue
            t = r.get("t")
            if t == "ls":
                if r["key"] not in state["lockspaces"]:
                    state["lockspaces"].append(r["key"])
            elif t == "own":
                state["owners"][str(r["pid"])] = r
            elif t == "acq":
                key = (r["ls"], r["name"])
                res = state["resources"].get(key)
                if res is None:
                    res = state["resources"][key] = {
                        "ls": r["ls"], "name": r["name"], "path": r["path"], "flags": r["flags"],
                        "fdname": r.get("fdname"), "dev": r.get("dev"), "ino": r.get("ino"), "owners": []}
                res["owners"].append([r["owner"], r.get("since", 0.0)])
            elif t == "rel":
                res = state["resources"].get((r["ls"], r["name"]))
                if res is not None:
                    res["owners"] = [o for o in res["owners"] if o[0] != r["owner"]] if r.get("all") else \
                        _drop_one(res["owners"], r["owner"])
            elif t == "gone":
                state["resources"].pop((r["ls"], r["name"]), None)
            if r.get("fdseq") is not None:
                state["next_fd"] = max(state["next_fd"], r["fdseq"] + 1)
        return state


def _drop_one(owners, pid):
    for i, o in enumerate(owners):
        if o[0] == pid:
            return owners[:i] + owners[i + 1:]
    return owners
