"""The test bed: lock daemons, real libvirt + QEMU and systemd hosts, for
tests, benchmarks, the demo and Molecule alike.

Product code outside ``tests/`` (``scripts/``, ``bench/``, Molecule) imports
this package, never the test suite. Nothing here imports pytest.

* ``testbed.daemons``  the C virtlockd or lockd on private, socket-activated sockets
* ``testbed.libvirt``  this machine's real libvirtd + QEMU with a chosen lock daemon
* ``testbed.migration`` run INSIDE a hypervisor host: live migration with the lease byte watched
* ``testbed.nspawn``   systemd-nspawn hosts booting real systemd, reached over ssh
* ``testbed.wire``     raw lock-protocol access, outside ``F_SETLK`` probes, stand-in owners
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C_VIRTLOCKD = "/usr/sbin/virtlockd"
