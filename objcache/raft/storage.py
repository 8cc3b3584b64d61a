"""Durable storage of one Raft replica: a segmented log plus snapshot files.

``RaftStorage`` persists what ``RaftCore`` hands out in a ``Ready`` (snapshot,
entries, hard state, in that order) and gives it back after a restart as a
``RestoreState``. Its semantics are exactly those of the in-memory model
``objcache.raft.sim.Disk``; the tests check recovery against that model.
Formats and the recovery rules: docs/raft-storage.md. Record and file
codecs: ``records.py``.

Directory layout::

    LOCK                              flock()ed while open (one owner)
    0000000000000001.log ...          log segments, numbered by write order
    snap-<index:020d>-<term>.snap     snapshot files (header + data)
    *.tmp                             leftovers of an interrupted write (removed)

Invariants (what the code below relies on and maintains):

* **Durability.** When ``save()`` / ``save_snapshot()`` return, everything
  they were given is on disk and fdatasync'ed: the snapshot file (written to
  a tmp file, fsync'ed, renamed, directory fsync'ed) first, then the log
  records, written as ONE batch through the group-commit ``LogWriter`` (one
  fdatasync). If they raise, the in-memory state is unchanged and the log
  file holds exactly what it held before (the writer rewinds a failed batch).
  Calls are serialized. A cancelled caller does not interrupt a write: the
  cancellation is delivered once the outcome is known and memory agrees
  with the disk.
* **Segments are numbered by write order**, not by first index: a truncating
  append rewinds the index, so index order and write order differ; replay
  applies the segments in sequence order. The sequence has no holes.
* **Every segment starts with HARD_STATE, SNAPSHOT_MARK** (the state current
  when it was created), written in the same batch as the segment's first
  other records. Deleting any prefix of older segments therefore never loses
  the newest hard state or snapshot mark. A new segment's file is created
  and the directory fsync'ed before any of its records is acknowledged.
* **Compaction** deletes only a prefix of non-active segments whose entries
  are all <= the index of the OLDEST retained snapshot (so every retained
  snapshot can still be combined with the log), oldest first with a
  directory fsync after each unlink (a crash leaves a contiguous suffix).
* The in-memory mirror (``_mark``, ``_entries``, ``_hs``) is what the log
  replays to; ``_entries`` are exactly the entries after the snapshot,
  contiguous. They are the caller's Entry objects (shared with the core).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass

from objcache._ext import LogWriter
from objcache.fsutil import fsync_dir as _fsync_dir

from .core import RestoreState
from .records import (MAX_ENTRY_DATA, REC_ENTRY, REC_HARD_STATE, REC_SNAPSHOT_MARK,
                      BadRecord, BadSnapshot, Mark, ScanBudgetExceeded,
                      decode_record, encode_entry,
                      encode_hard_state, encode_mark, find_valid_record,
                      read_snapshot_file, read_snapshot_header, snapshot_header)
from .types import ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMeta

__all__ = ["RaftStorage", "CorruptLogError", "StorageFailedError"]

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"^(\d{16})\.log$")
SNAPSHOT_RE = re.compile(r"^snap-(\d{20})-(\d+)\.snap$")
LOCK_NAME = "LOCK"

#: Record buffers at least this large are handed to the writer as their own
#: iovec; smaller ones are coalesced into one buffer per save.
_OWN_IOVEC = 64 << 10


class CorruptLogError(Exception):
    """The stored state is damaged in a way recovery must not repair by
    itself (damage before the tail, a missing segment, an unusable
    snapshot). Nothing was modified when this is raised."""


class StorageFailedError(RuntimeError):
    """A write failed in a way that leaves the on-disk log in an unknown
    state; the storage refuses further writes. Reopen it to recover."""


def segment_name(seq: int) -> str:
    return f"{seq:016d}.log"


def snapshot_name(index: int, term: int) -> str:
    return f"snap-{index:020d}-{term}.snap"


def _make_dirs_durably(path: str) -> None:
    """mkdir -p, fsync'ing the parent of each directory created."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
        _fsync_dir(os.path.dirname(d))


def _write_all(fd: int, bufs) -> None:
    for buf in bufs:
        mv = memoryview(buf).cast("B")
        while mv:
            n = os.write(fd, mv)
            mv = mv[n:]


@dataclass
class _Segment:
    seq: int
    path: str
    size: int               # bytes (the active one: the writer's offset)
    max_index: int          # largest ENTRY index written in it (0: none)


@dataclass(frozen=True)
class _SnapFile:
    index: int
    term: int
    path: str


# ---------------------------------------------------------------- recovery

