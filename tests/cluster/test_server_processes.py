"""`objcache server` as real processes on loopback (R=1, 3 nodes): join,
namespace and data through the cluster client, write-back, drain, status;
a bucket object written outside is read back through the cluster."""
import asyncio
import json
import os
import subprocess
import sys

import pytest

from objcache.client.cluster import ClusterClient
from objcache.meta.model import ROOT
from objcache.testing.processes import stop_processes
from tests.server_cluster import SECRET, Cluster


@pytest.fixture
def cluster(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    c = Cluster(tmp_path, s3, bucket)
    c.s3, c.bucket = s3, bucket
    yield c
    c.stop()


def test_three_process_cluster_end_to_end(cluster):
    s3 = cluster.s3.client()
    s3.put_object(Bucket=cluster.bucket, Key="pre/outside.txt", Body=b"written elsewhere")

    async def main():
        async with cluster.client() as c:
            st = await c.status()
            assert len(st["nodes"]) == 3 and len(st["ring"]) == 3
            root = await c.getattr(ROOT)
            names = sorted(n for n, _, _ in await c.readdir(root.id))
            assert names == [b"outside.txt"]
            ext = await c.lookup(ROOT, b"outside.txt")
            assert bytes(await c.read(ext, 0, 100)) == b"written elsewhere"
            d = await c.mkdir(ROOT, b"dir")
            f = await c.create(d.id, b"data.bin")
            payload = os.urandom(3 * (1 << 20) + 123)
            versions = await c.write(f, 0, payload)
            f = await c.flush(f, len(payload), versions)
            assert bytes(await c.read(f, 0, len(payload))) == payload
            await c.fsync(f.id)
            await c.rename(ROOT, b"outside.txt", d.id, b"moved.txt")
            await c.drain()
            st = await c.status()
            assert all((n.get("pending") or [0])[0] == 0 for n in st["nodes"])
        return payload

    payload = asyncio.run(asyncio.wait_for(main(), 120))
    got = {o["Key"]: o for o in s3.list_objects_v2(Bucket=cluster.bucket)["Contents"]}
    assert set(got) == {"pre/dir/", "pre/dir/data.bin", "pre/dir/moved.txt"}
    body = s3.get_object(Bucket=cluster.bucket, Key="pre/dir/data.bin")["Body"].read()
    assert body == payload


def test_status_and_drain_commands(cluster):
    env = dict(os.environ, OBJCACHE_SECRET=SECRET)
    out = subprocess.run([sys.executable, "-m", "objcache", "status", "--cluster",
                          cluster.addrs.split(",")[1], "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert {n["node"] for n in st["nodes"]} == {1, 2, 3}
    out = subprocess.run([sys.executable, "-m", "objcache", "drain", "--cluster",
                          cluster.addrs.split(",")[0]], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([sys.executable, "-m", "objcache", "status", "--cluster",
                          cluster.addrs.split(",")[0]], env=dict(env, OBJCACHE_SECRET="wrong"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_local_zero_copy_reads_match_rpc_reads(cluster):
    """A client on the owners' host reads their arenas (objcache/ipc); the
    bytes equal those read over RPC, and the owners' pins all end."""
    payload = os.urandom(5 * (1 << 20) + 77)

    async def main():
        async with cluster.client() as c:
            f = await c.create(ROOT, b"shared.bin")
            f = await c.flush(f, len(payload), await c.write(f, 0, payload))
            f = await c.getattr(f.id)
            local = [bytes(await c.read(f, o, 1 << 20)) for o in range(0, len(payload), 1 << 20)]
            odd = bytes(await c.read(f, (1 << 20) - 5, 10))     # across a chunk boundary
        async with ClusterClient(cluster.addrs, SECRET.encode(), local_reads=False) as c:
            remote = bytes(await c.read(f, 0, len(payload)))
            nodes = (await c.status())["nodes"]
        return b"".join(local), odd, remote, nodes

    local, odd, remote, nodes = asyncio.run(asyncio.wait_for(main(), 120))
    assert local == remote == payload and odd == payload[(1 << 20) - 5:(1 << 20) + 5]
    stats = [n["local_reads"] for n in nodes]
    assert sum(s["pins"] for s in stats) >= 6           # every chunk came from an arena
    assert all(s["pinned"] == 0 for s in stats)         # the first client is gone


def test_clients_with_a_stale_ring_are_told_to_refresh(tmp_path, moto_bucket):
    """Two clients fetch the ring while the cluster has one group; two more
    groups join before the first namespace operation fixes the ring. Their
    requests carry ring v1: the owners refuse them (stale_ring, with the
    new map), the clients adopt it and place the chunks again — a write
    lands at the true owners and a read (local arenas first) finds it."""
    s3, bucket = moto_bucket
    cl = Cluster(tmp_path, s3, bucket, n=1)
    payload = os.urandom(6 * (1 << 20) + 11)
    try:
        async def main():
            a = ClusterClient(cl.addrs, SECRET.encode())
            b = ClusterClient(cl.addrs, SECRET.encode())
            try:
                await a.chunk_size()
                await b.chunk_size()
                assert a._ring.version == b._ring.version == 1
                cl.add_node()
                cl.add_node()
                f = await a.create(ROOT, b"stale.bin")
                f = await a.flush(f, len(payload), await a.write(f, 0, payload))
                assert a._ring.version == 3 and a._ring.groups == (1, 2, 3)
                st = await a.status()
                assert st["ring_version"] == 3 and st["ring"] == [1, 2, 3]
                got = bytes(await b.read(await b.getattr(f.id), 0, len(payload)))
                assert b._ring.version == 3
                # Every chunk version is at its owner under the new ring.
                async with ClusterClient(cl.addrs, SECRET.encode(), local_reads=False) as c:
                    fresh = bytes(await c.read(await c.getattr(f.id), 0, len(payload)))
                    await c.drain()
                return got, fresh
            finally:
                await a.close()
                await b.close()

        got, fresh = asyncio.run(asyncio.wait_for(main(), 120))
        assert got == fresh == payload
        body = s3.client().get_object(Bucket=bucket, Key="pre/stale.bin")["Body"].read()
        assert body == payload
    finally:
        cl.stop()


def test_listing_larger_than_a_message_header(tmp_path, rgw_bucket):
    """A directory whose listing exceeds the RPC header limit (1 MiB):
    readdir and readdir_plus send it as a payload; bucket-only names get
    inodes by concurrent lookups. (RGW: it takes the 4,300 PUTs twice as
    fast as moto.)"""
    from concurrent.futures import ThreadPoolExecutor
    rgw, bucket = rgw_bucket
    s3 = rgw.client(max_pool_connections=32)
    names = [f"{i:05d}-" + "n" * 244 for i in range(4300)]    # > 1.1 MB of entries

    def put(name):
        s3.put_object(Bucket=bucket, Key=f"pre/wide/{name}", Body=b"x")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, names))
    cluster = Cluster(tmp_path, rgw, bucket)
    try:
        _list_wide(cluster, names)
    finally:
        cluster.stop()


def _list_wide(cluster, names):
    async def main():
        async with cluster.client() as c:
            wide = await c.lookup(ROOT, b"wide")
            listed = await c.readdir(wide.id)
            plus = await c.readdir_plus(wide.id)
        return listed, plus

    listed, plus = asyncio.run(asyncio.wait_for(main(), 300))
    assert sorted(n for n, _, _ in listed) == [n.encode() for n in names]
    assert sorted(n for n, _ in plus) == [n.encode() for n in names]
    assert all(node.size == 1 and node.id for _, node in plus)


def test_a_starting_node_answers_not_ready_and_clients_wait(tmp_path, moto_bucket):
    """A node started before the node it joins serves RPC at once but is
    not ready: requests get a retryable "not_ready" (exact message, no
    traceback in its log), and a client that only knows this node waits
    for it within its deadline instead of failing."""
    from objcache.rpc import RemoteError, RpcClient
    from objcache.testing.s3servers import free_port
    s3, bucket = moto_bucket
    seed_port, port = free_port(), free_port()
    env = dict(os.environ, OBJCACHE_SECRET=SECRET, AWS_ACCESS_KEY_ID=s3.access_key,
               AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_DEFAULT_REGION="us-east-1")

    def server(name, listen, *extra):
        log = open(tmp_path / f"{name}.log", "ab")
        return subprocess.Popen(
            [sys.executable, "-m", "objcache", "server", "--data-dir", str(tmp_path / name),
             "--listen", f"127.0.0.1:{listen}", "--bucket", f"s3://{bucket}/pre",
             "--endpoint-url", s3.endpoint_url, *extra],
            env=env, stdout=subprocess.PIPE, stderr=log, text=True)

    procs = [server("early", port, "--join", f"127.0.0.1:{seed_port}")]
    try:
        async def while_starting():
            c = RpcClient("127.0.0.1", port, SECRET.encode(), connect_timeout=1.0)
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while True:                              # until its RPC server listens
                try:
                    await c.call("meta.getattr", {"ino": ROOT}, timeout=5)
                except RemoteError as exc:
                    await c.close()
                    return exc
                except Exception:  # noqa: BLE001 - not listening yet
                    assert loop.time() < end, "the starting node never listened"
                    await asyncio.sleep(0.05)
        exc = asyncio.run(while_starting())
        assert (exc.code, exc.message) == ("not_ready", "this node is starting and not ready yet")

        async def client_waits():
            async with ClusterClient([("127.0.0.1", port)], SECRET.encode(), timeout=60) as c:
                waiting = asyncio.ensure_future(c.getattr(ROOT))
                await asyncio.sleep(0.5)
                assert not waiting.done()             # still starting: the client waits
                procs.append(server("seed", seed_port))
                return (await waiting).id
        assert asyncio.run(asyncio.wait_for(client_waits(), 90)) == ROOT
        for p in procs:
            assert "serving" in p.stdout.readline()
    finally:
        stop_processes(procs)
    log = (tmp_path / "early.log").read_text()
    assert "Traceback" not in log and "AttributeError" not in log, log[-3000:]
