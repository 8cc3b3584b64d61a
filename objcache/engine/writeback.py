"""Write-back: make the bucket hold exactly what the cluster holds.

Runs on the leader of each group, over the inodes and tombstones in that
group's state:

* a dirty file (data_version != uploaded_version) is uploaded to its key —
  a PUT, or a multipart upload with parallel parts for large files (parts
  of at least 5 MiB and at most 10,000 of them: the part size grows with
  the file) — with s3fs-compatible metadata (mode, uid, gid, mtime); then
  ``uploaded(version, key, etag)`` is committed. A write during the upload
  advanced data_version, so the inode stays dirty and goes again;
* a clean file whose key changed (a rename) is copied server-side to the
  new key (CopyObject with its metadata);
* a new directory gets its marker object (``dir/``); a symlink is an object
  whose mode has S_IFLNK and whose body is the target;
* tombstones (removed files, replaced or renamed keys, removed directory
  markers) are deleted — only if the object there is still the one the
  tombstone names (a HEAD first: a new file at the same key is never
  deleted) — and then ``untomb``-ed.

Nothing is marked clean unless the bucket returned the ETag of exactly the
version uploaded; every failure leaves the inode dirty for the next pass.

Keys still read from are never overwritten or deleted. A renamed inode
keeps taking its data from its old key until its copy is done, and a
renamed directory's objects stay under its old prefix until relocated; a
new file or directory may meanwhile take the old name. So each pass first
gathers every group's *sources* (reads.pending_sources: keys of inodes not
at their place, old prefixes of moved directories), and:

* an upload, copy or marker whose destination is another inode's source
  (or under a moved directory's old prefix) waits for a later pass;
* a tombstone whose key is a source is kept until it no longer is (the
  check is made after the tombstone's name is gated, so no rename can make
  it a source in between);
* nothing is written below a directory that is itself moved or has a moved
  ancestor (its keys are about to change): it waits for the relocation;
* two renamed inodes can wait for each other (a swap: each one's
  destination is the other's source). An inode that found its destination
  taken for PARK_AFTER passes is *parked*: its source is copied to a key
  in a hidden area (``PARKING``), it takes its data from there, and its old
  key stops being a source — which lets the other go first.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import time

import msgpack

from objcache.backend.base import CopyPart
from objcache.meta import names as nm
from objcache.meta import xattrs as xattr_codec
from objcache.meta.model import ROOT, Inode, Kind
from objcache.txn.coordinator import new_txn_id

log = logging.getLogger(__name__)

MIN_PART = 5 << 20
MAX_PARTS = 10_000
PARK_AFTER = 3


def part_size_for(size: int, chunk_size: int) -> int:
    """The multipart part size for a ``size``-byte object: a multiple of the
    chunk size, >= 5 MiB, and large enough for <= 10,000 parts."""
    need = max(MIN_PART, -(-size // MAX_PARTS))
    return -(-need // chunk_size) * chunk_size


def s3_metadata(node: Inode) -> dict[str, str]:
    md = {"mode": str(node.st_mode), "uid": str(node.uid), "gid": str(node.gid),
          "mtime": str(node.mtime_ns // 10**9)}
    if node.xattrs:
        encoded = xattr_codec.encode(node.xattrs)
        if encoded is not None:
            md[xattr_codec.METADATA_KEY] = encoded
    return md


GC_RECHECK = 30.0       # seconds between existence checks of one inode with chunks here
GC_BATCH = 256          # inodes checked per pass

class WriteBack:
    def __init__(self, group, store, data, router, *, chunk_size: int, delay: float = 5.0,
                 single_put_max: int = 16 << 20, concurrency: int = 4, clock=time.time,
                 namespace=None, current_ring=None):
        self.group = group                  # RaftGroup with a GroupMachine
        self.store = store
        self.data = data                    # DataClient
        self.router = router
        self.chunk_size = chunk_size
        self.delay = delay
        self.single_put_max = single_put_max
        self.concurrency = concurrency
        self.clock = clock
        self.ns = namespace                 # for relocating renamed directories
        # async () -> Ring read from the membership group now: the chunk
        # collector must not trust this node's copy, which can be stale (a
        # node just restarted asked the wrong group and dropped live chunks).
        self.current_ring = current_ring
        self.stats = {"uploads": 0, "copies": 0, "deletes": 0, "failures": 0, "bytes": 0,
                      "bytes_copied": 0,
                      "relocations": 0, "deferred": 0, "parked": 0, "chunks_collected": 0}
        self._gc_checked: dict[int, float] = {}     # inode -> when its existence was checked
        self._busy: set[int] = set()
        self._remote_prefix: dict[int, str] = {}
        # Per pass: key -> inodes reading from it, old prefix -> moved
        # directory (None: some group did not answer; then nothing that
        # could overwrite or delete is done this pass).
        self._sources: dict[str, set[int]] | None = {}
        self._moving: dict[str, int] = {}
        self._settled_memo: dict[int, bool] = {}
        self._taken_passes: dict[int, int] = {}    # inode -> passes its destination was taken
        self.last_deferred: dict[int, str] = {}     # inode -> why its last pass waited
        self.relocation_waits: dict[int, str] = {}  # moved directory -> why it waits

    @property
    def state(self):
        return self.group.sm.state

    async def propose(self, cmd: list) -> list:
        return await self.group.propose(msgpack.packb(cmd))

    def pending(self) -> int:
        """Inodes and tombstones this group still owes the bucket."""
        st = self.state
        return (sum(1 for n in st.inodes.values() if self._owed(n)) + len(st.tombstones)
                + sum(1 for d in st.dirs.values() if d.moved))

    def describe_pending(self, limit: int = 10) -> list[str]:
        """What this group still owes, for logs (drain, status)."""
        st = self.state
        out = [f"moved directory {d} (prefix {dr.s3_prefix!r}): "
               f"{self.relocation_waits.get(d, 'not tried yet')}"
               for d, dr in st.dirs.items() if dr.moved][:limit]
        out += [f"inode {n.id} {n.kind.name} {n.name!r} parent {n.parent} dirty={n.dirty} "
                f"s3={n.s3.key if n.s3 else None!r}: "
                f"{self.last_deferred.get(n.id, 'not tried yet')}"
                for n in st.inodes.values() if self._owed(n)][:limit]
        out += [f"tombstone {k!r}" for k in list(st.tombstones)[:limit]]
        return out[:limit]

    def _owed(self, n: Inode) -> bool:
        if n.nlink <= 0 and n.kind != Kind.DIR:
            return False                            # an orphan: no name, nothing to write
        if n.dirty:
            return True
        if n.kind == Kind.DIR or n.s3 is None or n.name == b"":
            return False
        key = self._key_of_cached(n)
        return key is not None and n.s3.key != key

    def _key_of_cached(self, n: Inode) -> str | None:
        """The key ``n`` should be at, from this group's directories or the
        prefixes of other groups' directories read this pass (None: not
        known yet — then nothing is owed until it is)."""
        d = self.state.dirs.get(n.parent)
        if d is not None:
            return d.s3_prefix + n.name.decode()
        prefix = self._remote_prefix.get(n.parent)
        return None if prefix is None else prefix + n.name.decode()

    async def _refresh_remote_prefixes(self) -> None:
        """Prefixes of parent directories living in other groups (a file
        renamed into one keeps its inode here)."""
        st = self.state
        parents = {n.parent for n in st.inodes.values()
                   if n.kind != Kind.DIR and n.parent and n.parent not in st.dirs}
        ring = self.data.ring()
        fresh = {}
        for p in parents:
            try:
                r = await self.router.read(ring.meta_owner(p), ["dirinfo", p])
            except Exception:  # noqa: BLE001 - unknown this pass
                continue
            if r[0] == "ok" and not r[5]:
                fresh[p] = r[1]
        self._remote_prefix = fresh

    async def _key_of(self, n: Inode) -> str:
        if n.kind == Kind.DIR:
            d = self.state.dirs.get(n.id)
            if d is None:
                raise OSError(errno.ENOENT, f"directory {n.id} gone")
            return d.s3_prefix
        d = self.state.dirs.get(n.parent)
        if d is not None:
            return d.s3_prefix + n.name.decode()
        g = self.data.ring().meta_owner(n.parent)
        r = await self.router.read(g, ["dirinfo", n.parent])
        if r[0] != "ok":
            raise OSError(r[1], f"parent of inode {n.id}: {r[2]}")
        return r[1] + n.name.decode()

    async def run_once(self, *, force: bool = False, only: int | None = None) -> int:
        """One pass; returns how many inodes/tombstones it finished."""
        if not self.group.is_leader:
            return 0
        if only is None:
            await self.expire_orphans()
            await self.collect_chunks_of_deleted_inodes()
        await self._refresh_remote_prefixes()
        now = self.clock()
        todo = [n.copy() for n in self.state.inodes.values()
                if (only is None or n.id == only) and n.id not in self._busy
                and self._owed(n)
                and (force or now - n.ctime_ns / 1e9 >= self.delay)]
        if not todo and not self.state.tombstones and not any(
                dr.moved for dr in self.state.dirs.values()):
            return 0                                # nothing owed: ask no other group
        await self._refresh_sources()
        self._settled_memo = {}
        sem = asyncio.Semaphore(self.concurrency)

        async def one(n):
            async with sem:
                self._busy.add(n.id)
                try:
                    return 1 if await self._write_back(n) else 0
                except Exception as exc:  # noqa: BLE001 - stays dirty, next pass retries
                    self.stats["failures"] += 1
                    if self._raced(n, exc):
                        log.info("write-back of inode %d raced with a change (%r); the "
                                 "next pass takes what is there then", n.id, exc)
                    else:
                        log.warning("write-back of inode %d failed: %r", n.id, exc)
                    return 0
                finally:
                    self._busy.discard(n.id)

        # Relocations first (they change keys), then deletions: a key removed
        # and then created again (rmdir then mkdir, unlink then create) must
        # end up holding the new object.
        done = 0
        if only is None:
            for d in [d for d, dr in self.state.dirs.items() if dr.moved]:
                done += await self._relocate(d)
            self._settled_memo = {}                 # relocations moved subdirectories
            done += await self._delete_tombstones()
        done += sum(await asyncio.gather(*(one(n) for n in todo)))
        return done

    def _raced(self, n: Inode, exc: Exception) -> bool:
        """Did the upload of ``n`` fail because the file changed under it
        (deleted, truncated, rewritten: a chunk version it read is gone, the
        inode is gone)? Such a failure resolves itself at the next pass and
        is not worth a warning."""
        cur = self.state.inodes.get(n.id)
        if cur is None or cur.data_version != n.data_version or cur.nlink <= 0:
            return True
        return isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ESTALE)

    async def expire_orphans(self) -> int:
        """Forget this group's orphans whose lease ended: their holder (a
        mount that had them open) stopped renewing — it was killed, or lost
        the cluster for a whole lease. Each ``forget`` names the lease end
        it saw, so a renewal committed meanwhile wins. Returns how many."""
        st = self.state
        now = self.clock()
        expired = [(i, until) for i, until in st.orphan_leases.items() if until < now]
        done = 0
        for ino, until in expired:
            try:
                r = await self.propose(["tx", new_txn_id(), [["forget", ino, until]]])
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.info("forgetting expired orphan %d failed: %r", ino, exc)
                continue
            if r[0] == "ok" and ino not in st.inodes:
                log.info("forgot orphan %d: its holder's lease ended %.0f s ago",
                         ino, now - until)
                done += 1
        return done

    async def collect_chunks_of_deleted_inodes(self) -> int:
        """Drop this group's chunk records and cached versions (``cdrop``)
        of inodes that no longer exist — a file deleted before write-back
        leaves dirty chunks at their owners, which are not its metadata
        group, and nothing else would ever free them (a disk tier full of
        such chunks refuses every write). Safe: an inode id is never reused,
        a chunk is only written after its inode exists, and the existence
        check is a linearizable read at the inode's group (an orphan still
        exists). Each inode is checked at most every GC_RECHECK seconds, at
        most GC_BATCH per pass. Returns how many inodes were dropped."""
        st = self.state
        now = self.clock()
        live = {ino for ino, _ in st.chunks}
        for ino in [i for i in self._gc_checked if i not in live]:
            del self._gc_checked[ino]
        todo = [i for i in live if now - self._gc_checked.get(i, -GC_RECHECK) >= GC_RECHECK]
        if not todo:
            return 0
        try:
            ring = await self.current_ring() if self.current_ring else self.data.ring()
        except Exception:  # noqa: BLE001 - no authoritative ring: collect next pass
            return 0
        dropped = 0
        for ino in todo[:GC_BATCH]:
            self._gc_checked[ino] = now
            try:
                r = await self.router.read(ring.meta_owner(ino), ["getattr", ino])
            except Exception:  # noqa: BLE001 - unknown: checked again later
                continue
            if r[0] == "err" and r[1] == errno.ENOENT:
                log.info("dropping the chunks of deleted inode %d", ino)
                await self.propose(["cdrop", ino, 0])
                dropped += 1
        self.stats["chunks_collected"] += dropped
        return dropped

    async def _refresh_sources(self) -> None:
        sources: dict[str, set[int]] = {}
        moving: dict[str, int] = {}
        try:
            for g in self.data.ring().groups:
                r = await self.router.read(g, ["sources"])
                if r[0] != "ok":
                    raise OSError(r[1], r[2])
                for key, ino in r[1]:
                    sources.setdefault(key, set()).add(ino)
                for prefix, d in r[2]:
                    moving[prefix] = d
        except Exception as exc:  # noqa: BLE001 - nothing that overwrites this pass
            log.info("gathering pending sources failed: %r", exc)
            self._sources, self._moving = None, {}
            return
        self._sources, self._moving = sources, moving

    def _taken(self, n: Inode, key: str) -> bool:
        """Is ``key`` another inode's source (or below a moved directory's
        old prefix)?"""
        if self._sources is None:
            return True
        holders = self._sources.get(key)
        if holders and holders - {n.id}:
            return True
        return any(key.startswith(p) and d != n.id for p, d in self._moving.items())

    async def _settled(self, d: int) -> bool:
        """Neither directory ``d`` nor any ancestor is moved (keys below it
        are final). Memoized for the pass."""
        memo = self._settled_memo
        path: list[int] = []
        result = True
        while True:
            if d in memo:
                result = memo[d]
                break
            path.append(d)
            info = await self._dir_moved_and_parent(d)
            if info is None or info[0]:
                result = False
                break
            if d == ROOT or not info[1] or len(path) > 4096:
                break
            d = info[1]
        for x in path:
            memo[x] = result
        return result

    async def _dir_moved_and_parent(self, d: int) -> tuple[bool, int] | None:
        dr = self.state.dirs.get(d)
        node = self.state.inodes.get(d)
        if dr is not None and node is not None:
            return dr.moved, node.parent
        g = self.data.ring().meta_owner(d)
        r = await self.router.read(g, ["dirinfo", d])
        a = await self.router.read(g, ["getattr", d])
        if r[0] != "ok" or a[0] != "ok":
            return None
        return bool(r[5]), Inode.from_wire(a[1]).parent

    async def _park(self, n: Inode) -> None:
        """Copy ``n``'s source to the parking area and read from there (see
        the module docstring: breaks a wait cycle)."""
        key = f"{nm.PARKING}{n.id}.{new_txn_id().hex()}"
        etag = await self.store.copy(n.s3.key, key, metadata=s3_metadata(n),
                                     if_match=n.s3.etag)
        r = await self.propose(["tx", new_txn_id(), [
            ["uploaded", n.id, n.uploaded_version, [key, etag, n.s3.size, self.clock()]],
            ["tombstone", n.s3.key, n.s3.etag]]])
        if r[0] != "ok":
            raise OSError(r[1], f"parking inode {n.id}: {r[2]}")
        self.stats["parked"] += 1
        self._taken_passes.pop(n.id, None)

    async def _write_back(self, n: Inode) -> bool:
        """Write ``n`` to its key; False if it has to wait for a later pass."""
        if not await self._settled(n.id if n.kind == Kind.DIR else n.parent):
            self.stats["deferred"] += 1
            self.last_deferred[n.id] = "below a moved directory"
            return False
        key = await self._key_of(n)
        if self._taken(n, key):
            self.stats["deferred"] += 1
            self.last_deferred[n.id] = (f"{key!r} is another inode's source: "
                                        f"{sorted((self._sources or {}).get(key, ()))}")
            if (n.kind != Kind.DIR and n.s3 is not None and n.s3.key != key
                    and self._sources is not None):
                k = self._taken_passes[n.id] = self._taken_passes.get(n.id, 0) + 1
                if k >= PARK_AFTER:
                    await self._park(n)
            return False
        self._taken_passes.pop(n.id, None)
        self.last_deferred.pop(n.id, None)
        version = n.data_version
        ops: list = []
        if n.kind == Kind.DIR:
            if key:                                   # the root has no marker
                etag = await self.store.put(key, b"", metadata=s3_metadata(n))
            else:
                etag = ""
            size = 0
        elif not n.dirty and n.s3 is not None and n.s3.key != key:
            etag = await self.store.copy(n.s3.key, key, metadata=s3_metadata(n),
                                         if_match=n.s3.etag)
            size = n.s3.size
            self.stats["copies"] += 1
        else:
            etag, size = await self._upload(n, key)
            self.stats["uploads"] += 1
        if n.s3 is not None and n.s3.key != key:
            ops.append(["tombstone", n.s3.key, n.s3.etag])
        if key in self.state.tombstones:
            # This upload supersedes a pending deletion of the same key.
            ops.append(["untomb", key, self.state.tombstones[key]])
        ops.insert(0, ["uploaded", n.id, version, [key, etag, size, self.clock()]])
        r = await self.propose(["tx", new_txn_id(), ops])
        if r[0] != "ok":
            if r[1] == errno.ENOENT and n.id not in self.state.inodes and key:
                # Deleted while its object was being written: that object
                # is nobody's now. Tombstone it (deleted only if no live
                # name claims the key by then: _gate), or it would come
                # back at the next start from the bucket (fsstress).
                await self.propose(["tx", new_txn_id(), [["tombstone", key, etag]]])
            raise OSError(r[1], f"recording the upload of inode {n.id}: {r[2]}")
        if n.kind == Kind.FILE:
            await self._mark_chunks_clean(n)
        return True

    async def _upload(self, n: Inode, key: str) -> tuple[str, int]:
        meta = s3_metadata(n)
        if n.kind == Kind.SYMLINK:
            body = bytes(n.target)
            return await self.store.put(key, body, metadata=meta), len(body)
        size = n.size
        if size <= self.single_put_max:
            body = await self.data.read(n, 0, size)
            if len(body) != size:
                raise OSError(errno.EIO, f"read {len(body)} of {size} bytes of inode {n.id}")
            self.stats["bytes"] += size
            return await self.store.put(key, body, metadata=meta), size
        part = part_size_for(size, self.chunk_size)
        spilled = await self._spilled_chunks(n) if part == self.chunk_size else {}
        if spilled:
            # Chunks whose published version sits in a spill object are
            # copied from it server-side (engine/spill.py); the rest is read
            # and uploaded. Parts are chunks.
            async def composed():
                for index, off in enumerate(range(0, size, part)):
                    want = min(part, size - off)
                    sp = spilled.get(index)
                    if sp is not None and sp[2] >= want:
                        self.stats["bytes_copied"] += want
                        yield CopyPart(sp[0], 0, want, sp[1])
                    else:
                        chunk = await self.data.read(n, off, want)
                        self.stats["bytes"] += len(chunk)
                        yield chunk
            etag = await self.store.multipart_compose(key, composed(), metadata=meta,
                                                      concurrency=self.concurrency)
            return etag, size

        async def parts():
            for off in range(0, size, part):
                chunk = await self.data.read(n, off, min(part, size - off))
                self.stats["bytes"] += len(chunk)
                yield chunk

        etag = await self.store.multipart_upload(key, parts(), part_size=part, metadata=meta,
                                                 concurrency=self.concurrency)
        return etag, size

    async def _spilled_chunks(self, n: Inode) -> dict[int, tuple[str, str, int]]:
        """{chunk index: (spill key, etag, length)} of ``n``'s chunks whose
        published version is in a spill object, asked of their owners."""
        ring = self.data.ring()
        by_group: dict[int, list[int]] = {}
        for index in n.chunks:
            by_group.setdefault(ring.chunk_owner(n.id, index), []).append(index)
        out = {}
        for g, indexes in by_group.items():
            r = await self.router.read(g, ["spills", n.id, sorted(indexes)])
            if r[0] != "ok":
                raise OSError(r[1], f"spilled chunks of inode {n.id}: {r[2]}")
            for index, version, length, key, etag in r[1]:
                if n.chunks.get(index) == version:
                    out[index] = (key, etag, length)
        return out

    async def _relocate(self, d: int) -> int:
        """Move a renamed directory's objects to its new prefix: once its
        parent is settled, give every entry only the bucket knows (at the
        old prefix) an inode, switch the directory to the new prefix (each
        file's write-back then copies it there; the old marker goes), and
        mark its subdirectories for relocation in turn. Returns 1 when done,
        0 to retry on a later pass."""
        if self.ns is None:
            self.relocation_waits[d] = "no namespace to list with (a WriteBack without one)"
            return 0
        st = self.state
        node = st.inodes.get(d)
        if node is None or node.parent == 0:
            self.relocation_waits[d] = "no inode record or no parent"
            return 0
        try:
            g = self.data.ring().meta_owner(node.parent)
            r = await self.router.read(g, ["dirinfo", node.parent])
            if r[0] != "ok" or r[5] or not await self._settled(node.parent):
                self.relocation_waits[d] = f"parent {node.parent} not settled: {r[:2]} {r[5] if r[0] == 'ok' else ''}"
                return 0                            # the parent relocates first
            new = r[1] + node.name.decode() + "/"
            dr = st.dirs[d]
            if not dr.listed:
                await self.ns.load_listing(d)
            for name, e in list(st.dirs[d].entries.items()):
                if e.child == 0:
                    await self.ns.lookup(d, name)
            subdirs = [e.child for e in st.dirs[d].entries.values()
                       if e.kind == Kind.DIR and e.child]
            r = await self.propose(["tx", new_txn_id(), [["setprefix", d, new]]])
            if r[0] != "ok":
                self.relocation_waits[d] = f"setprefix failed: {r}"
                return 0
            ring = self.data.ring()
            for c in subdirs:
                await self.router.propose(ring.meta_owner(c), ["tx", new_txn_id(),
                                                               [["dirmoved", c]]])
            self.stats["relocations"] += 1
            return 1
        except Exception as exc:  # noqa: BLE001 - retried on the next pass
            self.stats["failures"] += 1
            self.relocation_waits[d] = f"failed: {exc!r}"
            log.warning("relocating directory %d failed: %r", d, exc)
            return 0

    async def _mark_chunks_clean(self, n: Inode) -> None:
        ring = self.data.ring()
        for idx, v in n.chunks.items():
            g = ring.chunk_owner(n.id, idx)
            try:
                await self.router.propose(g, ["cclean", n.id, idx, v])
            except Exception as exc:  # noqa: BLE001 - only delays eviction
                log.info("marking chunk %d of inode %d clean failed: %r", idx, n.id, exc)

    async def _delete_tombstones(self, batch_size: int = 64) -> int:
        """Delete tombstoned keys, a batch at a time: gate each key's name
        (see _gate), then gather the sources afresh, then delete what no
        live entry claims and no inode still reads from, then un-gate."""
        done = 0
        items = list(self.state.tombstones.items())
        for at in range(0, len(items), batch_size):
            batch = items[at:at + batch_size]
            gates: list[tuple[int, bytes]] = []
            verdict: dict[str, str] = {}            # key -> "claimed" | "gated" | "error"
            try:
                for key, _etag in batch:
                    try:
                        g = await self._gate(key)
                    except Exception as exc:  # noqa: BLE001 - next pass retries
                        self.stats["failures"] += 1
                        log.warning("gating the deletion of %r failed: %r", key, exc)
                        verdict[key] = "error"
                        continue
                    if g == "claimed":
                        verdict[key] = "claimed"
                    else:
                        verdict[key] = "gated"
                        if g is not None:
                            gates.append(g)
                await self._refresh_sources()
                for key, etag in batch:
                    v = verdict[key]
                    if v == "error":
                        continue
                    if v == "gated":
                        if self._sources is None or key in self._sources:
                            continue                # still read from: a later pass
                        try:
                            head = await self.store.head(key)
                            if head is not None and (etag == "" or head.etag == etag):
                                await self.store.delete(key)
                                self.stats["deletes"] += 1
                        except Exception as exc:  # noqa: BLE001 - next pass retries
                            self.stats["failures"] += 1
                            log.warning("deleting %r failed: %r", key, exc)
                            continue
                    r = await self.propose(["tx", new_txn_id(), [["untomb", key, etag]]])
                    if r[0] == "ok":
                        done += 1
            finally:
                for g, txn in gates:
                    try:
                        await self.router.propose(g, ["decide", txn, False])
                    except Exception as exc:  # noqa: BLE001 - the prepare times out and aborts
                        log.info("releasing a deletion gate failed: %r", exc)
        return done

    async def _gate(self, key: str):
        """Hold the name ``key`` maps to, so that nothing creates it while
        its old object is deleted: an ``absent(dir, name)`` prepare in the
        directory's group. Returns (group, txn) to release, "claimed" when
        a live entry has the name (it owns the key: nothing is deleted),
        or None when the key's directory does not exist (then nothing can
        claim the key except by creating that directory first: a window
        of one HEAD and one DELETE, documented in docs/storage-engine.md).
        Hidden-area keys (parking, spill) have no name."""
        if key.startswith(nm.HIDDEN):
            return None
        is_marker = key.endswith("/")
        path = key[:-1] if is_marker else key
        parent_path, _, name = path.rpartition("/")
        kind = int(Kind.DIR if is_marker else Kind.FILE)
        if self.ns is None or not name:
            return None
        try:
            parent = await self._resolve_dir(parent_path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            return None
        g = self.data.ring().meta_owner(parent)
        txn = new_txn_id()
        r = await self.router.propose(g, ["prep", txn, g,
                                          [["absent", parent, name.encode(), kind]],
                                          self.clock() + 30])
        if r[0] != "ok":
            if r[1] == errno.EEXIST:
                return "claimed"
            raise OSError(r[1], r[2])
        return g, txn

    async def _resolve_dir(self, path: str) -> int:
        from objcache.meta.model import ROOT
        node = ROOT
        for part in [p for p in path.split("/") if p]:
            child = await self.ns.lookup(node, part.encode())
            if child.kind != Kind.DIR:
                raise OSError(errno.ENOTDIR, path)
            node = child.id
        return node

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive
                log.warning("write-back pass failed: %r", exc)
