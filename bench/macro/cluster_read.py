"""The storage engine's data path end to end: `objcache server` processes,
Ceph RGW on loopback, the cluster client.

    python -m bench.macro.cluster_read [--size 1GiB] [--width 8] [--readers 32]
                                       [--nodes 3] [--rounds 2] [--json]

Reported in one run (ratios are same-run; absolute figures drift on a
shared machine):

* cold: a sequential read of a ``--size`` object through the cluster (the
  client keeps ``--width`` chunk-sized reads in flight, in order; each
  chunk is fetched from RGW by its owner) versus boto3
  ``download_fileobj`` with the same parallelism (max_concurrency=width,
  multipart_chunksize=chunk) into a preallocated buffer. Target >= 1.0x.
  Every round reads objects neither side has read before: a fresh copy for
  the cluster and another for boto3 (RGW serves an object it has just
  served faster: reusing one baseline object flattered the baseline in
  every round after the first).
* warm: the same read again into a preallocated buffer, served from the
  owners' memory over RPC (a client with local reads off) and from their
  page arenas mapped by this client (local zero-copy reads, docs/ipc.md:
  the only copy is the one into the buffer), next to a raw loopback TCP
  copy of the same number of bytes (one sender thread, one receiver doing
  recv_into: the ceiling of any socket design).
* herd: ``--readers`` concurrent sequential readers of one cold object,
  spread over the nodes: GETs per chunk at RGW (must be exactly one).
* metadata: creates/s and stats/s (getattr) with 16 concurrent clients'
  requests.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from boto3.s3.transfer import TransferConfig

from objcache.client.cluster import ClusterClient
from objcache.meta.model import ROOT
from objcache.testing.processes import stop_processes
from objcache.testing.s3servers import RgwServer, free_port, rgw_available
from objcache.units import format_size, parse_size

MiB = 1 << 20
SECRET = "cluster-read-benchmark-secret"
BUCKET = "bench-cluster"


def require_rgw() -> bool:
    """RGW is installed; else says how to get it (the caller exits 2)."""
    if rgw_available():
        return True
    print("this benchmark needs Ceph RGW (scripts/install-system-deps.sh)", file=sys.stderr)
    return False


class _BufferFile(io.RawIOBase):
    """A seekable file object over a preallocated buffer (boto3 writes
    parts at their offsets)."""

    def __init__(self, buf):
        self._mv = memoryview(buf).cast("B")
        self._pos = 0

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._mv.nbytes}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self):
        return self._pos

    def write(self, b):
        n = memoryview(b).nbytes
        self._mv[self._pos:self._pos + n] = b
        self._pos += n
        return n


class Servers:
    """``nodes`` objcache server processes on loopback."""

    def __init__(self, base: str, rgw, nodes: int, chunk: int, cache: int, replicas: int = 1):
        self.procs = []
        ports = [free_port() for _ in range(nodes)]
        env = dict(os.environ, OBJCACHE_SECRET=SECRET, AWS_ACCESS_KEY_ID=rgw.access_key,
                   AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_DEFAULT_REGION=rgw.region)
        try:
            for i, port in enumerate(ports):
                argv = [sys.executable, "-m", "objcache", "server",
                        "--data-dir", os.path.join(base, f"node{i}"),
                        "--listen", f"127.0.0.1:{port}", "--bucket", f"s3://{BUCKET}",
                        "--endpoint-url", rgw.endpoint_url, "--cache-size", str(cache),
                        "--chunk-size", str(chunk), "--writeback-delay", "1",
                        "--replicas", str(replicas)]
                if i:
                    argv += ["--join", f"127.0.0.1:{ports[0]}"]
                p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
                self.procs.append(p)
                line = p.stdout.readline()
                if "serving" not in line:
                    raise RuntimeError(f"node {i} did not start: {p.stderr.read()}")
        except BaseException:
            self.stop()
            raise
        self.addresses = [("127.0.0.1", p) for p in ports]

    def client(self, first: int = 0, local_reads: bool | None = None) -> ClusterClient:
        n = len(self.addresses)
        order = [self.addresses[(first + k) % n] for k in range(n)]
        return ClusterClient(order, SECRET.encode(), local_reads=local_reads)

    def stop(self):
        stop_processes(self.procs)


async def read_through(client: ClusterClient, node, chunk: int, width: int, out=None) -> int:
    """Sequential read with ``width`` chunk reads in flight, in order."""
    offsets = iter(range(0, node.size, chunk))
    total = 0

    async def reader():
        nonlocal total
        for off in offsets:
            data = await client.read(node, off, chunk)
            if out is not None:
                out[off:off + len(data)] = data
            total += len(data)
    await asyncio.gather(*(reader() for _ in range(width)))
    return total


def loopback_copy(nbytes: int, block: int) -> float:
    """Seconds to move ``nbytes`` over a loopback TCP connection."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    payload = np.random.default_rng(1).bytes(block)

    def send():
        conn, _ = srv.accept()
        with conn:
            left = nbytes
            while left > 0:
                conn.sendall(memoryview(payload)[:min(block, left)])
                left -= block
    t = threading.Thread(target=send)
    t.start()
    buf = bytearray(block)
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        t0 = time.perf_counter()
        got = 0
        while got < nbytes:
            n = c.recv_into(buf)
            if not n:
                break
            got += n
        dt = time.perf_counter() - t0
    t.join()
    srv.close()
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--chunk", default="8MiB")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--readers", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--creates", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    if not require_rgw():
        return 2
    # Uploaded interleaved, and each round alternates who reads first, so
    # that neither side always gets the older objects or the first turn.
    objects = ["herd.bin"] + [f"{side}{r}.bin" for r in range(args.rounds)
                              for side in ("cold", "base")]
    results: dict = {"size": size, "chunk": chunk, "width": args.width, "nodes": args.nodes}
    with tempfile.TemporaryDirectory(prefix="objcache-bench-") as base:
        rgw = RgwServer(os.path.join(base, "rgw"), store_bytes=(len(objects) + 1) * size
                        + (1 << 30)).start()
        try:
            rgw.create_bucket(BUCKET)
            s3 = rgw.client(max_pool_connections=max(16, args.width * 2))
            data = np.random.default_rng(7).bytes(size)
            up = TransferConfig(multipart_chunksize=chunk, multipart_threshold=chunk,
                                max_concurrency=4)
            for key in objects:
                s3.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=up)
            expect = memoryview(data)
            down = TransferConfig(max_concurrency=args.width, multipart_chunksize=chunk,
                                  multipart_threshold=chunk, use_threads=True)
            buf = np.zeros(size, dtype=np.uint8)

            def boto3_read(r: int) -> float:
                t0 = time.perf_counter()
                s3.download_fileobj(BUCKET, f"base{r}.bin", _BufferFile(buf), Config=down)
                dt = time.perf_counter() - t0
                assert buf.tobytes() == data
                return dt

            servers = Servers(os.path.join(base, "nodes"), rgw, args.nodes, chunk,
                              cache=max(4 << 30, 3 * size))
            try:
                results.update(asyncio.run(_cluster_part(
                    servers, rgw, args, size, chunk, expect, boto3_read)))
            finally:
                servers.stop()
            results["loopback_GBps"] = size / min(loopback_copy(size, chunk)
                                                  for _ in range(3)) / 1e9
        finally:
            rgw.stop()
    cold = results["cold_ratio"]
    print(f"objects of {format_size(size)}, {format_size(chunk)} chunks, width {args.width}, "
          f"{args.nodes} nodes, RGW on loopback")
    print(f"  cold read   cluster {results['cold_GBps']:.2f} GB/s  boto3 download_fileobj "
          f"{results['boto3_GBps']:.2f} GB/s  ratio {cold:.2f}x (per round: "
          f"{', '.join(f'{r:.2f}' for r in results['cold_ratios'])})")
    print(f"  cold GETs   {results['cold_gets']} for {results['chunks']} chunks; node caches "
          f"after the cold rounds: {results['cache_after_cold']}")
    print(f"  warm read   over RPC {results['warm_rpc_GBps']:.2f} GB/s  local arenas "
          f"{results['warm_GBps']:.2f} GB/s  raw loopback socket "
          f"{results['loopback_GBps']:.2f} GB/s  (RPC "
          f"{results['warm_rpc_GBps'] / results['loopback_GBps']:.2f}x, local "
          f"{results['warm_GBps'] / results['loopback_GBps']:.2f}x)")
    print(f"  herd        {args.readers} readers: {results['herd_GBps']:.2f} GB/s aggregate, "
          f"GETs per chunk: max {results['herd_max_gets_per_chunk']}, "
          f"{results['herd_gets']} GETs for {results['chunks']} chunks")
    print(f"  metadata    creates {results['creates_per_s']:.0f}/s  "
          f"stats {results['stats_per_s']:.0f}/s")
    if args.json:
        print(json.dumps(results))
    ok = results["herd_max_gets_per_chunk"] == 1 and results["herd_gets"] == results["chunks"]
    return 0 if ok else 1


