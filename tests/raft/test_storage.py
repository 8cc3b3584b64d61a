"""RaftStorage: the durable log + snapshot store of a Raft replica
(objcache/raft/storage.py, format in docs/raft-storage.md).

The reference for every recovery check is ``objcache.raft.sim.Disk``, the
in-memory model of the same semantics. Tests are plain functions around
``asyncio.run`` (no pytest-asyncio); synchronization with the crash child is
by reading its acknowledgements, never by sleeping.
"""
import asyncio
import errno
import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objcache._ext import crc32c
from objcache.raft import records as rec
from objcache.raft.sim import Disk
from objcache.raft.storage import (CorruptLogError, RaftStorage, segment_name,
                                   snapshot_name)
from objcache.raft.types import (ConfState, Entry, EntryType, HardState, Ready,
                                 Snapshot, SnapshotMeta)

KiB = 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = ConfState(frozenset({1, 2, 3}))
CONF2 = ConfState(frozenset({1, 2, 3, 4}), frozenset({5}))


def run(coro):
    return asyncio.run(coro)


def E(term, index, data=None, type=EntryType.NORMAL):
    return Entry(term, index, type, data if data is not None else b"e%d-%d" % (index, term))


def snap(index, term, data=None, conf=CONF):
    return Snapshot(SnapshotMeta(index, term, conf), data if data is not None
                    else b"state@%d" % index)


def ents(term, lo, hi):
    return [E(term, i) for i in range(lo, hi + 1)]


def segments(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".log"))


def tree(d):
    """Name -> sha256 of every file in d (to prove recovery modified nothing)."""
    out = {}
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def parse(path):
    """[(offset, end, type, value)] of every record of a segment file."""
    with open(path, "rb") as f:
        buf = f.read()
    out, off = [], 0
    while off < len(buf):
        t, v, end = rec.decode_record(buf, off, len(buf))
        out.append((off, end, t, v))
        off = end
    return out


async def check_against(s: RaftStorage, disk: Disk):
    """The storage's live view and its snapshot equal the model's."""
    assert s.restore_state(disk.bootstrap_conf) == disk.restore_state()
    if disk.snapshot is None:
        assert s.snapshot() is None
    else:
        got = s.snapshot()
        assert got.meta == disk.snapshot.meta and got.data == disk.snapshot.data


async def reopened(d, disk, **kw):
    """Open d, compare with the model, return the open storage."""
    s = await RaftStorage.open(d, **kw)
    try:
        await check_against(s, disk)
    except BaseException:
        await s.close()
        raise
    return s


async def persist(s, disk, hs=None, entries=(), snapshot=None):
    rd = Ready(hard_state=hs, entries=list(entries), snapshot=snapshot)
    disk.persist(rd, None)
    await s.save(rd.hard_state, rd.entries, rd.snapshot)


# ---------------------------------------------------------------- basics

def test_open_creates_directory_and_records_bootstrap_conf(tmp_path):
    d = tmp_path / "a" / "b"

    async def main():
        async with await RaftStorage.open(d) as s:
            rs = s.restore_state()
            assert rs.hard_state == HardState() and rs.snapshot is None
            assert rs.entries == [] and rs.conf is None
            assert (s.first_index(), s.last_index()) == (1, 0)
            assert s.snapshot() is None
            assert s.restore_state(CONF).conf == CONF
            await s.save(HardState(1, 0, 0), [E(1, 1)], None)
        assert segments(d) == [segment_name(1)]
        async with await RaftStorage.open(d) as s:
            # Stored: the bootstrap membership comes from the log now.
            assert s.restore_state().conf == CONF
            assert s.restore_state(CONF2).conf == CONF
            assert s.restore_state().entries == [E(1, 1)]
    run(main())


def test_round_trip_mix_of_saves(tmp_path):
    async def main():
        disk = Disk(CONF)
        async with await RaftStorage.open(tmp_path) as s:
            s.restore_state(CONF)
            await persist(s, disk, HardState(1, 1, 0), ents(1, 1, 5))
            await persist(s, disk, None, [E(1, 6, b"", EntryType.CONF_CHANGE)])
            await persist(s, disk, HardState(1, 1, 4))
            await persist(s, disk, HardState(2, 3, 4), [E(2, 7, os.urandom(100 * KiB))])
            await check_against(s, disk)
            sn = snap(4, 1)
            disk.save_snapshot(sn)
            await s.save_snapshot(sn)
            await check_against(s, disk)
            # An InstallSnapshot Ready with entries after it and a hard state.
            await persist(s, disk, HardState(3, 2, 10), [E(3, 11), E(3, 12)],
                          snap(10, 3, os.urandom(3000), CONF2))
            await check_against(s, disk)
            assert (s.first_index(), s.last_index()) == (11, 12)
        s = await reopened(tmp_path, disk)
        await s.close()
    run(main())


