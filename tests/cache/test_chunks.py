"""ChunkCache (objcache/cache/chunks.py): reads through the tiers,
single-flight, readahead, pins, versions, writes, dirty durability across
close/reopen, ENOSPC waiting. Crash and file-level tests: test_disk.py."""
import asyncio
import errno
import gc
import os

import numpy as np
import pytest

from objcache._ext import PagePinnedError
from objcache.cache import (CacheClosedError, CacheFullError, ChunkCache,
                            StaleVersionError)
from objcache.cache.disk import file_size

from . import CS, KiB, Loader, make_cache, pattern, read_bytes, run

K = (7, 0)


def chunk_files(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".chunk"))


# ------------------------------------------------------------ basic read path

def test_miss_then_memory_hit(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path) as c:
            v = await c.read(K, 1, load(K, 1))
            assert v.length == CS and v.data.readonly
            assert bytes(v.data) == pattern(K, 1, CS)
            assert c.arena.pin_count(v.page) == 1
            v.release()
            v.release()                                  # idempotent
            assert c.arena.pin_count(v.page) == 0 and v.released
            with pytest.raises(ValueError):
                v.data
            assert await read_bytes(c, K, 1, load(K, 1)) == pattern(K, 1, CS)
            assert len(load.calls) == 1
            s = c.stats
            assert (s["memory_hits"], s["memory_misses"], s["loads"]) == (1, 1, 1)
            assert s["memory_chunks"] == 1 and s["memory_bytes"] == CS
            assert c.peek(K) == (1, False) and c.peek((7, 1)) is None
    run(main())


def test_view_is_the_arena_page(tmp_path):
    """A view's page/offset locate the bytes in the arena memfd (what a
    local zero-copy reader maps)."""
    async def main():
        async with make_cache(tmp_path) as c:
            with await c.read(K, 3, Loader(length=1000)(K, 3)) as v:
                assert v.offset == v.page * c.page_size == c.arena.offset(v.page)
                assert os.pread(c.arena.fd, v.length, v.offset) == pattern(K, 3, 1000)
                assert len(v) == 1000 and bytes(v) == v.tobytes() == bytes(v[:])
                assert "page" in repr(v)
    run(main())


