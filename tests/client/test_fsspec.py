"""The fsspec filesystem (protocol ``objcache``) against a 3-node cluster of
server processes over moto: s3fs's path convention (``BUCKET/PREFIX/KEY``),
refusals that name both locations, parents created by writes, the
environment, every mode and bulk operation, and fsspec's own abstract test
suite (copy, get, put, open, pipe)."""
import os
import posixpath
import uuid

import fsspec
import fsspec.tests.abstract as abstract
import pytest

from objcache.client.fs import ObjcacheFileSystem
from objcache.client.location import OutsideCluster
from objcache.testing.pytest_plugin import unique_bucket_name
from tests.server_cluster import SECRET, Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_s3):
    bucket = moto_s3.create_bucket(unique_bucket_name("fsspec"))
    c = Cluster(tmp_path_factory.mktemp("fsspec"), moto_s3, bucket)
    c.s3, c.bucket = moto_s3, bucket
    yield c
    c.stop()


@pytest.fixture(scope="module")
def fs(cluster):
    fs = ObjcacheFileSystem(cluster=cluster.addrs, secret=SECRET, skip_instance_cache=True)
    yield fs
    fs.close()


@pytest.fixture
def base(cluster, fs):
    """A fresh folder for one test, as a full location (BUCKET/pre/...)."""
    return f"{cluster.bucket}/pre/t-{uuid.uuid4().hex[:8]}"


def s3_body(cluster, key):
    return cluster.s3.client().get_object(Bucket=cluster.bucket, Key=key)["Body"].read()


def s3_keys(cluster, prefix=""):
    got = cluster.s3.client().list_objects_v2(Bucket=cluster.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in got.get("Contents", []))


def test_paths_are_full_locations_and_writes_create_parents(cluster, fs, base):
    rel = base.split("/", 2)[2]                          # "t-..." below the prefix
    fs.pipe_file(f"{base}/d0/f.bin", b"one")             # d0 never made: created
    fs.pipe_file(f"objcache://{base}/models/x.bin", b"two")
    assert fs.cat_file(f"{base}/d0/f.bin") == b"one"
    assert fs.cat_file(f"objcache://{base}/models/x.bin") == b"two"
    assert fs.isdir(f"{base}/d0") and fs.isfile(f"{base}/d0/f.bin")
    fs.fsync(f"{base}/d0/f.bin")
    fs.fsync(f"{base}/models/x.bin")
    assert s3_body(cluster, f"pre/{rel}/d0/f.bin") == b"one"
    assert s3_body(cluster, f"pre/{rel}/models/x.bin") == b"two"
    # Nothing lands in a folder named like the bucket.
    assert not [k for k in s3_keys(cluster) if k.startswith(f"pre/{cluster.bucket}")]
    # Names in answers are full locations.
    assert fs.ls(base, detail=False) == [f"{base}/d0", f"{base}/models"]
    assert fs.info(f"{base}/d0/f.bin")["name"] == f"{base}/d0/f.bin"


def test_folders_above_the_root_list_the_way_to_it(cluster, fs):
    assert fs.ls("", detail=False) == [cluster.bucket]
    assert fs.ls(cluster.bucket, detail=False) == [f"{cluster.bucket}/pre"]
    assert fs.info(cluster.bucket)["type"] == "directory"
    assert fs.isdir(f"objcache://{cluster.bucket}/")
    with pytest.raises(OutsideCluster, match="above this cluster's root"):
        fs.pipe_file(cluster.bucket, b"x")
    with pytest.raises(OutsideCluster, match="is outside this cluster"):
        fs.pipe_file(f"{cluster.bucket}/top.txt", b"x")


def test_paths_outside_the_cluster_are_refused_naming_both(cluster, fs):
    for path in ("other-bucket/pre/x.bin", f"{cluster.bucket}/elsewhere/x.bin",
                 f"{cluster.bucket}/prefix-not/x.bin"):
        with pytest.raises(OutsideCluster) as exc:
            fs.pipe_file(path, b"x")
        assert str(exc.value) == (f"{path!r} is outside this cluster: it serves "
                                  f"s3://{cluster.bucket}/pre/ (paths look like "
                                  f"{cluster.bucket}/pre/KEY)")
        with pytest.raises(OutsideCluster):
            fs.cat_file(path)
        with pytest.raises(OutsideCluster):
            fs.open(path, "wb")
    refused = ("other-bucket/pre/x.bin", "elsewhere/x.bin", "prefix-not/x.bin")
    assert [k for k in s3_keys(cluster) if not k.startswith("pre/") or k.endswith(refused)] == []


