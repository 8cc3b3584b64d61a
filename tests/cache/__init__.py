"""Helpers shared by the chunk cache tests (objcache/cache).

Every test runs its scenario with ``asyncio.run`` (no pytest-asyncio) and
closes its caches: ``ChunkCache.close()`` raises PagePinnedError if a test
leaked a ChunkView, and tests/conftest.py checks the extension live-object
counters after each test in debug builds.
"""
import asyncio
import struct

from objcache.cache import ChunkCache

KiB = 1 << 10
MiB = 1 << 20
#: Small chunks keep the tests fast; the cache does not care about the size
#: (the >= 5 MiB rule is the write-back layer's, for S3 multipart parts).
CS = 64 * KiB


def run(coro, timeout=60):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def pattern(key, version, length):
    """Deterministic content of chunk ``key`` at ``version``."""
    unit = struct.pack("<QQQ", key[0], key[1], version) + b"\xa5" * 8
    return (unit * (length // len(unit) + 1))[:length]


def make_cache(directory, *, pages=4, disk_chunks=64, chunk_size=CS, **kw):
    """A cache of ``pages`` memory pages and room for about ``disk_chunks``
    full chunk files."""
    from objcache.cache.disk import file_size
    kw.setdefault("correlation_window", 0.0)
    return ChunkCache(directory, memory_bytes=pages * ((chunk_size + 4095) & ~4095),
                      disk_bytes=disk_chunks * file_size(chunk_size),
                      chunk_size=chunk_size, **kw)


class Loader:
    """Counts calls; fills the page with ``pattern`` (or raises ``fail``);
    optionally waits on ``gate`` (an asyncio.Event) first."""

    def __init__(self, length=CS, gate=None, fail=None, delay=0.0):
        self.length = length
        self.gate = gate
        self.fail = fail
        self.delay = delay
        self.calls = []
        self.active = 0
        self.max_active = 0

    def __call__(self, key, version):
        async def load(into):
            self.calls.append((key, version))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                if self.gate is not None:
                    await self.gate.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.fail is not None:
                    raise self.fail
                into[:self.length] = pattern(key, version, self.length)
                return self.length
            finally:
                self.active -= 1
        return load


async def read_bytes(cache, key, version, loader=None):
    """Read a chunk and return a copy of its bytes (the view is released)."""
    with await cache.read(key, version, loader) as v:
        return bytes(v.data)
