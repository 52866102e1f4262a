#!/usr/bin/env bash
# Build the QEMU guest image of the multi-kernel NFS test bed (testbed/nfsbed.py).
#
#   scripts/build-guest-image.sh            build (or reuse) the image, print its directory
#   scripts/build-guest-image.sh --path     print the directory the image has (or will have)
#
# One image serves the NFS server and the hypervisors: Debian 12 with its own
# kernel (linux-image-amd64), systemd, nfs-kernel-server, nfs-common, python3,
# iproute2, openssh-server, libvirt + QEMU; no recommends. Output, cached under
# $LOCKD_GUEST_CACHE (default .cache/guests)/<key>/, where <key> is a hash of
# this script and the mirror (a rerun with an unchanged script is instant):
#   base.raw      ext4 root filesystem (mkfs.ext4 -d), booted read-only through qcow2 overlays
#   vmlinuz, initrd.img   for QEMU's direct kernel boot (a small MODULES=list initramfs)
#   manifest.json         kernel version, sizes, build time
# The build is flock-protected: a second caller waits for the first.
# Progress goes to stderr, the directory to stdout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${LOCKD_GUEST_CACHE:-$ROOT/.cache/guests}
MIRROR=${LOCKD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
IMAGE_SIZE=3G

PACKAGES=(
    systemd-sysv dbus udev kmod initramfs-tools linux-image-amd64
    nfs-kernel-server nfs-common python3 iproute2 openssh-server procps util-linux
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
    psmisc lsof
)
# Units that only cost boot time under TCG emulation (measured: e2scrub_reap
# 51 s, getty-static 26 s, udev-trigger 19 s, run-rpc_pipefs 17 s), or that an
# NFSv4-only, sec=sys test bed does not need (rpcbind, statd, gssd, idmapd:
# numeric ids over sec=sys need no idmapping). libvirt is socket-activated.
MASK=(
    e2scrub_reap.service e2scrub_all.timer getty-static.service getty@tty1.service
    serial-getty@ttyS0.service console-getty.service
    systemd-udev-settle.service systemd-udev-trigger.service
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer logrotate.timer fstrim.timer
    systemd-timesyncd.service systemd-networkd-wait-online.service
    rpcbind.service rpcbind.socket rpc-statd.service rpc-statd-notify.service
    rpc-gssd.service rpc-svcgssd.service nfs-idmapd.service nfs-blkmap.service
    run-rpc_pipefs.mount auth-rpcgss-module.service libvirt-guests.service
)
# Started on demand: nfsd on the server by testbed/nfsbed.py, libvirtd by its socket.
DISABLE=(nfs-server.service libvirtd.service)
# Loaded at boot by systemd-modules-load: udev's coldplug trigger is masked, so
# nothing would load the drivers of the virtio NIC and 9p share. No fstab entry
# for / either (it would wait for dev-vda.device, which udev never announces).
MODULES_LOAD=(virtio_net 9p 9pnet_virtio)
# The initramfs only has to find an ext4 root on virtio-blk.
INITRAMFS_MODULES=(virtio_pci virtio_blk ext4 crc32c_generic)

log() { printf '[build-guest-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

KEY=$( { cat "${BASH_SOURCE[0]}" "$HERE/guest-files/"*; echo "$MIRROR"; } | sha256sum | cut -c1-12)
OUT="$CACHE/$SUITE-$KEY"

case "${1:-}" in
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    --path) echo "$OUT"; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

if [[ -s $OUT/manifest.json ]]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap --mode=root, real uids in the image)"
for tool in mmdebstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh first"
done

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
if ! flock -n 9; then
    log "another build holds $CACHE/.build.lock; waiting for it ..."
    flock 9
fi
if [[ -s $OUT/manifest.json ]]; then
    log "built meanwhile by another process: $OUT"
    echo "$OUT"
    exit 0
fi

