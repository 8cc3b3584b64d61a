"""The data path in-process: reads from the bucket through chunk owners
(one GET per chunk, however many readers), writes as Raft entries at the
owners, flush publishing size and versions atomically."""
import asyncio
import os

from objcache.meta.model import ROOT
from objcache.raft.driver import GroupOptions

from .harness import CHUNK, Engine


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_read_bucket_object_through_owners_one_get_per_chunk(tmp_path):
    async def main():
        e = Engine(tmp_path)
        body = os.urandom(5 * CHUNK + 1234)
        await e.store.put("model.bin", body)
        await e.start()
        node = await e.ns.lookup(ROOT, b"model.bin")
        before = e.store.stats["requests"].get("GetObject", 0)
        reads = await asyncio.gather(*(e.data.read(node, 0, len(body)) for _ in range(16)))
        assert all(r == body for r in reads)
        gets = e.store.stats["requests"].get("GetObject", 0) - before
        # Exactly one ranged GET per chunk for 16 concurrent full reads.
        assert gets == 6, e.store.stats
        assert await e.data.read(node, CHUNK - 10, 20) == body[CHUNK - 10:CHUNK + 10]
        assert await e.data.read(node, len(body) - 5, 100) == body[-5:]
        await e.close()
    run(main())


def test_write_flush_read_back(tmp_path):
    async def main():
        e = await Engine(tmp_path).start()
        f = await e.ns.create(ROOT, b"new", 0o644, 1000, 1000)
        data = os.urandom(2 * CHUNK + 77)
        versions = await e.data.write(f, 0, data)
        assert set(versions) == {0, 1, 2}
        await e.data.flush(f, len(data), versions)
        node = await e.ns.getattr(f.id)
        assert node.size == len(data) and node.dirty
        assert await e.data.read(node, 0, len(data)) == data
        # A small overwrite in the middle builds on the previous version.
        v2 = await e.data.write(node, CHUNK + 5, b"XYZ")
        await e.data.flush(node, len(data), v2)
        node = await e.ns.getattr(f.id)
        want = data[:CHUNK + 5] + b"XYZ" + data[CHUNK + 8:]
        assert await e.data.read(node, 0, len(data)) == want
        await e.close()
    run(main())


def test_partial_write_over_a_bucket_object_ships_the_base(tmp_path):
    async def main():
        e = Engine(tmp_path)
        body = os.urandom(CHUNK + 100)
        await e.store.put("obj", body)
        await e.start()
        node = await e.ns.lookup(ROOT, b"obj")
        v = await e.data.write(node, 10, b"hello")
        await e.data.flush(node, len(body), v)
        node = await e.ns.getattr(node.id)
        got = await e.data.read(node, 0, len(body))
        assert got == body[:10] + b"hello" + body[15:]
        await e.close()
    run(main())


def test_writes_survive_leader_change_r3(tmp_path):
    async def main():
        e = await Engine(tmp_path, groups=2, replicas=3).start()
        f = await e.ns.create(ROOT, b"f", 0o644, 1000, 1000)
        data = os.urandom(3 * CHUNK)
        v = await e.data.write(f, 0, data)
        await e.data.flush(f, len(data), v)
        # Every group loses its leader; the data is on the followers.
        for g in (1, 2):
            old = await e.cluster.leader(g)
            await e.cluster.stop_replica(g, old.node_id)
        node = await e.ns.getattr(f.id)
        assert await e.data.read(node, 0, len(data)) == data
        await e.close()
    run(main())


def test_a_replica_far_behind_gets_the_dirty_chunks_with_the_snapshot(tmp_path):
    """A follower stopped while 6 chunks are written under a 2-chunk
    compaction budget comes back behind the leader's compacted log: it
    installs a snapshot, which names dirty chunks only the compacted
    entries carried. It fetches them from the leader before the core sees
    the snapshot, so once it leads it serves every byte (before: ESTALE,
    "not here and not in the bucket")."""
    opts = GroupOptions(tick_seconds=0.01, election_ticks=10, snapshot_entries=200,
                        snapshot_bytes=2 * CHUNK)

    async def main():
        e = await Engine(tmp_path, groups=1, replicas=3, options=opts).start()
        f = await e.ns.create(ROOT, b"f", 0o644, 1000, 1000)
        lead = await e.cluster.leader(1)
        behind = next(n for n in e.cluster.groups[1] if n != lead.node_id)
        stopped_at = e.cluster.groups[1][behind].core.log.last_index()
        await e.cluster.stop_replica(1, behind)
        data = os.urandom(6 * CHUNK)
        await e.data.flush(f, len(data), await e.data.write(f, 0, data))
        assert lead.core.log.snap_index > stopped_at        # it must take a snapshot
        back = await e.cluster.restart(1, behind)
        await back.read_barrier(5)
        assert back.core.log.snap_index > stopped_at        # it did
        await lead.transfer_leadership(behind, 5)
        await e.cluster.stop_replica(1, lead.node_id)
        node = await e.ns.getattr(f.id)
        assert await e.data.read(node, 0, len(data)) == data
        await e.close()
    run(main())


def test_open_sees_an_object_replaced_outside(tmp_path):
    """A clean file whose object another tool replaced: open() reloads it
    in a new epoch (no chunk cached from the old object is served); a
    dirty file keeps its local data; a renamed file is not confused with
    the object now at its old name."""
    async def main():
        e = Engine(tmp_path)
        old = os.urandom(CHUNK + 100)
        await e.store.put("f.bin", old)
        await e.store.put("g.bin", b"g")
        await e.start()
        ns = e.ns
        ns.revalidate_ttl = 0
        f = await ns.lookup(ROOT, b"f.bin")
        assert await e.data.read(f, 0, f.size) == old          # cached now
        assert (await ns.open(f.id)).epoch == f.epoch          # unchanged: no reload
        new = os.urandom(2 * CHUNK + 7)
        await e.store.put("f.bin", new, metadata={"mode": str(0o100600)})
        f2 = await ns.open(f.id)
        assert f2.epoch == f.epoch + 1 and f2.size == len(new) and f2.mode == 0o600
        assert await e.data.read(f2, 0, f2.size) == new
        # A renamed file keeps its own data although its old key changes.
        g = await ns.lookup(ROOT, b"g.bin")
        assert await e.data.read(g, 0, 10) == b"g"              # cached
        await ns.rename(ROOT, b"g.bin", ROOT, b"h.bin")
        await e.store.put("g.bin", b"someone else's")
        g2 = await ns.open(g.id)
        assert g2.epoch == g.epoch and await e.data.read(g2, 0, 10) == b"g"
        # A dirty file keeps its local data.
        await e.data.flush(f2, 3, await e.data.write(f2, 0, b"abc"))
        await e.store.put("f.bin", b"outside again")
        f3 = await ns.open(f.id)
        assert f3.epoch == f2.epoch and await e.data.read(f3, 0, 3) == b"abc"
        await e.close()
    asyncio.run(asyncio.wait_for(main(), 60))
