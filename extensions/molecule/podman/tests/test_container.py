"""The podman containers are real hypervisor hosts: systemd as PID 1,
libvirt + QEMU, the role's daemon serving (run in the same verify step as
../../_shared/two_vms_direct, after the smoke test)."""
import os

import lockcheck as lc


def test_systemd_is_pid1_in_a_podman_container(host):
    assert host.check_output("cat /proc/1/comm") == "systemd"
    assert host.file("/run/.containerenv").exists, "not a podman container"
    assert host.run("systemctl is-system-running").stdout.strip() in ("running", "degraded")


def test_privileged_with_kvm_when_the_machine_has_it(host):
    # A privileged container gets its own node of each of the machine's
    # devices (a chmod inside never changes the machine's /dev/kvm).
    cap_eff = int(host.check_output("awk '/^CapEff/ {print $2}' /proc/1/status"), 16)
    assert cap_eff >> 21 & 1, "not privileged: PID 1 lacks CAP_SYS_ADMIN"
    assert host.file("/dev/kvm").exists == os.path.exists("/dev/kvm")


def test_libvirt_and_qemu_inside(host):
    assert host.service("libvirtd.service").is_running or host.socket("unix:///run/libvirt/libvirt-sock").is_listening
    assert host.run("virsh -c qemu:///system version").rc == 0
    assert host.file("/usr/bin/qemu-system-x86_64").exists


def test_our_daemon_serves_the_lock_manager(host):
    assert host.service("virtlockd.socket").is_running
    assert host.file("/etc/libvirt/qemu.conf").contains('^lock_manager = "lockd"')
    assert isinstance(lc.ctl_leases(host), list)   # the admin socket answers
    assert lc.daemon_pid(host) > 0
