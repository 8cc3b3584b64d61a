"""The data path: chunk reads and writes at their owners, and the client
side that splits file I/O into chunks.

Owner side (``ChunkService``, on the leader of the group owning a chunk):

* read(version): from the node's cache (memory, then disk); on a miss, the
  bucket — a ranged GET straight into a cache page, with If-Match on the
  inode's ETag — but only for versions the bucket holds (the epoch's base
  version, or any version of an inode whose data is all uploaded). The
  cache single-flights loads, and only the owner loads a chunk, so
  concurrent misses anywhere in the cluster cost ONE GET per chunk.
  Sequential readers get readahead of the next chunks.
* write(offset, data): one Raft entry in the owner's group (``cwrite``) —
  durable in the cluster when it returns; a partial write over a chunk
  only the bucket has first ships the bucket's content as the base
  (``cbase``).

Client side (``DataClient``): splits reads and writes at chunk boundaries,
calls the owners concurrently, and publishes writes with a flush
transaction at the inode's group (new size + chunk versions: ``flush``).
"""
from __future__ import annotations

import asyncio
import errno
import time

import msgpack

from objcache.backend.base import PreconditionFailed
from objcache.meta.model import Inode
from objcache.meta.state import covers, evictable, spill_of
from objcache.raft.types import NotLeader
from objcache.txn.coordinator import new_txn_id

# Readahead for a read ending in chunk i: the owner of i loads its own next
# chunks among i+1 .. i+READAHEAD_SPAN, at most READAHEAD_PER_OWNER of
# them; every owner does the same for the reads that reach it. Measured
# (bench/macro/cluster_read.py, RGW on the same 2 cores): with 8 reads in
# flight on the client, spans 6 and 16 gave the same cold throughput
# within noise — RGW's CPU is the limit there; the span matters when the
# client keeps fewer reads in flight than the S3 link needs.
READAHEAD_SPAN = 16
READAHEAD_PER_OWNER = 4

DEFAULT_CHUNK = 8 << 20


