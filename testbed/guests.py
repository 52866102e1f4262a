"""QEMU guests with their own kernel, for tests that need one (NFS: the
machine's kernel has no nfs/nfsd; systemd-nspawn hosts share that kernel).

* image: ``scripts/build-guest-image.sh`` (Debian 12, linux-image-amd64,
  systemd, NFS server and client, python3, sshd, libvirt + QEMU), cached under
  ``.cache/guests/<key>`` (``$LOCKD_GUEST_CACHE``); each guest boots from its
  own qcow2 overlay on the read-only raw base (``cache=unsafe``: a guest is
  thrown away, never rebooted);
* direct kernel boot (``-kernel``/``-initrd``), console on ``console.log``;
* accelerator: KVM where it really boots a stock kernel (a time-boxed probe,
  cached per kernel and QEMU), else TCG ``-cpu max``. The nested "PVM" KVM of
  some cloud machines passes ``/dev/kvm`` checks but hangs in the kernel's
  decompressor; ``LOCKD_GUEST_ACCEL=kvm|tcg`` forces the choice;
* command channel: a virtio-9p share (tag ``lockdchan``); the guest's
  ``lockd-guest-agent`` runs every ``cmd/<id>.sh`` dropped there and writes
  ``<id>.out`` and ``<id>.rc`` back. It does not use the network, so a guest
  whose link is cut stays observable, and commands run concurrently, so one
  blocked on a hung NFS mount holds back nothing else (:meth:`Guest.spawn`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from testbed import REPO

BUILD_IMAGE = REPO / "scripts" / "build-guest-image.sh"
CHAN_TAG = "lockdchan"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PROBE_TIMEOUT = 25.0
# A TCG boot to the agent takes ~30 s on an idle 2-core machine; under load
# (3 guests on 2 cores, other tests) several times that. A hang guard only.
BOOT_TIMEOUT = 600.0
KERNEL_ARGS = ("root=/dev/vda rw console=ttyS0 loglevel=4 net.ifnames=0 mitigations=off "
               "systemd.show_status=1 panic=-1")


class GuestError(RuntimeError):
    """A guest could not be built, booted or reached."""


def log(msg: str) -> None:
    print(f"[guests] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Image:
    """The cached guest image: raw ext4 base, kernel, initrd."""

    path: Path

    @property
    def base(self) -> Path:
        return self.path / "base.raw"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    @classmethod
    def ensure(cls) -> "Image":
        """The image, built first if it is not cached (progress on stderr; ~1.5-3 min)."""
        proc = subprocess.run([str(BUILD_IMAGE)], stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise GuestError(f"scripts/build-guest-image.sh failed (exit {proc.returncode}); see its output above")
        return cls(Path(proc.stdout.strip().splitlines()[-1]))

    @classmethod
    def start_build(cls, log_path: Path) -> subprocess.Popen:
        """Start building the image in the background (instant when cached)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as out:
            return subprocess.Popen([str(BUILD_IMAGE)], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)


