"""The state journal: replay, torn lines, compaction, atomic rewrite."""
import json

from lockd.journal import Journal, write_atomic


def test_replay_folds_records(tmp_path):
    p = tmp_path / "j"
    j = Journal(str(p))
    j.open()
    j.append({"t": "ls", "key": "/ls"})
    j.append({"t": "own", "pid": 7, "uuid": "11111111-1111-4111-8111-111111111111", "name": "vm1", "id": 1,
              "start_time": 5})
    for owner in (7, 7, 8):
        j.append({"t": "acq", "ls": "/ls", "name": "a", "path": "/ls/a", "flags": 3, "owner": owner,
                  "since": 1.0, "fdname": "lease-4", "dev": 1, "ino": 2})
    j.append({"t": "acq", "ls": "", "name": "/d", "path": "/d", "flags": 0, "owner": 9, "fdname": "lease-5"})
    j.append({"t": "rel", "ls": "/ls", "name": "a", "owner": 7, "all": True})
    j.append({"t": "gone", "ls": "", "name": "/d"})
    j.append({"t": "seq", "fdseq": 5})
    j.close()
    st = Journal.replay(str(p))
    assert st["lockspaces"] == ["/ls"]
    assert list(st["resources"]) == [("/ls", "a")]
    assert st["resources"][("/ls", "a")]["owners"] == [[8, 1.0]]
    assert st["owners"]["7"]["name"] == "vm1"
    assert st["next_fd"] == 6


def test_torn_last_line_is_ignored(tmp_path):
    p = tmp_path / "j"
    p.write_text(json.dumps({"t": "ls", "key": "/a"}) + "\n" + '{"t": "ls", "ke')
    assert Journal.replay(str(p))["lockspaces"] == ["/a"]


def test_missing_journal_is_empty(tmp_path):
    assert Journal.replay(str(tmp_path / "none"))["resources"] == {}


def test_rewrite_is_atomic_and_reopens(tmp_path):
    p = tmp_path / "j"
    j = Journal(str(p))
    j.open()
    for i in range(10):
        j.append({"t": "ls", "key": "/x%d" % i})
    j.rewrite([{"t": "ls", "key": "/only"}])
    j.append({"t": "ls", "key": "/after"})
    j.close()
    assert Journal.replay(str(p))["lockspaces"] == ["/only", "/after"]
    assert not list(tmp_path.glob("*.tmp.*"))


def test_write_atomic_mode(tmp_path):
    p = tmp_path / "f"
    write_atomic(str(p), b"data", 0o600)
    assert p.read_bytes() == b"data" and oct(p.stat().st_mode & 0o777) == "0o600"
