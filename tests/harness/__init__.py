"""pytest-side helpers of the suite (the test bed itself is the top-level
package ``testbed``).

`require()` is how a test states a prerequisite. Locally a missing
prerequisite skips (visibly, with -ra); in CI (CI=true) it FAILS, because
a skipped test there would hide a feature that `make test` must prove.
"""
from __future__ import annotations

import os
import shutil

import pytest

from testbed import C_VIRTLOCKD, REPO  # noqa: F401  (re-exported for the tests)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: object, why: str) -> None:
    """Skip locally, fail in CI, when a test prerequisite is missing."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {why} (run scripts/install-deps.sh)", pytrace=False)
    pytest.skip(f"prerequisite missing: {why}")


def require_root() -> None:
    require(os.geteuid() == 0, "must run as root")


def require_c_virtlockd() -> None:
    require(os.access(C_VIRTLOCKD, os.X_OK), f"{C_VIRTLOCKD} (apt package libvirt-daemon)")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    require(path, f"{name} (apt package {package})")
    return path  # type: ignore[return-value]
