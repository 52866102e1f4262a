# SPDX-License-Identifier: GPL-3.0-or-later
"""lockd: a Python drop-in for libvirt's virtlockd lock manager daemon."""

__version__ = "0.1.0"
