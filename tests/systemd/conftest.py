"""Fixtures for tests under a real systemd (PID 1) in systemd-nspawn hosts.

One run of two hosts is shared by the whole directory: ``sd12`` (Debian 12,
systemd 252) and ``sd13`` (Debian 13, systemd 257). Booting both takes ~2 s
once the rootfs is cached (scripts/build-rootfs.sh; ~30 s per suite cold).
"""
from __future__ import annotations

import shutil

import pytest

from tests.harness import require, require_root
from testbed.nspawn import Cluster, prepare_rootfs

HOSTS = {"sd12": "bookworm", "sd13": "trixie"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, pytestconfig):
    require_root()
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter"):
        require(shutil.which(tool), f"{tool} (scripts/install-deps.sh: systemd-container, mmdebstrap, util-linux)")
    prepare_rootfs(sorted(set(HOSTS.values())), pytestconfig)
    c = Cluster.create(tmp_path_factory.mktemp("nspawn"), HOSTS)
    try:
        yield c
    finally:
        c.destroy()
