"""Deterministic Raft simulator: ``python -m objcache.raft.sim``.

Runs seeded random schedules of 3-7 RaftCore nodes over a simulated network
that loses, duplicates, delays and reorders messages and partitions nodes,
while nodes crash (sometimes tearing the write in progress) and restart from
their durable state, membership changes come and go, leaders are
transferred, and logs are compacted into snapshots that lagging nodes must
install. Clients put and get keys of a replicated key-value store, reading
through ReadIndex.

Checked after every step: election safety (one leader per term, ever), each
node's local invariants, leader completeness (a new leader holds every
entry known committed), state-machine safety (no two nodes apply different
entries at an index); log matching every few steps; and, at the end of each
run, that the cluster recovers once faults stop and that the client history
is linearizable (per key, a Wing-Gong-Lowe search).

Each seed is a pure function of its number: ``--seed-start S --seeds 1``
replays a failure exactly. Output: one JSON line
``{"seeds": N, "failures": K, ...}``; exit status 0 only when K == 0.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import msgpack

from objcache.testing import linearizability as lin

from . import codec
from .core import Config, RaftCore, RestoreState
from .log import LogSafetyError
from .types import (ConfChange, ConfChangeType, ConfState, Entry, EntryType,
                    HardState, Message, MsgType, ProposalDropped, Ready, Role,
                    Snapshot, SnapshotMeta)

INF = float("inf")


class SimFailure(AssertionError):
    pass


# ---------------------------------------------------------------- durable state

class Disk:
    """A node's durable state: records appended in Ready order; a torn crash
    keeps only a prefix of the last Ready's records."""

    def __init__(self, conf: ConfState):
        self.hard = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.bootstrap_conf = conf

    def persist(self, rd: Ready, rng: random.Random | None) -> bool:
        """Apply ``rd``'s records; with ``rng`` given, stop at a random record
        (a torn write). Returns True if everything was written."""
        records: list = []
        if rd.snapshot is not None:
            records.append(("snap", rd.snapshot))
        records.extend(("ent", e) for e in rd.entries)
        if rd.hard_state is not None:
            records.append(("hs", rd.hard_state))
        cut = len(records) if rng is None else rng.randrange(len(records) + 1)
        for kind, rec in records[:cut]:
            if kind == "snap":
                # Entries after the snapshot survive only if the stored entry
                # at its index is the snapshot's (Raft §7); otherwise the
                # whole log goes.
                idx, term = rec.meta.index, rec.meta.term
                keep = self.term_at(idx) == term
                self.snapshot = rec
                self.entries = [e for e in self.entries if e.index > idx] if keep else []
            elif kind == "ent":
                base = self.snapshot.meta.index if self.snapshot else 0
                keep = rec.index - base - 1
                del self.entries[keep:]
                self.entries.append(rec)
            else:
                self.hard = rec
        return cut == len(records)

    def term_at(self, index: int) -> int | None:
        base = self.snapshot.meta if self.snapshot else None
        if index == (base.index if base else 0):
            return base.term if base else 0
        for e in self.entries:
            if e.index == index:
                return e.term
        return None

    def save_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.entries = [e for e in self.entries if e.index > snap.meta.index]

    def restore_state(self) -> RestoreState:
        return RestoreState(
            hard_state=self.hard,
            snapshot=self.snapshot.meta if self.snapshot else None,
            entries=list(self.entries),
            conf=None if self.snapshot else self.bootstrap_conf)


# ---------------------------------------------------------------- nodes

def encode_op(op: tuple) -> bytes:
    return msgpack.packb(op)


def decode_op(data: bytes) -> list:
    return msgpack.unpackb(data)


@dataclass
class Op:
    id: int
    kind: str               # "put" | "get"
    key: str
    value: object           # put: the value written; get: the value read
    invoke: int
    ret: float = INF        # INF: no response (unknown outcome)
    ok: bool | None = None  # True: took effect / answered; False: definitely not


