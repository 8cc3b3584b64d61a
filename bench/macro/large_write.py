"""A file larger than the cache, written through a mount until the bucket
holds it, against a raw parallel multipart upload of the same bytes.

    python -m bench.macro.large_write [--size 2GiB] [--cache-size 1GiB]
                                      [--mode embedded|cluster|both] [--json]

Ceph RGW on loopback (bluestore on a sparse file). In one run:

* raw: boto3 ``upload_fileobj`` of ``--size`` bytes from memory, 8 MiB
  parts, 8 in parallel (the baseline: what a client that already has the
  bytes pays to put them in the bucket);
* objcache: the same bytes written with 1 MiB writes to a new file on a
  fresh mount (``embedded``: one process with ``--cache-size``; ``cluster``:
  three servers with ``--cache-size`` each and a client mount), then
  ``fsync`` (returns once the bucket holds the file) and close. Reported:
  seconds to close of the writes (before fsync), seconds to durable in the
  bucket, the speed ratio raw/objcache (1.0 = as fast as the raw upload),
  chunks spilled, and each process's peak RSS (anonymous, shared) and
  bytes on disk.

The file is larger than the cache: its full chunks go to spill objects as
they are written (engine/spill.py) and write-back copies them server-side.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

from boto3.s3.transfer import TransferConfig

from objcache.testing.s3servers import RgwServer
from objcache.units import format_size, parse_size

from .cluster_read import require_rgw
from .memory import GiB, MiB, Sampler, System


def raw_upload(rgw, bucket: str, size: int, block: bytes) -> float:
    class Source(io.RawIOBase):
        def __init__(self):
            self.left = size

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left, len(block))
            b[:n] = block[:n]
            self.left -= n
            return n
    cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                         max_concurrency=8)
    t0 = time.perf_counter()
    rgw.client().upload_fileobj(io.BufferedReader(Source(), 8 * MiB), bucket, "raw.bin",
                                Config=cfg)
    return time.perf_counter() - t0


def through_mount(sysm: System, size: int, block: bytes) -> dict:
    path = os.path.join(sysm.mnt, "big.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
        t_written = time.perf_counter() - t0
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"written_s": round(t_written, 2), "durable_s": round(time.perf_counter() - t0, 2)}


def spilled(sysm: System) -> int:
    import asyncio

    from objcache.client.cluster import ClusterClient
    if sysm.mode != "cluster":
        return -1                   # the embedded node has no address to ask
    addrs = [("127.0.0.1", p) for p in sysm.ports]

    async def ask():
        async with ClusterClient(addrs, b"memory-benchmark-secret") as c:
            st = await c.status()
            return sum((n.get("spill") or {}).get("spilled", 0) for n in st["nodes"])
    return asyncio.run(ask())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--cache-size", default="1GiB")
    ap.add_argument("--mode", choices=("embedded", "cluster", "both"), default="both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not require_rgw():
        return 2
    size = parse_size(args.size) // MiB * MiB
    cache = parse_size(args.cache_size)
    block = os.urandom(MiB)
    modes = ("embedded", "cluster") if args.mode == "both" else (args.mode,)
    out = []
    with tempfile.TemporaryDirectory(prefix="objcache-lw-") as base:
        rgw = RgwServer(os.path.join(base, "rgw"), objectstore="bluestore",
                        store_bytes=max(16 * GiB, 4 * size)).start()
        try:
            for mode in modes:
                raw_bucket = rgw.create_bucket(f"lw-raw-{mode}")
                raw = raw_upload(rgw, raw_bucket, size, block)
                bucket = rgw.create_bucket(f"lw-{mode}")
                sysm = System(tempfile.mkdtemp(dir=base), rgw, bucket, mode, cache)
                try:
                    sysm.start()
                    with Sampler(sysm.processes()) as s:
                        r = through_mount(sysm, size, block)
                    r["spilled_chunks"] = spilled(sysm)
                finally:
                    sysm.stop()
                head = rgw.client().head_object(Bucket=bucket, Key="w/big.bin")
                assert head["ContentLength"] == size, head
                r.update(mode=mode, size=size, cache_size=cache, raw_s=round(raw, 2),
                         ratio=round(raw / r["durable_s"], 2), peaks=s.peak)
                out.append(r)
                if not args.json:
                    print(f"{mode}: {format_size(size)} with a {format_size(cache)} cache: "
                          f"written {r['written_s']} s, in the bucket {r['durable_s']} s; "
                          f"raw multipart {r['raw_s']} s; speed {r['ratio']}x raw; "
                          f"spilled {r['spilled_chunks']} chunks", flush=True)
                    for proc, p in s.peak.items():
                        print(f"  {proc}: anon {format_size(p['anon'])}, shared "
                              f"{format_size(p['shmem'])}, peak RSS {format_size(p['hwm'])}, "
                              f"log {format_size(p['log'])}, disk {format_size(p['disk'])}",
                              flush=True)
        finally:
            rgw.stop()
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