start=$SECONDS
WORK="$OUT.tmp.$$"
ROOTFS="$WORK/rootfs"
cleanup() {
    local m
    # mmdebstrap --mode=root can leave pseudo filesystems mounted.
    for m in proc sys dev/pts dev; do
        mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK"

log "building a $SUITE rootfs with mmdebstrap (${#PACKAGES[@]} packages + deps, no recommends; about 2-4 min) ..."
include=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --setup-hook='mkdir -p "$1"/etc/initramfs-tools/conf.d' \
    --setup-hook='printf "MODULES=list\nCOMPRESS=gzip\n" > "$1"/etc/initramfs-tools/conf.d/lockd-guest.conf' \
    --setup-hook="mkdir -p \"\$1\"/etc/initramfs-tools && printf '%s\n' ${INITRAMFS_MODULES[*]} > \"\$1\"/etc/initramfs-tools/modules" \
    --customize-hook="copy-in $HERE/guest-files/lockd-guest-init /usr/local/sbin" \
    --customize-hook="copy-in $HERE/guest-files/lockd-guest-agent /usr/local/sbin" \
    --customize-hook="copy-in $HERE/guest-files/lockd-guest-init.service /etc/systemd/system" \
    --customize-hook="copy-in $HERE/guest-files/lockd-guest-agent.service /etc/systemd/system" \
    --customize-hook='chmod 0755 "$1"/usr/local/sbin/lockd-guest-init "$1"/usr/local/sbin/lockd-guest-agent' \
    --customize-hook='chroot "$1" systemctl enable lockd-guest-init.service lockd-guest-agent.service' \
    --customize-hook="chroot \"\$1\" systemctl mask ${MASK[*]}" \
    --customize-hook="printf '%s\n' ${MODULES_LOAD[*]} > \"\$1\"/etc/modules-load.d/lockd-guest.conf" \
    --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/machine-id; touch "$1"/etc/machine-id' \
    --customize-hook='mkdir -p "$1"/root/.ssh && chmod 700 "$1"/root/.ssh' \
    --customize-hook='printf "PermitRootLogin prohibit-password\nUseDNS no\n" > "$1"/etc/ssh/sshd_config.d/lockd-test.conf' \
    --customize-hook="chroot \"\$1\" systemctl disable ${DISABLE[*]}" \
    --customize-hook=': > "$1"/etc/fstab' \
    --customize-hook='printf "[nfsd]\nvers3=n\nlease-time=15\ngrace-time=15\n" > "$1"/etc/nfs.conf.d/lockd-guest.conf' \
    --customize-hook='mkdir -p "$1"/etc/systemd/journald.conf.d && printf "[Journal]\nStorage=volatile\n" > "$1"/etc/systemd/journald.conf.d/lockd-guest.conf' \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2
for m in proc sys dev/pts dev; do
    mountpoint -q "$ROOTFS/$m" && umount -l "$ROOTFS/$m"
done
log "rootfs ready after $((SECONDS - start)) s: $(du -sh "$ROOTFS" | cut -f1)"

kver=$(ls "$ROOTFS/lib/modules" | sort -V | tail -n1)
[[ -n $kver && -f $ROOTFS/boot/vmlinuz-$kver && -f $ROOTFS/boot/initrd.img-$kver ]] \
    || die "no kernel/initrd in the rootfs (linux-image-amd64 not installed?)"
cp "$ROOTFS/boot/vmlinuz-$kver" "$WORK/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$kver" "$WORK/initrd.img"

log "mkfs.ext4 -d into a $IMAGE_SIZE raw image ..."
truncate -s "$IMAGE_SIZE" "$WORK/base.raw"
mkfs.ext4 -q -F -L lockd-guest -E lazy_itable_init=1,lazy_journal_init=1 -d "$ROOTFS" "$WORK/base.raw"
rm -rf "$ROOTFS"

cat > "$WORK/manifest.json" <<EOF
{"suite": "$SUITE", "key": "$KEY", "kernel": "$kver", "build_seconds": $((SECONDS - start)),
 "initrd_bytes": $(stat -c %s "$WORK/initrd.img"), "image_size": "$IMAGE_SIZE"}
EOF
rm -rf "$OUT"
mv "$WORK" "$OUT"
trap - EXIT
# Older builds (other cache keys) are dead weight, unless a guest still boots from one.
for old in "$CACHE/$SUITE"-*; do
    [[ $old == "$OUT" || $old == *.tmp.* ]] && continue
    fuser -s "$old/base.raw" 2>/dev/null || rm -rf "$old"
done
log "built in $((SECONDS - start)) s (kernel $kver, initrd $(du -h "$OUT/initrd.img" | cut -f1)): $OUT"
echo "$OUT"
