"""An in-process engine: G metadata+data groups (R replicas each) with real
chunk caches on disk, an in-memory bucket, a Namespace and a DataClient."""
from __future__ import annotations

import asyncio

from objcache.backend.memory import MemoryStore
from objcache.cache import ChunkCache
from objcache.cache.disk import file_size
from objcache.cluster.ring import Ring
from objcache.engine.data import ChunkService, DataClient
from objcache.engine.machine import GroupMachine
from objcache.engine.spill import Spiller
from objcache.meta.namespace import Namespace
from objcache.txn.local import LocalCluster

CHUNK = 1 << 20     # small chunks keep tests fast; the code paths are the same


class Engine:
    def __init__(self, tmp_path, groups=3, replicas=1, store=None, chunk=CHUNK, options=None,
                 disk_chunks=256, spill=False):
        self.tmp = tmp_path
        self.disk_chunks = disk_chunks
        # spill: each replica gets a Spiller (engine/spill.py), used by its
        # ChunkService for write-through; the test runs their loops.
        self.spill = spill
        self.spillers: dict[tuple[int, int], Spiller] = {}
        self.store = store or MemoryStore("bucket")
        self.chunk = chunk
        self.caches: dict[tuple[int, int], ChunkCache] = {}
        self.machines: dict[tuple[int, int], GroupMachine] = {}
        self.ring = Ring(range(1, groups + 1))
        self.cluster = LocalCluster(groups, replicas, machine_factory=self._machine,
                                    on_start=self._service,
                                    **({"options": options} if options else {}))

    def _machine(self, g, node):
        cache = self.caches.get((g, node))
        if cache is None:
            cache = ChunkCache(str(self.tmp / f"cache-{g}-{node}"), memory_bytes=16 * self.chunk,
                               disk_bytes=self.disk_chunks * file_size(self.chunk),
                               chunk_size=self.chunk)
            self.caches[(g, node)] = cache
            self._to_open.append(cache)

        async def fetch(sender, key, version):      # a snapshot's chunks, from its sender
            return await self.machines[(g, sender)].chunk_for_peer(key, version)
        m = self.machines[(g, node)] = GroupMachine(g, cache, self.chunk, fetch_chunk=fetch,
                                                    store=self.store)
        return m

    def _service(self, g, node, rg):
        spiller = None
        if self.spill:
            spiller = self.spillers[(g, node)] = Spiller(
                rg, self.store, self.chunk, owner_of=lambda key: self.ring.chunk_owner(*key))
        return ChunkService(rg, self.store, self.chunk, spiller=spiller)

    async def start(self):
        self._to_open = []
        # Caches must be open before the groups replay into them: create the
        # machines first, open the caches, then start the groups.
        for g in self.cluster.group_ids:
            for r in range(1, self.cluster.replicas + 1):
                self._machine(g, self.cluster._node_id(g, r))
        for c in self._to_open:
            await c.open()
        await self.cluster.start()
        self.ns = Namespace(self.cluster, lambda: self.ring, self.store,
                            default_uid=1000, default_gid=1000)
        self.data = DataClient(self.cluster.service, lambda: self.ring, self.cluster,
                               chunk_size=self.chunk)
        await self.ns.ensure_root()
        return self

    async def close(self):
        await self.cluster.close()
        for c in self.caches.values():
            await c.close()
