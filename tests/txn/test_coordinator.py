"""Transactions over Raft groups: single-group in one entry, 2PC across
groups, and every recovery path — including a participant's leader change
between prepare and commit (the case the reference design lost)."""
import asyncio
import errno

import pytest

from objcache.meta.model import ROOT, Inode, Kind
from objcache.txn.coordinator import Coordinator, Resolver, TransactionFailed, new_txn_id
from objcache.txn.local import LocalCluster

T0 = 1_700_000_000_000_000_000


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def dir_wire(i, prefix):
    return Inode(i, Kind.DIR, 0o755, 0, 0, mtime_ns=T0).to_wire()


async def setup(groups=3, replicas=1):
    c = await LocalCluster(groups, replicas).start()
    co = Coordinator(c, prepare_timeout=0.5)
    # Root directory in group 1, directory 20 in group 2.
    await co.run({1: [["mkinode", dir_wire(ROOT, ""), "", True]]})
    await co.run({2: [["mkinode", dir_wire(20, "d/"), "d/", True]]})
    return c, co


def test_single_group_transaction_is_one_entry():
    async def main():
        c, co = await setup()
        before = c.state(1).applied_index
        await co.run({1: [["mkentry", ROOT, b"x", 7, 1, None]]})
        assert c.state(1).applied_index == before + 1
        assert co.stats["single"] >= 3 and co.stats["two_phase"] == 0
        await c.close()
    run(main())


def test_two_phase_commit_across_groups():
    async def main():
        c, co = await setup()
        # mkdir-like: entry in group 1, directory inode in group 3.
        res = await co.run({1: [["mkentry", ROOT, b"sub", 30, 2, None]],
                            3: [["mkinode", dir_wire(30, "sub/"), "sub/", True]]})
        assert set(res) == {1, 3}
        assert c.state(1).dirs[ROOT].entries[b"sub"].child == 30
        assert 30 in c.state(3).dirs
        assert not c.state(1).locks and not c.state(3).locks
        assert not c.state(1).decisions                 # forgotten
        await c.close()
    run(main())


def test_two_phase_abort_leaves_nothing():
    async def main():
        c, co = await setup()
        await co.run({1: [["mkentry", ROOT, b"taken", 5, 1, None]]})
        with pytest.raises(TransactionFailed) as exc:
            await co.run({1: [["mkentry", ROOT, b"taken", 31, 2, None]],
                          3: [["mkinode", dir_wire(31, "t/"), "t/", True]]})
        assert exc.value.errno == errno.EEXIST
        assert 31 not in c.state(3).inodes and not c.state(3).locks
        assert c.state(1).dirs[ROOT].entries[b"taken"].child == 5
        await c.close()
    run(main())


def test_conflicting_transactions_serialize():
    async def main():
        c, co = await setup()
        # 20 concurrent cross-group creates of the same name: exactly one wins.
        async def attempt(i):
            try:
                await co.run({1: [["mkentry", ROOT, b"same", 100 + i, 2, None]],
                              3: [["mkinode", dir_wire(100 + i, "s/"), "s/", True]]})
                return i
            except TransactionFailed as exc:
                assert exc.errno == errno.EEXIST
                return None
        winners = [w for w in await asyncio.gather(*(attempt(i) for i in range(20)))
                   if w is not None]
        assert len(winners) == 1
        st3 = c.state(3)
        assert [i for i in range(100, 120) if i in st3.inodes] == [100 + winners[0]]
        await c.close()
    run(main())


def test_participant_leader_change_between_prepare_and_commit():
    """The reference design lost this commit. Here the prepare record is in
    the participant's Raft log, so its new leader applies the decision."""
    async def main():
        c = await LocalCluster(3, replicas=3).start()
        co = Coordinator(c, prepare_timeout=5.0)
        await co.run({1: [["mkinode", dir_wire(ROOT, ""), "", True]]})
        txn = new_txn_id()
        import time
        deadline = time.time() + 5
        ops1 = [["mkentry", ROOT, b"moved", 40, 2, None]]
        ops3 = [["mkinode", dir_wire(40, "m/"), "m/", True]]
        assert (await c.propose(1, ["prep", txn, 1, ops1, deadline]))[0] == "ok"
        assert (await c.propose(3, ["prep", txn, 1, ops3, deadline]))[0] == "ok"
        assert (await c.propose(1, ["coord", txn, True, [1, 3]])) == ["ok", True]
        # Participant 3 loses its leader after preparing, before the decision.
        old = await c.leader(3)
        await c.stop_replica(3, old.node_id)
        new = await c.leader(3)
        assert new.node_id != old.node_id
        assert txn in new.sm.prepared                    # the prepare survived
        r = await c.propose(3, ["decide", txn, True])
        assert r[0] == "ok" and 40 in c.state(3).inodes
        await c.close()
    run(main())


