# SPDX-License-Identifier: GPL-3.0-or-later
"""The state journal: what the daemon holds, so a new process can take it back.

An append-only file of JSON records in ``state_dir``. Compaction writes a
snapshot to a temporary file and renames it over the journal, so a reader
always sees either the old or the new file.

Every record is written as ``"\\n" + json``: it starts on a fresh line, so a
torn record (a crash or a full disk in mid-write, or the file truncated under
us) is one garbage line that replay skips, and never swallows the next record.
A write that fails part-way keeps the records that did not reach the file
whole, to be written again. See docs/design.md for how this fits with the
systemd fd store.
"""
from __future__ import annotations

import json
import logging
import os
from json.encoder import encode_basestring_ascii as _q
from typing import List, Optional

log = logging.getLogger("lockd.journal")

FORMAT = 1


def write_atomic(path: str, data: bytes, mode: int = 0o600, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file;
    on failure nothing is left behind. (``fsync`` only matters for power loss,
    not for a crash of the daemon.)"""
    tmp = "%s.tmp.%d" % (path, os.getpid())
    try:
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
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Journal:
    """The journal file: pending records, appends and compaction.

    Records are queued with :meth:`append` (and the hot-path formatters) and
    written together by :meth:`flush`, which the daemon calls before it sends
    any reply: a client never sees "OK" for something the journal does not
    have. ``flush`` raises ``OSError`` when the file cannot take them; the
    records that did not reach it stay pending.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.lines = 0
        self.pending: List[str] = []
        self.size = 0            # where our next append must land
        self.tampered = False    # the file shrank or moved under us: rewrite it from memory

    @property
    def is_open(self) -> bool:
        return self.fd is not None

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size
        self.tampered = False

    def flush(self) -> None:
        if not self.pending or self.fd is None:
            return
        data = "".join(self.pending).encode("ascii")
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, view[written:])
        except OSError:
            self._keep_unwritten(written)
            raise
        self.pending = []
        end = os.lseek(self.fd, 0, os.SEEK_CUR)     # O_APPEND: the end of the file
        if end != self.size + written:
            self.tampered = True
        self.size = end

    def _keep_unwritten(self, written: int) -> None:
        # records are ASCII (json with ensure_ascii): characters are bytes
        done = 0
        for i, rec in enumerate(self.pending):
            if done + len(rec) > written:
                self.pending = self.pending[i:]
                break
            done += len(rec)
        else:
            self.pending = []
        self.size += written

    def mark(self) -> int:
        """The point to :meth:`commit` from: the records of one request follow it."""
        return len(self.pending)

    def commit(self, mark: int) -> None:
        """Flush now. If that fails, forget the records queued since ``mark``
        (the caller undoes what they describe; none of them reached the file
        whole, since the last one did not) and raise; older ones stay pending."""
        before = len(self.pending)
        try:
            self.flush()
        except OSError:
            written_whole = before - len(self.pending)
            keep = max(0, mark - written_whole)
            self.lines -= len(self.pending) - keep
            del self.pending[keep:]
            raise

    def append(self, rec: dict) -> None:
        self.pending.append("\n" + json.dumps(rec, separators=(",", ":")))
        self.lines += 1

    # Hot-path records, formatted without json.dumps (same JSON on disk).
    def acq(self, ls: str, name: str, path: str, flags: int, owner: int, since: float,
            fdname: Optional[str], dev: int, ino: int) -> None:
        self.pending.append('\n{"t":"acq","ls":%s,"name":%s,"path":%s,"flags":%d,"owner":%d,"since":%r,'
                            '"fdname":%s,"dev":%d,"ino":%d}'
                            % (_q(ls), _q(name), _q(path), flags, owner, since,
                               _q(fdname) if fdname else "null", dev, ino))
        self.lines += 1

    def rel(self, ls: str, name: str, owner: int) -> None:
        self.pending.append('\n{"t":"rel","ls":%s,"name":%s,"owner":%d,"all":true}'
                            % (_q(ls), _q(name), owner))
        self.lines += 1

    def gone(self, ls: str, name: str) -> None:
        self.pending.append('\n{"t":"gone","ls":%s,"name":%s}' % (_q(ls), _q(name)))
        self.lines += 1

    def rewrite(self, records: List[dict]) -> None:
        """Replace the journal with ``records`` (a snapshot that supersedes
        every pending record). On failure the old journal and the pending
        records are kept as they were."""
        body = "".join("\n" + json.dumps(r, separators=(",", ":")) for r in records)
        header = json.dumps({"t": "hdr", "format": FORMAT})
        # the journal lives in /run (tmpfs): no fsync; atomic rename is what matters
        write_atomic(self.path, (header + body).encode("ascii"), fsync=False)
        self.pending = []
        if self.fd is not None:
            os.close(self.fd)
        self.open()
        self.lines = len(records) + 1

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    @staticmethod
    def replay(path: str) -> dict:
        return replay(path)


def replay(path: str) -> dict:
    """Fold the journal into ``{"lockspaces": [...], "resources": {...}, "owners": {...}}``."""
    state: dict = {"lockspaces": [], "resources": {}, "owners": {}, "next_fd": 0}
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
