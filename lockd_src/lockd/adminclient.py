# Copyright (c) 2026, lockd.virtlockd maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Client for the lockd admin protocol (docs/admin-protocol.md), for the modules.

This is a PRIVATE module_utils of lockd.virtlockd: it is not part of the
collection's public API and may change without notice. It must not import the
daemon package ``lockd`` (that package is not installed where modules run), so
it implements the admin protocol a second time, kept honest by the conformance
suite in tests/conformance/.

It also holds the read-only fallback that ``lease_info`` uses when the host
runs libvirt's C virtlockd, which has no lease query: leases are read from
/proc/locks, the daemon's open files and the configured lockspace directories.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import struct


PROTOCOL_VERSION = 1
DEFAULT_ADMIN_SOCKET = "/run/libvirt/virtlockd-admin-sock"
DEFAULT_LOCK_SOCKET = "/run/libvirt/virtlockd-sock"
DEFAULT_QEMU_LOCKD_CONF = "/etc/libvirt/qemu-lockd.conf"
DEFAULT_PID_FILE = "/run/virtlockd.pid"
MAX_LINE = 1048576
LOCKSPACE_DIR_KEYS = ("file_lockspace_dir", "lvm_lockspace_dir", "scsi_lockspace_dir")

NOT_LOCKD_MESSAGE = (
    "the daemon does not speak the lockd admin protocol (is this libvirt's C virtlockd?)"
)