class _Replay:
    """Applies records in log order with the semantics of ``Disk.persist``.

    Beyond the model it keeps entries at or below the snapshot mark while
    they are consistent with it (the stored entry at the mark's index has
    the mark's term): a damaged newest snapshot can then be replaced by an
    older one plus those entries. ``ents[k].index == start + k``.

    When older segments were deleted by compaction, the first entry replayed
    may start after ``mark.index + 1`` (its predecessors were compacted);
    ``_recover`` checks at the end that the final snapshot covers that gap.
    Any other gap is damage.
    """

    def __init__(self, may_float: bool):
        self.hs = HardState()
        self.mark = Mark(0, 0, None)
        self.boot_conf: ConfState | None = None
        self.start = 1
        self.ents: list[Entry] = []
        self.may_float = may_float
        self.seen_entry = False

    def apply_mark(self, m: Mark) -> None:
        ents = self.ents
        if ents:
            last = self.start + len(ents) - 1
            if m.index > last:
                ents.clear()
                self.start = m.index + 1
            elif m.index >= self.start and ents[m.index - self.start].term != m.term:
                # The stored log is not the snapshot's history: drop all of
                # it, the entries after the mark included (Raft §7: they
                # follow a conflicting entry).
                ents.clear()
                self.start = m.index + 1
        else:
            self.start = m.index + 1
        self.mark = m
        if m.index == 0 and m.conf is not None:
            self.boot_conf = m.conf

    def apply_entry(self, e: Entry) -> None:
        i = e.index
        if i <= self.mark.index:
            raise BadRecord(f"ENTRY {i} is at or below the snapshot mark at "
                            f"{self.mark.index}")
        ents = self.ents
        if not ents:
            if i != self.start:
                if not (self.may_float and not self.seen_entry):
                    raise BadRecord(f"ENTRY {i} leaves a gap: the log continues "
                                    f"at index {self.start}")
                self.start = i          # predecessors were compacted away
        else:
            nxt = self.start + len(ents)
            if i > nxt:
                raise BadRecord(f"ENTRY {i} leaves a gap: the log continues at "
                                f"index {nxt}")
            if i < self.start:          # truncation below a compacted start
                ents.clear()
                self.start = i
            else:
                del ents[i - self.start:]
        ents.append(e)
        self.seen_entry = True

    def entries_after(self, index: int) -> list[Entry]:
        k = index + 1 - self.start
        return self.ents[k:] if k > 0 else list(self.ents)

    def covers(self, snap: _SnapFile) -> bool:
        """Can the log continue from ``snap``? (It holds every entry after
        it up to the mark, consistent with its term.)"""
        if not self.ents or self.start > snap.index + 1:
            return False
        if self.start + len(self.ents) - 1 < self.mark.index:
            return False
        if snap.index >= self.start:
            return self.ents[snap.index - self.start].term == snap.term
        return True


@dataclass
class _Recovered:
    segments: list[_Segment]
    hs: HardState
    mark: Mark                      # the effective snapshot point
    entries: list[Entry]
    boot_conf: ConfState | None
    snapshots: list[_SnapFile]      # retained snapshot files, by index
    records: int
    header_durable: bool            # the last segment starts with its header
    truncate: tuple[str, int, int] | None   # (path, new size, bytes dropped)
    remove: list[str]               # tmp leftovers, snapshots newer than the log
    quarantine: list[tuple[str, str]]   # damaged snapshot files: (path, why)
    fallback: bool                  # the mark must be re-recorded (older snapshot)
    fresh: bool                     # no segment existed


def _recover(directory: str) -> _Recovered:
    """Read and validate everything; decide the repairs. Modifies nothing:
    the caller performs ``truncate``/``remove``/``quarantine`` afterwards."""
    segs: list[tuple[int, str]] = []
    snaps: list[_SnapFile] = []
    remove: list[str] = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if m := SEGMENT_RE.match(name):
            segs.append((int(m[1]), path))
        elif m := SNAPSHOT_RE.match(name):
            snaps.append(_SnapFile(int(m[1]), int(m[2]), path))
        elif name.endswith(".tmp"):
            remove.append(path)
    segs.sort()
    snaps.sort(key=lambda s: (s.index, s.term))
    for (a, pa), (b, _) in zip(segs, segs[1:]):
        if b != a + 1:
            raise CorruptLogError(f"{directory}: log segment(s) "
                                  f"{segment_name(a + 1)}..{segment_name(b - 1)} are "
                                  f"missing (after {os.path.basename(pa)})")
    if not segs:
        if snaps:
            raise CorruptLogError(f"{directory}: snapshot files but no log segment "
                                  f"(the snapshot mark and hard state are lost)")
        return _Recovered([], HardState(), Mark(0, 0, None), [], None, [], 0, False,
                          None, remove, [], False, True)

    # 1. Replay the segments in sequence order.
    replay = _Replay(may_float=segs[0][0] > 1)
    segments: list[_Segment] = []
    truncate = None
    header_durable = True
    records = 0
    for k, (seq, path) in enumerate(segs):
        recs, valid_end, size = _read_segment(path, last=k == len(segs) - 1)
        if valid_end < size:
            truncate = (path, valid_end, size - valid_end)
        if not recs:
            header_durable = False      # only possible for the last segment
        max_index = 0
        for off, rtype, value in recs:
            try:
                if rtype == REC_ENTRY:
                    replay.apply_entry(value)
                    max_index = max(max_index, value.index)
                elif rtype == REC_HARD_STATE:
                    replay.hs = value
                else:
                    replay.apply_mark(value)
            except BadRecord as exc:
                raise CorruptLogError(f"{path}: offset {off}: {exc}") from None
        records += len(recs)
        segments.append(_Segment(seq, path, valid_end, max_index))
    mark = replay.mark
    if replay.ents and replay.start > mark.index + 1:
        raise CorruptLogError(
            f"{directory}: entries {mark.index + 1}..{replay.start - 1} are missing "
            f"(the log continues at {replay.start}, its snapshot mark is at "
            f"{mark.index})")

    # 2. The snapshot: the log names the one it needs (the last mark's index
    # and term). Newer files come from saves that were never acknowledged.
    remove += [s.path for s in snaps if s.index > mark.index
               or (s.index == mark.index and s.term != mark.term)]
    older = [s for s in snaps if s.index < mark.index]
    quarantine: list[tuple[str, str]] = []
    fallback = False
    if mark.index == 0:
        keep, base = older, mark
    else:
        wanted = [s for s in snaps if s.index == mark.index and s.term == mark.term]
        why = _check_snapshot(wanted[0], mark.conf) if wanted else "missing"
        if why is None:
            keep, base = older + wanted, mark
        else:
            if wanted:
                quarantine.append((wanted[0].path, why))
            keep, base, more_bad, drop = _fall_back(directory, replay, older, why)
            quarantine += more_bad
            remove += drop
            fallback = True
    return _Recovered(segments, replay.hs, base, replay.entries_after(base.index),
                      replay.boot_conf, keep, records, header_durable, truncate,
                      remove, quarantine, fallback, False)


