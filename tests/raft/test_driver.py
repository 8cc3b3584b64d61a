"""RaftGroup (the asyncio driver) over in-memory storage and transport:
proposals resolve with the state machine's result, reads are linearizable
barriers, leadership moves, snapshots ship, failures surface."""
import asyncio

import msgpack
import pytest

from objcache.raft.driver import GroupFailed, GroupOptions, RaftGroup
from objcache.raft.memory import LocalNetwork, MemoryStorage
from objcache.raft.types import ConfChange, ConfChangeType, ConfState, NotLeader

FAST = GroupOptions(tick_seconds=0.01, election_ticks=10, snapshot_entries=50)


class KV:
    def __init__(self):
        self.data = {}

    def apply(self, entry):
        k, v = msgpack.unpackb(entry.data)
        self.data[k] = v
        return len(self.data)

    def snapshot(self):
        return msgpack.packb(self.data)

    def restore(self, data):
        self.data = msgpack.unpackb(data)


async def cluster(n, opts=FAST, voters=None):
    net = LocalNetwork()
    conf = ConfState(frozenset(voters or range(1, n + 1)))
    groups = []
    for i in range(1, n + 1):
        g = RaftGroup(1, i, MemoryStorage(), KV(), net.transport(i), opts, bootstrap=conf)
        net.register(g)
        groups.append(g)
    for g in groups:
        await g.start()
    return net, groups


async def leader_of(groups, timeout=5.0):
    async def wait():
        while True:
            leaders = [g for g in groups if g.is_leader and not g._stopping]
            if leaders:
                return leaders[0]
            await asyncio.sleep(0.005)
    return await asyncio.wait_for(wait(), timeout)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_single_node_proposals():
    async def main():
        net, (g,) = await cluster(1)
        await g.wait_leader(2)
        results = await asyncio.gather(*(g.propose(msgpack.packb([f"k{i}", i]))
                                         for i in range(100)))
        assert sorted(results) == list(range(1, 101))
        assert g.storage.saves < 100                   # group commit
        await g.stop()
    run(main())


def test_three_nodes_replicate_and_followers_redirect():
    async def main():
        net, groups = await cluster(3)
        leader = await leader_of(groups)
        await asyncio.gather(*(leader.propose(msgpack.packb([f"k{i}", i])) for i in range(50)))
        follower = next(g for g in groups if g is not leader)
        with pytest.raises(NotLeader) as exc:
            await follower.propose(msgpack.packb(["x", 1]))
        assert exc.value.leader == leader.node_id
        await follower.read_barrier(2)                  # follower catches up to commit
        assert follower.sm.data == leader.sm.data
        for g in groups:
            await g.stop()
    run(main())


def test_leader_failover_and_snapshot_catch_up():
    async def main():
        net, groups = await cluster(3)
        leader = await leader_of(groups)
        await leader.propose(msgpack.packb(["a", 1]))
        old = leader
        await old.stop()
        net.unregister(old)
        rest = [g for g in groups if g is not old]
        new = await leader_of(rest)
        for i in range(120):                            # past snapshot_entries
            await new.propose(msgpack.packb([f"k{i}", i]))
        assert new.core.log.snap_index > 0
        # The old node restarts from its storage and is far behind the
        # compaction point: it must install a snapshot.
        back = RaftGroup(1, old.node_id, old.storage, KV(), net.transport(old.node_id), FAST)
        net.register(back)
        await back.start()
        await back.read_barrier(5)
        assert back.sm.data == new.sm.data
        for g in rest + [back]:
            await g.stop()
    run(main())


def test_the_log_compacts_by_bytes_and_keeps_a_lagging_members_tail():
    """Entries are counted by their payload too: 16 KiB entries under a
    64 KiB budget compact every few entries, whatever snapshot_entries
    says. A leader keeps what a member just behind still needs (it
    catches up from the log, no snapshot), but not beyond the budget (a
    member further behind gets the snapshot)."""
    opts = GroupOptions(tick_seconds=0.01, election_ticks=10, snapshot_entries=10_000,
                        snapshot_bytes=64 << 10)
    blob = b"x" * (16 << 10)

    async def main():
        net, groups = await cluster(3, opts)
        leader = await leader_of(groups)
        for i in range(20):
            await leader.propose(msgpack.packb([f"k{i}", blob]))
        for g in groups:
            await g.read_barrier(5)
            assert g.core.log.snap_index > 0, "no compaction by bytes"
            assert g.log_bytes <= 2 * opts.snapshot_bytes
        # Right after a compaction, two entries; then a member stops: at
        # the next compaction it is two entries (32 KiB) behind, within
        # the budget, and the leader keeps them...
        snap = leader.core.log.snap_index
        while leader.core.log.snap_index == snap:
            await leader.propose(msgpack.packb(["fill", blob]))
        for i in range(2):
            await leader.propose(msgpack.packb([f"near{i}", blob]))
        lagging = next(g for g in groups if not g.is_leader)
        await lagging.read_barrier(5)
        match = leader.peer_match(lagging.node_id)
        await lagging.stop()
        net.unregister(lagging)
        snap = leader.core.log.snap_index
        while leader.core.log.snap_index == snap:
            await leader.propose(msgpack.packb(["more", blob]))
        assert leader.core.log.snap_index <= match, "the lagging member's tail was dropped"
        # ...and drops them once the member is further behind than that.
        for i in range(12):
            await leader.propose(msgpack.packb([f"far{i}", blob]))
        assert leader.core.log.snap_index > match
        assert leader.log_bytes <= 2 * opts.snapshot_bytes
        back = RaftGroup(1, lagging.node_id, lagging.storage, KV(),
                         net.transport(lagging.node_id), opts)
        net.register(back)
        await back.start()
        await back.read_barrier(5)
        assert back.sm.data == leader.sm.data
        for g in groups + [back]:
            if g is not lagging:
                await g.stop()
    run(main())


def test_transfer_and_membership():
    async def main():
        net, groups = await cluster(4, voters=[1, 2, 3])
        leader = await leader_of(groups)
        await leader.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4), 5)
        await leader.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4), 5)
        assert leader.core.conf.voters == {1, 2, 3, 4}
        await leader.transfer_leadership(4, 5)
        assert groups[3].is_leader
        await groups[3].propose(msgpack.packb(["z", 0]), 5)
        for g in groups:
            await g.stop()
    run(main())


def test_storage_failure_is_fatal_and_surfaces():
    class Broken(MemoryStorage):
        fail = False

        async def save(self, *a):
            if self.fail:
                raise OSError(5, "EIO from the disk")
            await super().save(*a)

    async def main():
        net = LocalNetwork()
        st = Broken()
        g = RaftGroup(1, 1, st, KV(), net.transport(1), FAST,
                      bootstrap=ConfState(frozenset({1})))
        net.register(g)
        await g.start()
        await g.wait_leader(2)
        st.fail = True
        with pytest.raises(GroupFailed):
            await g.propose(msgpack.packb(["a", 1]), 2)
        with pytest.raises(GroupFailed):
            await g.propose(msgpack.packb(["b", 1]), 2)
        await g.stop()
    run(main())