def test_truncating_appends(tmp_path):
    async def main():
        disk = Disk(CONF)
        # Small segments: the truncations cross segment boundaries.
        kw = dict(segment_bytes=200)
        s = await RaftStorage.open(tmp_path, **kw)
        await persist(s, disk, HardState(1, 1, 2), ents(1, 1, 10))
        await persist(s, disk, HardState(2, 2, 2), ents(2, 6, 7))      # 8..10 gone
        assert s.last_index() == 7 and s.term(6) == 2 and s.term(5) == 1
        await persist(s, disk, None, ents(2, 8, 12))
        await persist(s, disk, HardState(3, 0, 2), ents(3, 3, 3))      # back to 3
        await persist(s, disk, None, ents(3, 4, 9))
        await persist(s, disk, HardState(4, 0, 2), [E(4, 9, b"last")])  # replace the tail
        await check_against(s, disk)
        await s.close()
        assert len(segments(tmp_path)) > 2
        s = await reopened(tmp_path, disk, **kw)
        await s.close()
    run(main())


def test_one_fdatasync_per_save(tmp_path):
    async def main():
        async with await RaftStorage.open(tmp_path) as s:
            await s.save(HardState(1, 1, 0), [E(1, 1)], None)
            before = s.stats
            batch = [E(1, i, os.urandom(4 * KiB)) for i in range(2, 66)]
            await s.save(HardState(1, 1, 1), batch, None)
            after = s.stats
            assert after["syncs"] - before["syncs"] == 1
            assert after["records_written"] - before["records_written"] == 65
            assert after["last_index"] == 65
            # A big entry goes out as its own iovec; still one sync.
            await s.save(None, [E(1, 66, os.urandom(300 * KiB))], None)
            assert s.stats["syncs"] - after["syncs"] == 1
    run(main())


def test_second_open_of_a_directory_is_refused(tmp_path):
    async def main():
        async with await RaftStorage.open(tmp_path):
            with pytest.raises(RuntimeError, match="in use"):
                await RaftStorage.open(tmp_path)
        async with await RaftStorage.open(tmp_path):
            pass
    run(main())


def test_cancelled_save_still_completes_and_memory_follows(tmp_path):
    async def main():
        disk = Disk(CONF)
        async with await RaftStorage.open(tmp_path) as s:
            await persist(s, disk, HardState(1, 1, 0), ents(1, 1, 3))
            rd = Ready(hard_state=HardState(1, 1, 3), entries=ents(1, 4, 8))
            t = asyncio.ensure_future(s.save(rd.hard_state, rd.entries, None))
            await asyncio.sleep(0)          # let it start, then cancel the caller
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            # The cancellation was delivered after the write completed.
            assert s.last_index() == 8 and s.hard_state == rd.hard_state
            disk.persist(rd, None)
            # The next save queues behind the cancelled one and sees its effect.
            await persist(s, disk, None, ents(1, 9, 9))
            await check_against(s, disk)
        s = await reopened(tmp_path, disk)
        await s.close()
    run(main())


def test_entry_records_decode_from_any_msgpack_encoding():
    """ENTRY bodies are written fixed-width (so data needs no copy) and read
    by a fast path; a body encoded by any msgpack writer reads the same."""
    e = Entry(3, 70000, EntryType.CONF_CHANGE, bytes(range(256)) * 2)
    head, data = rec.encode_entry(e)
    ours = head + data
    assert rec.decode_record(ours, 0, len(ours)) == (rec.REC_ENTRY, e, len(ours))
    assert msgpack.unpackb(ours[rec.HEADER_SIZE + 1:]) == [3, 70000, 1, e.data]
    payload = bytes([rec.REC_ENTRY]) + msgpack.packb([3, 70000, 1, e.data])
    theirs = rec.RECORD_HEADER.pack(len(payload), crc32c(payload)) + payload
    assert len(theirs) < len(ours)
    assert rec.decode_record(theirs, 0, len(theirs)) == (rec.REC_ENTRY, e, len(theirs))


def test_scan_after_a_bad_record_is_bounded():
    """Entry data full of fake record headers cannot make the search for
    valid records after a torn one quadratic: it is filtered cheaply and
    CRC work is capped."""
    fake_head, _ = rec.encode_entry(E(1, 5, b"z" * 4000))
    junk = (fake_head + b"z" * 100) * 300          # headers claim 4000 bytes each
    assert rec.find_valid_record(junk, 0, len(junk)) is None
    with pytest.raises(rec.ScanBudgetExceeded):
        rec.find_valid_record(junk, 0, len(junk), budget=100_000)
    real_head, real_data = rec.encode_entry(E(2, 9, b"real"))
    buf = junk + real_head + real_data
    assert rec.find_valid_record(buf, 0, len(buf)) == len(junk)


