"""Fuzzing the frame decoder (and a live server) with Hypothesis.

The default run is bounded to a few seconds; the ``slow`` variants (run with
OBJCACHE_SLOW=1) do the same with many more examples.

Properties:
* any byte string, split anywhere: the decoder returns frames or raises
  FrameError - nothing else, and it never allocates past its limits;
* a valid frame stream split at arbitrary points (and a tiny scratch
  buffer, so the dedicated-buffer paths run) decodes to exactly the frames
  that were encoded;
* a mutated valid stream (flipped, inserted, deleted, truncated bytes):
  frames or FrameError, nothing else;
* garbage sent to a live server, before or after authentication: that
  connection is dropped or answered, the server keeps serving.
"""
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objcache.rpc import FrameError, framing
from objcache.rpc.framing import FrameDecoder

from . import SECRET, RawPeer, client_of, frame_bytes, run, serving

MAX_PAYLOAD = 64 << 10          # small limits keep each example cheap
MAX_HEADER = 16 << 10

QUICK = dict(max_examples=100, deadline=None, derandomize=False,
             suppress_health_check=[HealthCheck.too_slow,
                                    HealthCheck.data_too_large])
SOAK = dict(QUICK, max_examples=5000)


def _decode_all(pieces, scratch=256 << 10):
    """Feed pieces; (frames, error or None). Only FrameError is allowed."""
    dec = FrameDecoder(MAX_HEADER, MAX_PAYLOAD, scratch_size=scratch)
    frames = []
    try:
        for piece in pieces:
            mv = memoryview(piece)
            while len(mv):
                buf = dec.get_buffer(-1)
                assert 0 < len(buf) <= max(scratch, MAX_PAYLOAD, MAX_HEADER)
                n = min(len(buf), len(mv))
                buf[:n] = mv[:n]
                mv = mv[n:]
                dec.buffer_updated(n)
                while (f := dec.next_frame()) is not None:
                    assert f.kind in framing.KIND_NAMES
                    assert 0 <= f.id <= framing.MAX_REQUEST_ID
                    assert isinstance(f.name, str)
                    assert f.payload is None or \
                        0 < f.payload.nbytes <= MAX_PAYLOAD
                    frames.append(f)
    except FrameError as exc:
        return frames, exc
    return frames, None


def _split(data: bytes, cuts) -> list:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# -- strategies ----------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(),
                     st.integers(-2**63, 2**64 - 1),
                     st.floats(allow_nan=False), st.text(max_size=20),
                     st.binary(max_size=40))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=6)
_frames = st.tuples(
    st.sampled_from(sorted(framing.KIND_NAMES)),
    st.integers(0, framing.MAX_REQUEST_ID),
    st.text(max_size=30),
    st.dictionaries(st.text(max_size=10), _values, max_size=4),
    st.one_of(st.just(b""), st.binary(min_size=1, max_size=300),
              st.integers(1, 5000).map(lambda n: bytes(range(256)) * (n // 256)
                                       + bytes(n % 256))),
)
_streams = st.lists(_frames, min_size=1, max_size=5)
_garbage = st.one_of(
    st.binary(max_size=2000),
    st.binary(max_size=2000).map(lambda b: framing.MAGIC + b),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.binary(max_size=500)).map(
        lambda t: framing.PREFIX.pack(framing.MAGIC, t[0], t[1]) + t[2]),
)
_cuts = st.lists(st.integers(0, 1 << 20), max_size=12)


# -- properties ------------------------------------------------------------------

def prop_random_bytes(data, cuts):
    frames, err = _decode_all(_split(data, cuts))
    assert err is None or isinstance(err, FrameError)


def prop_valid_stream_any_split(stream, cuts, scratch):
    data = b"".join(frame_bytes(*f) for f in stream)
    frames, err = _decode_all(_split(data, cuts), scratch=scratch)
    assert err is None
    got = [(f.kind, f.id, f.name, f.fields,
            b"" if f.payload is None else bytes(f.payload)) for f in frames]
    # Compare through msgpack: what was encoded, as msgpack returns it.
    want = [msgpack.unpackb(msgpack.packb(list(f[:4]))) + [f[4]]
            for f in stream]
    assert [list(g) for g in got] == want


def prop_mutated_stream(stream, edits, cuts):
    data = bytearray(b"".join(frame_bytes(*f) for f in stream))
    for op, pos, blob in edits:
        pos %= len(data) + 1
        if op == "flip" and pos < len(data):
            data[pos] ^= blob[0] if blob else 0xFF
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos:pos + 1 + len(blob)]
        elif op == "truncate":
            del data[pos:]
    frames, err = _decode_all(_split(bytes(data), cuts))
    assert err is None or isinstance(err, FrameError)


_edits = st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete",
                                             "truncate"]),
                            st.integers(0, 1 << 16), st.binary(max_size=6)),
                  min_size=1, max_size=4)


def _build(prop, strategies, options):
    return settings(**options)(given(*strategies)(prop))


test_fuzz_random_bytes = _build(prop_random_bytes, (_garbage, _cuts), QUICK)
test_fuzz_valid_stream_any_split = _build(
    prop_valid_stream_any_split,
    (_streams, _cuts, st.sampled_from([16, 64, 500, 256 << 10])), QUICK)
test_fuzz_mutated_stream = _build(prop_mutated_stream,
                                  (_streams, _edits, _cuts), QUICK)

test_fuzz_random_bytes_soak = pytest.mark.slow(
    _build(prop_random_bytes, (_garbage, _cuts), SOAK))
test_fuzz_valid_stream_any_split_soak = pytest.mark.slow(_build(
    prop_valid_stream_any_split,
    (_streams, _cuts, st.sampled_from([16, 64, 500, 256 << 10])), SOAK))
test_fuzz_mutated_stream_soak = pytest.mark.slow(
    _build(prop_mutated_stream, (_streams, _edits, _cuts), SOAK))


# -- live server -----------------------------------------------------------------

def _live(garbage_sets):
    """Send each garbage blob on its own connection, half of them after
    authenticating; the server must keep answering a bystander."""
    async def body():
        async with serving() as server, client_of(server) as bystander:
            for i, blob in enumerate(garbage_sets):
                peer = await RawPeer.connect(
                    server.port, secret=None if i % 2 else SECRET)
                peer.send(blob)
                # Either the server drops us, or it waits for more bytes;
                # both are fine. Closing our side must never hurt it.
                await peer.close()
                r = await bystander.call("echo", {"i": i}, timeout=10)
                assert r.fields == {"i": i}
            assert bystander.connects == 1
    run(body)


@settings(**dict(QUICK, max_examples=15))
@given(st.lists(_garbage, min_size=1, max_size=6))
def test_fuzz_live_server_survives_garbage(blobs):
    _live(blobs)


@pytest.mark.slow
@settings(**dict(QUICK, max_examples=400))
@given(st.lists(_garbage, min_size=1, max_size=10))
def test_fuzz_live_server_survives_garbage_soak(blobs):
    _live(blobs)
