"""Two `objcache mount --cluster` processes ("pods") on different nodes of a
3-node cluster: close-to-open consistency across them, and a file closed on
one mount is whole and current on the other."""
import os
import signal
import subprocess
import sys

import pytest

from tests.cluster.test_server_processes import SECRET, Cluster


class ClientMount:
    def __init__(self, cluster, address, mnt):
        mnt.mkdir()
        self.path = str(mnt)
        env = dict(cluster.env, OBJCACHE_SECRET=SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "objcache", "mount", f"s3://{cluster.bucket}/pre", self.path,
             "-f", "--cluster", address], env=env, stdout=subprocess.PIPE,
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
            if os.path.ismount(self.path):
                subprocess.run(["fusermount3", "-u", "-z", self.path])


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
