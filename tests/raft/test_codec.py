"""Raft wire codec: round trips, and malformed headers rejected cleanly."""
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from objcache.raft.codec import MalformedMessage, decode, encode
from objcache.raft.types import (ConfState, Entry, EntryType, Message, MsgType,
                                 Snapshot, SnapshotMeta)

wire_types = st.sampled_from([t for t in MsgType if t >= MsgType.APP and t != MsgType.SNAP])
u64 = st.integers(0, 2**64 - 1)


@st.composite
def messages(draw):
    t = draw(wire_types)
    start = draw(st.integers(1, 2**40))
    datas = draw(st.lists(st.binary(max_size=300), max_size=6))
    ents = [Entry(draw(u64), start + k, draw(st.sampled_from(list(EntryType))), d)
            for k, d in enumerate(datas)]
    return Message(t, to=draw(u64), frm=draw(st.integers(1, 2**64 - 1)), term=draw(u64),
                   log_term=draw(u64), index=draw(u64), entries=ents, commit=draw(u64),
                   reject=draw(st.booleans()), reject_hint=draw(u64),
                   context=draw(st.binary(max_size=20)))


def roundtrip(m):
    header, buffers = encode(m)
    wire = msgpack.unpackb(msgpack.packb(header))
    return decode(wire, b"".join(bytes(b) for b in buffers))


@settings(max_examples=300, deadline=None)
@given(messages())
def test_roundtrip(m):
    got = roundtrip(m)
    for f in ("type", "to", "frm", "term", "log_term", "index", "commit", "reject",
              "reject_hint", "context"):
        assert getattr(got, f) == getattr(m, f), f
    assert got.entries == list(m.entries)


def test_snapshot_roundtrip():
    snap = Snapshot(SnapshotMeta(10, 3, ConfState(frozenset({1, 2}), frozenset({3}))), b"state")
    got = roundtrip(Message(MsgType.SNAP, to=2, frm=1, term=3, snapshot=snap))
    assert got.snapshot.meta == snap.meta and got.snapshot.data == b"state"


def test_snapshot_without_data_is_refused_on_encode():
    snap = Snapshot(SnapshotMeta(10, 3, ConfState(frozenset({1}))))
    with pytest.raises(ValueError):
        encode(Message(MsgType.SNAP, to=2, frm=1, term=3, snapshot=snap))


GOOD = [int(MsgType.APP), 2, 1, 3, 0, 0, 0, False, 0, b"", [[3, 1, 0, 2]], None]


@pytest.mark.parametrize("header, payload", [
    ("nope", b""), ([1, 2, 3], b""), (GOOD[:11], b"ab"),
    ([99] + GOOD[1:], b"ab"), ([int(MsgType.HUP)] + GOOD[1:], b"ab"),
    (GOOD[:2] + [0] + GOOD[3:], b"ab"),                   # from = 0
    (GOOD[:3] + [-1] + GOOD[4:], b"ab"),                  # negative term
    (GOOD[:3] + [2**64] + GOOD[4:], b"ab"),               # term too big
    (GOOD[:3] + ["3"] + GOOD[4:], b"ab"),                 # wrong type
    (GOOD[:7] + [1] + GOOD[8:], b"ab"),                   # reject not a bool
    (GOOD[:9] + ["ctx"] + GOOD[10:], b"ab"),              # context not bytes
    (GOOD, b"a"),                                         # payload too short
    (GOOD, b"abc"),                                       # payload too long
    (GOOD[:10] + [[[3, 1, 7, 2]]] + GOOD[11:], b"ab"),    # entry type
    (GOOD[:10] + [[[3, 1, 0, 1], [3, 5, 0, 1]]] + GOOD[11:], b"ab"),  # gap
    (GOOD[:10] + [[[3, 1, 0]]] + GOOD[11:], b"ab"),       # short entry header
    (GOOD[:11] + [[1, 1, [1], [], 0]], b"ab"),            # snapshot on APP
    ([int(MsgType.SNAP)] + GOOD[1:10] + [[], [1, 1, [1], [1], 2]], b"ab"),  # voter=learner
    ([int(MsgType.SNAP)] + GOOD[1:10] + [[], None], b""),  # SNAP without snapshot
])
def test_malformed(header, payload):
    with pytest.raises(MalformedMessage):
        decode(header, payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-5, 2**65), st.binary(max_size=5), st.none(),
                          st.booleans(), st.lists(st.integers(0, 5), max_size=5)),
                max_size=14), st.binary(max_size=20))
def test_garbage_never_escapes_as_another_error(header, payload):
    try:
        decode(header, payload)
    except MalformedMessage:
        pass
