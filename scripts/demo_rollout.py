#!/usr/bin/env python3
"""The Ansible rollout demo: lockd rolled out to a real systemd hypervisor.

What it does, step by step (each step printed with a heading and timings):

 1. the cached Debian 12 rootfs (scripts/build-rootfs.sh, through
    testbed/nspawn.py; ~30-60 s the first time, instant later);
 2. builds the collection tarball (ansible-galaxy collection build) and
    installs it offline into a private collections path (never ~/.ansible);
 3. boots one hypervisor ``hv1`` (systemd-nspawn, systemd as PID 1, libvirt +
    QEMU inside) and writes an inventory with the group ``hypervisors``;
 4. ``ansible-playbook lockd.virtlockd.site``: the fleet rollout;
 5. ``ansible-playbook lockd.virtlockd.smoke_test -e smoke_cleanup=false``:
    vm1 and vm2 share one disk, vm1 keeps running;
 6. shows vm1 running, vm2 refused by the lock manager, ``virtlockctl leases``;
 7. the headline: ``systemctl kill -s SIGKILL virtlockd.service``; systemd
    restarts the daemon, the lease is recovered, vm2 is STILL refused (Debian's
    C virtlockd forgets every lease when it dies and would let vm2 start);
 8. ``virsh destroy vm1``: now vm2 starts;
 9. always: the host is powered off and removed (also on failure or Ctrl-C).

Ends with ``DEMO PASSED`` or ``DEMO FAILED: <reason>`` (exit 0 / 1).

    .venv/bin/python scripts/demo_rollout.py        (what `make demo` runs; root)
    .venv/bin/python scripts/demo_rollout.py --keep (leave the host up to look around)

Logs of the Ansible runs: .cache/demo-logs/<date>-<run>/ (the newest 10 runs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.nspawn import Cluster, NspawnError, prepare_rootfs  # noqa: E402

HOST = "hv1"
SUITE = "bookworm"
IMAGE = "/var/lib/libvirt/images/extra.img"
REFUSAL = f"resource busy: Lockspace resource '{IMAGE}' is locked"
LOGS = REPO / ".cache" / "demo-logs"
VENV_BIN = Path(sys.executable).parent
# Ansible output echoed live, condensed (the full output goes to the log):
# one line per task with its first result, messages, failures and the recap.
TASK_LINE = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.*)\] \**$")
RESULT_LINE = re.compile(r"^(ok|changed|skipping|failed|fatal): \[")
SHOW_LINE = re.compile(r"^(PLAY \[|PLAY RECAP|\S+\s+: ok=)|\"msg\": \"|^\s+\"\S+: |^fatal:|^failed:")

T0 = time.monotonic()
STEPS = 9


class DemoFailure(Exception):
    """A demonstrated property did not hold; the message says which and why."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


def elapsed() -> str:
    return f"{time.monotonic() - T0:6.1f}s"


class Step:
    """``with Step(n, title):`` prints a heading, then the step's duration."""

    def __init__(self, n: int, title: str):
        self.n, self.title = n, title

    def __enter__(self):
        self.t = time.monotonic()
        say(f"\n=== [{self.n}/{STEPS}] {self.title}  (at {elapsed()})")
        return self

    def __exit__(self, exc_type, exc, tb):
        took = time.monotonic() - self.t
        say(f"    ... {'done' if exc_type is None else 'FAILED'} in {took:.1f} s")
        return False


def show(text: str, prefix: str = "    | ") -> None:
    for line in text.rstrip("\n").splitlines() or [""]:
        say(prefix + line)


def local(cmd: list, env: dict | None = None, cwd: Path | None = None, what: str = "") -> str:
    proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        show(proc.stdout[-4000:])
        raise DemoFailure(f"{what or cmd[0]} failed (exit {proc.returncode}); output above")
    return proc.stdout


