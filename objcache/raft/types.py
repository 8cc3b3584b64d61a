"""Raft value types: entries, hard state, configurations, snapshots, messages,
and the Ready batch the core hands to its driver.

Plain classes with __slots__: the core creates millions of these in the
simulator and on busy nodes. They are values; nothing mutates an Entry or a
Message after it has been handed across the core boundary.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1     # data is an encoded ConfChange (see ConfChange.encode)


class Entry:
    __slots__ = ("term", "index", "type", "data")

    def __init__(self, term: int, index: int, type: EntryType = EntryType.NORMAL,
                 data: bytes = b""):
        self.term = term
        self.index = index
        self.type = type
        self.data = data

    def __eq__(self, other):
        return (isinstance(other, Entry) and self.term == other.term
                and self.index == other.index and self.type == other.type
                and bytes(self.data) == bytes(other.data))

    def __repr__(self):
        kind = "" if self.type == EntryType.NORMAL else " conf"
        return f"Entry(t{self.term} i{self.index}{kind} {len(self.data)}B)"

    def size(self) -> int:
        return len(self.data) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""
    term: int = 0
    vote: int = 0           # node id voted for in `term`; 0 = none
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()

    def __post_init__(self):
        if self.voters & self.learners:
            raise ValueError(f"nodes {sorted(self.voters & self.learners)} are "
                             f"both voters and learners")


class ConfChangeType(enum.IntEnum):
    ADD_VOTER = 0       # also promotes a learner
    ADD_LEARNER = 1     # also demotes a voter
    REMOVE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change."""
    type: ConfChangeType
    node_id: int

    def encode(self) -> bytes:
        return bytes([int(self.type)]) + self.node_id.to_bytes(8, "little")

    @classmethod
    def decode(cls, data: bytes) -> "ConfChange":
        data = bytes(data)
        if len(data) != 9 or data[0] > 2:
            raise ValueError(f"malformed conf change record ({len(data)} bytes)")
        return cls(ConfChangeType(data[0]), int.from_bytes(data[1:], "little"))

    def apply(self, conf: ConfState) -> ConfState:
        v, l = set(conf.voters), set(conf.learners)
        v.discard(self.node_id)
        l.discard(self.node_id)
        if self.type == ConfChangeType.ADD_VOTER:
            v.add(self.node_id)
        elif self.type == ConfChangeType.ADD_LEARNER:
            l.add(self.node_id)
        return ConfState(frozenset(v), frozenset(l))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int
    term: int
    conf: ConfState


@dataclass(slots=True)
class Snapshot:
    """A snapshot as it travels: metadata plus the state machine's data.

    The core never looks at ``data``: it is None on snapshots the core
    creates for MsgSnap (the driver fills it from its snapshot store before
    sending) and carries the received bytes on an incoming MsgSnap through to
    Ready.snapshot unchanged.
    """
    meta: SnapshotMeta
    data: bytes | None = None


class MsgType(enum.IntEnum):
    # Local-only (term 0, never on the wire).
    HUP = 0                 # start an election (campaign)
    BEAT = 1                # leader: send heartbeats now
    PROP = 2                # propose entries
    SNAP_STATUS = 3         # driver: a snapshot to `frm` succeeded / failed (reject)
    UNREACHABLE = 4         # driver: `frm` could not be reached
    CHECK_QUORUM = 5
    # Wire messages.
    APP = 10                # append entries (index/log_term = the entry before them)
    APP_RESP = 11
    VOTE = 12
    VOTE_RESP = 13
    PRE_VOTE = 14
    PRE_VOTE_RESP = 15
    HEARTBEAT = 16
    HEARTBEAT_RESP = 17
    SNAP = 18               # install snapshot
    TRANSFER_LEADER = 19    # frm = the proposed new leader
    TIMEOUT_NOW = 20        # campaign now, skipping pre-vote and leases
    READ_INDEX = 21
    READ_INDEX_RESP = 22


class Message:
    __slots__ = ("type", "to", "frm", "term", "log_term", "index", "entries",
                 "commit", "reject", "reject_hint", "snapshot", "context")

    def __init__(self, type: MsgType, to: int = 0, frm: int = 0, term: int = 0,
                 log_term: int = 0, index: int = 0, entries: list[Entry] | tuple = (),
                 commit: int = 0, reject: bool = False, reject_hint: int = 0,
                 snapshot: Snapshot | None = None, context: bytes = b""):
        self.type = type
        self.to = to
        self.frm = frm
        self.term = term
        self.log_term = log_term
        self.index = index
        self.entries = entries
        self.commit = commit
        self.reject = reject
        self.reject_hint = reject_hint
        self.snapshot = snapshot
        self.context = context

    def __repr__(self):
        parts = [f"{self.type.name} {self.frm}->{self.to} t{self.term}"]
        if self.type in (MsgType.APP, MsgType.APP_RESP, MsgType.VOTE,
                         MsgType.PRE_VOTE, MsgType.READ_INDEX_RESP):
            parts.append(f"i{self.index} lt{self.log_term}")
        if self.entries:
            parts.append(f"{len(self.entries)} ents")
        if self.commit:
            parts.append(f"c{self.commit}")
        if self.reject:
            parts.append(f"REJECT hint={self.reject_hint}")
        if self.snapshot is not None:
            parts.append(f"snap@{self.snapshot.meta.index}")
        return f"Msg({' '.join(parts)})"


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied
    ``index``. ``context`` is the caller's request id."""
    index: int
    context: bytes


class Role(enum.IntEnum):
    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


@dataclass(frozen=True, slots=True)
class SoftState:
    leader: int         # 0 = unknown
    role: Role


@dataclass(slots=True)
class Ready:
    """Work the driver must do, IN THIS ORDER, then call ``core.advance(rd)``:

    1. If ``must_sync``: persist ``snapshot`` (if any: it replaces the log
       up to its index, and the entries after it too unless the stored entry
       at its index has its term), then ``entries`` (an entry whose index is <= the
       last stored index first truncates the stored log from that index),
       then ``hard_state`` (if any) — all durable (fdatasync) before step 2.
       Otherwise nothing needs persisting (at most the commit index moved).
    2. Send ``messages``. They promise what step 1 made durable (votes,
       acknowledged entries); sending earlier could break safety after a
       crash.
    3. Apply ``snapshot`` to the state machine (restore), then
       ``committed_entries`` in order; answer ``read_states`` once the state
       machine has applied their index.
    4. ``advance(rd)``. No step/tick/propose call may happen between
       ``ready()`` and ``advance()``.
    """
    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    # Whether step 1 must persist anything: entries, a snapshot, or a new
    # term or vote. A hard state that differs only in its commit index may be
    # skipped (commit is a hint the leader re-sends; recovery clamps it), so
    # advancing the commit index never costs an fdatasync of its own.
    must_sync: bool = False
    # A leader whose term and vote are unchanged may send ``messages``
    # before step 1 completes (its appends go out while it writes the same
    # entries; Raft thesis §10.2.1). Safe because the leader counts its own
    # entries toward commit only after advance(), i.e. once they are
    # durable; everything else in its messages is already durable.
    send_before_persist: bool = False



class ProposalDropped(Exception):
    """The proposal was not appended: no leader, a leadership transfer in
    progress, or a membership change already pending."""


class NotLeader(ProposalDropped):
    """This node is not the leader; ``leader`` is the last known one (0 if
    unknown)."""

    def __init__(self, leader: int):
        super().__init__(f"not the leader (leader hint: {leader or 'unknown'})")
        self.leader = leader
