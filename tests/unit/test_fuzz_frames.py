"""Fuzz the frame decoder and dispatcher: mutated real frames and random bytes.

The inputs go through the daemon's own read path (`LockConn.process`) on a real
socketpair. The lockspace layer is replaced by an in-memory stand-in so that
random paths never touch the file system; everything above it (framing,
header checks, XDR decoding, procedure dispatch, replies) is the real code.
The property: no input raises out of the read path, and the connection is
either still served or cleanly dropped.
"""
import os
import random
import socket

from lockd import protocol as P
from lockd.lockspace import Locks, LockSpace, Resource
from lockd.loop import EventLoop
from lockd.program import LockProgram
from lockd.server import LockConn, Server
from lockd.state import DaemonState, Recorder
from lockd.systemd import Notifier

from .test_codec import FRAMES

N_INPUTS = int(os.environ.get("LOCKD_FUZZ_INPUTS", "30000"))


class MemLocks(Locks):
    """Lockspace semantics without files: names only."""

    def create_lockspace(self, key):
        return self.lockspaces.setdefault(key, LockSpace(key, key))

    def new_lockspace(self, key):
        if key == "":
            raise P.err_default_exists()
        if key in self.lockspaces:
            raise P.err_lockspace_exists(key)
        return self.create_lockspace(key)

    def create_resource(self, ls, name):
        if name in ls.resources:
            raise P.err_busy(name)

    delete_resource = create_resource

    def acquire(self, ls, name, owner, flags, when=None):
        if name in ls.resources:
            raise P.err_busy(name)
        res = ls.resources[name] = Resource(ls, name, name, -1, flags, 0, 0)
        self.add_owner(res, owner, when)
        return res

    def release(self, ls, name, owner):
        res = ls.resources.pop(name, None)
        if res is None:
            raise P.err_not_locked(name)
        return res

    def release_owner(self, owner):
        return []


def mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    op = rng.randrange(8)
    if op == 0 and b:                       # flip bits
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif op == 1:                           # truncate, keeping or fixing the length word
        cut = rng.randrange(len(b) + 1)
        b = b[:cut]
        if rng.random() < 0.5 and len(b) >= 4:
            b[0:4] = len(b).to_bytes(4, "big")
    elif op == 2:                           # random header field
        field = rng.randrange(1, 7)
        b[field * 4:field * 4 + 4] = rng.getrandbits(32).to_bytes(4, "big")
    elif op == 3:                           # huge string length inside the payload
        if len(b) > 32:
            at = rng.randrange(28, len(b) - 3) & ~3
            b[at:at + 4] = rng.choice([65537, 2**31, 2**32 - 1, 65536]).to_bytes(4, "big")
    elif op == 4:                           # garbage payload, valid length
        b = b[:28] + bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
        b[0:4] = len(b).to_bytes(4, "big")
    elif op == 5:                           # pure random bytes
        b = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(80)))
    elif op == 6:                           # length word lies
        b[0:4] = rng.choice([0, 3, 4, 27, 28, 2**25 + 5, 2**32 - 1, len(b) + rng.randrange(1, 9)]).to_bytes(4, "big")
    else:                                   # type/status variants of a valid call
        b[16:20] = rng.randrange(8).to_bytes(4, "big")
        b[24:28] = rng.randrange(3).to_bytes(4, "big")
    return bytes(b)


def test_fuzz_read_path_never_raises():
    rng = random.Random(20261126)
    calls = [f for d, _, f in FRAMES if d == "C->S"]
    state = DaemonState({"max_clients": 10, "admin_max_clients": 10}, MemLocks("ofd"),
                        Recorder(None, Notifier(""), False), EventLoop())
    server = Server(state, LockProgram(state))
    served = dropped = 0
    for _ in range(N_INPUTS):
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = LockConn(server, a, 4000000, 0).start()   # a peer pid that is never an owner we would kill
        conn.rbuf += b"".join(mutate(rng, rng.choice(calls)) for _ in range(rng.randint(1, 4)))
        conn.process()                        # must not raise
        if conn.fd < 0:
            dropped += 1
        else:
            served += 1
            conn.close()
        b.close()
    assert served + dropped == N_INPUTS
    assert served > N_INPUTS // 10 and dropped > N_INPUTS // 10   # both outcomes were exercised
    print("fuzzed %d inputs: %d connections kept, %d dropped" % (N_INPUTS, served, dropped))
