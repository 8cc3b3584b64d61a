"""The consistent-hash ring: which group owns a key.

Members are Raft groups, each with ``POINTS_PER_GROUP`` virtual points at
``hash64(group_id, v)``. A key hashes to ``hash64(a, b)`` and belongs to
the group of the first point at or after that hash (wrapping around):

* inode metadata and a directory's entries: ``(inode, META)``;
* chunk ``c`` of inode ``i``: ``(i, c)``.

A ring is immutable and carries its ``version``: the membership's
``ring_version``, bumped whenever the set of groups in the ring changes
(not by other membership changes: nodes joining groups outside the ring,
new addresses). Every request between cluster processes carries the
sender's ring version; a receiver with a newer ring answers
``stale_ring`` with its map, and the sender raises ``StaleRing`` (after
adopting the map) so that whatever placed keys with the old ring places
them again (docs/storage-engine.md, "Ring versions").

1024 points per group keep the most loaded group within 1.1x of the mean
for 3..32 groups (the standard deviation of a group's share is about
1/sqrt(points)); tests/cluster/test_ring.py measures it. Adding or removing
one group moves ~1/N of the keys, all to or from that group.
"""
from __future__ import annotations

import errno

import numpy as np

from objcache import _ext

POINTS_PER_GROUP = 1024
META = 2**64 - 1            # the "chunk index" of an inode's metadata key


class StaleRing(OSError):
    """This process placed a key with an older ring than its receiver's;
    the newer map has been adopted: place the key again and retry (the
    receiver did nothing). Escapes to a user as EAGAIN."""

    def __init__(self, message: str):
        super().__init__(errno.EAGAIN, message)


def ring_version(cluster: dict) -> int:
    """The ring version of a membership map (maps recorded before ring
    versions existed: their membership version, the same on every
    replica)."""
    return int(cluster.get("ring_version", cluster.get("version", 0)))


class Ring:
    __slots__ = ("version", "groups", "_table")

    def __init__(self, groups, version: int = 0, points_per_group: int = POINTS_PER_GROUP):
        groups = sorted(set(int(g) for g in groups))
        if not groups:
            raise ValueError("a ring needs at least one group")
        if any(g <= 0 for g in groups):
            raise ValueError(f"group ids must be positive: {groups}")
        self.version = version
        self.groups: tuple[int, ...] = tuple(groups)
        g = np.repeat(np.array(groups, dtype=np.uint64), points_per_group)
        v = np.tile(np.arange(points_per_group, dtype=np.uint64), len(groups))
        pts = np.fromiter((_ext.hash64(int(a), int(b)) for a, b in zip(g, v)),
                          dtype=np.uint64, count=len(g))
        order = np.argsort(pts, kind="stable")
        pts, owners = pts[order], g[order].astype(np.int64)
        # Two groups hashing to the same point (probability ~1e-13 for 32k
        # points) would make the table ambiguous: keep the first.
        keep = np.concatenate(([True], pts[1:] != pts[:-1]))
        self._table = _ext.RingTable(pts[keep], owners[keep])

    def __repr__(self):
        return f"Ring(v{self.version}, groups={list(self.groups)})"

    def owner(self, a: int, b: int) -> int:
        return self._table.place_one(a, b)

    def meta_owner(self, inode: int) -> int:
        """The group holding ``inode``'s metadata (and, for a directory,
        its entries)."""
        return self._table.place_one(inode, META)

    def chunk_owner(self, inode: int, chunk: int) -> int:
        return self._table.place_one(inode, chunk)

    def place(self, inodes, chunks) -> np.ndarray:
        """Owners of many keys at once (GIL released in the compiled path)."""
        return self._table.place(inodes, chunks)

    def shares(self, samples: int = 1 << 18, seed: int = 0) -> dict[int, float]:
        """Fraction of a uniform key sample owned by each group."""
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 2**63, samples, dtype=np.uint64)
        owners = self.place(keys, np.zeros(samples, dtype=np.uint64))
        counts = {g: 0 for g in self.groups}
        for g, n in zip(*np.unique(owners, return_counts=True)):
            counts[int(g)] = int(n)
        return {g: n / samples for g, n in counts.items()}
