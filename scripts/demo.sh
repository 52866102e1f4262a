#!/usr/bin/env bash
# Two VMs, one disk, against this project's lock daemon (lockd) with real
# libvirtd + QEMU on this host. Prints each step and ends with PASS/FAIL.
#   scripts/demo.sh          our daemon
#   scripts/demo.sh c        Debian's C virtlockd, for comparison
# Needs root, the apt packages from scripts/install-deps.sh and the venv
# (`make demo` does all of that). Everything it changes is restored at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ ! -x $PY ]]; then
    echo "demo: $PY missing; run 'make demo' (it creates the venv)" >&2
    exit 1
fi
exec "$PY" -m tests.harness.libvirt demo "${1:-py}"
