"""The multi-kernel NFS test bed itself (testbed/nfsbed.py): what the NFS
scenarios and the hung-storage tests build on. fcntl locks exclude across the
two hypervisor kernels over NFS, a partition cuts a guest off the NFS server
while its command channel keeps answering, and healing the link lets the
blocked call finish."""
from __future__ import annotations

import pytest

from testbed.nfsbed import LOCKSPACE_MOUNT

pytestmark = [pytest.mark.nfsbed, pytest.mark.slow]

# Hold (or try) an exclusive lock on byte 0: POSIX (lockf) or OFD, print what happened.
TRY = ("python3 -c 'import fcntl,os,struct,sys,time; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT,0o600); "
       "k=sys.argv[2]\n"
       "try:\n"
       " fcntl.fcntl(fd,37,struct.pack(\"hhqqi4x\",fcntl.F_WRLCK,0,0,1,0)) if k==\"ofd\" else "
       "fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB,1,0)\n"
       " print(\"granted\",flush=True)\n"
       "except OSError as e:\n"
       " print(\"refused\",e.errno,flush=True)\n"
       "time.sleep(float(sys.argv[3]))' {path} {kind} {hold}")


def _try(bed, host, path, kind, hold=0.0):
    return bed.run(host, TRY.format(path=path, kind=kind, hold=hold)).out.split()


def test_the_guests_run_their_own_kernels(nfs_bed):
    ids = {h: nfs_bed.run(h, "cat /proc/sys/kernel/random/boot_id").out.strip() for h in ("nfs", "hv1", "hv2")}
    assert len(set(ids.values())) == 3, ids
    for h in ("hv1", "hv2"):
        assert nfs_bed.run(h, f"findmnt -n -o FSTYPE {LOCKSPACE_MOUNT}").out.strip() == "nfs4"


@pytest.mark.parametrize("holder_kind,other_kind", [("posix", "ofd"), ("ofd", "posix"), ("ofd", "ofd")])
def test_locks_exclude_across_kernels(nfs_bed, holder_kind, other_kind):
    path = f"{LOCKSPACE_MOUNT}/.bedtest-{holder_kind}-{other_kind}"
    holder = nfs_bed.spawn("hv1", TRY.format(path=path, kind=holder_kind, hold=600))
    nfs_bed.run("hv1", f"while ! grep -q . /run/lockd-chan/cmd/{holder.cid}.out 2>/dev/null; do sleep 0.1; done")
    try:
        assert _try(nfs_bed, "hv2", path, other_kind)[:2] == ["refused", "11"]  # EAGAIN
    finally:
        nfs_bed.run("hv1", f"pkill -f -- '{path}' || true")
    assert holder.wait(60) is not None
    assert _try(nfs_bed, "hv2", path, other_kind) == ["granted"]


def test_partition_cuts_nfs_but_not_the_command_channel(nfs_bed):
    probe = f"stat -c %i {LOCKSPACE_MOUNT}/.bedtest-partition"
    nfs_bed.run("hv1", f"touch {LOCKSPACE_MOUNT}/.bedtest-partition")
    nfs_bed.partition("hv1")
    try:
        assert nfs_bed.net.is_cut("hv1")
        # Dropping hv1's caches makes the stat ask the server, which it cannot reach.
        blocked = nfs_bed.spawn("hv1", f"echo 3 > /proc/sys/vm/drop_caches; {probe}")
        assert blocked.wait(8) is None, "a stat on the hard NFS mount returned while hv1 was cut off"
        # The 9p command channel still answers, and the other hypervisor still reaches the server.
        assert nfs_bed.run("hv1", "echo alive", timeout=30).out.strip() == "alive"
        nfs_bed.run("hv2", probe, timeout=60)
    finally:
        nfs_bed.heal("hv1")
    assert not nfs_bed.net.is_cut("hv1")
    res = blocked.wait(120)
    assert res is not None and res.ok, res
