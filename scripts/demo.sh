#!/usr/bin/env bash
# The demonstrations. Each prints every step and ends with PASS/FAIL.
#   scripts/demo.sh          the Ansible rollout (scripts/demo_rollout.py): the collection
#                            rolled out to a systemd-nspawn hypervisor, two VMs on one disk,
#                            the lock daemon SIGKILLed in between ([--keep] leaves the host up)
#   scripts/demo.sh local    two VMs, one disk, our daemon with libvirtd + QEMU on this machine
#                            (no Ansible; `py` is the same)
#   scripts/demo.sh c        the same with Debian's C virtlockd, for comparison
# Needs root, the apt packages from scripts/install-deps.sh and the venv
# (`make demo` does all of that). Everything it changes is restored at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
    echo "demo: $PY missing; run 'make demo' (it creates the venv)" >&2
    exit 1
fi
case "${1:-rollout}" in
    rollout) shift $(($# > 0)); exec "$PY" scripts/demo_rollout.py "$@" ;;
    --keep) exec "$PY" scripts/demo_rollout.py "$@" ;;
    local|py) exec "$PY" -m testbed.libvirt demo py ;;
    *) exec "$PY" -m testbed.libvirt demo "$1" ;;
esac
