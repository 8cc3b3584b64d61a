"""``objcache demo``: the end-to-end demonstration, on an S3 server on loopback.

Today (foundation) it runs what exists: a Ceph RGW on loopback, a sample
model of safetensors shards uploaded to it and read back with boto3 (time,
GB/s, S3 GETs counted at the server), the shards' CRC-32C computed by the
extension, their chunks placed on a 3-group ring, and a burst of durable
log appends group-committed by the log writer. It grows into the full
demo (3-node cluster, two mounts, cold/warm model loads) with the issues
that build those parts.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from objcache import _ext
from objcache.units import format_size, parse_size

SHARDS = 4
CHUNK = 8 << 20


def safetensors_shard(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialize float32 tensors in the safetensors format (a little-endian
    u64 header length, a JSON header, then the raw data)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def _row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))


async def _log_burst(path: str, n: int) -> tuple[float, dict]:
    writer = _ext.LogWriter(path)
    record = os.urandom(4096)
    start = time.perf_counter()
    await asyncio.gather(*(writer.append(record) for _ in range(n)))
    elapsed = time.perf_counter() - start
    stats = dict(writer.stats)
    await writer.close()
    return elapsed, stats


def run_demo(size: str = "256MiB", keep: bool = False) -> int:
    from objcache.testing.s3servers import RgwServer

    total = parse_size(size)
    if total < SHARDS * 4096:
        raise SystemExit(f"--size must be at least {SHARDS * 4096} bytes")
    work = tempfile.mkdtemp(prefix="objcache-demo-")
    print(f"objcache demo — extensions: {_ext.IMPL} "
          f"(crc32c: {_ext.crc32c_backend()}), work dir {work}")
    rgw = RgwServer(os.path.join(work, "rgw"), store_bytes=max(4 * total, 1 << 30))
    try:
        t0 = time.perf_counter()
        rgw.start()
        print(f"Ceph RGW on {rgw.endpoint_url} (started in "
              f"{time.perf_counter() - t0:.1f} s)")
        s3 = rgw.client()
        bucket = rgw.create_bucket("demo-models")

        rng = np.random.default_rng(0)
        per_shard = total // SHARDS // 4
        shards = {}
        for i in range(SHARDS):
            w = rng.standard_normal(per_shard, dtype=np.float32)
            shards[f"model/model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"] = \
                safetensors_shard({f"layer{i}.weight": w.reshape(-1, 256)
                                   if per_shard % 256 == 0 else w})
        nbytes = sum(len(b) for b in shards.values())
        t0 = time.perf_counter()
        for key, blob in shards.items():
            s3.put_object(Bucket=bucket, Key=key, Body=blob)
        put_s = time.perf_counter() - t0
        print(f"uploaded a {format_size(nbytes)} model in {SHARDS} safetensors "
              f"shards ({nbytes / put_s / 1e9:.2f} GB/s)")

        # Read it back the way a pod does without objcache: every byte from S3.
        mark = rgw.request_mark()
        t0 = time.perf_counter()

        def fetch(key):
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

        with ThreadPoolExecutor(SHARDS) as pool:
            got = dict(zip(shards, pool.map(fetch, shards)))
        get_s = time.perf_counter() - t0
        gets = rgw.request_counts(mark).get("GET", 0)
        assert got == shards, "the bytes read back differ from the bytes written"

        t0 = time.perf_counter()
        sums = {k: _ext.crc32c(v) for k, v in got.items()}
        crc_s = time.perf_counter() - t0

        points, owners = _demo_ring()
        table = _ext.RingTable(points, owners)
        chunks = [(ino, c) for ino, blob in enumerate(got.values(), start=2)
                  for c in range(-(-len(blob) // CHUNK))]
        owners_of = table.place(np.array([c[0] for c in chunks], dtype=np.uint64),
                                np.array([c[1] for c in chunks], dtype=np.uint64))

        log_s, log_stats = asyncio.run(_log_burst(os.path.join(work, "demo.log"), 256))

        widths = (44, 10, 10, 8)
        print()
        print(_row(("step", "time", "GB/s", "S3 GETs"), widths))
        print(_row(("load model straight from S3 (boto3)", f"{get_s:.2f} s",
                    f"{nbytes / get_s / 1e9:.2f}", gets), widths))
        print(_row(("CRC-32C of every shard", f"{crc_s * 1e3:.1f} ms",
                    f"{nbytes / crc_s / 1e9:.1f}", "-"), widths))
        print()
        spread = np.bincount(owners_of, minlength=3)
        print(f"{len(chunks)} chunks of {format_size(CHUNK)} placed on a "
              f"3-group ring: {spread.tolist()} per group")
        print(f"256 durable 4 KiB log appends: {log_s * 1e3:.1f} ms in "
              f"{log_stats['batches']} group commits ({log_stats['syncs']} "
              f"fdatasyncs) on {_ext.LogWriter.__module__.rsplit('.', 1)[-1]}")
        for key, crc in list(sums.items())[:2]:
            print(f"  crc32c {key} = {crc:08x}")
        print("\nThe cluster cache, the mounts and the cold/warm comparison "
              "arrive with the storage-engine and FUSE issues.")
        return 0
    finally:
        rgw.stop()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _demo_ring(groups: int = 3, points_per_group: int = 256):
    pts = {}
    for g in range(groups):
        for v in range(points_per_group):
            pts[_ext.hash64(g, v)] = g
    keys = sorted(pts)
    return np.array(keys, dtype=np.uint64), np.array([pts[k] for k in keys])
