"""kill -9 a node (R=1) during mixed operations, restart it from its data
directory: every acknowledged flush and fsync survives, no rename is ever
half-applied, and after a drain the bucket holds exactly the files."""
import asyncio
import os
import random

import pytest

from objcache.meta.model import ROOT

from tests.server_cluster import Cluster


@pytest.fixture
def cluster(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    c = Cluster(tmp_path, s3, bucket)
    c.s3, c.bucket, c.tmp = s3, bucket, tmp_path
    yield c
    c.stop()


def test_kill9_during_mixed_operations(cluster):
    rng = random.Random(5)

    async def main():
        acked: dict[str, bytes] = {}            # path -> content, acknowledged
        renames: list[tuple[str, str, bool]] = []
        async with cluster.client() as c:
            d = await c.mkdir(ROOT, b"w")

            async def put(name: str, body: bytes):
                f = await c.create(d.id, name.encode())
                v = await c.write(f, 0, body)
                await c.flush(f, len(body), v)
                return f

            for i in range(12):
                body = os.urandom(rng.randint(1, 300_000))
                await put(f"f{i}", body)
                acked[f"w/f{i}"] = body
            await c.fsync((await c.resolve("w/f0")).id)

            victim = 1
            cluster.kill9(victim)
            # Operations keep coming while the node is dead: those touching
            # its group fail (R=1), the rest succeed.
            for i in range(12, 24):
                body = os.urandom(rng.randint(1, 100_000))
                try:
                    await asyncio.wait_for(put(f"f{i}", body), 5)
                    acked[f"w/f{i}"] = body
                except (OSError, asyncio.TimeoutError):
                    pass
            for i in range(0, 24, 3):
                try:
                    await asyncio.wait_for(c.rename(d.id, f"f{i}".encode(), d.id,
                                                    f"r{i}".encode()), 5)
                    renames.append((f"w/f{i}", f"w/r{i}", True))
                except (OSError, asyncio.TimeoutError):
                    renames.append((f"w/f{i}", f"w/r{i}", False))
            cluster.restart(victim)
            # Wait until the restarted node's group answers again.
            for _ in range(200):
                try:
                    await c.readdir(d.id)
                    await c.status()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            names = {n.decode() for n, _, _ in await c.readdir(d.id)}
            for src, dst, ok in renames:
                s, t = src.split("/")[1], dst.split("/")[1]
                assert (s in names) != (t in names), (
                    f"rename {src}->{dst} half-applied {ok} {sorted(names)}")
                if ok:
                    assert t in names, f"acknowledged rename {src}->{dst} lost"
                if t in names and src in acked:
                    acked[dst] = acked.pop(src)
            for path, body in acked.items():
                node = await c.resolve(path)
                assert bytes(await c.read(node, 0, len(body) + 10)) == body, path
            await c.drain(timeout=120)
            return acked

    acked = asyncio.run(asyncio.wait_for(main(), 240))
    s3 = cluster.s3.client()
    objs = s3.list_objects_v2(Bucket=cluster.bucket, Prefix="pre/w/")["Contents"]
    got = {o["Key"][len("pre/"):] for o in objs if not o["Key"].endswith("/")}
    assert set(acked) <= got
    for path, body in acked.items():
        assert s3.get_object(Bucket=cluster.bucket, Key="pre/" + path)["Body"].read() == body


@pytest.fixture
def replicated(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    c = Cluster(tmp_path, s3, bucket, n=3, replicas=3)
    c.s3, c.bucket = s3, bucket
    yield c
    c.stop()


async def _group_status(c):
    st = await c.status()
    roles = {n["node"]: n["raft"]["role"] for n in st["nodes"] if "raft" in n}
    return st, roles


def test_replicated_group_survives_kill9_of_its_leader(replicated):
    """R=3: one group on three processes. kill -9 its leader while
    operations stream in: they resume on the new leader; every acknowledged
    flush survives; the restarted node catches up as a follower."""
    cluster = replicated
    rng = random.Random(7)

    async def main():
        acked: dict[bytes, bytes] = {}
        async with cluster.client() as c:
            st, roles = await _group_status(c)
            assert {int(g): sorted(m) for g, m in st["groups"].items()} == {1: [1, 2, 3]}
            assert st["ring"] == [1]
            assert sorted(roles.values()) == ["follower", "follower", "leader"], [(n["node"], n["address"], n["raft"]) for n in st["nodes"]]
            d = await c.mkdir(ROOT, b"r")
            stop = asyncio.Event()
            counts = {"ok": 0, "after_kill": 0}
            killed = asyncio.Event()

            async def writer():
                i = 0
                while not stop.is_set():
                    name = b"f%d" % i
                    body = os.urandom(rng.randint(1, 200_000))
                    i += 1
                    try:
                        f = await asyncio.wait_for(c.create(d.id, name), 10)
                        v = await asyncio.wait_for(c.write(f, 0, body), 10)
                        await asyncio.wait_for(c.flush(f, len(body), v), 10)
                    except (OSError, asyncio.TimeoutError):
                        continue
                    acked[name] = body
                    counts["ok"] += 1
                    if killed.is_set():
                        counts["after_kill"] += 1
                        if counts["after_kill"] >= 10:
                            stop.set()

            task = asyncio.create_task(writer())
            while counts["ok"] < 10:
                await asyncio.sleep(0.05)
            leader = next(n for n, r in roles.items() if r == "leader")
            cluster.kill9(leader - 1)                       # node ids are 1..3 in start order
            killed.set()
            await asyncio.wait_for(task, 120)
            st, roles = await _group_status(c)
            assert "leader" in roles.values() and leader not in roles
            names = {n for n, _, _ in await c.readdir(d.id)}
            assert set(acked) <= names
            for name, body in acked.items():
                node = await c.lookup(d.id, name)
                assert bytes(await c.read(node, 0, len(body) + 1)) == body, name

            cluster.restart(leader - 1)
            for _ in range(400):
                st, roles = await _group_status(c)
                nodes = {n["node"]: n for n in st["nodes"]}
                if "raft" in nodes[leader]:
                    lead = next(n for n in nodes.values() if n.get("raft", {}).get("role")
                                == "leader")
                    if nodes[leader]["raft"]["applied"] >= lead["raft"]["commit"]:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"restarted node {leader} did not catch up: {st}")
            assert roles[leader] == "follower"
            await c.drain(timeout=120)
            return acked

    acked = asyncio.run(asyncio.wait_for(main(), 300))
    s3 = cluster.s3.client()
    for name, body in acked.items():
        key = "pre/r/" + name.decode()
        assert s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read() == body, key


def test_kill9_of_every_server_after_closing_a_file_larger_than_the_caches(tmp_path,
                                                                          moto_bucket):
    """Three nodes with 48 MiB disk tiers; a 256 MiB file is written (its
    chunks spill: engine/spill.py) and closed, then every server is killed
    with kill -9 before write-back stored it (the delay is an hour). After
    a restart the file reads back whole; after a drain the bucket holds
    exactly it, and no spill object is left."""
    s3, bucket = moto_bucket
    cluster = Cluster(tmp_path, s3, bucket, n=3, cache="64MiB", writeback_delay=3600)
    data = os.urandom(256 << 20)
    try:
        async def write():
            async with cluster.client() as c:
                f = await c.create(ROOT, b"big.bin")
                versions = {}
                for off in range(0, len(data), 16 << 20):
                    versions.update(await c.write(f, off, data[off:off + (16 << 20)]))
                await c.flush(f, len(data), versions)
                st = await c.status()
                return [n.get("spill", {}).get("spilled", 0) for n in st["nodes"]]
        spilled = asyncio.run(asyncio.wait_for(write(), 300))
        assert sum(spilled) >= (256 - 3 * 48) // 1, spilled
        for i in range(3):
            cluster.kill9(i)
        for i in range(3):
            cluster.restart(i)

        async def check():
            async with cluster.client() as c:
                f = await c.resolve("big.bin")
                assert f.size == len(data)
                got = bytearray()
                for off in range(0, len(data), 16 << 20):
                    got += await c.read(f, off, 16 << 20)
                assert got == data
                await c.drain(timeout=300)
        asyncio.run(asyncio.wait_for(check(), 600))
    finally:
        cluster.stop()
    client = s3.client()
    assert client.get_object(Bucket=bucket, Key="pre/big.bin")["Body"].read() == data
    left = client.list_objects_v2(Bucket=bucket, Prefix="pre//").get("Contents", [])
    assert left == [], [o["Key"] for o in left]
