# SPDX-License-Identifier: GPL-3.0-or-later
"""stallfs: a FUSE passthrough filesystem that hangs, fails or loses locks on demand.

The host kernel has no NFS (see the NFS test bed for real servers), but it
has FUSE, and a FUSE filesystem whose daemon is stopped behaves like an NFS
hard mount whose server is unreachable: every call on it blocks, with no
error, until the daemon runs again. This module is both that daemon (run as
``python -m testbed.stallfs BACKING MOUNTPOINT``; it speaks the FUSE protocol
on ``/dev/fuse`` itself, no libfuse, and mounts with ``mount(2)``: root only)
and :class:`StallFS`, the test side that starts it and drives it:

* :meth:`StallFS.stall` / :meth:`StallFS.resume`: SIGSTOP / SIGCONT the daemon
  (calls block, then complete, like a partition and its end);
* :meth:`StallFS.fail_io`: every call answers EIO (a soft mount, or the NFS
  client after it lost its state);
* :meth:`StallFS.drop_locks`: the "server" forgets every lock taken through
  the mount (an expired NFSv4 lease): another process can then take them on
  the backing files, and F_GETLK through the mount reports that conflict.

Byte-range locks are served by the daemon (``FUSE_POSIX_LOCKS``): each open
file handle is one open file description of the backing file, so OFD locks
through the mount conflict with each other and with locks taken on the
backing file directly, as locks of two NFS clients do. The filesystem's
``statfs`` type is FUSE's magic (0x65735546), a network filesystem for lockd.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = "QQQQQQIIIIIIIIII"
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR)
ATTR_OUT = struct.Struct("<QII" + ATTR)
OPEN_OUT = struct.Struct("<QII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
LK_IN = struct.Struct("<QQQQIIII")
LK_OUT = struct.Struct("<QQII")
RW_IN = struct.Struct("<QQIIQII")
KSTATFS = struct.Struct("<QQQQQIIII24x")
FLOCK = struct.Struct("hhqqi4x")
OFFSET_MAX = 0x7FFFFFFFFFFFFFFF
F_OFD_GETLK, F_OFD_SETLK = 36, 37
FUSE_POSIX_LOCKS = 1 << 1
FOPEN_DIRECT_IO = 1
(LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN,
 READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK,
 SETLKW, ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, RENAME2) = (
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34,
    35, 36, 38, 42, 45)
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, "%s: %s" % (what, os.strerror(e)))


class Server:
    """The FUSE daemon: one thread, one request at a time."""

    def __init__(self, backing: str, mountpoint: str) -> None:
        self.backing = os.path.realpath(backing)
        self.mountpoint = mountpoint
        self.paths: Dict[int, str] = {1: self.backing}
        self.ids: Dict[str, int] = {self.backing: 1}
        self.fhs: Dict[int, int] = {}          # fh -> backing fd
        self.dirs: Dict[int, list] = {}
        self.next_fh = 1
        self.eio = False
        self.drop_all = False

    # -- plumbing ---------------------------------------------------------------------

    def mount(self) -> None:
        self.dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        st = os.stat(self.backing)
        opts = "fd=%d,rootmode=%o,user_id=0,group_id=0,allow_other" % (self.dev, st.st_mode & 0o170000)
        _check(_libc().mount(b"stallfs", os.fsencode(self.mountpoint), b"fuse.stallfs", MS_NOSUID | MS_NODEV,
                             opts.encode()), "mount %s" % self.mountpoint)

    def serve(self) -> None:
        signal.signal(signal.SIGUSR1, lambda *a: setattr(self, "eio", not self.eio))
        signal.signal(signal.SIGUSR2, lambda *a: setattr(self, "drop_all", True))
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        while True:
            try:
                req = os.read(self.dev, (1 << 20) + 4096)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if e.errno == errno.ENODEV:
                    return                          # unmounted
                raise
            if self.drop_all:
                self.drop_all = False
                self._drop_locks()
            self.handle(req)

    def reply(self, unique: int, err: int = 0, data: bytes = b"") -> None:
        try:
            os.write(self.dev, OUT_HEADER.pack(OUT_HEADER.size + len(data), -err, unique) + data)
        except OSError as e:
            if e.errno != errno.ENOENT:      # the request was interrupted meanwhile
                raise

    def handle(self, req: bytes) -> None:
        length, op, unique, node, _uid, _gid, _pid, _ext, _pad = IN_HEADER.unpack_from(req)
        body = req[IN_HEADER.size:length]
        if op in NO_REPLY:
            return
        if self.eio and op not in (INIT, RELEASE, RELEASEDIR, DESTROY, FLUSH):
            self.reply(unique, errno.EIO)
            return
        fn = getattr(self, "op_%d" % op, None)
        if fn is None:
            self.reply(unique, errno.ENOSYS)
            return
        try:
            out = fn(node, body)
        except OSError as e:
            self.reply(unique, e.errno or errno.EIO)
            return
        self.reply(unique, 0, out or b"")
        if op == DESTROY:
            sys.exit(0)

    # -- helpers ---------------------------------------------------------------------

    def path(self, node: int, name: Optional[bytes] = None) -> str:
        p = self.paths[node]
        return p if name is None else os.path.join(p, os.fsdecode(name.split(b"\0", 1)[0]))

    def node_of(self, path: str) -> int:
        nid = self.ids.get(path)
        if nid is None:
            nid = self.ids[path] = max(self.paths) + 1
            self.paths[nid] = path
        return nid

    @staticmethod
    def attr(st: os.stat_result) -> tuple:
        return (st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
                st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9, st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink,
                st.st_uid, st.st_gid, st.st_rdev, 4096, 0)

    def entry(self, path: str) -> bytes:
        st = os.lstat(path)
        return ENTRY_OUT.pack(self.node_of(path), 0, 0, 0, 0, 0, *self.attr(st))

    def new_fh(self, fd: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = fd
        return fh

    def _drop_locks(self) -> None:
        for fd in self.fhs.values():
            try:
                fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(fcntl.F_UNLCK, 0, 0, 0, 0))
            except OSError:
                pass

    # -- operations ----------------------------------------------------------------------

    def op_26(self, node, body):                                   # INIT
        major, minor, readahead, flags = struct.unpack_from("<IIII", body)
        return INIT_OUT.pack(7, 31, readahead, flags & FUSE_POSIX_LOCKS, 16, 12, 1 << 20, 1, 256, 0, 0, 0)

    def op_38(self, node, body):                                   # DESTROY
        return b""

    def op_1(self, node, body):                                    # LOOKUP
        return self.entry(self.path(node, body))

    def op_3(self, node, body):                                    # GETATTR
        flags, _dummy, fh = struct.unpack_from("<IIQ", body)
        st = os.fstat(self.fhs[fh]) if flags & 1 and fh in self.fhs else os.lstat(self.path(node))
        return ATTR_OUT.pack(0, 0, 0, *self.attr(st))

    def op_4(self, node, body):                                    # SETATTR
        valid, _pad, fh, size, _lo, atime, mtime, _ct, _an, _mn, _cn, mode, _u4, uid, gid, _u5 = \
            struct.unpack_from("<IIQQQQQQIIIIIIII", body)
        p = self.path(node)
        if valid & 8:
            if valid & 64 and fh in self.fhs:
                os.ftruncate(self.fhs[fh], size)
            else:
                os.truncate(p, size)
        if valid & 1:
            os.chmod(p, mode & 0o7777)
        if valid & (16 | 32 | 128 | 256):
            now = time.time()
            st = os.lstat(p)
            os.utime(p, (now if valid & 128 else atime if valid & 16 else st.st_atime,
                         now if valid & 256 else mtime if valid & 32 else st.st_mtime))
        return ATTR_OUT.pack(0, 0, 0, *self.attr(os.lstat(p)))

    def op_14(self, node, body):                                   # OPEN
        flags = struct.unpack_from("<I", body)[0]
        fd = os.open(self.path(node), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC) | os.O_CLOEXEC)
        return OPEN_OUT.pack(self.new_fh(fd), FOPEN_DIRECT_IO, 0)

    def op_35(self, node, body):                                   # CREATE
        flags, mode, umask, _of = struct.unpack_from("<IIII", body)
        p = self.path(node, body[16:])
        fd = os.open(p, (flags | os.O_CREAT) & ~os.O_NOCTTY | os.O_CLOEXEC, mode & ~umask & 0o7777)
        return self.entry(p) + OPEN_OUT.pack(self.new_fh(fd), FOPEN_DIRECT_IO, 0)

    def op_9(self, node, body):                                    # MKDIR
        mode, umask = struct.unpack_from("<II", body)
        p = self.path(node, body[8:])
        os.mkdir(p, mode & ~umask & 0o7777)
        return self.entry(p)

    def op_10(self, node, body):                                   # UNLINK
        os.unlink(self.path(node, body))

    def op_11(self, node, body):                                   # RMDIR
        os.rmdir(self.path(node, body))

    def _rename(self, node, newdir, names):
        old, new = names.split(b"\0")[:2]
        src, dst = self.path(node, old), self.path(newdir, new)
        os.rename(src, dst)
        for nid, p in list(self.paths.items()):
            if p == src or p.startswith(src + "/"):
                moved = dst + p[len(src):]
                self.paths[nid] = moved
                self.ids.pop(p, None)
                self.ids[moved] = nid

    def op_12(self, node, body):                                   # RENAME
        self._rename(node, struct.unpack_from("<Q", body)[0], body[8:])

    def op_45(self, node, body):                                   # RENAME2
        newdir, flags, _pad = struct.unpack_from("<QII", body)
        if flags:
            raise OSError(errno.EINVAL, "rename flags")
        self._rename(node, newdir, body[16:])

    def op_13(self, node, body):                                   # LINK
        old = struct.unpack_from("<Q", body)[0]
        p = self.path(node, body[8:])
        os.link(self.paths[old], p)
        return self.entry(p)

    def op_6(self, node, body):                                    # SYMLINK
        name, target = body.split(b"\0")[:2]
        p = self.path(node, name)
        os.symlink(target, p)
        return self.entry(p)

    def op_5(self, node, body):                                    # READLINK
        return os.fsencode(os.readlink(self.path(node)))

    def op_15(self, node, body):                                   # READ
        fh, off, size = RW_IN.unpack_from(body)[:3]
        return os.pread(self.fhs[fh], size, off)

    def op_16(self, node, body):                                   # WRITE
        fh, off, size = RW_IN.unpack_from(body)[:3]
        n = os.pwrite(self.fhs[fh], body[RW_IN.size:RW_IN.size + size], off)
        return struct.pack("<II", n, 0)

    def op_17(self, node, body):                                   # STATFS
        s = os.statvfs(self.backing)
        return KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax,
                            s.f_frsize, 0)

    def op_18(self, node, body):                                   # RELEASE
        fd = self.fhs.pop(struct.unpack_from("<Q", body)[0], None)
        if fd is not None:
            os.close(fd)          # its OFD locks go with it

    def op_20(self, node, body):                                   # FSYNC
        os.fsync(self.fhs[struct.unpack_from("<Q", body)[0]])

    def op_25(self, node, body):                                   # FLUSH
        return b""

    def op_34(self, node, body):                                   # ACCESS
        return b""

    def op_27(self, node, body):                                   # OPENDIR
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = [".", ".."] + sorted(os.listdir(self.path(node)))
        return OPEN_OUT.pack(fh, 0, 0)

    def op_28(self, node, body):                                   # READDIR
        fh, off, size = RW_IN.unpack_from(body)[:3]
        out = b""
        names = self.dirs.get(fh, [])
        for i in range(off, len(names)):
            name = os.fsencode(names[i])
            ent = struct.pack("<QQII", 1, i + 1, len(name), 0) + name
            ent += b"\0" * (-len(ent) % 8)
            if len(out) + len(ent) > size:
                break
            out += ent
        return out

    def op_29(self, node, body):                                   # RELEASEDIR
        self.dirs.pop(struct.unpack_from("<Q", body)[0], None)

    def op_30(self, node, body):                                   # FSYNCDIR
        return b""

    def _lock_args(self, body):
        fh, _owner, start, end, typ, _pid, _flags, _pad = LK_IN.unpack_from(body)
        length = 0 if end == OFFSET_MAX else end - start + 1
        return self.fhs[fh], typ, start, length

    def op_31(self, node, body):                                   # GETLK
        fd, typ, start, length = self._lock_args(body)
        res = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(typ, 0, start, length, 0))
        t, _w, s, ln, _p = FLOCK.unpack(res)
        return LK_OUT.pack(s, OFFSET_MAX if ln == 0 else s + ln - 1, t, 0)

    def op_32(self, node, body):                                   # SETLK
        fd, typ, start, length = self._lock_args(body)
        fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(typ, 0, start, length, 0))

    op_33 = op_32                                                  # SETLKW: never blocks here


class StallFS:
    """The test side: a mounted stallfs and the controls that make it misbehave."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "testbed.stallfs", str(self.backing),
                                      str(self.mountpoint)], cwd=str(root), stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            raise RuntimeError("stallfs did not mount %s: %r" % (self.mountpoint, line))
        self.stalled = False

    def stall(self) -> None:
        """Every call on the mount blocks from now on (the daemon is stopped)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stalled = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stalled = False

    def fail_io(self) -> None:
        """Toggle: every call answers EIO."""
        os.kill(self.proc.pid, signal.SIGUSR1)

    def drop_locks(self) -> None:
        """The server forgets our locks (applied before the next request)."""
        os.kill(self.proc.pid, signal.SIGUSR2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()              # a stopped process dies too; blocked callers get ENOTCONN
            self.proc.wait(10)
        _libc().umount2(os.fsencode(str(self.mountpoint)), MNT_DETACH)

    def __enter__(self) -> "StallFS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def available() -> Optional[str]:
    """None when stallfs can run here, else why not."""
    if os.geteuid() != 0:
        return "stallfs mounts with mount(2): needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (modprobe fuse)"
    try:
        with open("/proc/filesystems") as f:
            if "\tfuse\n" not in f.read():
                return "the kernel has no FUSE"
    except OSError:
        pass
    return None


def main(argv) -> int:
    server = Server(argv[0], argv[1])
    server.mount()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
