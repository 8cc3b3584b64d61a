"""A tiny deterministic cluster of RaftCore nodes for unit tests: messages
are delivered synchronously in FIFO order, with optional drops and cuts;
each node persists to an in-memory Disk (objcache.raft.sim) and applies to a
list."""
from __future__ import annotations

from objcache.raft.core import Config, RaftCore
from objcache.raft.sim import Disk
from objcache.raft.types import ConfState, EntryType, Message, MsgType, Snapshot


class Cluster:
    def __init__(self, n: int = 3, *, voters=None, pre_vote=True, check_quorum=True,
                 election_ticks=10, max_inflight=256, max_msg_bytes=1 << 20):
        ids = list(range(1, n + 1))
        conf = ConfState(frozenset(voters or ids))
        self.cfg = dict(pre_vote=pre_vote, check_quorum=check_quorum,
                        election_ticks=election_ticks, max_inflight=max_inflight,
                        max_msg_bytes=max_msg_bytes)
        self.disks = {i: Disk(conf) for i in ids}
        self.nodes: dict[int, RaftCore] = {}
        self.applied: dict[int, list] = {i: [] for i in ids}
        self.reads: dict[int, list] = {i: [] for i in ids}
        self.snapdata: dict[int, bytes] = {}
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()      # (from, to) links that drop
        self.down: set[int] = set()
        self.drop_types: set[MsgType] = set()
        self.drop_if = None                          # predicate(Message) -> bool
        self.sent: list[Message] = []
        for i in ids:
            self.start(i)

    def start(self, i: int) -> RaftCore:
        self.down.discard(i)
        node = RaftCore(Config(id=i, seed=i, **self.cfg), self.disks[i].restore_state())
        self.nodes[i] = node
        snap = self.disks[i].snapshot
        self.applied[i] = [] if snap is None else list(self.snapdata.get(i, []))
        return node

    def crash(self, i: int) -> None:
        self.down.add(i)
        self.queue = [m for m in self.queue if m.to != i]

    # -- message plumbing ---------------------------------------------------

    def ready(self, i: int) -> None:
        node = self.nodes[i]
        while node.has_ready():
            rd = node.ready()
            if rd.must_sync:
                self.disks[i].persist(rd, None)
            self.queue.extend(rd.messages)
            if rd.snapshot is not None:
                self.applied[i] = list(_decode(rd.snapshot.data))
            for e in rd.committed_entries:
                if e.type == EntryType.NORMAL and e.data:
                    self.applied[i].append(bytes(e.data))
            self.reads[i].extend(rd.read_states)
            node.advance(rd)

    def settle(self, max_rounds: int = 10000) -> None:
        """Run Ready cycles and deliver messages until the network is quiet."""
        for i in self.nodes:
            if i not in self.down:
                self.ready(i)
        rounds = 0
        while self.queue:
            rounds += 1
            assert rounds < max_rounds, "message storm"
            m = self.queue.pop(0)
            self.sent.append(m)
            if m.to in self.down or (m.frm, m.to) in self.cut or m.type in self.drop_types \
                    or (self.drop_if is not None and self.drop_if(m)):
                if m.type == MsgType.SNAP and m.frm not in self.down:
                    self.nodes[m.frm].report_snapshot(m.to, False)
                    self.ready(m.frm)
                continue
            if m.type == MsgType.SNAP and m.snapshot.data is None:
                m.snapshot = Snapshot(m.snapshot.meta, self.disks[m.frm].snapshot.data)
            self.nodes[m.to].step(m)
            self.ready(m.to)
            if m.type == MsgType.SNAP:
                self.nodes[m.frm].report_snapshot(m.to, True)
                self.ready(m.frm)

    def tick(self, i: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[i].tick()
        self.settle()

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for i, node in self.nodes.items():
                if i not in self.down:
                    node.tick()
            self.settle()

    def campaign(self, i: int) -> None:
        self.nodes[i].campaign()
        self.settle()

    def propose(self, i: int, data: bytes) -> int:
        idx = self.nodes[i].propose(data)
        self.settle()
        return idx

    def isolate(self, i: int) -> None:
        for j in self.nodes:
            if j != i:
                self.cut.add((i, j))
                self.cut.add((j, i))

    def heal(self) -> None:
        self.cut.clear()

    def leader(self) -> int | None:
        leaders = [i for i, n in self.nodes.items() if n.is_leader and i not in self.down]
        return max(leaders, key=lambda i: self.nodes[i].term) if leaders else None

    def compact(self, i: int) -> None:
        node = self.nodes[i]
        index = node.log.applied
        meta = node.compact(index)
        data = _encode(self.applied[i])
        self.snapdata[i] = self.applied[i]
        self.disks[i].save_snapshot(Snapshot(meta, data))


def _encode(items) -> bytes:
    import msgpack
    return msgpack.packb(list(items))


def _decode(data: bytes):
    import msgpack
    return [bytes(x) for x in msgpack.unpackb(data)]
