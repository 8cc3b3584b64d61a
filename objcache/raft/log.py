"""The core's in-memory view of the replicated log.

Layout: a snapshot point (``snap_index``, ``snap_term``) and the entries after
it, ``entries[k].index == snap_index + 1 + k``. Every index in
(snap_index, last_index] is present; indexes <= snap_index are compacted.

Invariants:
* ``snap_index <= applied <= committed <= last_index``.
* ``committed`` never decreases; an entry at index <= committed is never
  truncated (a conflict there is a safety violation and raises).
* Entries at index >= ``unstable_from`` have not yet been handed to the
  driver for persisting; ``pending_snapshot`` likewise.
"""
from __future__ import annotations

from .types import Entry, Snapshot, SnapshotMeta


class LogSafetyError(AssertionError):
    """An operation would violate a Raft safety property (a bug, never
    input)."""


class RaftLog:
    __slots__ = ("snap_index", "snap_term", "entries", "committed", "applied",
                 "unstable_from", "pending_snapshot", "truncated_from")

    def __init__(self, snap_index: int = 0, snap_term: int = 0,
                 entries: list[Entry] | None = None, committed: int = 0,
                 applied: int | None = None):
        self.snap_index = snap_index
        self.snap_term = snap_term
        self.entries: list[Entry] = list(entries or [])
        for k, e in enumerate(self.entries):
            if e.index != snap_index + 1 + k:
                raise ValueError(f"restored entries are not contiguous after the "
                                 f"snapshot at {snap_index}: {e!r} at position {k}")
        self.committed = max(committed, snap_index)
        if self.committed > self.last_index():
            raise ValueError(f"commit index {committed} is beyond the restored "
                             f"log (last index {self.last_index()})")
        self.applied = snap_index if applied is None else applied
        if not snap_index <= self.applied <= self.committed:
            raise ValueError(f"applied {self.applied} not within "
                             f"[{snap_index}, {self.committed}]")
        self.unstable_from = self.last_index() + 1   # restored = durable
        self.pending_snapshot: Snapshot | None = None
        # Lowest index overwritten by an append since the core last looked
        # (0: none). The core re-derives the membership from there.
        self.truncated_from = 0

    # ---- queries -------------------------------------------------------

    def last_index(self) -> int:
        return self.snap_index + len(self.entries)

    def first_index(self) -> int:
        return self.snap_index + 1

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index``; None if compacted or beyond the end."""
        if index == self.snap_index:
            return self.snap_term
        k = index - self.snap_index - 1
        if k < 0 or k >= len(self.entries):
            return None
        return self.entries[k].term

    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snap_term

    def match_term(self, index: int, term: int) -> bool:
        t = self.term(index)
        return t is not None and t == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a log ending at (last_index, last_term) at least as up to date
        as ours (Raft §5.4.1)?"""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def find_conflict(self, ents) -> int:
        """Index of the first entry of ``ents`` that is missing or differs in
        term from ours; 0 if all match."""
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose term is <= ``term`` (or the
        snapshot index if none is known): where a leader should probe next
        after a rejection, skipping whole terms at once."""
        index = min(index, self.last_index())
        while index > self.snap_index:
            t = self.term(index)
            if t is not None and t <= term:
                return index
            index -= 1
        return self.snap_index

    def slice(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi), at least one if any, stopping before the total
        size exceeds ``max_bytes``. ``lo`` must be > snap_index."""
        if lo <= self.snap_index:
            raise LogSafetyError(f"slice from {lo} reaches the compacted prefix "
                                 f"(snapshot at {self.snap_index})")
        base = self.snap_index + 1
        out = self.entries[lo - base:hi - base]
        total = 0
        for n, e in enumerate(out):
            total += e.size()
            if total > max_bytes and n > 0:
                return out[:n]
        return out

    # ---- mutation ------------------------------------------------------

    def append(self, ents) -> int:
        """Append ``ents`` (contiguous), truncating our suffix from
        ``ents[0].index`` if it overlaps. Returns the new last index."""
        if not ents:
            return self.last_index()
        first = ents[0].index
        if first <= self.committed:
            raise LogSafetyError(f"append at {first} would overwrite committed "
                                 f"entries (commit {self.committed})")
        if first > self.last_index() + 1:
            raise LogSafetyError(f"append at {first} leaves a gap after "
                                 f"{self.last_index()}")
        if first <= self.last_index():
            self.truncated_from = min(self.truncated_from or first, first)
        del self.entries[first - self.snap_index - 1:]
        self.entries.extend(ents)
        self.unstable_from = min(self.unstable_from, first)
        return self.last_index()

    def maybe_append(self, index: int, log_term: int, committed: int,
                     ents) -> int | None:
        """Follower side of AppendEntries: if our entry at ``index`` has
        ``log_term``, merge ``ents`` after it and advance the commit index to
        min(committed, index of the last entry of this message). Returns that
        last index, or None if the consistency check fails."""
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        conflict = self.find_conflict(ents)
        if conflict:
            if conflict <= self.committed:
                raise LogSafetyError(f"entry {conflict} conflicts with a "
                                     f"committed entry (commit {self.committed})")
            self.append(ents[conflict - index - 1:])
        self.commit_to(min(committed, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise LogSafetyError(f"commit {index} beyond last index "
                                     f"{self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Leader: commit ``index`` if it is newer and from ``term`` (only
        entries of the leader's own term commit by counting, Raft §5.4.2)."""
        if index > self.committed and self.term(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index < self.applied or index > self.committed:
            raise LogSafetyError(f"applied {index} outside [{self.applied}, "
                                 f"{self.committed}]")
        self.applied = index

    def restore(self, snap: Snapshot) -> None:
        """Replace the whole log with a received snapshot."""
        meta = snap.meta
        self.snap_index = meta.index
        self.snap_term = meta.term
        self.entries = []
        self.committed = meta.index
        self.applied = meta.index
        self.unstable_from = meta.index + 1
        self.pending_snapshot = snap

    def compact(self, index: int) -> None:
        """Drop entries <= ``index`` (after the driver made a snapshot at
        ``index`` durable). ``index`` must be applied."""
        if index <= self.snap_index:
            return
        if index > self.applied:
            raise LogSafetyError(f"compact to {index} beyond applied {self.applied}")
        term = self.term(index)
        del self.entries[:index - self.snap_index]
        self.snap_index = index
        self.snap_term = term

    # ---- the Ready cycle ------------------------------------------------

    def unstable_entries(self) -> list[Entry]:
        k = self.unstable_from - self.snap_index - 1
        return self.entries[k:] if k < len(self.entries) else []

    def stable_to(self, index: int) -> None:
        self.unstable_from = max(self.unstable_from, index + 1)

    def next_committed(self, max_bytes: int) -> list[Entry]:
        """Committed entries not yet applied (bounded by ``max_bytes``)."""
        if self.committed <= self.applied:
            return []
        return self.slice(self.applied + 1, self.committed + 1, max_bytes)

    def snapshot_meta_at(self, conf) -> SnapshotMeta:
        return SnapshotMeta(self.snap_index, self.snap_term, conf)