# ---------------------------------------------------------------- bad arguments

def test_bad_arguments_raise_value_error_without_writing(tmp_path):
    async def main():
        async with await RaftStorage.open(tmp_path) as s:
            await s.save(HardState(2, 1, 3), ents(2, 1, 5), None)
            await s.save_snapshot(snap(3, 2))
            files, stats = tree(tmp_path), s.stats
            bad = [
                ("not contiguous", [E(2, 6), E(2, 8)], None),
                ("not contiguous", [E(2, 6), E(2, 5)], None),
                ("leaves a gap", [E(2, 7)], None),
                ("at or below the snapshot", [E(2, 3)], None),
                ("terms decrease", [E(3, 6), E(2, 7)], None),
                ("lower than the term", [E(1, 6)], None),
                ("unknown entry type", [Entry(2, 6, 7, b"")], None),
                ("data must be bytes", [Entry(2, 6, EntryType.NORMAL, "text")], None),
                ("not an Entry", [(2, 6)], None),
                ("older than the stored snapshot", [], snap(2, 2)),
                ("has term", [], snap(3, 1)),
                ("has no data", [], Snapshot(SnapshotMeta(9, 2, CONF))),
                ("index must be >= 1", [], snap(0, 0)),
            ]
            for why, entries, sn in bad:
                with pytest.raises(ValueError, match=why):
                    await s.save(HardState(2, 1, 3), entries, sn)
            with pytest.raises(ValueError, match="lower than the stored term"):
                await s.save(HardState(1, 0, 0), [], None)
            with pytest.raises(ValueError, match="HardState"):
                await s.save((2, 1, 3), [], None)
            for why, sn in [("beyond the stored log", snap(6, 2)),
                            ("has term 2, the snapshot says 1", snap(4, 1)),
                            ("older than the stored snapshot", snap(2, 2)),
                            ("has no data", Snapshot(SnapshotMeta(4, 2, CONF)))]:
                with pytest.raises(ValueError, match=why):
                    await s.save_snapshot(sn)
            assert tree(tmp_path) == files
            assert s.stats == stats
            # Still fully usable.
            await s.save(HardState(2, 1, 5), ents(2, 6, 6), None)
            assert s.last_index() == 6
    run(main())


# ---------------------------------------------------------------- the model

class _Gen:
    """Draws Ready-like saves that a correct RaftCore could produce, from the
    model's state (so truncations stay above the commit index, terms never
    decrease, snapshots move forward)."""

    def __init__(self, data, disk):
        self.data = data
        self.disk = disk
        self.term = 1
        self.commit = 0

    def draw(self, strategy):
        return self.data.draw(strategy)

    @property
    def base(self):
        return self.disk.snapshot.meta.index if self.disk.snapshot else 0

    @property
    def last(self):
        return self.base + len(self.disk.entries)

    def term_at(self, index):
        if index == 0:
            return 0
        if index == self.base:
            return self.disk.snapshot.meta.term
        return self.disk.entries[index - self.base - 1].term

    def payload(self):
        return self.draw(st.binary(max_size=self.draw(st.sampled_from([8, 64, 700]))))

    def entries_from(self, first, prev_term, n):
        out, t = [], prev_term
        for i in range(first, first + n):
            t = max(t, self.draw(st.integers(max(1, t), self.term)))
            out.append(Entry(t, i, EntryType(self.draw(st.integers(0, 1))), self.payload()))
        return out

    def hard_state(self, last):
        if self.draw(st.booleans()):
            return None
        self.commit = max(self.commit, self.draw(st.integers(self.commit, max(self.commit, last))))
        return HardState(self.term, self.draw(st.integers(0, 3)), self.commit)

    def append(self):
        if self.draw(st.integers(0, 4)) == 0:
            self.term += 1
        lo = max(self.base, self.commit) + 1
        first = self.draw(st.integers(lo, self.last + 1))
        n = self.draw(st.integers(0, 4))
        entries = self.entries_from(first, self.term_at(first - 1), n)
        # A non-empty append ends the log at its last entry (truncating).
        return self.hard_state(first + n - 1 if n else self.last), entries, None

    def install(self):
        self.term += self.draw(st.integers(0, 1))
        index = self.draw(st.integers(max(self.base, self.commit) + 1, self.last + 3))
        if index <= self.last and self.draw(st.booleans()):
            term = self.term_at(index)              # matches the stored entry
        else:
            term = self.draw(st.integers(max(1, self.term_at(min(index - 1, self.last))),
                                         self.term))
        conf = self.draw(st.sampled_from([CONF, CONF2]))
        sn = Snapshot(SnapshotMeta(index, term, conf), self.payload())
        self.commit = index
        # Entries after the snapshot survive only if the stored entry at its
        # index has its term (Raft §7); otherwise the log restarts after it.
        keeps = index <= self.last and self.term_at(index) == term
        new_last = max(self.last, index) if keeps else index
        entries = []
        if self.draw(st.booleans()):
            first = self.draw(st.integers(index + 1, new_last + 1))
            prev = term if first - 1 == index else self.term_at(first - 1)
            entries = self.entries_from(first, prev, self.draw(st.integers(1, 3)))
        return HardState(self.term, 0, self.commit), entries, sn

    def app_snapshot(self):
        lo = max(self.base, 1)
        if self.commit < lo:
            return None
        index = self.draw(st.integers(lo, self.commit))
        conf = self.draw(st.sampled_from([CONF, CONF2]))
        return Snapshot(SnapshotMeta(index, self.term_at(index), conf), self.payload())


