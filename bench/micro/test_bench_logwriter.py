"""Micro-benchmarks: the durable log writer (docs/logwriter.md).

Acceptance, as ratios measured in the same run against raw syscalls on the
same file system. As in bench/ratio.py, candidate and baseline are
interleaved (inside one event loop run: bursts vs raw records, and
record-by-record pairs for latency) and medians are compared, so a burst of
machine load hits both sides:

* throughput: durable 4 KiB appends from 64 concurrent appenders (group
  commit) >= 20x one ``os.pwrite`` + ``os.fdatasync`` per record. The same
  run also measures the disk's own ceiling - 64 records in one ``pwritev``
  + one ``fdatasync``, no Python - and where even that is below 30x (fast
  fdatasync relative to the disk's bandwidth), the writer must reach two
  thirds of it instead (it typically reaches 70-95%);
* latency: a lone appender awaiting each 4 KiB append <= 1.2x the time of
  one ``os.pwrite`` + ``os.fdatasync``.

Both are reported for the compiled io_uring backend, the compiled pwritev
fallback and the pure-Python twin; only the io_uring path is asserted.
Files go to a disk-backed directory (``OBJCACHE_BENCH_DIR``, else /var/tmp,
else the repository's .run/), never a tmpfs where fdatasync is free.

Run: ``python -m pytest bench/micro/test_bench_logwriter.py -s`` (ratios are
printed and asserted); add ``--benchmark-enable`` for pytest-benchmark
tables of the candidate alone.
"""
import asyncio
import os
import shutil
import statistics
import tempfile
import time

import pytest

from bench.ratio import check
from objcache import _ext

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a project dependency
    uvloop = None

KiB = 1024
RECORD = 4 * KiB
APPENDERS = 64
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _fs_type(path):
    """File-system type of the mount holding `path` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


@pytest.fixture(scope="module")
def bench_dir():
    candidates = [os.environ.get("OBJCACHE_BENCH_DIR"), "/var/tmp",
                  os.path.join(REPO, ".run")]
    for base in filter(None, candidates):
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue
        if _fs_type(base) in ("tmpfs", "ramfs"):
            continue
        d = tempfile.mkdtemp(prefix="objcache-bench-logwriter-", dir=base)
        print(f"\nlog writer benchmarks in {d} ({_fs_type(d)})")
        yield d
        shutil.rmtree(d, ignore_errors=True)
        return
    pytest.skip("no disk-backed directory for the log writer benchmarks")


VARIANTS = {   # name -> (implementation, backend)
    "io_uring": ("c", "io_uring"),
    "c-pwritev": ("c", "pwritev"),
    "twin": ("python", None),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    impl, backend = VARIANTS[request.param]
    if impl == "c" and _ext.IMPL != "c" \
            and os.environ.get("OBJCACHE_REQUIRE_EXT") != "1":
        pytest.skip("compiled extensions not loaded")
    ns = _ext.load(impl)
    return request.param, ns.LogWriter, backend


@pytest.fixture
def loop():
    lp = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    yield lp
    lp.close()


class _Raw:
    """The baseline: one pwrite + fdatasync per record, appended."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                          0o644)
        self.off = 0
        self.data = os.urandom(RECORD)

    def records(self, n):
        for _ in range(n):
            os.pwrite(self.fd, self.data, self.off)
            os.fdatasync(self.fd)
            self.off += RECORD

    def batches(self, n, per_batch):
        """The ideal group commit: `per_batch` records in one pwritev, one
        fdatasync - what any writer could do at most, without Python."""
        bufs = [self.data] * per_batch
        for _ in range(n):
            os.pwritev(self.fd, bufs, self.off)
            os.fdatasync(self.fd)
            self.off += RECORD * per_batch

    def close(self):
        os.close(self.fd)


def _open_writer(loop, LogWriter, backend, path):
    async def make():
        return LogWriter(path, backend=backend)
    try:
        w = loop.run_until_complete(make())
    except OSError as exc:
        pytest.skip(f"{backend} not available here: {exc}")
    if backend == "io_uring" and w.backend != "io_uring":
        loop.run_until_complete(w.close())
        pytest.skip("io_uring is not permitted here")
    return w


