# SPDX-License-Identifier: GPL-3.0-or-later
"""Which filesystem a path is on, and whether its calls can hang.

A call on a *network* filesystem can block for as long as its server is
unreachable (an NFS hard mount blocks with no error, a FUSE call waits for its
daemon, a cluster filesystem waits for its lock manager). lockd runs every
call on such a filesystem in a worker thread with a deadline
(:mod:`lockd.storage`); calls on local filesystems stay on the event loop.

The decision uses ``statfs(2)``'s ``f_type`` (the superblock magic, through
ctypes: the stdlib has no ``statfs``) and the filesystem type name of
``/proc/self/mountinfo``; either saying "network" is enough. Reading
mountinfo never touches the filesystem itself, so :func:`mount_of_path` and
:func:`mount_of_dev` are safe on the event loop; :func:`classify` is not (it
stats the path) and runs in a worker.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional

# f_type magics (linux/magic.h and the filesystems' own headers) of every
# filesystem whose calls wait on something other than a local disk.
NETWORK_MAGIC: Dict[int, str] = {
    0x6969: "nfs",              # NFS_SUPER_MAGIC: NFSv2/3/4 clients
    0xFF534D42: "cifs",         # CIFS_SUPER_MAGIC
    0xFE534D42: "smb2",         # SMB2_SUPER_MAGIC (the cifs client speaking SMB2/3)
    0x517B: "smb",              # SMB_SUPER_MAGIC (old smbfs)
    0x00C36400: "ceph",         # CEPH_SUPER_MAGIC (kernel client)
    0x65735546: "fuse",         # FUSE_SUPER_MAGIC: GlusterFS, ceph-fuse, sshfs, virtiofs, s3fs...
    0x0BD00BD0: "lustre",       # LL_SUPER_MAGIC
    0x47504653: "gpfs",         # GPFS_SUPER_MAGIC (IBM Storage Scale)
    0x7461636F: "ocfs2",        # OCFS2: shared block device, waits on its cluster stack (o2cb/DLM)
    0x01161970: "gfs2",         # GFS2: same, waits on DLM and fencing
    0x5346414F: "afs",          # OpenAFS
    0x6B414653: "afs",          # kAFS
    0x01021997: "9p",           # V9FS_MAGIC
    0x73757245: "coda",
    0x564C: "ncp",
    0x19830326: "orangefs",
}
# mountinfo type names of the same families (any "fuse" or "fuse.<subtype>" too)
NETWORK_TYPES = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "smb", "ceph", "glusterfs", "lustre", "gpfs", "ocfs2",
    "gfs2", "afs", "9p", "coda", "ncpfs", "orangefs", "pvfs2", "beegfs", "virtiofs",
))

MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo."""

    dev: int            # st_dev of files on it (major:minor)
    point: str          # where it is mounted
    fstype: str         # "nfs4", "ext4", "fuse.sshfs", ...
    source: str         # "server:/export", "/dev/vda", ...
    options: str        # per-mount and per-superblock options, comma separated


class FsInfo(NamedTuple):
    """What :func:`classify` found out about a directory."""

    dev: int
    mount: str
    fstype: str
    magic: Optional[int]
    network: bool


def is_network(magic: Optional[int], fstype: str) -> bool:
    """Can calls on this filesystem hang on something other than a local disk?"""
    if magic is not None and magic in NETWORK_MAGIC:
        return True
    return fstype in NETWORK_TYPES or fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk"))


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> List[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        try:
            major, minor = (int(x) for x in f[2].split(":"))
        except ValueError:
            continue
        opts = f[5] + ("," + r[2] if len(r) > 2 else "")
        mounts.append(Mount(os.makedev(major, minor), _unescape(f[4]), r[0], _unescape(r[1]), opts))
    return mounts


def read_mounts(path: str = MOUNTINFO) -> List[Mount]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


def mount_of_path(mounts: List[Mount], path: str) -> Optional[Mount]:
    """The mount ``path`` lies on by its text (no filesystem access, so
    symlinks are not followed): the last-mounted longest prefix."""
    p = os.path.normpath(os.path.join("/", path))
    best: Optional[Mount] = None
    for m in mounts:
        mp = m.point
        if p == mp or p.startswith(mp if mp.endswith("/") else mp + "/"):
            if best is None or len(mp) >= len(best.point):
                best = m
    return best


def mount_of_dev(mounts: List[Mount], dev: int) -> Optional[Mount]:
    for m in mounts:
        if m.dev == dev:
            return m
    return None


_STATFS_SIZE = 256          # struct statfs is 120 bytes on 64-bit Linux; f_type comes first
_statfs: list = []          # [the libc function, or None], loaded at first use (ctypes costs start-up time)


def _libc_statfs():
    if not _statfs:
        # CDLL(None): the symbols already loaded (libc among them). Never
        # ctypes.util.find_library: it runs ldconfig in a child process.
        try:
            import ctypes
            fn = ctypes.CDLL(None, use_errno=True).statfs
            fn.argtypes = (ctypes.c_char_p, ctypes.c_void_p)
            fn.restype = ctypes.c_int
            _statfs.append((ctypes, fn))
        except (ImportError, OSError, AttributeError):
            _statfs.append(None)
    return _statfs[0]


def statfs_type(path: str) -> Optional[int]:
    """``f_type`` of the filesystem holding ``path`` (blocks like any call on
    it), or None when statfs cannot be called here. Raises OSError."""
    lib = _libc_statfs()
    if lib is None:
        return None
    ctypes, fn = lib
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if fn(os.fsencode(path), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def existing_ancestor(path: str) -> str:
    """``path`` or its nearest parent that exists (a lockspace directory or a
    disk may not exist yet). Blocks like any call on the filesystem."""
    p = os.path.normpath(os.path.join("/", path))
    while p != "/" and not os.path.lexists(p):
        p = os.path.dirname(p)
    return p


def classify(path: str, mounts: List[Mount]) -> FsInfo:
    """Follow ``path`` (symlinks included) to its filesystem. Blocking: call
    it in a worker. Raises OSError."""
    p = existing_ancestor(path)
    st = os.stat(p)
    magic = statfs_type(p)
    m = mount_of_dev(mounts, st.st_dev) or mount_of_path(mounts, os.path.realpath(p))
    fstype = m.fstype if m is not None else "?"
    return FsInfo(st.st_dev, m.point if m is not None else p, fstype, magic, is_network(magic, fstype))