class Node:
    def __init__(self, sim: "Simulation", node_id: int, disk: Disk):
        self.sim = sim
        self.id = node_id
        self.disk = disk
        self.up = True
        self.restart()

    def restart(self) -> None:
        self.up = True
        rs = self.disk.restore_state()
        cfg = Config(id=self.id, election_ticks=10, heartbeat_ticks=1,
                     max_inflight=self.sim.rng.choice([1, 4, 64]),
                     max_msg_bytes=self.sim.rng.choice([64, 4096]),
                     seed=self.sim.rng.randrange(1 << 30))
        self.core = RaftCore(cfg, rs)
        self.kv: dict = {}
        self.applied = 0
        if self.disk.snapshot is not None:
            state = msgpack.unpackb(self.disk.snapshot.data, strict_map_key=False)
            self.kv = dict(state["kv"])
            self.applied = self.disk.snapshot.meta.index
        self.pending_props: dict[int, tuple[int, Op]] = {}   # index -> (term, op)
        self.pending_reads: dict[bytes, Op] = {}
        self.ready_reads: list[tuple[int, Op]] = []

    def crash(self) -> None:
        self.up = False
        for _, op in self.pending_props.values():
            self.sim.unknown(op)
        for op in self.pending_reads.values():
            self.sim.unknown(op)
        for _, op in self.ready_reads:
            self.sim.unknown(op)
        self.pending_props = {}
        self.pending_reads = {}
        self.ready_reads = []

    def process_ready(self, torn: bool = False) -> bool:
        """Run the Ready cycle until there is nothing left. With ``torn``,
        crash in the middle of the first Ready's persist. Returns False if
        the node crashed."""
        while self.up and self.core.has_ready():
            rd = self.core.ready()
            if rd.soft_state is not None and rd.soft_state.role == Role.LEADER:
                self.sim.check_new_leader(self)
            if rd.send_before_persist:
                for m in rd.messages:
                    self.sim.net_send(m)
            if torn:
                self.disk.persist(rd, self.sim.rng)
                self.crash()
                return False
            if rd.must_sync:
                self.disk.persist(rd, None)
            if not rd.send_before_persist:
                for m in rd.messages:
                    self.sim.net_send(m)
            if rd.snapshot is not None:
                state = msgpack.unpackb(rd.snapshot.data, strict_map_key=False)
                self.kv = dict(state["kv"])
                self.applied = rd.snapshot.meta.index
                self.sim.stats["snapshots_installed"] += 1
                # Proposals at or below the snapshot were either committed
                # (they are in it) or overwritten: their outcome is unknown
                # to this node now.
                for idx in [i for i in self.pending_props if i <= self.applied]:
                    self.sim.unknown(self.pending_props.pop(idx)[1])
            for e in rd.committed_entries:
                self.apply(e)
            for rs in rd.read_states:
                op = self.pending_reads.pop(rs.context, None)
                if op is not None:
                    self.ready_reads.append((rs.index, op))
            self.core.advance(rd)
            self.serve_reads()
            self.maybe_compact()
        return self.up

    def apply(self, e: Entry) -> None:
        if e.index != self.applied + 1:
            raise SimFailure(f"node {self.id} applies {e.index} after {self.applied}")
        self.sim.check_applied(self.id, e)
        self.applied = e.index
        op = None
        if e.type == EntryType.NORMAL and e.data:
            cmd = decode_op(e.data)
            if cmd[0] == "put":
                self.kv[cmd[2]] = cmd[3]
        pend = self.pending_props.pop(e.index, None)
        if pend is not None:
            term, op = pend
            if term == e.term:
                self.sim.complete(op, None)
            else:
                self.sim.failed(op)

    def serve_reads(self) -> None:
        keep = []
        for index, op in self.ready_reads:
            if self.applied >= index:
                self.sim.complete(op, self.kv.get(op.key))
            else:
                keep.append((index, op))
        self.ready_reads = keep

    def maybe_compact(self) -> None:
        lg = self.core.log
        if lg.applied - lg.snap_index < self.sim.compact_every:
            return
        index = lg.applied - self.sim.rng.randrange(0, 4)
        if index <= lg.snap_index:
            return
        # Only the state at `applied` is at hand; compact exactly there.
        index = lg.applied
        data = msgpack.packb({"kv": self.kv})
        meta = self.core.compact(index)
        self.disk.save_snapshot(Snapshot(meta, data))
        self.sim.stats["compactions"] += 1


# ---------------------------------------------------------------- simulation

