"""Differential fuzzing: mutated frames sent to the C virtlockd and to ours,
whose complete answers (every frame until the daemon closes) must be equal.

Inputs are deterministic (seeded) mutations of valid calls: bit flips in the
header, a different length word, truncation, appended garbage, "interesting"
32-bit values written over any word, and frames glued together. Each input is
sent on a fresh connection to each daemon, followed by a half-close, so each
transcript ends with the daemon's EOF: no timing is involved.

No input that could change the file system is sent (see
touches_filesystem()), which lets both daemons run side by side; each one's
witness lease must survive.
"""
from __future__ import annotations

import random
import socket
import struct

import pytest

from lockd import protocol as P
from lockd import rpc, xdr
from testbed.daemons import start_daemon
from testbed.wire import (EOF, PING, UUID_A, UUID_W, Conn, describe, register_args,
                                res_args)
from tests.harness import require_c_virtlockd, require_root

pytestmark = pytest.mark.c_daemon

import os

# Override to explore: LOCKD_FUZZ_N=50000 LOCKD_FUZZ_SEED=7 pytest tests/diff/test_fuzz_differential.py -s
N_INPUTS = int(os.environ.get("LOCKD_FUZZ_N", "5000"))
SEED = int(os.environ.get("LOCKD_FUZZ_SEED", "20261126"))
# Under /proc: neither root nor a mutated copy of this path can create
# anything there (truncated prefixes "/p".."/pro" are guarded by
# touches_filesystem(): no input that could create files is ever sent).
NOWHERE = "/proc/lockd-fuzz-nonexistent/sub"
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 27, 28, 29, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x10001,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, rpc.MESSAGE_MAX, rpc.MESSAGE_MAX + 4,
               rpc.MESSAGE_MAX + 5, P.PROGRAM, rpc.KEEPALIVE_PROGRAM]


