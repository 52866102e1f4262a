"""The private network of a QEMU test bed: one bridge, one tap per guest.

A /24 of ``10.214.0.0/16`` that no interface on the machine uses (the nspawn
hosts take ``10.213.0.0/16``); the machine's end of the bridge is ``.1``,
guests get static addresses from their kernel command line. No gateway, no
forwarding, no NAT: guests reach each other and the machine (Ansible's ssh),
nothing else. A network fault is :meth:`Network.cut`: ``ip link set <tap>
down`` on the machine. Inside the guest the link stays up and packets just
vanish, as in a real partition.

Nets are registered under ``/run/lockd-guestnet/<bridge>`` (owner's state dir),
and subnet choice is serialised by a flock there, so concurrent beds never
pick the same subnet and a dead owner's bridge can be found and removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY = Path("/run/lockd-guestnet")
SUBNET_POOL = ipaddress.ip_network("10.214.0.0/16")


class NetError(RuntimeError):
    """A bridge or tap could not be created or changed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _used_subnets() -> set[str]:
    out = _ip("-o", "-4", "addr", "show").stdout
    used = {str(ipaddress.ip_interface(m).network) for m in re.findall(r"inet (\S+)", out)}
    if REGISTRY.is_dir():
        used |= {p.read_text().split()[0] for p in REGISTRY.glob("lkn*") if p.is_file() and p.read_text()}
    return used


@dataclass
class Network:
    """A bridge with a private /24 and the taps of its guests."""

    bridge: str
    subnet: str
    taps: dict[str, str] = field(default_factory=dict)

    @property
    def host_addr(self) -> str:
        return str(next(ipaddress.ip_network(self.subnet).hosts()))

    def addr(self, index: int) -> str:
        """The address of guest *index* (0-based): .10, .11, ..."""
        return str(ipaddress.ip_network(self.subnet).network_address + 10 + index)

    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @classmethod
    def create(cls, owner: Path, guests: list[str]) -> "Network":
        """Pick a free subnet, create the bridge and one tap per guest."""
        REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(REGISTRY / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _used_subnets()
            subnet = next((s for s in SUBNET_POOL.subnets(new_prefix=24)
                           if str(s) not in used and s.network_address.packed[2] != 0), None)
            if subnet is None:
                raise NetError(f"no free /24 left in {SUBNET_POOL}; remove stale beds "
                               f"(python -m testbed.nfsbed down --all)")
            tag = subnet.network_address.packed[2]
            net = cls(bridge=f"lkn{tag}", subnet=str(subnet),
                      taps={g: f"lkn{tag}-{g}"[:15] for g in guests})
            (REGISTRY / net.bridge).write_text(f"{net.subnet} {owner}\n")
            try:
                net._setup()
            except BaseException:
                net.remove()
                raise
        return net

    def _setup(self) -> None:
        _ip("link", "add", "name", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_addr}/{self.prefix()}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for tap in self.taps.values():
            _ip("tuntap", "add", "dev", tap, "mode", "tap")
            _ip("link", "set", tap, "master", self.bridge)
            _ip("link", "set", tap, "up")

    def remove(self) -> None:
        """Delete the taps and the bridge (idempotent) and unregister."""
        for tap in self.taps.values():
            _ip("link", "del", tap, check=False)
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            (REGISTRY / self.bridge).unlink()

    def cut(self, guest: str) -> None:
        """Partition *guest*: its tap goes down, its packets vanish."""
        _ip("link", "set", self.taps[guest], "down")

    def heal(self, guest: str) -> None:
        _ip("link", "set", self.taps[guest], "up")

    def is_cut(self, guest: str) -> bool:
        out = _ip("-o", "link", "show", self.taps[guest], check=False).stdout
        return "state DOWN" in out or "UP" not in out.split(">")[0]

    @staticmethod
    def stale() -> list[tuple[str, Path]]:
        """Registered bridges whose owner directory has no state any more."""
        found = []
        for reg in sorted(REGISTRY.glob("lkn*")) if REGISTRY.is_dir() else []:
            parts = reg.read_text().split()
            owner = Path(parts[1]) if len(parts) > 1 else Path("/nonexistent")
            if not (owner / "state.json").exists():
                found.append((reg.name, owner))
        return found


def mac_for(bridge: str, index: int) -> str:
    """A locally administered MAC, unique per bed and guest."""
    tag = int(bridge[3:]) if bridge[3:].isdigit() else os.getpid() & 0xFF
    return f"52:54:00:d4:{tag:02x}:{10 + index:02x}"
