"""Start Debian's C virtlockd or our `lockd` on private sockets.

Used by the differential tests, the reliability suite and the benchmarks:

    with start_daemon("c", tmp_path / "c") as c, start_daemon("py", tmp_path / "py") as py:
        ...  # c.sock, py.sock are private UNIX socket paths

Both daemons get their sockets the way systemd gives them: the harness binds
the two UNIX sockets (lock + admin) itself, puts them at fds 3 and 4 of the
child and sets LISTEN_FDS=2, LISTEN_PID=<child pid>, LISTEN_FDNAMES=
virtlockd.socket:virtlockd-admin.socket. The harness keeps the listening
sockets open for the Daemon's whole life, like systemd does, so a daemon that
is killed and restarted (`Daemon.restart()`) is handed the same sockets and
clients connecting during the gap queue in the backlog instead of failing.

The C daemon runs inside `unshare --mount` with a fresh tmpfs on /run: a
privileged virtlockd reads *and unlinks* /run/virtlockd-restart-exec.json at
start and would otherwise touch the host's /run (shared/notes/real-libvirt.md
§8). unshare (without --fork) and sh both exec in place, so the pid that
finally runs virtlockd is the pid we forked, which is what LISTEN_PID must be.

Owner-pid trap (spec §4.6): when a connection whose peer pid equals its
registered owner pid closes while that owner holds leases, the daemon
SIGTERMs/SIGKILLs that pid. Register fake pids (see `fake_pid()`) or a
stand-in child you own (`stand_in_owner()`), never the test process.
"""
from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from testbed import C_VIRTLOCKD
FDNAMES = "virtlockd.socket:virtlockd-admin.socket"
SD_LISTEN_FDS_START = 3

# Keepalive PING (spec §2.9): prog "keep", vers 1, proc 1 (PING), type MESSAGE,
# serial 0, status OK. The harness only needs this one frame to know that a
# daemon is serving; it is built from the spec's test vector rather than from
# lockd.rpc so that the harness can start the C daemon even when our package is
# broken.
_PING = bytes.fromhex("0000001c" "6b656570" "00000001" "00000001" "00000002" "00000000" "00000000")
_PONG = bytes.fromhex("0000001c" "6b656570" "00000001" "00000002" "00000002" "00000000" "00000000")

_LIVE: "dict[int, Daemon]" = {}


class DaemonError(RuntimeError):
    pass


def fake_pid() -> int:
    """A pid that no process can have (above kernel.pid_max): safe to REGISTER."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    # pid_max is at most 2**22; stay well inside u32.
    fake_pid.counter = getattr(fake_pid, "counter", 0) + 1  # type: ignore[attr-defined]
    return pid_max + 1000 + fake_pid.counter  # type: ignore[attr-defined]


def stand_in_owner() -> subprocess.Popen:
    """A process we own that a daemon may kill (register its pid as the owner)."""
    return subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def format_conf(conf: Mapping[str, object]) -> str:
    """Render a dict in libvirt's virConf syntax."""
    lines = []
    for key, value in conf.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int):
            lines.append(f"{key} = {value}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, (list, tuple)):
            items = ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value)
            lines.append(f"{key} = [ {items} ]")
        else:
            raise TypeError(f"cannot render {key}={value!r} in virConf syntax")
    return "".join(line + "\n" for line in lines) or "# (defaults)\n"


def _bind_unix(path: Path, backlog: int = 1024) -> socket.socket:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o600)
    s.listen(backlog)
    return s


