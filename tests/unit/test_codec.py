"""Codec tests: libvirt's own vectors, the real wire trace, and XDR round trips."""
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from lockd import protocol as P
from lockd import rpc, xdr

# The project's own copy of the real libvirt 9.0.0 trace (its header says where it came from).
TRACE = Path(__file__).resolve().parents[1] / "data" / "virtlockd-wire-trace.txt"


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def trace_frames():
    """(direction, header line, frame bytes) for every frame in the real trace."""
    text = TRACE.read_text()
    out = []
    for m in re.finditer(r"fd=\s*\d+ (C->S|S->C) len=(\d+)\s+(.*)\n(?:.*=>.*\n)?\s*hex: ([0-9a-f]+)", text):
        frame = bytes.fromhex(m.group(4))
        assert len(frame) == int(m.group(2))
        out.append((m.group(1), m.group(3), frame))
    return out


FRAMES = trace_frames()


def test_trace_has_frames():
    assert len(FRAMES) == 200


# --- libvirt's tests/virnetmessagetest.c vectors (spec 2.10) ---------------

def test_header_only_call():
    assert rpc.encode_frame(0x11223344, 1, 0x666, rpc.CALL, 0x99, rpc.OK) == \
        h("0000001c 11223344 00000001 00000666 00000000 00000099 00000000")


def test_error_payload_vector():
    err = rpc.RPCError(1, 7, "Hello World", 2, "One", "Two", "Three", 1, 2)
    frame = rpc.encode_frame(0x11223344, 1, 0x666, rpc.MESSAGE, 0x99, rpc.ERROR, err.encode())
    assert frame == h("""00000074 11223344 00000001 00000666 00000002 00000099 00000001
        00000001 00000007 00000001 0000000b 48656c6c 6f20576f 726c6400 00000002
        00000000 00000001 00000003 4f6e6500 00000001 00000003 54776f00
        00000001 00000005 54687265 65000000 00000001 00000002 00000000""")
    assert rpc.RPCError.decode(frame, 28) == err


# --- lock-protocol vectors (spec 2.10) -------------------------------------

UUID = bytes.fromhex("c7a5fdbdcdaf9455926ad65c16db1809")


def test_register_vector():
    frame = P.encode_call(P.PROC_REGISTER, 0, P.encode_register(P.Owner(UUID, "vm1", 5, 4242)))
    assert frame == h("""00000040 0ea7beef 00000001 00000001 00000000 00000000 00000000
        c7a5fdbd cdaf9455 926ad65c 16db1809 00000003 766d3100 00000005 00001092 00000000""")
    owner, flags = P.decode_register(xdr.Decoder(frame, 28))
    assert owner == P.Owner(UUID, "vm1", 5, 4242) and flags == 0


def test_acquire_vector_and_replies():
    name = "/var/lib/libvirt/images/vm1.qcow2"
    call = P.encode_call(P.PROC_ACQUIRE_RESOURCE, 1, P.encode_resource("", name, 0))
    assert call == h("""0000004c 0ea7beef 00000001 00000006 00000000 00000001 00000000
        00000000 00000021 2f766172 2f6c6962 2f6c6962 76697274 2f696d61 6765732f
        766d312e 71636f77 32000000 00000000""")
    hdr = rpc.decode_header(call)
    assert rpc.reply_ok(hdr) == h("0000001c 0ea7beef 00000001 00000006 00000001 00000001 00000000")
    busy = rpc.reply_error(hdr, P.err_busy(name))
    assert len(busy) == 0xF8
    assert busy[:28] == h("000000f8 0ea7beef 00000001 00000006 00000001 00000001 00000001")
    err = rpc.RPCError.decode(busy, 28)
    assert (err.code, err.domain, err.level, err.int1, err.int2) == (87, 51, 2, -1, -1)
    assert err.message == "resource busy: Lockspace resource '%s' is locked" % name
    assert err.str1 == "resource busy: %s" and err.str3 is None


def test_keepalive_vectors():
    ping = rpc.encode_frame(rpc.KEEPALIVE_PROGRAM, 1, rpc.KEEPALIVE_PING, rpc.MESSAGE, 0, rpc.OK)
    assert ping == h("0000001c 6b656570 00000001 00000001 00000002 00000000 00000000")
    from lockd.program import _PONG as PONG
    assert PONG == h("0000001c 6b656570 00000001 00000002 00000002 00000000 00000000")


# --- every frame of the real libvirt 9.0.0 trace ---------------------------

DECODERS = {
    P.PROC_REGISTER: lambda d: P.decode_register(d),
    P.PROC_RESTRICT: P.decode_flags,
    P.PROC_ACQUIRE_RESOURCE: P.decode_resource,
    P.PROC_RELEASE_RESOURCE: P.decode_resource,
    P.PROC_CREATE_LOCKSPACE: P.decode_create_lockspace,
}