def test_bucket_argument_is_checked(cluster):
    ok = ObjcacheFileSystem(cluster=cluster.addrs, secret=SECRET, bucket=cluster.bucket,
                            skip_instance_cache=True)
    try:
        assert ok.ls(cluster.bucket, detail=False) == [f"{cluster.bucket}/pre"]
    finally:
        ok.close()
    bad = ObjcacheFileSystem(cluster=cluster.addrs, secret=SECRET, bucket="someone-else",
                             skip_instance_cache=True)
    try:
        with pytest.raises(OutsideCluster, match="bucket='someone-else' was given, but the "
                                                 "cluster at .* serves s3://"):
            bad.ls("someone-else")
    finally:
        bad.close()


def test_cluster_and_secret_from_the_environment(cluster, fs, base, monkeypatch):
    monkeypatch.setenv("OBJCACHE_CLUSTER", cluster.addrs)
    monkeypatch.setenv("OBJCACHE_SECRET", SECRET)
    ObjcacheFileSystem.clear_instance_cache()
    with fsspec.open(f"objcache://{base}/env/k.txt", "wb") as f:
        f.write(b"from the environment")
    with fsspec.open(f"objcache://{base}/env/k.txt", "rb") as f:
        assert f.read() == b"from the environment"
    env_fs = fsspec.filesystem("objcache")
    assert env_fs.cat_file(f"{base}/env/k.txt") == b"from the environment"
    env_fs.close()
    ObjcacheFileSystem.clear_instance_cache()
    monkeypatch.delenv("OBJCACHE_CLUSTER")
    with pytest.raises(ValueError, match="no cluster given: pass cluster="):
        fsspec.filesystem("objcache", skip_instance_cache=True)


def test_open_modes(fs, base):
    p = f"{base}/modes/a.bin"
    big = os.urandom(3 * (1 << 20) + 5)
    with fs.open(p, "wb", block_size=1 << 20) as f:
        f.write(big[:1000])
        f.write(big[1000:])
    with fs.open(p, "rb") as f:
        f.seek(2 << 20)
        assert f.read(100) == big[2 << 20:(2 << 20) + 100]
        f.seek(0)
        assert f.read() == big
    with fs.open(p, "ab") as f:
        assert f.tell() == len(big)
        f.write(b"appended")
    assert fs.cat_file(p) == big + b"appended"
    assert fs.cat_file(p, start=-8) == b"appended"
    with fs.open(p, "wb") as f:                      # wb truncates at close
        f.write(b"short")
    assert fs.cat_file(p) == b"short" and fs.size(p) == 5
    with pytest.raises(FileExistsError):
        fs.open(p, "xb")
    with fs.open(f"{base}/modes/new.bin", "xb") as f:
        f.write(b"x")
    with fs.open(f"{base}/modes/empty.bin", "ab"):
        pass
    assert fs.cat_file(f"{base}/modes/empty.bin") == b""
    with pytest.raises(IsADirectoryError):
        fs.open(f"{base}/modes", "rb")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{base}/modes/missing", "rb")


