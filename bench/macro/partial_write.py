"""What a partial write costs at a chunk owner, and what the first one
after write-back costs (docs/storage-engine.md, "Partial writes").

    python -m bench.macro.partial_write [--nodes 3] [--replicas 3]
                                        [--chunks 8] [--rounds 3] [--json]

A file of ``--chunks`` 8 MiB chunks is written, closed and fsynced (the
bucket holds it, so every chunk's version is clean: any replica may evict
it). Each round then writes 4 KiB into every chunk twice through the
cluster client (straight to the owners):

* first write into a clean chunk: the owner re-bases it — one ``cbase``
  entry carrying the whole chunk through the group's log — then the write;
* second write into the same chunk, now dirty: one ``cwrite`` entry with
  the 4 KiB (the baseline, measured in the same round).

Then the file is fsynced again (clean again) for the next round. Reported:
median latencies and their ratio. RGW on loopback; R=3 by default, the
case the re-base exists for.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

from objcache.meta.model import ROOT
from objcache.testing.s3servers import RgwServer

from .cluster_read import BUCKET, Servers, require_rgw

MiB = 1 << 20
CHUNK = 8 * MiB
WRITE = 4096


async def _measure(servers, chunks: int, rounds: int) -> dict:
    first, again = [], []
    async with servers.client() as c:
        f = await c.create(ROOT, b"partial.bin")
        data = os.urandom(chunks * CHUNK)
        f = await c.flush(f, len(data), await c.write(f, 0, data))
        await c.fsync(f.id)
        for r in range(rounds):
            f = await c.getattr(f.id)
            versions = {}
            for i in range(chunks):
                off = i * CHUNK + (r * 2 + 1) * WRITE
                t0 = time.perf_counter()
                versions.update(await c.write(f, off, os.urandom(WRITE)))
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                versions.update(await c.write(f, off + WRITE, os.urandom(WRITE)))
                again.append(time.perf_counter() - t0)
            f = await c.flush(f, f.size, versions)
            await c.fsync(f.id)                     # clean again for the next round
    return {"first_ms": statistics.median(first) * 1e3,
            "dirty_ms": statistics.median(again) * 1e3,
            "samples": len(first)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not require_rgw():
        return 2
    with tempfile.TemporaryDirectory(prefix="objcache-bench-") as base:
        rgw = RgwServer(os.path.join(base, "rgw"), store_bytes=4 << 30).start()
        try:
            rgw.create_bucket(BUCKET)
            servers = Servers(os.path.join(base, "nodes"), rgw, args.nodes, CHUNK,
                              cache=1 << 30, replicas=args.replicas)
            try:
                res = asyncio.run(_measure(servers, args.chunks, args.rounds))
            finally:
                servers.stop()
        finally:
            rgw.stop()
    res["ratio"] = res["first_ms"] / res["dirty_ms"]
    print(f"4 KiB writes, {args.nodes} nodes, R={args.replicas}, 8 MiB chunks, "
          f"{res['samples']} of each")
    print(f"  into a clean chunk (re-base + write) {res['first_ms']:.1f} ms   "
          f"into a dirty chunk {res['dirty_ms']:.1f} ms   ratio {res['ratio']:.1f}x")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
