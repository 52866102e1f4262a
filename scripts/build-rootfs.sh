#!/usr/bin/env bash
# Build the root filesystem tarballs for the systemd-nspawn hypervisor hosts
# used by tests/systemd and the Molecule scenarios (testbed/nspawn.py).
#
#   scripts/build-rootfs.sh [SUITE...]      default: bookworm trixie
#
# Each tarball is a Debian minbase with systemd as init, openssh-server,
# python3, libvirt and QEMU baked in (the hosts have no network). Tarballs are
# cached as .cache/rootfs/<suite>-<key>.tar.zst, where <key> is a hash of this
# script (package list, hooks, mirror): a rerun with an unchanged script is
# instant. Set LOCKD_ROOTFS_CACHE to use another cache directory, and
# LOCKD_DEBIAN_MIRROR for another mirror. Prints the tarball paths, one a line,
# on stdout; progress goes to stderr.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${LOCKD_ROOTFS_CACHE:-$ROOT/.cache/rootfs}
MIRROR=${LOCKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}

PACKAGES=(
    systemd-sysv dbus openssh-server python3 iproute2 procps util-linux
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-utils python3-libvirt
    less psmisc lsof
)
# Since Debian 13, virtlockd and libvirt's lockd.so plugin are packages of their
# own (only recommended by the qemu driver, and mmdebstrap skips recommends).
declare -A SUITE_PACKAGES=(
    [bookworm]=""
    [trixie]="libvirt-daemon-lock libvirt-daemon-plugin-lockd"
)
# Timers and gettys that only slow a container down or touch its console.
MASK=(
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer dpkg-db-backup.timer
    logrotate.timer fstrim.timer man-db.timer console-getty.service getty@tty1.service
    systemd-networkd-wait-online.service
)

log() { printf '[build-rootfs] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

case "${1:-}" in -h|--help) usage; exit 0 ;; esac
SUITES=("$@")
((${#SUITES[@]})) || SUITES=(bookworm trixie)

for s in "${SUITES[@]}"; do
    case $s in bookworm|trixie) ;; *) die "unknown suite '$s' (supported: bookworm, trixie)" ;; esac
done

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap builds the rootfs with real uids)"
for tool in mmdebstrap zstd; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh first"
done

# The cache key: this script's own content (it holds the package list, hooks
# and mirror default) plus the mirror actually used.
KEY=$( { cat "${BASH_SOURCE[0]}"; echo "$MIRROR"; } | sha256sum | cut -c1-12)
mkdir -p "$CACHE"

build_one() {
    local suite=$1
    local out="$CACHE/$suite-$KEY.tar.zst"
    if [[ -s $out ]]; then
        log "$suite: cached $(du -h "$out" | cut -f1) $out"
        echo "$out"
        return 0
    fi
    local tmp="$out.tmp.$$"
    local start=$SECONDS
    # shellcheck disable=SC2064
    trap "rm -f '$tmp'" EXIT
    log "$suite: building with mmdebstrap (${#PACKAGES[@]}+ packages + deps; about 30-60 s) ..."
    local include
    local -a pkgs=("${PACKAGES[@]}")
    # shellcheck disable=SC2206
    pkgs+=(${SUITE_PACKAGES[$suite]})
    include=$(IFS=,; echo "${pkgs[*]}")
    # mmdebstrap's own progress lines (I: ...) go to stderr.
    mmdebstrap --variant=minbase --mode=root --format=tar \
        --include="$include" \
        --aptopt='Acquire::Retries "3"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
        --customize-hook="chroot \"\$1\" systemctl mask ${MASK[*]}" \
        --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/machine-id; touch "$1"/etc/machine-id' \
        --customize-hook='mkdir -p "$1"/root/.ssh && chmod 700 "$1"/root/.ssh' \
        --customize-hook='printf "PermitRootLogin prohibit-password\nUseDNS no\n" > "$1"/etc/ssh/sshd_config.d/lockd-test.conf' \
        "$suite" - "$MIRROR" | zstd -q -T0 -3 -o "$tmp"
    mv "$tmp" "$out"
    trap - EXIT
    # Older builds of this suite (other cache keys) are dead weight now.
    local old
    for old in "$CACHE/$suite"-*.tar.zst; do
        [[ $old == "$out" ]] || rm -f "$old" "$old.lock"
    done
    log "$suite: built in $((SECONDS - start)) s, $(du -h "$out" | cut -f1): $out"
    echo "$out"
}

for s in "${SUITES[@]}"; do
    build_one "$s"
done
