"""Real systemd hosts for tests: systemd-nspawn containers booting systemd.

One module serves both the Molecule create/destroy playbooks (through the CLI
below) and pytest's ``tests/systemd/`` (through :class:`Cluster`). What works
on these machines, and why each flag is here, is recorded in
``shared/notes/systemd-hosts.md``:

* rootfs: ``scripts/build-rootfs.sh`` builds a cached ``.tar.zst`` per suite;
  it is unpacked once into a read-only base directory, and every host boots
  from an overlayfs over that base (its own upper layer, ~9 MiB);
* ``systemd-nspawn --boot --keep-unit --register=no`` (no machined here), with
  ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` (cgroup2 without controllers, so
  Debian's stock qemu.conf starts VMs);
* network: a private bridge per run with a /24 of ``10.213.0.0/16`` that no
  interface on the machine uses; hosts get static addresses through a
  systemd-networkd file written into the overlay; no gateway, so nothing
  leaves the machine;
* ssh: a per-run ed25519 key installed as root's ``authorized_keys``;
* ``/dev/kvm``: a container-local device node via tmpfiles, only when the
  machine has ``/dev/kvm`` (never bind the machine's node and chmod it);
* commands run inside through ``nsenter`` on the container's PID 1.

The state of a run (hosts, pids, addresses, mounts, bridge) is written to
``<run_dir>/state.json`` so that another process can destroy it, and the run is
registered under ``/run/lockd-nspawn/`` so ``destroy --all`` finds runs whose
owner died.

CLI::

    python -m testbed.nspawn create RUN_DIR hv1:bookworm hv2:trixie [--share /var/lib/libvirt/images ...]
    python -m testbed.nspawn exec RUN_DIR hv1 -- systemctl status virtlockd.socket
    python -m testbed.nspawn destroy RUN_DIR        (or: destroy --all)
    python -m testbed.nspawn list
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_ROOTFS = ROOT / "scripts" / "build-rootfs.sh"
CACHE = Path(os.environ.get("LOCKD_ROOTFS_CACHE", ROOT / ".cache" / "rootfs"))
REGISTRY = Path("/run/lockd-nspawn")
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
SUITES = ("bookworm", "trixie")
BOOT_TIMEOUT = 90.0
POWEROFF_TIMEOUT = 20.0
# The capability cache libvirtd writes on its first start; seeding it into
# later hosts cuts libvirtd's start from ~1.4 s to ~0.07 s.
QEMU_CAPS_DIR = "var/cache/libvirt/qemu/capabilities"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NspawnError(RuntimeError):
    """A host could not be created, reached or destroyed."""


def log(msg: str) -> None:
    print(f"[nspawn] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    proc = subprocess.run(cmd, **kw)
    if check and proc.returncode != 0:
        raise NspawnError(
            f"command failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
            f"{(proc.stderr or '').strip()}"
        )
    return proc


# ---------------------------------------------------------------- rootfs


def rootfs_tarball(suite: str) -> Path:
    """Path of the cached rootfs tarball for *suite*, building it if needed."""
    if suite not in SUITES:
        raise NspawnError(f"unknown suite {suite!r}; supported: {', '.join(SUITES)}")
    # build-rootfs.sh is instant when the tarball is cached; its progress goes
    # to our stderr, the path to stdout.
    proc = subprocess.run(
        [str(BUILD_ROOTFS), suite], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise NspawnError(f"scripts/build-rootfs.sh {suite} failed (exit {proc.returncode}); see its output above")
    return Path(proc.stdout.strip().splitlines()[-1])


def rootfs_base(suite: str) -> Path:
    """The unpacked, read-only base directory for *suite* (unpacked once)."""
    tarball = rootfs_tarball(suite)
    base = tarball.with_name(tarball.name.replace(".tar.zst", ".base"))
    if (base / "usr" / "lib" / "systemd" / "systemd").exists():
        return base
    lock = tarball.with_name(tarball.name + ".lock")
    with open(lock, "w") as lf:
        fcntl.flock(lf, fcntl.LOCK_EX)
        if (base / "usr" / "lib" / "systemd" / "systemd").exists():
            return base
        tmp = base.with_name(base.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"unpacking {tarball.name} into {base} ...")
        t0 = time.monotonic()
        _run(["tar", "-C", str(tmp), "-I", "zstd", "--xattrs", "--xattrs-include=*",
              "--numeric-owner", "-xpf", str(tarball)])
        # Remove older bases of the same suite (stale cache keys).
        # (not while a running host still boots from it)
        mounts = Path("/proc/mounts").read_text()
        for old in tarball.parent.glob(f"{suite}-*.base"):
            if old != base and f"lowerdir={old}," not in mounts:
                shutil.rmtree(old, ignore_errors=True)
        tmp.rename(base)
        log(f"unpacked in {time.monotonic() - t0:.1f} s")
    return base


def prepare_rootfs(suites=SUITES, pytestconfig=None) -> None:
    """Build/unpack the rootfs bases now, with the build's progress on the terminal.

    Under pytest, pass ``pytestconfig``: output capture is suspended meanwhile, so
    a cold build (~30-50 s per suite) shows its progress instead of looking hung.
    """
    capman = pytestconfig.pluginmanager.getplugin("capturemanager") if pytestconfig else None
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:
        for suite in suites:
            rootfs_base(suite)


def _caps_cache(base: str | Path) -> Path:
    # Keyed like the rootfs: a rebuilt rootfs (other QEMU) starts a fresh cache.
    return Path(str(base).removesuffix(".base") + ".qemu-caps")


# ---------------------------------------------------------------- state


@dataclass
class Host:
    name: str
    suite: str
    address: str
    machine: str
    dir: str
    nspawn_pid: int = 0
    leader_pid: int = 0
    started: float = 0.0
    cgroup: str = ""
    base: str = ""

    @property
    def root(self) -> Path:
        return Path(self.dir) / "root"


@dataclass
class Run:
    run_dir: str
    run_id: str
    bridge: str
    subnet: str
    gateway: str
    key: str
    shares: dict = field(default_factory=dict)  # container path -> machine dir
    hosts: dict = field(default_factory=dict)  # name -> Host
    kvm: bool = False

    @property
    def state_file(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        data = asdict(self)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, run_dir: str | Path) -> "Run":
        path = Path(run_dir) / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NspawnError(f"no nspawn run in {run_dir} (missing {path})") from None
        hosts = {k: Host(**v) for k, v in data.pop("hosts").items()}
        return cls(hosts=hosts, **data)


# ---------------------------------------------------------------- helpers


def _pick_subnet() -> ipaddress.IPv4Network:
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    routes = _run(["ip", "-o", "-4", "route", "show"]).stdout
    for line in routes.splitlines():
        with contextlib.suppress(ValueError):
            used.add(ipaddress.ip_network(line.split()[0], strict=False))
    for net in SUBNET_POOL.subnets(new_prefix=24):
        if net.network_address.packed[2] == 0:
            continue
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NspawnError(f"no free /24 left in {SUBNET_POOL} (leftover bridges? run: python -m testbed.nspawn destroy --all)")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(x) for x in path.read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _pidns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _find_leader(nspawn_pid: int) -> int:
    """The container's PID 1: nspawn's child whose comm is ``systemd`` in another pid ns."""
    mine = _pidns(nspawn_pid)
    for child in _children(nspawn_pid):
        if _comm(child) == "systemd" and _pidns(child) not in ("", mine):
            return child
    return 0


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _cgroup2_mount() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[sep + 1] == "cgroup2":
                return parts[4]
    raise NspawnError("no cgroup2 hierarchy mounted; systemd-nspawn needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def _host_cgroup(machine: str) -> str:
    """A fresh cgroup2 directory for one host, beside our own cgroup.

    Without it every container started from the same cgroup shares one
    ``<cgroup>/payload`` tree: two hosts' systemd then manage the same
    ``system.slice/*.service`` cgroups (``systemctl kill`` fails with EIO, and
    one host sees the other's processes).
    """
    own = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    parent = Path(_cgroup2_mount() + own.rstrip("/"))
    path = parent / f"lockd-nspawn-{machine}"
    path.mkdir(exist_ok=True)
    return str(path)


def _remove_cgroup(path: str) -> None:
    if not path or not os.path.isdir(path):
        return
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _ssh_banner(address: str, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


# ---------------------------------------------------------------- cluster


class Cluster:
    """A set of named nspawn hosts sharing one bridge (one "run").

    >>> c = Cluster.create("/tmp/run1", {"hv1": "bookworm"})
    >>> c.exec("hv1", "systemctl is-system-running").stdout
    >>> c.destroy()
    """

    def __init__(self, run: Run):
        self.run = run
        self._popen: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        hosts: dict[str, str],
        shares: list[str] | tuple[str, ...] = (),
        key: str | Path | None = None,
    ) -> "Cluster":
        """Boot *hosts* (name -> suite) and wait until systemd runs and sshd answers.

        *shares*: container paths (e.g. ``/var/lib/libvirt/images``) bind-mounted
        from one machine directory into every host. On any failure everything
        already made is torn down again before the error is raised.
        """
        if os.geteuid() != 0:
            raise NspawnError("systemd-nspawn hosts need root")
        for name in hosts:
            if not name.replace("-", "").isalnum() or len(name) > 8:
                raise NspawnError(f"host name {name!r}: use up to 8 letters, digits or '-'")
        for tool in ("systemd-nspawn", "nsenter", "ssh-keygen", "ip"):
            if not shutil.which(tool):
                raise NspawnError(f"{tool} not found; run scripts/install-deps.sh")
        run_dir = Path(run_dir).resolve()
        if (run_dir / "state.json").exists():
            raise NspawnError(f"{run_dir} already holds a run; destroy it first")
        bases = {suite: rootfs_base(suite) for suite in set(hosts.values())}
        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = os.urandom(2).hex()
        REGISTRY.mkdir(parents=True, exist_ok=True)
        # Serialize subnet choice + bridge creation between concurrent creates.
        netlock = open(REGISTRY / ".network.lock", "w")
        fcntl.flock(netlock, fcntl.LOCK_EX)
        subnet = _pick_subnet()
        addrs = list(subnet.hosts())
        keyfile = Path(key) if key else run_dir / "id_ed25519"
        run = Run(
            run_dir=str(run_dir),
            run_id=run_id,
            bridge=f"lkd{run_id}",
            subnet=str(subnet),
            gateway=str(addrs[0]),
            key=str(keyfile),
            kvm=os.path.exists("/dev/kvm"),
        )
        for i, (name, suite) in enumerate(hosts.items()):
            run.hosts[name] = Host(
                name=name, suite=suite, address=str(addrs[10 + i]),
                machine=f"l{run_id}-{name}", dir=str(run_dir / "hosts" / name),
            )
        for path in shares:
            run.shares[path] = str(run_dir / "shared" / path.strip("/").replace("/", "_"))
        run.save()
        reg = REGISTRY / run_id
        with contextlib.suppress(FileNotFoundError):
            reg.unlink()
        reg.symlink_to(run_dir)
        self = cls(run)
        try:
            try:
                self._setup_network()
            finally:
                netlock.close()
            if not keyfile.exists():
                keyfile.parent.mkdir(parents=True, exist_ok=True)
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lockd-nspawn-{run_id}", "-f", str(keyfile)])
            for d in run.shares.values():
                Path(d).mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            for host in run.hosts.values():
                self._boot(host, bases[host.suite])
            run.save()
            for host in run.hosts.values():
                self._wait_ready(host)
            log(f"{len(run.hosts)} host(s) up in {time.monotonic() - t0:.1f} s: "
                + ", ".join(f"{h.name}={h.address} ({h.suite})" for h in run.hosts.values()))
        except BaseException:
            log("create failed; tearing down what was made")
            with contextlib.suppress(Exception):
                self.destroy()
            raise
        return self

    @classmethod
    def load(cls, run_dir: str | Path) -> "Cluster":
        return cls(Run.load(run_dir))

    def _setup_network(self) -> None:
        br = self.run.bridge
        prefix = ipaddress.ip_network(self.run.subnet).prefixlen
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "addr", "replace", f"{self.run.gateway}/{prefix}", "dev", br])
        _run(["ip", "link", "set", br, "up"])

    def _boot(self, host: Host, base: Path) -> None:
        d = Path(host.dir)
        for sub in ("upper", "work", "root"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "overlay", f"overlay-{host.machine}", "-o",
              f"lowerdir={base},upperdir={d / 'upper'},workdir={d / 'work'}", str(host.root)])
        root = host.root
        prefix = ipaddress.ip_network(self.run.subnet).prefixlen
        (root / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
        (root / "etc/systemd/network/80-container-host0.network").write_text(
            "[Match]\nVirtualization=container\nName=host0\n\n"
            f"[Network]\nAddress={host.address}/{prefix}\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )
        hosts_lines = "".join(f"{h.address} {h.name}\n" for h in self.run.hosts.values())
        (root / "etc/hosts").write_text(
            f"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n{hosts_lines}"
        )
        ssh = root / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        auth = ssh / "authorized_keys"
        auth.write_text(Path(self.run.key + ".pub").read_text())
        auth.chmod(0o600)
        if self.run.kvm:
            (root / "etc/tmpfiles.d").mkdir(parents=True, exist_ok=True)
            (root / "etc/tmpfiles.d/kvm-nspawn.conf").write_text("c /dev/kvm 0660 root kvm - 10:232\n")
        host.base = str(base)
        caps = _caps_cache(base)
        if caps.is_dir() and any(caps.glob("*.xml")):
            dst = root / QEMU_CAPS_DIR
            dst.mkdir(parents=True, exist_ok=True)
            for f in caps.glob("*.xml"):
                shutil.copy2(f, dst / f.name)
            # libvirt-qemu owns the cache in Debian's layout.
            st = (root / QEMU_CAPS_DIR).parent.stat()
            for p in [dst, *dst.iterdir()]:
                os.chown(p, st.st_uid, st.st_gid)
        cmd = [
            "systemd-nspawn", "--quiet", "--boot", f"--directory={root}",
            f"--machine={host.machine}", f"--hostname={host.name}",
            "--register=no", "--keep-unit", f"--network-bridge={self.run.bridge}",
            "--console=read-only", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        ]
        for path, src in self.run.shares.items():
            cmd.append(f"--bind={src}:{path}")
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        host.cgroup = _host_cgroup(host.machine)
        procs = os.path.join(host.cgroup, "cgroup.procs")

        def enter_cgroup() -> None:  # runs in the child, before exec
            with open(procs, "w") as f:
                f.write("0")

        console = open(d / "console.log", "wb")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, preexec_fn=enter_cgroup)
        console.close()
        self._popen[host.name] = proc
        host.nspawn_pid = proc.pid
        host.started = time.time()

    def _wait_ready(self, host: Host) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            if not _alive(host.nspawn_pid):
                raise NspawnError(f"{host.name}: systemd-nspawn exited during boot; console:\n{self.console(host.name)}")
            if not host.leader_pid:
                host.leader_pid = _find_leader(host.nspawn_pid)
                if host.leader_pid:
                    self.run.save()
            if host.leader_pid:
                # is-system-running --wait returns before the bus is up: poll.
                p = self.exec(host.name, ["systemctl", "is-system-running"], check=False, timeout=10)
                state = p.stdout.strip()
                if state in ("running", "degraded") and _ssh_banner(host.address):
                    if state == "degraded":
                        failed = self.exec(host.name, "systemctl --failed --no-legend --plain", check=False).stdout
                        log(f"{host.name}: degraded; failed units: {failed.strip()}")
                    return
            time.sleep(0.1)
        raise NspawnError(
            f"{host.name}: not ready after {BOOT_TIMEOUT:.0f} s (systemd state {state!r}, "
            f"ssh {'answers' if _ssh_banner(host.address) else 'does not answer'} on {host.address}); "
            f"console:\n{self.console(host.name)}"
        )

    def console(self, name: str, tail: int = 40) -> str:
        try:
            lines = (Path(self.run.hosts[name].dir) / "console.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(lines[-tail:])

    def destroy(self) -> None:
        """Tear everything down: guest VMs, hosts, mounts, bridge, run dir. Idempotent."""
        errors = []
        run = self.run
        for host in run.hosts.values():
            try:
                self._poweroff(host)
            except Exception as e:  # keep going: the rest must still be cleaned
                errors.append(f"{host.name}: {e}")
        for host in run.hosts.values():
            root = host.root
            for _ in range(3):
                if not _is_mounted(root):
                    break
                p = _run(["umount", str(root)], check=False)
                if p.returncode != 0:
                    time.sleep(0.5)
            if _is_mounted(root):
                p = _run(["umount", "-l", str(root)], check=False)
                errors.append(f"{host.name}: {root} was busy; lazily unmounted")
        if _run(["ip", "link", "show", run.bridge], check=False).returncode == 0:
            p = _run(["ip", "link", "del", run.bridge], check=False)
            if p.returncode != 0:
                errors.append(f"bridge {run.bridge}: {p.stderr.strip()}")
        for host in run.hosts.values():
            _remove_cgroup(host.cgroup)
            if host.cgroup and os.path.isdir(host.cgroup):
                errors.append(f"{host.name}: cgroup {host.cgroup} could not be removed (processes left?)")
            if not _is_mounted(host.root):
                shutil.rmtree(host.dir, ignore_errors=True)
        shutil.rmtree(Path(run.run_dir) / "shared", ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (REGISTRY / run.run_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            run.state_file.unlink()
        if errors:
            raise NspawnError("destroy finished with errors:\n" + "\n".join(errors))

    def _poweroff(self, host: Host) -> None:
        if not _alive(host.nspawn_pid):
            return
        with contextlib.suppress(OSError):
            self.save_qemu_caps(host.name)
        if host.leader_pid and _alive(host.leader_pid):
            # Guests first: otherwise libvirt-guests delays poweroff by ~7 s.
            self.exec(host.name, "for d in $(virsh -q list --name 2>/dev/null); do virsh -q destroy \"$d\" >/dev/null 2>&1; done",
                      check=False, timeout=30)
        # SIGTERM to nspawn = orderly poweroff of the container.
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.nspawn_pid, signal.SIGTERM)
        if not self._wait_gone(host.nspawn_pid, POWEROFF_TIMEOUT):
            log(f"{host.name}: no orderly poweroff after {POWEROFF_TIMEOUT:.0f} s; killing it")
            for pid in (host.leader_pid, host.nspawn_pid):
                with contextlib.suppress(ProcessLookupError):
                    if pid and _alive(pid):
                        os.kill(pid, signal.SIGKILL)
            if not self._wait_gone(host.nspawn_pid, 10):
                raise NspawnError(f"systemd-nspawn pid {host.nspawn_pid} survived SIGKILL")

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self._popen.values():
                p.poll()
            if not _alive(pid):
                return True
            time.sleep(0.05)
        return False

    # -- using hosts ----------------------------------------------------

    def host(self, name: str) -> Host:
        try:
            return self.run.hosts[name]
        except KeyError:
            raise NspawnError(f"no host {name!r} in this run (hosts: {', '.join(self.run.hosts)})") from None

    def exec(
        self,
        name: str,
        cmd: str | list[str],
        check: bool = True,
        timeout: float | None = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run *cmd* (a shell string or an argv list) inside host *name* as root."""
        host = self.host(name)
        if not host.leader_pid or not _alive(host.leader_pid):
            raise NspawnError(f"{name}: host is not running")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", "-t", str(host.leader_pid), "-a", "--",
                "/usr/bin/env", "-i", f"PATH={HOST_PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", *argv]
        proc = subprocess.run(full, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NspawnError(
                f"{name}: command failed (exit {proc.returncode}): "
                f"{cmd if isinstance(cmd, str) else shlex.join(cmd)}\n"
                f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
            )
        return proc

    def copy_in(self, name: str, src: str | Path, dst: str) -> None:
        """Copy a file or directory tree from the machine into host *name* (through its root)."""
        host = self.host(name)
        target = host.root / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        src = Path(src)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)

    def save_qemu_caps(self, name: str) -> None:
        """Keep libvirtd's QEMU capability cache of host *name* to seed later hosts."""
        host = self.host(name)
        src = host.root / QEMU_CAPS_DIR
        files = list(src.glob("*.xml")) if src.is_dir() else []
        dst = _caps_cache(host.base)
        if host.base and files and not (dst.is_dir() and any(dst.glob("*.xml"))):
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, dst / f.name)

    def instance_config(self) -> list[dict]:
        """Molecule's ``instance_config.yml`` entries (delegated driver)."""
        return [
            {"instance": h.name, "address": h.address, "user": "root", "port": 22,
             "identity_file": self.run.key, "suite": h.suite}
            for h in self.run.hosts.values()
        ]

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


# ---------------------------------------------------------------- CLI


def _destroy_dir(run_dir: str | Path) -> int:
    try:
        c = Cluster.load(run_dir)
    except NspawnError as e:
        log(f"nothing to destroy: {e}")
        return 0
    t0 = time.monotonic()
    c.destroy()
    log(f"destroyed {len(c.run.hosts)} host(s) of {run_dir} in {time.monotonic() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.nspawn", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="boot hosts (NAME:SUITE ...) into RUN_DIR")
    c.add_argument("run_dir")
    c.add_argument("hosts", nargs="+", metavar="NAME:SUITE")
    c.add_argument("--share", action="append", default=[], metavar="PATH",
                   help="container path bind-mounted from one shared machine dir into every host")
    c.add_argument("--key", help="ssh private key to use/create (default RUN_DIR/id_ed25519)")
    c.add_argument("--json", action="store_true", help="print the instance config as JSON on stdout")
    d = sub.add_parser("destroy", help="destroy the run in RUN_DIR (or every registered run with --all)")
    d.add_argument("run_dir", nargs="?")
    d.add_argument("--all", action="store_true")
    d.add_argument("--match", metavar="SUBSTR", help="destroy every registered run whose RUN_DIR contains SUBSTR")
    e = sub.add_parser("exec", help="run a command in a host")
    e.add_argument("run_dir")
    e.add_argument("host")
    e.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="list registered runs")
    sub.add_parser("rootfs", help="build/unpack the rootfs bases").add_argument("suites", nargs="*", default=list(SUITES))
    args = ap.parse_args(argv)

    try:
        if args.cmd == "create":
            hosts = {}
            for spec in args.hosts:
                name, _, suite = spec.partition(":")
                hosts[name] = suite or "bookworm"
            cl = Cluster.create(args.run_dir, hosts, shares=args.share, key=args.key)
            if args.json:
                print(json.dumps(cl.instance_config()))
            return 0
        if args.cmd == "destroy":
            if args.all or args.match:
                runs = sorted(REGISTRY.glob("*")) if REGISTRY.is_dir() else []
                for reg in runs:
                    if args.match and args.match not in os.readlink(reg):
                        continue
                    _destroy_dir(os.readlink(reg))
                    with contextlib.suppress(FileNotFoundError):
                        reg.unlink()
                return 0
            if not args.run_dir:
                ap.error("destroy needs RUN_DIR or --all")
            return _destroy_dir(args.run_dir)
        if args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            p = Cluster.load(args.run_dir).exec(args.host, cmd, check=False, timeout=None)
            sys.stdout.write(p.stdout)
            sys.stderr.write(p.stderr)
            return p.returncode
        if args.cmd == "list":
            for reg in sorted(REGISTRY.glob("*")) if REGISTRY.is_dir() else []:
                try:
                    run = Run.load(os.readlink(reg))
                    print(f"{run.run_id} {run.run_dir} bridge={run.bridge} "
                          + " ".join(f"{h.name}={h.address}/{h.suite}" for h in run.hosts.values()))
                except (NspawnError, OSError) as err:
                    print(f"{reg.name} stale: {err}")
            return 0
        if args.cmd == "rootfs":
            for s in args.suites:
                print(rootfs_base(s))
            return 0
    except NspawnError as err:
        log(f"ERROR: {err}")
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
