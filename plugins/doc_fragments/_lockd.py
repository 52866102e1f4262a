# Copyright (c) 2026, lockd.virtlockd maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""PRIVATE documentation fragments of lockd.virtlockd; not part of the public API."""

from __future__ import annotations


class ModuleDocFragment:

    # Options shared by every module that talks to the admin socket.
    DOCUMENTATION = r"""
options:
  socket:
    description:
      - Path of the lock daemon's admin socket (systemd unit C(virtlockd-admin.socket)).
      - The socket serves root only, so run the module with C(become=true).
    type: path
    default: /run/libvirt/virtlockd-admin-sock
  timeout:
    description:
      - Seconds to wait for the daemon to accept the connection and to answer each request.
    type: float
    default: 30
requirements:
  - A lockd daemon (the lockd.virtlockd.lock_manager role installs it) on the managed host.
  - Python 3.9 or newer on the managed host; no Python packages beyond the standard library.
notes:
  - The modules speak the lockd admin protocol (JSON lines, version 1) documented in the
    collection's C(docs/admin-protocol.md). libvirt never uses the admin socket.
"""

    # The attribute descriptions; each module sets its own support levels.
    ATTRIBUTES = r"""
options: {}
attributes:
  check_mode:
    description: Can run in C(check_mode) and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in C(check_mode)), when in diff mode.
  idempotent:
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
      - This assumes that the system controlled/queried by the module has not changed in a relevant way.
  platform:
    description: Target OS/families that can be operated against.
    support: full
    platforms: posix
"""

    # Attribute support of modules that never change anything.
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
  diff_mode:
    support: N/A
    details:
      - This action does not modify state.
  idempotent:
    support: full
"""