async def _model_run(d, data, segment_bytes, keep):
    disk = Disk(CONF)
    gen = _Gen(data, disk)
    kw = dict(segment_bytes=segment_bytes, keep_snapshots=keep)
    s = await RaftStorage.open(d, **kw)
    try:
        s.restore_state(CONF)
        for _ in range(data.draw(st.integers(1, 30), label="steps")):
            op = data.draw(st.sampled_from(
                ["append"] * 5 + ["install", "app_snapshot", "app_snapshot", "reopen",
                                  "torn"]))
            if op == "append":
                await persist(s, disk, *gen.append())
            elif op == "torn":
                s = await _torn_append(s, d, disk, gen, kw)
            elif op == "install":
                await persist(s, disk, *gen.install())
            elif op == "app_snapshot":
                sn = gen.app_snapshot()
                if sn is not None:
                    disk.save_snapshot(sn)
                    await s.save_snapshot(sn)
            else:
                await s.close()
                s = await reopened(d, disk, **kw)
            await check_against(s, disk)
            # Compaction keeps at most `keep` snapshot files.
            assert s.stats["snapshots"] <= keep
        await s.close()
        s = await reopened(d, disk, **kw)
    finally:
        await s.close()


async def _torn_append(s, d, disk, gen, kw):
    """A crash in the middle of an append: the batch's records are cut at
    a random byte. Recovery must equal the model with that many records."""
    hs, entries, _ = gen.append()
    rd = Ready(hard_state=hs, entries=entries)
    seg_before = segments(d)[-1]
    size_before = os.path.getsize(os.path.join(d, seg_before))
    await s.save(hs, entries, None)
    await s.close()
    path = os.path.join(d, segments(d)[-1])
    start = size_before if segments(d)[-1] == seg_before else 0
    header = 2 if start == 0 and os.path.getsize(path) > 0 else 0
    batch = [r for r in parse(path) if r[0] >= start]
    assert len(batch) == header + len(entries) + (hs is not None)
    cut = gen.draw(st.integers(start, os.path.getsize(path)))
    os.truncate(path, cut)
    complete = sum(1 for r in batch if r[1] <= cut)
    disk.persist(rd, _Cut(max(0, complete - header)))
    gen.commit = min(gen.commit, gen.last)      # the torn commit was never durable
    return await reopened(d, disk, **kw)


class _Cut:
    """A stand-in for Disk.persist's rng: keep exactly `n` records."""

    def __init__(self, n):
        self.n = n

    def randrange(self, _):
        return self.n


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), segment_bytes=st.sampled_from([1, 300, 2000, 1 << 20]),
       keep=st.integers(1, 3))
def test_recovery_matches_the_model(data, segment_bytes, keep):
    with tempfile.TemporaryDirectory() as d:
        run(_model_run(d, data, segment_bytes, keep))


# ---------------------------------------------------------------- rotation

def test_rotation_headers_and_compaction_keep_the_hard_state(tmp_path):
    async def main():
        disk = Disk(CONF)
        kw = dict(segment_bytes=2 * KiB, keep_snapshots=1)
        s = await RaftStorage.open(tmp_path, **kw)
        s.restore_state(CONF)
        # The hard state is written once, in the first segment only.
        await persist(s, disk, HardState(7, 2, 0), [E(7, 1)])
        for i in range(2, 200):
            await persist(s, disk, None, [E(7, i, os.urandom(100))])
        await check_against(s, disk)
        n = len(segments(tmp_path))
        assert n > 5 and s.stats["rolls"] == n - 1
        for k, name in enumerate(segments(tmp_path)):
            # Each segment starts with the hard state and snapshot mark that
            # were current when it was created.
            recs = parse(tmp_path / name)
            assert [r[2] for r in recs[:2]] == [rec.REC_HARD_STATE, rec.REC_SNAPSHOT_MARK]
            assert recs[0][3] == (HardState() if k == 0 else HardState(7, 2, 0))
            assert recs[1][3] == rec.Mark(0, 0, CONF)
        sn = snap(150, 7)
        disk.save_snapshot(sn)
        await s.save_snapshot(sn)
        left = segments(tmp_path)
        assert segment_name(1) not in left and len(left) < n
        assert s.stats["segments_deleted"] == n - len(left)
        # The oldest remaining segment holds an entry > 150 (or is the
        # active one, which is never deleted).
        assert left[0] == left[-1] or max(r[3].index for r in parse(tmp_path / left[0])
                                          if r[2] == rec.REC_ENTRY) > 150
        await s.close()
        s = await reopened(tmp_path, disk, **kw)
        assert s.restore_state().hard_state == HardState(7, 2, 0)
        # A second snapshot replaces the first (keep_snapshots=1).
        await persist(s, disk, None, [E(7, i) for i in range(200, 260)])
        sn = snap(255, 7)
        disk.save_snapshot(sn)
        await s.save_snapshot(sn)
        assert [n for n in os.listdir(tmp_path) if n.endswith(".snap")] == \
            [snapshot_name(255, 7)]
        await s.close()
        s = await reopened(tmp_path, disk, **kw)
        await s.close()
    run(main())


