"""Disk tier (objcache/cache/disk.py): file format, recovery rules, CRC
checks, kill -9 durability of dirty writes, and a real full file system."""
import asyncio
import errno
import os
import signal
import subprocess
import sys

import pytest

from objcache._ext import crc32c
from objcache.cache import CorruptChunkError
from objcache.cache.disk import (HEADER_SIZE, STATE_CLEAN, STATE_DIRTY, STATE_OFFSET,
                                 decode_header, encode_header, file_size)

from . import CS, Loader, make_cache, pattern, read_bytes, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = (9, 4)


def chunk_files(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".chunk"))


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def make_clean_file(d, key=K, version=3, length=5000):
    """A closed cache directory holding one clean chunk file."""
    async with make_cache(d) as c:
        await c.write(key, version, pattern(key, version, length))
        c.mark_clean(key, version)
    (name,) = chunk_files(d)
    return os.path.join(d, name)


# ---------------------------------------------------------------- the format

def test_header_round_trip_and_checks():
    h = encode_header((1, 2), 3, 4096, 5, 0xDEADBEEF, dirty=True)
    assert len(h) == HEADER_SIZE
    d = decode_header(h)
    assert (d.key, d.version, d.length, d.seq, d.crc, d.dirty) == \
        ((1, 2), 3, 4096, 5, 0xDEADBEEF, True)
    clean = h[:STATE_OFFSET] + STATE_CLEAN.to_bytes(4, "little") + h[STATE_OFFSET + 4:]
    assert not decode_header(clean).dirty
    odd = h[:STATE_OFFSET] + b"????" + h[STATE_OFFSET + 4:]
    assert decode_header(odd).dirty                 # unknown state reads as dirty
    for bad in (h[:40], b"X" + h[1:], h[:20] + b"\x01" + h[21:]):
        with pytest.raises(CorruptChunkError):
            decode_header(bad)
    assert STATE_DIRTY != STATE_CLEAN
    assert file_size(0) == HEADER_SIZE and file_size(1) == HEADER_SIZE + 4096


def test_file_layout(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path, length=5000)
        raw = open(path, "rb").read()
        assert len(raw) == HEADER_SIZE + 5000
        h = decode_header(raw[:HEADER_SIZE])
        assert (h.key, h.version, h.length, h.dirty) == (K, 3, 5000, False)
        assert raw[HEADER_SIZE:] == pattern(K, 3, 5000) and crc32c(raw[HEADER_SIZE:]) == h.crc
        assert os.path.basename(path).startswith("0000000000000009-0000000000000004-"
                                                 "0000000000000003-")
    run(main())


# ------------------------------------------------------------------ recovery

def test_mark_clean_survives_reopen(tmp_path):
    async def main():
        await make_clean_file(tmp_path)
        async with make_cache(tmp_path) as c:
            assert c.peek(K) == (3, False) and c.dirty_chunks() == []
            assert await read_bytes(c, K, 3) == pattern(K, 3, 5000)
    run(main())


def test_recovery_removes_leftovers_and_superseded_versions(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path, version=3)
        # An older dirty version of the same chunk (as if its removal never ran).
        async with make_cache(tmp_path / "other") as c:
            await c.write(K, 2, b"older")
        (older,) = chunk_files(tmp_path / "other")
        os.rename(tmp_path / "other" / older, tmp_path / older)
        (tmp_path / "0000000000000009-0000000000000004-0000000000000009-00000000000000ff"
                    ".chunk.tmp").write_bytes(b"half a write")
        (tmp_path / "notes.txt").write_text("not ours")
        async with make_cache(tmp_path) as c:
            assert c.peek(K) == (3, False)                  # the newest wins
            assert c.dirty_chunks() == []
        names = sorted(os.listdir(tmp_path))
        assert os.path.basename(path) in names and older not in names
        assert not [n for n in names if n.endswith(".tmp")]
        assert "notes.txt" in names                         # unknown files are left alone
    run(main())


def test_clean_files_over_budget_are_evicted_at_open(tmp_path):
    async def main():
        async with make_cache(tmp_path, disk_chunks=10) as c:
            for i in range(6):
                await c.write((1, i), 1, pattern((1, i), 1, CS))
                c.mark_clean((1, i), 1)
        async with make_cache(tmp_path, disk_chunks=4) as c:
            assert c.recovery["evicted"] == 2 and c.stats["disk_chunks"] == 4
        assert len(chunk_files(tmp_path)) == 4
    run(main())


