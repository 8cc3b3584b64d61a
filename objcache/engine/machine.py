"""A group's Raft state machine: the pure metadata/chunk records
(meta/state.py) plus their effects on the node's chunk cache.

Chunk data rides in Raft entries (``cwrite``/``cbase``) and is applied into
the cache's disk tier as a dirty chunk version, durably (the cache fsyncs
dirty chunks before ``write`` returns), so a snapshot taken later — which
compacts those entries away — never depends on data that only the log had.
Replays after a restart re-apply entries after the snapshot: an effect
whose version the cache already holds — or a newer one, since a newer dirty
version replaces the older ones on disk — is a no-op (``_have``).

Apply order is the log order on every replica; an effect that fails (the
disk died) raises, which stops the replica (driver: fatal), because its
records would otherwise claim data it does not have.

Snapshots received from the leader (``prepare_restore``): a snapshot
carries the records, not the chunk bytes, and the entries it replaces are
the ones that brought a lagging replica its dirty chunks. So before the core
sees the snapshot, the replica fetches from the sender every dirty version
the snapshot names that its cache lacks (``fetch_chunk``, set by the node;
the sender answers with ``chunk_for_peer``: the version or a newer one, or
"gone" when its own records have moved past it — cleaned, spilled,
superseded, dropped — so that the entries after the snapshot bring the
rest) and stores it durably. A fetch that fails refuses the snapshot; the
leader sends it again later. Clean and spilled versions are not fetched:
the bucket (the object, a spill object) holds them.

Reconciliation after a restart (``reconcile``): the cache's removals are
not durable when they return, so a crash can bring back a dirty version
that a ``cdrop`` (or a superseding write) had removed. Dirty versions are
never evicted, so such a file would hold disk budget forever. Once the
replica has applied its whole log as it was at start (every version it
ever cached came from an entry in that log, so nothing applied later can
claim an older file), a dirty version of a chunk with no record is
discarded.
"""
from __future__ import annotations

import msgpack

from objcache.meta.state import GroupState, evictable, spill_of


