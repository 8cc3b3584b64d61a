"""kill -9 a node (R=1) during mixed operations, restart it from its data
directory: every acknowledged flush and fsync survives, no rename is ever
half-applied, and after a drain the bucket holds exactly the files."""
import asyncio
import os
import random
import signal

import pytest

from objcache.meta.model import ROOT

from .test_server_processes import Cluster


@pytest.fixture
def cluster(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    c = Cluster(tmp_path, s3, bucket)
    c.s3, c.bucket, c.tmp = s3, bucket, tmp_path
    yield c
    c.stop()


def restart(cluster, i):
    """Start node ``i`` again with its data directory and port."""
    import subprocess
    import sys
    p = cluster.procs[i]
    argv = p.args
    env = dict(os.environ, OBJCACHE_SECRET="server-process-test-secret",
               AWS_ACCESS_KEY_ID=cluster.s3.access_key,
               AWS_SECRET_ACCESS_KEY=cluster.s3.secret_key, AWS_DEFAULT_REGION="us-east-1")
    q = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = q.stdout.readline()
    assert "serving" in line, (line, q.stderr.read() if q.poll() is not None else "")
    cluster.procs[i] = q


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
            cluster.procs[victim].send_signal(signal.SIGKILL)
            cluster.procs[victim].wait()
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
            restart(cluster, victim)
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