def test_dirty_data_over_budget_is_kept(tmp_path):
    async def main():
        async with make_cache(tmp_path, disk_chunks=10) as c:
            for i in range(6):
                await c.write((1, i), 1, pattern((1, i), 1, CS))
        async with make_cache(tmp_path, disk_chunks=4, dirty_wait_timeout=0.1) as c:
            assert len(c.dirty_chunks()) == 6               # nothing dirty is dropped
            with pytest.raises(OSError) as err:
                await c.write((2, 0), 1, b"x")
            assert err.value.errno == errno.ENOSPC
            for i in range(3):
                c.mark_clean((1, i), 1)
            await c.write((2, 0), 1, b"x")                  # room again
    run(main())


# ---------------------------------------------------------------- corruption

def test_corrupt_clean_file_is_dropped_at_open_when_verifying(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path)
        flip_byte(path, HEADER_SIZE + 100)
        load = Loader(length=5000)
        async with make_cache(tmp_path, verify_clean_on_open=True) as c:
            assert c.recovery["dropped"] == 1 and c.peek(K) is None
            assert await read_bytes(c, K, 3, load(K, 3)) == pattern(K, 3, 5000)
            assert len(load.calls) == 1
        assert not os.path.exists(path)
    run(main())


def test_corrupt_clean_file_is_detected_on_read_and_reloaded(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path)
        flip_byte(path, HEADER_SIZE + 4999)                 # the last payload byte
        load = Loader(length=5000)
        async with make_cache(tmp_path) as c:               # lazy: size is fine
            assert c.peek(K) == (3, False)
            assert await read_bytes(c, K, 3, load(K, 3)) == pattern(K, 3, 5000)
            assert len(load.calls) == 1 and c.stats["crc_errors"] == 1
        assert not os.path.exists(path)
    run(main())


def test_torn_clean_files_are_dropped_at_open(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path, key=(1, 1))
        os.truncate(path, HEADER_SIZE + 1000)               # short payload
        path2 = await make_clean_file(tmp_path / "b", key=(1, 2))
        with open(path2, "r+b") as f:                       # header never reached the disk
            f.write(bytes(HEADER_SIZE))
        os.rename(path2, tmp_path / os.path.basename(path2))
        async with make_cache(tmp_path) as c:
            assert c.recovery["dropped"] == 2 and c.recovery["chunks"] == 0
        assert chunk_files(tmp_path) == []
    run(main())


