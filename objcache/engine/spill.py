"""Spilling: dirty chunks leave a full cache for objects of their own.

A chunk owner keeps dirty chunk versions on its disk tier until write-back
has stored the file's object; they can't be evicted. A file larger than the
cache (a checkpoint) therefore filled the tier, and its writer waited for
room and then failed. So each group's leader watches its disk tier: once
the dirty part passes ``HIGH_WATER`` of the tier it *spills* full dirty
chunks — lowest (inode, index) first: the oldest part of a file written in
order — until the dirty part is under ``LOW_WATER``:

1. the version's bytes are PUT as an object of their own in the hidden
   spill area (``names.SPILL``: ``<inode>/<index>-<version>-<token>``; the
   token makes every attempt's key unique);
2. a ``cspill`` entry records the object in the chunk's record (state.py):
   from then on every replica may evict the version (machine.py marks it
   clean in its cache), and it is loaded from the object (ChunkService),
   re-based through the log before a partial write like a clean version,
   and copied server-side into the file's object at write-back
   (UploadPartCopy; writeback.py ``_upload``);
3. when the record moves on (a newer version, a drop, the file's object
   holding the version), the state tombstones the spill object and the
   group's write-back deletes it.

Durability is unchanged: a spilled version is durable in the bucket before
the entry that lets replicas evict it commits (close = durable in the
cluster: its Raft log and caches, or the spill objects they name). A crash
between the PUT and the entry leaves an object no record names (garbage in
the hidden area; ``collect_garbage`` deletes such objects of this group's
chunks: those older than ``GARBAGE_AGE``, and all of them on a new leader's
first pass and at a drain). A ``cspill`` whose
version moved on meanwhile is refused by the state, which tombstones the
object at once.

Write-through: while the tier is over the high-water mark, a write of a
whole chunk does not go through the log and the tier at all: its bytes are
PUT straight to a spill object and a small ``cput`` entry records the new
version, spilled from the start (``put_chunk``). A sequential writer of a
file larger than the cache then writes each byte once, to the bucket,
instead of to the log, the tier and then the spill object.

Only full chunks spill (every multipart part but the last must be at least
5 MiB, and a chunk part is copied whole). What cannot spill — the partial
last chunk of each file being written — stays in the tier: the budget
holds as long as that fits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import msgpack

from objcache.cache.disk import file_size
from objcache.meta import names as nm
from objcache.meta.state import evictable
from objcache.txn.coordinator import new_txn_id

log = logging.getLogger(__name__)

HIGH_WATER = 0.5        # spill once dirty bytes pass this share of the disk tier
LOW_WATER = 0.3         # ... until they are under this share
GARBAGE_AGE = 600.0     # seconds: a spill object no record names is garbage after this


def spill_key(inode: int, index: int, version: int) -> str:
    return f"{nm.SPILL}{inode}/{index}-{version}-{os.urandom(6).hex()}"


def parse_spill_key(key: str) -> tuple[int, int] | None:
    """(inode, index) of a spill key, or None."""
    if not key.startswith(nm.SPILL):
        return None
    try:
        inode, rest = key[len(nm.SPILL):].split("/", 1)
        return int(inode), int(rest.split("-", 1)[0])
    except ValueError:
        return None


class Spiller:
    """Spills this group's dirty chunks when its disk tier fills up (see the
    module docstring). Runs on every replica; acts while it is the leader."""

    def __init__(self, group, store, chunk_size: int, *, owner_of=None,
                 high_water: float = HIGH_WATER, low_water: float = LOW_WATER,
                 concurrency: int = 4):
        self.group = group                  # RaftGroup running a GroupMachine
        self.store = store
        self.chunk_size = chunk_size
        # (inode, index) -> the group owning it under the current ring (None:
        # no garbage collection, which needs it)
        self.owner_of = owner_of
        self.high_water = high_water
        self.low_water = low_water
        self.concurrency = concurrency
        self.stats = {"spilled": 0, "written_through": 0, "bytes": 0, "stale": 0,
                      "failures": 0, "garbage": 0}
        self._inflight: set[tuple[int, int]] = set()
        self._unrecorded: set[str] = set()          # spill keys PUT, cspill not applied
        self._collected_term = 0                    # leader term of the last full collection

    @property
    def cache(self):
        return self.group.sm.cache

    @property
    def state(self):
        return self.group.sm.state

    def over(self, share: float) -> bool:
        st = self.cache.stats
        return st["dirty_bytes"] > share * st["disk_capacity"]

    def candidates(self) -> list[tuple[tuple[int, int], int]]:
        """Dirty full chunks whose record is their current, unspilled version."""
        out = []
        for key, version, length in self.cache.dirty_chunks():
            rec = self.state.chunks.get(key)
            if (length == self.chunk_size and key not in self._inflight and rec is not None
                    and rec[0] == version and not evictable(rec)):
                out.append((key, version))
        return out

    async def spill_once(self) -> int:
        """Spill until the dirty part is under the low-water mark (or nothing
        more can spill); returns how many chunks were spilled."""
        if not self.group.is_leader or not self.over(self.high_water):
            return 0
        st = self.cache.stats
        excess = st["dirty_bytes"] - self.low_water * st["disk_capacity"]
        todo = self.candidates()[:max(1, -(-int(excess) // file_size(self.chunk_size)))]
        sem = asyncio.Semaphore(self.concurrency)

        async def one(key, version):
            async with sem:
                if not self.group.is_leader:
                    return 0
                self._inflight.add(key)
                try:
                    return await self._spill(key, version)
                except Exception as exc:  # noqa: BLE001 - retried by a later pass
                    self.stats["failures"] += 1
                    log.warning("spilling chunk %d of inode %d v%d failed: %r",
                                key[1], key[0], version, exc)
                    return 0
                finally:
                    self._inflight.discard(key)
        return sum(await asyncio.gather(*(one(k, v) for k, v in todo)))

    async def _spill(self, key, version: int) -> int:
        try:
            view = await self.cache.read(key, version, None)
        except LookupError:
            return 0                                # moved on meanwhile
        obj = spill_key(key[0], key[1], version)
        self._unrecorded.add(obj)
        try:
            try:
                etag = await self.store.put(obj, view.data)
                length = view.length
            finally:
                view.release()
            r = await self.group.propose(msgpack.packb(["cspill", key[0], key[1], version,
                                                        obj, etag]))
        finally:
            self._unrecorded.discard(obj)
        if r[0] != "ok":
            raise OSError(r[1], f"recording the spill: {r[2]}")
        if not r[1]:
            self.stats["stale"] += 1                # the state tombstoned the object
            return 0
        self.stats["spilled"] += 1
        self.stats["bytes"] += length
        return 1

    def write_through(self, length: int) -> bool:
        """Should a write of a whole chunk go straight to a spill object
        (``put_chunk``) instead of through the log and the disk tier? Yes
        while the tier's dirty part is over the high-water mark: that chunk
        would be spilled soon anyway, and this way its bytes are written
        once (to the bucket) instead of three times (the log, the tier, the
        spill object)."""
        return length == self.chunk_size and self.over(self.high_water)

    async def put_chunk(self, inode: int, index: int, data, *, epoch_base: int) -> int:
        """Write a whole chunk straight to a spill object and record it
        (``cput``); returns the new version. Durable in the bucket before
        the entry that names it commits."""
        obj = spill_key(inode, index, 0)
        self._unrecorded.add(obj)
        try:
            etag = await self.store.put(obj, data)
            r = await self.group.propose(msgpack.packb(
                ["cput", inode, index, len(data), obj, etag, self.chunk_size, epoch_base]))
        finally:
            self._unrecorded.discard(obj)
        if r[0] != "ok":
            self.stats["failures"] += 1
            raise OSError(r[1], f"recording a chunk written through: {r[2]}")
        self.stats["written_through"] += 1
        self.stats["bytes"] += len(data)
        return r[1]

    async def collect_garbage(self, now: float | None = None,
                              min_age: float = GARBAGE_AGE) -> int:
        """Tombstone spill objects of this group's chunks that no record
        names (a crash between a PUT and its ``cspill``) and that are at
        least ``min_age`` seconds old. Returns how many.

        Safe with ``min_age=0`` (a drain; the first pass of a new leader):
        only the leader spills, its own spills in flight are skipped
        (``_unrecorded``), and the read barrier first applies every
        ``cspill`` a former leader committed. A former leader's PUT after
        the listing leaves an object for a later pass."""
        if self.owner_of is None or not self.group.is_leader:
            return 0
        await self.group.read_barrier(timeout=10)
        now = time.time() if now is None else now
        named = {rec[3][0] for rec in self.state.chunks.values() if len(rec) > 3}
        garbage = []
        async for page in self.store.list(nm.SPILL, delimiter=None):
            for o in page.objects:
                key = parse_spill_key(o.key)
                if (key is not None and o.key not in named
                        and o.key not in self.state.tombstones
                        and o.key not in self._unrecorded
                        and now - o.mtime >= min_age
                        and self.owner_of(key) == self.group.group_id):
                    garbage.append((o.key, o.etag))
        for obj, etag in garbage:
            r = await self.group.propose(msgpack.packb(["tx", new_txn_id(),
                                                        [["tombstone", obj, etag]]]))
            if r[0] == "ok":
                self.stats["garbage"] += 1
        return len(garbage)

    async def run(self, interval: float = 0.1, garbage_every: float = 300.0) -> None:
        """Check the tier every ``interval`` seconds (a write waiting for
        room is held up by one interval at most); collect garbage every
        ``garbage_every`` seconds."""
        loop = asyncio.get_running_loop()
        next_gc = loop.time() + garbage_every
        while True:
            await asyncio.sleep(interval)
            try:
                await self.spill_once()
                term = self.group.core.term if self.group.is_leader else 0
                if term and term != self._collected_term:
                    # A new leader: what its predecessors' crashes left is
                    # garbage now (see collect_garbage).
                    self._collected_term = term
                    await self.collect_garbage(min_age=0)
                elif loop.time() >= next_gc:
                    next_gc = loop.time() + garbage_every
                    await self.collect_garbage()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive
                log.warning("spill pass failed: %r", exc)
