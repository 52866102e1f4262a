"""Hung storage, C against ours: one lockspace on a filesystem that stops
answering (testbed/stallfs.py: a FUSE filesystem whose daemon is SIGSTOPped
blocks every call, as an NFS hard mount does when its server is gone), while
a VM on a local disk starts. The real-NFS version runs on the multi-kernel
test bed (issue 11)."""
from __future__ import annotations

import threading
import time

import pytest

from testbed import stallfs
from testbed.daemons import fake_pid, start_daemon
from testbed.wire import UUID_A, UUID_B, Conn, error_of
from tests.unit.test_lockspace import probe_lock

IO_TIMEOUT = 2
WAIT = 6.0          # how long a client waits for an answer before it calls the daemon hung
AUTO = 2


@pytest.mark.skipif(stallfs.available() is not None, reason=str(stallfs.available()))
@pytest.mark.parametrize("kind", ["c", "py"])
def test_one_hung_lockspace(record, kind, tmp_path):
    with stallfs.StallFS(tmp_path / "backing", tmp_path / "mnt") as fs, \
            start_daemon(kind, tmp_path / "d", {"io_timeout": IO_TIMEOUT}) as d:
        ls = str(fs.mountpoint / "lockspace")
        disk = tmp_path / "local.img"
        disk.write_bytes(b"\0" * 4096)
        with Conn(d.sock) as vm1:
            vm1.register(UUID_A, "vm1", 1, fake_pid())
            assert len(vm1.create_lockspace(ls)) == 28
            assert len(vm1.acquire(ls, "held", AUTO)) == 28
        fs.stall()
        hung = {}

        def acquire_in_hung_lockspace():
            t0 = time.monotonic()
            try:
                with Conn(d.sock, timeout=WAIT) as c:
                    c.register(UUID_B, "vm2", 2, fake_pid())
                    e = error_of(c.acquire(ls, "late", AUTO))
                    hung["answer"] = "error: %s" % e.message if e else "OK"
            except (TimeoutError, OSError) as e:
                hung["answer"] = "no answer (%s)" % type(e).__name__
            hung["took"] = time.monotonic() - t0
        t = threading.Thread(target=acquire_in_hung_lockspace)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        try:
            with Conn(d.sock, timeout=WAIT) as c:
                c.register(UUID_B, "vm3", 3, fake_pid())
                local_ok = len(c.acquire("", str(disk))) == 28
        except (TimeoutError, OSError):
            local_ok = False
        local_took = time.monotonic() - t0
        t.join(WAIT + 2)
        fs.resume()
        time.sleep(IO_TIMEOUT + 0.5)
        late_free = probe_lock(fs.backing / "lockspace" / "late") == "free" \
            if (fs.backing / "lockspace" / "late").exists() else True
    record("one lockspace's storage hangs (FUSE stall), a VM on a local disk starts", kind,
           ("local-disk acquire answered in %.0f ms" % (local_took * 1000) if local_ok
            else "local-disk acquire: **no answer in %.0f s** (the daemon is frozen)" % WAIT)
           + "; acquire in the hung lockspace: %s after %.1f s" % (hung.get("answer"), hung.get("took", 0)),
           "after the storage answers: the late lock is %s" % ("released (the client was told it failed)"
                                                              if late_free else "**held** by the daemon"))
    if kind == "py":
        assert local_ok and local_took < 1.0
        assert hung["answer"].startswith("error: Timed out during operation") and hung["took"] < IO_TIMEOUT + 1.5
        assert late_free
    else:
        assert not local_ok, "the C daemon answers while a lockspace hangs? then update this row"

