"""ChunkBuffers (objcache/fuse/readbuf.py) against an in-memory fetch."""
from __future__ import annotations

import asyncio
import functools

import pytest

from objcache.fuse.readbuf import ChunkBuffers
from objcache.meta.model import Inode, Kind

CS = 1024


def sync(test):
    """Run an async test body on a fresh loop (bounded)."""
    @functools.wraps(test)
    def wrapper():
        asyncio.run(asyncio.wait_for(test(), 30))
    return wrapper


class Files:
    """Contents by (inode, chunk version of chunk 0): a fetch records its calls."""

    def __init__(self):
        self.content: dict[tuple, bytes] = {}
        self.calls: list[tuple] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None

    async def fetch(self, node: Inode, offset: int, length: int):
        self.calls.append((node.id, offset, length))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise OSError(5, "injected")
        data = self.content[(node.id, tuple(sorted(node.chunks.items())))]
        return data[offset:min(node.size, offset + length)]


def node(ino: int, size: int, chunks=None) -> Inode:
    return Inode(ino, Kind.FILE, 0o644, 0, 0, size=size, chunks=dict(chunks or {}))


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def stored(f: Files, ino: int, size: int, seed: int) -> tuple[Inode, bytes]:
    """A file of ``size`` pattern bytes at its base version in ``f``."""
    n = node(ino, size)
    f.content[(ino, ())] = data = pattern(size, seed)
    return n, data


async def read_all(buf: ChunkBuffers, n: Inode, step: int) -> bytes:
    out = bytearray()
    for off in range(0, n.size, step):
        out += await buf.read(n, off, step)
    return bytes(out)


@sync
async def test_sequential_reads_fetch_whole_chunks_once_with_readahead():
    f = Files()
    n, data = stored(f, 1, 10 * CS + 100, 0)
    b = ChunkBuffers(f.fetch, CS, budget=64 * CS, ahead=2)
    assert await read_all(b, n, 256) == data
    # The first read (offset 0, nothing known yet) is a direct range read;
    # from the second on, whole chunks, each fetched exactly once.
    assert f.calls[0] == (1, 0, 256)
    chunk_calls = sorted(c for c in f.calls[1:])
    assert chunk_calls == [(1, i * CS, min(CS, n.size - i * CS)) for i in range(11)]


@sync
async def test_random_reads_fetch_only_their_range():
    f = Files()
    n, data = stored(f, 2, 8 * CS, 3)
    b = ChunkBuffers(f.fetch, CS, budget=64 * CS)
    for off in (5 * CS + 10, 1 * CS + 3, 7 * CS, 2 * CS + 500):
        assert bytes(await b.read(n, off, 100)) == data[off:off + 100]
    assert all(length == 100 for _, _, length in f.calls)


@sync
async def test_a_new_chunk_version_is_never_answered_from_an_old_buffer():
    f = Files()
    old = node(3, 4 * CS)
    f.content[(3, ())] = pattern(old.size, 1)
    b = ChunkBuffers(f.fetch, CS, budget=64 * CS)
    await read_all(b, old, 512)                       # chunks buffered at the base version
    new = node(3, 4 * CS, {1: 77})                    # chunk 1 rewritten (version 77)
    f.content[(3, ((1, 77),))] = changed = pattern(new.size, 9)
    got = await read_all(b, new, 512)
    # Chunk 1 comes from the new version; the others are unchanged versions.
    assert got[CS:2 * CS] == changed[CS:2 * CS]
    assert got[:CS] == pattern(old.size, 1)[:CS]


@sync
async def test_a_read_past_a_short_buffer_refetches():
    f = Files()
    short = node(4, CS + 10)
    f.content[(4, ())] = pattern(4 * CS, 2)
    b = ChunkBuffers(f.fetch, CS, budget=64 * CS)
    await read_all(b, short, 5)                       # chunk 1 buffered as 10 bytes
    grown = node(4, 2 * CS)
    assert bytes(await b.read(grown, CS, CS)) == pattern(4 * CS, 2)[CS:2 * CS]


@sync
async def test_budget_bounds_buffered_bytes_and_failures_are_not_kept():
    f = Files()
    n, data = stored(f, 5, 20 * CS, 4)
    b = ChunkBuffers(f.fetch, CS, budget=4 * CS, ahead=2)
    assert await read_all(b, n, 512) == data
    assert b._bytes <= 4 * CS
    b.forget(5)
    assert b._bytes == 0
    f.fail = 10
    with pytest.raises(OSError):
        await b.read(n, 0, 512)
    with pytest.raises(OSError):
        await b.read(n, 512, 512)                     # sequential: chunk fetch fails
    f.fail = 0
    assert bytes(await b.read(n, 1024, 512)) == data[1024:1536]


@sync
async def test_concurrent_readers_of_one_chunk_share_one_fetch():
    f = Files()
    n, data = stored(f, 6, 2 * CS, 5)
    b = ChunkBuffers(f.fetch, CS, budget=64 * CS, ahead=0)
    await b.read(n, 0, 100)                           # the stream starts
    f.gate = asyncio.Event()
    reads = [asyncio.ensure_future(b.read(n, 100 + 100 * k, 100)) for k in range(5)]
    await asyncio.sleep(0)
    f.gate.set()
    got = await asyncio.gather(*reads)
    assert [bytes(g) for g in got] == [data[100 + 100 * k:200 + 100 * k] for k in range(5)]
    assert f.calls.count((6, 0, CS)) == 1
