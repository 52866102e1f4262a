#!/usr/bin/env bash
# Molecule's `dependency` step of the podman scenario (molecule.yml runs it
# before `create`): make the images that the platforms run, and, in a source
# checkout of the collection, make that checkout importable as lockd.virtlockd.
#
#   dependency.sh PROJECT_DIR EPHEMERAL_DIR SUITE...
#
# Images: localhost/lockd-virtlockd:<suite>, built from ./Containerfile.
# Nothing is ever pulled for them at `create` (a localhost/ name exists only
# here). The Containerfile's base (LOCKD_PODMAN_IMAGE_SOURCE, default auto):
#   rootfs  the cached nspawn rootfs of a checkout of this repository
#           (scripts/build-rootfs.sh), `podman import`ed; the build runs with
#           --network none and needs no registry
#   debian  docker.io/library/debian:<suite> from a registry, packages from
#           Debian's mirror (a CI runner)
#   existing  the images as they are (built earlier, or your own), never rebuilt
#   auto    rootfs when PROJECT_DIR/scripts/build-rootfs.sh exists, else debian
# An image whose labels match its source and Containerfile is kept as is.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PODMAN=${MOLECULE_PODMAN_EXECUTABLE:-podman}
LABEL=org.lockd.virtlockd.molecule

log() { printf '[podman-images] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

(($# >= 3)) || die "usage: dependency.sh PROJECT_DIR EPHEMERAL_DIR SUITE..."
project=$1 ephemeral=$2
shift 2
command -v "$PODMAN" >/dev/null || die "$PODMAN not found (Debian/Ubuntu: apt-get install podman)"

source=${LOCKD_PODMAN_IMAGE_SOURCE:-auto}
if [[ $source == auto ]]; then
    source=debian
    [[ -x $project/scripts/build-rootfs.sh ]] && source=rootfs
fi
case $source in rootfs|debian|existing) ;; *) die "LOCKD_PODMAN_IMAGE_SOURCE=$source: use auto, rootfs, debian or existing" ;; esac

containerfile_key=$(sha256sum "$HERE/Containerfile" | cut -c1-12)

label_of() {  # image label -> value, empty when the image or label is absent
    "$PODMAN" image inspect --format "{{ index .Labels \"$2\" }}" "$1" 2>/dev/null || true
}

build_image() {
    local suite=$1 image=localhost/lockd-virtlockd:$1 origin base tarball start=$SECONDS
    local -a build_args=()
    if [[ $source == existing ]]; then
        "$PODMAN" image exists "$image" || die "$image does not exist (LOCKD_PODMAN_IMAGE_SOURCE=existing)"
        log "$image: as it is ($(label_of "$image" "$LABEL.origin"))"
        return 0
    fi
    if [[ $source == rootfs ]]; then
        # Instant when cached; progress on stderr, the tarball path on stdout.
        tarball=$("$project/scripts/build-rootfs.sh" "$suite" | tail -n1)
        origin=$(basename "$tarball")
    else
        origin=docker.io/library/debian:$suite
    fi
    if [[ $(label_of "$image" "$LABEL.origin") == "$origin" &&
          $(label_of "$image" "$LABEL.containerfile") == "$containerfile_key" ]]; then
        log "$image: up to date ($origin, Containerfile $containerfile_key)"
        return 0
    fi
    if [[ $source == rootfs ]]; then
        base=localhost/lockd-virtlockd-rootfs:$suite
        log "$image: podman import $origin (about 10 s) ..."
        zstd -dc "$tarball" | "$PODMAN" import --quiet --change "LABEL $LABEL=1" - "$base" >/dev/null
        # The rootfs has every package: nothing to fetch, so no network (and no
        # bridge, iptables rule or ip_forward change on this machine).
        build_args=(--network none)
    else
        base=$origin
        log "$image: building FROM $base (packages from Debian's mirror; a few minutes) ..."
    fi
    "$PODMAN" build --quiet "${build_args[@]}" --file "$HERE/Containerfile" \
        --build-arg "SUITE=$suite" --build-arg "BASE=$base" \
        --label "$LABEL=1" --label "$LABEL.origin=$origin" --label "$LABEL.containerfile=$containerfile_key" \
        --tag "$image" "$HERE" >/dev/null
    # The imported base stays only as the image's layer; an older build of
    # this image is now untagged: remove ours, nobody else's.
    if [[ $source == rootfs ]]; then "$PODMAN" untag "$base"; fi
    "$PODMAN" image prune --force --filter "label=$LABEL=1" >/dev/null
    log "$image: built in $((SECONDS - start)) s"
}

link_checkout() {
    # Only a source checkout of this very collection is linked; an installed
    # copy is found on the normal collections path (molecule.yml appends it).
    local galaxy=$project/galaxy.yml
    [[ -f $galaxy ]] || return 0
    grep -qx 'namespace: lockd' "$galaxy" && grep -qx 'name: virtlockd' "$galaxy" || return 0
    mkdir -p "$ephemeral/collections/ansible_collections/lockd"
    ln -sfn "$project" "$ephemeral/collections/ansible_collections/lockd/virtlockd"
    log "collection lockd.virtlockd: this checkout ($project)"
}

# One build at a time on this machine (parallel runs share the image names).
exec 9>"${TMPDIR:-/tmp}/lockd-virtlockd-podman-images.lock"
flock 9
for suite in "$@"; do
    case $suite in bookworm|trixie) build_image "$suite" ;; *) die "unknown suite '$suite' (bookworm, trixie)" ;; esac
done
link_checkout