class GroupMachine:
    def __init__(self, group_id: int, cache, chunk_size: int, fetch_chunk=None, store=None):
        self.group_id = group_id
        self.store = store                  # ObjectStore: spill objects (chunk_for_peer)
        self.state = GroupState(group_id)
        self.cache = cache
        self.chunk_size = chunk_size
        # async (sender node, (inode, index), version) -> (version, bytes) |
        # None ("gone"): a chunk version from the replica that sent a
        # snapshot (prepare_restore). None: snapshots name no chunks to fetch
        # (a group of one replica never receives one).
        self.fetch_chunk = fetch_chunk

    # StateMachine API ---------------------------------------------------

    def apply(self, entry):
        try:
            cmd = msgpack.unpackb(entry.data, use_list=True)
        except Exception:  # noqa: BLE001 - the pure state answers EINVAL
            return self.state.apply_data(entry.data, entry.index)
        if isinstance(cmd, list) and cmd and cmd[0] in ("cwrite", "cbase", "cdrop", "cclean",
                                                        "cspill", "cput"):
            return self._apply_chunk(cmd, entry.index)
        return self.state.apply_command(cmd, entry.index)

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.state.restore(data)

    async def prepare_restore(self, data: bytes, sender: int) -> int:
        """Fetch the dirty chunk versions snapshot ``data`` names and this
        replica's cache lacks (see the module docstring); returns how many
        were fetched."""
        incoming = GroupState(self.group_id)
        incoming.restore(data)
        missing = [(key, rec[0]) for key, rec in incoming.chunks.items()
                   if not evictable(rec) and not self._have(key, rec[0])]
        if missing and self.fetch_chunk is None:
            raise RuntimeError(f"group {self.group_id}: a snapshot names {len(missing)} "
                               f"dirty chunks this replica lacks, and it has no peer "
                               f"to fetch them from")
        fetched = 0
        for key, version in missing:
            got = await self.fetch_chunk(sender, key, version)
            if got is None or self._have(key, got[0]):
                continue                    # moved on at the sender; later entries bring it
            await self.cache.write(key, got[0], got[1], dirty=True, admitted=True)
            fetched += 1
        return fetched

    async def chunk_for_peer(self, key, version: int) -> tuple[int, bytes] | None:
        """For a replica installing our snapshot: chunk ``key`` at our
        record's version (``version`` or newer: the entries after the
        snapshot build on it) from the cache, else from its spill object;
        None when the record is gone (dropped) or clean and evicted (the
        bucket object holds it)."""
        rec = self.state.chunks.get(key)
        if rec is None:
            return None
        if rec[0] < version:
            self._missing(key, version, rec)
        got = self.cache.peek(key)
        if got is not None and got[0] >= rec[0]:
            view = await self.cache.read(key, got[0], None)
            try:
                return got[0], bytes(view.data)
            finally:
                view.release()
        loc = spill_of(rec, rec[0])
        if loc is not None and self.store is not None:
            data = await self.store.get_range(loc[0], 0, rec[1], if_match=loc[1])
            return rec[0], bytes(data)
        if rec[2]:
            return None
        self._missing(key, version, rec)

    def _missing(self, key, version: int, rec) -> None:
        raise LookupError(f"group {self.group_id}: chunk {key} v{version} asked for by a "
                          f"replica is not in this cache (record {rec})")

    # effects ------------------------------------------------------------

    def unreferenced_dirty(self) -> list[tuple[tuple[int, int], int]]:
        """Dirty cached versions of chunks the records do not have (only
        meaningful once the log as it was at start is applied)."""
        return [(key, version) for key, version, _length in self.cache.dirty_chunks()
                if key not in self.state.chunks]

    def reconcile(self) -> int:
        """Discard the dirty versions no record references; returns how
        many. Versions whose record says the bucket or a spill object holds
        them are marked clean again (the cache's clean flag is not durable:
        a crash brings such a file back dirty, holding budget)."""
        stale = self.unreferenced_dirty()
        for key, _version in stale:
            self.cache.discard(key)
        for key, version, _length in self.cache.dirty_chunks():
            rec = self.state.chunks.get(key)
            if rec is not None and rec[0] == version and evictable(rec):
                self.cache.mark_clean(key, version)
        return len(stale)

    def _have(self, key, version: int) -> bool:
        """The cache holds ``version`` of ``key`` or a newer one (replay)."""
        got = self.cache.peek(key)
        return got is not None and got[0] >= version

    async def _apply_chunk(self, cmd: list, index: int):
        r = self.state.apply_command(cmd, index)
        if r[0] != "ok":
            return r
        kind = cmd[0]
        if kind == "cwrite":
            _, inode, idx, offset, data, _size, _eb = cmd
            version, base_v, _length = r[1], r[2], r[3]
            if self._have((inode, idx), version):
                return r
            base = None
            if base_v:
                base = await self.cache.read((inode, idx), base_v, None)
            try:
                await self.cache.write((inode, idx), version, data, offset=offset,
                                       base=base, dirty=True, admitted=True)
            finally:
                if base is not None:
                    base.release()
        elif kind == "cbase":
            inode, idx, data = cmd[1], cmd[2], cmd[3]     # (+ eb, and of since re-base)
            if r[3] and not self._have((inode, idx), r[1]):   # a new local base
                await self.cache.write((inode, idx), r[1], data, dirty=True, admitted=True)
        elif kind == "cclean":
            _, inode, idx, version = cmd
            self.cache.mark_clean((inode, idx), version)
        elif kind == "cput":
            # The new version lives in its spill object only; older cached
            # versions of the chunk are superseded (a dirty one would stay
            # pinned otherwise). A newer one (fetched with a snapshot) stays.
            got = self.cache.peek((cmd[1], cmd[2]))
            if got is not None and got[0] < r[1]:
                self.cache.discard((cmd[1], cmd[2]))
        elif kind == "cspill":
            if r[1]:                                # the spill object holds it: evictable
                self.cache.mark_clean((cmd[1], cmd[2]), cmd[3])
        elif kind == "cdrop":
            inode = cmd[1]
            for c in r[1]:
                self.cache.discard((inode, c))
        return r
