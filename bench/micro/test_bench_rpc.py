"""Micro-benchmarks: the cluster RPC layer (objcache/rpc, docs/rpc.md).

The RPC server runs on uvloop in a child process, the client on uvloop in
the benchmark process: two loops on two cores, as between two nodes. All
traffic is loopback TCP.

Acceptance (ratios measured in the same run, interleaved, bench/ratio.py):

* 8 MiB payload calls, both directions - a request carrying 8 MiB
  (``put``: chunk write) and a response carrying 8 MiB (``get``: chunk
  read) - reach >= 0.5x the throughput of a raw socket copy of the same
  bytes: a blocking-socket sender and a receiver thread moving 8 MiB
  buffers over loopback (``sendall`` / ``recv_into`` a preallocated buffer
  / 1-byte acknowledgement per buffer: the same round-trip shape).

Reported, not asserted: small-call latency (1 in flight) and throughput
(64 in flight), with a raw blocking-socket ping-pong for scale.

Run: ``python -m pytest bench/micro/test_bench_rpc.py -s`` (ratios are
printed and asserted); add ``--benchmark-enable`` for pytest-benchmark
tables of the candidate alone.
"""
import asyncio
import multiprocessing
import socket
import statistics
import threading
import time

import numpy as np
import pytest
import uvloop

from bench.ratio import check, compare
from objcache.rpc import RpcClient, RpcServer

MiB = 1 << 20
CHUNK = 8 * MiB
SECRET = b"bench-cluster-secret-0123456789"


def _server_main(pipe):
    """Child process: an RpcServer on uvloop until the parent says stop."""
    async def main():
        blob = np.random.default_rng(1).bytes(CHUNK)

        async def ping(ctx, fields, payload):
            return None

        async def put(ctx, fields, payload):
            return {"n": payload.nbytes}

        async def get(ctx, fields, payload):
            return {}, blob

        server = RpcServer({"ping": ping, "put": put, "get": get}, SECRET)
        await server.start("127.0.0.1", 0)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(pipe.fileno(), stop.set)
        pipe.send(server.port)
        await stop.wait()
        await server.close()
    uvloop.run(main())