def _read_segment(path: str, *, last: bool) -> tuple[list, int, int]:
    """The valid records of one segment as [(offset, type, value)], the
    offset where they end and the file size. Damage raises CorruptLogError,
    except a torn tail of the last segment (nothing valid after the first
    bad record), which the records simply stop before."""
    with open(path, "rb") as f:
        buf = f.read()
    end = len(buf)
    recs: list[tuple[int, int, object]] = []
    off = 0
    while off < end:
        try:
            rtype, value, nxt = decode_record(buf, off, end)
        except BadRecord as exc:
            if not last:
                raise CorruptLogError(f"{path}: offset {off}: {exc} (in a segment "
                                      f"that is not the last one)") from None
            try:
                after = find_valid_record(buf, off + 1, end)
            except ScanBudgetExceeded as scan:
                raise CorruptLogError(f"{path}: offset {off}: {exc}; cannot rule out "
                                      f"valid records after it ({scan})") from None
            if after is not None:
                raise CorruptLogError(f"{path}: offset {off}: {exc}, but a valid "
                                      f"record follows at offset {after}: damage "
                                      f"in the middle of the log, not a torn "
                                      f"tail") from None
            break
        recs.append((off, rtype, value))
        off = nxt
    # The header: HARD_STATE, SNAPSHOT_MARK. The last segment may have lost
    # it (or its second half) to a torn first batch; nothing of that batch
    # was acknowledged, so the whole segment content goes.
    kinds = [r[1] for r in recs[:2]]
    if kinds != [REC_HARD_STATE, REC_SNAPSHOT_MARK]:
        if last and kinds in ([], [REC_HARD_STATE]):
            return [], 0, end
        what = "is empty" if not recs else "does not start with HARD_STATE, SNAPSHOT_MARK"
        raise CorruptLogError(f"{path}: offset 0: segment {what}")
    return recs, off, end


def _fall_back(directory: str, replay: _Replay, older: list[_SnapFile], why: str):
    """The snapshot the log needs is unusable: find the newest older one
    that the retained log continues, or index 0 if the log still starts at
    1. Returns (snapshot files to keep, new base Mark, damaged files found,
    files to remove)."""
    mark = replay.mark
    bad: list[tuple[str, str]] = []
    chosen = None
    for s in reversed(older):
        if replay.covers(s):
            older_why = _check_snapshot(s, None)
            if older_why is None:
                chosen = s
                break
            bad.append((s.path, older_why))
    if chosen is not None:
        base = Mark(chosen.index, chosen.term, _read_conf(chosen))
    elif replay.ents and replay.start == 1 and \
            replay.start + len(replay.ents) - 1 >= mark.index:
        base = Mark(0, 0, replay.boot_conf)          # the log holds everything
    else:
        raise CorruptLogError(
            f"{os.path.join(directory, snapshot_name(mark.index, mark.term))}: the "
            f"snapshot the log needs is {why}, and no older valid snapshot is "
            f"followed by the entries that would replace it")
    log.warning("%s: snapshot at index %d is %s; recovering from %s and the log "
                "after it", directory, mark.index, why,
                f"the snapshot at index {base.index}" if base.index
                else "the start of the log")
    bad_paths = {p for p, _ in bad}
    keep = [s for s in older if s.index <= base.index and s.path not in bad_paths]
    drop = [s.path for s in older if s.index > base.index and s.path not in bad_paths]
    return keep, base, bad, drop


