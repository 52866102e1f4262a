"""Live migration between two hypervisor hosts, watched from inside the source.

This file runs ON a hypervisor host with the host's own ``python3`` (stdlib
only, Python 3.9+): the Molecule scenario ``extensions/molecule/migration``
copies it to its hosts, ``tests/reliability/test_migration.py`` into its
nspawn hosts. It never talks to a lock daemon. What it reports about the
lease is the kernel's view, from a process that holds no lease (``F_OFD_GETLK``
while watching, ``F_SETLK`` in ``probe``); what it reports about VMs is
libvirt's (``virsh``).

    python3 migration.py bootsector DISK
    python3 migration.py probe PATH
    python3 migration.py migrate VM DEST --watch PATH [--speed MIB_S]
                        [--fault kill-dest-qemu|kill-lock-daemon] [--racer VM3]

``migrate`` runs ``virsh migrate --live --unsafe VM qemu+ssh://DEST/system``
(``--unsafe``: libvirt does not recognise a bind mount as shared storage)
while a thread polls byte 0 of PATH (the disk in direct mode, the lease file
in indirect mode) and records every moment nobody holds it exclusively. It
prints one JSON object: exit status, the free intervals, what the fault did,
and the final state of the VMs on both hosts.

* ``--fault kill-dest-qemu``: once the source reports transferred data,
  SIGKILL the destination's QEMU (over host-to-host ssh): the migration fails
  half-way.
* ``--fault kill-lock-daemon``: once data flows, SIGKILL the source's lock
  daemon (``systemctl kill``; systemd restarts it) and report the new pid.
* ``--racer VM3``: a third VM on the same disk, started paused beforehand (a
  paused start only registers with the lock daemon, it acquires nothing), is
  resumed through an already connected ``virsh`` the instant the watcher
  sees the disk no longer exclusively held. Resuming acquires the leases
  exactly as a start does, but within milliseconds instead of the ~0.3 s a
  cold ``virsh start`` needs to reach the lock daemon.
* ``--speed``: ``virsh migrate-setspeed`` first, so that the transfer lasts
  (the guest's RAM holds 32 MiB of data, see ``bootsector``).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
FLOCK = struct.Struct("hhqqi4x")  # struct flock, Linux x86_64/aarch64
WRLCK_BYTE0 = FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
POLL_INTERVAL = 0.0001
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
FREE, SHARED, EXCLUSIVE = "free", "shared", "exclusive"


# ---------------------------------------------------------------- the guest


def boot_sector(fill_start: int = 1 << 20, fill_end: int = 33 << 20) -> bytes:
    """A 512-byte MBR that fills guest RAM [fill_start, fill_end) with the
    word 'lock' and halts.

    Without an OS the guest's RAM is all zero pages, which QEMU migrates as
    flags: a speed limit then cannot make the transfer last. 32 MiB of data
    take ~0.1 s at full speed and 8 s at 4 MiB/s. The code enters "unreal
    mode" (protected mode just long enough to load a 4 GiB data segment) to
    write above 1 MiB, then sleeps in ``hlt``, so the guest costs no CPU.
    """
    code = bytearray()
    code += bytes([0xFA, 0x31, 0xC0, 0x8E, 0xD8, 0x8E, 0xD0, 0xBC, 0x00, 0x7C])  # cli; ds=ss=0; sp=7c00
    code += bytes([0xE4, 0x92, 0x0C, 0x02, 0xE6, 0x92])            # fast A20 on (port 0x92)
    lgdt_at = len(code) + 3
    code += bytes([0x0F, 0x01, 0x16, 0, 0])                         # lgdt [gdtr] (patched below)
    code += bytes([0x0F, 0x20, 0xC0, 0x0C, 0x01, 0x0F, 0x22, 0xC0])  # cr0.PE = 1
    code += bytes([0xBB, 0x08, 0x00, 0x8E, 0xDB])                   # ds = flat 4 GiB descriptor
    code += bytes([0x24, 0xFE, 0x0F, 0x22, 0xC0])                   # cr0.PE = 0, ds keeps its limit
    code += bytes([0x31, 0xC0, 0x8E, 0xD8])                         # ds = 0
    code += bytes([0x66, 0xBF]) + struct.pack("<I", fill_start)     # mov edi, fill_start
    code += bytes([0x66, 0xB8]) + b"kcol"                           # mov eax, 'lock'
    loop = len(code)
    code += bytes([0x67, 0x66, 0x89, 0x07, 0x66, 0x83, 0xC7, 0x04])  # mov [edi], eax; add edi, 4
    code += bytes([0x66, 0x81, 0xFF]) + struct.pack("<I", fill_end)  # cmp edi, fill_end
    code += bytes([0x72, (loop - len(code) - 2) & 0xFF])             # jb loop
    halt = len(code)
    code += bytes([0xF4, 0xEB, (halt - len(code) - 2) & 0xFF])       # hlt; jmp hlt
    code += bytes(-len(code) % 8)
    gdt = len(code)
    code += bytes(8) + bytes([0xFF, 0xFF, 0, 0, 0, 0x92, 0xCF, 0])  # null, data: base 0, 4 GiB, rw
    gdtr = len(code)
    code += struct.pack("<HI", 15, 0x7C00 + gdt)
    code[lgdt_at:lgdt_at + 2] = struct.pack("<H", 0x7C00 + gdtr)
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"


def write_boot_sector(disk: str) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, boot_sector(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the lease, from outside


def setlk_probe(path: str) -> str:
    """What a second writer would get: "locked" when F_SETLK on byte 0 is
    refused, "free" when it was granted (and dropped again at once), "absent"
    when the lease file does not exist (indirect mode: nobody holds it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return "absent"
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, 0)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return "locked"
        raise
    finally:
        os.close(fd)
    return "free"