class ChunkService:
    """Serves the chunks of one group on this node (its leader)."""

    def __init__(self, group, store, chunk_size: int, *, readahead: int = 4, spiller=None):
        self.group = group                          # RaftGroup running a GroupMachine
        self.store = store
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.spiller = spiller                      # engine/spill.py: write-through

    @property
    def machine(self):
        return self.group.sm

    def _loader(self, key: str, etag: str, start: int, length: int):
        async def load(into):
            try:
                return await self.store.get_range(key, start, length, into=into,
                                                  if_match=etag)
            except PreconditionFailed:
                raise OSError(errno.ESTALE, f"{key!r} changed in the bucket "
                                            f"(ETag is no longer {etag})") from None
        return load

    async def read(self, inode: int, index: int, version: int, *, s3: list | None,
                   from_bucket: bool, size: int, ahead: list | None = None, base: int = -1):
        """A pinned view of chunk ``index`` at ``version``. ``s3`` =
        [key, etag] of the object holding the inode's uploaded data;
        ``from_bucket``: the bucket holds this version (may load from it);
        ``size``: the file's size (bounds the range); ``ahead``: the next
        [index, version] pairs to read ahead; ``base``: the inode's
        bucket-content version (a chunk still at it with no object is a
        hole: None is returned and the reader sees zeros)."""
        if not self.group.is_leader:
            raise NotLeader(self.group.leader)
        cache = self.machine.cache
        chunks = self.machine.state.chunks
        cs = self.chunk_size
        start = index * cs
        length = max(0, min(cs, size - start))

        def loader_for(i, v):
            spill = spill_of(chunks.get((inode, i)), v)
            if spill is not None:                   # its own object (engine/spill.py)
                return self._loader(spill[0], spill[1], 0, chunks[(inode, i)][1])
            if not from_bucket or s3 is None:
                return None                         # must be local (dirty chunks are pinned)
            st = i * cs
            return self._loader(s3[0], s3[1], st, max(0, min(cs, size - st)))

        if length == 0:
            return None
        ra = [((inode, i), v, loader_for(i, v)) for i, v in (ahead or [])
              if loader_for(i, v) is not None]
        loader = loader_for(index, version)
        if version == base and s3 is None and loader is None:
            return None                             # never written, no object: a hole
        try:
            return await cache.read((inode, index), version, loader, readahead=ra)
        except LookupError:
            raise OSError(errno.ESTALE, f"chunk {index} v{version} of inode {inode} "
                                        f"is not here and not in the bucket") from None

    async def write(self, inode: int, index: int, offset: int, data, *, epoch_base: int,
                    s3: list | None, s3_size: int) -> int:
        """Write ``data`` at ``offset`` in chunk ``index``; returns the new
        chunk version once it is committed in the group (durable).

        A partial write needs its base in every replica's cache. The base
        is shipped in the log (``cbase``, the whole chunk) when it is the
        bucket's content or a clean local version (write-back stored it,
        so any replica may have evicted it); the group's state refuses a
        partial write over a clean version (EAGAIN), which closes the race
        with a ``cclean`` committed between this check and the write."""
        if not self.group.is_leader:
            raise NotLeader(self.group.leader)
        cs = self.chunk_size
        st = self.machine.state
        if offset == 0 and self.spiller is not None and self.spiller.write_through(len(data)):
            return await self.spiller.put_chunk(inode, index, data, epoch_base=epoch_base)
        in_bucket = max(0, min(cs, s3_size - index * cs)) if s3 else 0
        end = offset + len(data)
        for _ in range(8):
            rec = st.chunks.get((inode, index))
            has_local = rec is not None and rec[0] >= epoch_base
            # Admission: a full disk tier answers this writer ENOSPC (after
            # waiting for write-back); once proposed, the apply must not fail.
            await self.machine.cache.wait_for_dirty_room(
                max(end, rec[1] if has_local else 0, in_bucket))
            rec = st.chunks.get((inode, index))     # (the wait may have changed it)
            has_local = rec is not None and rec[0] >= epoch_base
            if has_local and evictable(rec) and not covers(offset, len(data), rec[1]):
                base = await self._content(inode, index, rec[0], rec[1], s3, s3_size)
                r = await self.group.propose(msgpack.packb(
                    ["cbase", inode, index, base, epoch_base, rec[0]]))
                _check(r, "cbase")
            elif not has_local and in_bucket and not covers(offset, len(data), in_bucket):
                base = await self._content(inode, index, epoch_base, in_bucket, s3, s3_size)
                r = await self.group.propose(msgpack.packb(
                    ["cbase", inode, index, base, epoch_base, None]))
                _check(r, "cbase")
            r = await self.group.propose(msgpack.packb(
                ["cwrite", inode, index, offset, bytes(data), cs, epoch_base]))
            if r[0] == "err" and r[1] == errno.EAGAIN:
                continue                            # cleaned meanwhile: re-base
            return _check(r, "cwrite")[1]
        raise OSError(errno.EAGAIN, f"chunk {index} of inode {inode}: its base kept "
                                    f"changing under the write")

    async def _content(self, inode: int, index: int, version: int, length: int,
                       s3: list | None, s3_size: int) -> bytes:
        """Chunk ``version``'s bytes: from the cache, or (a clean version,
        evicted) from the object, which holds it (only clean versions are
        evicted, and the inode's object holds its clean versions)."""
        cs = self.chunk_size
        loader = None
        spill = spill_of(self.machine.state.chunks.get((inode, index)), version)
        if spill is not None:
            loader = self._loader(spill[0], spill[1], 0, length)
        elif s3:
            loader = self._loader(s3[0], s3[1], index * cs,
                                  max(0, min(length, s3_size - index * cs)))
        try:
            view = await self.machine.cache.read((inode, index), version, loader)
        except LookupError:
            raise OSError(errno.ESTALE, f"chunk {index} v{version} of inode {inode} "
                                        f"is not here and not in the bucket") from None
        try:
            return bytes(view.data)
        finally:
            view.release()


def _check(r: list, what: str) -> list:
    if r[0] != "ok":
        raise OSError(r[1], f"{what}: {r[2]}")
    return r


