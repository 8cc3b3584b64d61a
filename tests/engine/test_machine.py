"""GroupMachine replays: after a restart the log re-applies chunk writes the
cache already holds in a newer version (older dirty versions were replaced
on disk) — each must be a no-op, not a failure that stops the group."""
import asyncio
import errno

import msgpack

from objcache.cache import ChunkCache
from objcache.engine.machine import GroupMachine
from objcache.raft.types import Entry

CHUNK = 1 << 20


def test_replay_over_newer_cached_versions_is_a_no_op(tmp_path):
    async def main():
        entries = [Entry(1, i + 1, data=msgpack.packb(
            ["cwrite", 7, 0, i * 10, bytes([65 + i]) * 10, CHUNK, 0])) for i in range(3)]

        async def run(replay):
            cache = ChunkCache(str(tmp_path / "c"), memory_bytes=4 * CHUNK,
                               disk_bytes=16 * CHUNK, chunk_size=CHUNK)
            await cache.open()
            m = GroupMachine(1, cache, CHUNK)
            for e in replay:
                r = m.apply(e)
                if asyncio.iscoroutine(r):
                    r = await r
                assert r[0] == "ok", r
            got = cache.peek((7, 0))
            view = await cache.read((7, 0), got[0], None)
            data = bytes(view.data)
            view.release()
            await cache.close()
            return got[0], data

        first = await run(entries)
        assert first == (3, b"A" * 10 + b"B" * 10 + b"C" * 10)
        assert await run(entries) == first           # a restart replays all three
    asyncio.run(main())


def _apply(m, index, cmd):
    r = m.apply(Entry(1, index, data=msgpack.packb(cmd)))
    return r


def test_a_partial_write_over_a_clean_version_is_refused_on_every_replica(tmp_path):
    """Write-back's cclean lets any replica evict that version; a partial
    write committed after it would find no base on a replica that did.
    The state refuses it (EAGAIN) before any cache is consulted — the same
    answer on every replica, whatever each evicted — and a re-base (cbase
    of that version, whole content) makes the next write work even where
    the clean version is gone."""
    async def main():
        cache = ChunkCache(str(tmp_path / "c"), memory_bytes=4 * CHUNK,
                           disk_bytes=16 * CHUNK, chunk_size=CHUNK)
        await cache.open()
        m = GroupMachine(1, cache, CHUNK)
        full = bytes(range(256)) * 64
        i = 0

        async def do(cmd):
            nonlocal i
            i += 1
            r = _apply(m, i, cmd)
            return await r if asyncio.iscoroutine(r) else r

        assert (await do(["cwrite", 7, 0, 0, full, CHUNK, 0]))[:2] == ["ok", 1]
        assert (await do(["cclean", 7, 0, 1]))[0] == "ok"
        cache.discard((7, 0))                       # this replica evicted it
        r = await do(["cwrite", 7, 0, 5, b"xx", CHUNK, 0])
        assert r[0] == "err" and r[1] == errno.EAGAIN
        assert cache.peek((7, 0)) is None           # nothing was applied
        # A re-base naming another version than the local one is a no-op.
        assert (await do(["cbase", 7, 0, full, 0, 9])) == ["ok", 1, len(full), False]
        assert (await do(["cbase", 7, 0, full, 0, 1])) == ["ok", 2, len(full), True]
        assert (await do(["cwrite", 7, 0, 5, b"xx", CHUNK, 0]))[:3] == ["ok", 3, 2]
        view = await cache.read((7, 0), 3, None)
        assert bytes(view.data) == full[:5] + b"xx" + full[7:]
        view.release()
        # A write covering the whole clean version needs no base.
        assert (await do(["cclean", 7, 0, 3]))[0] == "ok"
        cache.discard((7, 0))
        assert (await do(["cwrite", 7, 0, 0, b"y" * len(full), CHUNK, 0]))[:3] == ["ok", 4, 0]
        # The clean flag survives a snapshot; older snapshots (no flag) load.
        assert (await do(["cclean", 7, 0, 4]))[0] == "ok"
        snap = m.snapshot()
        m2 = GroupMachine(1, cache, CHUNK)
        m2.restore(snap)
        assert m2.state.chunks[(7, 0)] == [4, len(full), True]
        old = msgpack.unpackb(snap, strict_map_key=False)
        old["chunks"] = [r[:4] for r in old["chunks"]]
        m2.restore(msgpack.packb(old))
        assert m2.state.chunks[(7, 0)] == [4, len(full), False]
        await cache.close()
    asyncio.run(main())


def test_reconcile_discards_dirty_versions_no_record_references(tmp_path):
    """A crash can undo the cache's removals: a dropped chunk's dirty file
    comes back at the next start and, never evictable, would hold disk
    budget forever. Reconciliation discards exactly those."""
    async def main():
        cache = ChunkCache(str(tmp_path / "c"), memory_bytes=4 * CHUNK,
                           disk_bytes=16 * CHUNK, chunk_size=CHUNK)
        await cache.open()
        m = GroupMachine(1, cache, CHUNK)
        for i, cmd in enumerate([["cwrite", 7, 0, 0, b"a" * 100, CHUNK, 0],
                                 ["cwrite", 8, 0, 0, b"b" * 100, CHUNK, 0]]):
            r = m.apply(Entry(1, i + 1, data=msgpack.packb(cmd)))
            assert (await r if asyncio.iscoroutine(r) else r)[0] == "ok"
        # A file the records forgot (its cdrop's removal did not survive).
        await cache.write((9, 3), 4, b"leftover", dirty=True, admitted=True)
        assert m.unreferenced_dirty() == [((9, 3), 4)]
        assert m.reconcile() == 1
        assert [k for k, _, _ in cache.dirty_chunks()] == [(7, 0), (8, 0)]
        assert m.reconcile() == 0
        await cache.close()
    asyncio.run(main())