def test_bulk_operations_as_in_s3fs(cluster, fs, base):
    for name in ("a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt"):
        fs.pipe_file(f"{base}/{name}", name.encode())
    assert fs.find(base) == [f"{base}/{n}" for n in ("a/1.txt", "a/2.txt", "a/b/3.txt",
                                                     "c.txt")]
    assert fs.find(base, withdirs=True, detail=False) == [base] + [  # fsspec lists the top
        f"{base}/{n}" for n in ("a", "a/1.txt", "a/2.txt", "a/b", "a/b/3.txt", "c.txt")]
    walked = {root: (sorted(dirs), sorted(files)) for root, dirs, files in fs.walk(base)}
    assert walked[base] == (["a"], ["c.txt"])
    assert walked[f"{base}/a/b"] == ([], ["3.txt"])
    assert fs.glob(f"{base}/a/*.txt") == [f"{base}/a/1.txt", f"{base}/a/2.txt"]
    assert fs.glob(f"{base}/**/3.txt") == [f"{base}/a/b/3.txt"]
    assert fs.du(base) == sum(len(n) for n in ("a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt"))
    fs.cp_file(f"{base}/a/b/3.txt", f"{base}/copies/deep/3.txt")
    assert fs.cat_file(f"{base}/copies/deep/3.txt") == b"a/b/3.txt"
    fs.cp(f"{base}/a", f"{base}/tree", recursive=True)
    assert fs.find(f"{base}/tree") == [f"{base}/tree/1.txt", f"{base}/tree/2.txt",
                                       f"{base}/tree/b/3.txt"]
    fs.mv(f"{base}/c.txt", f"{base}/a/")             # into the folder, as mv(1)
    assert fs.cat_file(f"{base}/a/c.txt") == b"c.txt" and not fs.exists(f"{base}/c.txt")
    mtime = fs.modified(f"{base}/a/c.txt")
    assert mtime.tzinfo is not None
    with pytest.raises(IsADirectoryError):
        fs.rm(f"{base}/a")
    fs.rm(f"{base}/a", recursive=True)
    assert not fs.exists(f"{base}/a")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{base}/a/1.txt")
    fs.makedirs(f"{base}/empty/dir")
    with pytest.raises(FileExistsError):
        fs.makedirs(f"{base}/empty/dir")
    fs.makedirs(f"{base}/empty/dir", exist_ok=True)
    fs.rmdir(f"{base}/empty/dir")
    assert fs.ls(f"{base}/empty") == []


def test_large_copy_put_and_get(fs, base, tmp_path):
    data = os.urandom(5 * (1 << 20) + 99)                # more than one 1 MiB chunk
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    fs.put_file(str(local), f"{base}/big/in.bin")
    fs.cp_file(f"{base}/big/in.bin", f"{base}/big/copy.bin")
    fs.get_file(f"{base}/big/copy.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == data
    assert fs.cat_file(f"{base}/big/copy.bin", start=(1 << 20) - 3, end=(1 << 20) + 3) == \
        data[(1 << 20) - 3:(1 << 20) + 3]


def test_objects_written_by_other_tools_are_seen(tmp_path, moto_bucket):
    """An object put with boto3 at PREFIX/KEY is BUCKET/PREFIX/KEY here (a
    cluster of its own: the shared one has listed its root already, and a
    name added to a listed folder shows after the listing's TTL)."""
    s3, bucket = moto_bucket
    s3.client().put_object(Bucket=bucket, Key="pre/outside/o.txt", Body=b"written by boto3")
    c = Cluster(tmp_path, s3, bucket, n=1)
    fs = ObjcacheFileSystem(cluster=c.addrs, secret=SECRET, skip_instance_cache=True)
    try:
        assert fs.cat_file(f"{bucket}/pre/outside/o.txt") == b"written by boto3"
        assert fs.ls(f"{bucket}/pre/outside", detail=False) == [f"{bucket}/pre/outside/o.txt"]
        assert fs.info(f"{bucket}/pre/outside/o.txt")["size"] == 16
    finally:
        fs.close()
        c.stop()


class ObjcacheFixtures(abstract.AbstractFixtures):
    @pytest.fixture
    def fs(self, fs):
        return fs

    @pytest.fixture
    def fs_join(self):
        return posixpath.join

    @pytest.fixture
    def fs_path(self, base):
        return base


class TestCopy(abstract.AbstractCopyTests, ObjcacheFixtures):
    pass


class TestGet(abstract.AbstractGetTests, ObjcacheFixtures):
    pass


class TestPut(abstract.AbstractPutTests, ObjcacheFixtures):
    pass


class TestOpen(abstract.AbstractOpenTests, ObjcacheFixtures):
    pass


class TestPipe(abstract.AbstractPipeTests, ObjcacheFixtures):
    pass
