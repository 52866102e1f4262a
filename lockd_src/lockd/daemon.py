# SPDX-License-Identifier: GPL-3.0-or-later
"""``virtlockd``: command line, start-up, recovery, signals and live re-exec.

Life cycle: parse options -> config -> logging -> pid file -> restore from a
re-exec state file, or cold start (daemonize, sockets from systemd or bound
here, recover leases from the fd store and journal) -> ``READY=1`` -> serve ->
on SIGTERM close connections but keep every lease; on SIGUSR1 re-exec in place
keeping every fd.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import getopt
import json
import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
import time
from typing import Dict, List, Optional

from . import __version__
from . import config as cfgmod
from . import owners as own
from . import protocol as P
from .journal import Journal, write_atomic
from .lockspace import AUTOCREATE, SHARED, Locks, probe_lock_type, set_lock
from .rpc import RPCError
from .server import LockConn, Server
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

RESTART_FILE = "restart-exec.json"
JOURNAL_FILE = "journal.jsonl"


class Fatal(Exception):
    """Start-up cannot continue; the message is for the operator."""


# ------------------------------------------------------------------- options


class Options:
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


# ------------------------------------------------------------------- logging

_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def setup_logging(cfg: dict, verbose: bool, daemonized: bool) -> None:
    root = logging.getLogger("lockd")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = _LEVELS.get(cfg.get("log_level") or 3, logging.WARNING)
    if verbose and level > logging.INFO:
        level = logging.INFO
    env_outputs = os.environ.get("LIBVIRT_LOG_OUTPUTS")
    outputs = env_outputs if env_outputs is not None else cfg.get("log_outputs") or ""
    if os.environ.get("LIBVIRT_DEBUG"):
        level = logging.DEBUG
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(message)s" if journal else "%(asctime)s: %(process)d: %(levelname)s : %(message)s"
    handlers = []
    for spec in outputs.split():
        parts = spec.split(":", 2)
        try:
            out_level = _LEVELS.get(int(parts[0]), logging.WARNING)
        except ValueError:
            raise Fatal("invalid log output %r in log_outputs: expected LEVEL:TYPE[:ARG]" % spec)
        kind = parts[1] if len(parts) > 1 else "stderr"
        if kind == "file" and len(parts) == 3:
            try:
                os.makedirs(os.path.dirname(parts[2]) or ".", exist_ok=True)
                h = logging.FileHandler(parts[2])
            except OSError as e:
                raise Fatal("cannot open log file %s: %s" % (parts[2], e.strerror))
            h.setFormatter(logging.Formatter("%(asctime)s: %(process)d: %(levelname)s : %(message)s"))
        elif kind == "syslog":
            try:
                h = logging.handlers.SysLogHandler(address="/dev/log")
                h.ident = (parts[2] if len(parts) == 3 else "virtlockd") + ": "
            except OSError:
                h = logging.StreamHandler(sys.stderr)
        elif kind in ("stderr", "journald"):
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(_JournalFormatter(fmt) if journal else logging.Formatter(fmt))
        else:
            raise Fatal("unknown log output type %r in log_outputs (use stderr, file, syslog or journald)" % kind)
        h.setLevel(out_level)
        handlers.append(h)
    if not handlers:
        if daemonized and not journal:
            path = "/var/log/libvirt/virtlockd.log" if privileged() else os.path.join(
                os.path.expanduser("~"), ".cache", "libvirt", "virtlockd.log")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                h = logging.FileHandler(path)
            except OSError:
                h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s: %(process)d: %(levelname)s : %(message)s"))
        else:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(_JournalFormatter(fmt) if journal else logging.Formatter(fmt))
        handlers.append(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(min([level] + [h.level or level for h in handlers]))
    root.propagate = False


class _JournalFormatter(logging.Formatter):
    """Prefix ``<N>`` syslog priorities so journald keeps the level."""

    _PRI = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record):
        return "<%d>%s" % (self._PRI.get(record.levelno, 6), super().format(record))


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


# ------------------------------------------------------------------- sockets


def bind_unix(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        # libvirt unlinks whatever is there; if a daemon still serves that path
        # every new client would silently go to us instead: refuse.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            raise Fatal("another daemon is already serving %s; stop it first (systemctl stop "
                        "virtlockd.socket virtlockd.service) or use socket activation" % path)
        except OSError:
            pass  # stale: nobody listens
        finally:
            probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        s.bind(path)
    except OSError as e:
        s.close()
        raise Fatal("Failed to bind socket to '%s': %s" % (path, e.strerror))
    finally:
        os.umask(old)
    s.listen(socket.SOMAXCONN)
    return s


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


# ------------------------------------------------------------------- recovery


def recover(server: Server, journal_path: str, stored: Dict[str, int]) -> None:
    """Take back leases after a restart: from fds systemd kept (no gap at all)
    or by re-locking from the journal (a gap while no daemon ran)."""
    state = Journal.replay(journal_path)
    locks = server.locks
    infos = {int(k): own.OwnerInfo.from_json(v) for k, v in state["owners"].items()}
    seq = state.get("next_fd", 0)
    for name in stored:
        if name.startswith("lease-"):
            try:
                seq = max(seq, int(name[6:]))
            except ValueError:
                pass
    server.fd_seq = seq
    for key in state["lockspaces"]:
        try:
            locks.create_lockspace(key)
        except RPCError as e:
            log.error("could not restore lockspace %s: %s", key, e)
    for (lskey, name), r in state["resources"].items():
        fd = stored.pop(r["fdname"], None) if r.get("fdname") else None
        alive = [(pid, since) for pid, since in r["owners"]
                 if own.alive(pid, infos[pid].start_time if pid in infos else None)]
        desc = "lease %r in lockspace %r" % (name, lskey)
        if not alive:
            if fd is not None:
                _drop_stale_fd(server, fd, r)
            log.info("%s: its owners are gone; released", desc)
            continue
        for pid, _since in alive:
            if pid in infos and pid not in server.owners:
                server.owners[pid] = infos[pid]
        ls = locks.lockspaces.get(lskey)
        if ls is None:
            try:
                ls = locks.create_lockspace(lskey)
            except RPCError as e:
                _lost(server, r, alive, "lockspace cannot be restored: %s" % e, fd)
                continue
        if fd is not None:
            st = os.fstat(fd)
            if r.get("ino") is not None and (st.st_dev, st.st_ino) != (r["dev"], r["ino"]):
                log.warning("%s: the stored fd is for another file; re-locking by path", desc)
                os.close(fd)
                fd = None
        try:
            if fd is not None:
                res = locks.adopt(ls, name, r["path"], fd, r["flags"], alive)
                res.fdname = r["fdname"]
                for pid, _since in alive:
                    server._count_lease(pid, 1)
                server.recovered += 1
            else:
                first, since = alive[0]
                res = locks.acquire(ls, name, first, r["flags"], when=since)
                for pid, since in alive[1:]:
                    locks.add_owner(res, pid, since)
                    server._count_lease(pid, 1)
                server.recovered += 1
                log.warning("%s re-locked from the journal (it was unprotected while no daemon ran)", desc)
        except (RPCError, OSError) as e:
            _lost(server, r, alive, str(e), None)
            continue
        for pid, _since in alive:
            server._ensure_watched(pid)
    for name, fd in stored.items():
        if name.startswith("lease-"):
            log.warning("fd store entry %s is not in the journal; dropping it", name)
            server.notifier.fdstore_remove(name)
        else:
            log.error("Some activation file descriptors are unclaimed: %s", name)
        os.close(fd)
    if server.recovered or server.lost:
        log.warning("recovery: %d leases taken back, %d lost", server.recovered, len(server.lost))


def _drop_stale_fd(server: Server, fd: int, r: dict) -> None:
    if r["flags"] & AUTOCREATE:
        try:
            if r["flags"] & SHARED:
                set_lock(fd, fcntl.F_WRLCK, server.locks.lock_type)
            os.unlink(r["path"])
        except OSError:
            pass
    try:
        set_lock(fd, fcntl.F_UNLCK, server.locks.lock_type)   # systemd's copy shares this lock
    except OSError:
        pass
    if r.get("fdname"):
        server.notifier.fdstore_remove(r["fdname"])
    os.close(fd)


def _lost(server: Server, r: dict, alive, reason: str, fd: Optional[int]) -> None:
    entry = {"lockspace": r["ls"], "resource": r["name"], "path": r["path"],
             "owners": [entry[0] for entry in alive], "reason": reason}
    server.lost.append(entry)
    log.critical("LEASE LOST: %r in lockspace %r held by pid(s) %s could not be re-taken: %s. "
                 "That VM now runs WITHOUT lock protection; check for a second writer and stop one.",
                 r["name"], r["ls"], ", ".join(str(p) for p in entry["owners"]), reason)
    if fd is not None:
        os.close(fd)


# ------------------------------------------------------------------- re-exec


def exec_argv() -> List[str]:
    argv0 = sys.argv[0]
    if argv0.endswith("__main__.py") or argv0 == "-m":
        return [sys.executable, "-m", "lockd"] + sys.argv[1:]
    return [sys.executable, argv0] + sys.argv[1:]


# State format for the re-exec hand-over (private to this package; lists, not
# dicts, because with 10,000 VMs it holds tens of thousands of entries).
EXEC_FORMAT = 2


def save_for_exec(server: Server, pidfd: Optional[int], path: str) -> List[int]:
    fds: List[int] = []
    clients = []
    for c in server.clients.values():
        o = c.owner
        clients.append([c.fd, c.id, c.pid, c.uid, c.restricted, c.own, c.connected_at, c.rbuf.hex(),
                        c.wbuf.hex(), None if o is None else [o.uuid.hex(), o.name, o.id, o.pid]])
        fds.append(c.fd)
    resources = []
    for res in server.locks.resources():
        resources.append([res.lockspace.key, res.name, res.path, res.fd, res.flags, res.fdname, res.dev,
                          res.ino, [[p, res.since.get(p, 0.0)] for p in res.owners]])
        fds.append(res.fd)
    listeners = [[fd, entry[1]] for fd, entry in server.listeners.items()]
    fds.extend(fd for fd in server.listeners)
    state = {
        "magic": str(os.getpid()), "format": EXEC_FORMAT, "listeners": listeners, "clients": clients,
        "lockspaces": [k for k in server.locks.lockspaces if k], "resources": resources,
        "owners": [dict(i.to_json(), connected=i.connected) for i in server.owners.values()],
        "fd_seq": server.fd_seq, "started": server.started, "socket_activated": server.socket_activated,
        "recovered": server.recovered, "lost": server.lost, "next_client_id": server.next_client_id,
        "pidfile_fd": pidfd, "fdstore": server.fdstore, "lock_type": server.locks.lock_type,
        "journal_lines": server.journal.lines if server.journal else 0, "live": server.live,
    }
    if pidfd is not None:
        fds.append(pidfd)
    write_atomic(path, json.dumps(state, separators=(",", ":")).encode(), 0o600, fsync=False)
    return fds


def restore_from_exec(path: str):
    """Read and unlink the state file; None unless it was written by this pid."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        state = json.loads(data)
    except ValueError:
        log.critical("restart exec file %s is corrupt; cold start (connections inherited across the "
                     "re-exec are lost)", path)
        return None
    if state.get("magic") != str(os.getpid()):
        log.warning("Found restart exec file with old magic %s vs wanted %d", state.get("magic"), os.getpid())
        return None
    if state.get("format") != EXEC_FORMAT:
        log.critical("restart exec file %s has format %r, this version reads %d; cold start",
                     path, state.get("format"), EXEC_FORMAT)
        return None
    return state


