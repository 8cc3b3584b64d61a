"""POSIX edges pjdfstest and fsx found on the mount."""
import errno
import os

import pytest


def test_truncate_down_then_extend_reads_zeros(mount):
    # fsx: bytes cut off by a truncate came back when the file grew again.
    p = os.path.join(mount.path, "f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"\xaa" * 0x20000, 0)
        os.ftruncate(fd, 0x1000)
        os.pwrite(fd, b"\xbb" * 16, 0x30000)
        assert os.pread(fd, 0x1000, 0x10000) == bytes(0x1000)
        os.ftruncate(fd, 0x800)
        os.ftruncate(fd, 0x40000)
        assert os.pread(fd, 0x1000, 0x30000) == bytes(0x1000)
        assert os.pread(fd, 0x800, 0) == b"\xaa" * 0x800
    finally:
        os.close(fd)
    with open(p, "rb") as f:                           # after close, from the cluster
        data = f.read()
    assert data == b"\xaa" * 0x800 + bytes(0x40000 - 0x800)


def test_open_o_trunc_truncates(mount):
    p = os.path.join(mount.path, "t")
    with open(p, "w") as f:
        f.write("test\n")
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(p).st_size == 0
    with open(p, "rb") as f:
        assert f.read() == b""


def test_long_names_answer_enametoolong(mount):
    name = "x" * 256
    for call in (os.stat, os.unlink, os.rmdir, lambda p: os.chmod(p, 0o600)):
        with pytest.raises(OSError) as exc:
            call(os.path.join(mount.path, name))
        assert exc.value.errno == errno.ENAMETOOLONG


def test_link_updates_the_directory_times(mount):
    d = os.path.join(mount.path, "d")
    os.mkdir(d)
    src = os.path.join(mount.path, "src")
    open(src, "w").close()
    before = os.stat(d)
    os.link(src, os.path.join(d, "l"))
    after = os.stat(d)
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns


def test_paths_past_the_s3_key_limit_answer_enametoolong(mount):
    # A bucket key is at most 1024 bytes: deeper paths could never be
    # written back (write-back retried forever and unmount hung).
    d = mount.path
    depth = 0
    with pytest.raises(OSError) as exc:
        for depth in range(10):
            d = os.path.join(d, "n" * 200)
            os.mkdir(d)
    assert exc.value.errno == errno.ENAMETOOLONG and depth >= 4
    with pytest.raises(OSError) as exc:
        open(os.path.join(os.path.dirname(d), "f" * 250), "w").close()
    assert exc.value.errno == errno.ENAMETOOLONG
    assert mount.unmount() == 0                        # nothing owed that can't be written


def test_directory_link_counts_follow_subdirectories(mount):
    # pjdfstest rename/24: a directory's nlink is 2 + its subdirectories.
    a = os.path.join(mount.path, "a")
    b = os.path.join(mount.path, "b")
    os.mkdir(a)
    os.mkdir(b)
    assert os.stat(a).st_nlink == 2
    os.mkdir(os.path.join(a, "sub"))
    assert os.stat(a).st_nlink == 3
    open(os.path.join(a, "file"), "w").close()          # files don't count
    assert os.stat(a).st_nlink == 3
    os.rmdir(os.path.join(a, "sub"))
    assert os.stat(a).st_nlink == 2
    os.mkdir(os.path.join(a, "sub"))
    os.rename(os.path.join(a, "sub"), os.path.join(b, "sub"))
    assert (os.stat(a).st_nlink, os.stat(b).st_nlink) == (2, 3)
    assert os.stat(mount.path).st_nlink == 4             # a and b


def test_a_chunk_cut_away_by_truncate_and_written_again_reads_zeros(mount):
    """fsx on a 24 MiB file: 4 KiB at 9 MiB (chunk 1), truncate to 1 MiB,
    one byte at 10 MiB — the bytes at 9 MiB must read as zeros, on this
    mount and in the bucket."""
    p = os.path.join(mount.path, "s")
    with open(p, "wb") as f:
        f.seek(9 << 20)
        f.write(os.urandom(4096))
    os.truncate(p, 1 << 20)
    with open(p, "r+b") as f:
        f.seek(10 << 20)
        f.write(b"Z")
    with open(p, "rb") as f:
        f.seek(9 << 20)
        assert f.read(4096) == bytes(4096)
        f.seek(0)
        data = f.read()
    assert len(data) == (10 << 20) + 1 and data[-1:] == b"Z" and not data[(1 << 20):-1].strip(b"\0")
    assert mount.unmount() == 0
    assert mount.keys()["s"] == data


def test_hard_links_keep_the_file_in_the_bucket_under_a_live_name(mount):
    """fsstress found `ln a b; rm a` left the object at a and none at b,
    and a name re-linked to another file kept its old object."""
    d = mount.path
    with open(os.path.join(d, "a"), "w") as f:
        f.write("hello")
    os.link(os.path.join(d, "a"), os.path.join(d, "b"))
    os.unlink(os.path.join(d, "a"))
    with open(os.path.join(d, "n"), "w") as f:
        f.write("OLD")
    with open(os.path.join(d, "m"), "w") as f:
        f.write("NEW")
    os.unlink(os.path.join(d, "n"))
    os.link(os.path.join(d, "m"), os.path.join(d, "n"))
    assert open(os.path.join(d, "n")).read() == "NEW" and os.stat(os.path.join(d, "m")).st_nlink == 2
    assert mount.unmount() == 0
    # One object per file, at a name it still has; never at a removed one.
    assert mount.keys() == {"b": b"hello", "m": b"NEW"}
