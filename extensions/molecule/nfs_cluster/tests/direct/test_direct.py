"""Direct mode over real NFS: no lockspace directory; lockd locks the disk
image itself, which is on nfs:/srv/images (/var/lib/libvirt/images on both
hypervisors, separate kernels). vm1 runs on hv1 again (smoke test, kept); vmb
on hv2 uses vm1's disk.
"""
import os

import lockcheck as lc
import pytest
import testinfra

testinfra_hosts = ["ansible://hv1"]

BUSY = lc.busy_message(lc.EXTRA)
VMB = "5eb1a7e0-0c4b-4d1e-9a3f-10c4d00000b2"
GETLK = ("python3 -c 'import fcntl,os,struct,sys; fd=os.open(sys.argv[1],os.O_RDONLY); "
         "r=fcntl.fcntl(fd,36,struct.pack(\"hhqqi4x\",fcntl.F_WRLCK,0,0,1,0)); "
         "t=struct.unpack(\"hhqqi4x\",r)[0]; print(\"unlocked\" if t==fcntl.F_UNLCK else \"locked\")' {}")


@pytest.fixture(scope="module")
def hv2():
    return testinfra.get_host("ansible://hv2", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])


def test_direct_mode_on_both_hosts(host, hv2):
    for h in (host, hv2):
        conf = h.file("/etc/libvirt/qemu-lockd.conf").content_string
        assert "file_lockspace_dir" not in conf.replace("#file_lockspace_dir", ""), conf
        assert h.check_output(f"findmnt -n -o FSTYPE {lc.IMAGES}") == "nfs4"


def test_vm1_runs_on_hv1_and_locks_its_disk_on_nfs(host, hv2):
    assert lc.state(host, "vm1") == "running"
    # The kernel lock on the image itself, seen from the other kernel.
    assert hv2.check_output(GETLK.format(lc.EXTRA)) == "locked"


def test_vm_on_hv2_refused_while_vm1_runs_on_hv1(host, hv2):
    r = lc.start(hv2, "vmb")
    assert r.rc != 0, "vmb STARTED on hv2 on the disk vm1 writes on hv1: NFS storage is not protected"
    assert BUSY in r.stderr, r.stderr
    assert lc.state(host, "vm1") == "running"


def test_lease_info_on_both_hosts(host, hv2):
    # One Ansible run for both hosts; the images directory is scanned for locks held elsewhere.
    both = lc.lease_info_many(["hv1", "hv2"], path=lc.EXTRA, lockspace_dirs=lc.IMAGES)
    res, res2 = both["hv1"], both["hv2"]
    assert lc.owners_of(res["leases"]) == [(lc.UUIDS["vm1"], lc.qemu_pid(host, "vm1"))]
    assert res["leases"][0]["path"] == lc.EXTRA
    assert res["held_elsewhere"] == []  # hv1's own lease is not "elsewhere"
    assert res2["leases"] == []
    assert [(e["path"], e["mode"], e["holder"]) for e in res2["held_elsewhere"]] == [
        (lc.EXTRA, "exclusive", "another host or process")], res2


def test_vm_on_hv2_starts_once_vm1_stops(host, hv2):
    lc.destroy(host, "vm1")
    lc.wait_for(lambda: lc.start(hv2, "vmb").rc == 0, "vmb starts on hv2 once vm1 is gone", timeout=60)
    r = lc.start(host, "vm1")
    assert r.rc != 0 and BUSY in r.stderr, r.stderr
    assert lc.owners_of([lease for lease in lc.ctl_leases(hv2) if lease["path"] == lc.EXTRA]) == [
        (VMB, lc.qemu_pid(hv2, "vmb"))]
    lc.destroy(hv2, "vmb")
