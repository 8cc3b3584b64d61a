"""`objcache server` processes (1 and 3) against Ceph RGW on loopback: the
bucket's own objects and s3fs metadata are read, new files (a multipart
one included) are written back with that metadata, renames and removals
reach the bucket, concurrent cold readers cost one GET per chunk, counted
at RGW, and an object replaced by another tool is seen at the next open."""
import asyncio
import os
import stat

import pytest

from objcache.meta.model import ROOT

from tests.server_cluster import Cluster

pytestmark = pytest.mark.rgw

MiB = 1 << 20


@pytest.mark.parametrize("nodes", [1, 3])
def test_cluster_against_rgw(tmp_path, rgw_bucket, nodes):
    rgw, bucket = rgw_bucket
    s3 = rgw.client()
    outside = os.urandom(6 * MiB + 17)
    s3.put_object(Bucket=bucket, Key="data/outside.bin", Body=outside,
                  Metadata={"mode": str(stat.S_IFREG | 0o600), "uid": "1234", "gid": "99",
                            "mtime": "1700000000"})
    s3.put_object(Bucket=bucket, Key="data/old.txt", Body=b"old")
    cluster = Cluster(tmp_path, rgw, bucket, n=nodes, prefix="", cache="256MiB")
    try:
        async def main():
            async with cluster.client() as c:
                d = await c.lookup(ROOT, b"data")
                names = sorted(n for n, _, _ in await c.readdir(d.id))
                assert names == [b"old.txt", b"outside.bin"]
                node = await c.lookup(d.id, b"outside.bin")
                assert (node.mode, node.uid, node.gid) == (0o600, 1234, 99)
                assert node.mtime_ns == 1700000000 * 10**9

                # 8 concurrent cold readers: one GET per 1 MiB chunk.
                mark = rgw.request_mark()
                reads = await asyncio.gather(*(c.read(node, 0, node.size) for _ in range(8)))
                assert all(bytes(r) == outside for r in reads)
                gets = {rng: n for (key, rng), n in rgw.object_get_counts(mark, bucket).items()
                        if key == "data/outside.bin"}
                assert sum(gets.values()) == 7 and max(gets.values()) == 1, gets

                # Replaced by another tool: the next open sees the new object.
                replaced = os.urandom(2 * MiB + 5)
                s3.put_object(Bucket=bucket, Key="data/outside.bin", Body=replaced)
                node = await c.open(node.id)
                assert node.size == len(replaced)
                assert bytes(await c.read(node, 0, node.size)) == replaced

                big = os.urandom(20 * MiB + 3)             # > single PUT: multipart
                f = await c.create(d.id, b"big.bin", mode=0o640, uid=7, gid=8)
                f = await c.flush(f, len(big), await c.write(f, 0, big))
                await c.fsync(f.id)
                await c.rename(d.id, b"old.txt", ROOT, b"renamed.txt")
                await c.unlink(d.id, b"outside.bin")
                sub = await c.mkdir(d.id, b"empty")
                assert sub.kind.name == "DIR"
                await c.drain(timeout=120)
                return big

        big = asyncio.run(asyncio.wait_for(main(), 180))
    finally:
        cluster.stop()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"data/big.bin", "data/empty/", "renamed.txt"}
    head = s3.head_object(Bucket=bucket, Key="data/big.bin")
    assert head["ContentLength"] == len(big)
    assert "-" in head["ETag"]                             # a multipart upload
    md = head["Metadata"]
    assert int(md["mode"]) == stat.S_IFREG | 0o640 and (md["uid"], md["gid"]) == ("7", "8")
    assert s3.get_object(Bucket=bucket, Key="data/big.bin")["Body"].read() == big
    assert s3.get_object(Bucket=bucket, Key="renamed.txt")["Body"].read() == b"old"
