"""Micro-benchmarks: CRC-32C and ring placement (issue: foundation).

Acceptance, as ratios measured in the same run:
* crc32c on 1 MiB buffers >= 0.9x the PyPI ``crc32c`` package (ICRAR's,
  SSE4.2 with three interleaved streams).
* ring placement of 1M keys >= 20x the pure-Python twin.

Run: ``python -m pytest bench/micro/test_bench_hashing.py -s`` (ratios are
printed and asserted); add ``--benchmark-enable`` for pytest-benchmark
tables of the candidate alone.
"""
import os

import crc32c as pypi_crc32c
import numpy as np
import pytest

from bench.ratio import check, compare
from objcache import _ext

MiB = 1 << 20


@pytest.fixture(scope="module")
def c_hashing():
    if _ext.IMPL != "c":
        pytest.skip("compiled extensions not loaded (OBJCACHE_NO_EXT or not built)")
    return _ext.load("c").hashing


def _ring(hashing, groups=32, vnodes=256):
    pts = {}
    for g in range(groups):
        for v in range(vnodes):
            pts[hashing.hash64(g, v)] = g
    keys = sorted(pts)
    return np.array(keys, dtype=np.uint64), np.array([pts[k] for k in keys])


def test_crc32c_1mib_vs_pypi(c_hashing, benchmark):
    data = os.urandom(MiB)
    assert c_hashing.crc32c(data) == pypi_crc32c.crc32c(data)
    cmp = compare(lambda: c_hashing.crc32c(data),
                  lambda: pypi_crc32c.crc32c(data), calls=200, rounds=9)
    gbps = MiB / cmp.candidate_s / 1e9
    print(f"\ncrc32c 1 MiB: {gbps:.1f} GB/s ({c_hashing.crc32c_backend()}); "
          f"vs PyPI crc32c: {cmp.speedup:.2f}x  [{cmp}]")
    benchmark(c_hashing.crc32c, data)
    check(cmp.speedup, 0.9, "crc32c 1 MiB vs PyPI crc32c")


def test_ring_placement_1m_vs_twin(c_hashing, benchmark):
    from objcache._ext import hashing_py
    points, owners = _ring(c_hashing)
    n = 1_000_000
    inodes = np.random.default_rng(7).integers(1, 2**40, n, dtype=np.uint64)
    chunks = np.random.default_rng(8).integers(0, 1 << 12, n, dtype=np.uint64)
    c_table = c_hashing.RingTable(points, owners)
    py_table = hashing_py.RingTable(points, owners)
    # The twin takes seconds per call: one interleaved round of each.
    cmp = compare(lambda: c_table.place(inodes, chunks),
                  lambda: py_table.place(inodes, chunks),
                  calls=1, rounds=3, warmup=0)
    print(f"\nring placement of 1M keys over {len(points)} points: "
          f"{cmp.candidate_s * 1e3:.1f} ms ({cmp.candidate_s / n * 1e9:.0f} ns/key); "
          f"vs the pure-Python twin: {cmp.speedup:.0f}x")
    benchmark(c_table.place, inodes, chunks)
    check(cmp.speedup, 20, "ring placement of 1M keys vs the twin")