def test_coordinator_dies_after_prepare_resolver_aborts():
    async def main():
        c, co = await setup()
        txn = new_txn_id()
        import time
        ops3 = [["mkinode", dir_wire(50, "z/"), "z/", True]]
        await c.propose(3, ["prep", txn, 1, ops3, time.time() - 1])   # deadline passed
        assert c.state(3).locks
        # The coordinator never logged a decision; group 3's resolver asks
        # group 1, which logs an abort, and group 3 applies it.
        res = Resolver(3, c.state(3), c)
        assert await res.run_once() == 1
        assert not c.state(3).locks and 50 not in c.state(3).inodes
        assert c.state(1).decisions[txn][0] is False
        # A late coordinator can no longer commit it.
        assert await c.propose(1, ["coord", txn, True, [3]]) == ["ok", False]
        await c.close()
    run(main())


def test_coordinator_dies_after_decision_resolver_delivers_it():
    async def main():
        c, co = await setup()
        txn = new_txn_id()
        import time
        ops3 = [["mkinode", dir_wire(60, "y/"), "y/", True]]
        await c.propose(3, ["prep", txn, 1, ops3, time.time() + 100])
        await c.propose(1, ["coord", txn, True, [3]])
        # The coordinator process dies here; group 1's resolver re-sends.
        res = Resolver(1, c.state(1), c, grace=0.0)
        assert await res.run_once() == 1
        assert 60 in c.state(3).inodes and not c.state(3).locks
        assert txn not in c.state(1).decisions
        await c.close()
    run(main())


def test_coordinator_group_leader_change_keeps_the_decision():
    async def main():
        c = await LocalCluster(3, replicas=3).start()
        co = Coordinator(c)
        await co.run({1: [["mkinode", dir_wire(ROOT, ""), "", True]]})
        txn = new_txn_id()
        import time
        await c.propose(3, ["prep", txn, 1, [["mkinode", dir_wire(70, "w/"), "w/", True]],
                            time.time() - 1])
        assert (await c.propose(1, ["coord", txn, True, [3]])) == ["ok", True]
        old = await c.leader(1)
        await c.stop_replica(1, old.node_id)
        await c.leader(1)
        # The participant times out and asks: the new coordinator leader
        # answers with the logged commit, not an abort.
        res = Resolver(3, c.state(3), c)
        assert await res.run_once() == 1
        assert 70 in c.state(3).inodes
        await c.close()
    run(main())


def test_a_prepare_refused_for_a_stale_ring_aborts_and_releases_the_locks():
    """A participant answers stale_ring (the sender placed the ops with an
    older ring; the router has adopted the new one): the transaction is
    aborted everywhere — no participant keeps a lock until the resolver's
    timeout — and StaleRing reaches the caller, who places the ops again."""
    from objcache.cluster.ring import StaleRing

    class StaleOnce:
        def __init__(self, inner):
            self.inner, self.refused = inner, 0

        async def propose(self, group, command, timeout=None):
            if command[0] == "prep" and group == 3 and not self.refused:
                self.refused += 1
                raise StaleRing("group 3: ring v1 is stale")
            return await self.inner.propose(group, command, timeout)

    async def main():
        c, _ = await setup()
        co = Coordinator(StaleOnce(c), prepare_timeout=30)
        with pytest.raises(StaleRing):
            await co.run({1: [["mkentry", ROOT, b"s", 32, 2, None]],
                          3: [["mkinode", dir_wire(32, "s/"), "s/", True]]})
        assert not c.state(1).locks and not c.state(1).prepared
        assert b"s" not in c.state(1).dirs[ROOT].entries
        # Placed again (here: the same places), it commits at once.
        await co.run({1: [["mkentry", ROOT, b"s", 32, 2, None]],
                      3: [["mkinode", dir_wire(32, "s/"), "s/", True]]})
        assert c.state(1).dirs[ROOT].entries[b"s"].child == 32
        await c.close()
    run(main())