class _ServerProcess:
    """The RPC server in its own process (as on another node: no shared
    GIL with the client)."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(child,),
                                name="rpc-bench-server", daemon=True)
        self.proc.start()
        if not self.pipe.poll(60):
            raise RuntimeError("benchmark server did not start")
        self.port = self.pipe.recv()

    def close(self):
        self.pipe.send("stop")
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


class _RawPair:
    """The baseline: a loopback TCP connection, a receiver thread that
    ``recv_into``s ``size``-byte messages into one preallocated buffer and
    acknowledges each with one byte, or echoes 1-byte pings."""

    def __init__(self, size, mode):
        lsock = socket.create_server(("127.0.0.1", 0))
        self.sender = socket.create_connection(lsock.getsockname())
        self.receiver, _ = lsock.accept()
        lsock.close()
        for s in (self.sender, self.receiver):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.size = size
        self.data = np.random.default_rng(0).bytes(size)
        target = self._sink if mode == "bulk" else self._echo
        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def _sink(self):
        buf = memoryview(bytearray(self.size))
        try:
            while True:
                got = 0
                while got < self.size:
                    n = self.receiver.recv_into(buf[got:])
                    if n == 0:
                        return
                    got += n
                self.receiver.sendall(b"k")
        except OSError:
            return

    def _echo(self):
        try:
            while (b := self.receiver.recv(1)):
                self.receiver.sendall(b)
        except OSError:
            return

    def transfer(self):
        self.sender.sendall(self.data)
        self.sender.recv(1)

    def ping(self):
        self.sender.sendall(b"p")
        self.sender.recv(1)

    def close(self):
        self.sender.close()
        self.thread.join(10)
        self.receiver.close()


@pytest.fixture(scope="module")
def rpc():
    """(client loop, client) shared by the benchmarks; the server runs in a
    child process."""
    srv = _ServerProcess()
    loop = uvloop.new_event_loop()
    client = RpcClient("127.0.0.1", srv.port, SECRET, call_timeout=60)
    try:
        loop.run_until_complete(client.connect(timeout=30))
        yield loop, client
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        srv.close()


def test_8mib_payload_throughput_vs_raw_socket(rpc, benchmark):
    loop, client = rpc
    data = np.random.default_rng(2).bytes(CHUNK)
    raw = _RawPair(CHUNK, "bulk")

    async def put():
        r = await client.call("put", {}, data)
        assert r.fields["n"] == CHUNK

    async def get():
        r = await client.call("get")
        assert r.payload.nbytes == CHUNK

    def rpc_put():
        loop.run_until_complete(put())

    def rpc_get():
        loop.run_until_complete(get())

    try:
        put_cmp = compare(rpc_put, raw.transfer, calls=6, rounds=9, warmup=2)
        get_cmp = compare(rpc_get, raw.transfer, calls=6, rounds=9, warmup=2)
        benchmark(rpc_put)
    finally:
        raw.close()

    def gbps(seconds):
        return CHUNK / seconds / 1e9
    print(f"\nrpc 8 MiB request payload (put): {gbps(put_cmp.candidate_s):.2f}"
          f" GB/s, {put_cmp.candidate_s * 1e3:.2f} ms/call; raw socket "
          f"{gbps(put_cmp.baseline_s):.2f} GB/s -> {put_cmp.speedup:.2f}x")
    print(f"rpc 8 MiB response payload (get): {gbps(get_cmp.candidate_s):.2f}"
          f" GB/s, {get_cmp.candidate_s * 1e3:.2f} ms/call; raw socket "
          f"{gbps(get_cmp.baseline_s):.2f} GB/s -> {get_cmp.speedup:.2f}x")
    check(put_cmp.speedup, 0.5, "rpc 8 MiB request payload vs raw socket")
    check(get_cmp.speedup, 0.5, "rpc 8 MiB response payload vs raw socket")


def test_small_call_latency_and_throughput(rpc, benchmark):
    loop, client = rpc
    raw = _RawPair(1, "echo")
    n_seq, n_par, width = 2000, 200, 64

    async def sequential():
        for _ in range(n_seq):
            await client.call("ping", {"inode": 1, "chunk": 2})

    async def worker():
        for _ in range(n_par):
            await client.call("ping", {"inode": 1, "chunk": 2})

    async def parallel():
        await asyncio.gather(*(worker() for _ in range(width)))

    def raw_pings():
        for _ in range(n_seq):
            raw.ping()

    try:
        loop.run_until_complete(sequential())               # warm-up
        lat, par, base = [], [], []
        for r in range(5):
            order = (0, 1, 2) if r % 2 else (2, 1, 0)
            for side in order:
                t = time.perf_counter()
                if side == 0:
                    loop.run_until_complete(sequential())
                    lat.append((time.perf_counter() - t) / n_seq)
                elif side == 1:
                    loop.run_until_complete(parallel())
                    par.append((time.perf_counter() - t) / (n_par * width))
                else:
                    raw_pings()
                    base.append((time.perf_counter() - t) / n_seq)
        benchmark(lambda: loop.run_until_complete(client.call("ping")))
    finally:
        raw.close()
    lat_s, par_s, base_s = (statistics.median(x) for x in (lat, par, base))
    print(f"\nrpc small calls, 1 in flight: {lat_s * 1e6:.0f} us round trip "
          f"({1 / lat_s:,.0f} calls/s); raw socket 1-byte ping-pong "
          f"{base_s * 1e6:.0f} us -> {base_s / lat_s:.2f}x")
    print(f"rpc small calls, {width} in flight: {1 / par_s:,.0f} calls/s "
          f"({par_s * 1e6:.1f} us/call amortized, "
          f"{lat_s / par_s:.1f}x the 1-in-flight rate)")