# ---------------------------------------------------------------- torn tails

async def _build_tail_log(d):
    """Saves whose last ones are in a fresh segment; returns the saves and,
    for the last segment, the byte range of each save's batch."""
    kw = dict(segment_bytes=1500, keep_snapshots=2)
    s = await RaftStorage.open(d, **kw)
    s.restore_state(CONF)
    saves = []

    async def save(hs, entries, sn=None):
        await s.save(hs, entries, sn)
        saves.append((hs, entries, sn, segments(d)[-1], os.path.getsize(
            os.path.join(d, segments(d)[-1]))))

    await save(HardState(1, 1, 0), [E(1, i, os.urandom(60)) for i in range(1, 4)])
    i = 4
    while len(segments(d)) < 3:
        await save(HardState(1, 1, i - 2), [E(1, i, os.urandom(200))])
        i += 1
    await s.save_snapshot(snap(i - 2, 1))
    saves.append(("app", snap(i - 2, 1)))
    # Fill the active segment up to its limit: the tail saves start a new one.
    while os.path.getsize(os.path.join(d, segments(d)[-1])) < 1500:
        await save(None, [E(1, i, os.urandom(300))])
        i += 1
    # The tail: a truncating append, an InstallSnapshot with entries, a
    # hard-state-only save, and a plain append.
    tail_from = len(saves) - 1
    await save(HardState(2, 0, i - 3), [E(2, i - 1, os.urandom(50)), E(2, i, b"")])
    await save(HardState(2, 0, i + 5), [E(2, i + 6, os.urandom(40))],
               snap(i + 5, 2, os.urandom(500), CONF2))
    await save(HardState(3, 2, i + 5), [])
    await save(None, [E(3, i + 7, os.urandom(30)), E(3, i + 8, os.urandom(70))])
    await s.close()
    return saves, tail_from


def _model_at(saves, upto, cut=None):
    """The model after saves[:upto] and, with `cut`, the first `cut` records
    of saves[upto]."""
    disk = Disk(CONF)
    for item in saves[:upto] + ([saves[upto]] if cut is not None else []):
        if item[0] == "app":
            disk.save_snapshot(item[1])
            continue
        hs, entries, sn = item[:3]
        rd = Ready(hard_state=hs, entries=list(entries), snapshot=sn)
        if item is saves[upto] and cut is not None and upto < len(saves):
            disk.persist(rd, _Cut(cut))
        else:
            disk.persist(rd, None)
    return disk


def test_torn_tail_at_every_byte_offset(tmp_path, caplog):
    pristine = tmp_path / "pristine"
    saves, tail_from = run(_build_tail_log(pristine))
    last_seg = segments(pristine)[-1]
    seg_path = pristine / last_seg
    full = seg_path.read_bytes()
    records = parse(seg_path)
    # Which save each record of the last segment belongs to: the segment
    # starts with the header (2 records), then the tail saves in order.
    assert all(sv[3] == last_seg for sv in saves[tail_from + 1:])
    owner = []                       # per record: (save number, records before it in that save)
    k = 2
    for n in range(tail_from + 1, len(saves)):
        hs, entries, sn = saves[n][:3]
        count = (sn is not None) + len(entries) + (hs is not None)
        owner += [(n, j) for j in range(count)]
        k += count
    assert k == len(records)
    work = tmp_path / "work"

    async def recover_at(size):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        os.truncate(work / last_seg, size)
        complete = [r for r in records if r[1] <= size]
        if len(complete) <= 2:           # header torn or complete: nothing of the tail
            disk = _model_at(saves, tail_from + 1)
        else:
            n, j = owner[len(complete) - 3]
            disk = _model_at(saves, n, j + 1)
        s = await reopened(work, disk, segment_bytes=1500)
        try:
            # A lone HARD_STATE (half a header) goes too: its batch was torn.
            boundary = complete[-1][1] if len(complete) >= 2 else 0
            assert os.path.getsize(work / last_seg) == boundary
            if size == len(full):
                # Writing after recovery works and survives another recovery.
                await persist(s, disk, None, [E(3, s.last_index() + 1)])
        finally:
            await s.close()
        if size == len(full) or size == boundary:
            return boundary
        s = await reopened(work, disk, segment_bytes=1500)
        await s.close()
        return boundary

    async def main():
        with caplog.at_level(logging.WARNING, logger="objcache.raft.storage"):
            for size in range(len(full) + 1):
                caplog.clear()
                boundary = await recover_at(size)
                torn = [r for r in caplog.records if "torn tail" in r.getMessage()]
                assert len(torn) == (0 if size == boundary else 1), size
                if torn:
                    assert f"{size - boundary} bytes" in torn[0].getMessage()
    run(main())