def seeds() -> list:
    fake = 4_000_000 + 123        # above any pid_max: never a real process
    reg = P.encode_call(P.PROC_REGISTER, 0, register_args(UUID_A, "vm1", 1, fake))
    return [
        reg,
        P.encode_call(P.PROC_RESTRICT, 1, xdr.u32(0)),
        P.encode_call(P.PROC_NEW, 2, xdr.string(NOWHERE) + xdr.u32(0)),
        P.encode_call(P.PROC_CREATE_RESOURCE, 3, res_args(NOWHERE, "r")),
        P.encode_call(P.PROC_DELETE_RESOURCE, 4, res_args(NOWHERE, "r")),
        P.encode_call(P.PROC_ACQUIRE_RESOURCE, 5, res_args("", NOWHERE + "/disk")),
        P.encode_call(P.PROC_RELEASE_RESOURCE, 6, res_args("", NOWHERE + "/disk")),
        reg + P.encode_call(P.PROC_ACQUIRE_RESOURCE, 1, res_args("", NOWHERE + "/disk", 1)),
        reg + P.encode_call(P.PROC_RELEASE_RESOURCE, 1, res_args("", NOWHERE + "/disk")),
        PING,
    ]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    op = rng.randrange(7)
    if op == 0:                                   # flip bits in the header
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(min(len(b), 28))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:                                 # another length word
        struct.pack_into(">I", b, 0, rng.choice(INTERESTING + [len(b) + rng.randint(-8, 8)]) & 0xFFFFFFFF)
    elif op == 2:                                 # truncate
        del b[rng.randrange(len(b)):]
    elif op == 3:                                 # append garbage (length word unchanged)
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    elif op == 4:                                 # interesting value over any aligned word
        i = rng.randrange(max(1, len(b) // 4)) * 4
        if i + 4 <= len(b):
            struct.pack_into(">I", b, i, rng.choice(INTERESTING))
    elif op == 5:                                 # payload byte flips, length kept consistent
        for _ in range(rng.randint(1, 4)):
            if len(b) > 28:
                b[rng.randrange(28, len(b))] = rng.randrange(256)
    else:                                         # payload grown/shrunk, length word follows
        if rng.random() < 0.5 and len(b) > 28:
            del b[rng.randrange(28, len(b)):]
        else:
            b += bytes(rng.randint(1, 12))
        struct.pack_into(">I", b, 0, len(b))
    return bytes(b)


FS_PROCS = {P.PROC_NEW, P.PROC_CREATE_RESOURCE, P.PROC_DELETE_RESOURCE}


def touches_filesystem(data: bytes) -> bool:
    """True if the input could change the file system, which both daemons
    share while they run side by side (mkdir, create, unlink): such inputs
    are not sent.

    CREATE_LOCKSPACE needs no registration, so it is never sent. NEW,
    CREATE_RESOURCE, DELETE_RESOURCE and ACQUIRE with AUTOCREATE are refused
    before touching anything on an unregistered connection (spec §3.3 check
    order), so they are only excluded from inputs that also carry a REGISTER.
    The frames are split exactly as a daemon splits them (by length words).
    """
    frames, pos = [], 0
    while len(data) - pos >= 28:
        n, prog, _vers, proc = struct.unpack_from(">IIIi", data, pos)
        if n < 28:
            break
        if prog == P.PROGRAM:
            frames.append((proc, data[pos + 28:pos + n]))
        pos += n
    procs = {p for p, _ in frames}
    if P.PROC_CREATE_LOCKSPACE in procs:
        return True
    if P.PROC_REGISTER not in procs:
        return False
    if procs & FS_PROCS:
        return True
    for proc, payload in frames:
        if proc == P.PROC_ACQUIRE_RESOURCE:
            try:
                d = xdr.Decoder(payload)
                d.opaque(P.STRING_MAX)      # raw bytes: no UTF-8 check the daemon might not do
                d.opaque(P.STRING_MAX)
                flags = d.u32()
            except Exception:  # noqa: BLE001 - undecodable: refused before any file access
                continue
            if flags & P.ACQUIRE_AUTOCREATE:
                return True
    return False


def frames_of(data: bytes):
    """Split an input into (header, complete?, first payload word) per frame."""
    pos, out = 0, []
    while len(data) - pos >= 4:
        n = struct.unpack_from(">I", data, pos)[0]
        if n < 28 or n - 4 > rpc.MESSAGE_MAX:
            break
        hdr = struct.unpack_from(">IIiiIi", data, pos + 4) if len(data) - pos >= 28 else None
        out.append((hdr, len(data) - pos >= n, data[pos + 28:pos + 32]))
        if len(data) - pos < n:
            break
        pos += n
    return out


def allowed_difference(data: bytes, tc: list, tp: list) -> "str | None":
    """The one documented case where C and ours may answer differently:
    CALL_WITH_FDS announcing fds that never come (spec §2.8). C waits for them
    (one recvmsg per fd) and closes at EOF; the spec lets ours treat
    CALL_WITH_FDS with fds as an error instead. libvirt never sends it.
    """
    for hdr, _complete, first_word in frames_of(data):
        # any program: the fds are read at the message layer, before dispatch
        if hdr and hdr[3] == rpc.CALL_WITH_FDS and first_word[:4] != b"\0\0\0\0":
            return "CALL_WITH_FDS with fds"
    return None


def transcript(path, data: bytes) -> list:
    """Every frame the daemon sends for `data` (then half-close) until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.settimeout(20)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return [EOF]
        out, buf = [], b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
        while len(buf) >= 4:
            n = struct.unpack_from(">I", buf)[0]
            if n < 4 or len(buf) < n:
                break
            out.append(buf[:n])
            buf = buf[n:]
        if buf:
            out.append(("partial", buf.hex()))
        out.append(EOF)
        return out


def test_mutated_frames_get_identical_answers(tmp_path):
    require_root()
    require_c_virtlockd()
    rng = random.Random(SEED)
    base = seeds()
    witness_disk = tmp_path / "witness.img"
    witness_disk.write_bytes(b"\0" * 4096)
    mismatches, ran, skipped = [], 0, 0
    allowed: "dict[str, int]" = {}
    with start_daemon("c", tmp_path / "c") as c, start_daemon("py", tmp_path / "py") as py:
        witnesses = []
        for d in (c, py):
            w = Conn(d.sock)
            w.register(UUID_W, "witness", 77, 4_000_000 + 77)
            # different files: both daemons run at once
            disk = tmp_path / f"witness-{d.kind}.img"
            disk.write_bytes(b"\0" * 4096)
            assert len(w.acquire("", str(disk))) == 28
            witnesses.append((d, w, disk))
        for i in range(N_INPUTS):
            data = mutate(rng, rng.choice(base))
            if rng.random() < 0.15:
                data += mutate(rng, rng.choice(base))
            if touches_filesystem(data):
                skipped += 1
                continue
            ran += 1
            tc, tp = transcript(c.sock, data), transcript(py.sock, data)
            if tc != tp:
                why = allowed_difference(data, tc, tp)
                if why:
                    allowed[why] = allowed.get(why, 0) + 1
                    continue
                mismatches.append((i, data.hex(), [describe(x) if isinstance(x, bytes) else x for x in tc],
                                   [describe(x) if isinstance(x, bytes) else x for x in tp]))
        for d, w, disk in witnesses:
            assert d.alive(), f"{d.kind} daemon died during fuzzing:\n{d.log_tail()}"
            assert w.barrier() == [], f"{d.kind}: witness connection broken"
            with Conn(d.sock) as probe:
                probe.register(UUID_A, "probe", 9, 4_000_000 + 9)
                assert b"is locked" in probe.acquire("", str(disk)), f"{d.kind}: witness lease lost"
            w.close()
    print(f"differential fuzz (seed {SEED}): {ran} inputs sent to both daemons ({skipped} skipped), "
          f"{len(mismatches)} mismatches, documented differences: {allowed or 'none'}")
    assert not mismatches, "\n".join(
        f"input #{i} {h[:200]}\n  C : {tc}\n  py: {tp}" for i, h, tc, tp in mismatches[:20]) + \
        f"\n({len(mismatches)} mismatches of {ran} inputs)"
