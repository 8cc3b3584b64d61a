"""Frame encoding and the incremental decoder (sans-I/O)."""
import struct

import msgpack
import numpy as np
import pytest

from objcache.rpc import FrameError, framing
from objcache.rpc.framing import (MAGIC, NOTIFY, PREFIX, REQUEST, RESPONSE,
                                  FrameDecoder, encode_head, payload_buffer)

from . import feed, frame_bytes


def test_layout_is_prefix_header_payload():
    data = frame_bytes(REQUEST, 7, "m", {"a": 1}, b"xyz")
    magic, hlen, plen = PREFIX.unpack_from(data)
    assert magic == b"OCR\x01" and plen == 3
    assert msgpack.unpackb(data[12:12 + hlen]) == [REQUEST, 7, "m", {"a": 1}]
    assert data[12 + hlen:] == b"xyz"
    assert len(data) == 12 + hlen + plen


def test_round_trip_many_frames_in_one_read():
    frames = [(REQUEST, i, f"m{i}", {"i": i, "b": b"\0" * i}, b"p" * i)
              for i in range(50)]
    data = b"".join(frame_bytes(*f) for f in frames)
    got = feed(FrameDecoder(), data)
    assert [(f.kind, f.id, f.name, f.fields,
             b"" if f.payload is None else bytes(f.payload)) for f in got] \
        == frames
    assert got[0].payload is None       # empty payload -> None


@pytest.mark.parametrize("chunk", [1, 2, 5, 11, 12, 13, 100, 4096])
def test_byte_by_byte_and_odd_splits(chunk):
    payload = np.random.default_rng(chunk).bytes(300_000)  # > scratch
    frames = [(NOTIFY, 0, "n", {"k": "v"}, b"small"),
              (REQUEST, 1, "big", {}, payload),
              (RESPONSE, 2, "", {"x": [1, 2, 3]}, b"")]
    data = b"".join(frame_bytes(*f) for f in frames)
    dec = FrameDecoder(scratch_size=4096)
    got = []
    for i in range(0, len(data), chunk):
        got += feed(dec, data[i:i + chunk])
    assert [bytes(f.payload or b"") for f in got] == [b"small", payload, b""]
    assert [f.id for f in got] == [0, 1, 2]
    assert dec.pending_bytes() == 0


def test_large_payload_is_received_into_its_own_buffer():
    """After the first read, get_buffer hands out the payload's own buffer:
    the transport writes the payload there directly, and the frame's
    payload is a view of exactly that buffer."""
    size = 8 << 20
    payload = np.random.default_rng(1).bytes(size)
    data = frame_bytes(REQUEST, 1, "put", {}, payload)
    dec = FrameDecoder()
    first = dec.get_buffer(-1)
    n = len(first)
    first[:n] = data[:n]
    dec.buffer_updated(n)
    assert dec.next_frame() is None
    target = dec.get_buffer(-1)
    assert len(target) == len(data) - n       # exactly the rest of the payload
    target[:] = data[n:]
    dec.buffer_updated(len(target))
    frame = dec.next_frame()
    assert frame.payload.nbytes == size and bytes(frame.payload) == payload
    # Same memory: the view the transport wrote into is inside the payload.
    addr = np.frombuffer(frame.payload, np.uint8).ctypes.data
    assert np.frombuffer(target, np.uint8).ctypes.data == addr + size - len(target)
    # The decoder forgot the buffer: the next frame gets a fresh one.
    assert dec.pending_bytes() == 0


def test_received_payload_is_owned_by_the_frame():
    """Small payloads are copied out of the scratch: later frames (which
    reuse the scratch) do not change an earlier frame's payload."""
    dec = FrameDecoder(scratch_size=1024)
    a = feed(dec, frame_bytes(REQUEST, 1, "m", {}, b"A" * 100))[0]
    for i in range(50):
        feed(dec, frame_bytes(REQUEST, 2 + i, "m", {}, b"B" * 100))
    assert bytes(a.payload) == b"A" * 100


