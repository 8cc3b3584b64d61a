"""Two `objcache mount --cluster` processes ("pods") on different nodes of a
3-node cluster: close-to-open consistency across them, and a file closed on
one mount is whole and current on the other."""
import asyncio
import errno
import os
import signal
import subprocess
import sys

import pytest

from objcache.client.cluster import ClusterClient
from objcache.meta.model import ROOT
from tests.server_cluster import SECRET, Cluster

from .conftest import lazy_unmount


class ClientMount:
    def __init__(self, cluster, address, mnt, url=None, **env_vars):
        mnt.mkdir()
        self.path = str(mnt)
        env = dict(cluster.env, OBJCACHE_SECRET=SECRET, **env_vars)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "objcache", "mount", url or f"s3://{cluster.bucket}/pre",
             self.path, "-f", "--cluster", address], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert "mounted" in line, (line, self.proc.stderr.read()
                                   if self.proc.poll() is not None else "")

    def unmount(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            lazy_unmount(self.path)


@pytest.fixture
def pods(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    cluster = Cluster(tmp_path, s3, bucket)
    cluster.s3, cluster.bucket = s3, bucket
    addrs = cluster.addrs.split(",")
    a = b = None
    try:
        a = ClientMount(cluster, addrs[0], tmp_path / "pod1")
        b = ClientMount(cluster, addrs[2], tmp_path / "pod2")
        yield cluster, a, b
    finally:
        for m in (a, b):
            if m is not None:
                m.unmount()
        cluster.stop()


def test_close_to_open_across_mounts_on_different_nodes(pods):
    cluster, a, b = pods
    os.makedirs(os.path.join(a.path, "models", "m1"))
    payload = os.urandom(5 * (1 << 20) + 77)
    p_a = os.path.join(a.path, "models", "m1", "weights.bin")
    with open(p_a, "wb") as f:
        f.write(payload)
    p_b = os.path.join(b.path, "models", "m1", "weights.bin")
    with open(p_b, "rb") as f:                         # opened after the close on pod 1
        assert f.read() == payload
    # Overwrite part of it on pod 2; pod 1 sees it after pod 2's close.
    with open(p_b, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"pod2 was here")
    payload = payload[:1 << 20] + b"pod2 was here" + payload[(1 << 20) + 13:]
    with open(p_a, "rb") as f:
        assert f.read() == payload
    os.rename(p_a, os.path.join(a.path, "models", "m1", "renamed.bin"))
    assert sorted(os.listdir(os.path.join(b.path, "models", "m1"))) == ["renamed.bin"]
    assert a.unmount() == 0 and b.unmount() == 0
    # A client mount leaves nothing behind: the cluster holds it; drain.
    env = dict(cluster.env, OBJCACHE_SECRET=SECRET)
    out = subprocess.run([sys.executable, "-m", "objcache", "drain", "--cluster",
                          cluster.addrs.split(",")[1]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body = cluster.s3.client().get_object(Bucket=cluster.bucket,
                                          Key="pre/models/m1/renamed.bin")["Body"].read()
    assert body == payload


def test_a_killed_mounts_unlinked_open_files_are_forgotten(tmp_path, moto_bucket):
    """Unlinked files held open are orphans, kept for their holder. A mount
    killed with kill -9 never forgets its own: their lease (1.5 s here)
    ends and the cluster forgets them, while a live mount's orphan, whose
    lease ended just as long ago, stays — it was renewed."""
    s3, bucket = moto_bucket
    cluster = Cluster(tmp_path, s3, bucket)
    cluster.s3, cluster.bucket = s3, bucket
    addrs = cluster.addrs.split(",")
    mounts = []
    held = []
    try:
        live = ClientMount(cluster, addrs[0], tmp_path / "live", OBJCACHE_ORPHAN_LEASE="1.5")
        mounts.append(live)
        doomed = ClientMount(cluster, addrs[1], tmp_path / "doomed",
                             OBJCACHE_ORPHAN_LEASE="1.5")
        mounts.append(doomed)
        inos = {}
        for m, name in ((live, "kept.bin"), (doomed, "lost.bin")):
            path = os.path.join(m.path, name)
            with open(path, "wb") as f:
                f.write(name.encode() * 1000)
            fd = os.open(path, os.O_RDONLY)
            held.append(fd)
            inos[name] = os.fstat(fd).st_ino
            os.unlink(path)                             # an orphan, held by m
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        fd = held.pop()                                 # the dead mount's descriptor:
        with pytest.raises(OSError) as exc:             # closed, but the flush finds
            os.close(fd)                                # no daemon
        assert exc.value.errno == errno.ENOTCONN

        async def wait_forgotten():
            async with ClusterClient(cluster.addrs, SECRET.encode()) as c:
                assert (await c.getattr(inos["lost.bin"])).nlink == 0
                loop = asyncio.get_running_loop()
                end = loop.time() + 30
                while True:
                    try:
                        await c.getattr(inos["lost.bin"])
                    except OSError as exc:
                        assert exc.errno == errno.ENOENT
                        break
                    assert loop.time() < end, "the killed mount's orphan was never forgotten"
                    await asyncio.sleep(0.2)
                return await c.getattr(inos["kept.bin"])

        kept = asyncio.run(asyncio.wait_for(wait_forgotten(), 60))
        assert kept.nlink == 0                          # still an orphan: renewed
        assert os.pread(held[0], 8, 0) == b"kept.bin"   # and readable through its holder
        os.close(held.pop())
        assert live.unmount() == 0
    finally:
        for fd in held:
            os.close(fd)
        for m in mounts:
            m.unmount()
        cluster.stop()


def _mount_refused(cluster, tmp_path, url, *extra):
    mnt = tmp_path / "refused"
    mnt.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "objcache", "mount", url, str(mnt), "-f",
                          "--cluster", cluster.addrs.split(",")[0], *extra],
                         env=dict(cluster.env, OBJCACHE_SECRET=SECRET), capture_output=True,
                         text=True, timeout=60)
    assert not os.path.ismount(mnt)
    return out.returncode, out.stderr.strip()


def test_a_cluster_mount_shows_the_folder_it_names(tmp_path, moto_bucket):
    """s3://BUCKET/PREFIX is the cluster's root; a folder below it mounts
    that folder (created if missing); anything else, and the embedded
    server's options, are refused with messages that name both."""
    s3, bucket = moto_bucket
    cluster = Cluster(tmp_path, s3, bucket, n=1)
    cluster.s3, cluster.bucket = s3, bucket
    m = None
    try:
        addr = cluster.addrs
        m = ClientMount(cluster, addr, tmp_path / "models", url=f"s3://{bucket}/pre/models/bert")
        with open(os.path.join(m.path, "config.json"), "wb") as f:
            f.write(b"{}")
        os.mkdir(os.path.join(m.path, "sub"))
        assert sorted(os.listdir(m.path)) == ["config.json", "sub"]
        assert os.stat(m.path).st_ino == 1
        assert os.path.samefile(os.path.join(m.path, "sub", ".."), m.path)
        assert m.unmount() == 0
        m = None

        async def check():
            async with cluster.client() as c:
                models = await c.lookup(ROOT, b"models")
                bert = await c.lookup(models.id, b"bert")
                f = await c.lookup(bert.id, b"config.json")
                assert bytes(await c.read(f, 0, 10)) == b"{}"
                await c.create(ROOT, b"afile")
        asyncio.run(asyncio.wait_for(check(), 60))

        root = f"s3://{bucket}/pre/"
        cases = {
            "s3://other-bucket/pre": f"'s3://other-bucket/pre' is outside this cluster: it "
                                      f"serves {root} (paths look like {bucket}/pre/KEY)",
            f"s3://{bucket}/elsewhere": f"'s3://{bucket}/elsewhere' is outside this cluster: "
                                        f"it serves {root} (paths look like {bucket}/pre/KEY)",
            f"s3://{bucket}": f"s3://{bucket} is above the root of the cluster, which serves "
                              f"{root}: mount {root} or a folder below it",
            f"s3://{bucket}/pre/afile": f"{bucket}/pre/afile is a file, not a folder: cannot "
                                        f"mount s3://{bucket}/pre/afile",
        }
        for url, message in cases.items():
            assert _mount_refused(cluster, tmp_path, url) == (2, f"objcache mount: {message}")
        for flag, value in (("--data-dir", str(tmp_path / "d")), ("--cache-size", "1G"),
                            ("--endpoint-url", "http://127.0.0.1:1")):
            assert _mount_refused(cluster, tmp_path, root, flag, value) == (
                2, f"objcache mount: {flag} is an option of the embedded server; with "
                   f"--cluster the cluster's nodes have their own (drop {flag}, or drop "
                   f"--cluster to run an embedded server)")
    finally:
        if m is not None:
            m.unmount()
        cluster.stop()