def apply_exec_state(server: Server, state: dict) -> None:
    import select
    from .lockspace import LockSpace, Resource
    locks = server.locks
    for fd, kind in state["listeners"]:
        os.set_inheritable(fd, False)
        server.add_listener(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), kind)
    for key in state["lockspaces"]:
        if key not in locks.lockspaces:
            locks.lockspaces[key] = LockSpace(key, key)
    for o in state["owners"]:
        info = own.OwnerInfo.from_json(o)
        info.journaled = True    # the journal is carried over as it is
        server.owners[info.pid] = info
    set_inheritable = os.set_inheritable
    by_inode = locks.by_inode
    count = server._count_lease
    for lskey, name, path, fd, flags, fdname, dev, ino, owners in state["resources"]:
        # the same process keeps the same open file descriptions: the locks are
        # still ours, no fstat or re-lock needed
        set_inheritable(fd, False)
        ls = locks.lockspaces[lskey]
        res = Resource(ls, name, path, fd, flags, dev, ino)
        res.fdname = fdname
        for pid, since in owners:
            locks.add_owner(res, pid, since)
            count(pid, 1)
        ls.resources[name] = res
        by_inode.setdefault((dev, ino), []).append(res)
    for fd, cid, pid, uid, restricted, is_own, connected_at, rbuf, wbuf, o in state["clients"]:
        set_inheritable(fd, False)
        conn = LockConn(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd), cid, pid, uid)
        conn.restricted = restricted
        conn.connected_at = connected_at
        if o is not None:
            conn.owner = P.Owner(bytes.fromhex(o[0]), o[1], o[2], o[3])
            conn.own = is_own
            if is_own:
                server._owner_info(conn.owner).connected += 1
        conn.rbuf = bytes.fromhex(rbuf)
        conn.wbuf = bytes.fromhex(wbuf)
        if conn.wbuf:
            conn.mask = select.EPOLLOUT
        server.clients[fd] = conn
        server.add_handler(fd, conn.mask, server._on_client)
    server.fd_seq = state["fd_seq"]
    server.started = state["started"]
    server.socket_activated = state["socket_activated"]
    server.recovered = state["recovered"]
    server.lost = state["lost"]
    server.next_client_id = state["next_client_id"]
    server.live = state["live"]
    if server.journal is not None:
        server.journal.lines = state["journal_lines"]
    for pid in list(server.owner_leases):
        server._ensure_watched(pid)
    # replies that were half written and requests that were half read go on
    for conn in list(server.clients.values()):
        if conn.rbuf and not conn.wbuf:
            buf, conn.rbuf = conn.rbuf, b""
            server._process(conn, buf)