def test_big_header_uses_a_dedicated_buffer():
    fields = {"blob": b"h" * 600_000}
    data = frame_bytes(REQUEST, 3, "m", fields, b"tail")
    got = []
    dec = FrameDecoder(scratch_size=64 << 10)
    for i in range(0, len(data), 50_000):
        got += feed(dec, data[i:i + 50_000])
    assert got[0].fields == fields and bytes(got[0].payload) == b"tail"


@pytest.mark.parametrize("payload,identity", [
    (b"bytes", True), (bytearray(b"ba"), True),
    (memoryview(b"mv"), True), (np.arange(10, dtype=np.int32), False),
])
def test_payload_buffer_passes_the_callers_object(payload, identity):
    obj, n = payload_buffer(payload)
    assert n == memoryview(payload).nbytes
    if identity:
        assert obj is payload           # handed to the transport as is
    else:
        assert isinstance(obj, memoryview) and obj.format == "B"
        assert obj.obj is memoryview(payload).obj or bytes(obj) == \
            memoryview(payload).tobytes()


def test_payload_buffer_rejects_non_buffers_and_strided_views():
    with pytest.raises(TypeError):
        payload_buffer("a string")
    with pytest.raises(FrameError):
        payload_buffer(memoryview(np.arange(10, dtype=np.uint8))[::2])


def test_encode_rejects_oversize_header_and_unencodable_fields():
    with pytest.raises(FrameError):
        encode_head(REQUEST, 1, "m", {"x": b"a" * 100}, max_header=50)
    with pytest.raises(TypeError):
        encode_head(REQUEST, 1, "m", {"x": object()})


def _prefix(magic=MAGIC, hlen=5, plen=0):
    return struct.pack(">4sII", magic, hlen, plen)


@pytest.mark.parametrize("data,message", [
    (_prefix(magic=b"GET "), "bad magic"),
    (_prefix(magic=b"OCR\x02"), "unsupported protocol version 2"),
    (_prefix(hlen=0), "header length 0"),
    (_prefix(hlen=(1 << 20) + 1), "header length"),
    (_prefix(plen=1000), "payload length 1000 exceeds"),
    (_prefix(hlen=1) + b"\xc1", "undecodable header"),              # never-used
    (_prefix(hlen=3) + b"\x92\x01\x02", "not a 4-element array"),
    (_prefix(hlen=1) + b"\x01", "not a 4-element array"),
    (_prefix(hlen=5) + b"\x94\x09\x01\xa0\x80", "unknown frame kind"),
    (_prefix(hlen=5) + b"\x94\x00\xff\xa0\x80", "bad request id"),    # -1
    (_prefix(hlen=5) + b"\x94\x00\x01\x01\x80", "frame name is int"),
    (_prefix(hlen=6) + b"\x94\x00\x01\xa0\x80\x00", "undecodable header"),
])
def test_bad_frames_raise_frame_error(data, message):
    dec = FrameDecoder(max_payload=999)
    with pytest.raises(FrameError, match=message):
        feed(dec, data)


def test_truncated_frame_is_pending_not_an_error():
    data = frame_bytes(REQUEST, 1, "m", {}, b"payload")
    dec = FrameDecoder()
    assert feed(dec, data[:-3]) == []
    assert dec.pending_bytes() == len(data) - 3


def test_limits_apply_to_the_next_prefix():
    dec = FrameDecoder(max_header=4096, max_payload=0)
    with pytest.raises(FrameError):
        feed(dec, frame_bytes(REQUEST, 1, "m", {}, b"x"))
    dec = FrameDecoder(max_header=4096, max_payload=0)
    dec.set_limits(framing.MAX_HEADER, 10)
    assert len(feed(dec, frame_bytes(REQUEST, 1, "m", {}, b"x"))) == 1
    with pytest.raises(ValueError):
        dec.set_limits(0, 10)