async def _cluster_part(servers, rgw, args, size, chunk, expect, boto3_read) -> dict:
    out: dict = {"chunks": -(-size // chunk)}
    clients = [servers.client(i) for i in range(len(servers.addresses))]
    rpc_client = servers.client(1, local_reads=False)
    clients.append(rpc_client)
    try:
        c = clients[0]
        await c.status()
        cold_ratios, cold_rates, boto_rates = [], [], []
        buf = bytearray(size)
        for r in range(args.rounds):
            # Interleaved: the baseline, then the cluster on an object it
            # has never seen (cold everywhere).
            if r % 2 == 0:
                b = boto3_read(r)
            node = await c.lookup(ROOT, f"cold{r}.bin".encode())
            mark = rgw.request_mark()
            t0 = time.perf_counter()
            n = await read_through(c, node, chunk, args.width, buf)
            dt = time.perf_counter() - t0
            if r % 2 == 1:
                b = boto3_read(r)
            assert n == size and buf == expect, "cold read returned wrong bytes"
            gets = sum(v for (k, _), v in rgw.object_get_counts(mark, BUCKET).items()
                       if k == f"cold{r}.bin")
            out["cold_gets"] = gets
            cold_ratios.append(b / dt)
            cold_rates.append(size / dt / 1e9)
            boto_rates.append(size / b / 1e9)
        st = await c.status()
        out["cache_after_cold"] = [{k: n["cache"].get(k) for k in
                                    ("demotions", "memory_evictions", "loads", "hits")}
                                   for n in st["nodes"] if "cache" in n]
        out["cold_ratios"] = cold_ratios
        out["cold_ratio"] = statistics.median(cold_ratios)
        out["cold_GBps"] = statistics.median(cold_rates)
        out["boto3_GBps"] = statistics.median(boto_rates)

        node = await c.lookup(ROOT, b"cold0.bin")
        for key, client in (("warm_GBps", c), ("warm_rpc_GBps", rpc_client)):
            warm = []
            for _ in range(3):
                t0 = time.perf_counter()
                await read_through(client, node, chunk, args.width, buf)
                warm.append(time.perf_counter() - t0)
            assert buf == expect, "warm read returned wrong bytes"
            out[key] = size / min(warm) / 1e9

        herd = await c.lookup(ROOT, b"herd.bin")
        mark = rgw.request_mark()
        t0 = time.perf_counter()
        await asyncio.gather(*(read_through(clients[i % len(clients)], herd, chunk, 2)
                               for i in range(args.readers)))
        dt = time.perf_counter() - t0
        counts = {k: v for k, v in rgw.object_get_counts(mark, BUCKET).items()
                  if k[0] == "herd.bin"}
        out["herd_GBps"] = args.readers * size / dt / 1e9
        out["herd_gets"] = sum(counts.values())
        out["herd_max_gets_per_chunk"] = max(counts.values()) if counts else 0

        d = await c.mkdir(ROOT, b"meta")
        sem = asyncio.Semaphore(16)

        async def create(i):
            async with sem:
                return await clients[i % len(clients)].create(d.id, b"f%d" % i)
        t0 = time.perf_counter()
        made = await asyncio.gather(*(create(i) for i in range(args.creates)))
        out["creates_per_s"] = args.creates / (time.perf_counter() - t0)

        async def stat(i):
            async with sem:
                await clients[i % len(clients)].getattr(made[i % len(made)].id)
        n = args.creates * 2
        t0 = time.perf_counter()
        await asyncio.gather(*(stat(i) for i in range(n)))
        out["stats_per_s"] = n / (time.perf_counter() - t0)
    finally:
        for cl in clients:
            await cl.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
