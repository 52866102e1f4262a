# SPDX-License-Identifier: GPL-3.0-or-later
"""Make `lockd` (lockd_src/) and `testbed` importable when the bench runs
from a checkout without `make venv` having installed the package."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "lockd_src", ROOT):
    if str(p) not in sys.path:
        sys.path.append(str(p))
