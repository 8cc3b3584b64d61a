"""GroupMachine replays: after a restart the log re-applies chunk writes the
cache already holds in a newer version (older dirty versions were replaced
on disk) — each must be a no-op, not a failure that stops the group."""
import asyncio

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
