"""The multi-kernel NFS test bed: an NFS server and two hypervisors, each a
QEMU guest with its own kernel (testbed/guests.py), on a private bridge
(testbed/guestnet.py).

* ``nfs`` exports ``/srv/lockd`` and ``/srv/images`` to the bed's /24
  (``rw,sync,no_root_squash,no_subtree_check``), NFSv4 only, with
  ``[nfsd] lease-time`` = ``grace-time`` = *lease_time* (default 15 s: a
  partitioned holder's lock is taken over after ~one lease);
* ``hv1`` and ``hv2`` mount them (NFSv4.2, hard) at ``/var/lib/libvirt/lockd``
  and ``/var/lib/libvirt/images``; libvirt + QEMU are installed there;
* :meth:`Cluster.up` boots the three in parallel with progress, and returns
  once the grace period of the fresh nfsd is over (a lock is taken and
  released across the mount from both hypervisors);
* one booted bed is shared: ``<state_dir>/state.json`` describes it, and
  :meth:`Cluster.attach` (or :meth:`Cluster.from_env`, reading
  ``$LOCKD_NFS_BED``) gives another process the same bed; users take turns
  with :meth:`Cluster.use`.

CLI::

    python -m testbed.nfsbed up STATE_DIR [--lease-time 15]
    python -m testbed.nfsbed status STATE_DIR
    python -m testbed.nfsbed run STATE_DIR hv1 -- mount -t nfs4
    python -m testbed.nfsbed partition|heal STATE_DIR hv1
    python -m testbed.nfsbed down STATE_DIR        (or: down --all)
    python -m testbed.nfsbed attach-or-up STATE_DIR --json   (Molecule's create step)
    python -m testbed.nfsbed release STATE_DIR               (Molecule's destroy step)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.guestnet import Network, mac_for
from testbed.guests import Guest, GuestError, Image, Result, detect_accel

SERVER = "nfs"
HYPERVISORS = ("hv1", "hv2")
GUESTS = (SERVER, *HYPERVISORS)
EXPORTS = {"/srv/lockd": "/var/lib/libvirt/lockd", "/srv/images": "/var/lib/libvirt/images"}
LOCKSPACE_MOUNT = "/var/lib/libvirt/lockd"
IMAGES_MOUNT = "/var/lib/libvirt/images"
DEFAULT_LEASE = 15
MEMORY_MB = {SERVER: 512, "hv1": 768, "hv2": 768}
ENV = "LOCKD_NFS_BED"
SSH_OPTS = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
            "-o ConnectTimeout=60 -o ControlMaster=auto -o ControlPersist=300")
# Take and release an exclusive fcntl lock on the mount: blocks while the
# server is in its grace period, so it doubles as the "grace is over" check.
LOCK_PROBE = ("python3 -c 'import fcntl,os,sys; fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT,0o600); "
              "fcntl.lockf(fd,fcntl.LOCK_EX); fcntl.lockf(fd,fcntl.LOCK_UN)' {path}")


class BedError(RuntimeError):
    """The bed could not be booted, set up or attached to."""


def log(msg: str) -> None:
    print(f"[nfsbed] {msg}", file=sys.stderr, flush=True)


class Cluster:
    """A running (or about to run) NFS server + two hypervisors."""

    def __init__(self, state_dir: Path | str, lease_time: int = DEFAULT_LEASE):
        self.state_dir = Path(state_dir).resolve()
        self.lease_time = lease_time
        self.state: dict = {}
        self.net: Network | None = None
        self.guests: dict[str, Guest] = {}
        self.owned = True

    # ------------------------------------------------------------ state

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "id_ed25519"

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.rename(self.state_file)

    def _load_guests(self) -> None:
        st = self.state
        self.net = Network(st["bridge"], st["subnet"], st["taps"])
        image = Image(Path(st["image"]))
        for i, name in enumerate(GUESTS):
            self.guests[name] = Guest(name, self.state_dir / name, image, addr=f"{self.net.addr(i)}/24",
                                      tap=self.net.taps[name], mac=mac_for(self.net.bridge, i),
                                      memory_mb=MEMORY_MB[name], accel=st["accel"])

    @classmethod
    def attach(cls, state_dir: Path | str) -> "Cluster":
        """The bed described by *state_dir*/state.json; it must be up."""
        self = cls(state_dir)
        if not self.state_file.exists():
            raise BedError(f"no NFS bed in {self.state_dir} (bring one up: python -m testbed.nfsbed up DIR)")
        self.state = json.loads(self.state_file.read_text())
        self.lease_time = self.state["lease_time"]
        self.owned = False
        self._load_guests()
        dead = [n for n, g in self.guests.items() if not g.alive()]
        if dead or not self.state.get("ready"):
            raise BedError(f"NFS bed in {self.state_dir} is not running "
                           f"({'guests down: ' + ', '.join(dead) if dead else 'set-up not finished'})")
        return self

    @classmethod
    def from_env(cls) -> "Cluster | None":
        """attach($LOCKD_NFS_BED), or None when it is unset."""
        where = os.environ.get(ENV)
        return cls.attach(where) if where else None

    # ------------------------------------------------------------ up / down

    def up(self, timeout: float = 900.0) -> "Cluster":
        """Build/boot/set up everything; idempotence is the caller's (one bed per dir)."""
        for tool in ("qemu-system-x86_64", "qemu-img", "ip", "ssh-keygen"):
            if not shutil.which(tool):
                raise BedError(f"{tool} not found; run scripts/install-deps.sh")
        if self.state_file.exists():
            raise BedError(f"{self.state_dir} already holds a bed; python -m testbed.nfsbed down {self.state_dir}")
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        image = Image.ensure()
        accel = detect_accel(image, self.state_dir)
        self.net = Network.create(self.state_dir, list(GUESTS))
        self.state = {"bridge": self.net.bridge, "subnet": self.net.subnet, "taps": self.net.taps,
                      "image": str(image.path), "accel": accel, "lease_time": self.lease_time,
                      "ready": False, "timings": {"image": round(time.monotonic() - t0, 1)}}
        self._save()
        try:
            self._load_guests()
            if not self.key_file.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lockd-nfsbed",
                                "-f", str(self.key_file)], check=True)
            self._boot_all(timeout)
            t1 = time.monotonic()
            self._setup_nfs()
            self.state["timings"]["nfs_setup"] = round(time.monotonic() - t1, 1)
            self.state["timings"]["total"] = round(time.monotonic() - t0, 1)
            self.state["ready"] = True
            self._save()
        except BaseException:
            log("up failed; tearing down what was made (console logs stay in the state dir)")
            with contextlib.suppress(Exception):
                self.down(keep_logs=True)
            raise
        log(f"bed up in {self.state['timings']['total']:.0f} s ({accel}): "
            + ", ".join(f"{n}={self.addr(n)}" for n in GUESTS)
            + f"; lease {self.lease_time} s. Attach with {ENV}={self.state_dir}")
        return self

    def _boot_all(self, timeout: float) -> None:
        hosts = "".join(f"{self.addr(n)} {n}\n" for n in GUESTS)
        files = {"authorized_keys": self.key_file.with_suffix(".pub").read_text(), "hosts": hosts}
        t0 = time.monotonic()
        for g in self.guests.values():
            g.start(chan_files=files)
        log(f"booting {', '.join(GUESTS)} in parallel ({self.state['accel']}; TCG: ~30 s idle, longer under load) ...")
        uptimes: dict[str, float] = {}
        errors: list[BaseException] = []

        def wait(g: Guest) -> None:
            try:
                uptimes[g.name] = g.wait_ready(timeout)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=wait, args=(g,), daemon=True) for g in self.guests.values()]
        for t in threads:
            t.start()
        last = 0.0
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                log(f"  {time.monotonic() - t0:4.0f} s: " + "; ".join(
                    f"{n}: {'ready' if n in uptimes else (g.console_tail()[-60:] or 'starting')}"
                    for n, g in self.guests.items()))
        if errors:
            raise errors[0]
        self.state["timings"]["boot"] = round(time.monotonic() - t0, 1)
        self.state["timings"]["guest_uptime_at_ready"] = uptimes
        log(f"all guests up in {self.state['timings']['boot']:.0f} s (guest uptime at ready: "
            + ", ".join(f"{n} {u:.0f} s" for n, u in uptimes.items()) + ")")

    def _setup_nfs(self) -> None:
        subnet = self.net.subnet
        exports = "".join(f"{e} {subnet}(rw,sync,no_root_squash,no_subtree_check)\n" for e in EXPORTS)
        self.run(SERVER, f"mkdir -p {' '.join(EXPORTS)}\nprintf %s {shlex.quote(exports)} > /etc/exports\n"
                 f"{self._nfs_conf_script(self.lease_time)}\nsystemctl start nfs-server\n"
                 "cat /proc/fs/nfsd/nfsv4leasetime", timeout=120)
        started = time.monotonic()
        mounts = "\n".join(f"mkdir -p {m} && mount -t nfs4 -o vers=4.2,hard {SERVER}:{e} {m}"
                           for e, m in EXPORTS.items())
        pend = [self.spawn(h, mounts) for h in HYPERVISORS]
        for h, p in zip(HYPERVISORS, pend):
            res = p.wait(120)
            if res is None or not res.ok:
                raise BedError(f"{h}: mounting the exports failed: {res.out if res else 'timed out'}")
        self.wait_grace(started)

    @staticmethod
    def _nfs_conf_script(lease: int) -> str:
        return (f"printf '[nfsd]\\nvers3=n\\nlease-time={lease}\\ngrace-time={lease}\\n' "
                "> /etc/nfs.conf.d/lockd-guest.conf")

    def wait_grace(self, started: float) -> None:
        """Sleep out nfsd's grace period (one lease from *started*), then check a lock goes through."""
        left = self.lease_time + 1 - (time.monotonic() - started)
        if left > 0:
            log(f"waiting {left:.0f} s for the NFS server's grace period to end ...")
            time.sleep(left)
        for h in HYPERVISORS:
            self.run(h, LOCK_PROBE.format(path=f"{LOCKSPACE_MOUNT}/.nfsbed-probe-{h}"),
                     timeout=3 * self.lease_time + 30)

    def restart_nfsd(self, lease_time: int | None = None) -> None:
        """Restart nfsd (optionally with a new lease time) and wait out its grace period."""
        if lease_time is not None:
            self.lease_time = lease_time
        self.run(SERVER, f"systemctl stop nfs-server\n{self._nfs_conf_script(self.lease_time)}\n"
                 "systemctl start nfs-server", timeout=120)
        started = time.monotonic()
        self.state["lease_time"] = self.lease_time
        self._save()
        self.wait_grace(started)

    def down(self, keep_logs: bool = True) -> None:
        """Stop every guest and remove the network (idempotent)."""
        for g in self.guests.values():
            g.stop()
            with contextlib.suppress(FileNotFoundError):
                g.overlay.unlink()
        if self.net:
            self.net.remove()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if not keep_logs:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # ------------------------------------------------------------ use

    def guest(self, name: str) -> Guest:
        if name not in self.guests:
            raise BedError(f"no guest {name!r} in the bed (guests: {', '.join(GUESTS)})")
        return self.guests[name]

    def run(self, name: str, script: str, timeout: float = 120.0, check: bool = True) -> Result:
        return self.guest(name).run(script, timeout=timeout, check=check)

    def spawn(self, name: str, script: str):
        return self.guest(name).spawn(script)

    def addr(self, name: str) -> str:
        return self.net.addr(GUESTS.index(name))

    @property
    def server_addr(self) -> str:
        return self.addr(SERVER)

    def partition(self, name: str) -> None:
        """Cut *name* off the network (``ip link set <tap> down``); the 9p channel keeps working."""
        self.net.cut(name)

    def heal(self, name: str) -> None:
        self.net.heal(name)

    def ssh_args(self, name: str) -> list[str]:
        return ["ssh", "-i", str(self.key_file), *shlex.split(SSH_OPTS), f"root@{self.addr(name)}"]

    def inventory(self) -> dict:
        """Ansible host vars per hypervisor (ssh over the private bridge)."""
        return {h: {"ansible_host": self.addr(h), "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.key_file),
                    "ansible_ssh_common_args": SSH_OPTS.replace("ControlPersist=300", "ControlPersist=600")}
                for h in HYPERVISORS}

    def instance_config(self) -> list[dict]:
        """Molecule's instance config: how Ansible reaches each hypervisor."""
        return [{"instance": h, "address": self.addr(h), "user": "root", "port": 22,
                 "identity_file": str(self.key_file), "bed": str(self.state_dir)} for h in HYPERVISORS]

    @contextlib.contextmanager
    def use(self):
        """Exclusive use of the bed (flock on <state_dir>/use.lock) for one test or scenario."""
        with open(self.state_dir / "use.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self

    def reset(self) -> None:
        """Between users: links up, lock daemons and libvirt stopped, exports emptied."""
        for name in GUESTS:
            self.heal(name)
        # VMs destroyed and undefined; daemons stopped (their sockets stay, as at boot).
        stop = ("for d in $(virsh -c qemu:///system list --all --name 2>/dev/null); do "
                "virsh -c qemu:///system destroy $d; virsh -c qemu:///system undefine $d; done >/dev/null 2>&1; "
                "systemctl stop libvirtd.service virtqemud.service virtlockd.service 2>/dev/null; true")
        for p in [self.spawn(h, stop) for h in HYPERVISORS]:
            p.wait(120)
        self.run(SERVER, "rm -rf " + " ".join(f"{e}/* {e}/.[!.]*" for e in EXPORTS), timeout=120)


def _cli_up(args) -> int:
    bed = Cluster(args.state_dir, lease_time=args.lease_time).up()
    if args.json:
        print(json.dumps(bed.instance_config(), indent=1))
    return 0


def _cli_attach_or_up(args) -> int:
    """Molecule's create: the shared bed of $LOCKD_NFS_BED, else one of our own in STATE_DIR."""
    bed = Cluster.from_env()
    if bed is None:
        log(f"{ENV} is unset: booting a bed of this scenario's own in {args.state_dir}")
        bed = Cluster(args.state_dir, lease_time=args.lease_time).up()
    else:
        log(f"attached to the shared bed {bed.state_dir} ({ENV})")
        bed.reset()
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.state_dir) / "attached").write_text(str(bed.state_dir))
    if args.json:
        print(json.dumps(bed.instance_config(), indent=1))
    return 0


