# SPDX-License-Identifier: GPL-3.0-or-later
"""The one exception that ends start-up."""
from __future__ import annotations


class Fatal(Exception):
    """Start-up cannot continue; the message is for the operator: it says what
    is wrong and what to do next."""