class Demo:
    def __init__(self, keep: bool):
        self.keep = keep
        self.work = Path(tempfile.mkdtemp(prefix="lockd-demo-"))
        # One log directory per run (concurrent runs must not share files); the
        # newest few are kept.
        self.logs = LOGS / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.work.name.removeprefix('lockd-demo-')}"
        old_logs = sorted(LOGS.glob("2*-*")) if LOGS.is_dir() else []
        for old in old_logs[:-9]:
            shutil.rmtree(old, ignore_errors=True)
        self.cluster: Cluster | None = None
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            # Private Ansible home and collections path: nothing read from or
            # written to ~/.ansible, only the tarball we just built is used.
            ANSIBLE_HOME=str(self.work / "ansible-home"),
            ANSIBLE_COLLECTIONS_PATH=str(self.work / "collections"),
            ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="False",
            ANSIBLE_HOST_KEY_CHECKING="False",
            ANSIBLE_PIPELINING="True",
            ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", NO_COLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="False",
            ANSIBLE_DISPLAY_SKIPPED_HOSTS="False",
            ANSIBLE_SSH_ARGS="-o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null",
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("ANSIBLE_CONFIG", None)

    # -- helpers ----------------------------------------------------------

    def on_host(self, cmd: str, check: bool = True, echo: bool = True) -> subprocess.CompletedProcess:
        assert self.cluster is not None
        if echo:
            say(f"    {HOST}# {cmd}")
        proc = self.cluster.exec(HOST, cmd, check=False, timeout=120)
        if echo:
            out = (proc.stdout + proc.stderr).strip()
            if out:
                show(out)
        if check and proc.returncode != 0:
            raise DemoFailure(f"`{cmd}` on {HOST} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def playbook(self, name: str, *args: str) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name.rsplit('.', 1)[-1]}.log"
        cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(self.work / "inventory.ini"), name, *args]
        say(f"    $ {' '.join(cmd[1:]).replace(str(self.work), '$DEMO')}   (log: {log_path.relative_to(REPO)})")
        t = time.monotonic()
        tail: list[str] = []
        with open(log_path, "w") as log:
            # cwd: the temp dir, so no ansible.cfg of this checkout applies and the
            # playbook really comes from the installed collection.
            proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, text=True, bufsize=1,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                assert proc.stdout is not None
                task = None
                for raw in proc.stdout:
                    line = raw.rstrip("\n")
                    log.write(raw)
                    tail.append(line)
                    del tail[:-80]
                    m = TASK_LINE.match(line)
                    if m:
                        task = m.group(1)
                        continue
                    r = RESULT_LINE.match(line)
                    if r and task is not None:
                        say(f"    {time.monotonic() - t:5.1f}s {r.group(1):8} {task}")
                        task = None
                        continue
                    if SHOW_LINE.search(line):
                        say(f"    {time.monotonic() - t:5.1f}s {line.strip().rstrip('*').strip()}")
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if rc != 0:
            show("\n".join(tail[-40:]), prefix="    ! ")
            raise DemoFailure(f"ansible-playbook {name} failed (exit {rc}); full log {log_path}")

    def daemon_state(self) -> tuple[str, int]:
        p = self.on_host("systemctl show -p ActiveState -p MainPID virtlockd.service", echo=False)
        props = dict(line.split("=", 1) for line in p.stdout.split())
        return props.get("ActiveState", "?"), int(props.get("MainPID", "0") or 0)

    def vm_state(self, vm: str) -> str:
        return self.on_host(f"virsh domstate {vm}", check=False, echo=False).stdout.strip()

    def qemu_pid(self, vm: str) -> int:
        p = self.on_host(f"cat /run/libvirt/qemu/{vm}.pid", check=False, echo=False)
        return int(p.stdout.strip() or 0)

    def expect_refused(self, when: str) -> None:
        p = self.on_host("virsh start vm2", check=False)
        if p.returncode == 0:
            raise DemoFailure(f"vm2 STARTED {when}: the disk vm1 uses was NOT protected")
        if REFUSAL not in p.stderr:
            raise DemoFailure(f"vm2 was refused {when}, but not by the lock manager: {p.stderr.strip()}")
        say(f"    -> vm2 refused by the lock manager {when}, as it must be")

    # -- the steps --------------------------------------------------------

    def run(self) -> None:
        with Step(1, f"Host image: cached Debian 12 rootfs (scripts/build-rootfs.sh {SUITE})"):
            if os.geteuid() != 0:
                raise DemoFailure("must run as root (systemd-nspawn hosts); use `sudo make demo`")
            for tool in ("systemd-nspawn", "mmdebstrap", "ssh"):
                if not shutil.which(tool):
                    raise DemoFailure(f"{tool} not found; run scripts/install-deps.sh (or `make demo`)")
            for tool in ("ansible-galaxy", "ansible-playbook"):
                if not (VENV_BIN / tool).exists():
                    raise DemoFailure(f"{VENV_BIN / tool} missing; run `make venv` (or `make demo`)")
            prepare_rootfs([SUITE])  # the build's progress goes to stderr

        with Step(2, "Build the collection tarball and install it offline into a private path"):
            dist = self.work / "dist"
            local([VENV_BIN / "ansible-galaxy", "collection", "build", "--force", "--output-path", dist, REPO],
                  env=self.env, cwd=self.work, what="ansible-galaxy collection build")
            [tarball] = dist.glob("lockd-virtlockd-*.tar.gz")
            say(f"    built {tarball.name} ({tarball.stat().st_size // 1024} KiB)")
            local([VENV_BIN / "ansible-galaxy", "collection", "install", "--offline", "--force",
                   "-p", self.work / "collections", tarball],
                  env=self.env, cwd=self.work, what="ansible-galaxy collection install --offline")
            out = local([VENV_BIN / "ansible-galaxy", "collection", "list", "lockd.virtlockd"],
                        env=self.env, cwd=self.work, what="ansible-galaxy collection list")
            show("\n".join(line for line in out.splitlines() if "lockd.virtlockd" in line or line.startswith("#")))

        with Step(3, f"Boot the hypervisor {HOST} (systemd-nspawn, systemd as PID 1, libvirt + QEMU inside)"):
            self.cluster = Cluster.create(self.work / "nspawn", {HOST: SUITE})
            h = self.cluster.host(HOST)
            inventory = (
                "[hypervisors]\n"
                f"{HOST} ansible_host={h.address} ansible_user=root "
                f"ansible_ssh_private_key_file={self.cluster.run.key} "
                "ansible_python_interpreter=/usr/bin/python3\n"
            )
            (self.work / "inventory.ini").write_text(inventory)
            say(f"    {HOST} = {h.address} (Debian 12); inventory:")
            show(inventory)
            self.on_host("systemctl is-system-running --wait || true; virsh --version; "
                         "grep -E '^lock_manager' /etc/libvirt/qemu.conf || echo 'no lock manager configured yet'")

        with Step(4, "Roll out: ansible-playbook lockd.virtlockd.site"):
            self.playbook("lockd.virtlockd.site")
            self.on_host("grep -E '^lock_manager' /etc/libvirt/qemu.conf; systemctl is-active virtlockd.socket "
                         "virtlockd-admin.socket virtlockd.service")

        with Step(5, "Smoke test: ansible-playbook lockd.virtlockd.smoke_test (vm1 kept running)"):
            self.playbook("lockd.virtlockd.smoke_test", "-e", "smoke_cleanup=false")

        with Step(6, "Two VMs, one disk: vm1 runs, vm2 is refused"):
            self.on_host("virsh list --all")
            if self.vm_state("vm1") != "running":
                raise DemoFailure(f"vm1 is not running after the smoke test (state {self.vm_state('vm1')!r})")
            vm1_pid = self.qemu_pid("vm1")
            say(f"    -> vm1 running, QEMU pid {vm1_pid}")
            self.expect_refused("while vm1 runs")
            leases = self.on_host("virtlockctl leases")
            if IMAGE not in leases.stdout or "vm1" not in leases.stdout:
                raise DemoFailure(f"virtlockctl leases does not show vm1's lease on {IMAGE}")

        with Step(7, "HEADLINE: SIGKILL the lock daemon; systemd restarts it; the lease survives"):
            state, old_pid = self.daemon_state()
            say(f"    virtlockd.service {state}, main pid {old_pid}")
            self.on_host("systemctl kill -s SIGKILL virtlockd.service")
            deadline = time.monotonic() + 30
            while True:
                state, new_pid = self.daemon_state()
                if state == "active" and new_pid not in (0, old_pid):
                    break
                if time.monotonic() > deadline:
                    raise DemoFailure(f"systemd did not restart virtlockd within 30 s (state {state}, pid {new_pid})")
                time.sleep(0.1)
            say(f"    -> systemd restarted it: main pid {old_pid} -> {new_pid}")
            self.on_host("journalctl -u virtlockd.service --no-pager -n 6 -o cat", check=False)
            status = self.on_host("virtlockctl status")
            recovered = json.loads(self.on_host("virtlockctl --json status", echo=False).stdout)["recovered_leases"]
            if recovered < 1:
                raise DemoFailure(f"the restarted daemon recovered {recovered} leases; vm1's lease was lost")
            if "LOST" in status.stdout:
                raise DemoFailure("the restarted daemon reports LOST leases (see status above)")
            if self.vm_state("vm1") != "running" or self.qemu_pid("vm1") != vm1_pid:
                raise DemoFailure("vm1 did not keep running through the daemon's crash")
            say(f"    -> vm1 still running (same QEMU pid {vm1_pid}); {recovered} lease(s) recovered")
            self.on_host("virtlockctl leases")
            self.expect_refused("after the daemon was SIGKILLed and restarted")
            say("    (Debian's C virtlockd loses every lease when it dies: vm2 would start here,")
            say("     two writers on one disk. tests/systemd/test_c_control.py shows exactly that.)")

        with Step(8, "Hand-over: virsh destroy vm1, then vm2 starts"):
            self.on_host("virsh destroy vm1")
            deadline = time.monotonic() + 10
            while True:
                p = self.on_host("virsh start vm2", check=False)
                if p.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise DemoFailure(f"vm2 still cannot start 10 s after vm1 stopped: {p.stderr.strip()}")
                say("    (vm1's lease not released yet; retrying)")
                time.sleep(1)
            self.on_host("virsh list --all; virtlockctl leases")
            if self.vm_state("vm2") != "running":
                raise DemoFailure("vm2 is not running after a successful virsh start")

    def cleanup(self) -> None:
        with Step(9, "Clean up: VMs destroyed, host powered off and removed" if not self.keep
                  else "Keep: host left running (--keep)"):
            if self.keep and self.cluster is not None:
                harness = f"cd {REPO} && {sys.executable} -m testbed.nspawn"
                say(f"    look around:  {harness} exec {self.work / 'nspawn'} {HOST} -- virsh list --all")
                say(f"    Ansible:      ANSIBLE_COLLECTIONS_PATH={self.work / 'collections'} ANSIBLE_HOST_KEY_CHECKING=False "
                    f"{VENV_BIN / 'ansible'} -i {self.work / 'inventory.ini'} hypervisors -m ping")
                say(f"    remove it:    {harness} destroy {self.work / 'nspawn'} && rm -rf {self.work}")
                return
            # Ansible's ssh control masters for this run (they would linger for 60 s).
            cp = self.work / "ansible-home" / "cp"
            for sock in cp.glob("*") if cp.is_dir() else []:
                subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", HOST],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=10)
            if self.cluster is not None:
                self.cluster.destroy()  # destroys the guests first, then powers the host off
                say(f"    {HOST} removed")
            shutil.rmtree(self.work, ignore_errors=True)


