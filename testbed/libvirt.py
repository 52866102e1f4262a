"""Real libvirtd 9.0.0 + QEMU (TCG) with a chosen lock daemon on the default socket.

    env = LibvirtEnv(lock_daemon="py")      # or "c" for Debian's virtlockd
    env.setup()                             # configs, lock daemon, libvirtd -d
    env.define("vm1"); env.start("vm1")
    res = env.start("vm2", check=False)     # res.returncode, res.stderr
    env.teardown()                          # ALWAYS: domains, daemons, configs

Follows shared/notes/real-libvirt.md: libvirt-qemu user/group must exist
(scripts/install-deps.sh), the lock daemon starts before libvirtd, the shared
disk gets QEMU's share-rw through <qemu:override> so that the *lock manager*
(not QEMU's own image locking) refuses the second VM, fixed UUIDs, TCG.

The lock daemon runs with its default paths (/run/libvirt/virtlockd-sock,
/run/libvirt/virtlockd-admin-sock, /run/virtlockd.pid, /etc/libvirt/virtlockd.conf)
in the foreground as our child, so the harness can signal and reap it.
Everything it changes under /etc/libvirt is backed up and restored.

Only one harness may drive the host's libvirt at a time: setup() takes an
exclusive flock on HOST_LOCK (blocking, with a message) and keeps it until
teardown(). Anyone else scripting this host's libvirt should take it too.

`python -m testbed.libvirt demo` runs the two-VMs-one-disk demo.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

HOST_LOCK = "/run/lock/lockd-libvirt-harness.lock"
IMAGES = Path("/var/lib/libvirt/images")
EXTRA = IMAGES / "extra.img"
LEASE_DIR = Path("/var/lib/libvirt/lockd/files")
ETC = Path("/etc/libvirt")
LOCK_SOCK = Path("/run/libvirt/virtlockd-sock")
ADMIN_SOCK = Path("/run/libvirt/virtlockd-admin-sock")
LOCKD_PIDFILE = Path("/run/virtlockd.pid")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
LOG_DIR = Path("/var/log/libvirt")
from testbed import C_VIRTLOCKD
# Our daemon's default state directory (journal): cleared at setup so a
# crashed earlier run cannot leave leases behind for this one.
PY_STATE_DIR = Path("/run/virtlockd")

UUIDS = {
    "vm1": "11111111-1111-4111-8111-111111111111",
    "vm2": "22222222-2222-4222-8222-222222222222",
    "vm3": "33333333-3333-4333-8333-333333333333",
}

QEMU_CONF = """\
# written by testbed/libvirt.py (restored on teardown)
lock_manager = "{lock_manager}"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

LIBVIRTD_CONF = """\
# written by testbed/libvirt.py (restored on teardown)
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:{log}"
"""

MANAGED_FILES = ("qemu.conf", "libvirtd.conf", "virtlockd.conf", "qemu-lockd.conf")


def lease_name(path: str | os.PathLike) -> str:
    """Indirect-mode lease name libvirt computes: sha256 hex of the path string."""
    return hashlib.sha256(str(path).encode()).hexdigest()