def _check_snapshot(s: _SnapFile, conf: ConfState | None) -> str | None:
    """Why the snapshot file is unusable, or None if it is intact (and
    matches its name and the log's membership)."""
    try:
        meta, _ = read_snapshot_file(s.path, load=False)
    except BadSnapshot as exc:
        return f"damaged ({exc})"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if (meta.index, meta.term) != (s.index, s.term):
        return f"damaged (header says index {meta.index} term {meta.term})"
    if conf is not None and meta.conf != conf:
        return "damaged (its membership differs from the log's snapshot mark)"
    return None


def _read_conf(s: _SnapFile) -> ConfState:
    with open(s.path, "rb") as f:
        return read_snapshot_header(f).meta.conf


# ---------------------------------------------------------------- the storage

class RaftStorage:
    """Durable state of one Raft replica. Create with ``await RaftStorage.open(dir)``.

    One owner: the directory is flock()ed while open. All methods must be
    called from the event loop that opened it. ``save``/``save_snapshot``
    may be called concurrently; they are applied one at a time in call order.
    """

    def __init__(self, *_a, **_k):
        raise TypeError("use `await RaftStorage.open(directory)`")

    # ---------------------------------------------------------------- open

    @classmethod
    async def open(cls, directory, *, segment_bytes: int = 64 << 20,
                   keep_snapshots: int = 2) -> "RaftStorage":
        """Open (creating it if missing) and recover the storage in
        ``directory``. Raises CorruptLogError if the stored state is damaged
        beyond a torn tail; nothing is modified then."""
        if not isinstance(segment_bytes, int) or segment_bytes < 1:
            raise ValueError(f"segment_bytes must be a positive int, not {segment_bytes!r}")
        if not isinstance(keep_snapshots, int) or keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be an int >= 1, not {keep_snapshots!r}")
        self = object.__new__(cls)
        self._dir = os.path.abspath(os.fspath(directory))
        self._segment_bytes = segment_bytes
        self._keep = keep_snapshots
        self._lock = asyncio.Lock()
        self._writer = None
        self._closed = False
        self._failed: BaseException | None = None
        self._lock_fd = -1
        self._tmp_seq = itertools.count()
        self._counters = dict(saves=0, records_written=0, closed_writer_syncs=0,
                              dir_syncs=0, file_syncs=0, rolls=0, segments_deleted=0,
                              snapshots_written=0, snapshots_deleted=0,
                              recovered_records=0, recovery_torn_bytes=0,
                              recovery_seconds=0.0)
        t0 = time.perf_counter()
        try:
            rec = await asyncio.to_thread(self._open_sync)
            self._writer = LogWriter(self._segments[-1].path)
            if rec.fallback:
                # Record the snapshot actually in use, so that later
                # recoveries (and segment headers) agree with it.
                await self._append_records([encode_mark(self._mark)], 0, lambda: None)
        except BaseException:
            if self._writer is not None:
                await self._writer.close()
            self._release_lock()
            raise
        self._counters["recovery_seconds"] = time.perf_counter() - t0
        return self

    def _open_sync(self) -> _Recovered:
        d = self._dir
        _make_dirs_durably(d)
        self._lock_fd = os.open(os.path.join(d, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._release_lock()
            raise RuntimeError(f"{d} is in use by another RaftStorage "
                               f"(its {LOCK_NAME} file is locked)") from None
        rec = _recover(d)
        # --- everything validated: repair (the only writes of recovery) ---
        changed = False
        if rec.truncate is not None:
            path, size, dropped = rec.truncate
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            log.warning("%s: dropped a torn tail of %d bytes at offset %d "
                        "(an unacknowledged write interrupted by a crash)",
                        path, dropped, size)
            self._counters["recovery_torn_bytes"] = dropped
        for path, why in rec.quarantine:
            os.replace(path, path + ".corrupt")
            log.warning("%s: snapshot %s; renamed to %s.corrupt", path, why,
                        os.path.basename(path))
            changed = True
        for path in rec.remove:
            try:
                os.unlink(path)
                changed = True
            except FileNotFoundError:
                pass
        if rec.fresh:
            path = os.path.join(d, segment_name(1))
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o644))
            rec.segments.append(_Segment(1, path, 0, 0))
            rec.header_durable = False
            changed = True
        if changed:
            _fsync_dir(d)
            self._counters["dir_syncs"] += 1
        self._segments: list[_Segment] = rec.segments
        self._header_durable = rec.header_durable
        self._hs = rec.hs
        self._mark = rec.mark
        self._entries: list[Entry] = rec.entries
        self._boot_conf = rec.boot_conf
        self._snapshots: list[_SnapFile] = rec.snapshots
        self._stored_anything = rec.records > 0
        self._counters["recovered_records"] = rec.records
        return rec

    # ---------------------------------------------------------------- queries

    def restore_state(self, bootstrap_conf: ConfState | None = None) -> RestoreState:
        """The durable state for ``RaftCore(config, restore)``.

        ``conf`` is set only when there is no snapshot: the bootstrap
        membership recorded by the first save (in the log's index-0 snapshot
        mark), else ``bootstrap_conf``, which is then recorded with the first
        save if nothing was stored yet.
        """
        conf = None
        if self._mark.index == 0:
            if self._boot_conf is not None:
                conf = self._boot_conf
                if bootstrap_conf is not None and bootstrap_conf != conf:
                    log.warning("%s: bootstrap membership %s differs from the "
                                "recorded %s; using the recorded one", self._dir,
                                bootstrap_conf, conf)
            else:
                conf = bootstrap_conf
                if not self._stored_anything and bootstrap_conf is not None:
                    # Becomes durable in the header of the first batch.
                    self._boot_conf = bootstrap_conf
                    self._mark = Mark(0, 0, bootstrap_conf)
        return RestoreState(hard_state=self._hs, snapshot=self._snapshot_meta(),
                            entries=list(self._entries), conf=conf)

    def _snapshot_meta(self) -> SnapshotMeta | None:
        m = self._mark
        return SnapshotMeta(m.index, m.term, m.conf) if m.index else None

    def snapshot(self) -> Snapshot | None:
        """The latest snapshot with its data (read from its file), or None."""
        if self._mark.index == 0:
            return None
        s = self._snapshots[-1]
        try:
            meta, data = read_snapshot_file(s.path, load=True)
        except BadSnapshot as exc:
            raise CorruptLogError(f"{s.path}: snapshot is damaged ({exc})") from None
        return Snapshot(meta, data)

    def first_index(self) -> int:
        return self._mark.index + 1

    def last_index(self) -> int:
        return self._mark.index + len(self._entries)

    def term(self, index: int) -> int | None:
        """Term of the stored entry at ``index`` (the snapshot's term at its
        index); None if compacted or beyond the end."""
        base = self._mark.index
        if index == base:
            return self._mark.term
        k = index - base - 1
        return self._entries[k].term if 0 <= k < len(self._entries) else None

    @property
    def hard_state(self) -> HardState:
        return self._hs

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def stats(self) -> dict:
        c = self._counters
        w = self._writer
        syncs = c["closed_writer_syncs"] + (w.stats["syncs"] if w is not None else 0)
        sizes = [s.size for s in self._segments]
        if w is not None and not self._closed:
            sizes[-1] = w.offset
        return {
            "segments": len(self._segments), "bytes": sum(sizes),
            "snapshots": len(self._snapshots),
            "first_index": self.first_index(), "last_index": self.last_index(),
            "saves": c["saves"], "records_written": c["records_written"],
            "syncs": syncs, "dir_syncs": c["dir_syncs"], "file_syncs": c["file_syncs"],
            "rolls": c["rolls"], "segments_deleted": c["segments_deleted"],
            "snapshots_written": c["snapshots_written"],
            "snapshots_deleted": c["snapshots_deleted"],
            "recovered_records": c["recovered_records"],
            "recovery_torn_bytes": c["recovery_torn_bytes"],
            "recovery_seconds": c["recovery_seconds"],
            "backend": w.backend if w is not None else None,
        }

    # ---------------------------------------------------------------- writes

    async def save(self, hard_state: HardState | None, entries,
                   snapshot: Snapshot | None = None) -> None:
        """Persist one Ready: ``snapshot`` (replaces the log up to its index),
        then ``entries`` (an entry at index <= the last stored one first
        truncates the stored log from there), then ``hard_state``.

        Returns when all of it is durable: the snapshot file fsync'ed and
        renamed, then the log records written with ONE fdatasync. Bad
        arguments raise ValueError before anything is written; an OSError
        (e.g. ENOSPC) leaves the stored state as it was. Cancelling the
        caller does not interrupt the write: the cancellation is delivered
        once the outcome is known and memory agrees with the disk.
        """
        self._check_usable()
        entries = list(entries)
        async with self._lock:
            self._check_usable()
            self._check_save(hard_state, entries, snapshot)
            records: list = []
            snap_path = mark = None
            if snapshot is not None:
                snap_path = await self._write_snapshot(snapshot)
                m = snapshot.meta
                mark = Mark(m.index, m.term, m.conf)
                records.append(encode_mark(mark))
            for e in entries:
                records.append(encode_entry(e))         # (head, data)
            if hard_state is not None:
                records.append(encode_hard_state(hard_state))

            def apply():
                if mark is not None:
                    self._set_snapshot(mark, snap_path)
                if entries:
                    del self._entries[entries[0].index - self._mark.index - 1:]
                    self._entries.extend(entries)
                if hard_state is not None:
                    self._hs = hard_state
                self._counters["saves"] += 1

            try:
                if records:
                    await self._append_records(
                        records, entries[-1].index if entries else 0, apply)
            except BaseException:
                if snap_path is not None and not self._is_known_snapshot(snap_path):
                    _unlink_quietly(snap_path)
                raise
            if mark is not None:
                await _run_through_cancel(self._compact())

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store an application-made snapshot at an applied index (durably,
        recorded in the log), then compact: delete snapshot files beyond
        ``keep_snapshots`` and the oldest segments whose entries are all <=
        the oldest retained snapshot (never the active segment).

        The snapshot file is written without holding up concurrent
        ``save()`` calls; only recording it in the log is serialized.
        """
        self._check_usable()
        self._check_app_snapshot(snapshot)              # fail fast
        path = await self._write_snapshot(snapshot)
        try:
            async with self._lock:
                self._check_usable()
                self._check_app_snapshot(snapshot)      # the state may have moved
                m = snapshot.meta
                mark = Mark(m.index, m.term, m.conf)
                await self._append_records([encode_mark(mark)], 0,
                                           lambda: self._set_snapshot(mark, path))
                await _run_through_cancel(self._compact())
        except BaseException:
            if not self._is_known_snapshot(path):
                _unlink_quietly(path)
            raise

    async def close(self) -> None:
        """Wait for saves in progress, then release the files. Idempotent."""
        if self._closed:
            return
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None:
                await self._writer.close()
            self._release_lock()

    async def __aenter__(self) -> "RaftStorage":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---------------------------------------------------------------- internals

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"RaftStorage({self._dir}) is closed")
        if self._failed is not None:
            raise StorageFailedError(f"RaftStorage({self._dir}) failed earlier and "
                                     f"refuses writes: {self._failed}")

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)     # drops the flock
            self._lock_fd = -1

    def _is_known_snapshot(self, path: str) -> bool:
        return any(s.path == path for s in self._snapshots)

    def _set_snapshot(self, mark: Mark, path: str) -> None:
        """Memory after a durable SNAPSHOT_MARK (Disk.persist semantics:
        entries up to the index go; those after it stay only if the stored
        entry at the index has the snapshot's term, Raft §7)."""
        drop = mark.index - self._mark.index
        if drop >= len(self._entries):
            self._entries = []
        elif drop > 0:
            if self._entries[drop - 1].term != mark.term:
                self._entries = []
            else:
                del self._entries[:drop]
        self._mark = mark
        self._snapshots = [s for s in self._snapshots if s.path != path]
        self._snapshots.append(_SnapFile(mark.index, mark.term, path))
        self._snapshots.sort(key=lambda s: s.index)

    # -- validation (raises ValueError; nothing is written before it passes)

    def _check_save(self, hs, entries: list[Entry], snapshot) -> None:
        base, base_term = self._mark.index, self._mark.term
        last = self.last_index()
        if snapshot is not None:
            m = self._check_snapshot_arg(snapshot, "save")
            if m.index < base:
                raise ValueError(f"snapshot at index {m.index} is older than the "
                                 f"stored snapshot at {base}")
            if m.index == base and m.term != base_term:
                raise ValueError(f"snapshot at index {m.index} has term {m.term}; "
                                 f"the stored one there has term {base_term}")
            last = max(last, m.index)
            base, base_term = m.index, m.term
        if entries:
            if not _entries_plainly_valid(entries):
                self._explain_bad_entries(entries)
            first = entries[0].index
            if first <= base:
                raise ValueError(f"entry index {first} is at or below the snapshot "
                                 f"index {base}")
            if first > last + 1:
                raise ValueError(f"entry index {first} leaves a gap: the stored log "
                                 f"ends at {last}")
            before = base_term if first - 1 == base else self.term(first - 1)
            if before is not None and entries[0].term < before:
                raise ValueError(f"entry {first} has term {entries[0].term}, lower "
                                 f"than the term {before} of the entry before it")
        if hs is not None:
            if not isinstance(hs, HardState) or not all(
                    _is_uint(x) for x in (hs.term, hs.vote, hs.commit)):
                raise ValueError(f"hard_state must be a HardState of ints >= 0, not {hs!r}")
            if hs.term < self._hs.term:
                raise ValueError(f"hard state term {hs.term} is lower than the "
                                 f"stored term {self._hs.term}")

    @staticmethod
    def _explain_bad_entries(entries: list) -> None:
        """Raise ValueError saying what is wrong with ``entries`` (the slow,
        detailed version of ``_entries_plainly_valid``)."""
        prev = None
        for k, e in enumerate(entries):
            if not isinstance(e, Entry):
                raise ValueError(f"entries[{k}] is a {type(e).__name__}, not an Entry")
            if not (_is_uint(e.term) and _is_uint(e.index)):
                raise ValueError(f"entries[{k}]: term and index must be ints >= 0 "
                                 f"({e!r})")
            try:
                EntryType(e.type)
            except ValueError:
                raise ValueError(f"entries[{k}]: unknown entry type {e.type!r}") from None
            if type(e.data) is not bytes:
                try:
                    with memoryview(e.data) as mv:
                        ok = mv.c_contiguous and mv.ndim == 1 and mv.itemsize == 1
                except TypeError:
                    ok = False
                if not ok:
                    raise ValueError(f"entries[{k}]: data must be bytes (or a flat "
                                     f"byte buffer), not {type(e.data).__name__}")
            if len(e.data) > MAX_ENTRY_DATA:
                raise ValueError(f"entries[{k}]: {len(e.data)} bytes of data is more "
                                 f"than a record holds ({MAX_ENTRY_DATA})")
            if prev is not None:
                if e.index != prev.index + 1:
                    raise ValueError(f"entries are not contiguous: index {e.index} "
                                     f"follows {prev.index}")
                if e.term < prev.term:
                    raise ValueError(f"entry terms decrease: term {e.term} at index "
                                     f"{e.index} follows term {prev.term}")
            prev = e

    def _check_snapshot_arg(self, snapshot, what: str) -> SnapshotMeta:
        if not isinstance(snapshot, Snapshot) or not isinstance(snapshot.meta, SnapshotMeta):
            raise ValueError(f"{what}: snapshot must be a Snapshot, not {snapshot!r}")
        m = snapshot.meta
        if snapshot.data is None:
            raise ValueError(f"{what}: snapshot at index {m.index} has no data")
        try:
            memoryview(snapshot.data)
        except TypeError:
            raise ValueError(f"{what}: snapshot data must be bytes, not "
                             f"{type(snapshot.data).__name__}") from None
        if not (_is_uint(m.index) and _is_uint(m.term)) or m.index < 1:
            raise ValueError(f"{what}: snapshot index must be >= 1 and term >= 0 "
                             f"(index {m.index!r}, term {m.term!r})")
        if not isinstance(m.conf, ConfState):
            raise ValueError(f"{what}: snapshot conf must be a ConfState")
        return m

    def _check_app_snapshot(self, snapshot) -> None:
        m = self._check_snapshot_arg(snapshot, "save_snapshot")
        base = self._mark.index
        if m.index < base:
            raise ValueError(f"save_snapshot: index {m.index} is older than the "
                             f"stored snapshot at {base}")
        if m.index > self.last_index():
            raise ValueError(f"save_snapshot: index {m.index} is beyond the stored "
                             f"log (last index {self.last_index()})")
        t = self.term(m.index)
        if t != m.term:
            raise ValueError(f"save_snapshot: the stored entry at index {m.index} "
                             f"has term {t}, the snapshot says {m.term}")

    # -- files

    def _write_snapshot_file(self, snapshot: Snapshot) -> str:
        """Write the snapshot file durably (tmp, fsync, rename, fsync dir).
        Runs in a worker thread. Returns its path."""
        meta, data = snapshot.meta, snapshot.data
        final = os.path.join(self._dir, snapshot_name(meta.index, meta.term))
        tmp = f"{final}.{os.getpid()}-{next(self._tmp_seq)}.tmp"
        n = memoryview(data).nbytes
        header = snapshot_header(meta, n, data)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, (header, data))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(self._dir)
        return final

    async def _write_snapshot(self, snapshot: Snapshot) -> str:
        path = await asyncio.to_thread(self._write_snapshot_file, snapshot)
        c = self._counters
        c["file_syncs"] += 1
        c["dir_syncs"] += 1
        c["snapshots_written"] += 1
        return path

    async def _append_records(self, records: list, max_index: int, apply) -> None:
        """Write ``records`` to the log as ONE batch (one fdatasync) and call
        ``apply()`` once they are durable. A record is a bytes object or a
        (head, data) pair from ``encode_entry``; ``max_index`` is the largest
        entry index among them (0: none). Called with the lock held (or
        before the storage is shared).

        Rolls to a new segment first if the active one is full, and puts the
        segment header in front if it is not durable yet. On failure the
        file is back at its last acknowledged end and nothing is applied. A
        cancellation of the caller is held back until the outcome is known
        (and applied): the records are written either way.
        """
        if self._header_durable and self._writer.offset >= self._segment_bytes:
            await _run_through_cancel(self._roll())
        if not self._header_durable:
            records = [encode_hard_state(self._hs), encode_mark(self._mark)] + records
        w = self._writer
        start = w.offset
        total = 0
        futs = []
        small: list = []
        # Small pieces are joined into one buffer; large entry data goes out
        # as its own iovec, without a copy. All of it forms one batch: the
        # appends are made in one go, before the event loop runs again.
        for r in records:
            for piece in (r if type(r) is tuple else (r,)):
                n = len(piece)
                total += n
                if n >= _OWN_IOVEC:
                    if small:
                        futs.append(w.append(b"".join(small)))
                        small = []
                    futs.append(w.append(piece))
                elif n:
                    small.append(piece)
        if small:
            futs.append(w.append(b"".join(small)))
        cancelled = False
        error: BaseException | None = None
        try:
            await futs[-1]              # futures resolve in append order
        except asyncio.CancelledError:
            # Task.cancel() cancelled the future we awaited; the batch is
            # written regardless. Wait for it and judge it by the offset.
            cancelled = True
            flush = asyncio.ensure_future(w.flush())
            await _wait_through_cancel(flush)
            if not flush.cancelled():
                error = flush.exception()
        except Exception as exc:        # noqa: BLE001 - judged by the offset below
            error = exc
        for f in futs:                  # retrieve every outcome (no warnings)
            if f.done() and not f.cancelled() and f.exception() is not None:
                error = error or f.exception()
        end = w.offset
        if end == start + total:
            seg = self._segments[-1]
            seg.size = end
            seg.max_index = max(seg.max_index, max_index)
            self._header_durable = True
            self._stored_anything = True
            self._counters["records_written"] += len(records)
            apply()
        elif end == start:
            self._after_failed_batch(w)
            if not cancelled:
                raise error if error is not None else OSError(
                    errno.EIO, "log write failed", w.path)
        else:
            # Part of the records is durable (the batch was split and a
            # later part failed): memory cannot describe the log any more.
            self._failed = error or OSError(errno.EIO, "partial log write", w.path)
            raise StorageFailedError(f"{w.path}: only part of a write is durable "
                                     f"({end - start} of {total} bytes): {error}")
        if cancelled:
            raise asyncio.CancelledError()

    def _after_failed_batch(self, w) -> None:
        """The writer rewinds a failed batch (best effort); make sure the file
        really ends at the last acknowledged byte, or stop writing."""
        try:
            if os.stat(w.path).st_size != w.offset:
                os.truncate(w.path, w.offset)
        except OSError as exc:
            self._failed = exc
            log.error("%s: cannot rewind a failed write (%s); refusing further writes",
                      w.path, exc)

    async def _roll(self) -> None:
        """Start a new segment: create it and fsync the directory before any
        of its records can be acknowledged. Its header goes out with its
        first batch."""
        seq = self._segments[-1].seq + 1
        path = os.path.join(self._dir, segment_name(seq))

        def create():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o644))
            try:
                _fsync_dir(self._dir)
            except BaseException:
                _unlink_quietly(path)
                raise

        await asyncio.to_thread(create)
        self._counters["dir_syncs"] += 1
        try:
            writer = LogWriter(path)
        except BaseException:
            _unlink_quietly(path)
            raise
        old = self._writer
        self._writer = writer
        self._segments[-1].size = old.offset
        self._segments.append(_Segment(seq, path, 0, 0))
        self._header_durable = False
        self._counters["rolls"] += 1
        self._counters["closed_writer_syncs"] += old.stats["syncs"]
        await old.close()

    async def _compact(self) -> None:
        """Delete snapshot files beyond ``keep_snapshots`` and the oldest
        segments whose entries are all <= the oldest retained snapshot.
        Runs after the current SNAPSHOT_MARK and the active segment's header
        are durable, so the deleted segments hold nothing still needed."""
        if not self._header_durable:
            return
        drop_snaps = self._snapshots[:-self._keep]
        keep = self._snapshots[-self._keep:]
        boundary = keep[0].index if keep else 0
        victims = []
        for seg in self._segments[:-1]:
            if seg.max_index > boundary:
                break
            victims.append(seg)
        if not victims and not drop_snaps:
            return

        def work():
            gone_segs, gone_snaps = [], []
            try:
                for seg in victims:             # oldest first, one barrier each
                    try:
                        os.unlink(seg.path)
                    except FileNotFoundError:
                        pass
                    _fsync_dir(self._dir)
                    gone_segs.append(seg)
                for s in drop_snaps:
                    try:
                        os.unlink(s.path)
                    except FileNotFoundError:
                        pass
                    gone_snaps.append(s)
                if drop_snaps:
                    _fsync_dir(self._dir)
            except OSError as exc:
                log.warning("%s: compaction stopped: %s", self._dir, exc)
            return gone_segs, gone_snaps

        gone_segs, gone_snaps = await asyncio.to_thread(work)
        self._segments = [s for s in self._segments if s not in gone_segs]
        self._snapshots = [s for s in self._snapshots if s not in gone_snaps]
        self._counters["segments_deleted"] += len(gone_segs)
        self._counters["snapshots_deleted"] += len(gone_snaps)
        self._counters["dir_syncs"] += len(gone_segs) + (1 if drop_snaps else 0)


