"""Whole-chunk read buffering and readahead in the mount.

The kernel sends a sequential reader's reads as requests of at most the
readahead window (objcache/fuse/readahead.py). Answering each with its own
RPC to the chunk's owner costs a round trip per 128 KiB-1 MiB; instead, a
read that continues a sequential stream fetches its whole chunk (one RPC)
and starts fetching the next ``ahead`` chunks, which sit on other owners
and arrive in parallel; the following requests are slices of the buffered
chunks (zero-copy: pyfuse3 replies from any buffer).

Reads that do not continue a stream (random access: sqlite pages, a
safetensors header) fetch just their range: a whole 8 MiB chunk for a 4 KiB
page would waste the link.

Invariants:
* A buffered chunk is keyed by (inode, chunk index, chunk version). A chunk
  version names one content for good (versions only grow within an epoch,
  and an epoch's versions start at ``epoch << 32``), so a buffer can never
  answer with stale bytes: a write here, a flush elsewhere seen at open, or
  a reload under a new ETag all change the version the read asks for.
* A buffer holds the chunk's bytes up to the file's size when fetched; a
  read past that (the file grew) is a miss.
* The buffers of all files together hold at most ``budget`` bytes (least
  recently used dropped first); fetches in flight count too.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

from objcache.meta.model import Inode

# The buffers count in the mount's fixed memory overhead (docs/fuse.md,
# "Memory"): 64 MiB is four chunks ahead for two sequential readers at
# once; more readers share it (least recently used dropped first).
DEFAULT_BUDGET = 64 << 20
DEFAULT_AHEAD = 3


class _Stream:
    """One file's sequential-read state (per inode in the mount)."""
    __slots__ = ("next_offset",)

    def __init__(self):
        self.next_offset = -1


class ChunkBuffers:
    """Chunk-sized read buffers shared by the mount's open files."""

    def __init__(self, fetch, chunk_size: int, *, budget: int = DEFAULT_BUDGET,
                 ahead: int = DEFAULT_AHEAD):
        self._fetch = fetch                  # async (node, offset, length) -> bytes-like
        self.chunk_size = chunk_size
        self.budget = max(budget, chunk_size * (ahead + 1))
        self.ahead = ahead
        # (inode, index, version) -> (Future of memoryview, length); LRU order
        self._chunks: OrderedDict[tuple, tuple[asyncio.Future, int]] = OrderedDict()
        self._bytes = 0
        self._streams: dict[int, _Stream] = {}
        self.hits = self.misses = self.direct = 0

    def forget(self, inode: int) -> None:
        """The file's last open closed: drop its stream and buffers."""
        self._streams.pop(inode, None)
        for key in [k for k in self._chunks if k[0] == inode]:
            self._drop(key)

    async def read(self, node: Inode, offset: int, length: int):
        """Bytes [offset, offset+length) of the file as ``node`` describes it
        (size and chunk versions, including this mount's unpublished writes)."""
        end = min(node.size, offset + length)
        if offset >= end:
            return b""
        cs = self.chunk_size
        stream = self._streams.get(node.id)
        if stream is None:
            stream = self._streams[node.id] = _Stream()
        first, last = offset // cs, (end - 1) // cs
        sequential = offset == stream.next_offset or any(
            self._key(node, i) in self._chunks for i in range(first, last + 1))
        stream.next_offset = end
        if not sequential:
            self.direct += 1
            return await self._fetch(node, offset, end - offset)
        for i in range(last + 1, last + 1 + self.ahead):
            if i * cs < node.size:
                self._start(node, i)
        parts = []
        for i in range(first, last + 1):
            buf = await self._chunk(node, i)
            lo = max(offset, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            if hi > len(buf):                      # fetched when the file was shorter
                self._drop(self._key(node, i))
                buf = await self._chunk(node, i)
            parts.append(buf[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- buffers ----------------------------------------------------------------

    @staticmethod
    def _key(node: Inode, index: int) -> tuple:
        return (node.id, index, node.chunk_version(index))

    async def _chunk(self, node: Inode, index: int) -> memoryview:
        key = self._key(node, index)
        entry = self._chunks.get(key)
        if entry is None:
            self.misses += 1
            fut = self._start(node, index)
        else:
            self.hits += 1
            fut = entry[0]
            self._chunks.move_to_end(key)
        return await asyncio.shield(fut)

    def _start(self, node: Inode, index: int) -> asyncio.Future:
        key = self._key(node, index)
        entry = self._chunks.get(key)
        if entry is not None:
            return entry[0]
        cs = self.chunk_size
        length = min(cs, node.size - index * cs)
        while self._chunks and self._bytes + length > self.budget:
            self._drop(next(iter(self._chunks)))
        fut = asyncio.ensure_future(self._load(node, index * cs, length))
        self._chunks[key] = (fut, length)

        def done(f: asyncio.Future) -> None:
            # A failed fetch is not kept: the next read of the chunk tries
            # again (its waiters, if any, get the error).
            if f.cancelled() or f.exception() is not None:
                if self._chunks.get(key, (None,))[0] is f:
                    self._drop(key)
        fut.add_done_callback(done)
        self._bytes += length
        return fut

    async def _load(self, node: Inode, offset: int, length: int) -> memoryview:
        return memoryview(await self._fetch(node, offset, length)).cast("B")

    def _drop(self, key: tuple) -> None:
        entry = self._chunks.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
            # A fetch in flight finishes and is discarded: readers awaiting
            # it still get its bytes (they hold the future).