def test_flipped_bytes_in_the_tail(tmp_path):
    pristine = tmp_path / "pristine"
    saves, _ = run(_build_tail_log(pristine))
    last_seg = segments(pristine)[-1]
    full = (pristine / last_seg).read_bytes()
    records = parse(pristine / last_seg)
    last_off, _, _, _ = records[-1]
    work = tmp_path / "work"
    # The model without the very last record.
    hs, entries, sn = saves[-1][:3]
    disk_without_last = _model_at(saves, len(saves) - 1, len(entries) - 1)
    rng = random.Random(5)

    async def flip(offset):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        data = bytearray(full)
        data[offset] ^= 1 << rng.randrange(8)
        (work / last_seg).write_bytes(data)
        return tree(work)

    async def main():
        # Any flip in the last record: it is dropped as a torn tail.
        for offset in range(last_off, len(full)):
            await flip(offset)
            s = await reopened(work, disk_without_last, segment_bytes=1500)
            await s.close()
            assert os.path.getsize(work / last_seg) == last_off
        # A flip in an earlier record, with a valid one after it: damage in
        # the middle. Recovery refuses and changes nothing.
        for off, end, _, _ in records[-4:-1]:
            for offset in sorted({off, off + 4, off + 8, (off + end) // 2, end - 1}):
                before = await flip(offset)
                with pytest.raises(CorruptLogError) as err:
                    await RaftStorage.open(work)
                assert last_seg in str(err.value) and f"offset {off}:" in str(err.value)
                assert "valid record follows" in str(err.value)
                assert tree(work) == before
    run(main())


# ---------------------------------------------------------------- corruption

async def _multi_segment_log(d, **kw):
    kw.setdefault("segment_bytes", 1 * KiB)
    disk = Disk(CONF)
    s = await RaftStorage.open(d, **kw)
    s.restore_state(CONF)
    await persist(s, disk, HardState(1, 1, 0), [E(1, 1)])
    for i in range(2, 60):
        await persist(s, disk, HardState(1, 1, i - 1), [E(1, i, os.urandom(90))])
    await s.close()
    assert len(segments(d)) >= 4
    return disk


def test_corrupt_record_in_a_middle_segment(tmp_path):
    run(_multi_segment_log(tmp_path))
    victim = segments(tmp_path)[1]
    recs = parse(tmp_path / victim)
    off, end = recs[3][0], recs[3][1]
    data = bytearray((tmp_path / victim).read_bytes())
    data[(off + end) // 2] ^= 0x40
    (tmp_path / victim).write_bytes(data)
    # A leftover tmp file must survive a refused recovery, too.
    (tmp_path / "snap-00000000000000000009-1.snap.1-0.tmp").write_bytes(b"partial")
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError) as err:
        run(RaftStorage.open(tmp_path))
    msg = str(err.value)
    assert victim in msg and f"offset {off}:" in msg and "CRC mismatch" in msg
    assert "not the last" in msg
    assert tree(tmp_path) == before


def test_truncated_middle_segment_is_corruption_not_a_torn_tail(tmp_path):
    run(_multi_segment_log(tmp_path))
    victim = tmp_path / segments(tmp_path)[0]
    os.truncate(victim, os.path.getsize(victim) - 5)
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError, match="runs past the end"):
        run(RaftStorage.open(tmp_path))
    assert tree(tmp_path) == before


def test_missing_segment(tmp_path):
    run(_multi_segment_log(tmp_path))
    names = segments(tmp_path)
    os.unlink(tmp_path / names[2])
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError, match=f"{names[2][:-4]}.*missing"):
        run(RaftStorage.open(tmp_path))
    assert tree(tmp_path) == before