def _cli_release(args) -> int:
    """Molecule's destroy: down our own bed; reset (never down) a shared one."""
    marker = Path(args.state_dir) / "attached"
    where = Path(marker.read_text()) if marker.exists() else Path(args.state_dir)
    if where.resolve() != Path(args.state_dir).resolve():
        with contextlib.suppress(BedError):
            Cluster.attach(where).reset()
            log(f"reset the shared bed {where}")
        marker.unlink()
        return 0
    return _cli_down(args)


def _cli_down(args) -> int:
    dirs = [Path(args.state_dir)] if args.state_dir else []
    if args.all:
        dirs += [owner for _, owner in Network.stale()]
    for d in dirs:
        bed = Cluster(d)
        if bed.state_file.exists():
            bed.state = json.loads(bed.state_file.read_text())
            bed._load_guests()
            bed.down()
            log(f"destroyed the bed in {d}")
        else:
            for bridge, owner in Network.stale():
                if owner.resolve() == Path(d).resolve():
                    Network(bridge, "", {}).remove()
    for bridge, _ in Network.stale() if args.all else []:
        _ip_del = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        for tap in [ln.split(": ")[1].split("@")[0] for ln in _ip_del.splitlines() if f"{bridge}-" in ln]:
            subprocess.run(["ip", "link", "del", tap], capture_output=True)
        Network(bridge, "", {}).remove()
    return 0