def test_corrupt_dirty_file_is_quarantined_at_open(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            await c.write(K, 1, pattern(K, 1, 3000))
        (name,) = chunk_files(tmp_path)
        flip_byte(tmp_path / name, HEADER_SIZE + 10)
        async with make_cache(tmp_path) as c:
            assert c.recovery["quarantined"] == 1 and c.peek(K) is None
        assert chunk_files(tmp_path) == []
        assert os.path.exists(tmp_path / (name[:-len(".chunk")] + ".corrupt"))
        async with make_cache(tmp_path) as c:               # left alone afterwards
            assert c.recovery["quarantined"] == 0
    run(main())


def test_dirty_file_damaged_after_open_fails_the_read(tmp_path):
    # By default a file is CRC-checked once per process (at open for dirty
    # files); always_verify_reads checks every read, catching damage later.
    async def main():
        async with make_cache(tmp_path) as c:
            await c.write(K, 1, pattern(K, 1, 3000))
        load = Loader()
        async with make_cache(tmp_path, always_verify_reads=True) as c:
            (name,) = chunk_files(tmp_path)
            flip_byte(tmp_path / name, HEADER_SIZE + 10)
            with pytest.raises(CorruptChunkError):
                await c.read(K, 1, load(K, 1))
            assert load.calls == []                         # never replaced by a reload
            assert c.stats["quarantined"] == 1
    run(main())


def test_damaged_magic_is_quarantined_not_taken_for_a_torn_file(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            await c.write(K, 1, pattern(K, 1, 3000))
        (name,) = chunk_files(tmp_path)
        flip_byte(tmp_path / name, 0)
        async with make_cache(tmp_path) as c:
            assert c.recovery["quarantined"] == 1 and c.recovery["dropped"] == 0
    run(main())


def test_header_that_does_not_match_its_name_is_quarantined(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path)
        os.rename(path, path.replace("0000000000000003-", "0000000000000004-", 1))
        async with make_cache(tmp_path) as c:
            assert c.recovery["quarantined"] == 1 and c.peek(K) is None
    run(main())


# ----------------------------------------------------------- kill -9 durability

CHILD = r"""
import asyncio, random, sys
sys.path.insert(0, sys.argv[3])
from objcache._ext import crc32c
from tests.cache import CS, make_cache, pattern

async def writer(c, keys, rnd, content):
    while True:
        key = rnd.choice(keys)
        cur = c.peek(key)
        version = (cur[0] if cur else 0) + 1
        if cur and rnd.random() < 0.4:               # a partial write on the current version
            base = await c.read(key, cur[0], None)
            off = rnd.randrange(0, CS - 200)
            data = pattern(key, version, rnd.randrange(1, 200))
            new = bytearray(content[key])
            if off > len(new):
                new += bytes(off - len(new))
            new[off:off + len(data)] = data
            print("W", key[1], version, crc32c(new), flush=True)
            await c.write(key, version, data, offset=off, base=base)
            base.release()
        else:
            new = pattern(key, version, rnd.randrange(1, CS))
            print("W", key[1], version, crc32c(new), flush=True)
            await c.write(key, version, new)
        content[key] = bytes(new)
        print("A", key[1], version, flush=True)

async def main(d, seed):
    c = make_cache(d, pages=3, disk_chunks=1000)
    await c.open()
    content = {}
    for key, version, length in c.dirty_chunks():
        with await c.read(key, version, None) as v:
            content[key] = bytes(v.data)
    keys = [(1, i) for i in range(16)]
    await asyncio.gather(*(writer(c, keys[i::4], random.Random(seed * 10 + i), content)
                           for i in range(4)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_kill9_loses_no_returned_write(tmp_path):
    d = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    announced: dict[int, dict[int, int]] = {}    # key index -> version -> crc
    acked: dict[int, int] = {}                   # key index -> newest returned version
    total = 0
    for round_, want in enumerate([120, 300, 60, 200], start=1):
        err_path = tmp_path / f"child{round_}.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(round_), REPO],
                                    stdout=subprocess.PIPE, stderr=err, cwd=REPO,
                                    env=env, text=True)
            n = 0
            try:
                for line in proc.stdout:
                    kind, idx, version, *rest = line.split()
                    idx, version = int(idx), int(version)
                    if kind == "W":
                        announced.setdefault(idx, {})[version] = int(rest[0])
                    else:
                        acked[idx] = max(acked.get(idx, 0), version)
                        n += 1
                        if n >= want:
                            break
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            for line in proc.stdout.read().splitlines(keepends=True):
                if not line.endswith("\n"):               # cut short by the kill
                    continue
                kind, idx, version, *rest = line.split()
                if kind == "W":
                    announced.setdefault(int(idx), {})[int(version)] = int(rest[0])
                elif kind == "A":
                    acked[int(idx)] = max(acked.get(int(idx), 0), int(version))
            proc.stdout.close()
        assert n >= want, err_path.read_text()
        total += n

        async def check():
            async with make_cache(d, pages=3, disk_chunks=1000) as c:
                for idx, version in acked.items():
                    key = (1, idx)
                    got = c.peek(key)
                    assert got is not None and got[1], (key, got)
                    # Every write that returned is there; a write that was in
                    # progress at the kill may be there too (it was durable).
                    assert got[0] >= version and got[0] in announced[idx], (key, got, version)
                    with await c.read(key, got[0], None) as v:
                        assert crc32c(v.data) == announced[idx][got[0]], (key, got)
                assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
        run(check())
    assert total >= 680


# ------------------------------------------------------------ a full disk

@pytest.mark.root
def test_real_enospc_keeps_earlier_dirty_chunks(small_tmpfs):
    d = small_tmpfs / "cache"

    async def main():
        load = Loader()
        # The budget (100 MiB) is far above the 1 MiB file system: only the
        # file system says no.
        async with make_cache(d, pages=1, disk_chunks=1500) as c:
            for i in range(20):                     # clean files fill the disk
                await read_bytes(c, (5, i), 1, load((5, i), 1))
            clean_before = c.stats["disk_chunks"]
            assert clean_before > 5
            acked, failure = [], None
            for i in range(40):
                try:
                    await c.write((6, i), 1, pattern((6, i), 1, CS))
                except OSError as exc:
                    failure = exc
                    break
                acked.append((6, i))
            assert failure is not None and failure.errno == errno.ENOSPC
            assert len(acked) > clean_before // 2   # clean files were shed for them
            assert [k for k, _, _ in c.dirty_chunks()] == acked
            for key in acked:
                assert await read_bytes(c, key, 1) == pattern(key, 1, CS)
            assert not [n for n in os.listdir(d) if n.endswith(".tmp")]
            # Still full: fails again, cleanly; freeing space lets writes through.
            with pytest.raises(OSError) as err:
                await c.write((7, 0), 1, pattern((7, 0), 1, CS))
            assert err.value.errno == errno.ENOSPC
            gone = [acked.pop(), acked.pop()]
            for key in gone:
                c.discard(key)
            prefixes = tuple(f"{k[0]:016x}-{k[1]:016x}-" for k in gone)
            for _ in range(500):                    # the removals run in the background
                if not [n for n in os.listdir(d) if n.startswith(prefixes)]:
                    break
                await asyncio.sleep(0.01)
            await c.write((7, 0), 1, pattern((7, 0), 1, CS))
            acked.append((7, 0))
        async with make_cache(d, pages=1, disk_chunks=1500) as c:
            assert sorted(k for k, _, _ in c.dirty_chunks()) == sorted(acked)
            for key in acked:
                assert await read_bytes(c, key, 1) == pattern(key, 1, CS)
    run(main())


def test_reopening_with_a_smaller_chunk_size(tmp_path):
    async def main():
        async with make_cache(tmp_path, chunk_size=CS) as c:
            await c.write((1, 0), 1, pattern((1, 0), 1, CS))
            c.mark_clean((1, 0), 1)
            await c.write((1, 1), 1, pattern((1, 1), 1, 100))
        async with make_cache(tmp_path, chunk_size=CS // 2) as c:
            assert c.recovery["dropped"] == 1            # the clean long one
            assert c.dirty_chunks() == [((1, 1), 1, 100)]
            await c.write((1, 2), 1, pattern((1, 2), 1, CS // 2))
        with pytest.raises(RuntimeError, match="chunk size"):
            await make_cache(tmp_path, chunk_size=CS // 4).open()
    run(main())


def test_a_miss_without_a_loader_is_a_lookup_error(tmp_path):
    async def main():
        async with make_cache(tmp_path) as c:
            with pytest.raises(LookupError, match="no loader"):
                await c.read(K, 1, None)
    run(main())


def test_a_file_is_crc_checked_once_by_default(tmp_path):
    async def main():
        path = await make_clean_file(tmp_path)
        async with make_cache(tmp_path, pages=1) as c:
            assert await read_bytes(c, K, 3) == pattern(K, 3, 5000)   # checked now
            await read_bytes(c, (1, 1), 1, Loader()((1, 1), 1))       # evicts K
            flip_byte(path, HEADER_SIZE + 1)
            got = await read_bytes(c, K, 3)                           # not re-checked
            assert got != pattern(K, 3, 5000) and c.stats["crc_errors"] == 0
    run(main())


def test_concurrent_dirty_writes_share_directory_fsyncs(tmp_path, monkeypatch):
    import objcache.cache.disk as disk_mod
    calls = []
    real = disk_mod._fsync_dir

    def counting(path):
        calls.append(path)
        real(path)
    monkeypatch.setattr(disk_mod, "_fsync_dir", counting)

    async def main():
        async with make_cache(tmp_path, io_workers=4) as c:
            await asyncio.gather(*(c.write((4, i), 1, pattern((4, i), 1, 1000))
                                   for i in range(32)))
            assert len(c.dirty_chunks()) == 32
            assert 1 <= len(calls) < 32          # one fsync served many renames
    run(main())
