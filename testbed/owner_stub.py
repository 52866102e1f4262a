"""Stand-in for a QEMU process holding its lock-daemon connection (see wire.StandInOwner).

argv: SOCK UUIDHEX NAME ID RESTRICT(0/1) IGNORE_SIGTERM(0/1)
Prints "ready <reply hex>..." then serves commands on stdin: close, exit, status.
Standard library only, and no lockd import: it must start fast and stay dumb.
"""
import os
import signal
import socket
import struct
import sys


def frame(proc, serial, payload):
    hdr = struct.pack(">IIiiIi", 0x0EA7BEEF, 1, proc, 0, serial, 0)
    return struct.pack(">I", 4 + len(hdr) + len(payload)) + hdr + payload


def xstr(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)


def recv_frame(s):
    buf = b""
    while len(buf) < 4:
        c = s.recv(4 - len(buf))
        if not c:
            return "EOF"
        buf += c
    n = struct.unpack(">I", buf)[0]
    while len(buf) < n:
        c = s.recv(n - len(buf))
        if not c:
            return "EOF"
        buf += c
    return buf.hex()


def main():
    path, uuid_hex, name, oid, restrict, ignore_term = sys.argv[1:7]
    if ignore_term == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    replies = []
    # REGISTER(uuid, name, id, pid = our own pid, flags 0), serial 0
    s.sendall(frame(1, 0, bytes.fromhex(uuid_hex) + xstr(name)
                    + struct.pack(">III", int(oid), os.getpid(), 0)))
    replies.append(recv_frame(s))
    if restrict == "1":
        s.sendall(frame(2, 1, struct.pack(">I", 0)))   # RESTRICT(flags 0), serial 1
        replies.append(recv_frame(s))
    print("ready", *replies, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "close":
            s.close()
            print("closed", flush=True)
        elif cmd == "exit":
            print("exiting", flush=True)
            os._exit(0)
        elif cmd == "status":
            print("alive", flush=True)
    # stdin closed (test runner gone): leave quietly
    os._exit(0)


if __name__ == "__main__":
    main()