def test_missing_first_segment_without_a_snapshot(tmp_path):
    run(_multi_segment_log(tmp_path))
    os.unlink(tmp_path / segments(tmp_path)[0])
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError, match=r"entries 1\.\.\d+ are missing"):
        run(RaftStorage.open(tmp_path))
    assert tree(tmp_path) == before


def test_entries_not_contiguous_in_the_log(tmp_path):
    run(_multi_segment_log(tmp_path))
    last = tmp_path / segments(tmp_path)[-1]
    head, data = rec.encode_entry(E(1, 99))
    with open(last, "ab") as f:
        f.write(head + data)
        f.write(rec.encode_hard_state(HardState(1, 1, 5)))
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError, match="ENTRY 99 leaves a gap"):
        run(RaftStorage.open(tmp_path))
    assert tree(tmp_path) == before


def test_segment_without_header_is_corruption(tmp_path):
    run(_multi_segment_log(tmp_path))
    names = segments(tmp_path)
    with open(tmp_path / names[1], "r+b") as f:     # drop its two header records
        recs = parse(tmp_path / names[1])
        rest = f.read()[recs[2][0]:]
        f.seek(0)
        f.write(rest)
        f.truncate()
    with pytest.raises(CorruptLogError, match="does not start with HARD_STATE"):
        run(RaftStorage.open(tmp_path))


def test_leftover_tmp_files_are_removed(tmp_path):
    async def main():
        disk = await _multi_segment_log(tmp_path)
        (tmp_path / "snap-00000000000000000042-1.snap.77-3.tmp").write_bytes(b"x" * 10)
        s = await reopened(tmp_path, disk, segment_bytes=KiB)
        await s.close()
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    run(main())


def test_unacknowledged_snapshot_file_is_dropped(tmp_path):
    """A snapshot file written without its SNAPSHOT_MARK (a crash between
    the two) belongs to a save that was never acknowledged."""
    async def main():
        disk = await _multi_segment_log(tmp_path)
        s = await RaftStorage.open(tmp_path)
        path = s._write_snapshot_file(snap(40, 1))      # the file, no mark
        await s.close()
        assert os.path.exists(path)
        s = await reopened(tmp_path, disk, segment_bytes=KiB)
        await s.close()
        assert not os.path.exists(path)
    run(main())


# ---------------------------------------------------------------- damaged snapshots