def log(msg: str) -> None:
    print(f"[libvirt-harness {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def error_lines(self) -> List[str]:
        return [l for l in self.stderr.splitlines() if l.startswith("error: ")]


class HarnessError(RuntimeError):
    pass


class LibvirtEnv:
    def __init__(self, lock_daemon: str = "py", workdir: Path | None = None, kvm: bool = False,
                 lock_manager: str = "lockd", daemon_argv: Optional[List[str]] = None,
                 lockd_conf: Optional[Dict[str, object]] = None, supervised: bool = False,
                 notify: bool = False):
        """supervised=False: the lock daemon binds the default socket paths itself
        (as `virtlockd` run by hand). supervised=True: the harness binds them and
        socket-activates the daemon like systemd (testbed.daemons.Daemon),
        keeping the sockets across daemon crashes; notify=True adds NOTIFY_SOCKET
        and an emulated systemd fd store."""
        if lock_daemon not in ("py", "c"):
            raise ValueError("lock_daemon must be 'py' or 'c'")
        self.lock_daemon = lock_daemon
        self.kvm = kvm
        self.lock_manager = lock_manager
        self.workdir = Path(workdir or f"/tmp/lockd-libvirt-{os.getpid()}")
        self.backup_dir = self.workdir / "etc-backup"
        self.daemon_argv = daemon_argv
        self.lockd_conf = dict(lockd_conf or {})
        self.lockd_proc: Optional[subprocess.Popen] = None
        self.supervised = supervised
        self.notify = notify
        self.daemon = None   # testbed.daemons.Daemon when supervised
        self.lockd_log = LOG_DIR / "lockd-harness-daemon.log"
        self.libvirtd_log = LOG_DIR / "libvirtd-harness.log"
        self.indirect = False
        self.defined: set[str] = set()
        self.created_files: list[Path] = []
        self._host_lock_fd: Optional[int] = None
        self._backed_up = False
        self._libvirtd_started = False

    # ------------------------------------------------------------ setup
    def setup(self) -> "LibvirtEnv":
        try:
            self._take_host_lock()
            self._check_prereqs()
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._backup_configs()
            self._write_configs()
            self._stop_foreign_daemons()
            self._make_images()
            self.start_lock_daemon(fresh_state=True)
            self.start_libvirtd()
        except BaseException:
            self.teardown()
            raise
        return self

    def _take_host_lock(self) -> None:
        global _HOLDER
        if _HOLDER is not None and _HOLDER is not self:
            raise HarnessError("another LibvirtEnv is active in this process: use shared_env() "
                               "or tear the other one down first")
        Path(HOST_LOCK).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(HOST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another harness holds {HOST_LOCK}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._host_lock_fd = fd
        _HOLDER = self

    def _check_prereqs(self) -> None:
        missing = [p for p in ("/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/qemu-system-x86_64",
                               "/usr/bin/qemu-img", C_VIRTLOCKD) if not os.access(p, os.X_OK)]
        if missing:
            raise HarnessError(f"missing {missing}: run scripts/install-deps.sh")
        for who in (["getent", "passwd", "libvirt-qemu"], ["getent", "group", "libvirt-qemu"]):
            if subprocess.run(who, capture_output=True).returncode != 0:
                raise HarnessError(f"{' '.join(who[1:])} missing: run scripts/install-deps.sh")

    def _backup_configs(self) -> None:
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        for name in MANAGED_FILES:
            src = ETC / name
            marker = self.backup_dir / (name + ".absent")
            if src.exists():
                shutil.copy2(src, self.backup_dir / name)
            else:
                marker.touch()
        self._backed_up = True

    def _restore_configs(self) -> None:
        if not self._backed_up:
            return
        for name in MANAGED_FILES:
            saved = self.backup_dir / name
            if saved.exists():
                shutil.copy2(saved, ETC / name)
            elif (self.backup_dir / (name + ".absent")).exists():
                with contextlib.suppress(FileNotFoundError):
                    (ETC / name).unlink()
        self._backed_up = False

    def _write_configs(self) -> None:
        ETC.mkdir(parents=True, exist_ok=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (ETC / "qemu.conf").write_text(QEMU_CONF.format(lock_manager=self.lock_manager))
        (ETC / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(log=self.libvirtd_log))
        conf = {"log_outputs": f"3:file:{self.lockd_log}"}
        conf.update(self.lockd_conf)
        lines = [f'{k} = {v}' if isinstance(v, int) else f'{k} = "{v}"' for k, v in conf.items()]
        (ETC / "virtlockd.conf").write_text("# written by testbed/libvirt.py\n" + "\n".join(lines) + "\n")
        self._write_lockd_plugin_conf()

    def _write_lockd_plugin_conf(self) -> None:
        path = ETC / "qemu-lockd.conf"
        if self.indirect:
            LEASE_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(f'# written by testbed/libvirt.py\nauto_disk_leases = 1\n'
                            f'file_lockspace_dir = "{LEASE_DIR}"\n')
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _make_images(self) -> None:
        IMAGES.mkdir(parents=True, exist_ok=True)
        for vm in UUIDS:
            img = IMAGES / f"{vm}.qcow2"
            if not img.exists():
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
                self.created_files.append(img)
        if not EXTRA.exists():
            with open(EXTRA, "wb") as f:
                f.truncate(100 << 20)
            self.created_files.append(EXTRA)

    # ------------------------------------------------------------ lock daemon
    def lock_daemon_argv(self) -> List[str]:
        if self.daemon_argv:
            return list(self.daemon_argv)
        if self.lock_daemon == "c":
            return [C_VIRTLOCKD]
        return [sys.executable, "-m", "lockd"]

    def start_lock_daemon(self, fresh_state: bool = False, timeout: float = 20.0) -> int:
        """Start the lock daemon in the foreground with its default paths; returns its pid."""
        if self.lockd_proc is not None and self.lockd_proc.poll() is None:
            raise HarnessError("lock daemon already running")
        if fresh_state and self.lock_daemon == "py" and PY_STATE_DIR.exists():
            shutil.rmtree(PY_STATE_DIR)
        if fresh_state:
            with contextlib.suppress(FileNotFoundError):
                Path("/run/virtlockd-restart-exec.json").unlink()
        if self.supervised:
            return self._start_supervised(timeout)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"}
        argv = self.lock_daemon_argv()
        with open(self.lockd_log, "ab") as logf:
            logf.write(f"==== harness: starting {' '.join(argv)}\n".encode())
            logf.flush()
            self.lockd_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                               env=env, cwd="/", start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.lockd_proc.poll() is not None:
                raise HarnessError(f"lock daemon exited ({self.lockd_proc.returncode}):\n{self.lockd_log_tail()}")
            if self._lock_socket_answers():
                return self.lockd_proc.pid
            time.sleep(0.02)
        raise HarnessError(f"lock daemon not answering on {LOCK_SOCK}:\n{self.lockd_log_tail()}")

    def _start_supervised(self, timeout: float) -> int:
        from testbed.daemons import Daemon
        if self.daemon is None:
            ddir = self.workdir / f"lockd-{self.lock_daemon}"
            if ddir.exists():       # no journal/state from an earlier env in this run
                shutil.rmtree(ddir)
            conf = {"log_outputs": f"3:file:{self.lockd_log}"} if self.lock_daemon == "py" else {}
            conf.update(self.lockd_conf)
            self.daemon = Daemon(self.lock_daemon, self.workdir / f"lockd-{self.lock_daemon}", conf,
                                 argv=self.daemon_argv, sock=LOCK_SOCK, admin_sock=ADMIN_SOCK,
                                 notify=self.notify)
        if self.daemon.alive():
            raise HarnessError("lock daemon already running")
        self.daemon.start(timeout)
        return self.daemon.pid

    def _lock_socket_answers(self) -> bool:
        from testbed.daemons import ping
        try:
            return ping(LOCK_SOCK, timeout=2)
        except OSError:
            return False

    @property
    def lockd_pid(self) -> int:
        if self.supervised:
            if self.daemon is None or not self.daemon.alive():
                raise HarnessError("lock daemon not running")
            return self.daemon.pid
        if self.lockd_proc is None or self.lockd_proc.poll() is not None:
            raise HarnessError("lock daemon not running")
        return self.lockd_proc.pid

    def lock_daemon_alive(self) -> bool:
        if self.supervised:
            return self.daemon is not None and self.daemon.alive()
        return self.lockd_proc is not None and self.lockd_proc.poll() is None

    def signal_lock_daemon(self, sig: int) -> None:
        if self.supervised:
            if self.daemon is not None:
                self.daemon.kill(sig)
            return
        if self.lockd_proc is not None and self.lockd_proc.poll() is None:
            os.kill(self.lockd_proc.pid, sig)

    def wait_lock_daemon_exit(self, timeout: float = 15.0) -> Optional[int]:
        if self.supervised:
            return None if self.daemon is None else self.daemon.wait(timeout)
        if self.lockd_proc is None:
            return None
        try:
            return self.lockd_proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop_lock_daemon(self, timeout: float = 15.0) -> Optional[int]:
        if self.supervised:
            return None if self.daemon is None else self.daemon.stop(timeout)
        if self.lockd_proc is None:
            return None
        if self.lockd_proc.poll() is None:
            self.lockd_proc.terminate()
            if self.wait_lock_daemon_exit(timeout) is None:
                log("lock daemon ignored SIGTERM; SIGKILL")
                self.lockd_proc.kill()
                self.lockd_proc.wait(10)
        return self.lockd_proc.returncode

    def lockd_log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.lockd_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    # ------------------------------------------------------------ libvirtd
    def start_libvirtd(self, timeout: float = 90.0) -> None:
        if _pid_from(LIBVIRTD_PIDFILE):
            raise HarnessError("libvirtd already running")
        t0 = time.monotonic()
        log("starting libvirtd -d (the first start probes QEMU for ~8 s)")
        res = subprocess.run(["libvirtd", "-d"], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise HarnessError(f"libvirtd -d failed: {res.stderr}\n{self.libvirtd_log_tail()}")
        self._libvirtd_started = True
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.virsh("version", check=False, timeout=30).ok:
                log(f"libvirtd ready in {time.monotonic() - t0:.1f} s")
                return
            if not _pid_from(LIBVIRTD_PIDFILE):
                raise HarnessError(f"libvirtd exited:\n{self.libvirtd_log_tail()}")
            time.sleep(0.2)
        raise HarnessError(f"libvirtd not answering after {timeout} s:\n{self.libvirtd_log_tail()}")

    def stop_libvirtd(self, timeout: float = 30.0) -> None:
        pid = _pid_from(LIBVIRTD_PIDFILE)
        if not pid:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                log("libvirtd ignored SIGTERM; SIGKILL")
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        while _alive(pid):
            time.sleep(0.05)

    def restart_libvirtd(self) -> None:
        self.stop_libvirtd()
        self.start_libvirtd()

    def libvirtd_log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.libvirtd_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def set_indirect(self, on: bool) -> None:
        """Switch qemu-lockd.conf between direct and indirect (file_lockspace_dir +
        auto_disk_leases = 1) mode; libvirtd re-reads it only on restart."""
        if on == self.indirect:
            return
        self.indirect = on
        self._write_lockd_plugin_conf()
        self.restart_libvirtd()

    def set_lock_manager(self, name: str) -> None:
        """Rewrite qemu.conf's lock_manager ("lockd" or "nop") and restart libvirtd."""
        if name == self.lock_manager:
            return
        self.lock_manager = name
        (ETC / "qemu.conf").write_text(QEMU_CONF.format(lock_manager=name))
        self.restart_libvirtd()

    def _stop_foreign_daemons(self) -> None:
        """A libvirtd or lock daemon left running (by a crashed run) would use
        stale config and sockets: stop it, loudly."""
        for pidfile, what in ((LIBVIRTD_PIDFILE, "libvirtd"), (LOCKD_PIDFILE, "lock daemon")):
            pid = _pid_from(pidfile)
            if pid:
                log(f"stopping a leftover {what} (pid {pid})")
                _terminate(pid)

    # ------------------------------------------------------------ domains
    def virsh(self, *args: str, check: bool = True, timeout: float = 120) -> Result:
        env = dict(os.environ, LC_ALL="C", LANG="C")
        p = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                           text=True, timeout=timeout, env=env)
        res = Result(p.returncode, p.stdout, p.stderr)
        if check and not res.ok:
            raise HarnessError(f"virsh {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return res

    def domain_xml(self, name: str, disk: str | os.PathLike = EXTRA, mode: str = "rw") -> str:
        """A diskless-OS domain: 64 MiB, qcow2 root, and the shared raw disk.

        mode: "rw" (exclusive lease), "shareable" (shared lease; libvirt sets
        share-rw itself), "readonly" (no lease at all). rw and readonly get
        QEMU's share-rw via <qemu:override> so that QEMU's own image lock does
        not refuse the second VM before the lock manager is asked.
        """
        flag = {"rw": "", "shareable": "<shareable/>", "readonly": "<readonly/>"}[mode]
        override = "" if mode == "shareable" else """
  <qemu:override>
    <qemu:device alias='ua-extra'>
      <qemu:frontend>
        <qemu:property name='share-rw' type='bool' value='true'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>"""
        dtype = "kvm" if self.kvm else "qemu"
        return f"""<domain type='{dtype}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{UUIDS[name]}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{IMAGES / (name + ".qcow2")}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vdb' bus='virtio'/>
      {flag}
      <alias name='ua-extra'/>
    </disk>
    <memballoon model='none'/>
  </devices>{override}
</domain>
"""

    def define(self, name: str, disk: str | os.PathLike = EXTRA, mode: str = "rw") -> None:
        xml = self.workdir / f"{name}.xml"
        xml.write_text(self.domain_xml(name, disk, mode))
        self.virsh("define", str(xml))
        self.defined.add(name)

    def start(self, name: str, check: bool = True) -> Result:
        return self.virsh("start", name, check=check)

    def destroy(self, name: str, check: bool = True) -> Result:
        return self.virsh("destroy", name, check=check)

    def state(self, name: str) -> str:
        return self.virsh("domstate", name, check=False).stdout.strip()

    def running(self, name: str) -> bool:
        return self.state(name) == "running"

    def qemu_pid(self, name: str) -> int:
        pid = _pid_from(Path(f"/run/libvirt/qemu/{name}.pid"))
        if not pid:
            raise HarnessError(f"no QEMU pid for {name}")
        return pid

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 30.0) -> float:
        """Poll `cond` until true; returns seconds waited. Raises on timeout."""
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise HarnessError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.01)
        return time.monotonic() - t0

    def stop_all_domains(self) -> None:
        for name in sorted(self.defined):
            if self.state(name) not in ("shut off", ""):
                self.virsh("destroy", name, check=False)

    # ------------------------------------------------------------ lock inspection
    def locks_on(self, path: str | os.PathLike) -> List[dict]:
        """/proc/locks entries on the file at `path` (by device and inode)."""
        st = os.stat(path)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        out = []
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            # "1: POSIX  ADVISORY  WRITE 1234 fe:00:131 0 0" ("->" lines are waiters)
            if len(f) >= 8 and f[1] != "->" and f[5] == dev:
                out.append({"kind": f[1], "type": f[3], "pid": int(f[4]), "start": f[6], "end": f[7]})
        return out

    def daemon_lock_fds(self, pid: int, path: str | os.PathLike) -> List[str]:
        """`lock:` lines from /proc/<pid>/fdinfo of the daemon's fds open on `path`
        (how an OFD lock, listed with pid -1 in /proc/locks, is tied to a process)."""
        target = os.stat(path)
        lines = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) != (target.st_dev, target.st_ino):
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("lock:"):
                    lines.append(line)
        return lines

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Undo everything, best effort at every step, even after failures."""
        errors = []
        steps = [
            ("destroy domains", self.stop_all_domains),
            ("undefine domains", self._undefine_all),
            ("stop libvirtd", self.stop_libvirtd),
            ("stop lock daemon", self.stop_lock_daemon),
            ("close supervised sockets", self._close_supervised),
            ("restore configs", self._restore_configs),
            ("remove images", self._remove_created),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"{what}: {exc}")
        global _HOLDER
        if self._host_lock_fd is not None:
            os.close(self._host_lock_fd)
            self._host_lock_fd = None
        if _HOLDER is self:
            _HOLDER = None
        if errors:
            log("teardown problems: " + "; ".join(errors))

    def _close_supervised(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None

    def _undefine_all(self) -> None:
        if not _pid_from(LIBVIRTD_PIDFILE):
            return
        for name in sorted(self.defined):
            self.virsh("undefine", name, check=False)
        self.defined.clear()

    def _remove_created(self) -> None:
        for p in self.created_files:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.created_files.clear()
        if LEASE_DIR.exists():
            for f in LEASE_DIR.iterdir():
                f.unlink()

    def __enter__(self) -> "LibvirtEnv":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


_HOLDER: Optional[LibvirtEnv] = None
_SHARED: Optional[LibvirtEnv] = None
_SHARED_KEY: Optional[tuple] = None


def shared_env(**kwargs) -> LibvirtEnv:
    """The process-wide LibvirtEnv with these settings, set up on first use.

    Only one environment can drive the host's libvirt at a time, so asking
    for different settings tears the current one down first. Test suites
    (e2e, reliability) share it this way; `release_shared_env()` at session end.
    """
    global _SHARED, _SHARED_KEY
    key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    if _SHARED is not None and _SHARED_KEY == key:
        return _SHARED
    release_shared_env()
    env = LibvirtEnv(**kwargs)
    env.setup()
    _SHARED, _SHARED_KEY = env, key
    return env


def release_shared_env() -> None:
    global _SHARED, _SHARED_KEY
    if _SHARED is not None:
        env, _SHARED, _SHARED_KEY = _SHARED, None, None
        env.teardown()


def _pid_from(pidfile: Path) -> int:
    try:
        pid = int(pidfile.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0
    return pid if pid > 0 and _alive(pid) else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _terminate(pid: int, timeout: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- demo

def demo(lock_daemon: str = "py") -> int:
    """Two VMs, one disk: prints each step; returns 0 on PASS."""
    step = 0
    failures: list[str] = []

    def say(msg: str) -> None:
        nonlocal step
        step += 1
        print(f"\n[{step}] {msg}", flush=True)

    def check(cond: bool, good: str, bad: str) -> None:
        print(f"    {'ok  ' if cond else 'FAIL'} {good if cond else bad}", flush=True)
        if not cond:
            failures.append(bad)

    who = "lockd (this project's Python virtlockd)" if lock_daemon == "py" else "Debian's C virtlockd"
    print(f"Two VMs, one disk: libvirt {_libvirt_version()} + QEMU (TCG), lock daemon: {who}")
    print(f"Shared disk: {EXTRA} (QEMU share-rw on, so only the lock manager can refuse vm2)")
    env = LibvirtEnv(lock_daemon=lock_daemon)
    try:
        say("Setting up: qemu.conf lock_manager=\"lockd\", lock daemon on /run/libvirt/virtlockd-sock, libvirtd")
        env.setup()
        print(f"    lock daemon pid {env.lockd_pid}: {' '.join(env.lock_daemon_argv())}")
        env.define("vm1")
        env.define("vm2")
        say("virsh start vm1")
        r = env.start("vm1", check=False)
        check(r.ok, "vm1 is running", f"vm1 did not start: {r.stderr.strip()}")
        if r.ok:
            say("Lease held by the lock daemon for vm1")
            for l in env.locks_on(EXTRA):
                print(f"    /proc/locks: {l['kind']} {l['type']} pid {l['pid']} bytes {l['start']}-{l['end']}")
            for line in env.daemon_lock_fds(env.lockd_pid, EXTRA):
                print(f"    /proc/{env.lockd_pid}/fdinfo: {line}")
            if lock_daemon == "py":
                _print_admin_leases()
            say("virsh start vm2 (same disk, read-write): must be refused")
            r2 = env.start("vm2", check=False)
            expected = f"error: resource busy: Lockspace resource '{EXTRA}' is locked"
            for line in r2.stderr.strip().splitlines():
                print(f"    virsh: {line}")
            check(not r2.ok and expected in r2.stderr.splitlines(),
                  "vm2 refused by the lock manager", f"expected {expected!r}")
            say("virsh destroy vm1")
            env.destroy("vm1")
            check(env.state("vm1") == "shut off", "vm1 is shut off", "vm1 still running")
            say("virsh start vm2 again: the disk is free now")
            r3 = env.start("vm2", check=False)
            check(r3.ok, "vm2 is running", f"vm2 did not start: {r3.stderr.strip()}")
    except Exception as exc:  # noqa: BLE001 - the demo reports, it does not trace
        failures.append(str(exc))
        print(f"    FAIL {exc}")
    finally:
        say("Cleaning up: domains, libvirtd, lock daemon, configs")
        env.teardown()
    print()
    if failures:
        print(f"FAIL: {len(failures)} problem(s): " + "; ".join(failures))
        print("Next step: read /var/log/libvirt/lockd-harness-daemon.log and "
              "/var/log/libvirt/libvirtd-harness.log, then run `make test`.")
        return 1
    print("PASS: the lock manager refused the second VM and let it start once the disk was free.")
    print("Next step: `make test` runs the whole suite (differential tests against the C "
          "virtlockd, end to end, reliability).")
    return 0


def _libvirt_version() -> str:
    try:
        out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True).stdout
        return out.split()[-1]
    except (OSError, IndexError):
        return "?"


def _print_admin_leases() -> None:
    try:
        from lockd.adminclient import AdminClient
        with AdminClient(str(ADMIN_SOCK)) as a:
            for lease in a.call("leases")["leases"]:
                owners = ", ".join(f"{o.get('name')} pid {o.get('pid')}" for o in lease.get("owners", []))
                kind = "shared" if lease.get("shared") else "exclusive"
                print(f"    admin socket: lease {lease.get('path') or lease.get('resource')} ({kind}) owned by {owners}")
    except Exception as exc:  # noqa: BLE001 - informative only
        print(f"    (admin query failed: {exc})")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "demo":
        sys.exit(demo(sys.argv[2] if len(sys.argv) > 2 else "py"))
    print("usage: python -m testbed.libvirt demo [py|c]", file=sys.stderr)
    sys.exit(2)
