"""Three Raft replicas as separate OS processes on loopback: kill -9 the
leader under a stream of proposals; a new leader serves within a few
election timeouts; no acknowledged entry is lost; the killed node restarts
from its files and catches up by snapshot (it fell behind the compaction
point while it was down)."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from objcache.rpc import RemoteError, RpcClient, RpcError
from objcache.testing.s3servers import free_port

SECRET = b"raft-process-test-secret"
TICK = 0.05
ELECTION = 10 * TICK


class Proc:
    def __init__(self, nid, port, peers, data_dir):
        self.nid, self.port, self.peers, self.data_dir = nid, port, peers, data_dir
        self.p = None

    def start(self):
        env = dict(os.environ, OBJCACHE_SECRET=SECRET.decode())
        self.p = subprocess.Popen(
            [sys.executable, "-m", "objcache.raft.kvnode", "--id", str(self.nid),
             "--listen", f"127.0.0.1:{self.port}", "--peers", self.peers,
             "--data-dir", self.data_dir, "--tick", str(TICK),
             "--snapshot-entries", "200"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.startswith("ready"), (line, self.p.stderr.read() if self.p.poll() is not None else "")

    def kill9(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait()

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def cluster(tmp_path):
    ports = {i: free_port() for i in (1, 2, 3)}
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in ports.items())
    procs = {i: Proc(i, ports[i], peers, str(tmp_path / f"n{i}")) for i in ports}
    for p in procs.values():
        p.start()
    yield procs
    for p in procs.values():
        p.stop()


async def find_leader(clients, deadline):
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        for nid, c in clients.items():
            try:
                st = (await c.call("kv.status", timeout=0.5)).fields
            except (RpcError, asyncio.TimeoutError):
                continue
            if st.get("role") == "leader":
                return nid
        await asyncio.sleep(TICK)
    raise AssertionError("no leader")


async def put(clients, leader, k, v):
    """Returns (acknowledged, leader to use next)."""
    try:
        await clients[leader].call("kv.put", {"k": k, "v": v}, timeout=2.0)
        return True, leader
    except RemoteError as exc:
        hint = (exc.details or {}).get("leader") if exc.code == "not_leader" else None
        return False, hint or leader
    except (RpcError, asyncio.TimeoutError):
        return False, leader


def test_kill_leader_under_load_no_acknowledged_entry_lost(cluster):
    async def main():
        loop = asyncio.get_running_loop()
        clients = {i: RpcClient("127.0.0.1", p.port, SECRET, connect_timeout=1.0,
                                backoff_max=0.2) for i, p in cluster.items()}
        acked: dict[str, int] = {}
        leader = await find_leader(clients, loop.time() + 20 * ELECTION)
        n = 0

        async def stream(count):
            nonlocal leader, n
            end = n + count
            while n < end:
                k = f"k{n}"
                ok, nxt = await put(clients, leader, k, n)
                if ok:
                    acked[k] = n
                    n += 1
                elif nxt != leader:
                    leader = nxt
                else:
                    leader = await find_leader(
                        {i: c for i, c in clients.items() if i in alive}, loop.time() + 20 * ELECTION)

        alive = set(cluster)
        await stream(150)
        # kill -9 the leader in the middle of the stream.
        victim = leader
        writer = asyncio.create_task(stream(100))
        await asyncio.sleep(0)
        cluster[victim].kill9()
        killed_at = loop.time()
        alive.discard(victim)
        await clients[victim].close()
        others = {i: c for i, c in clients.items() if i != victim}
        new_leader = await find_leader(others, killed_at + 20 * ELECTION)
        failover = loop.time() - killed_at
        await writer
        assert new_leader != victim
        assert failover < 10 * ELECTION, f"failover took {failover:.2f}s"
        # Far past the compaction point (200 entries) while the victim is down.
        await stream(450)
        cluster[victim].start()
        clients[victim] = RpcClient("127.0.0.1", cluster[victim].port, SECRET,
                                    connect_timeout=1.0, backoff_max=0.2)
        # Everyone, the restarted node included, holds every acknowledged write.
        for nid, c in clients.items():
            deadline = loop.time() + 30
            while True:
                why = None
                try:
                    dump = (await c.call("kv.dump", timeout=5)).fields
                    missing = [k for k, v in acked.items() if dump["kv"].get(k) != v]
                    if not missing:
                        break
                    why = f"{len(missing)} acknowledged writes missing, e.g. {missing[:3]}"
                except (RpcError, asyncio.TimeoutError) as exc:
                    why = repr(exc)
                assert loop.time() < deadline, f"node {nid} never caught up: {why}"
                await asyncio.sleep(TICK)
        st = (await clients[victim].call("kv.status")).fields
        assert st["snapshot_index"] > 0, "the restarted node should have installed a snapshot"
        for c in clients.values():
            await c.close()
        return failover, len(acked)

    failover, n = asyncio.run(main())
    print(f"\nfailover {failover * 1000:.0f} ms; {n} acknowledged writes all present")