# ------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "virtlockd"
    if prog in ("__main__.py", "-m", "-c"):
        prog = "virtlockd"
    opts = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        return run(opts)
    except Fatal as e:
        sys.stderr.write("%s: %s\n" % (prog, e))
        log.critical("%s", e)
        return 1
    except cfgmod.ConfigError as e:
        sys.stderr.write("%s: %s\n" % (prog, e))
        return 1


def run(opts: Options) -> int:
    # Start-up builds the whole state (possibly tens of thousands of leases and
    # connections): no cyclic GC until it is built and frozen below.
    gc.disable()
    sock_path, admin_path, default_pid, default_cfg = default_paths()
    cfg = cfgmod.load(opts.config or default_cfg, required=opts.config is not None)
    setup_logging(cfg, opts.verbose, opts.daemon)
    state_dir = cfg["state_dir"] if privileged() else os.path.join(os.path.dirname(default_pid), "lockd")
    if opts.config and cfg.get("state_dir") != cfgmod.DEFAULTS["state_dir"]:
        state_dir = cfg["state_dir"]
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise Fatal("cannot create state directory %s: %s" % (state_dir, e.strerror))
    restart_path = os.path.join(state_dir, RESTART_FILE)
    exec_state = restore_from_exec(restart_path)

    status_fd = None
    if opts.daemon and exec_state is None:
        status_fd = daemonize()
        setup_logging(cfg, opts.verbose, True)

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass

    pid_path = opts.pid_file or default_pid
    if exec_state is not None and exec_state.get("pidfile_fd") is not None:
        pidfd = exec_state["pidfile_fd"]
        os.set_inheritable(pidfd, False)
    else:
        pidfd = acquire_pidfile(pid_path)

    notifier = Notifier()
    lock_type = probe_lock_type(cfg["lock_type"]) if exec_state is None else exec_state["lock_type"]
    if lock_type != cfg["lock_type"]:
        log.warning("OFD locks are not supported here; using classic POSIX locks (leases will not "
                    "survive a daemon crash)")
    env_fdstore = os.environ.get("FDSTORE")
    fdstore = notifier.enabled and lock_type == "ofd" and (env_fdstore is None or env_fdstore != "0")
    if exec_state is not None:
        fdstore = exec_state["fdstore"]
    journal = Journal(os.path.join(state_dir, JOURNAL_FILE))
    server = Server(cfg, Locks(lock_type), notifier, journal, fdstore=fdstore, privileged=privileged())
    server.idle_timeout = opts.timeout

    if exec_state is not None:
        t0 = time.monotonic()
        journal.open()
        apply_exec_state(server, exec_state)
        del exec_state
        log.info("re-exec complete: %d clients, %d leases kept (state restored in %.0f ms)",
                 len(server.clients), server.locks.count(), (time.monotonic() - t0) * 1000)
    else:
        fds = listen_fds_with_names()
        stored: Dict[str, int] = {}
        got_lock = got_admin = False
        for fd, name in fds.items():
            if name in (P.LOCK_FD_NAME, P.ADMIN_FD_NAME):
                try:
                    sock = socket.socket(fileno=fd)
                except OSError as e:
                    raise Fatal("socket activation fd %d (%s) is unusable: %s; check the .socket units"
                                % (fd, name, e.strerror))
                server.add_listener(sock, "lock" if name == P.LOCK_FD_NAME else "admin")
                got_lock = got_lock or name == P.LOCK_FD_NAME
                got_admin = got_admin or name == P.ADMIN_FD_NAME
            else:
                stored[name] = fd
        server.socket_activated = got_lock or got_admin
        if not server.socket_activated:
            server.add_listener(bind_unix(sock_path), "lock")
            server.add_listener(bind_unix(admin_path), "admin")
        recover(server, journal.path, stored)
        journal.open()
        server.compact()

    server.install_signals()
    state = {"reexec": False}

    def on_signal(signo: int) -> None:
        if signo in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            log.info("caught signal %d: stopping (leases are kept for the next start)", signo)
            notifier.stopping()
            server.stopping = True
        elif signo == signal.SIGUSR1:
            state["reexec"] = True
            server.stopping = True
        elif signo == signal.SIGHUP:
            reload_config(server, opts, default_cfg)

    server.on_signal = on_signal
    # the state built so far is long-lived: keep it out of every future GC pass
    gc.collect()
    gc.freeze()
    gc.enable()
    rewrite_pidfile(pidfd)
    if status_fd is not None:
        os.write(status_fd, b"\0")
        os.close(status_fd)
    leases = server.locks.count()
    notifier.ready("serving %d leases, %d clients" % (leases, len(server.clients)))
    log.info("lockd %s serving (pid %d, %s locks%s)", __version__, os.getpid(), lock_type,
             ", fd store" if fdstore else "")

    while True:
        server.run()
        if state["reexec"]:
            state["reexec"] = False
            reexec(server, pidfd, restart_path)   # returns only on failure
            server.stopping = False
            notifier.ready("re-exec failed; still serving")
            continue
        break

    server.close_all()
    server.compact()
    journal.close()
    try:
        os.unlink(pid_path)
    except OSError:
        pass
    notifier.close()
    return 0