@dataclass
class Simulation:
    seed: int
    n_nodes: int
    steps: int = 3000
    compact_every: int = 25
    rng: random.Random = field(init=False)
    stats: dict = field(default_factory=lambda: {
        "elections": 0, "snapshots_installed": 0, "compactions": 0,
        "crashes": 0, "torn": 0, "conf_changes": 0, "transfers": 0,
        "ops": 0, "ops_ok": 0, "messages": 0, "partitions": 0})

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        ids = list(range(1, self.n_nodes + 1))
        conf = ConfState(frozenset(ids))
        self.nodes = {i: Node(self, i, Disk(conf)) for i in ids}
        self.now = 0
        self._stamp = 0          # unique, increasing op timestamps (no ties)
        self.net: list[tuple[int, int, Message]] = []   # (deliver_at, seq, msg)
        self.seq = 0
        self.partition: list[set[int]] | None = None
        self.loss = self.rng.choice([0.0, 0.02, 0.1])
        self.dup = self.rng.choice([0.0, 0.02, 0.05])
        self.leaders: dict[int, int] = {}          # term -> leader id
        self.applied_log: dict[int, tuple[int, bytes]] = {}   # index -> (term, data)
        self.ops: list[Op] = []
        self.next_op = 0
        self.faults = True
        self.transcript: list[str] = []

    # -- network --------------------------------------------------------

    def net_send(self, m: Message) -> None:
        self.stats["messages"] += 1
        lost = self.faults and self.rng.random() < self.loss
        if lost and m.type != MsgType.SNAP:
            return
        copies = 2 if self.faults and self.rng.random() < self.dup else 1
        if m.type == MsgType.SNAP and m.snapshot.data is None:
            src = self.nodes[m.frm].disk.snapshot
            # The driver attaches the snapshot data the core refers to.
            if src is None or src.meta.index != m.snapshot.meta.index:
                raise SimFailure(f"node {m.frm} sends a snapshot it does not have")
            m.snapshot = Snapshot(m.snapshot.meta, src.data)
        if lost:
            # Snapshots travel on a stream whose failure the driver reports
            # (the contract: every MsgSnap gets a report_snapshot); a lost
            # one is delivered as a failure report.
            m = Message(MsgType.SNAP, to=m.to, frm=m.frm, term=m.term,
                        snapshot=m.snapshot, context=b"lost")
            copies = 1
        # Every message crosses the wire codec, as in a real node: the
        # receiver sees decoded entries (memoryview data), not the sender's
        # objects.
        header, buffers = codec.encode(m)
        m = codec.decode(header, b"".join(bytes(b) for b in buffers))
        for _ in range(copies):
            delay = self.rng.randint(1, 8 if self.faults else 3)
            self.seq += 1
            self.net.append((self.now + delay, self.seq, m))

    def drop_messages_to(self, node_id: int) -> None:
        """A crashed node's inbound messages are gone; a snapshot stream to
        it fails, which the sender's transport reports (as a lost SNAP)."""
        kept = []
        for at, seq, m in self.net:
            if m.to != node_id:
                kept.append((at, seq, m))
            elif m.type == MsgType.SNAP and m.context != b"lost":
                kept.append((at, seq, Message(MsgType.SNAP, to=m.to, frm=m.frm,
                                              term=m.term, snapshot=m.snapshot,
                                              context=b"lost")))
        self.net = kept

    def connected(self, a: int, b: int) -> bool:
        if self.partition is None:
            return True
        return any(a in side and b in side for side in self.partition)

    def deliver(self) -> None:
        due = [x for x in self.net if x[0] <= self.now]
        if not due:
            return
        self.net = [x for x in self.net if x[0] > self.now]
        self.rng.shuffle(due)                        # reordering
        for _, _, m in due:
            node = self.nodes.get(m.to)
            if node is None or not node.up or not self.connected(m.frm, m.to) \
                    or (m.type == MsgType.SNAP and m.context == b"lost"):
                if m.type == MsgType.SNAP and self.nodes[m.frm].up:
                    self.step(self.nodes[m.frm], lambda n, p=m.to: n.core.report_snapshot(p, False))
                continue
            self.step(node, lambda n, m=m: n.core.step(m))
            if m.type == MsgType.SNAP and self.nodes[m.frm].up:
                self.step(self.nodes[m.frm], lambda n, p=m.to: n.core.report_snapshot(p, True))

    def step(self, node: Node, action) -> None:
        if not node.up:
            return
        try:
            action(node)
        except ProposalDropped:
            pass
        node.process_ready()
        node.core.check_invariants()

    # -- checks ---------------------------------------------------------

    def check_new_leader(self, node: Node) -> None:
        term = node.core.term
        prev = self.leaders.get(term)
        if prev is not None and prev != node.id:
            raise SimFailure(f"election safety: nodes {prev} and {node.id} both "
                             f"lead term {term}")
        self.leaders[term] = node.id
        self.stats["elections"] += 1
        # Leader completeness: every entry applied anywhere is in its log.
        lg = node.core.log
        for index, (t, _) in self.applied_log.items():
            if index <= lg.snap_index:
                continue
            if lg.term(index) != t:
                raise SimFailure(f"leader completeness: leader {node.id} of term "
                                 f"{term} lacks committed entry {index} (term {t}); "
                                 f"has term {lg.term(index)}")

    def check_applied(self, node_id: int, e: Entry) -> None:
        known = self.applied_log.get(e.index)
        if known is None:
            self.applied_log[e.index] = (e.term, bytes(e.data))
        elif known != (e.term, bytes(e.data)):
            raise SimFailure(f"state machine safety: node {node_id} applies "
                             f"{e!r} at {e.index}, another node applied term {known[0]}")

    def check_log_matching(self) -> None:
        live = [n for n in self.nodes.values() if n.up]
        for i, a in enumerate(live):
            for b in live[i + 1:]:
                la, lb = a.core.log, b.core.log
                lo = max(la.snap_index, lb.snap_index) + 1
                hi = min(la.last_index(), lb.last_index())
                matched = False
                for idx in range(hi, lo - 1, -1):
                    ta, tb = la.term(idx), lb.term(idx)
                    if matched and ta != tb:
                        raise SimFailure(f"log matching: nodes {a.id},{b.id} agree "
                                         f"at a later index but differ at {idx}")
                    if ta == tb:
                        matched = True
                        ea = la.entries[idx - la.snap_index - 1]
                        eb = lb.entries[idx - lb.snap_index - 1]
                        if bytes(ea.data) != bytes(eb.data):
                            raise SimFailure(f"log matching: same term, different "
                                             f"data at {idx} on {a.id},{b.id}")

    # -- client ops -----------------------------------------------------

    def stamp(self) -> int:
        self._stamp += 1
        return self._stamp

    def complete(self, op: Op, value) -> None:
        if op.ret != INF or op.ok is False:
            return
        op.ret = self.stamp()
        op.ok = True
        if op.kind == "get":
            op.value = value
        self.stats["ops_ok"] += 1

    def failed(self, op: Op) -> None:
        if op.ret == INF and op.ok is None:
            op.ok = False

    def unknown(self, op: Op) -> None:
        pass                                         # stays ret=INF, ok=None

    def client_op(self) -> None:
        node = self.leader() if self.rng.random() < 0.7 else None
        if node is None:
            node = self.rng.choice([n for n in self.nodes.values() if n.up] or [None])
        if node is None:
            return
        key = self.rng.choice("abc")
        self.next_op += 1
        self.stats["ops"] += 1
        if self.rng.random() < 0.5:
            op = Op(self.next_op, "put", key, self.next_op, self.stamp())
            self.ops.append(op)
            try:
                index = node.core.propose(encode_op(("put", op.id, key, op.value)))
            except ProposalDropped:
                op.ok = False
                return
            node.pending_props[index] = (node.core.term, op)
        else:
            op = Op(self.next_op, "get", key, None, self.stamp())
            self.ops.append(op)
            ctx = f"r{op.id}".encode()
            node.pending_reads[ctx] = op
            node.core.read_index(ctx)
        node.process_ready()

    # -- faults ---------------------------------------------------------

    def random_event(self) -> None:
        r = self.rng.random()
        live = [n for n in self.nodes.values() if n.up]
        down = [n for n in self.nodes.values() if not n.up]
        if r < 0.25:
            self.client_op()
        elif r < 0.253 and live and len(down) < (self.n_nodes - 1) // 2 + 1:
            n = self.rng.choice(live)
            self.stats["crashes"] += 1
            if self.rng.random() < 0.5:
                # Crash while persisting: give the node work (a tick, or a
                # proposal if it leads), then tear that Ready's write.
                try:
                    if n.core.is_leader:
                        n.core.propose(encode_op(("noop",)))
                    else:
                        n.core.tick()
                except ProposalDropped:
                    pass
                if n.core.has_ready():
                    self.stats["torn"] += 1
                    n.process_ready(torn=True)
                else:
                    n.crash()
            else:
                n.crash()
            self.drop_messages_to(n.id)
        elif r < 0.262 and down:
            n = self.rng.choice(down)
            n.restart()
            n.process_ready()
        elif r < 0.265:
            ids = list(self.nodes)
            self.rng.shuffle(ids)
            cut = self.rng.randint(1, len(ids) - 1)
            self.partition = [set(ids[:cut]), set(ids[cut:])]
            self.stats["partitions"] += 1
        elif r < 0.272:
            self.partition = None
        elif r < 0.275:
            self.conf_change()
        elif r < 0.277:
            leader = self.leader()
            if leader is not None:
                target = self.rng.choice(list(self.nodes))
                self.stats["transfers"] += 1
                self.step(leader, lambda n: n.core.transfer_leader(target))

    def leader(self) -> Node | None:
        best = None
        for n in self.nodes.values():
            if n.up and n.core.is_leader and (best is None or n.core.term > best.core.term):
                best = n
        return best

    def conf_change(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        conf = leader.core.conf
        outside = [i for i in self.nodes if i not in conf.voters and i not in conf.learners]
        choices = []
        if len(conf.voters) > 3:
            choices += [ConfChange(ConfChangeType.REMOVE, v) for v in conf.voters]
            choices += [ConfChange(ConfChangeType.ADD_LEARNER, v) for v in conf.voters]
        choices += [ConfChange(ConfChangeType.ADD_LEARNER, i) for i in outside]
        choices += [ConfChange(ConfChangeType.ADD_VOTER, l) for l in conf.learners]
        if not choices:
            return
        cc = self.rng.choice(choices)
        try:
            leader.core.propose_conf_change(cc)
            self.stats["conf_changes"] += 1
        except ProposalDropped:
            return
        leader.process_ready()

    # -- main loop ------------------------------------------------------

    def tick_all(self) -> None:
        for n in self.nodes.values():
            if n.up and self.rng.random() < 0.9:    # clock jitter
                self.step(n, lambda n: n.core.tick())

    def run(self) -> None:
        for i in range(self.steps):
            self.now += 1
            if self.now % 5 == 0:
                self.tick_all()
            self.deliver()
            self.random_event()
            if i % 25 == 0:
                self.check_log_matching()
        self.settle()
        self.check_log_matching()
        check_linearizable(self.ops)

    def settle(self) -> None:
        """Stop faults, heal, restart everyone: the cluster must recover a
        leader, commit a final write, and answer every pending operation."""
        self.faults = False
        self.partition = None
        for n in self.nodes.values():
            if not n.up:
                n.restart()
                n.process_ready()
        final = None
        deadline = self.now + 4000
        while self.now < deadline:
            self.now += 1
            if self.now % 5 == 0:
                self.tick_all()
            self.deliver()
            leader = self.leader()
            if final is None and leader is not None and \
                    leader.core.log.committed >= leader.core.log.last_index():
                self.next_op += 1
                final = Op(self.next_op, "put", "a", self.next_op, self.stamp())
                self.ops.append(final)
                try:
                    idx = leader.core.propose(encode_op(("put", final.id, "a", final.value)))
                    leader.pending_props[idx] = (leader.core.term, final)
                    leader.process_ready()
                except ProposalDropped:
                    final = None
            if final is not None and final.ok:
                applied = {n.applied for n in self.nodes.values()
                           if n.id in (leader.core.conf.voters if leader else ())}
                if leader is not None and len(applied) == 1:
                    return
            if final is not None and final.ok is False:
                final = None
        raise SimFailure(f"liveness: no stable leader committing writes "
                         f"{4000} steps after faults stopped "
                         f"(leader={self.leader() and self.leader().id})")


# ---------------------------------------------------------------- linearizability

def check_linearizable(ops: list[Op]) -> None:
    history = [lin.Op(o.kind, o.key, o.value, o.invoke, o.ret) for o in ops
               if o.ok is not False]
    bad = lin.check(history)
    if bad:
        key = bad[0]
        raise SimFailure(f"linearizability violated for key {key!r}: "
                         + "; ".join(f"{o.kind}({o.value}) [{o.invoke},{o.ret}]"
                                     for o in sorted(history, key=lambda o: o.invoke)
                                     if o.key == key))


# ---------------------------------------------------------------- CLI

def run_seed(seed: int, nodes: int | None, steps: int) -> tuple[bool, dict, str]:
    rng = random.Random(seed * 7919 + 1)
    n = nodes or rng.randint(3, 7)
    sim = Simulation(seed=seed, n_nodes=n, steps=steps)
    try:
        sim.run()
        return True, sim.stats, ""
    except (SimFailure, LogSafetyError, Exception) as exc:  # noqa: BLE001 - report every failure
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return False, sim.stats, f"seed {seed} ({n} nodes): {detail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m objcache.raft.sim",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes per run (default: 3-7, chosen per seed)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each failure's traceback")
    args = p.parse_args(argv)
    if args.nodes is not None and not 3 <= args.nodes <= 7:
        p.error("--nodes must be between 3 and 7")
    totals: dict[str, int] = {}
    failures: list[str] = []
    start = time.monotonic()
    for seed in range(args.seed_start, args.seed_start + args.seeds):
        ok, stats, why = run_seed(seed, args.nodes, args.steps)
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        if not ok:
            failures.append(why)
            if args.verbose:
                print(why, file=sys.stderr)
    summary = {"seeds": args.seeds, "failures": len(failures),
               "seed_start": args.seed_start, "steps": args.steps,
               "seconds": round(time.monotonic() - start, 1), **totals,
               "failed": failures[:20]}
    print(json.dumps(summary))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