def _cli_status(args) -> int:
    bed = Cluster.attach(args.state_dir)
    for name, g in bed.guests.items():
        cut = " (partitioned)" if bed.net.is_cut(name) else ""
        print(f"{name:4} {bed.addr(name):15} {'up' if g.alive() else 'DOWN'}{cut}  console {g.console}")
    print(f"lease {bed.lease_time} s, accel {bed.state['accel']}, timings {bed.state['timings']}")
    return 0


def _cli_run(args) -> int:
    bed = Cluster.attach(args.state_dir)
    res = bed.run(args.guest, shlex.join(args.cmd), timeout=args.timeout, check=False)
    sys.stdout.write(res.out)
    return res.rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.nfsbed", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="op", required=True)
    for op in ("up", "attach-or-up"):
        p = sub.add_parser(op)
        p.add_argument("state_dir")
        p.add_argument("--lease-time", type=int, default=DEFAULT_LEASE)
        p.add_argument("--json", action="store_true", help="print Molecule's instance config")
    p = sub.add_parser("down")
    p.add_argument("state_dir", nargs="?")
    p.add_argument("--all", action="store_true", help="also beds whose state is gone")
    for op in ("status", "release"):
        sub.add_parser(op).add_argument("state_dir")
    p = sub.add_parser("run")
    p.add_argument("state_dir")
    p.add_argument("guest", choices=GUESTS)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    for op in ("partition", "heal"):
        p = sub.add_parser(op)
        p.add_argument("state_dir")
        p.add_argument("guest", choices=GUESTS)
    args = ap.parse_args(argv)
    if args.op == "run" and args.cmd[:1] == ["--"]:
        args.cmd = args.cmd[1:]
    if args.op == "release":
        args.all = False
    try:
        if args.op in ("partition", "heal"):
            getattr(Cluster.attach(args.state_dir), args.op)(args.guest)
            log(f"{args.guest}: {'link down' if args.op == 'partition' else 'link up'}")
            return 0
        return {"up": _cli_up, "attach-or-up": _cli_attach_or_up, "release": _cli_release,
                "down": _cli_down, "status": _cli_status, "run": _cli_run}[args.op](args)
    except (BedError, GuestError) as err:
        log(f"ERROR: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