def reexec(server: Server, pidfd: int, restart_path: str) -> None:
    server.notifier.reloading()
    for a in list(server.admins.values()):
        a.close()
    for pid in list(server.kills):
        server._kill_done(pid)
    for pid in list(server.owner_watch):
        server._unwatch(pid)
    # Flush what we can of pending replies; the rest is saved in the state.
    for c in list(server.clients.values()):
        if c.wbuf:
            server._flush(c)
    t0 = time.monotonic()
    gc.disable()             # tens of thousands of short-lived objects: no cyclic GC passes
    fds = save_for_exec(server, pidfd, restart_path)
    for fd in fds:
        os.set_inheritable(fd, True)
    server.journal.close()
    argv = exec_argv()
    log.info("re-exec: %s (state of %d clients and %d leases written in %.0f ms)", " ".join(argv),
             len(server.clients), server.locks.count(), (time.monotonic() - t0) * 1000)
    for h in logging.getLogger("lockd").handlers:
        h.flush()
    signal.set_wakeup_fd(-1)
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        gc.enable()
        log.error("re-exec of %s failed: %s; continuing with the running image", argv[0], e.strerror)
        for fd in fds:
            os.set_inheritable(fd, False)
        try:
            os.unlink(restart_path)
        except OSError:
            pass
        server.journal.open()
        server.install_signals()
        for pid in list(server.owner_leases):
            server._ensure_watched(pid)


def reload_config(server: Server, opts: Options, default_cfg: str) -> None:
    try:
        cfg = cfgmod.load(opts.config or default_cfg, required=opts.config is not None)
        setup_logging(cfg, opts.verbose, opts.daemon)
    except (cfgmod.ConfigError, Fatal) as e:
        log.error("SIGHUP: keeping the old configuration: %s", e)
        return
    for key in ("max_clients", "admin_max_clients", "max_clients_grace", "log_level", "log_filters",
                "log_outputs"):
        server.cfg[key] = cfg[key]
    log.warning("SIGHUP: configuration reloaded (max_clients=%d)", cfg["max_clients"])
    server._admit_waiting()


if __name__ == "__main__":
    sys.exit(main())