async def _wait_through_cancel(fut) -> bool:
    """Wait until ``fut`` is done even if the calling task is cancelled
    meanwhile (``fut`` itself is shielded). Returns whether a cancellation
    arrived; the caller re-raises it once its state is consistent."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:           # noqa: BLE001 - the caller reads fut
            pass
    return cancelled


async def _run_through_cancel(coro):
    """Run ``coro`` to completion even if the caller is cancelled meanwhile;
    return its result (or raise its exception), then deliver the
    cancellation."""
    task = asyncio.ensure_future(coro)
    cancelled = await _wait_through_cancel(task)
    result = task.result()
    if cancelled:
        raise asyncio.CancelledError()
    return result


_ENTRY_TYPES = frozenset(int(t) for t in EntryType)


def _entries_plainly_valid(entries: list) -> bool:
    """The common case, checked fast: Entry objects with int term/index,
    contiguous indexes, non-decreasing terms, a known type and bytes data of
    a size one record holds."""
    prev_i = entries[0].index - 1 if type(entries[0]) is Entry else -2
    prev_t = 0
    for e in entries:
        if type(e) is not Entry:
            return False
        i, t, d = e.index, e.term, e.data
        if (type(i) is not int or type(t) is not int or i != prev_i + 1
                or t < prev_t or type(d) is not bytes or len(d) > MAX_ENTRY_DATA
                or type(e.type) not in (EntryType, int) or e.type not in _ENTRY_TYPES):
            return False
        prev_i, prev_t = i, t
    return entries[0].index >= 0 and entries[0].term >= 0


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