def _terminate(signum, _frame):
    # Ctrl-C, SIGTERM, SIGHUP: unwind through the cleanup (also when started
    # in the background, where SIGINT arrives ignored).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="leave the host running at the end (prints how to remove it)")
    args = ap.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    say("lockd.virtlockd rollout demo: Ansible rolls lockd out to a real systemd hypervisor,")
    say("then two VMs share one disk and the lock daemon is killed in between.")
    demo = Demo(args.keep)
    failure = None
    try:
        demo.run()
    except KeyboardInterrupt as e:
        failure = f"interrupted ({e or 'Ctrl-C'})"
    except (DemoFailure, NspawnError) as e:
        failure = str(e)
    except Exception as e:  # a bug in the demo itself: still clean up, still say so
        failure = f"{type(e).__name__}: {e}"
    try:
        demo.cleanup()
    except KeyboardInterrupt:
        failure = failure or "interrupted during cleanup"
    except Exception as e:
        say(f"    cleanup error: {e}")
        say(f"    leftovers: {sys.executable} -m testbed.nspawn destroy --match lockd-demo-")
        failure = failure or f"cleanup failed: {e}"
    say("")
    if failure:
        say(f"DEMO FAILED: {failure}  (after {time.monotonic() - T0:.0f} s)")
        say(f"  Ansible logs: {demo.logs.relative_to(REPO)}/; rerun with --keep to investigate the host.")
        return 1
    say(f"DEMO PASSED in {time.monotonic() - T0:.0f} s: the rollout worked, vm2 was refused while vm1 ran,")
    say("  also after the lock daemon was SIGKILLed, and started once vm1 stopped.")
    say("Next steps:")
    say("  make test                                             the whole suite")
    say("  make demo-local                                       the same lock check without Ansible (this machine's libvirtd)")
    say("  ansible-playbook -i inventory lockd.virtlockd.site    roll it out to your hypervisors (group 'hypervisors')")
    say("  ansible-playbook -i inventory lockd.virtlockd.smoke_test -l <one host>   prove it there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
