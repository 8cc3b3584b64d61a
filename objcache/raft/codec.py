"""Wire encoding of Raft messages: a small msgpack-able header and one raw
payload (entry data, then snapshot data) that the RPC layer carries without
re-encoding.

``encode(msg) -> (header: list, payload: list[buffer])`` and
``decode(header, payload: memoryview) -> Message``. Entry data on the
receiving side are zero-copy slices of the received payload; they stay
valid as long as the entries do (the payload buffer is owned by them).

``decode`` validates every field: a malformed header raises
``MalformedMessage`` (the transport drops the frame and logs), never
crashes the node or produces an out-of-range message.
"""
from __future__ import annotations

from .types import (ConfState, Entry, EntryType, Message, MsgType, Snapshot,
                    SnapshotMeta)

_WIRE_TYPES = frozenset(t for t in MsgType if t >= MsgType.APP) | {MsgType.PROP}
_MAX_ENTRIES = 1 << 20


class MalformedMessage(ValueError):
    pass


def encode(m: Message) -> tuple[list, list]:
    buffers: list = []
    ents = []
    for e in m.entries:
        ents.append((e.term, e.index, int(e.type), len(e.data)))
        if len(e.data):
            buffers.append(e.data)
    snap = None
    if m.snapshot is not None:
        meta = m.snapshot.meta
        data = m.snapshot.data
        if data is None:
            raise ValueError("snapshot message without data (the driver must attach it)")
        snap = (meta.index, meta.term, sorted(meta.conf.voters),
                sorted(meta.conf.learners), len(data))
        buffers.append(data)
    header = [int(m.type), m.to, m.frm, m.term, m.log_term, m.index, m.commit,
              bool(m.reject), m.reject_hint, bytes(m.context), ents, snap]
    return header, buffers


def _int(v, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo or v >= 1 << 64:
        raise MalformedMessage(f"{what} must be an integer in [{lo}, 2**64), got {v!r}")
    return v


def decode(header, payload: memoryview | bytes | None) -> Message:
    if not isinstance(header, (list, tuple)) or len(header) != 12:
        raise MalformedMessage("raft header must be a 12-element array")
    (mtype, to, frm, term, log_term, index, commit, reject, hint, context,
     ents, snap) = header
    try:
        mtype = MsgType(_int(mtype, "type"))
    except ValueError:
        raise MalformedMessage(f"unknown raft message type {mtype!r}") from None
    if mtype not in _WIRE_TYPES:
        raise MalformedMessage(f"{mtype.name} is a local message type")
    if not isinstance(reject, bool):
        raise MalformedMessage("reject must be a bool")
    if not isinstance(context, (bytes, bytearray)):
        raise MalformedMessage("context must be bytes")
    if not isinstance(ents, (list, tuple)) or len(ents) > _MAX_ENTRIES:
        raise MalformedMessage("entries must be an array")
    view = memoryview(payload if payload is not None else b"")
    pos = 0
    entries = []
    for e in ents:
        if not isinstance(e, (list, tuple)) or len(e) != 4:
            raise MalformedMessage("entry header must be [term, index, type, length]")
        et, ei, ety, elen = (_int(e[0], "entry term"), _int(e[1], "entry index"),
                             _int(e[2], "entry type"), _int(e[3], "entry length"))
        if ety not in (EntryType.NORMAL, EntryType.CONF_CHANGE):
            raise MalformedMessage(f"unknown entry type {ety}")
        if pos + elen > len(view):
            raise MalformedMessage("entry lengths exceed the payload")
        if entries and ei != entries[-1].index + 1:
            raise MalformedMessage("entries are not contiguous")
        entries.append(Entry(et, ei, EntryType(ety), view[pos:pos + elen]))
        pos += elen
    snapshot = None
    if snap is not None:
        if not isinstance(snap, (list, tuple)) or len(snap) != 5:
            raise MalformedMessage("snapshot header must be [index, term, voters, learners, length]")
        si, st, voters, learners, slen = snap
        si, st, slen = _int(si, "snapshot index"), _int(st, "snapshot term"), \
            _int(slen, "snapshot length")
        if not isinstance(voters, (list, tuple)) or not isinstance(learners, (list, tuple)):
            raise MalformedMessage("snapshot voters/learners must be arrays")
        try:
            conf = ConfState(frozenset(_int(v, "voter", 1) for v in voters),
                             frozenset(_int(v, "learner", 1) for v in learners))
        except ValueError as exc:
            raise MalformedMessage(str(exc)) from None
        if pos + slen != len(view):
            raise MalformedMessage("snapshot length does not match the payload")
        snapshot = Snapshot(SnapshotMeta(si, st, conf), bytes(view[pos:pos + slen]))
        pos += slen
    if pos != len(view):
        raise MalformedMessage(f"{len(view) - pos} unexpected payload bytes")
    if (mtype == MsgType.SNAP) != (snapshot is not None):
        raise MalformedMessage("a snapshot travels in SNAP messages only, and always")
    return Message(mtype, to=_int(to, "to"), frm=_int(frm, "from", 1),
                   term=_int(term, "term"), log_term=_int(log_term, "log term"),
                   index=_int(index, "index"), entries=entries,
                   commit=_int(commit, "commit"), reject=reject,
                   reject_hint=_int(hint, "reject hint"), snapshot=snapshot,
                   context=bytes(context))