@dataclass
class Result:
    """What a command run in a guest returned."""

    rc: int
    out: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Pending:
    """A command running in a guest; it may block (e.g. on a hung NFS mount)."""

    def __init__(self, guest: "Guest", cid: str, script: str):
        self.guest, self.cid, self.script = guest, cid, script
        self.started = time.monotonic()

    def _file(self, ext: str) -> Path:
        return self.guest.cmd_dir / f"{self.cid}.{ext}"

    def done(self) -> bool:
        return self._file("rc").exists()

    def wait(self, timeout: float | None = None, poll: float = 0.05) -> Result | None:
        """The result, or None if the command is still running after *timeout* s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if not self.guest.alive():
                raise GuestError(f"guest {self.guest.name} died while running: {self.script[:200]} "
                                 f"(console: {self.guest.console})")
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(poll)
        rc = int(self._file("rc").read_text().strip() or "255")
        out = self._file("out").read_text(errors="replace") if self._file("out").exists() else ""
        return Result(rc, out)


class Guest:
    """One QEMU guest: overlay disk, tap NIC, 9p command channel, console log."""

    def __init__(self, name: str, directory: Path, image: Image, *, addr: str = "", tap: str = "",
                 mac: str = "", memory_mb: int = 768, accel: str = "tcg", extra_args: str = ""):
        self.name, self.dir, self.image = name, Path(directory), image
        self.addr, self.tap, self.mac = addr, tap, mac
        self.memory_mb, self.accel, self.extra_args = memory_mb, accel, extra_args
        self.chan = self.dir / "chan"
        self.cmd_dir = self.chan / "cmd"
        self.console = self.dir / "console.log"
        self.pidfile = self.dir / "qemu.pid"
        self.overlay = self.dir / "disk.qcow2"

    # ------------------------------------------------------------ lifecycle

    def qemu_argv(self) -> list[str]:
        accel = ["-machine", "pc,accel=kvm", "-cpu", "host"] if self.accel == "kvm" else \
            ["-machine", "pc,accel=tcg", "-cpu", "max"]
        append = f"{KERNEL_ARGS} lockd.name={self.name}"
        if self.addr:
            append += f" lockd.addr={self.addr}"
        if self.extra_args:
            append += f" {self.extra_args}"
        argv = ["qemu-system-x86_64", "-name", self.name, *accel, "-m", str(self.memory_mb), "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", f"file:{self.console}",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", append,
                "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe",
                "-fsdev", f"local,id=chan,path={self.chan},security_model=none",
                "-device", f"virtio-9p-pci,fsdev=chan,mount_tag={CHAN_TAG}",
                "-daemonize", "-pidfile", str(self.pidfile)]
        if self.tap:
            argv += ["-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n0,mac={self.mac}"]
        return argv

    def start(self, chan_files: dict[str, str] | None = None) -> None:
        """Create the overlay and the channel, start QEMU (daemonized).

        *chan_files* are written to the channel before the boot: the guest's
        init reads ``authorized_keys`` and ``hosts`` from there.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.chan, ignore_errors=True)
        self.cmd_dir.mkdir(parents=True)
        for name, text in (chan_files or {}).items():
            (self.chan / name).write_text(text)
        self.overlay.unlink(missing_ok=True)
        self.console.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.base), "-F", "raw",
                        str(self.overlay)], check=True, capture_output=True)
        proc = subprocess.run(self.qemu_argv(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestError(f"QEMU for guest {self.name} did not start (exit {proc.returncode}): "
                             f"{proc.stderr.strip()}")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"qemu-system")
        except OSError:
            return False

    def ready(self) -> bool:
        return (self.chan / "ready").exists()

    def console_tail(self, n: int = 1) -> str:
        try:
            text = ANSI.sub("", self.console.read_text(errors="replace"))
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the guest's agent; returns the guest's uptime at that point (s)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.alive():
                raise GuestError(f"guest {self.name} exited during boot; console {self.console}:\n"
                                 f"{self.console_tail(30)}")
            if time.monotonic() >= deadline:
                raise GuestError(f"guest {self.name} did not come up within {timeout:.0f} s; console "
                                 f"{self.console}:\n{self.console_tail(30)}")
            time.sleep(0.25)
        return float((self.chan / "ready").read_text().strip() or 0)

    def stop(self, timeout: float = 10.0) -> None:
        """Kill QEMU (the overlay is thrown away: nothing to shut down cleanly)."""
        pid = self.pid()
        if pid is None or not self.alive():
            return
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.alive():
            os.kill(pid, 9)

    # ------------------------------------------------------------ commands

    def spawn(self, script: str) -> Pending:
        """Start a bash script in the guest through the 9p channel; do not wait."""
        cid = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}"
        tmp = self.cmd_dir / f"{cid}.tmp"
        tmp.write_text(script if script.endswith("\n") else script + "\n")
        tmp.rename(self.cmd_dir / f"{cid}.sh")
        return Pending(self, cid, script)

    def run(self, script: str, timeout: float = 120.0, check: bool = True) -> Result:
        """Run a bash script in the guest and wait for it (``check``: raise on rc != 0)."""
        pending = self.spawn(script)
        res = pending.wait(timeout)
        if res is None:
            raise GuestError(f"{self.name}: command still running after {timeout:.0f} s: {script[:300]}")
        if check and not res.ok:
            raise GuestError(f"{self.name}: command failed (exit {res.rc}): {script[:300]}\n{res.out[-3000:]}")
        return res


# ---------------------------------------------------------------- accelerator


def _probe_key(image: Image) -> str:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return f"{image.manifest().get('kernel')}|{qemu.splitlines()[0] if qemu else '?'}|{os.uname().release}"


def detect_accel(image: Image, workdir: Path) -> str:
    """"kvm" if KVM boots this image's kernel to its agent within PROBE_TIMEOUT s, else "tcg"."""
    forced = os.environ.get("LOCKD_GUEST_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = image.path.parent / "accel-probe.json"
    key = _probe_key(image)
    try:
        known = json.loads(cache.read_text())
        if known.get("key") == key:
            return known["accel"]
    except (OSError, ValueError, KeyError):
        pass
    log(f"probing whether KVM boots the guest kernel (at most {PROBE_TIMEOUT:.0f} s) ...")
    probe = Guest("kvmprobe", workdir / "kvm-probe", image, accel="kvm", memory_mb=512)
    t0 = time.monotonic()
    accel = "tcg"
    try:
        probe.start()
        probe.wait_ready(PROBE_TIMEOUT)
        accel = "kvm"
    except GuestError as err:
        log(f"KVM does not boot it ({str(err).splitlines()[0]}); using TCG (-cpu max)")
    finally:
        probe.stop()
        shutil.rmtree(probe.dir, ignore_errors=True)
    log(f"accelerator: {accel} (probe took {time.monotonic() - t0:.1f} s)")
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
