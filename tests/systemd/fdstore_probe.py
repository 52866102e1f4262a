#!/usr/bin/python3
"""A tiny Type=notify service that keeps one OFD-locked fd in systemd's fd store.

Used by tests/systemd/test_fdstore.py (and to answer docs/notes-systemd-fdstore.md):
on every start it appends one JSON line to /run/fdprobe.log saying which fds
came back through LISTEN_FDS/LISTEN_FDNAMES. When no fd named "lease" came
back, it opens /var/lib/fdprobe/lease, takes an OFD write lock on byte 0 and
hands a copy to the fd store (FDSTORE=1, FDNAME=lease, SCM_RIGHTS). Stdlib only.
"""
import array
import fcntl
import json
import os
import signal
import socket
import struct
import time

LOG = "/run/fdprobe.log"
LEASE = "/var/lib/fdprobe/lease"
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def notify(msg, fds=()):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([msg.encode()], anc, 0, addr)


def main():
    n = int(os.environ.get("LISTEN_FDS", "0")) if os.environ.get("LISTEN_PID") == str(os.getpid()) else 0
    names = os.environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    got = {}
    for i in range(n):
        fd = 3 + i
        got[names[i] if i < len(names) else f"fd{fd}"] = os.readlink(f"/proc/self/fd/{fd}")
    # Drain connections queued on passed listening sockets (the one that
    # triggered socket activation): left pending, systemd would re-activate
    # the service right after a stop.
    for i in range(n):
        try:
            sock = socket.socket(fileno=os.dup(3 + i))
        except OSError:
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            sock.setblocking(False)
            while True:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, OSError):
                    break
                conn.close()
    entry = {"pid": os.getpid(), "time": time.time(), "listen_fds": n, "names": names, "fds": got}
    if "lease" not in got:
        os.makedirs(os.path.dirname(LEASE), exist_ok=True)
        fd = os.open(LEASE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        notify("FDSTORE=1\nFDNAME=lease", [fd])
        entry["stored"] = True
    with open(LOG, "a") as f:
        f.write(json.dumps(entry) + "\n")
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    notify("READY=1\nSTATUS=holding the lease")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
