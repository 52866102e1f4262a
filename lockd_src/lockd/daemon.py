# SPDX-License-Identifier: GPL-3.0-or-later
"""``virtlockd``: command line, pid file, and the daemon's life cycle.

:class:`Daemon` does ``startup()`` (config, logging, pid file, then either
the state of a live re-exec or a cold start: sockets from systemd or bound
here, leases recovered from the fd store and journal), then ``serve()``, then
``shutdown()`` (close connections, keep every lease). A cold start and a
re-exec both end in one :class:`~lockd.state.DaemonState`, so there is one
path after start-up. Signals are handled on the loop by ``handle_term``,
``handle_usr1`` (live re-exec) and ``handle_hup`` (reload the configuration),
as gunicorn's arbiter does.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import getopt
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Dict, List, Optional

from . import __version__
from . import admin
from . import config as cfgmod
from . import handover
from . import protocol as P
from .errors import Fatal
from .filelock import probe_lock_type
from .journal import Journal
from .lockspace import Locks
from .logs import setup_logging
from .fencing import FILE as FENCING_FILE
from .fencing import Fencer
from .offload import Offload
from .loop import EventLoop
from .program import LockProgram
from .recovery import recover
from .server import Server, bind_unix
from .state import DaemonState, Recorder
from .storage import Storage
from .watchdog import Watchdog
from .systemd import Notifier, listen_fds_with_names

log = logging.getLogger("lockd")

USAGE = """\
Usage:
  %(prog)s [options]

Options:
  -h | --help            Display program help
  -v | --verbose         Verbose messages
  -d | --daemon          Run as a daemon & write PID file
  -t | --timeout <secs>  Exit after timeout period
  -f | --config <file>   Configuration file
  -V | --version         Display version information
  -p | --pid-file <file> Change name of PID file

libvirt lock management daemon (lockd %(version)s, a Python drop-in for virtlockd):

  Default paths:

    Configuration file (unless overridden by -f):
      %(config)s

    Sockets:
      %(sock)s
      %(admin)s

    PID file (unless overridden by -p):
      %(pidfile)s
"""

JOURNAL_FILE = "journal.jsonl"


# ------------------------------------------------------------------- options


class Options:
    """The command line, as libvirt's virtlockd takes it."""

    daemon = False
    verbose = False
    timeout = 0
    config: Optional[str] = None
    pid_file: Optional[str] = None


def parse_args(argv: List[str], prog: str) -> Options:
    o = Options()
    try:
        opts, rest = getopt.getopt(argv, "df:p:t:vVh",
                                   ["daemon", "config=", "pid-file=", "timeout=", "verbose", "version", "help"])
    except getopt.GetoptError as e:
        sys.stderr.write("%s: %s\n" % (prog, e))
        sys.stderr.write(usage(prog))
        sys.exit(1)
    if rest:
        sys.stderr.write("%s: unexpected argument %r\n" % (prog, rest[0]))
        sys.stderr.write(usage(prog))
        sys.exit(1)
    for k, v in opts:
        if k in ("-d", "--daemon"):
            o.daemon = True
        elif k in ("-v", "--verbose"):
            o.verbose = True
        elif k in ("-t", "--timeout"):
            try:
                o.timeout = int(v)
                if o.timeout < 0 or o.timeout > 2147483:
                    raise ValueError
            except ValueError:
                sys.stderr.write("%s: Invalid value for timeout\n" % prog)
                sys.exit(1)
        elif k in ("-f", "--config"):
            o.config = v
        elif k in ("-p", "--pid-file"):
            o.pid_file = v
        elif k in ("-V", "--version"):
            print("%s (libvirt) 9.0.0 (lockd %s)" % (prog, __version__))
            sys.exit(0)
        elif k in ("-h", "--help"):
            print(usage(prog), end="")
            sys.exit(0)
    return o


def usage(prog: str) -> str:
    sock, admin, pidfile, config = default_paths()
    return USAGE % {"prog": prog, "version": __version__, "config": config, "sock": sock,
                    "admin": admin, "pidfile": pidfile}


def privileged() -> bool:
    return os.geteuid() == 0


def default_paths():
    if privileged():
        return P.LOCK_SOCKET, P.ADMIN_SOCKET, P.PID_FILE, P.CONFIG_FILE
    rt = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    cfg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return (os.path.join(rt, "libvirt", "virtlockd-sock"), os.path.join(rt, "libvirt", "virtlockd-admin-sock"),
            os.path.join(rt, "libvirt", "virtlockd.pid"), os.path.join(cfg, "libvirt", "virtlockd.conf"))


# ------------------------------------------------------------------- pid file