async def _two_snapshots(d, keep):
    kw = dict(segment_bytes=1 * KiB, keep_snapshots=keep)
    s = await RaftStorage.open(d, **kw)
    s.restore_state(CONF)
    saved = []
    for i in range(1, 121):
        e = E(1 + i // 50, i, os.urandom(80))
        saved.append(e)
        await s.save(HardState(e.term, 1, i - 1), [e], None)
        if i in (50, 100):
            await s.save_snapshot(snap(i, e.term, b"state@%d" % i))
    hs = s.hard_state
    await s.close()
    return saved, hs


def test_damaged_latest_snapshot_falls_back_to_an_older_one(tmp_path, caplog):
    saved, hs = run(_two_snapshots(tmp_path, keep=2))
    latest = tmp_path / snapshot_name(100, 3)
    data = bytearray(latest.read_bytes())
    data[-1] ^= 0xFF
    latest.write_bytes(data)

    async def main():
        with caplog.at_level(logging.WARNING, logger="objcache.raft.storage"):
            s = await RaftStorage.open(tmp_path, segment_bytes=KiB)
        assert any("snapshot at index 100 is damaged" in r.getMessage()
                   for r in caplog.records)
        rs = s.restore_state()
        assert rs.snapshot == SnapshotMeta(50, 2, CONF)
        assert s.snapshot().data == b"state@50"
        assert rs.entries == saved[50:] and rs.hard_state == hs
        await s.close()
        assert os.path.exists(str(latest) + ".corrupt")
        # Stable: the next recovery agrees, and the log keeps working.
        s = await RaftStorage.open(tmp_path, segment_bytes=KiB)
        assert s.restore_state() == rs
        await s.save(None, [E(3, 121)], None)
        await s.save_snapshot(snap(110, 3))
        await s.close()
        s = await RaftStorage.open(tmp_path, segment_bytes=KiB)
        assert s.restore_state().snapshot.index == 110
        assert s.restore_state().entries == saved[110:] + [E(3, 121)]
        await s.close()
    run(main())


def test_damaged_snapshot_without_a_usable_older_one(tmp_path):
    run(_two_snapshots(tmp_path, keep=1))
    # keep_snapshots=1: the log before 100 was compacted away.
    assert [n for n in os.listdir(tmp_path) if n.endswith(".snap")] == [snapshot_name(100, 3)]
    latest = tmp_path / snapshot_name(100, 3)
    data = bytearray(latest.read_bytes())
    data[30] ^= 0x01
    latest.write_bytes(data)
    before = tree(tmp_path)
    with pytest.raises(CorruptLogError, match="snapshot the log needs is damaged"):
        run(RaftStorage.open(tmp_path))
    assert tree(tmp_path) == before
    # Missing altogether: the same.
    os.unlink(latest)
    with pytest.raises(CorruptLogError, match="needs is missing"):
        run(RaftStorage.open(tmp_path))


# ---------------------------------------------------------------- a real crash

CHILD = r"""
import asyncio, sys
from objcache.raft.storage import RaftStorage
from objcache.raft.types import ConfState, Entry, HardState, Snapshot, SnapshotMeta

def payload(index, term):
    return (b"%d/%d;" % (index, term)) * (1 + index % 40)

async def main(d, term):
    s = await RaftStorage.open(d, segment_bytes=16 << 10, keep_snapshots=2)
    s.restore_state(ConfState(frozenset({1})))
    index = s.last_index()
    n = 0
    while True:
        k = 1 + n % 9
        batch = [Entry(term, index + j, data=payload(index + j, term))
                 for j in range(1, k + 1)]
        await s.save(HardState(term, 1, index), batch, None)
        index += k
        n += 1
        print(index, flush=True)        # acknowledged: durable
        if n % 25 == 0:
            at = index - 5
            await s.save_snapshot(Snapshot(SnapshotMeta(at, s.term(at),
                                  ConfState(frozenset({1}))), b"upto %d" % at))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _payload(index, term):
    return (b"%d/%d;" % (index, term)) * (1 + index % 40)


def test_sigkill_loses_no_acknowledged_entry(tmp_path):
    d = tmp_path / "raft"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    acked_max = 0
    for round_, want in enumerate([150, 400, 77, 260], start=1):
        with open(tmp_path / f"child{round_}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(round_)],
                                    stdout=subprocess.PIPE, stderr=err, cwd=REPO,
                                    env=env, text=True)
            acked = []
            try:
                for line in proc.stdout:
                    acked.append(int(line))
                    if len(acked) >= want:
                        break
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            acked += [int(x) for x in proc.stdout.read().split()]   # printed before the kill
            proc.stdout.close()
        assert len(acked) >= want, (tmp_path / f"child{round_}.err").read_text()
        acked_max = max(acked_max, acked[-1])

        async def check():
            async with await RaftStorage.open(d, segment_bytes=16 << 10) as s:
                rs = s.restore_state()
                assert s.last_index() >= acked_max
                assert rs.conf is None or rs.conf == ConfState(frozenset({1}))
                for e in rs.entries:
                    assert e.data == _payload(e.index, e.term), e
                if rs.snapshot is not None:
                    assert s.snapshot().data == b"upto %d" % rs.snapshot.index
                return s.stats
        stats = run(check())
        assert stats["segments"] <= 12          # compaction keeps up
    assert acked_max > 900


# ---------------------------------------------------------------- a full disk

@pytest.mark.root
def test_full_disk(small_tmpfs):
    d = small_tmpfs / "raft"
    filler = small_tmpfs / "filler"
    kw = dict(segment_bytes=48 * KiB, keep_snapshots=1)

    async def main():
        disk = Disk(CONF)
        s = await RaftStorage.open(d, **kw)
        s.restore_state(CONF)
        filler.write_bytes(b"F" * (600 * KiB))
        i, failure = 0, None
        while failure is None:
            hs = HardState(1, 1, i)
            batch = [E(1, i + j, os.urandom(3 * KiB)) for j in (1, 2)]
            try:
                await s.save(hs, batch, None)
            except OSError as exc:
                failure = exc
                break
            disk.persist(Ready(hard_state=hs, entries=batch), None)
            i += 2
        assert failure.errno == errno.ENOSPC and i > 20
        await check_against(s, disk)                  # memory unchanged
        # Still full: further saves and a snapshot fail, cleanly.
        with pytest.raises(OSError) as err:
            await s.save(None, [E(1, i + 1, os.urandom(8 * KiB))], None)
        assert err.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as err:
            await s.save_snapshot(snap(i - 4, 1, os.urandom(64 * KiB)))
        assert err.value.errno == errno.ENOSPC
        assert not [n for n in os.listdir(d) if n.endswith((".tmp", ".snap"))]
        await check_against(s, disk)
        await s.close()
        # Recovery on the full disk: everything acknowledged is there.
        s = await reopened(d, disk, **kw)
        filler.unlink()                               # free space
        for _ in range(5):
            await persist(s, disk, HardState(1, 1, i), [E(1, i + 1, os.urandom(3 * KiB))])
            i += 1
        sn = snap(i - 1, 1, os.urandom(20 * KiB))
        disk.save_snapshot(sn)
        await s.save_snapshot(sn)
        assert s.stats["segments_deleted"] > 0
        await check_against(s, disk)
        await s.close()
        s = await reopened(d, disk, **kw)
        await s.close()
    run(main())
