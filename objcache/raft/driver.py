"""The asyncio glue around one Raft replica: timers, storage, transport and
the state machine. See docs/raft.md for the rules this file follows.

One ``RaftGroup`` per (group, node). All calls into the core happen on the
event loop, inside ``_run``'s single task, between Ready cycles: inputs
(ticks, messages, proposals, reads, membership changes, transfers, snapshot
reports) are queued and drained at the top of each cycle, never while a
Ready is being persisted. That is the core's contract ("no step between
ready() and advance()") and it is also what batches work: everything that
arrives during one fdatasync goes into the next Ready (group commit).

Ordering inside a cycle (the Ready contract, core.py / types.Ready):
  1. storage.save(hard state, entries, snapshot)   -- durable
  2. transport.send(messages)                      -- only now
  3. state machine: restore snapshot, apply committed entries
  4. core.advance(rd)
Safe awaits: storage.save() in step 1, and an asynchronous
``StateMachine.apply`` in step 3 (a state machine with I/O side effects,
e.g. writing chunk data into the cache). Inputs arriving during either
only queue; the core is not touched until the cycle ends.

A storage failure (fsync error, ENOSPC on the log) is fatal for the replica:
after a failed fsync the page cache state is unknown, so the group stops,
fails every waiter with the error, and the node must restart from disk.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from .core import Config, RaftCore
from .types import (ConfChange, ConfState, Entry, EntryType, Message, MsgType,
                    NotLeader, ProposalDropped, Ready, Role, Snapshot,
                    SnapshotMeta)

log = logging.getLogger(__name__)


class StateMachine(Protocol):
    """What a Raft group replicates. Every method runs on the event loop and
    must be deterministic: replicas apply the same entries in the same order
    and must reach the same state."""

    def apply(self, entry: Entry) -> Any:
        """Apply one committed NORMAL entry (empty data: a leader's no-op,
        skip it). The return value (or, if it returns an awaitable, what
        that resolves to) is handed to the proposer."""

    def snapshot(self) -> bytes:
        """The whole state as of the last applied entry."""

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's."""

    # Optional:
    # async def prepare_restore(self, data: bytes, sender: int) -> None:
    #     """Before a snapshot received from ``sender`` reaches the core:
    #     make durable what restoring it needs besides its bytes (the
    #     engine fetches dirty chunks the snapshot names). Raising refuses
    #     the snapshot (the sender retries later)."""


class Transport(Protocol):
    def send(self, group: int, messages: list[Message]) -> None:
        """Queue messages for delivery; never blocks, may drop (Raft
        retransmits)."""

    async def send_snapshot(self, group: int, message: Message) -> bool:
        """Deliver a SNAP message (snapshot data attached); True on success."""


class ProposalOutcomeUnknown(ProposalDropped):
    """The replica lost track of the proposal (its log was replaced by a
    snapshot, or the group stopped): it may or may not have committed."""


class GroupFailed(RuntimeError):
    """The replica stopped after a storage error; restart the node."""


@dataclass
class GroupOptions:
    tick_seconds: float = 0.05          # election timeout = ticks x this
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_inflight: int = 256
    max_msg_bytes: int = 1 << 20
    # Compaction: snapshot the state machine and drop the log before it when
    # the applied entries still in the log number ``snapshot_entries``, or
    # their payloads add up to ``snapshot_bytes`` (chunk writes carry up to
    # a chunk each: counting entries alone let the log, and the memory that
    # holds it, grow to GiBs). A leader keeps the entries a lagging member
    # still needs, up to another ``snapshot_entries``/``snapshot_bytes`` of
    # them; a member further behind gets the snapshot instead. So the
    # in-memory log holds at most about 2 x snapshot_bytes of applied
    # payload, plus what is not applied yet.
    snapshot_entries: int = 10_000
    snapshot_bytes: int = 32 << 20
    pre_vote: bool = True
    check_quorum: bool = True


class _Waiter:
    __slots__ = ("term", "future")

    def __init__(self, term: int, future: asyncio.Future):
        self.term = term
        self.future = future