def test_group_commit_throughput(variant, bench_dir, loop, benchmark):
    name, LogWriter, backend = variant
    w = _open_writer(loop, LogWriter, backend,
                     os.path.join(bench_dir, f"tput-{name}"))
    raw = _Raw(os.path.join(bench_dir, f"tput-raw-{name}"))
    ideal = _Raw(os.path.join(bench_dir, f"tput-ideal-{name}"))
    data = os.urandom(RECORD)
    per_appender = 16
    burst_records = APPENDERS * per_appender     # 1024: ~16 batches
    raw_records = 32
    rounds = 21

    async def appender():
        for _ in range(per_appender):
            await w.append(data)

    async def burst():
        await asyncio.gather(*(appender() for _ in range(APPENDERS)))

    async def interleaved():
        """Rounds of (writer burst, raw records, ideal batches) in rotating
        order; per-record times of each side, per round."""
        await burst()                               # warm-up
        raw.records(2)
        ideal.batches(1, APPENDERS)
        times = ([], [], [])
        for r in range(rounds):
            for side in (r % 3, (r + 1) % 3, (r + 2) % 3):
                t = time.perf_counter()
                if side == 0:
                    await burst()
                    n = burst_records
                elif side == 1:
                    raw.records(raw_records)
                    n = raw_records
                else:
                    ideal.batches(raw_records // 2, APPENDERS)
                    n = raw_records // 2 * APPENDERS
                times[side].append((time.perf_counter() - t) / n)
        return times

    try:
        s0 = w.stats
        cand, base, best = loop.run_until_complete(interleaved())
        s1 = w.stats
        benchmark(lambda: loop.run_until_complete(burst()))
    finally:
        loop.run_until_complete(w.close())
        raw.close()
        ideal.close()
    speedup = statistics.median(b / c for b, c in zip(base, cand))
    ceiling = statistics.median(b / i for b, i in zip(base, best))
    per_batch = (s1["appends"] - s0["appends"]) / max(
        1, s1["batches"] - s0["batches"])
    print(f"\nlog writer [{name}] {APPENDERS} appenders x 4 KiB durable: "
          f"{1 / statistics.median(cand):,.0f} rec/s vs one pwrite+fdatasync "
          f"per record {1 / statistics.median(base):,.0f} rec/s -> "
          f"{speedup:.1f}x throughput ({per_batch:.0f} records/batch); "
          f"raw C-speed ceiling (pwritev of {APPENDERS} records + one "
          f"fdatasync, no Python) {ceiling:.1f}x")
    if name == "io_uring":
        # 20x presumes fdatasync costs ~0.5 ms against this disk's bandwidth
        # (ceiling ~30x). Where the disk itself cannot give ~30x to ANY group
        # commit of 64 records (the same-run ceiling: fast fdatasync, or
        # little bandwidth), ask for two thirds of that ceiling instead.
        target = min(20.0, round(ceiling * 2 / 3, 1))
        if target < 20:
            print(f"  (20x is out of reach on this disk right now: ceiling "
                  f"{ceiling:.1f}x; asserting >= {target}x = 2/3 of it)")
        check(speedup, target,
              "group-commit throughput vs pwrite+fdatasync")


def test_lone_appender_latency(variant, bench_dir, loop, benchmark):
    name, LogWriter, backend = variant
    w = _open_writer(loop, LogWriter, backend,
                     os.path.join(bench_dir, f"lat-{name}"))
    raw = _Raw(os.path.join(bench_dir, f"lat-raw-{name}"))
    data = os.urandom(RECORD)
    pairs = 400

    async def paired():
        """Alternate one raw record and one awaited append (the order
        flipping every pair), so both see the same disk at the same time;
        the raw syscalls block the loop, which has nothing else to do."""
        for _ in range(5):                          # warm-up
            await w.append(data)
            raw.records(1)
        cand, base = [], []
        for i in range(pairs):
            for side in ((0, 1) if i % 2 else (1, 0)):
                t = time.perf_counter()
                if side:
                    await w.append(data)
                else:
                    raw.records(1)
                (cand if side else base).append(time.perf_counter() - t)
        return cand, base

    async def ten():
        for _ in range(10):
            await w.append(data)

    try:
        cand, base = loop.run_until_complete(paired())
        benchmark(lambda: loop.run_until_complete(ten()))
    finally:
        loop.run_until_complete(w.close())
        raw.close()
    c50, b50 = statistics.median(cand), statistics.median(base)
    ratio = c50 / b50
    print(f"\nlog writer [{name}] lone appender 4 KiB: median "
          f"{c50 * 1e6:.0f} us/append vs pwrite+fdatasync {b50 * 1e6:.0f} us "
          f"-> {ratio:.2f}x latency")
    if name == "io_uring":
        # check() wants "higher is better": b50/c50 >= 1/1.2.
        check(b50 / c50, round(1 / 1.2, 3),
              "lone-appender latency vs pwrite+fdatasync (<= 1.2x)")