def reencode_call(proc, args):
    if proc == P.PROC_REGISTER:
        owner, flags = args
        return P.encode_register(owner, flags)
    if proc == P.PROC_RESTRICT:
        return xdr.u32(args)
    if proc in (P.PROC_ACQUIRE_RESOURCE, P.PROC_RELEASE_RESOURCE):
        return P.encode_resource(args.path, args.name, args.flags)
    return xdr.string(args)


@pytest.mark.parametrize("direction,desc,frame", FRAMES, ids=[f"{i}-{d}" for i, (d, _, _) in enumerate(FRAMES)])
def test_trace_frame_roundtrip(direction, desc, frame):
    hdr = rpc.decode_header(frame)
    assert rpc.frame_length(frame[:4]) == len(frame)
    assert hdr.prog == P.PROGRAM and hdr.vers == P.PROGRAM_VERSION
    if direction == "C->S":
        assert hdr.type == rpc.CALL and hdr.status == rpc.OK
        d = xdr.Decoder(frame, 28)
        args = DECODERS[hdr.proc](d)
        assert d.done()
        assert P.encode_call(hdr.proc, hdr.serial, reencode_call(hdr.proc, args)) == frame
    elif hdr.status == rpc.OK:
        assert rpc.reply_ok(hdr) == frame
    else:
        err = rpc.RPCError.decode(frame, 28)
        assert rpc.reply_error(hdr, err) == frame
        # and our error constructor produces exactly what the C daemon sent
        m = re.match(r"Lockspace resource '(.*)' is locked$", err.str2)
        assert m, err
        assert rpc.reply_error(hdr, P.err_busy(m.group(1))) == frame


# --- property tests ---------------------------------------------------------

@given(st.integers(0, 2**32 - 1))
def test_u32_roundtrip(v):
    assert xdr.Decoder(xdr.u32(v)).u32() == v


@given(st.integers(-2**31, 2**31 - 1))
def test_i32_roundtrip(v):
    assert xdr.Decoder(xdr.i32(v)).i32() == v


@given(st.binary(max_size=300))
def test_opaque_roundtrip_and_padding(b):
    enc = xdr.opaque(b)
    assert len(enc) % 4 == 0
    d = xdr.Decoder(enc)
    assert d.opaque(1000) == b and d.done()


NO_NUL = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=200)


@given(NO_NUL)
def test_string_roundtrip(s):
    assert xdr.Decoder(xdr.string(s)).string(P.STRING_MAX) == s


@given(NO_NUL, st.text(max_size=20))
def test_string_ends_at_first_nul_like_libvirt(head, tail):
    """libvirt decodes into C strings: a NUL ends the string for it, so for us too."""
    enc = xdr.string(head + "\0" + tail)
    assert xdr.Decoder(enc).string(P.STRING_MAX) == head
    args = P.decode_resource(xdr.Decoder(enc + enc + xdr.u32(1)))
    assert args == P.ResourceArgs(head, head, 1)


@given(st.binary(min_size=5, max_size=40))
def test_string_over_limit_rejected(b):
    with pytest.raises(xdr.XDRError):
        xdr.Decoder(xdr.opaque(b)).string(len(b) - 1)


@given(st.binary(max_size=64))
def test_truncated_input_raises_xdr_error(b):
    # any prefix of a REGISTER payload must fail cleanly, never with another exception
    payload = P.encode_register(P.Owner(UUID, "vm-%s" % b.hex(), 5, 4242))
    for cut in range(len(payload)):
        with pytest.raises(xdr.XDRError):
            P.decode_register(xdr.Decoder(payload[:cut]))


opt_text = st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40))


@given(st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1), opt_text, st.integers(0, 4),
       opt_text, opt_text, opt_text, st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1))
def test_error_roundtrip(code, domain, message, level, s1, s2, s3, i1, i2):
    err = rpc.RPCError(code, domain, message, level, s1, s2, s3, i1, i2)
    assert rpc.RPCError.decode(err.encode()) == err


@given(st.builds(P.ResourceArgs, NO_NUL, NO_NUL, st.integers(0, 2**32 - 1)))
def test_resource_args_roundtrip(a):
    d = xdr.Decoder(P.encode_resource(a.path, a.name, a.flags))
    assert P.decode_resource(d) == a and d.done()


def test_frame_length_limits():
    with pytest.raises(rpc.FrameError, match="too small"):
        rpc.frame_length(xdr.u32(3))
    with pytest.raises(rpc.FrameError, match="too large"):
        rpc.frame_length(xdr.u32(rpc.MESSAGE_MAX + 5))
    assert rpc.frame_length(xdr.u32(rpc.MESSAGE_MAX + 4)) == rpc.MESSAGE_MAX + 4


def test_flag_error_tuple():
    e = P.err_flags(P.PROC_ACQUIRE_RESOURCE, 0x7)
    assert e.message == "unsupported flags (0x4) in function virLockSpaceProtocolDispatchAcquireResource"
    assert (e.code, e.domain, e.str1, e.str2, e.int1, e.int2) == (
        8, 7, "virLockSpaceProtocolDispatchAcquireResource", "flags", 0, 0)