def test_loader_variants_and_contract(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            def sync_loader(into):
                into[:5] = b"hello"
                return 5
            assert await read_bytes(c, (1, 1), 1, sync_loader) == b"hello"
            assert await read_bytes(c, (1, 2), 1, lambda into: 0) == b""
            for bad in (CS + 1, -1, None, "5", True):
                with pytest.raises(ValueError):
                    await c.read((1, 3), 1, lambda into, bad=bad: bad)
            assert c.stats["load_errors"] == 5
            with pytest.raises(TypeError):
                await c.read(5, 1, sync_loader)
            with pytest.raises(ValueError):
                await c.read((1, -1), 1, sync_loader)
            with pytest.raises(ValueError):
                await c.read((1, 1), 2**64, sync_loader)
            assert c.stats["orphan_pages"] == 0
            assert c.stats["memory_pages_free"] == 2       # failed loads gave pages back
    run(main())


def test_closed_cache_refuses_calls(tmp_path):
    async def main():
        c = make_cache(tmp_path)
        with pytest.raises(CacheClosedError):
            await c.read(K, 1, Loader()(K, 1))
        await c.open()
        await c.close()
        await c.close()                                    # idempotent
        with pytest.raises(CacheClosedError):
            await c.read(K, 1, Loader()(K, 1))
        with pytest.raises(CacheClosedError):
            await c.write(K, 1, b"x")
        with pytest.raises(CacheClosedError):
            c.discard(K)
    run(main())


def test_directory_lock(tmp_path):
    async def main():
        async with make_cache(tmp_path):
            with pytest.raises(RuntimeError, match="in use"):
                await make_cache(tmp_path).open()
    run(main())


def test_default_8mib_chunks(tmp_path):
    async def main():
        c = ChunkCache(tmp_path, memory_bytes=3 * (8 << 20), disk_bytes=64 << 20)
        async with c:
            assert c.chunk_size == c.page_size == 8 << 20
            load = Loader(length=(8 << 20) - 123)
            with await c.read(K, 1, load(K, 1)) as v:
                assert v.length == (8 << 20) - 123
                assert bytes(v.data[-24:]) == pattern(K, 1, v.length)[-24:]
            await c.write(K, 2, b"tail", offset=(8 << 20) - 4,
                          base=await c.read(K, 1, load(K, 1)))
            gc.collect()
            with await c.read(K, 2, None) as v:
                assert v.length == 8 << 20 and bytes(v.data[-4:]) == b"tail"
    run(main())


# ---------------------------------------------------------------- single flight

def test_single_flight_100_readers(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path) as c:
            readers = [asyncio.create_task(c.read(K, 1, load(K, 1))) for _ in range(100)]
            await asyncio.sleep(0.01)
            assert len(load.calls) == 1
            gate.set()
            views = await asyncio.gather(*readers)
            assert len(load.calls) == 1 and c.stats["joins"] == 99
            assert {v.page for v in views} == {views[0].page}
            assert c.arena.pin_count(views[0].page) == 100     # one pin per reader
            assert all(bytes(v.data) == pattern(K, 1, CS) for v in views)
            for v in views:
                v.release()
            assert c.arena.pin_count(views[0].page) == 0       # master view dropped
    run(main())


def test_loader_failure_reaches_all_waiters_and_is_not_cached(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate, fail=OSError(errno.EIO, "S3 said no"))
        async with make_cache(tmp_path) as c:
            readers = [asyncio.create_task(c.read(K, 1, load(K, 1))) for _ in range(100)]
            await asyncio.sleep(0.01)
            gate.set()
            results = await asyncio.gather(*readers, return_exceptions=True)
            assert len(load.calls) == 1
            assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
            assert c.stats["memory_pages_free"] == c.npages    # the page went back
            load.fail = None                                   # the next read retries
            assert await read_bytes(c, K, 1, load(K, 1)) == pattern(K, 1, CS)
            assert len(load.calls) == 2
    run(main())


def test_a_cancelled_reader_does_not_cancel_the_load(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path) as c:
            first = asyncio.create_task(c.read(K, 1, load(K, 1)))
            second = asyncio.create_task(c.read(K, 1, load(K, 1)))
            await asyncio.sleep(0.01)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            gate.set()
            with await second as v:
                assert bytes(v.data) == pattern(K, 1, CS)
            assert len(load.calls) == 1
            # Everyone gone before the load ends: the chunk is still cached.
            gate.clear()
            lone = asyncio.create_task(c.read((7, 1), 1, load((7, 1), 1)))
            await asyncio.sleep(0.01)
            lone.cancel()
            gate.set()
            await asyncio.sleep(0.01)
            assert c.peek((7, 1)) == (1, False)
            assert await read_bytes(c, (7, 1), 1, load((7, 1), 1)) == pattern((7, 1), 1, CS)
            assert len(load.calls) == 2
    run(main())


# ----------------------------------------------------------------------- tiers

def test_memory_eviction_demotes_to_disk_and_disk_hits_promote(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=2) as c:
            for i in range(6):
                assert await read_bytes(c, (1, i), 1, load((1, i), 1)) == pattern((1, i), 1, CS)
            s = c.stats
            assert s["memory_chunks"] == 2 and s["memory_evictions"] == 4
            assert s["demotions"] == 4 and s["disk_chunks"] == 4
            assert len(chunk_files(tmp_path)) == 4
            for i in range(6):                           # all cached somewhere
                assert await read_bytes(c, (1, i), 1, load((1, i), 1)) == pattern((1, i), 1, CS)
            assert len(load.calls) == 6
            s = c.stats
            assert s["disk_hits"] >= 4 and s["promotions"] == s["disk_hits"]
            # Promotion keeps the disk copy: evicting it again costs no write.
            writes = s["disk_writes"]
            for i in range(6):
                await read_bytes(c, (1, i), 1, load((1, i), 1))
            assert c.stats["disk_writes"] == writes
    run(main())


def test_disk_tier_is_bounded_and_evicts_clean_files(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=2, disk_chunks=3) as c:
            for i in range(10):
                await read_bytes(c, (1, i), 1, load((1, i), 1))
            s = c.stats
            assert s["disk_chunks"] == 3 and s["disk_bytes"] <= s["disk_capacity"]
            assert s["disk_evictions"] == 5
        assert len(chunk_files(tmp_path)) == 3
    run(main())


def test_without_a_disk_tier_evicted_chunks_are_dropped(tmp_path):
    async def main():
        load = Loader()
        c = ChunkCache(tmp_path, memory_bytes=2 * CS, disk_bytes=0, chunk_size=CS)
        async with c:
            for i in range(4):
                await read_bytes(c, (1, i), 1, load((1, i), 1))
            await read_bytes(c, (1, 0), 1, load((1, 0), 1))
            assert len(load.calls) == 5 and c.stats["demotions"] == 0
            with pytest.raises(OSError) as err:
                await c.write(K, 1, b"dirty")
            assert err.value.errno == errno.ENOSPC
    run(main())


# ------------------------------------------------------------------------ pins

def test_a_held_view_blocks_eviction_of_its_page(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=2) as c:
            held = await c.read((1, 0), 1, load((1, 0), 1))
            for i in range(1, 8):
                await read_bytes(c, (1, i), 1, load((1, i), 1))
            assert c.peek((1, 0)) is not None
            e = c._mem[(1, 0)]
            assert e.page == held.page                   # never evicted, never reused
            assert bytes(held.data) == pattern((1, 0), 1, CS)
            held.release()
    run(main())


def test_numpy_arrays_from_a_view_keep_the_pin(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=1) as c:
            v = await c.read((1, 0), 1, Loader()((1, 0), 1))
            arr = np.frombuffer(v.data, dtype=np.uint8)
            v.release()                                  # the array still pins the page
            assert c.arena.pin_count(v.page) == 1
            waiter = asyncio.create_task(c.read((1, 1), 1, Loader()((1, 1), 1)))
            await asyncio.sleep(0.1)
            assert not waiter.done()                     # the only page is pinned
            assert bytes(arr[:24]) == pattern((1, 0), 1, 24)
            del arr                                      # unpinned: the poll notices
            with await asyncio.wait_for(waiter, 2) as w:
                assert bytes(w.data) == pattern((1, 1), 1, CS)
    run(main())


def test_every_page_pinned_waits_then_fails_clearly(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=2, pin_wait_timeout=0.3) as c:
            views = [await c.read((1, i), 1, load((1, i), 1)) for i in range(2)]
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(CacheFullError, match="pinned"):
                await c.read((1, 9), 1, load((1, 9), 1))
            assert loop.time() - t0 >= 0.3
            # Memory hits still work while everything is pinned.
            assert await read_bytes(c, (1, 0), 1, load((1, 0), 1)) == pattern((1, 0), 1, CS)
            # A release during the wait lets the read through.
            waiter = asyncio.create_task(c.read((1, 9), 1, load((1, 9), 1)))
            await asyncio.sleep(0.05)
            views.pop().release()
            with await asyncio.wait_for(waiter, 1) as v:
                assert bytes(v.data) == pattern((1, 9), 1, CS)
            # A dirty write still works with every page pinned (disk only).
            views.append(await c.read((1, 9), 1, load((1, 9), 1)))
            await c.write((2, 0), 1, b"durable anyway")
            assert c.peek((2, 0)) == (1, True)
            for v in views:
                v.release()
            assert await read_bytes(c, (2, 0), 1) == b"durable anyway"
    run(main())


def test_close_with_a_live_view_raises(tmp_path):
    async def main():
        c = make_cache(tmp_path)
        await c.open()
        v = await c.read(K, 1, Loader()(K, 1))
        with pytest.raises(PagePinnedError):
            await c.close()
        v.release()
        c.arena.close()
    run(main())


# -------------------------------------------------------------------- versions

def test_a_stale_version_is_never_returned(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=2) as c:
            assert await read_bytes(c, K, 1, load(K, 1)) == pattern(K, 1, CS)
            assert await read_bytes(c, K, 2, load(K, 2)) == pattern(K, 2, CS)
            assert load.calls == [(K, 1), (K, 2)] and c.peek(K) == (2, False)
            assert c.stats["memory_chunks"] == 1            # v1's page was freed
            # An older version is loaded for the asker but not cached.
            assert await read_bytes(c, K, 1, load(K, 1)) == pattern(K, 1, CS)
            assert c.peek(K) == (2, False) and len(load.calls) == 3
            assert await read_bytes(c, K, 2, load(K, 2)) == pattern(K, 2, CS)
            assert len(load.calls) == 3
            assert c.stats["orphan_pages"] == 0
    run(main())


def test_an_old_view_keeps_its_content_after_a_newer_version(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=2) as c:
            old = await c.read(K, 1, Loader()(K, 1))
            await c.write(K, 2, b"new", base=old)
            assert bytes(old.data) == pattern(K, 1, CS)     # copy-on-write
            assert c.stats["orphan_pages"] == 1              # v1's page, pinned by `old`
            old.release()
            assert await read_bytes(c, K, 2) == b"new" + pattern(K, 1, CS)[3:]
            assert c.stats["orphan_pages"] == 0              # reclaimed on the next take
    run(main())


def test_a_slow_old_load_does_not_overwrite_a_newer_write(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path) as c:
            slow = asyncio.create_task(c.read(K, 1, load(K, 1)))
            await asyncio.sleep(0.01)
            await c.write(K, 2, b"v2")
            gate.set()
            with await slow as v:                            # the asker gets v1
                assert bytes(v.data) == pattern(K, 1, CS)
            assert c.peek(K) == (2, True)
            assert await read_bytes(c, K, 2) == b"v2"
    run(main())


def test_stale_writes_are_refused(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            await c.write(K, 5, b"five")
            with pytest.raises(StaleVersionError):
                await c.write(K, 4, b"four")
            writes = c.stats["disk_writes"]
            await c.write(K, 5, b"five")                     # same version: a no-op
            assert c.dirty_chunks() == [(K, 5, 4)]
            assert c.stats["disk_writes"] == writes
        assert len(chunk_files(tmp_path)) == 1
    run(main())


def test_newer_versions_remove_older_files(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            for v in range(1, 6):
                await c.write(K, v, b"v%d" % v)
            c.mark_clean(K, 5)
            await c.write((7, 1), 1, b"other")
        # Background removals finished at close: one file per key.
        names = chunk_files(tmp_path)
        assert len(names) == 2, names
    run(main())


def test_discard_drops_everything_and_inflight_loads_install_nothing(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path, pages=2) as c:
            await c.write(K, 1, b"dirty")
            c.discard(K)
            assert c.peek(K) is None and c.dirty_chunks() == []
            slow = asyncio.create_task(c.read((7, 1), 1, load((7, 1), 1)))
            await asyncio.sleep(0.01)
            c.discard((7, 1))
            gate.set()
            with await slow as v:                # the reader that asked first gets it
                assert bytes(v.data) == pattern((7, 1), 1, CS)
            assert c.peek((7, 1)) is None        # ...but it is not cached
        assert chunk_files(tmp_path) == []
    run(main())


# ---------------------------------------------------------------------- writes

def test_partial_writes_on_a_base(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=3) as c:
            await c.write(K, 1, b"A" * 1000)
            with await c.read(K, 1, None) as base:
                await c.write(K, 2, b"xyz", offset=10, base=base)
            assert await read_bytes(c, K, 2) == b"A" * 10 + b"xyz" + b"A" * 987
            with await c.read(K, 2, None) as base:           # extend past the end
                await c.write(K, 3, b"END", offset=1500, base=base)
            got = await read_bytes(c, K, 3)
            assert len(got) == 1503 and got[:13] == b"A" * 10 + b"xyz"
            assert got[1000:1500] == bytes(500) and got[1500:] == b"END"
            await c.write((7, 1), 1, b"hole", offset=CS - 4)  # no base: zeros before
            got = await read_bytes(c, (7, 1), 1)
            assert got == bytes(CS - 4) + b"hole"
            with pytest.raises(ValueError):
                await c.write(K, 9, b"toolong", offset=CS - 3)
            with pytest.raises(TypeError):
                await c.write(K, 9, b"x", base=b"not a view")
            with await c.read(K, 3, None) as other:
                with pytest.raises(ValueError):
                    await c.write((7, 2), 1, b"x", base=other)   # another chunk
    run(main())


def test_holes_are_zeroed_on_reused_pages(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=1) as c:
            await read_bytes(c, (1, 0), 1, Loader()((1, 0), 1))  # page full of pattern
            c.discard((1, 0))                                    # page freed, not zeroed
            await c.write(K, 1, b"end", offset=CS - 3)           # reuses that page
            assert await read_bytes(c, K, 1) == bytes(CS - 3) + b"end"
    run(main())


def test_write_data_formats_and_big_builds(tmp_path):
    async def main():
        async with make_cache(tmp_path, chunk_size=1 << 20) as c:
            arr = np.arange(1 << 18, dtype=np.uint32)              # 1 MiB, itemsize 4
            await c.write(K, 1, arr)                               # built in the executor
            assert await read_bytes(c, K, 1) == arr.tobytes()
            await c.write((7, 1), 1, bytearray(b"ba"))
            await c.write((7, 2), 1, memoryview(b"xxmvxx")[2:4])
            assert await read_bytes(c, (7, 1), 1) == b"ba"
            assert await read_bytes(c, (7, 2), 1) == b"mv"
    run(main())


def test_readers_of_a_version_being_written_wait_for_the_write(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path) as c:
            w = asyncio.create_task(c.write(K, 1, b"fresh"))
            await asyncio.sleep(0)                     # the write is in flight
            r = asyncio.create_task(c.read(K, 1, load(K, 1)))
            await w
            with await r as v:
                assert bytes(v.data) == b"fresh"
            assert load.calls == []
    run(main())


def test_clean_write_is_cached_like_a_load(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=1) as c:
            await c.write(K, 1, b"clean", dirty=False)
            assert c.peek(K) == (1, False) and c.dirty_chunks() == []
            assert chunk_files(tmp_path) == []                 # memory only so far
            await read_bytes(c, (1, 1), 1, Loader()((1, 1), 1))    # evicts -> demotes
            assert len(chunk_files(tmp_path)) == 1
            assert await read_bytes(c, K, 1) == b"clean"
    run(main())


# ------------------------------------------------------------- dirty + restart

def test_dirty_chunks_survive_close_and_reopen(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=2) as c:
            for i in range(5):
                await c.write((3, i), 10 + i, pattern((3, i), 10 + i, 1000 + i))
            await c.write((3, 0), 20, b"newer")               # supersedes v10
            c.mark_clean((3, 1), 11)
            c.mark_clean((3, 2), 99)                           # wrong version: no-op
            dirty = c.dirty_chunks()
        assert [d[:2] for d in dirty] == [((3, 0), 20), ((3, 2), 12), ((3, 3), 13),
                                          ((3, 4), 14)]
        async with make_cache(tmp_path, pages=2) as c:
            assert c.dirty_chunks() == dirty
            assert c.peek((3, 1)) == (11, False)               # clean, kept
            assert await read_bytes(c, (3, 0), 20) == b"newer"
            for i in range(1, 5):
                assert await read_bytes(c, (3, i), 10 + i) == pattern((3, i), 10 + i, 1000 + i)
            assert c.recovery["dirty"] == 4
    run(main())


def test_mark_clean_only_for_the_cached_version(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            await c.write(K, 1, b"one")
            await c.write(K, 2, b"two")
            c.mark_clean(K, 1)                       # the upload was of v1: v2 stays dirty
            assert c.peek(K) == (2, True)
            c.mark_clean(K, 2)
            assert c.peek(K) == (2, False) and c.stats["dirty_bytes"] == 0
    run(main())


# ---------------------------------------------------------------------- ENOSPC

def test_dirty_full_disk_waits_for_mark_clean(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=2, disk_chunks=3) as c:
            for i in range(3):
                await c.write((1, i), 1, pattern((1, i), 1, CS))
            blocked = asyncio.create_task(c.write((1, 3), 1, pattern((1, 3), 1, CS)))
            await asyncio.sleep(0.1)
            assert not blocked.done() and c.stats["dirty_waits"] == 1
            c.mark_clean((1, 0), 1)                 # uploaded: evictable now
            await asyncio.wait_for(blocked, 2)
            assert c.peek((1, 0)) in (None, (1, False))
            assert [d[0] for d in c.dirty_chunks()] == [(1, 1), (1, 2), (1, 3)]
            # discard frees dirty space as well
            blocked = asyncio.create_task(c.write((1, 4), 1, b"x"))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            c.discard((1, 1))
            await asyncio.wait_for(blocked, 2)
    run(main())


def test_dirty_full_disk_times_out_with_enospc_and_drops_nothing(tmp_path):
    async def main():
        async with make_cache(tmp_path, pages=2, disk_chunks=3,
                              dirty_wait_timeout=0.2) as c:
            for i in range(3):
                await c.write((1, i), 1, pattern((1, i), 1, CS))
            with pytest.raises(OSError) as err:
                await c.write((1, 3), 1, b"no room")
            assert err.value.errno == errno.ENOSPC and c.stats["enospc"] == 1
            assert len(c.dirty_chunks()) == 3 and c.peek((1, 3)) is None
            for i in range(3):
                assert await read_bytes(c, (1, i), 1) == pattern((1, i), 1, CS)
            # A cancelled waiter gives its place back.
            t = asyncio.create_task(c.write((1, 3), 1, b"x"))
            await asyncio.sleep(0.05)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            assert c.stats["disk_bytes"] == 3 * file_size(CS)
    run(main())


def test_clean_files_make_room_for_dirty_ones(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=1, disk_chunks=3) as c:
            for i in range(4):                                 # 3 clean files on disk
                await read_bytes(c, (1, i), 1, load((1, i), 1))
            assert c.stats["disk_chunks"] == 3
            for i in range(3):
                await c.write((2, i), 1, b"d")                  # evicts the clean ones
            assert len(c.dirty_chunks()) == 3
    run(main())


# ------------------------------------------------------------------- readahead

def test_readahead_loads_in_the_background_single_flighted(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path, pages=8) as c:
            ahead = [((1, i), 1, load((1, i), 1)) for i in range(1, 4)]
            first = asyncio.create_task(c.read((1, 0), 1, load((1, 0), 1), readahead=ahead))
            await asyncio.sleep(0.01)
            assert sorted(load.calls) == [((1, i), 1) for i in range(4)]
            assert not first.done()
            gate.set()
            (await first).release()
            nxt = await c.read((1, 1), 1, load((1, 1), 1))       # joined or hit
            nxt.release()
            assert len(load.calls) == 4
            await asyncio.sleep(0.01)
            assert all(c.peek((1, i)) == (1, False) for i in range(4))
            assert c.stats["readahead_started"] == 3
    run(main())


def test_readahead_concurrency_is_bounded_and_errors_are_contained(tmp_path):
    async def main():
        gate = asyncio.Event()
        load = Loader(gate=gate)
        async with make_cache(tmp_path, pages=8, readahead_concurrency=2) as c:
            ahead = [((1, i), 1, load((1, i), 1)) for i in range(1, 7)]
            gate.set()
            (await c.read((1, 0), 1, load((1, 0), 1), readahead=ahead)).release()
            await asyncio.sleep(0.01)
            s = c.stats
            assert s["readahead_started"] == 2 and s["readahead_dropped"] == 4
            assert load.max_active <= 2
            bad = Loader(fail=RuntimeError("boom"))
            (await c.read((1, 0), 1, load((1, 0), 1),
                          readahead=[((2, 0), 1, bad((2, 0), 1))])).release()
            await asyncio.sleep(0.01)
            assert c.stats["readahead_errors"] == 1 and c.peek((2, 0)) is None
    run(main())


def test_readahead_never_waits_for_pinned_pages(tmp_path):
    async def main():
        load = Loader()
        async with make_cache(tmp_path, pages=1, pin_wait_timeout=5) as c:
            v = await c.read((1, 0), 1, load((1, 0), 1),
                             readahead=[((1, 1), 1, load((1, 1), 1))])
            await asyncio.sleep(0.05)                  # no page: readahead gave up
            assert c.peek((1, 1)) is None
            v.release()
            # A demand read that joined such a readahead retries on its own.
            assert await read_bytes(c, (1, 1), 1, load((1, 1), 1)) == pattern((1, 1), 1, CS)
    run(main())


# ------------------------------------------------------------ concurrency soak

def test_random_concurrent_operations_keep_the_invariants(tmp_path):
    """Many tasks reading, writing, discarding and marking clean a few keys
    on a tiny cache; every read returns exactly the content of the version
    it asked for, and the cache's books balance at the end."""
    async def main():
        rng = np.random.default_rng(5)
        load = Loader(length=4 * KiB, delay=0.001)
        async with make_cache(tmp_path, pages=3, disk_chunks=6, dirty_wait_timeout=5,
                              pin_wait_timeout=5) as c:
            versions = {(1, i): 1 for i in range(6)}

            async def worker(seed):
                r = np.random.default_rng(seed)
                for _ in range(60):
                    key = (1, int(r.integers(6)))
                    op = r.random()
                    v = versions[key]
                    if op < 0.6:
                        try:
                            with await c.read(key, v, load(key, v)) as view:
                                assert bytes(view.data[:24]) in (
                                    pattern(key, v, 24), b"W" * 24), (key, v)
                                await asyncio.sleep(0)
                        except CacheFullError:
                            pass
                    elif op < 0.8:
                        versions[key] = v + 1
                        try:
                            await c.write(key, v + 1, b"W" * 4096)
                        except StaleVersionError:
                            pass
                        except OSError as exc:
                            assert exc.errno == errno.ENOSPC
                    elif op < 0.95:
                        p = c.peek(key)
                        if p is not None:
                            c.mark_clean(key, p[0])
                    else:
                        c.discard(key)
            await asyncio.gather(*(worker(int(s)) for s in rng.integers(1 << 30, size=12)))
            s = c.stats
            assert s["disk_bytes"] == sum(file_size(e.length)
                                          for e in c._disk._entries.values())
            assert s["memory_chunks"] + s["memory_pages_free"] + s["orphan_pages"] == c.npages
            for key, m in c._mem.items():
                d = c._disk.get(key)
                assert d is None or d.version == m.version
    run(main(), timeout=120)


# -------------------------------------------------------------- scan resistance

@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
def test_a_one_pass_scan_does_not_flush_the_hot_set(tmp_path, policy):
    """Through the whole cache: a hot set read repeatedly, then a model-sized
    one-pass scan read in pieces (each scanned chunk read 8 times in a
    burst, as FUSE reads do). S3-FIFO keeps the hot set in memory; LRU
    (for contrast) loses it to the scan."""
    async def main():
        load = Loader(length=1024)
        # The burst is within the correlation window; the hot rounds are not.
        async with ChunkCache(tmp_path, memory_bytes=20 * CS, disk_bytes=0,
                              chunk_size=CS, policy=policy,
                              correlation_window=0.02) as c:
            hot = [(1, i) for i in range(10)]
            for _ in range(3):
                for k in hot:
                    await read_bytes(c, k, 1, load(k, 1))
                await asyncio.sleep(0.03)
            for i in range(200):
                k = (2, i)
                for _ in range(8):
                    await read_bytes(c, k, 1, load(k, 1))
            before = len(load.calls)
            for k in hot:
                await read_bytes(c, k, 1, load(k, 1))
            reloaded = len(load.calls) - before
            if policy == "s3fifo":
                assert reloaded == 0
            else:
                assert reloaded == len(hot)
    run(main())
