#!/usr/bin/env bash
# Install the system packages and users the test suite and the demo need, on a
# fresh Debian 12 machine. Idempotent: when everything is already present it
# prints one line and does nothing else (no apt-get update, no network).
#
# Other engineers: append your packages to APT_PACKAGES (one per line, with a
# comment saying which target needs it). Keep this script quiet when done.
set -euo pipefail

APT_PACKAGES=(
    # real libvirt + QEMU (tests/e2e, tests/reliability, make demo); see shared/notes/real-libvirt.md
    libvirt-daemon              # /usr/sbin/virtlockd (the C reference daemon), libvirtd, lockd.so plugin
    libvirt-daemon-driver-qemu
    libvirt-clients             # virsh
    qemu-system-x86
    qemu-utils                  # qemu-img
    python3-libvirt
    # tools the harnesses call
    util-linux                  # unshare, lslocks, mount
    procps                      # ps, pgrep
    psmisc
    iproute2
    strace
    zstd
    openssh-client
    # make bench: compiles bench/standin.c (cheap stand-in QEMU processes for vmstart)
    gcc
    libc6-dev
    # systemd-nspawn hosts (tests/systemd, molecule)
    systemd-container
    mmdebstrap
    # Molecule's podman driver (extensions/molecule/podman). runc, not crun:
    # crun refuses this machine's hybrid cgroup layout; naming runc here makes
    # apt satisfy podman's "crun | runc" with runc.
    runc
    podman
    # actionlint (tests/collection/test_ci_template.py) checks the workflow's run: scripts with it
    shellcheck
)

log() { printf '[install-deps] %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root (apt-get install, useradd)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    log "installing ${#missing[@]} apt package(s): ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    start=$SECONDS
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    log "apt-get install (this takes 10-60 s on a fresh machine)"
    apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${missing[@]}" \
        | grep -E '^(Setting up|Unpacking|E:|W:)' || true
    # grep's status hides apt's: check the result explicitly.
    for pkg in "${missing[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        if [[ $status != "install ok installed" ]]; then
            log "ERROR: package $pkg is not installed after apt-get install" >&2
            exit 1
        fi
    done
    log "apt packages installed in $((SECONDS - start)) s"
fi

# Debian's qemu driver resolves its compiled-in default user/group
# 'libvirt-qemu' before reading qemu.conf; without them libvirtd exits
# (real-libvirt.md §2). libvirt-daemon-system would create them, but we do not
# install it (it drags in polkit, dnsmasq, iptables).
created=()
getent group kvm >/dev/null || { groupadd -r kvm; created+=("group kvm"); }
getent group libvirt-qemu >/dev/null || { groupadd -r libvirt-qemu; created+=("group libvirt-qemu"); }
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    created+=("user libvirt-qemu")
fi
((${#created[@]})) && log "created: ${created[*]}"

if ((${#missing[@]} == 0 && ${#created[@]} == 0)); then
    log "all ${#APT_PACKAGES[@]} apt packages and the libvirt-qemu user are present"
fi