class AdminError(Exception):
    """A failed admin call: ``code`` is stable (kebab-case), ``message`` is for humans.

    Server-side codes are those of docs/admin-protocol.md. Client-side codes:
    ``no-daemon`` (no socket, or nobody listening), ``permission-denied`` (the
    socket refuses us), ``not-lockd`` (EOF before any response line),
    ``timeout``, ``bad-response`` (a line that is not a valid response) and
    ``connection-lost`` (EOF after earlier responses).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AdminClient:
    """One connection to the admin socket; ``call()`` sends one request and waits for its reply.

    Usage: ``AdminClient(path, timeout=30).call("leases", owner_name="vm1") -> dict``.
    The connection is opened on the first call and reused (the protocol answers
    requests in order on one connection).
    """

    def __init__(self, path: str = DEFAULT_ADMIN_SOCKET, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock = None
        self._buf = b""
        self._next_id = 1
        self._answered = 0

    # -- connection -------------------------------------------------------
    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise self._connect_error(exc) from None
        return sock

    def _connect_error(self, exc: OSError) -> AdminError:
        if exc.errno == errno.ENOENT:
            return AdminError(
                "no-daemon",
                f"no admin socket at {self.path}: the lock daemon is not installed or its "
                "admin socket unit is not started (systemctl start virtlockd-admin.socket)",
            )
        if exc.errno == errno.ECONNREFUSED:
            return AdminError(
                "no-daemon",
                f"nothing is listening on {self.path}: the lock daemon is not running "
                "(start virtlockd-admin.socket or the daemon, then retry)",
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return AdminError(
                "permission-denied",
                f"permission denied connecting to {self.path}: the admin socket serves root "
                "only; run as root (become: true)",
            )
        if isinstance(exc, socket.timeout):
            return AdminError("timeout", f"timed out connecting to {self.path}")
        return AdminError("no-daemon", f"cannot connect to {self.path}: {exc}")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
                self._buf = b""

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- framing ----------------------------------------------------------
    def _read_line(self) -> bytes | None:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise AdminError("bad-response", f"response line from {self.path} exceeds {MAX_LINE} bytes")
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise AdminError(
                    "timeout", f"no response from {self.path} within {self.timeout} s"
                ) from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def call(self, op: str, **args) -> dict:
        """Send ``op`` with ``args``; return the ``result`` object or raise AdminError."""
        if self._sock is None:
            self._sock = self._connect()
        req_id = self._next_id
        self._next_id += 1
        request = {"v": PROTOCOL_VERSION, "id": req_id, "op": op, "args": args}
        data = (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The server may have written a refusal (permission-denied) and
            # closed before reading our request; that line is still readable.
            pass
        except socket.timeout:
            self.close()
            raise AdminError("timeout", f"timed out sending to {self.path}") from None
        line = self._read_line()
        if line is None:
            answered = self._answered
            self.close()
            if answered == 0:
                raise AdminError("not-lockd", f"{self.path}: {NOT_LOCKD_MESSAGE}")
            raise AdminError(
                "connection-lost", f"{self.path}: the daemon closed the connection without answering {op!r}"
            )
        self._answered += 1
        try:
            response = json.loads(line.decode("utf-8"))
        except ValueError:
            self.close()
            raise AdminError(
                "bad-response", f"{self.path}: the response is not JSON: {line[:200]!r}"
            ) from None
        if not isinstance(response, dict) or "ok" not in response:
            self.close()
            raise AdminError("bad-response", f"{self.path}: the response is not a response object: {line[:200]!r}")
        if not response["ok"]:
            error = response.get("error") or {}
            code = str(error.get("code", "internal"))
            message = str(error.get("message", "the daemon reported an error without a message"))
            # A refused peer is disconnected; drop the connection so a retry reconnects.
            if code in ("permission-denied", "bad-request"):
                self.close()
            raise AdminError(code, message)
        if response.get("id") not in (req_id, None):
            self.close()
            raise AdminError(
                "bad-response", f"{self.path}: response id {response.get('id')!r} does not match request id {req_id}"
            )
        result = response.get("result")
        if not isinstance(result, dict):
            raise AdminError("bad-response", f"{self.path}: the result of {op!r} is not an object")
        return result


# -- fallback for libvirt's C virtlockd --------------------------------------

_CONF_LINE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$')


def read_lockspace_dirs(conf_path: str = DEFAULT_QEMU_LOCKD_CONF) -> list[str]:
    """The lockspace directories configured in qemu-lockd.conf (missing file: none)."""
    dirs = []
    try:
        with open(conf_path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0]
        match = _CONF_LINE.match(line)
        if not match or match.group(1) not in LOCKSPACE_DIR_KEYS:
            continue
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if value:
            dirs.append(value)
    return dirs


def _parse_proc_locks(text: str) -> list[dict]:
    """Held (not waiting) byte-range locks from /proc/locks."""
    locks = []
    for line in text.splitlines():
        if "->" in line:
            continue  # a blocked waiter, not a holder
        fields = line.split()
        if len(fields) < 8 or fields[1] not in ("POSIX", "OFDLCK"):
            continue
        try:
            major, minor, ino = fields[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            locks.append({
                "kind": fields[1], "mode": fields[3], "pid": int(fields[4]),
                "dev": dev, "ino": int(ino), "start": fields[6], "end": fields[7],
            })
        except ValueError:
            continue
    return locks


def find_c_daemon_pid(pid_file: str = DEFAULT_PID_FILE) -> int | None:
    """The pid of the running virtlockd: from its pid file, else by process name."""
    try:
        with open(pid_file, encoding="ascii") as handle:
            pid = int(handle.read().strip())
        if os.path.exists(f"/proc/{pid}"):
            return pid
    except (OSError, ValueError):
        pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="utf-8") as handle:
                if handle.read().strip() == "virtlockd":
                    return int(entry)
        except OSError:
            continue
    return None


def _lease_key(lockspace_dirs: list[str], path: str) -> tuple[str, str]:
    parent = os.path.dirname(path)
    for directory in lockspace_dirs:
        if os.path.normpath(directory) == os.path.normpath(parent):
            return directory, os.path.basename(path)
    return "", path


F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


def _probe_lock(path: str) -> tuple[str, int | None] | None:
    """Who holds byte 0 of ``path``, without taking anything: (mode, pid) or None.

    Asks with F_OFD_GETLK (our fresh open file description conflicts with every
    other holder, OFD or POSIX, including this process's own POSIX locks), and
    with F_GETLK on kernels without OFD locks. The pid is None when the kernel
    does not name one (an OFD lock, or a holder outside our pid namespace).
    The file is opened read-only, never created, symlinks not followed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        try:
            reply = fcntl.fcntl(fd, F_OFD_GETLK, query)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            reply = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _whence, _start, _len, l_pid = struct.unpack("hhqqi4x", reply)
    except OSError:
        return None
    finally:
        os.close(fd)
    if l_type == fcntl.F_UNLCK:
        return None
    return ("READ" if l_type == fcntl.F_RDLCK else "WRITE"), (l_pid if l_pid > 0 else None)


def probe_lockspace_files(lockspace_dirs, skip: set) -> list[dict]:
    """Files in the lockspace directories whose byte 0 someone holds (read-only probe).

    ``lockspace_dirs`` is a list of directories or of (lockspace key, directory)
    pairs. Files whose (dev, ino) is in ``skip`` are left out; every file found
    is added to ``skip``, so a file reached twice is reported once. Each entry:
    lockspace, resource (file name), path, dev, ino, mode (READ/WRITE), pid.
    """
    found = []
    for item in lockspace_dirs:
        key, directory = item if isinstance(item, tuple) else (item, item)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in skip or not os.path.isfile(path) or os.path.islink(path):
                continue
            holder = _probe_lock(path)
            if holder is None:
                continue
            skip.add((st.st_dev, st.st_ino))
            found.append({
                "lockspace": key, "resource": name, "path": path,
                "dev": st.st_dev, "ino": st.st_ino, "mode": holder[0], "pid": holder[1],
            })
    return found


def proc_locks_leases(lockspace_dirs: list[str], daemon_pid: int | None, exclude: tuple = ()) -> list[dict]:
    """Leases of a daemon without a lease query, read without changing anything.

    1. Byte-0 locks that /proc/locks shows for the daemon pid, named through the
       daemon's open files (/proc/PID/fd): the direct lockspace and lease files.
    2. Files in the lockspace directories whose byte 0 is locked by anyone else
       (F_GETLK), e.g. a lease held by another host on shared storage.
    Owners are unknown: the C daemon keeps them in memory only. Files in
    ``exclude`` (the daemon's pid file, which it also locks) are skipped.
    """
    leases = []
    seen = set()
    for path in exclude:
        try:
            st = os.stat(path)
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    if daemon_pid is not None:
        with open("/proc/locks", encoding="ascii") as handle:
            locks = _parse_proc_locks(handle.read())
        held = {
            (lock["dev"], lock["ino"]): lock for lock in locks
            if lock["pid"] == daemon_pid and lock["start"] == "0" and lock["end"] == "0"
        }
        fd_dir = f"/proc/{daemon_pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key not in held or key in seen:
                continue
            seen.add(key)
            lockspace, resource = _lease_key(lockspace_dirs, target)
            leases.append({
                "lockspace": lockspace, "resource": resource, "path": target,
                "dev": st.st_dev, "ino": st.st_ino, "shared": held[key]["mode"] == "READ",
                "owners": [], "holder": "daemon", "holder_pid": daemon_pid,
            })
    for found in probe_lockspace_files(lockspace_dirs, seen):
        leases.append({
            "lockspace": found["lockspace"], "resource": found["resource"], "path": found["path"],
            "dev": found["dev"], "ino": found["ino"], "shared": found["mode"] == "READ",
            "owners": [], "holder": "other", "holder_pid": found["pid"],
        })
    return leases


def filter_leases(leases: list[dict], lockspace=None, resource=None, path=None) -> list[dict]:
    """Apply the admin protocol's lockspace/resource/path filters to fallback leases."""
    target = None
    if path is not None:
        try:
            st = os.stat(path)
            target = (st.st_dev, st.st_ino)
        except OSError:
            target = None
    result = []
    for lease in leases:
        if lockspace is not None and lease["lockspace"] != lockspace:
            continue
        if resource is not None and lease["resource"] != resource:
            continue
        if path is not None:
            if target is not None:
                if (lease["dev"], lease["ino"]) != target:
                    continue
            elif lease["path"] != path:
                continue
        result.append(lease)
    return result
