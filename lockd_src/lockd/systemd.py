# SPDX-License-Identifier: GPL-3.0-or-later
"""systemd integration in plain Python: socket activation, sd_notify, fd store.

Modelled on gunicorn's systemd.py and python-systemd's
``listen_fds_with_names()``; no libsystemd needed.
"""
from __future__ import annotations

import array
import os
import socket
import time
from typing import Dict, Iterable, Optional

SD_LISTEN_FDS_START = 3


def listen_fds_with_names(unset: bool = True) -> Dict[int, str]:
    """``{fd: name}`` passed by systemd (sockets, and fd-store entries)."""
    env = os.environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        n = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    if n <= 0:
        return {}
    parts = names.split(":") if names else []
    out = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out[fd] = parts[i] if i < len(parts) else "unknown"
    return out


class Notifier:
    """``sd_notify(3)``; a no-op when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, address: Optional[str] = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.address = addr or None
        self._sock: Optional[socket.socket] = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        return self._sock

    def notify(self, state: str, fds: Iterable[int] = ()) -> bool:
        if self.address is None:
            return False
        fds = list(fds)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self._socket().sendmsg([state.encode()], anc, 0, self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + ("\nSTATUS=" + status if status else ""))

    def reloading(self) -> bool:
        # systemd >= 253 wants the CLOCK_MONOTONIC time of the reload request
        return self.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify("STATUS=" + text)

    def fdstore(self, fd: int, name: str) -> bool:
        return self.notify("FDSTORE=1\nFDNAME=%s" % name, [fd])

    def fdstore_remove(self, name: str) -> bool:
        return self.notify("FDSTOREREMOVE=1\nFDNAME=%s" % name)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
