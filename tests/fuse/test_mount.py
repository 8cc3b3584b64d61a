"""`objcache mount` (embedded single-node server) through the kernel: the
bucket's objects appear as files; namespace and data operations behave as
POSIX says; SIGTERM unmounts after writing every dirty byte to the bucket."""
import errno
import os
import stat

import pytest


def test_posix_basics_and_unmount_writes_back(mount):
    s3 = mount.s3.client()
    s3.put_object(Bucket=mount.bucket, Key="pre/outside/hello.txt", Body=b"hello from s3",
                  Metadata={"mode": str(stat.S_IFREG | 0o640), "uid": "0", "gid": "0",
                            "mtime": "1700000000"})
    m = mount.path
    assert sorted(os.listdir(m)) == ["outside"]
    p = os.path.join(m, "outside", "hello.txt")
    st = os.stat(p)
    assert st.st_size == 13 and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime == 1700000000
    with open(p, "rb") as f:
        assert f.read() == b"hello from s3"

    os.mkdir(os.path.join(m, "d"), 0o750)
    assert stat.S_IMODE(os.stat(os.path.join(m, "d")).st_mode) == 0o750
    f = os.path.join(m, "d", "f.bin")
    data = os.urandom(3 * (1 << 20) + 5)
    with open(f, "wb") as fh:
        fh.write(data[:1000])
        fh.write(data[1000:])
        fh.flush()
        with open(f, "rb") as other:                # another open sees the flushed data
            assert other.read() == data
    assert os.path.getsize(f) == len(data)
    with open(f, "r+b") as fh:                       # random write in the middle
        fh.seek(2 << 20)
        fh.write(b"XYZ")
    data = data[:2 << 20] + b"XYZ" + data[(2 << 20) + 3:]
    with open(f, "rb") as fh:
        assert fh.read() == data
    with open(f, "ab") as fh:                        # O_APPEND
        fh.write(b"tail")
    data += b"tail"
    assert open(f, "rb").read() == data
    os.truncate(f, 10)
    assert open(f, "rb").read() == data[:10]
    os.chmod(f, 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    os.utime(f, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    assert os.stat(f).st_mtime == 1_600_000_000

    os.rename(f, os.path.join(m, "d", "g.bin"))
    assert sorted(os.listdir(os.path.join(m, "d"))) == ["g.bin"]
    os.symlink("g.bin", os.path.join(m, "d", "link"))
    assert os.readlink(os.path.join(m, "d", "link")) == "g.bin"
    assert open(os.path.join(m, "d", "link"), "rb").read() == data[:10]
    os.link(os.path.join(m, "d", "g.bin"), os.path.join(m, "d", "hard"))
    assert os.stat(os.path.join(m, "d", "g.bin")).st_nlink == 2
    os.unlink(os.path.join(m, "d", "hard"))
    os.setxattr(os.path.join(m, "d", "g.bin"), "user.tag", b"v1")
    assert os.getxattr(os.path.join(m, "d", "g.bin"), "user.tag") == b"v1"
    assert "user.tag" in os.listxattr(os.path.join(m, "d", "g.bin"))

    with pytest.raises(FileExistsError):
        os.open(os.path.join(m, "d", "g.bin"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with pytest.raises(OSError) as exc:
        os.rmdir(os.path.join(m, "d"))
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as exc:
        os.open(os.path.join(m, "x" * 256), os.O_CREAT | os.O_WRONLY)
    assert exc.value.errno == errno.ENAMETOOLONG
    os.mkdir(os.path.join(m, "empty"))
    os.rmdir(os.path.join(m, "empty"))
    sv = os.statvfs(m)
    assert sv.f_namemax == 255 and sv.f_blocks > 0

    assert mount.unmount() == 0
    assert not os.path.ismount(m)
    keys = mount.keys()
    assert keys == {"outside/hello.txt": b"hello from s3", "d/": b"",
                    "d/g.bin": data[:10], "d/link": b"g.bin"}


def test_killed_embedded_mount_recovers_dirty_data_at_next_mount(mount, tmp_path):
    from .conftest import Mount
    m = mount.path
    body = os.urandom(2 * (1 << 20) + 3)
    with open(os.path.join(m, "precious.bin"), "wb") as f:
        f.write(body)                                  # close: durable in --data-dir
    mount.proc.kill()                                  # kill -9: no write-back happened
    mount.proc.wait()
    import subprocess
    subprocess.run(["fusermount3", "-u", "-z", m])
    assert "precious.bin" not in mount.keys()
    again = Mount(mount.s3, mount.bucket, tmp_path / "mnt", tmp_path / "data")
    with open(os.path.join(again.path, "precious.bin"), "rb") as f:
        assert f.read() == body
    assert again.unmount() == 0
    assert mount.keys() == {"precious.bin": body}
