"""A real FUSE mount of a moto bucket by an `objcache mount` process."""
import os
import signal
import subprocess
import sys

import pytest


def is_mounted(path: str) -> bool:
    """``path`` is a mount point, per the kernel's table: a FUSE mount
    whose daemon was killed is still mounted, but stat fails on it
    (ENOTCONN), so os.path.ismount says False."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path:
                return True
    return False


def lazy_unmount(path: str) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path])


class Mount:
    def __init__(self, s3, bucket, mnt, data_dir, extra=()):
        self.s3, self.bucket, self.path, self.data_dir = s3, bucket, str(mnt), str(data_dir)
        mnt.mkdir(exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=s3.access_key,
                   AWS_SECRET_ACCESS_KEY=s3.secret_key, AWS_DEFAULT_REGION="us-east-1")
        # The mount's log goes to a file next to its data (read on failure).
        self.log = str(data_dir) + ".log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "objcache", "-v", "mount", f"s3://{bucket}/pre", self.path,
             "-f", "--endpoint-url", s3.endpoint_url, "--data-dir", self.data_dir,
             "--cache-size", "256MiB", *extra],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True)
        line = self.proc.stdout.readline()
        assert "mounted" in line, (line, open(self.log).read()[-3000:])

    def unmount(self, timeout=120) -> int:
        """SIGTERM: flush, drain (embedded), unmount; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the mount did not exit: " + open(self.log).read()[-3000:])
        finally:
            lazy_unmount(self.path)

    def keys(self) -> dict[str, bytes]:
        c = self.s3.client()
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                Prefix="pre/"):
            for o in page.get("Contents", []):
                out[o["Key"][4:]] = c.get_object(Bucket=self.bucket,
                                                 Key=o["Key"])["Body"].read()
        return out


@pytest.fixture
def mount(tmp_path, moto_bucket):
    if not os.path.exists("/dev/fuse"):
        pytest.fail("FUSE tests need /dev/fuse")
    s3, bucket = moto_bucket
    m = Mount(s3, bucket, tmp_path / "mnt", tmp_path / "data")
    yield m
    m.unmount()