def ping(path: str | os.PathLike, timeout: float = 5.0) -> bool:
    """True when the daemon at `path` answers a keepalive PING with a PONG."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(_PING)
        buf = b""
        while len(buf) < len(_PONG):
            chunk = s.recv(len(_PONG) - len(buf))
            if not chunk:
                return False
            buf += chunk
        return buf == _PONG


class NotifyEmulator:
    """The part of systemd's sd_notify protocol a lock daemon uses, for tests
    that run without systemd as PID 1 (the real thing is tested on nspawn
    hosts, tests/systemd): READY=1 / RELOADING=1 / STOPPING=1 are counted,
    and the file-descriptor store is kept like systemd keeps it -
    FDSTORE=1 + FDNAME= adds the passed fds, FDSTOREREMOVE=1 + FDNAME= drops
    them, and every (re)start of the service gets the stored fds back after
    its sockets, named in LISTEN_FDNAMES. The store lives as long as this
    object, i.e. across daemon crashes and restarts (like a unit with
    Restart=, FileDescriptorStoreMax=).
    """

    def __init__(self, path: Path, keep_fds: bool = True):
        self.keep_fds = keep_fds   # False: a unit with FileDescriptorStoreMax=0 (fds dropped)
        self.path = Path(path)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.store: "list[tuple[str, int]]" = []
        self.messages: "list[str]" = []
        self.counts: "dict[str, int]" = {}
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sd-notify-emulator", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        fdsize = array.array("i").itemsize
        while True:
            try:
                msg, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(253 * fdsize))
            except OSError:
                return
            fds: list = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(data[:len(data) - (len(data) % fdsize)])
                    fds.extend(a)
            text = msg.decode(errors="replace")
            fields = dict(l.split("=", 1) for l in text.split("\n") if "=" in l)
            with self._cv:
                self.messages.append(text)
                for key in ("READY", "RELOADING", "STOPPING"):
                    if fields.get(key) == "1":
                        self.counts[key] = self.counts.get(key, 0) + 1
                if fields.get("FDSTORE") == "1" and fds and self.keep_fds:
                    name = fields.get("FDNAME", "stored")
                    self.store.extend((name, fd) for fd in fds)
                    fds = []
                elif fields.get("FDSTOREREMOVE") == "1":
                    name = fields.get("FDNAME")
                    for entry in [e for e in self.store if e[0] == name]:
                        self.store.remove(entry)
                        os.close(entry[1])
                self._cv.notify_all()
            for fd in fds:      # fds without FDSTORE=1 are closed, like systemd does
                os.close(fd)

    def count(self, key: str) -> int:
        with self._cv:
            return self.counts.get(key, 0)

    def wait_count(self, key: str, n: int, timeout: float = 30.0) -> bool:
        """Wait until `key`=1 has been received at least `n` times."""
        with self._cv:
            return self._cv.wait_for(lambda: self.counts.get(key, 0) >= n, timeout)

    def stored(self) -> "list[tuple[str, int]]":
        with self._cv:
            return list(self.store)

    def close(self) -> None:
        self.sock.close()
        with self._cv:
            for _name, fd in self.store:
                os.close(fd)
            self.store.clear()


class Daemon:
    """One lock daemon process (C or ours) on private sockets in `workdir`."""

    def __init__(self, kind: str, workdir: Path, conf: Optional[Mapping[str, object]] = None,
                 env: Optional[Mapping[str, str]] = None, argv: Optional[Sequence[str]] = None,
                 sock: Optional[Path] = None, admin_sock: Optional[Path] = None,
                 notify: bool = False, fdstore: bool = True):
        if kind not in ("c", "py"):
            raise ValueError(f"kind must be 'c' or 'py', not {kind!r}")
        self.kind = kind
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Socket paths default to private ones in workdir; the libvirt harness
        # passes the real /run/libvirt paths (the daemon never binds them itself).
        self.sock = Path(sock) if sock else self.workdir / "virtlockd-sock"
        self.admin_sock = Path(admin_sock) if admin_sock else self.workdir / "virtlockd-admin-sock"
        self.conf_path = self.workdir / "virtlockd.conf"
        self.pidfile = self.workdir / "virtlockd.pid"
        self.log_path = self.workdir / "daemon.log"
        self.state_dir = self.workdir / "state"
        self.pid: int = -1
        self.starts = 0
        self.exit_status: Optional[int] = None
        self._extra_env = dict(env or {})
        self._argv_override = list(argv) if argv else None

        full_conf: dict[str, object] = {}
        if kind == "py":
            # Ours keeps its journal/state here; the C daemon ignores unknown keys
            # anyway, but only ours gets the key so the two configs stay honest.
            self.state_dir.mkdir(exist_ok=True)
            full_conf["state_dir"] = str(self.state_dir)
        full_conf.update(conf or {})
        self.conf = full_conf
        self.conf_path.write_text(format_conf(full_conf))

        self.sock.parent.mkdir(parents=True, exist_ok=True)
        self._lock_listener = _bind_unix(self.sock)
        self._admin_listener = _bind_unix(self.admin_sock)
        # notify=True: NOTIFY_SOCKET + an emulated fd store (see NotifyEmulator)
        self.notify: Optional[NotifyEmulator] = (
            NotifyEmulator(self.workdir / "notify.sock", keep_fds=fdstore) if notify else None)

    # -- life cycle -------------------------------------------------------
    def argv(self) -> list[str]:
        if self._argv_override:
            base = list(self._argv_override)
        elif self.kind == "c":
            # unshare and sh exec in place: the pid stays the forked child's pid.
            base = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs -o mode=0755 tmpfs /run && exec "$0" "$@"', C_VIRTLOCKD]
        else:
            base = [sys.executable, "-m", "lockd"]
        return base + ["-f", str(self.conf_path), "-p", str(self.pidfile)]

    def _child_env(self, pid: int, names: Sequence[str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"}
        env.update(self._extra_env)
        env["LISTEN_FDS"] = str(len(names))
        env["LISTEN_PID"] = str(pid)
        env["LISTEN_FDNAMES"] = ":".join(names)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        return env

    def spawn(self) -> None:
        """Fork + exec the daemon with the harness's listening sockets at fds 3, 4."""
        argv = self.argv()
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(log_fd, f"==== harness: start #{self.starts + 1}: {' '.join(argv)}\n".encode())
        passed = [(FDNAMES.split(":")[0], self._lock_listener.fileno()),
                  (FDNAMES.split(":")[1], self._admin_listener.fileno())]
        if self.notify is not None:
            passed += self.notify.stored()
        names = [n for n, _ in passed]
        # Prepare everything before fork(); the child only does async-signal-safe work.
        null_fd = os.open(os.devnull, os.O_RDONLY)
        high = max([fd for _, fd in passed] + [log_fd, null_fd]) + len(passed) + 3
        pid = os.fork()
        if pid == 0:  # child
            try:
                env = self._child_env(os.getpid(), names)
                # Move the fds above every target first so dup2 onto 3.. cannot clobber them.
                moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, high) for _, fd in passed]
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                for i, fd in enumerate(moved):
                    os.dup2(fd, SD_LISTEN_FDS_START + i)   # dup2 makes it inheritable
                os.closerange(SD_LISTEN_FDS_START + len(moved), 65536)
                os.chdir(self.workdir)  # relative resource names resolve here, not in the repo
                os.setsid()  # own process group: signals to the test runner don't reach it
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:  # noqa: BLE001 - we are a forked child
                try:
                    os.write(2, f"harness: exec {argv[0]} failed: {exc}\n".encode())
                finally:
                    os._exit(127)
        os.close(log_fd)
        os.close(null_fd)
        self.pid = pid
        self.exit_status = None
        self.starts += 1
        _LIVE[pid] = self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Return once the daemon answers a keepalive PING with a PONG.

        The harness owns the listening socket, so connect() succeeds even before
        the daemon runs (the connection waits in the backlog); the PING is sent
        at once and the reply is awaited in short slices while checking that the
        process is still alive, so a daemon that dies at start fails fast.
        """
        deadline = time.monotonic() + timeout
        buf = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(_PING)
            s.settimeout(0.05)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise DaemonError(f"{self.kind} daemon exited with status {self.exit_status} "
                                      f"before serving:\n{self.log_tail()}")
                try:
                    chunk = s.recv(len(_PONG) - len(buf))
                except socket.timeout:
                    continue
                if not chunk:
                    raise DaemonError(f"{self.kind} daemon closed the PING connection without "
                                      f"a PONG (got {buf.hex()}):\n{self.log_tail()}")
                buf += chunk
                if len(buf) == len(_PONG):
                    if buf != _PONG:
                        raise DaemonError(f"{self.kind} daemon answered PING with {buf.hex()}")
                    return
        self.kill(signal.SIGKILL)
        self.wait(5)
        raise DaemonError(f"{self.kind} daemon did not answer PING within {timeout} s:\n"
                          f"{self.log_tail()}")

    def start(self, timeout: float = 20.0) -> "Daemon":
        self.spawn()
        self.wait_ready(timeout)
        if self.notify is not None:
            # Both daemons send READY=1 once per start; wait for it so callers
            # can count later READYs (re-exec) without racing this one.
            if not self.notify.wait_count("READY", self.starts, timeout):
                raise DaemonError(f"{self.kind} daemon serves but sent no READY=1:\n{self.log_tail()}")
        return self

    def restart(self, timeout: float = 20.0) -> "Daemon":
        """Start a fresh process on the same sockets (after it died or was stopped)."""
        if self.alive():
            raise DaemonError(f"{self.kind} daemon pid {self.pid} is still running")
        return self.start(timeout)

    def alive(self) -> bool:
        if self.pid <= 0 or self.exit_status is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.exit_status = -1
            return False
        if pid == 0:
            return True
        self._reaped(status)
        return False

    def _reaped(self, status: int) -> None:
        self.exit_status = os.waitstatus_to_exitcode(status)
        _LIVE.pop(self.pid, None)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait for the process to exit; returns its exit code (negative = signal) or None."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)
        return self.exit_status

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.pid > 0 and self.exit_status is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout` s. Returns the exit code."""
        if not self.alive():
            return self.exit_status
        self.kill(signal.SIGTERM)
        if self.wait(timeout) is None:
            self.kill(signal.SIGKILL)
            self.wait(10)
        return self.exit_status

    def close(self) -> None:
        """Stop the daemon and release the listening sockets."""
        try:
            self.stop()
        finally:
            for s in (self._lock_listener, self._admin_listener):
                s.close()
            if self.notify is not None:
                self.notify.close()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inspection -------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def cpu_seconds(self) -> float:
        """utime + stime of the daemon process (for benchmarks)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise DaemonError("VmRSS not found")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.sock))
        return s

    def __repr__(self) -> str:
        return f"<Daemon {self.kind} pid={self.pid} sock={self.sock}>"


def start_daemon(kind: str, workdir: Path, conf: Optional[Mapping[str, object]] = None,
                 env: Optional[Mapping[str, str]] = None, timeout: float = 20.0,
                 argv: Optional[Sequence[str]] = None, sock: Optional[Path] = None,
                 admin_sock: Optional[Path] = None, notify: bool = False,
                 fdstore: bool = True) -> Daemon:
    """Start a C ('c') or Python ('py') lock daemon on private sockets in `workdir`
    and return it once it answers a keepalive PING. Use as a context manager.

    notify=True also gives it NOTIFY_SOCKET and an emulated systemd fd store
    (NotifyEmulator) that survives daemon crashes and restarts; fdstore=False
    keeps NOTIFY_SOCKET (READY=1 counting) but drops stored fds."""
    d = Daemon(kind, workdir, conf, env, argv, sock, admin_sock, notify, fdstore)
    try:
        return d.start(timeout)
    except BaseException:
        d.close()
        raise


def kill_all_leftovers() -> list[int]:
    """SIGKILL every daemon this process started and has not reaped (session teardown)."""
    killed = []
    for pid, d in list(_LIVE.items()):
        if d.alive():
            d.kill(signal.SIGKILL)
            d.wait(10)
            killed.append(pid)
    return killed
