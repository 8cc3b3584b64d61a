"""Raft commit throughput and latency on loopback, next to the fdatasync
ceiling measured in the same run.

    python -m bench.macro.raft_commit [--seconds 5] [--dir /var/tmp]

For R=1 and R=3 (kvnode processes: objcache/raft/kvnode.py, real RaftStorage
and RPC) and for 1 and 64 concurrent proposers, it reports committed
proposals/s and the p50/p99 commit latency seen by the client (a kv.put is
acknowledged once its entry is committed and applied on the leader). The
ceiling is one process doing pwrite(4 KiB) + fdatasync in a loop on the same
file system: the rate a design without group commit could not exceed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SECRET = b"raft-commit-benchmark-secret"


def fdatasync_ceiling(directory: str, seconds: float) -> float:
    path = os.path.join(directory, "ceiling.dat")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = os.urandom(4096)
    n, off, end = 0, 0, time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            off += 4096
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / seconds


def start_cluster(n: int, base: str) -> tuple[list, dict]:
    from objcache.testing.s3servers import free_port
    ports = {i: free_port() for i in range(1, n + 1)}
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
    procs = []
    env = dict(os.environ, OBJCACHE_SECRET=SECRET.decode())
    for i, port in ports.items():
        p = subprocess.Popen(
            [sys.executable, "-m", "objcache.raft.kvnode", "--id", str(i),
             "--listen", f"127.0.0.1:{port}", "--peers", peers,
             "--data-dir", os.path.join(base, f"r{n}-n{i}")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if not p.stdout.readline().startswith("ready"):
            raise RuntimeError(f"kvnode {i} did not start")
        procs.append(p)
    return procs, ports


def stop_cluster(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


async def drive(ports: dict, proposers: int, seconds: float) -> dict:
    from objcache.rpc import RemoteError, RpcClient
    clients = {i: RpcClient("127.0.0.1", p, SECRET) for i, p in ports.items()}
    leader = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while leader is None:
        for i, c in clients.items():
            try:
                if (await c.call("kv.status", timeout=1)).fields["role"] == "leader":
                    leader = i
            except Exception:  # noqa: BLE001 - not up yet
                pass
        if leader is None:
            if loop.time() > deadline:
                raise RuntimeError("no leader")
            await asyncio.sleep(0.05)
    c = clients[leader]
    value = "x" * 100
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    warm_until = time.perf_counter() + min(1.0, seconds / 5)

    async def proposer(w: int):
        k = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await c.call("kv.put", {"k": f"w{w}-{k}", "v": value}, timeout=10)
            except RemoteError:
                continue
            t1 = time.perf_counter()
            if t0 >= warm_until:
                latencies.append(t1 - t0)
            k += 1

    await asyncio.gather(*(proposer(w) for w in range(proposers)))
    for cl in clients.values():
        await cl.close()
    measured = seconds - (warm_until - (stop_at - seconds))
    latencies.sort()
    return {
        "ops_per_s": len(latencies) / measured,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.macro.raft_commit")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args(argv)
    base = tempfile.mkdtemp(prefix="objcache-raft-bench-", dir=args.dir)
    import uvloop
    rows = []
    try:
        ceiling = fdatasync_ceiling(base, min(args.seconds, 3.0))
        for replicas in (1, 3):
            procs, ports = start_cluster(replicas, base)
            try:
                for proposers in (1, 64):
                    r = uvloop.run(drive(ports, proposers, args.seconds))
                    r.update(replicas=replicas, proposers=proposers,
                             vs_ceiling=r["ops_per_s"] / ceiling)
                    rows.append(r)
            finally:
                stop_cluster(procs)
        ceiling2 = fdatasync_ceiling(base, min(args.seconds, 3.0))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"fdatasync ceiling (pwrite 4 KiB + fdatasync, one stream): "
          f"{ceiling:,.0f}/s before, {ceiling2:,.0f}/s after")
    print(f"{'R':>2} {'proposers':>9} {'commits/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x ceiling':>9}")
    for r in rows:
        print(f"{r['replicas']:>2} {r['proposers']:>9} {r['ops_per_s']:>10,.0f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['vs_ceiling']:>9.2f}")
    print(json.dumps({"ceiling_per_s": [ceiling, ceiling2], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
