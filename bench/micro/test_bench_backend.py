"""Micro-benchmarks: the S3 backend (objcache/backend, docs/backend.md)
against Ceph RGW on loopback.

Acceptance (ratio measured in the same run, interleaved, bench/ratio.py):

* Sequential read of a 256 MiB object, as the cluster read path does it:
  ``S3Store.get_range`` of 8 MiB chunks, 8 in flight, each streamed
  straight into its slice of one preallocated buffer -- versus boto3's own
  parallel download, ``download_fileobj`` with the same concurrency
  (TransferConfig max_concurrency=8, multipart_chunksize=8 MiB) into a file
  object over the same kind of preallocated buffer. Target >= 1.0x.

Reported, not asserted: small-object (4 KiB) HEAD and GET latency, one
request in flight, through the store and through a plain boto3 client (the
difference is the store's thread hop and bookkeeping); a 64 MiB multipart
upload (8 MiB parts, 4 in flight) against boto3's ``upload_fileobj`` with
the same settings (RGW's memstore writes at only ~100-150 MiB/s here).

Both sides use the same client settings (path-style, checksums when
required, standard retries, pool >= concurrency) against the same server.

Run: ``python -m pytest bench/micro/test_bench_backend.py -s`` (ratios are
printed and asserted); add ``--benchmark-enable`` for pytest-benchmark
tables of the candidate alone.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import statistics
import time

import numpy as np
import pytest
import uvloop
from boto3.s3.transfer import TransferConfig

from bench.ratio import check, compare
from objcache.backend.s3 import S3Store
from objcache.testing.s3servers import RgwServer, rgw_available

MiB = 1 << 20
OBJECT = 256 * MiB
CHUNK = 8 * MiB
WIDTH = 8
BUCKET = "bench-backend"
KEY = "model/weights.bin"

pytestmark = pytest.mark.rgw


class _BufferFile(io.RawIOBase):
    """A writable, seekable file over a preallocated buffer: what boto3's
    download writes into (s3transfer seeks and writes each chunk)."""

    def __init__(self, buf: np.ndarray) -> None:
        super().__init__()
        self._mv = memoryview(buf).cast("B")
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos,
                io.SEEK_END: self._mv.nbytes}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self._mv[self._pos:self._pos + n] = b
        self._pos += n
        return n


@pytest.fixture(scope="module")
def rgw(tmp_path_factory):
    if not rgw_available():
        pytest.fail("this benchmark needs Ceph RGW (apt-get install "
                    "--no-install-recommends ceph-mon ceph-osd radosgw ceph-common)")
    with RgwServer(tmp_path_factory.mktemp("rgw-bench") / "cluster",
                   store_bytes=3 << 30) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def env(rgw):
    """(loop, store, boto3 client, object digest): the object uploaded once."""
    loop = uvloop.new_event_loop()
    store = S3Store(BUCKET, endpoint_url=rgw.endpoint_url, region=rgw.region,
                    access_key=rgw.access_key, secret_key=rgw.secret_key,
                    max_concurrency=16)
    client = rgw.client(max_pool_connections=16)
    data = np.random.default_rng(5).bytes(OBJECT)

    loop.run_until_complete(store.multipart_upload(
        KEY, [memoryview(data)[o:o + CHUNK] for o in range(0, OBJECT, CHUNK)],
        part_size=CHUNK, concurrency=4))
    digest = hashlib.md5(data).digest()
    del data
    try:
        yield loop, store, client, digest
    finally:
        loop.run_until_complete(store.close())
        loop.close()
        client.close()


def test_sequential_256mib_read_vs_boto3_download(env, benchmark):
    loop, store, client, digest = env
    ours = np.zeros(OBJECT, dtype=np.uint8)
    theirs = np.zeros(OBJECT, dtype=np.uint8)
    config = TransferConfig(max_concurrency=WIDTH, multipart_chunksize=CHUNK,
                            multipart_threshold=CHUNK, use_threads=True)

    async def read_all():
        # WIDTH readers pulling the next chunk in order: a sequential reader
        # with readahead, each chunk streamed into its slice of the buffer.
        offsets = iter(range(0, OBJECT, CHUNK))

        async def reader():
            for off in offsets:
                n = await store.get_range(KEY, off, CHUNK, ours[off:off + CHUNK])
                assert n == CHUNK
        await asyncio.gather(*(reader() for _ in range(WIDTH)))

    def candidate():
        loop.run_until_complete(read_all())

    def baseline():
        client.download_fileobj(BUCKET, KEY, _BufferFile(theirs), Config=config)

    candidate()
    baseline()
    assert hashlib.md5(ours).digest() == digest
    assert hashlib.md5(theirs).digest() == digest

    cmp = compare(candidate, baseline, calls=1, rounds=7, warmup=1)
    benchmark.pedantic(candidate, rounds=3, iterations=1)

    def mibs(seconds):
        return OBJECT / MiB / seconds
    print(f"\nsequential 256 MiB read, 8 MiB chunks x {WIDTH} in flight: "
          f"S3Store.get_range into a buffer {mibs(cmp.candidate_s):.0f} MiB/s; "
          f"boto3 download_fileobj {mibs(cmp.baseline_s):.0f} MiB/s "
          f"-> {cmp.speedup:.2f}x")
    check(cmp.speedup, 1.0, "S3Store sequential read vs boto3 download_fileobj")


def test_small_object_latency(env):
    loop, store, client, _ = env
    payload = np.random.default_rng(6).bytes(4096)
    loop.run_until_complete(store.put("small/4k", payload))
    buf = bytearray(4096)
    n = 300

    def timed(fn):
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        samples.sort()
        return statistics.median(samples), samples[int(0.99 * (n - 1))]

    async def one_head():
        await store.head("small/4k")

    async def one_get():
        await store.get_range("small/4k", 0, 4096, buf)

    results = {}
    for _ in range(2):  # interleaved twice: the second pass is reported
        results["store HEAD"] = timed(lambda: loop.run_until_complete(one_head()))
        results["boto3 HEAD"] = timed(lambda: client.head_object(Bucket=BUCKET,
                                                                 Key="small/4k"))
        results["store GET"] = timed(lambda: loop.run_until_complete(one_get()))
        results["boto3 GET"] = timed(lambda: client.get_object(
            Bucket=BUCKET, Key="small/4k", Range="bytes=0-4095")["Body"].read())
    print()
    for name, (p50, p99) in results.items():
        print(f"small object {name:10s}: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
    for op in ("HEAD", "GET"):
        ratio = results[f"boto3 {op}"][0] / results[f"store {op}"][0]
        print(f"small object {op} latency, store vs plain boto3: {ratio:.2f}x")


def test_multipart_upload_vs_boto3_upload(env):
    loop, store, client, _ = env
    size = 64 * MiB
    data = np.random.default_rng(7).bytes(size)
    config = TransferConfig(max_concurrency=4, multipart_chunksize=CHUNK,
                            multipart_threshold=CHUNK, use_threads=True)

    def candidate():
        loop.run_until_complete(store.multipart_upload(
            "upload/ours", [memoryview(data)[o:o + CHUNK] for o in range(0, size, CHUNK)],
            part_size=CHUNK, concurrency=4))

    def baseline():
        client.upload_fileobj(io.BytesIO(data), BUCKET, "upload/theirs", Config=config)

    cmp = compare(candidate, baseline, calls=1, rounds=3, warmup=1)
    print(f"\nmultipart upload of 64 MiB, 8 MiB parts x 4 in flight: S3Store "
          f"{size / MiB / cmp.candidate_s:.0f} MiB/s; boto3 upload_fileobj "
          f"{size / MiB / cmp.baseline_s:.0f} MiB/s -> {cmp.speedup:.2f}x (reported)")
