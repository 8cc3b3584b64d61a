"""Raft as a synchronous, deterministic state machine: no asyncio, no clock,
no sockets, no files.

Inputs: ``tick()`` (one logical clock tick), ``step(msg)`` (a message from a
peer or a local request), ``propose(data)``, ``propose_conf_change(cc)``,
``read_index(ctx)``, ``transfer_leader(to)``, ``compact(index)``.
Output: ``ready()`` returns a ``Ready`` batch (entries and hard state to
persist, messages to send, committed entries to apply, read states); the
driver performs it in the order written on ``Ready`` and calls
``advance(rd)``. Randomness (election timeouts) comes from a seeded
``random.Random``, so the same inputs give the same outputs.

Features: leader election with pre-vote and check-quorum (leader leases);
log replication with pipelining and flow control (progress.py); commit by
quorum of the leader's term; linearizable reads (ReadIndex); single-server
membership changes with learners; leader transfer; snapshots, compaction and
InstallSnapshot. The structure follows etcd-io/raft; see docs/raft.md for
the message flow and the I/O ordering rules.

Membership changes take effect as soon as their entry is in a server's log
(committed or not), and are undone if that entry is truncated away (Raft
thesis §4.1). At most one may be pending: a leader accepts a new one only
once the previous one has been applied, and a new leader only once
everything up to its election entry has been applied (which rules out the
single-server-change bug Ongaro described in 2015). A leader that removes
itself keeps leading, without counting itself, until the change commits.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .log import LogSafetyError, RaftLog
from .progress import Progress, ProgressState
from .types import (ConfChange, ConfState, Entry, EntryType, HardState, Message,
                    MsgType, NotLeader, ProposalDropped, Ready, ReadState, Role,
                    Snapshot, SnapshotMeta, SoftState)

NONE = 0                            # node id meaning "nobody"
TRANSFER_CONTEXT = b"transfer"      # vote context of a leadership transfer


@dataclass
class Config:
    id: int
    election_ticks: int = 10        # followers campaign after [e, 2e) ticks of silence
    heartbeat_ticks: int = 1
    max_inflight: int = 256         # unacknowledged appends per follower
    max_msg_bytes: int = 1 << 20    # entry bytes per append (at least one entry)
    max_apply_bytes: int = 64 << 20  # committed entry bytes per Ready
    pre_vote: bool = True
    check_quorum: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.id <= 0:
            raise ValueError("node id must be a positive integer")
        if self.heartbeat_ticks <= 0:
            raise ValueError("heartbeat_ticks must be > 0")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        if self.max_inflight <= 0 or self.max_msg_bytes <= 0:
            raise ValueError("max_inflight and max_msg_bytes must be > 0")


@dataclass
class RestoreState:
    """What the storage layer recovered from disk (all of it durable)."""
    hard_state: HardState = HardState()
    snapshot: SnapshotMeta | None = None
    entries: list[Entry] | None = None     # entries after the snapshot
    conf: ConfState | None = None          # the membership when there is no snapshot


def _normalize_hard_state(restore: RestoreState) -> HardState:
    """Make a recovered hard state consistent with the recovered log.

    The driver persists a Ready's records in order (snapshot, entries, hard
    state); a crash can tear that write after the entries and before the
    hard state. Recovery then sees entries of a term newer than the durable
    term, or a durable commit index beyond the log. Both are repaired here:
    * term := the newest entry's term, with no vote — safe because a vote in
      that term was never sent: messages go out only after the whole Ready
      is durable, and an earlier, complete Ready would have recorded the term;
    * commit := min(commit, last index) — the commit index is only a hint;
      the leader re-sends it.
    """
    hs = restore.hard_state
    ents = restore.entries or []
    last_index = ents[-1].index if ents else (restore.snapshot.index if restore.snapshot else 0)
    last_term = ents[-1].term if ents else (restore.snapshot.term if restore.snapshot else 0)
    term, vote = hs.term, hs.vote
    if last_term > term:
        term, vote = last_term, NONE
    return HardState(term, vote, min(hs.commit, last_index))


class _ReadRequest:
    __slots__ = ("index", "frm", "context", "acks")

    def __init__(self, index: int, frm: int, context: bytes):
        self.index = index
        self.frm = frm
        self.context = context
        self.acks: set[int] = set()


class RaftCore:
    def __init__(self, config: Config, restore: RestoreState | None = None):
        config.validate()
        restore = restore or RestoreState()
        self.cfg = config
        self.id = config.id
        self._rng = random.Random(config.seed)

        snap = restore.snapshot
        hs = _normalize_hard_state(restore)
        self.log = RaftLog(snap.index if snap else 0, snap.term if snap else 0,
                           restore.entries, hs.commit)
        self.term = hs.term
        self.vote = hs.vote
        self.role = Role.FOLLOWER
        self.leader = NONE
        self.lead_transferee = NONE

        # Membership: the conf of the snapshot, then every conf change entry
        # in the log, committed or not — a change takes effect as soon as it
        # is in a server's log (Raft thesis §4.1), and a truncation that
        # removes it reverts it. (Taking effect at commit is unsafe: a node
        # restarting with a stale commit index would count votes of servers
        # already removed.) _conf_history: (index, conf) per change after
        # the snapshot; _conf_scanned: the log is scanned up to there.
        base = snap.conf if snap else (restore.conf or ConfState(frozenset({self.id})))
        self.conf = base
        self._conf_base = (self.log.snap_index, base)
        self._conf_history: list[tuple[int, ConfState]] = []
        self._conf_scanned = self.log.snap_index
        self._leaving_at = 0            # leader: index of the change removing it
        self.prs: dict[int, Progress] = {}
        self._sync_conf()
        self._reset_progress()

        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._randomized_timeout = 0
        self._reset_randomized_timeout()
        self.pending_conf_index = 0
        self._votes: dict[int, bool] = {}
        self._reads: dict[bytes, _ReadRequest] = {}
        self._read_queue: list[bytes] = []
        self._pending_reads: list[Message] = []   # wait for a commit in our term

        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._prev_hard = HardState(self.term, self.vote, self.log.committed)
        self._prev_soft = SoftState(self.leader, self.role)

    # ================================================================ queries

    @property
    def is_leader(self) -> bool:
        return self.role == Role.LEADER

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    def quorum(self) -> int:
        return len(self.conf.voters) // 2 + 1

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def conf_at(self, index: int) -> ConfState:
        conf = self._conf_base[1]
        for i, c in self._conf_history:
            if i > index:
                break
            conf = c
        return conf

    def status(self) -> dict:
        return {
            "id": self.id, "term": self.term, "role": self.role.name.lower(),
            "leader": self.leader, "commit": self.log.committed,
            "applied": self.log.applied, "last_index": self.log.last_index(),
            "snapshot_index": self.log.snap_index,
            "voters": sorted(self.conf.voters), "learners": sorted(self.conf.learners),
            "progress": {i: repr(p) for i, p in self.prs.items()} if self.is_leader else {},
        }

    # ================================================================ inputs

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (as if the election timeout had fired)."""
        self.step(Message(MsgType.HUP, frm=self.id))

    def propose(self, data: bytes) -> int:
        """Append a normal entry; returns its index. Raises NotLeader /
        ProposalDropped. The entry is committed when it comes back in
        Ready.committed_entries with the same (index, term)."""
        return self._propose(Entry(0, 0, EntryType.NORMAL, data))

    def propose_many(self, datas: list[bytes]) -> int:
        """Append several normal entries with one round of appends to the
        followers (one message per follower instead of one per entry).
        Returns the index of the first; the rest follow consecutively."""
        if not datas:
            raise ValueError("propose_many needs at least one entry")
        ents = [Entry(0, 0, EntryType.NORMAL, d) for d in datas]
        self._check_can_propose()
        last = self._append_entries(ents)
        self._bcast_append()
        return last - len(ents) + 1

    def propose_conf_change(self, cc: ConfChange) -> int:
        return self._propose(Entry(0, 0, EntryType.CONF_CHANGE, cc.encode()))

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read point. The answer is a ReadState with
        this ``context`` in a later Ready (never, if leadership is lost
        meanwhile: the caller retries after a timeout). Contexts must be
        unique per request."""
        if not context:
            raise ValueError("read_index needs a non-empty context")
        self.step(Message(MsgType.READ_INDEX, frm=self.id,
                          entries=[Entry(0, 0, EntryType.NORMAL, context)]))

    def transfer_leader(self, to: int) -> None:
        self.step(Message(MsgType.TRANSFER_LEADER, frm=to, to=self.leader or self.id))

    def report_unreachable(self, peer: int) -> None:
        self.step(Message(MsgType.UNREACHABLE, frm=peer))

    def report_snapshot(self, peer: int, ok: bool) -> None:
        self.step(Message(MsgType.SNAP_STATUS, frm=peer, reject=not ok))

    def compact(self, index: int) -> SnapshotMeta:
        """The driver has made durable a snapshot of the state machine at
        applied ``index``: forget the log up to it. Returns the snapshot's
        metadata (its conf is the membership as of ``index``)."""
        conf = self.conf_at(index)
        self.log.compact(index)
        self._conf_base = (self.log.snap_index, conf)
        self._conf_history = [(i, c) for i, c in self._conf_history
                              if i > self.log.snap_index]
        self._conf_scanned = max(self._conf_scanned, self.log.snap_index)
        return SnapshotMeta(self.log.snap_index, self.log.snap_term, conf)

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.leader)
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership is being transferred to "
                                  f"{self.lead_transferee}")
        if self.id not in self.prs:
            raise ProposalDropped("this node was removed from the group")

    def _propose(self, entry: Entry) -> int:
        self._check_can_propose()
        if entry.type == EntryType.CONF_CHANGE:
            if self.pending_conf_index > self.log.applied:
                raise ProposalDropped(
                    f"a membership change is pending (index {self.pending_conf_index},"
                    f" applied {self.log.applied})")
            ConfChange.decode(entry.data)   # validate before it enters the log
        index = self._append_entries([entry])
        if entry.type == EntryType.CONF_CHANGE:
            self.pending_conf_index = index
        self._bcast_append()
        return index

    # ================================================================ step

    def step(self, m: Message) -> None:
        """Feed one message. Messages from older terms are answered or
        dropped; a newer term makes this node a follower first."""
        if m.term == 0:
            pass                                    # local message
        elif m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                force = m.context == TRANSFER_CONTEXT
                in_lease = (self.cfg.check_quorum and self.leader != NONE
                            and self.election_elapsed < self.cfg.election_ticks)
                if not force and in_lease:
                    # We heard from a live leader within the minimum election
                    # timeout: don't let a disrupting node depose it.
                    return
            if m.type == MsgType.PRE_VOTE:
                pass                                # a pre-vote never changes our term
            elif m.type == MsgType.PRE_VOTE_RESP and not m.reject:
                pass                                # our term moves when we win
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and \
                    m.type in (MsgType.HEARTBEAT, MsgType.APP):
                # A stale leader (e.g. after a partition heals) would never
                # learn of our term otherwise; this response makes it step down.
                self._send(Message(MsgType.APP_RESP, to=m.frm))
            elif m.type == MsgType.PRE_VOTE:
                self._send(Message(MsgType.PRE_VOTE_RESP, to=m.frm, term=self.term,
                                   reject=True))
            return

        t = m.type
        if t == MsgType.HUP:
            self._hup(transfer=False)
        elif t in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (self.vote == m.frm
                    or (self.vote == NONE and self.leader == NONE)
                    or (m.type == MsgType.PRE_VOTE and m.term > self.term))
        resp = MsgType.VOTE_RESP if m.type == MsgType.VOTE else MsgType.PRE_VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Answer with the candidate's term: for a real vote we already
            # moved to it; for a pre-vote the candidate expects its future term.
            self._send(Message(resp, to=m.frm, term=m.term))
            if m.type == MsgType.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(Message(resp, to=m.frm, term=self.term, reject=True))

    # ---------------------------------------------------------------- elections

    def _hup(self, transfer: bool) -> None:
        if self.role == Role.LEADER:
            return
        if not self.promotable():
            return
        if self.cfg.pre_vote and not transfer:
            self._campaign(pre=True, transfer=False)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool) -> None:
        if pre:
            self._become_pre_candidate()
            vote_type, term = MsgType.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = MsgType.VOTE, self.term
        if self._poll(self.id, True) == "won":
            # Single-voter group: no one to ask.
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        ctx = TRANSFER_CONTEXT if transfer else b""
        for peer in sorted(self.conf.voters):
            if peer == self.id:
                continue
            self._send(Message(vote_type, to=peer, term=term,
                               index=self.log.last_index(),
                               log_term=self.log.last_term(), context=ctx))

    def _poll(self, peer: int, granted: bool) -> str:
        if peer in self.conf.voters:
            self._votes.setdefault(peer, granted)
        yes = sum(1 for p, g in self._votes.items() if g and p in self.conf.voters)
        no = sum(1 for p, g in self._votes.items() if not g and p in self.conf.voters)
        if yes >= self.quorum():
            return "won"
        if no > len(self.conf.voters) - self.quorum():
            return "lost"
        return "pending"

    def _step_candidate(self, m: Message) -> None:
        my_resp = (MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE
                   else MsgType.VOTE_RESP)
        t = m.type
        if t == MsgType.PROP:
            raise NotLeader(NONE)
        if t in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP):
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
        elif t == my_resp:
            result = self._poll(m.frm, not m.reject)
            if result == "won":
                if self.role == Role.PRE_CANDIDATE:
                    self._campaign(pre=False, transfer=False)
                else:
                    self._become_leader()
            elif result == "lost":
                # A pre-candidate that lost keeps its term; a candidate too
                # (it already incremented it).
                self._become_follower(self.term, NONE)
        elif t == MsgType.READ_INDEX:
            pass                                    # no leader to forward to
        # TIMEOUT_NOW and the rest: ignored while campaigning.

    # ---------------------------------------------------------------- follower

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MsgType.PROP:
            raise NotLeader(self.leader)
        if t == MsgType.APP:
            self.election_elapsed = 0
            self.leader = m.frm
            self._handle_append(m)
        elif t == MsgType.HEARTBEAT:
            self.election_elapsed = 0
            self.leader = m.frm
            self.log.commit_to(min(m.commit, self.log.last_index()))
            self._send(Message(MsgType.HEARTBEAT_RESP, to=m.frm, context=m.context))
        elif t == MsgType.SNAP:
            self.election_elapsed = 0
            self.leader = m.frm
            self._handle_snapshot(m)
        elif t == MsgType.TRANSFER_LEADER:
            if self.leader != NONE:
                self._send(Message(MsgType.TRANSFER_LEADER, to=self.leader, frm=m.frm))
        elif t == MsgType.TIMEOUT_NOW:
            self._hup(transfer=True)
        elif t == MsgType.READ_INDEX:
            if self.leader != NONE:
                m.to = self.leader
                self._send(m)
        elif t == MsgType.READ_INDEX_RESP:
            if m.entries:
                self._read_states.append(ReadState(m.index, bytes(m.entries[0].data)))

    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            # Everything up to our commit index is already known to match.
            self._send(Message(MsgType.APP_RESP, to=m.frm, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        self._sync_conf()
        if last_new is not None:
            self._send(Message(MsgType.APP_RESP, to=m.frm, index=last_new))
            return
        # Reject, with a hint that lets the leader skip a whole term of
        # conflicting entries per round trip.
        hint = self.log.find_conflict_by_term(min(m.index, self.log.last_index()),
                                              m.log_term)
        self._send(Message(MsgType.APP_RESP, to=m.frm, index=m.index, reject=True,
                           reject_hint=hint, log_term=self.log.term(hint) or 0))

    def _handle_snapshot(self, m: Message) -> None:
        meta = m.snapshot.meta
        if meta.index <= self.log.committed:
            self._send(Message(MsgType.APP_RESP, to=m.frm, index=self.log.committed))
            return
        if self.log.match_term(meta.index, meta.term):
            # We already have the snapshot's last entry: just fast-forward.
            self.log.commit_to(meta.index)
            self._send(Message(MsgType.APP_RESP, to=m.frm, index=self.log.committed))
            return
        self.log.restore(m.snapshot)
        self._conf_base = (meta.index, meta.conf)
        self._conf_history = []
        self._conf_scanned = meta.index
        self.log.truncated_from = 0
        self._set_conf(meta.conf)
        self._send(Message(MsgType.APP_RESP, to=m.frm, index=self.log.last_index()))

    # ---------------------------------------------------------------- leader

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MsgType.BEAT:
            self._bcast_heartbeat()
            return
        if t == MsgType.CHECK_QUORUM:
            if not self._quorum_active():
                self._become_follower(self.term, NONE)
            return
        if t == MsgType.PROP:
            for e in m.entries:
                self._propose(e)
            return
        if t == MsgType.READ_INDEX:
            self._leader_read_index(m)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t == MsgType.APP_RESP:
            self._handle_append_response(m, pr)
        elif t == MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and pr.is_paused(self.cfg.max_inflight):
                # A full window with the follower alive: the oldest append
                # was probably lost; free one slot so replication resumes.
                if pr.inflights:
                    pr.inflights.popleft()
            if pr.match < self.log.last_index():
                self._send_append(m.frm)
            if m.context:
                self._ack_read(m.context, m.frm)
        elif t == MsgType.SNAP_STATUS:
            if pr.state != ProgressState.SNAPSHOT:
                return
            if m.reject:
                pr.pending_snapshot = 0
            pr.become_probe()
            # Wait for the follower's append response (or a heartbeat)
            # before probing again.
            pr.probe_sent = True
        elif t == MsgType.UNREACHABLE:
            if pr.state == ProgressState.REPLICATE:
                pr.become_probe()
        elif t == MsgType.TRANSFER_LEADER:
            self._leader_transfer(m.frm, pr)

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint = self.log.find_conflict_by_term(hint, m.log_term)
            if pr.maybe_decrease_to(m.index, hint):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        old_paused = pr.is_paused(self.cfg.max_inflight)
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.free_inflights_to(m.index)
        if self._maybe_commit():
            self._bcast_append()
        elif old_paused:
            self._send_append(m.frm)
        while self._maybe_send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, to=m.frm))

    def _leader_transfer(self, target: int, pr: Progress) -> None:
        if pr.is_learner:
            return
        if self.lead_transferee != NONE:
            if self.lead_transferee == target:
                return
            self.lead_transferee = NONE             # abort the previous one
        if target == self.id:
            return
        # Give up if the transfer doesn't finish within an election timeout.
        self.election_elapsed = 0
        self.lead_transferee = target
        if pr.match == self.log.last_index():
            self._send(Message(MsgType.TIMEOUT_NOW, to=target))
        else:
            self._send_append(target)

    def _leader_read_index(self, m: Message) -> None:
        ctx = bytes(m.entries[0].data) if m.entries else b""
        if len(self.conf.voters) == 1 and self.id in self.conf.voters:
            self._answer_read(self.log.committed, m.frm, ctx)
            return
        if not self._committed_in_current_term():
            # Our commit index may lag the true one until an entry of our
            # own term commits; hold the request until then.
            self._pending_reads.append(m)
            return
        if ctx in self._reads:
            return                                  # duplicate request id
        req = _ReadRequest(self.log.committed, m.frm, ctx)
        req.acks.add(self.id)
        self._reads[ctx] = req
        self._read_queue.append(ctx)
        self._bcast_heartbeat(context=ctx)

    def _ack_read(self, ctx: bytes, frm: int) -> None:
        req = self._reads.get(ctx)
        if req is None or frm not in self.conf.voters:
            return
        req.acks.add(frm)
        if len(req.acks & self.conf.voters) < self.quorum():
            return
        # A quorum confirmed our leadership at the time of `ctx`; every
        # request queued before it is confirmed too.
        while self._read_queue:
            c = self._read_queue.pop(0)
            r = self._reads.pop(c)
            self._answer_read(r.index, r.frm, r.context)
            if c == ctx:
                break

    def _answer_read(self, index: int, frm: int, ctx: bytes) -> None:
        if frm == self.id or frm == NONE:
            self._read_states.append(ReadState(index, ctx))
        else:
            self._send(Message(MsgType.READ_INDEX_RESP, to=frm, index=index,
                               entries=[Entry(0, 0, EntryType.NORMAL, ctx)]))

    def _committed_in_current_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def _quorum_active(self) -> bool:
        active = {self.id} if self.id in self.conf.voters else set()
        for peer, pr in self.prs.items():
            if peer == self.id:
                continue
            if pr.recent_active and peer in self.conf.voters:
                active.add(peer)
            pr.recent_active = False
        return len(active) >= self.quorum()

    def _maybe_commit(self) -> bool:
        matches = sorted((self.prs[v].match for v in self.conf.voters if v in self.prs),
                         reverse=True)
        if len(matches) < self.quorum():
            return False
        committed = self.log.maybe_commit(matches[self.quorum() - 1], self.term)
        if committed and self._leaving_at:
            self._maybe_step_down_removed()
            return committed
        if committed and self._pending_reads and self._committed_in_current_term():
            pending, self._pending_reads = self._pending_reads, []
            for m in pending:
                self._leader_read_index(m)
        return committed

    # ---------------------------------------------------------------- replication

    def _append_entries(self, ents: list[Entry]) -> int:
        last = self.log.last_index()
        for k, e in enumerate(ents):
            e.term = self.term
            e.index = last + 1 + k
        self.log.append(ents)
        self._sync_conf()
        # Our own match advances when the entries are durable (advance()).
        return self.log.last_index()

    def _bcast_append(self) -> None:
        for peer in self.prs:
            if peer != self.id:
                self._send_append(peer)

    def _send_append(self, to: int) -> None:
        self._maybe_send_append(to, send_if_empty=True)

    def _maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        pr = self.prs[to]
        if pr.is_paused(self.cfg.max_inflight):
            return False
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None or prev_index < self.log.snap_index:
            return self._send_snapshot(to, pr)
        ents = (self.log.slice(pr.next, self.log.last_index() + 1, self.cfg.max_msg_bytes)
                if pr.next <= self.log.last_index() else [])
        if not ents and not send_if_empty:
            return False
        self._send(Message(MsgType.APP, to=to, index=prev_index, log_term=prev_term,
                           entries=ents, commit=self.log.committed))
        if ents:
            pr.sent_entries(ents[-1].index)
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False                            # don't stream to a dead peer
        meta = SnapshotMeta(self.log.snap_index, self.log.snap_term,
                            self._conf_base[1])
        self._send(Message(MsgType.SNAP, to=to, snapshot=Snapshot(meta)))
        pr.become_snapshot(meta.index)
        return True

    def _bcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            context = self._read_queue[-1] if self._read_queue else b""
        for peer, pr in self.prs.items():
            if peer == self.id:
                continue
            # Never tell a follower to commit past what it is known to have.
            self._send(Message(MsgType.HEARTBEAT, to=peer,
                               commit=min(pr.match, self.log.committed),
                               context=context))

    # ---------------------------------------------------------------- roles

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.leader = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self.lead_transferee = NONE
        self._votes = {}
        self._reads = {}
        self._read_queue = []
        self._pending_reads = []
        self._reset_progress()

    def _reset_progress(self) -> None:
        last = self.log.last_index()
        self.prs = {}
        for v in self.conf.voters:
            self.prs[v] = Progress(last + 1)
        for l in self.conf.learners:
            self.prs[l] = Progress(last + 1, is_learner=True)
        if self.id in self.prs:
            me = self.prs[self.id]
            me.match = self.log.unstable_from - 1
            me.next = self.log.last_index() + 1

    def _become_follower(self, term: int, leader: int) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_pre_candidate(self) -> None:
        # Neither term nor vote changes: a pre-election that fails must leave
        # no trace, or a partitioned node would still inflate terms.
        self._votes = {}
        self.role = Role.PRE_CANDIDATE
        self.leader = NONE

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        # Peers count as active once they answer (the votes we just got
        # don't count: check-quorum wants proof within each timeout).
        if self.id in self.prs:
            self.prs[self.id].recent_active = True
        # No membership change until everything before our term's first
        # entry is applied (Ongaro's single-server change fix).
        self.pending_conf_index = self.log.last_index()
        # An empty entry of our term: commits everything before it (§5.4.2)
        # and unblocks ReadIndex.
        self._append_entries([Entry(0, 0, EntryType.NORMAL, b"")])
        self._bcast_append()

    # ---------------------------------------------------------------- timers

    def _reset_randomized_timeout(self) -> None:
        e = self.cfg.election_ticks
        self._randomized_timeout = e + self._rng.randrange(e)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.election_elapsed >= self._randomized_timeout:
            self.election_elapsed = 0
            self.step(Message(MsgType.HUP, frm=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                self.step(Message(MsgType.CHECK_QUORUM, frm=self.id))
            if self.role == Role.LEADER and self.lead_transferee != NONE:
                self.lead_transferee = NONE         # the transfer timed out
        if self.role != Role.LEADER:
            return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self.step(Message(MsgType.BEAT, frm=self.id))

    # ---------------------------------------------------------------- membership

    def _sync_conf(self) -> None:
        """Bring the membership in line with the log: undo changes an
        append truncated away, then take on changes appended since."""
        cut = self.log.truncated_from
        if cut:
            self.log.truncated_from = 0
            self._conf_history = [(i, c) for i, c in self._conf_history if i < cut]
            self._conf_scanned = min(self._conf_scanned, cut - 1)
        last = self.log.last_index()
        if last > self._conf_scanned:
            for e in self.log.slice(self._conf_scanned + 1, last + 1, 1 << 62):
                if e.type == EntryType.CONF_CHANGE:
                    prev = self._conf_history[-1][1] if self._conf_history else self._conf_base[1]
                    self._conf_history.append((e.index, ConfChange.decode(e.data).apply(prev)))
            self._conf_scanned = last
        conf = self._conf_history[-1][1] if self._conf_history else self._conf_base[1]
        if conf != self.conf:
            self._set_conf(conf)

    def _set_conf(self, conf: ConfState) -> None:
        self.conf = conf
        self._reset_progress_keep()
        if self.role != Role.LEADER:
            return
        if self.id not in conf.voters:
            # A leader removing itself keeps leading until the change
            # commits (counted without its own vote), then steps down
            # (Raft thesis §4.2.2); see _maybe_step_down_removed.
            self._leaving_at = self._conf_history[-1][0] if self._conf_history else 0
        else:
            self._leaving_at = 0
        # The quorum may have changed: entries may be committable now.
        if self._maybe_commit():
            self._bcast_append()

    def _maybe_step_down_removed(self) -> None:
        if (self.role == Role.LEADER and self._leaving_at
                and self.log.committed >= self._leaving_at):
            self._leaving_at = 0
            self._bcast_append()                # tell everyone the commit
            self._become_follower(self.term, NONE)

    def _reset_progress_keep(self) -> None:
        """Update the progress map to the current conf, keeping the state of
        peers that remain."""
        old = self.prs
        last = self.log.last_index()
        self.prs = {}
        for peer in self.conf.voters | self.conf.learners:
            pr = old.get(peer)
            if pr is None:
                pr = Progress(last + 1)
                pr.recent_active = True     # give a new node a chance to catch up
            pr.is_learner = peer in self.conf.learners
            self.prs[peer] = pr
        if self.id in self.prs:
            self.prs[self.id].match = self.log.unstable_from - 1
        if self.lead_transferee not in self.prs:
            self.lead_transferee = NONE

    # ================================================================ Ready

    def _send(self, m: Message) -> None:
        if m.frm == NONE:
            m.frm = self.id
        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE, MsgType.VOTE_RESP,
                      MsgType.PRE_VOTE_RESP):
            if m.term == 0:
                raise LogSafetyError(f"vote message without a term: {m!r}")
        elif m.type in (MsgType.PROP, MsgType.READ_INDEX):
            # Forwarded local requests: the leader treats them as local.
            m.term = 0
        else:
            m.term = self.term
        self._msgs.append(m)

    def has_ready(self) -> bool:
        soft = SoftState(self.leader, self.role)
        return bool(self._msgs or self._read_states or self.log.unstable_entries()
                    or self.log.pending_snapshot is not None
                    or self.log.committed > self.log.applied
                    or self.hard_state() != self._prev_hard or soft != self._prev_soft)

    def ready(self) -> Ready:
        """The next batch of work (see Ready for the order to do it in)."""
        rd = Ready()
        soft = SoftState(self.leader, self.role)
        if soft != self._prev_soft:
            rd.soft_state = soft
        hs = self.hard_state()
        if hs != self._prev_hard:
            rd.hard_state = hs
        rd.snapshot = self.log.pending_snapshot
        rd.entries = self.log.unstable_entries()
        term_or_vote_changed = rd.hard_state is not None and (hs.term, hs.vote) != (
            self._prev_hard.term, self._prev_hard.vote)
        rd.must_sync = bool(rd.entries) or rd.snapshot is not None or term_or_vote_changed
        rd.send_before_persist = (self.role == Role.LEADER and rd.snapshot is None
                                  and not term_or_vote_changed)
        rd.committed_entries = self.log.next_committed(self.cfg.max_apply_bytes)
        rd.messages = self._msgs
        rd.read_states = self._read_states
        self._msgs = []
        self._read_states = []
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver has done everything ``rd`` asked for."""
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            if self.log.pending_snapshot is rd.snapshot:
                self.log.pending_snapshot = None
        if rd.entries:
            last = rd.entries[-1]
            # Entries handed out may have been truncated by a newer append
            # meanwhile (not possible under the Ready contract, but cheap to
            # check): only what is still in our log becomes stable.
            if self.log.match_term(last.index, last.term):
                self.log.stable_to(last.index)
            if self.id in self.prs:
                me = self.prs[self.id]
                if me.maybe_update(self.log.unstable_from - 1) and self.is_leader:
                    if self._maybe_commit():
                        self._bcast_append()
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        elif rd.snapshot is not None:
            pass                                    # restore() already set applied

    def check_invariants(self) -> None:
        """Local invariants (the simulator calls this after every step)."""
        lg = self.log
        if not lg.snap_index <= lg.applied <= lg.committed <= lg.last_index():
            raise LogSafetyError(
                f"node {self.id}: snap {lg.snap_index} applied {lg.applied} "
                f"commit {lg.committed} last {lg.last_index()}")
        prev = lg.snap_term
        for e in lg.entries:
            if e.term < prev:
                raise LogSafetyError(f"node {self.id}: terms decrease at {e!r}")
            if e.term > self.term:
                raise LogSafetyError(f"node {self.id}: entry {e!r} from the "
                                     f"future (term {self.term})")
            prev = e.term
        if self.role == Role.LEADER and self.vote != self.id:
            raise LogSafetyError(f"node {self.id} leads term {self.term} "
                                 f"without having voted for itself")