class LeaseWatch(threading.Thread):
    """Polls who holds byte 0 of *path* (F_OFD_GETLK, so it takes nothing) and
    records every change of state with its time.

    In indirect mode the lease file is deleted at release and created again by
    the next holder: an unlocked answer is only believed after checking that
    our fd still is the file at *path* (else the file is opened again).
    """

    def __init__(self, path: str, t0: float, on_open=None):
        super().__init__(daemon=True)
        self.path, self.t0, self.on_open = path, t0, on_open
        self.fd = -1
        self.ino = None
        self.changes: list[tuple[float, str]] = []
        self.polls = 0
        self._done = threading.Event()

    def _reopen(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.ino = -1, None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self.ino = os.fstat(self.fd).st_ino
        except FileNotFoundError:
            pass

    def _getlk(self) -> str:
        kind = FLOCK.unpack(fcntl.fcntl(self.fd, F_OFD_GETLK, WRLCK_BYTE0))[0]
        return {fcntl.F_UNLCK: FREE, fcntl.F_RDLCK: SHARED}.get(kind, EXCLUSIVE)

    def state(self) -> str:
        if self.fd < 0:
            self._reopen()
            if self.fd < 0:
                return FREE
        st = self._getlk()
        if st == FREE:
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                return FREE
            if current != self.ino:
                self._reopen()
                return self._getlk() if self.fd >= 0 else FREE
        return st

    def run(self) -> None:
        last = None
        while not self._done.is_set():
            st = self.state()
            self.polls += 1
            if st != last:
                now = time.monotonic() - self.t0
                self.changes.append((now, st))
                if last is not None and st != EXCLUSIVE and self.on_open:
                    self.on_open(now)
                    self.on_open = None
                last = st
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        self._done.set()
        self.join(10)
        if self.fd >= 0:
            os.close(self.fd)

    def intervals(self, kind: str, end: float) -> list[list[float]]:
        """[[start_ms, length_ms], ...] of every stretch in state *kind*."""
        out = []
        for i, (t, st) in enumerate(self.changes):
            if st == kind:
                t_next = self.changes[i + 1][0] if i + 1 < len(self.changes) else end
                out.append([round(t * 1000, 2), round((t_next - t) * 1000, 2)])
        return out


class ExitWatch(threading.Thread):
    """Records when process *pid* is gone (or a zombie): the source QEMU,
    which libvirt kills only in the migration's last phase (Confirm)."""

    def __init__(self, pid: int, t0: float):
        super().__init__(daemon=True)
        self.pid, self.t0, self.gone_at = pid, t0, None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set() and self.gone_at is None:
            try:
                with open(f"/proc/{self.pid}/stat") as f:
                    zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            except (FileNotFoundError, ProcessLookupError):
                zombie = True
            if zombie:
                self.gone_at = time.monotonic() - self.t0
            time.sleep(0.001)

    def stop(self) -> float | None:
        self._done.set()
        self.join(10)
        return None if self.gone_at is None else round(self.gone_at * 1000, 2)


# ---------------------------------------------------------------- libvirt


def sh(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def on(host: str | None, cmd: str) -> subprocess.CompletedProcess:
    """*cmd* (a shell string) here, or on *host* through host-to-host ssh."""
    return sh(["sh", "-c", cmd] if host is None else ["ssh", "-o", "BatchMode=yes", host, cmd])


def domstate(vm: str, host: str | None = None) -> str:
    p = on(host, f"virsh domstate --reason {vm}")
    return p.stdout.strip() if p.returncode == 0 else "absent"


def data_processed(vm: str) -> int:
    """Bytes the running migration job of *vm* has sent (0 if none yet)."""
    m = re.search(r"^Data processed:\s+([\d.]+) (\w+)", on(None, f"virsh domjobinfo {vm}").stdout, re.M)
    return int(float(m.group(1)) * UNITS.get(m.group(2), 1)) if m else 0


def daemon_pid() -> int:
    out = on(None, "systemctl show -P MainPID virtlockd.service").stdout.strip()
    return int(out) if out.isdigit() else 0


class Racer:
    """A paused third VM resumed the moment the disk looks free."""

    def __init__(self, vm: str, t0: float):
        self.vm, self.t0 = vm, t0
        if domstate(vm).startswith("shut off"):
            p = on(None, f"virsh start --paused {vm}")
            if p.returncode != 0:
                raise SystemExit(f"cannot start the racer {vm} paused: {p.stderr.strip()}")
        self.virsh = subprocess.Popen(["virsh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        # One round trip first, so that the shell is connected before the race.
        self.virsh.stdin.write(f"domstate {vm}\n")
        self.virsh.stdin.flush()
        self.fired_at = None

    def fire(self, _opened_at: float) -> None:
        self.fired_at = time.monotonic() - self.t0
        self.virsh.stdin.write(f"resume {self.vm}\n")
        self.virsh.stdin.flush()

    def result(self) -> dict:
        out, err = self.virsh.communicate("quit\n", timeout=60)
        return {"vm": self.vm, "fired_at_ms": None if self.fired_at is None else round(self.fired_at * 1000, 2),
                "resumed": f"Domain '{self.vm}' resumed" in out,
                "error": err.strip(), "state": domstate(self.vm)}


def inject(fault: str, vm: str, dest: str, proc: subprocess.Popen, t0: float) -> dict:
    """Wait until the migration moves data, then apply *fault*."""
    sent = 0
    while proc.poll() is None and (sent := data_processed(vm)) == 0:
        time.sleep(0.02)
    if proc.poll() is not None:
        return {"name": fault, "applied": False, "why": "the migration ended before any data was sent"}
    info = {"name": fault, "applied": True, "sent_bytes": sent}
    if fault == "kill-dest-qemu":
        p = on(dest, f'kill -KILL "$(cat /run/libvirt/qemu/{vm}.pid)"')
        info.update(at_ms=round((time.monotonic() - t0) * 1000, 2), ok=p.returncode == 0, error=p.stderr.strip())
    elif fault == "kill-lock-daemon":
        old = daemon_pid()
        p = on(None, "systemctl kill -s SIGKILL virtlockd.service")
        killed = time.monotonic()
        info.update(at_ms=round((killed - t0) * 1000, 2), ok=p.returncode == 0, error=p.stderr.strip(), old_pid=old)
        new = 0
        while time.monotonic() - killed < 30 and new in (0, old):
            time.sleep(0.02)
            new = daemon_pid()
        info.update(new_pid=new, restarted_after_ms=round((time.monotonic() - killed) * 1000, 2))
        # lockd's own view once it serves again (the C daemon has no lease query)
        leases = on(None, "virtlockctl --json leases")
        if leases.returncode == 0:
            info["leases_after_restart"] = json.loads(leases.stdout)["leases"]
    return info


def migrate(vm: str, dest: str, watch: str, speed: int = 0, fault: str = "", racer: str = "") -> dict:
    if speed:
        p = on(None, f"virsh migrate-setspeed {vm} {speed}")
        if p.returncode != 0:
            raise SystemExit(f"migrate-setspeed failed: {p.stderr.strip()}")
    t0 = time.monotonic()
    race = Racer(racer, t0) if racer else None
    watcher = LeaseWatch(watch, t0, on_open=race.fire if race else None)
    watcher.start()
    with open(f"/run/libvirt/qemu/{vm}.pid") as f:
        qemu = ExitWatch(int(f.read()), t0)
    qemu.start()
    time.sleep(0.05)
    start = time.monotonic()
    proc = subprocess.Popen(["virsh", "migrate", "--live", "--unsafe", vm, f"qemu+ssh://{dest}/system"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fault_info = inject(fault, vm, dest, proc, t0) if fault else None
    out, err = proc.communicate(timeout=300)
    took = time.monotonic() - start
    time.sleep(0.2)  # the destination's acquire, or the source's re-acquire, has settled
    end = time.monotonic() - t0
    watcher.stop()
    qemu_gone = qemu.stop()
    if speed:
        # Back to libvirt's "unlimited", on whichever host the VM now runs.
        for host in (None, dest):
            on(host, f"virsh migrate-setspeed {vm} 8796093022207")
    result = {
        "vm": vm, "dest": dest, "rc": proc.returncode, "error": err.strip(), "seconds": round(took, 3),
        "started_at_ms": round((start - t0) * 1000, 2), "polls": watcher.polls,
        "free": watcher.intervals(FREE, end), "shared": watcher.intervals(SHARED, end),
        "final": watcher.changes[-1][1] if watcher.changes else None,
        "source_qemu_gone_at_ms": qemu_gone,
        "source_state": domstate(vm), "dest_state": domstate(vm, dest),
        "fault": fault_info, "racer": race.result() if race else None,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bootsector", help="write the RAM-filling boot sector to DISK").add_argument("disk")
    sub.add_parser("probe", help="F_SETLK probe of byte 0 of PATH").add_argument("path")
    m = sub.add_parser("migrate", help="live-migrate VM to DEST while watching the lease")
    m.add_argument("vm")
    m.add_argument("dest")
    m.add_argument("--watch", required=True, metavar="PATH", help="the disk (direct) or lease file (indirect)")
    m.add_argument("--speed", type=int, default=0, metavar="MIB_S")
    m.add_argument("--fault", choices=("kill-dest-qemu", "kill-lock-daemon"), default="")
    m.add_argument("--racer", default="", metavar="VM3")
    args = ap.parse_args(argv)
    if args.cmd == "bootsector":
        write_boot_sector(args.disk)
    elif args.cmd == "probe":
        print(setlk_probe(args.path))
    else:
        print(json.dumps(migrate(args.vm, args.dest, args.watch, args.speed, args.fault, args.racer)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