class DataClient:
    """File I/O over the owners. ``services(group)`` returns the leader's
    ChunkService (in-process) or an RPC proxy with the same methods."""

    def __init__(self, services, ring, router, chunk_size: int = DEFAULT_CHUNK,
                 clock=time.time):
        self.services = services
        self.ring = ring
        self.router = router
        self.chunk_size = chunk_size
        self.clock = clock

    async def _owner(self, inode: int, index: int):
        return await self.services(self.ring().chunk_owner(inode, index))

    async def read(self, node: Inode, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of the file as ``node`` describes it
        (a getattr result: size and chunk versions): bytes, or a memoryview
        the caller owns when one remote chunk answered it all (no copy)."""
        end = min(node.size, offset + length)
        if offset >= end:
            return b""
        cs = self.chunk_size
        first, last = offset // cs, (end - 1) // cs
        s3 = [node.s3.key, node.s3.etag] if node.s3 else None
        from_bucket = not node.dirty

        ring = self.ring()

        base = node.base_version()
        # The bucket's object may be shorter than the file (extended by a
        # truncate): past its end, a base-version chunk is a hole.
        s3_end = node.s3.size if node.s3 else 0

        async def one(i):
            v = node.chunk_version(i)
            lo = max(offset, i * cs) - i * cs
            hi = min(end, (i + 1) * cs) - i * cs
            if v == base and i * cs >= s3_end:
                return bytes(hi - lo)               # a hole: no object data there
            # Readahead at the owner: only chunks the same group owns (a
            # chunk is only ever loaded by its owner — one GET per chunk).
            owner = ring.chunk_owner(node.id, i)
            ahead = [[j, node.chunk_version(j)] for j in range(i + 1, i + 1 + READAHEAD_SPAN)
                     if j * cs < node.size and ring.chunk_owner(node.id, j) == owner
                     and (node.chunk_version(j) != base or j * cs < s3_end)
                     ][:READAHEAD_PER_OWNER] if i == last else None
            for attempt in range(20):
                svc = await self._owner(node.id, i)
                try:
                    # A remote owner sends only the bytes wanted.
                    kw = {"want": (lo, hi)} if getattr(svc, "ranged", False) else {}
                    view = await svc.read(node.id, i, v, s3=s3,
                                          from_bucket=from_bucket or v == base,
                                          size=min(node.size, s3_end) if v == base
                                          else node.size, ahead=ahead, base=base, **kw)
                    break
                except NotLeader:
                    await asyncio.sleep(0.005 * (attempt + 1))
            else:
                raise OSError(errno.EAGAIN, "no leader for the chunk's group")
            if view is None:
                return bytes(hi - lo)               # a hole: never written, not in the bucket
            try:
                # A view of a remote answer is ours alone: sliced, not copied.
                a, b = lo - view.start, hi - view.start
                got = view.data[a:b] if view.owned else bytes(view.data[a:b])
            finally:
                view.release()
            if len(got) < hi - lo:
                # Past the chunk's stored length (a sparse tail): zeros.
                got = bytes(got) + bytes((hi - lo) - len(got))
            return got

        parts = await asyncio.gather(*(one(i) for i in range(first, last + 1)))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    async def write(self, node: Inode, offset: int, data) -> dict[int, int]:
        """Write ``data`` at ``offset``; returns {chunk index: new version}
        for the flush. Durable in the cluster when it returns (each chunk's
        write is committed in its owner group); visible to others after
        ``flush``."""
        data = memoryview(data).cast("B")
        cs = self.chunk_size
        s3 = [node.s3.key, node.s3.etag] if node.s3 else None
        s3_size = node.s3.size if node.s3 else 0
        pieces = []
        pos = 0
        while pos < len(data):
            at = offset + pos
            i, o = divmod(at, cs)
            n = min(cs - o, len(data) - pos)
            pieces.append((i, o, data[pos:pos + n]))
            pos += n

        async def one(i, o, piece):
            for attempt in range(20):
                svc = await self._owner(node.id, i)
                try:
                    return i, await svc.write(node.id, i, o, piece,
                                              epoch_base=node.base_version(), s3=s3,
                                              s3_size=s3_size)
                except NotLeader:
                    await asyncio.sleep(0.005 * (attempt + 1))
            raise OSError(errno.EAGAIN, "no leader for the chunk's group")

        # Pieces of the same chunk must go in order (each builds on the
        # last version); different chunks go concurrently.
        by_chunk: dict[int, list] = {}
        for i, o, piece in pieces:
            by_chunk.setdefault(i, []).append((o, piece))

        async def chunk(i, items):
            v = None
            for o, piece in items:
                _, v = await one(i, o, piece)
            return i, v

        return dict(await asyncio.gather(*(chunk(i, items) for i, items in by_chunk.items())))

    async def truncate(self, node: Inode, size: int, versions: dict[int, int]) -> Inode:
        """flush(truncate=True), after zeroing the rest of the chunk that
        the new end falls in when shrinking into its middle, and after the
        owners forget every chunk past it (``cdrop`` in every group: a
        chunk's owner is wherever the ring puts it) — so that a later
        extension or write there reads zeros, as POSIX wants, not old
        bytes (fsx, 24 MiB file: a write into a cut-away chunk built on
        its old local version)."""
        versions = dict(versions)
        cs = self.chunk_size
        if size < node.size and size % cs:
            end = min(node.size, (size // cs + 1) * cs)
            versions.update(await self.write(node, size, bytes(end - size)))
        drop_from = -(-size // cs)
        if size < node.size and node.size > drop_from * cs:
            await asyncio.gather(*(self._drop(g, node.id, drop_from)
                                   for g in self.ring().groups))
        return await self.flush(node, size, versions, truncate=True)

    async def _drop(self, group: int, inode: int, from_index: int) -> None:
        _check(await self.router.propose(group, ["cdrop", inode, from_index, True]), "cdrop")

    async def flush(self, node: Inode, size: int, versions: dict[int, int], *,
                    truncate: bool = False) -> Inode:
        """Publish a new size and chunk versions at the inode's group (one
        transaction): after this, every reader sees the new data."""
        now = int(self.clock() * 1e9)
        drop_from = -(-size // self.chunk_size) if truncate else None
        if drop_from is not None:                   # writes past the new end are cut too
            versions = {i: v for i, v in versions.items() if i < drop_from}
        g = self.ring().meta_owner(node.id)
        r = await self.router.propose(g, ["tx", new_txn_id(), [[
            "flush", node.id, size, sorted(versions.items()), drop_from, now]]])
        _check(r, "flush")
        return node