class RaftGroup:
    def __init__(self, group_id: int, node_id: int, storage, state_machine: StateMachine,
                 transport: Transport, options: GroupOptions | None = None,
                 bootstrap: ConfState | None = None):
        self.group_id = group_id
        self.node_id = node_id
        self.storage = storage
        self.sm = state_machine
        self.transport = transport
        self.opts = options or GroupOptions()
        self.bootstrap = bootstrap
        self.core: RaftCore | None = None
        self.failed: BaseException | None = None

        self._inputs: deque[tuple] = deque()
        self._wake = asyncio.Event()
        self._ticks = 0
        self._task: asyncio.Task | None = None
        self._ticker: asyncio.Task | None = None
        self._snapshot_sends: set[asyncio.Task] = set()
        self._waiting: dict[int, _Waiter] = {}          # log index -> proposer
        self._reads: dict[bytes, asyncio.Future] = {}   # read context -> waiter
        self._ready_reads: list[tuple[int, asyncio.Future]] = []
        self._read_asked: dict[bytes, int] = {}         # read context -> tick asked
        self._tick_count = 0
        self._leader_watchers: list[tuple[int | None, asyncio.Future]] = []
        self._read_ids = itertools.count(1)
        self._read_prefix = f"{node_id}:{os.getpid()}:{id(self):x}:".encode()
        self._stopping = False
        self.applied = 0
        self.leader = 0
        self.role = Role.FOLLOWER
        # Payload bytes of the applied entries still in the core's log, and
        # the applied index and byte figure at which compaction is tried
        # next (pushed further when a lagging member held it back).
        self.log_bytes = 0
        self._compact_at_bytes = self.opts.snapshot_bytes
        self._compact_at_index = self.opts.snapshot_entries

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        restore = self.storage.restore_state(self.bootstrap)
        cfg = Config(id=self.node_id, election_ticks=self.opts.election_ticks,
                     heartbeat_ticks=self.opts.heartbeat_ticks,
                     max_inflight=self.opts.max_inflight,
                     max_msg_bytes=self.opts.max_msg_bytes,
                     pre_vote=self.opts.pre_vote, check_quorum=self.opts.check_quorum,
                     seed=int.from_bytes(os.urandom(4), "little"))
        self.core = RaftCore(cfg, restore)
        snap = self.storage.snapshot()
        if snap is not None:
            self.sm.restore(snap.data)
            self.applied = snap.meta.index
        self._compact_at_index = self.core.log.snap_index + self.opts.snapshot_entries
        self._task = asyncio.create_task(self._run(), name=f"raft-{self.group_id}-{self.node_id}")
        self._ticker = asyncio.create_task(self._tick_loop(), name=f"raft-tick-{self.group_id}")
        if len(self.core.conf.voters) == 1 and self.node_id in self.core.conf.voters:
            self._inputs.append(("campaign",))           # a single voter needn't wait
            self._wake.set()

    async def stop(self) -> None:
        """Stop timers and the loop (after the Ready in progress is done);
        fail every waiter. Does not close the storage (its owner does)."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        for t in (self._ticker, self._task, *self._snapshot_sends):
            if t is not None and t is not self._task:
                t.cancel()
        if self._task is not None:
            try:
                await self._task
            except BaseException:  # noqa: BLE001 - a crashed loop already failed its waiters
                pass
        self._fail_all(ProposalOutcomeUnknown("the Raft group stopped"))

    # ------------------------------------------------------------ client API

    @property
    def is_leader(self) -> bool:
        return self.role == Role.LEADER

    def status(self) -> dict:
        st = self.core.status() if self.core else {}
        st.update(group=self.group_id, applied=self.applied,
                  failed=repr(self.failed) if self.failed else None)
        return st

    def peer_match(self, peer: int) -> int | None:
        """Leader: the highest log index known replicated on ``peer``
        (None when not leader or ``peer`` is not tracked)."""
        if self.core is None or not self.core.is_leader:
            return None
        pr = self.core.prs.get(peer)
        return pr.match if pr is not None else None

    def _check_alive(self) -> None:
        if self.failed is not None:
            raise GroupFailed(f"raft group {self.group_id} stopped: {self.failed!r}")
        if self._stopping:
            raise ProposalDropped("the Raft group is stopping")

    def _submit(self, item: tuple) -> None:
        self._check_alive()
        self._inputs.append(item)
        self._wake.set()

    async def propose(self, data: bytes, timeout: float | None = None) -> Any:
        """Replicate ``data``; returns the state machine's result of applying
        it. Raises NotLeader (with a hint) on followers, ProposalDropped if
        the entry was overwritten by a new leader, ProposalOutcomeUnknown if
        this replica lost track, asyncio.TimeoutError after ``timeout``."""
        fut = asyncio.get_running_loop().create_future()
        self._submit(("propose", bytes(data), fut))
        return await asyncio.wait_for(fut, timeout)

    async def propose_conf_change(self, cc: ConfChange, timeout: float | None = None) -> ConfState:
        fut = asyncio.get_running_loop().create_future()
        self._submit(("conf", cc, fut))
        await asyncio.wait_for(fut, timeout)
        return self.core.conf

    async def read_barrier(self, timeout: float | None = None) -> int:
        """Linearizable read point: returns once this replica has applied
        everything committed before the call (ReadIndex). Works on followers
        (forwarded to the leader)."""
        fut = asyncio.get_running_loop().create_future()
        ctx = self._read_prefix + str(next(self._read_ids)).encode()
        self._reads[ctx] = fut
        try:
            self._submit(("read", ctx))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._reads.pop(ctx, None)
            self._read_asked.pop(ctx, None)

    async def transfer_leadership(self, to: int, timeout: float | None = None) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._leader_watchers.append((to, fut))
        self._submit(("transfer", to))
        await asyncio.wait_for(fut, timeout)

    async def wait_leader(self, timeout: float | None = None) -> int:
        """Wait until some leader is known; returns its id."""
        if self.leader:
            return self.leader
        fut = asyncio.get_running_loop().create_future()
        self._leader_watchers.append((None, fut))
        return await asyncio.wait_for(fut, timeout)

    def campaign(self) -> None:
        self._submit(("campaign",))

    # ------------------------------------------------------------ transport side

    def report_unreachable(self, peer: int) -> None:
        """The transport could not reach ``peer``: stop pipelining to it."""
        if self._stopping or self.failed is not None:
            return
        self._inputs.append(("unreachable", peer))
        self._wake.set()

    async def accept_snapshot(self, msg: Message) -> None:
        """A SNAP message from the transport. The state machine's
        ``prepare_restore`` (if it has one) runs first, so that everything
        the snapshot needs is durable here before the core can act on it
        (persist it, acknowledge it); an exception refuses the snapshot:
        the transport answers the sender with an error, and the sender's
        core retries later."""
        prepare = getattr(self.sm, "prepare_restore", None)
        if prepare is not None and msg.snapshot is not None:
            await prepare(msg.snapshot.data, msg.frm)
        self.deliver(msg)

    def deliver(self, msg: Message) -> None:
        """A message from a peer (called by the transport)."""
        if self._stopping or self.failed is not None:
            return
        self._inputs.append(("msg", msg))
        self._wake.set()

    # ------------------------------------------------------------ the loop

    async def _tick_loop(self) -> None:
        interval = self.opts.tick_seconds
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            # Count missed ticks too (a stalled loop must not stretch timeouts
            # forever), but cap them so a long stall doesn't fire a burst.
            now = loop.time()
            missed = min(int((now - next_at) / interval) + 1, self.opts.election_ticks)
            next_at = max(next_at + interval, now)
            self._ticks += missed
            self._wake.set()

    async def _run(self) -> None:
        try:
            while not self._stopping:
                await self._wake.wait()
                self._wake.clear()
                self._drain_inputs()
                while self.core.has_ready() and not self._stopping:
                    await self._handle_ready(self.core.ready())
                    self._drain_inputs()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - storage failures are fatal to the replica
            self.failed = exc
            log.critical("raft group %d on node %d stopped: %r", self.group_id,
                         self.node_id, exc)
            self._fail_all(GroupFailed(f"raft group {self.group_id} stopped: {exc!r}"))

    def _drain_inputs(self) -> None:
        core = self.core
        ticks, self._ticks = self._ticks, 0
        for _ in range(ticks):
            core.tick()
        self._tick_count += ticks
        if ticks and self._read_asked:
            # A read request is forwarded once; if no leader was known, or
            # the request or its answer was lost, ask again after an
            # election timeout (the leader ignores duplicate contexts).
            stale = self._tick_count - self.opts.election_ticks
            for ctx, asked in list(self._read_asked.items()):
                if ctx not in self._reads:
                    del self._read_asked[ctx]
                elif asked <= stale:
                    self._inputs.append(("read", ctx))
        while self._inputs:
            item = self._inputs.popleft()
            kind = item[0]
            if kind == "msg":
                try:
                    core.step(item[1])
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    # A message the codec let through but the core can't
                    # use: drop it, keep the replica. (LogSafetyError, a
                    # violated invariant, is an AssertionError and fatal.)
                    log.error("group %d: dropped %r: %r", self.group_id, item[1], exc)
            elif kind == "propose":
                # Every proposal queued right now goes in as one batch: one
                # append message per follower for all of them.
                batch = [item] if not item[2].done() else []
                while self._inputs and self._inputs[0][0] == "propose":
                    nxt = self._inputs.popleft()
                    if not nxt[2].done():       # the caller gave up already
                        batch.append(nxt)
                if not batch:
                    continue
                try:
                    first = core.propose_many([data for _, data, _ in batch])
                except ProposalDropped as exc:
                    for _, _, fut in batch:
                        fut.set_exception(exc)
                    continue
                for k, (_, _, fut) in enumerate(batch):
                    self._waiting[first + k] = _Waiter(core.term, fut)
            elif kind == "conf":
                _, cc, fut = item
                try:
                    index = core.propose_conf_change(cc)
                except (ProposalDropped, ValueError) as exc:
                    fut.set_exception(exc)
                    continue
                self._waiting[index] = _Waiter(core.term, fut)
            elif kind == "read":
                if item[1] in self._reads:
                    self._read_asked[item[1]] = self._tick_count
                    core.read_index(item[1])
            elif kind == "transfer":
                core.transfer_leader(item[1])
            elif kind == "unreachable":
                core.report_unreachable(item[1])
            elif kind == "snap_status":
                core.report_snapshot(item[1], item[2])
            elif kind == "campaign":
                core.campaign()

    async def _handle_ready(self, rd: Ready) -> None:
        # 1. Persist (the only await of the cycle) and 2. send: in this
        # order, except that a leader may send first (Ready.send_before_persist)
        # so followers write while it writes.
        if rd.send_before_persist:
            self._send(rd)
        if rd.must_sync:
            await self.storage.save(rd.hard_state, rd.entries, rd.snapshot)
        if not rd.send_before_persist:
            self._send(rd)
        # 3. Apply.
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state.leader, rd.soft_state.role)
        if rd.snapshot is not None:
            self.sm.restore(rd.snapshot.data)
            self.applied = rd.snapshot.meta.index
            self.log_bytes = 0
            self._compact_at_bytes = self.opts.snapshot_bytes
            self._compact_at_index = self.applied + self.opts.snapshot_entries
            for index in [i for i in self._waiting if i <= self.applied]:
                w = self._waiting.pop(index)
                if not w.future.done():
                    w.future.set_exception(ProposalOutcomeUnknown(
                        "this replica's log was replaced by a snapshot"))
        for e in rd.committed_entries:
            result = None
            if e.type == EntryType.NORMAL and len(e.data):
                result = self.sm.apply(e)
                if inspect.isawaitable(result):
                    # A state machine with side effects (writing a chunk to
                    # the cache) may apply asynchronously. Still inside the
                    # cycle: nothing else reaches the core meanwhile, and
                    # entries apply strictly in order.
                    result = await result
            self.applied = e.index
            self.log_bytes += len(e.data)
            w = self._waiting.pop(e.index, None)
            if w is not None and not w.future.done():
                if w.term == e.term:
                    w.future.set_result(result)
                else:
                    w.future.set_exception(ProposalDropped(
                        f"entry {e.index} was overwritten by a leader of term {e.term}"))
        for rs in rd.read_states:
            fut = self._reads.get(rs.context)
            self._read_asked.pop(rs.context, None)
            if fut is not None and not fut.done():
                self._ready_reads.append((rs.index, fut))
        # 4. Advance.
        self.core.advance(rd)
        if self._ready_reads:
            keep = []
            for index, fut in self._ready_reads:
                if fut.done():
                    continue
                if self.applied >= index:
                    fut.set_result(index)
                else:
                    keep.append((index, fut))
            self._ready_reads = keep
        if self.applied >= self._compact_at_index or self.log_bytes >= self._compact_at_bytes:
            await self._compact()

    def _send(self, rd: Ready) -> None:
        plain = [m for m in rd.messages if m.type != MsgType.SNAP]
        if plain:
            self.transport.send(self.group_id, plain)
        for m in rd.messages:
            if m.type == MsgType.SNAP:
                self._start_snapshot_send(m)

    def _compaction_point(self) -> tuple[int, int]:
        """(index to compact to, payload bytes of the applied entries that
        stay). ``applied``, except that a leader keeps the entries after a
        lagging member's match index while they are at most
        ``snapshot_entries`` entries of at most ``snapshot_bytes`` (so a
        member a little behind catches up from the log, not with a
        snapshot)."""
        log_ = self.core.log
        index = self.applied
        if self.core.is_leader:
            behind = [pr.match for peer, pr in self.core.prs.items()
                      if peer != self.node_id and pr.match < index]
            if behind:
                floor = max(min(behind), log_.snap_index)
                if index - floor <= self.opts.snapshot_entries:
                    kept = sum(len(log_.entries[i - log_.snap_index - 1].data)
                               for i in range(floor + 1, index + 1))
                    if kept <= self.opts.snapshot_bytes:
                        return floor, kept
        return index, 0

    async def _compact(self) -> None:
        """Snapshot the state machine at the compaction point and forget
        the log before it. The snapshot is durable before the core drops
        anything."""
        index, kept = self._compaction_point()
        if index <= self.core.log.snap_index:
            # A member is just behind: try again once another quarter of
            # the budget has been applied (it has caught up by then, or the
            # entries it needs exceed the budget and it gets a snapshot).
            self._compact_at_bytes = self.log_bytes + max(1, self.opts.snapshot_bytes // 4)
            self._compact_at_index = self.applied + max(1, self.opts.snapshot_entries // 4)
            return
        data = self.sm.snapshot()
        meta = SnapshotMeta(index, self.core.log.term(index), self.core.conf_at(index))
        await self.storage.save_snapshot(Snapshot(meta, data))
        self.core.compact(index)
        self.log_bytes = kept
        self._compact_at_bytes = kept + self.opts.snapshot_bytes
        self._compact_at_index = index + self.opts.snapshot_entries

    def _start_snapshot_send(self, m: Message) -> None:
        snap = self.storage.snapshot()
        if snap is None or snap.meta.index != m.snapshot.meta.index:
            # The core asks for the snapshot it knows; storage must have it.
            log.error("group %d: no stored snapshot at %d to send to %d",
                      self.group_id, m.snapshot.meta.index, m.to)
            self._inputs.append(("snap_status", m.to, False))
            self._wake.set()
            return
        m.snapshot = snap

        async def send():
            ok = False
            try:
                ok = await self.transport.send_snapshot(self.group_id, m)
            except Exception as exc:  # noqa: BLE001 - any failure is reported to the core
                log.warning("group %d: snapshot to node %d failed: %r",
                            self.group_id, m.to, exc)
            if not self._stopping:
                self._inputs.append(("snap_status", m.to, ok))
                self._wake.set()

        task = asyncio.create_task(send())
        self._snapshot_sends.add(task)
        task.add_done_callback(self._snapshot_sends.discard)

    def _on_soft_state(self, leader: int, role: Role) -> None:
        was_leader = self.role == Role.LEADER
        self.leader, self.role = leader, role
        if was_leader and role != Role.LEADER:
            # Pending reads were confirmed by nobody; they must retry.
            for ctx, fut in list(self._reads.items()):
                if not fut.done():
                    fut.set_exception(NotLeader(leader))
        keep = []
        for want, fut in self._leader_watchers:
            if fut.done():
                continue
            if leader and (want is None or want == leader):
                fut.set_result(leader)
            else:
                keep.append((want, fut))
        self._leader_watchers = keep

    def _fail_all(self, exc: BaseException) -> None:
        for w in self._waiting.values():
            if not w.future.done():
                w.future.set_exception(exc)
        self._waiting.clear()
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(exc)
        for _, fut in self._ready_reads:
            if not fut.done():
                fut.set_exception(exc)
        for _, fut in self._leader_watchers:
            if not fut.done():
                fut.set_exception(exc)
        self._leader_watchers = []