def acquire_pidfile(path: str) -> int:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise Fatal("Failed to acquire pid file '%s': another virtlockd is running" % path)
            raise Fatal("Failed to acquire pid file '%s': %s" % (path, e.strerror))
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd


def rewrite_pidfile(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, str(os.getpid()).encode())


# ------------------------------------------------------------------- daemonize


def daemonize() -> int:
    """Double fork; returns the write end of the status pipe in the grandchild."""
    r, w = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        data = os.read(r, 1)
        os.waitpid(pid, 0)
        sys.exit(0 if data == b"\0" else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return w


# ------------------------------------------------------------------- the daemon


class Daemon:
    """One daemon process: ``startup()``, ``serve()``, ``shutdown()``."""

    SIGNALS = {signal.SIGTERM: "handle_term", signal.SIGINT: "handle_term", signal.SIGQUIT: "handle_term",
               signal.SIGUSR1: "handle_usr1", signal.SIGHUP: "handle_hup"}

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.sock_path, self.admin_path, default_pid, self.default_cfg = default_paths()
        self.pid_path = opts.pid_file or default_pid
        self.state: Optional[DaemonState] = None
        self.server: Optional[Server] = None
        self.loop = EventLoop()
        self.notifier = Notifier()
        self.pidfile_fd: Optional[int] = None
        self.restart_path = ""
        self.reexec_requested = False
        self._idle_since = time.monotonic()

    # -- start-up ---------------------------------------------------------------

    def startup(self) -> None:
        # Start-up builds the whole state (possibly tens of thousands of leases and
        # connections): no cyclic GC until it is built and frozen below.
        gc.disable()
        opts = self.opts
        cfg = cfgmod.load(opts.config or self.default_cfg, required=opts.config is not None)
        setup_logging(cfg, opts.verbose, opts.daemon)
        state_dir = self._state_dir(cfg)
        self.restart_path = os.path.join(state_dir, handover.STATE_FILE)
        exec_data = handover.load(self.restart_path)
        status_fd = None
        if opts.daemon and exec_data is None:
            status_fd = daemonize()
            setup_logging(cfg, opts.verbose, True)
        _raise_nofile()
        if exec_data is not None and exec_data.get("pidfile_fd") is not None:
            self.pidfile_fd = exec_data["pidfile_fd"]
            os.set_inheritable(self.pidfile_fd, False)
        else:
            self.pidfile_fd = acquire_pidfile(self.pid_path)

        if exec_data is not None:
            lock_type, fdstore = exec_data["lock_type"], exec_data["fdstore"]
        else:
            lock_type = probe_lock_type(cfg["lock_type"])
            if lock_type != cfg["lock_type"]:
                log.warning("OFD locks are not supported here; using classic POSIX locks (leases will not "
                            "survive a daemon crash)")
            env_fdstore = os.environ.get("FDSTORE")
            fdstore = self.notifier.enabled and lock_type == "ofd" and env_fdstore != "0"
        journal = Journal(os.path.join(state_dir, JOURNAL_FILE))
        state = self.state = DaemonState(cfg, Locks(lock_type), Recorder(journal, self.notifier, fdstore),
                                         self.loop, privileged=privileged())
        server = self.server = Server(state, LockProgram(state))
        server.add_endpoint(admin.endpoint(state))
        if exec_data is not None:
            t0 = time.monotonic()
            journal.open()
            handover.apply(state, server, exec_data)
            del exec_data
            log.info("re-exec complete: %d clients, %d leases kept (state restored in %.0f ms)",
                     len(state.clients), state.locks.count(), (time.monotonic() - t0) * 1000)
        else:
            stored = self._take_sockets()
            recover(state, journal.path, stored)
            journal.open()
            state.recorder.compact()

        self._start_storage(state, server, state_dir)
        self.loop.catch_signals(self.SIGNALS)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.loop.on_signal = self.on_signal
        self.loop.after_turn.append(state.recorder.flush)
        if opts.timeout:
            self.loop.max_wait = 1.0
            self.loop.after_turn.append(self._check_idle)
        # the state built so far is long-lived: keep it out of every future GC pass
        gc.collect()
        gc.freeze()
        gc.enable()
        rewrite_pidfile(self.pidfile_fd)
        if status_fd is not None:
            os.write(status_fd, b"\0")
            os.close(status_fd)
        self.notifier.ready("serving %d leases, %d clients" % (state.locks.count(), len(state.clients)))
        log.info("lockd %s serving (pid %d, %s locks%s)", __version__, os.getpid(), lock_type,
                 ", fd store" if fdstore else "")

    def _start_storage(self, state: DaemonState, server: Server, state_dir: str) -> None:
        """Worker threads for network filesystems (docs/design.md, "Hung storage")."""
        cfg = state.cfg
        if cfg["storage_workers"] == "none":
            return
        state.storage = Storage(self.loop, state.locks, cfg["io_timeout"], cfg["storage_workers"])
        server.program.offload = state.offload = Offload(state, state.storage)
        fencer = Fencer(state.owners, cfg["on_lockfailure"], os.path.join(state_dir, FENCING_FILE))
        fencer.load()
        state.watchdog = Watchdog(state, state.storage, fencer, cfg["io_timeout"], cfg["nfs_lease_time"])
        state.storage.adopt_held()

    def _state_dir(self, cfg: dict) -> str:
        if privileged() or (self.opts.config and cfg.get("state_dir") != cfgmod.DEFAULTS["state_dir"]):
            state_dir = cfg["state_dir"]
        else:
            state_dir = os.path.join(os.path.dirname(default_paths()[2]), "lockd")
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise Fatal("cannot create state directory %s: %s" % (state_dir, e.strerror)) from None
        return state_dir

    def _take_sockets(self) -> Dict[str, int]:
        """Listening sockets from systemd (by name), else bound here; returns
        the fd-store entries that came with them."""
        stored: Dict[str, int] = {}
        kinds = {P.LOCK_FD_NAME: "lock", P.ADMIN_FD_NAME: "admin"}
        for fd, name in listen_fds_with_names().items():
            if name in kinds:
                try:
                    sock = socket.socket(fileno=fd)
                except OSError as e:
                    raise Fatal("socket activation fd %d (%s) is unusable: %s; check the .socket units"
                                % (fd, name, e.strerror)) from None
                self.server.add_listener(sock, kinds[name])
                self.state.socket_activated = True
            else:
                stored[name] = fd
        if not self.state.socket_activated:
            self.server.add_listener(bind_unix(self.sock_path), "lock")
            self.server.add_listener(bind_unix(self.admin_path), "admin")
        return stored

    # -- serving ----------------------------------------------------------------

    def serve(self) -> None:
        while True:
            self.loop.run()
            if not self.reexec_requested:
                return
            self.reexec_requested = False
            handover.reexec(self.state, self.server, self.pidfile_fd, self.restart_path)  # returns on failure
            self.notifier.ready("re-exec failed; still serving")

    def on_signal(self, signo: int) -> None:
        getattr(self, self.SIGNALS.get(signo, "handle_unexpected"))(signo)

    def handle_term(self, signo: int) -> None:
        log.info("caught signal %d: stopping (leases are kept for the next start)", signo)
        self.notifier.stopping()
        self.loop.stop()

    def handle_usr1(self, signo: int) -> None:
        self.reexec_requested = True
        self.loop.stop()

    def handle_hup(self, signo: int) -> None:
        opts = self.opts
        try:
            cfg = cfgmod.load(opts.config or self.default_cfg, required=opts.config is not None)
            setup_logging(cfg, opts.verbose, opts.daemon)
        except (cfgmod.ConfigError, Fatal) as e:
            log.error("SIGHUP: keeping the old configuration: %s", e)
            return
        for key in ("max_clients", "admin_max_clients", "max_clients_grace", "log_level", "log_filters",
                    "log_outputs"):
            self.state.cfg[key] = cfg[key]
        log.warning("SIGHUP: configuration reloaded (max_clients=%d)", cfg["max_clients"])
        self.server.slot_freed()

    def handle_unexpected(self, signo: int) -> None:
        log.warning("ignoring signal %d", signo)

    def _check_idle(self) -> None:
        s = self.state
        if s.clients or s.admins or s.waiting or s.locks.count():
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since >= self.opts.timeout:
            log.info("no clients and no leases for %d s: exiting (--timeout)", self.opts.timeout)
            self.loop.stop()

    # -- stop -------------------------------------------------------------------

    def shutdown(self) -> None:
        self.server.close_all()
        self.state.recorder.compact()
        journal = self.state.recorder.journal
        if journal is not None:
            try:
                journal.close()
            except OSError as e:
                log.critical("cannot write the last journal records to %s: %s", journal.path, e.strerror)
        try:
            os.unlink(self.pid_path)
        except OSError:
            pass
        self.notifier.close()


def _raise_nofile() -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


# ------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "virtlockd"
    if prog in ("__main__.py", "-m", "-c"):
        prog = "virtlockd"
    opts = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        daemon = Daemon(opts)
        daemon.startup()
        daemon.serve()
        daemon.shutdown()
        return 0
    except Fatal as e:
        sys.stderr.write("%s: %s\n" % (prog, e))
        log.critical("%s", e)
        return 1
    except cfgmod.ConfigError as e:
        sys.stderr.write("%s: %s\n" % (prog, e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
