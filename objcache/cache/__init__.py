"""Node-local chunk cache: a shared-memory page arena (memory tier) in front of
a directory of chunk files (disk tier), with S3-FIFO eviction, single-flight
loads, readahead and durable dirty chunks. Design and rules: docs/cache.md.

    cache = ChunkCache(dir, memory_bytes=..., disk_bytes=...)
    await cache.open()
    with await cache.read((inode, index), version, loader) as view:
        use(view.data)                      # pinned, read-only, zero-copy
    await cache.write((inode, index), version + 1, data, offset=o, base=view)
    cache.mark_clean((inode, index), version + 1)   # once S3 has it
    await cache.close()
"""
from .chunks import (DEFAULT_CHUNK_SIZE, CacheClosedError, CacheFullError, ChunkCache,
                     ChunkView, StaleVersionError)
from .disk import CorruptChunkError
from .policy import LRU, S3FIFO, make_policy, simulate

__all__ = ["ChunkCache", "ChunkView", "CacheClosedError", "CacheFullError",
           "StaleVersionError", "CorruptChunkError", "DEFAULT_CHUNK_SIZE",
           "S3FIFO", "LRU", "make_policy", "simulate"]
