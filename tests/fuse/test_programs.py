"""Kernel-level semantics and real programs on an `objcache mount`:
renameat2 flags, mmap reads and MAP_SHARED writes, O_DIRECT, flock and
record locks, git, tar + diff -r, cp -a, shutil.copytree, sqlite3, a venv.
After each, the bucket (once unmounted) holds the files."""
import ctypes
import fcntl
import filecmp
import mmap
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src, dst, flags):
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_renameat2_flags(mount):
    m = mount.path
    for n in ("a", "b"):
        with open(os.path.join(m, n), "w") as f:
            f.write(n)
    with pytest.raises(FileExistsError):
        renameat2(os.path.join(m, "a"), os.path.join(m, "b"), RENAME_NOREPLACE)
    with pytest.raises(OSError) as exc:
        renameat2(os.path.join(m, "a"), os.path.join(m, "b"), RENAME_EXCHANGE)
    assert exc.value.errno == 22                        # EINVAL: not supported, cleanly
    renameat2(os.path.join(m, "a"), os.path.join(m, "c"), RENAME_NOREPLACE)
    assert sorted(os.listdir(m)) == ["b", "c"]


MMAP_CHILD = """
import mmap, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 0)
    sys.stdout.buffer.write(mm[:4096] + mm[-10:])
    mm[100:105] = b"HELLO"
    mm.flush()                                          # msync
    mm.close()
import numpy as np
arr = np.load(sys.argv[2], mmap_mode="r")
assert int(arr.sum()) == sum(range(1000))
"""


def test_mmap_read_and_shared_write(mount):
    # In a child process: mmap.flush() holds the GIL through msync(), and the
    # moto S3 server runs in this process's threads (a test artifact: a
    # chunk write may need the bucket's base while msync waits on it).
    import numpy as np
    p = os.path.join(mount.path, "mm.bin")
    data = bytearray(os.urandom(3 * (1 << 20)))
    with open(p, "wb") as f:
        f.write(data)
    npy = os.path.join(mount.path, "arr.npy")
    np.save(npy, np.arange(1000))
    out = subprocess.run([sys.executable, "-c", MMAP_CHILD, p, npy], capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == bytes(data[:4096]) + bytes(data[-10:])
    data[100:105] = b"HELLO"
    with open(p, "rb") as f:
        assert f.read() == data


def test_o_direct_and_locks(mount):
    p = os.path.join(mount.path, "direct.bin")
    data = os.urandom(1 << 20)
    with open(p, "wb") as f:
        f.write(data)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 1 << 20)                    # page-aligned
        assert os.readv(fd, [buf]) == 1 << 20
        assert bytes(buf) == data
    finally:
        os.close(fd)
    with open(p, "r+b") as f1, open(p, "r+b") as f2:
        fcntl.flock(f1, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(f2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f1, fcntl.LOCK_UN)
        fcntl.lockf(f2, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
        code = ("import fcntl,sys; f=open(sys.argv[1],'r+b')\n"
                "try: fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 100, 0)\n"
                "except OSError: sys.exit(3)\n")
        assert subprocess.run([sys.executable, "-c", code, p]).returncode == 3


def test_real_programs(mount, tmp_path):
    m = mount.path
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e")
    repo = os.path.join(m, "repo")
    run = lambda *a, **k: subprocess.run(a, check=True, capture_output=True, env=env, **k)  # noqa: E731
    run("git", "init", "-q", repo)
    with open(os.path.join(repo, "README"), "w") as f:
        f.write("one\n")
    run("git", "-C", repo, "add", "README")
    run("git", "-C", repo, "commit", "-q", "-m", "first")
    run("git", "-C", repo, "checkout", "-q", "-b", "side")
    with open(os.path.join(repo, "README"), "a") as f:
        f.write("two\n")
    run("git", "-C", repo, "commit", "-q", "-am", "second")
    run("git", "-C", repo, "checkout", "-q", "-")
    assert open(os.path.join(repo, "README")).read() == "one\n"
    assert run("git", "-C", repo, "fsck", "--no-progress").returncode == 0

    # tar x of a source tree, diff -r against the original.
    src = os.path.join(os.path.dirname(__file__), "..", "..", "objcache")
    tarball = tmp_path / "src.tar"
    run("tar", "cf", str(tarball), "-C", os.path.dirname(os.path.abspath(src)), "objcache")
    os.mkdir(os.path.join(m, "x"))
    run("tar", "xf", str(tarball), "-C", os.path.join(m, "x"))
    ref = tmp_path / "ref"
    ref.mkdir()
    run("tar", "xf", str(tarball), "-C", str(ref))
    run("diff", "-r", str(ref / "objcache"), os.path.join(m, "x", "objcache"))

    run("cp", "-a", str(ref / "objcache"), os.path.join(m, "cpa"))
    run("diff", "-r", str(ref / "objcache"), os.path.join(m, "cpa"))
    shutil.copytree(str(ref / "objcache" / "raft"), os.path.join(m, "tree"))
    assert not filecmp.dircmp(str(ref / "objcache" / "raft"), os.path.join(m, "tree")).diff_files

    run("rsync", "-a", str(ref / "objcache") + "/", os.path.join(m, "rsynced"))
    run("diff", "-r", str(ref / "objcache"), os.path.join(m, "rsynced"))
    # A second rsync finds nothing to copy (sizes and mtimes kept).
    assert run("rsync", "-ai", str(ref / "objcache") + "/",
               os.path.join(m, "rsynced")).stdout.strip() == b""

    # A virtual environment on the mount, and an import from it.
    venv = os.path.join(m, "venv")
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    site = run(os.path.join(venv, "bin", "python"), "-c",
               "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.decode().strip()
    with open(os.path.join(site, "onmount.py"), "w") as f:
        f.write("VALUE = 42\n")
    assert run(os.path.join(venv, "bin", "python"), "-c",
               "import onmount; print(onmount.VALUE)").stdout.strip() == b"42"

    db = sqlite3.connect(os.path.join(m, "db.sqlite"))
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, f"v{i}") for i in range(500)])
    db.commit()
    assert db.execute("select count(*), max(k) from t").fetchone() == (500, 499)
    db.close()

    assert mount.unmount() == 0
    keys = mount.keys()
    assert keys["x/objcache/raft/core.py"] == (ref / "objcache" / "raft" / "core.py").read_bytes()
    assert keys["repo/README"] == b"one\n"
    assert keys["rsynced/raft/core.py"] == (ref / "objcache" / "raft" / "core.py").read_bytes()
    assert keys["venv/pyvenv.cfg"].startswith(b"home")
    con = sqlite3.connect(":memory:")
    path = tmp_path / "back.sqlite"
    path.write_bytes(keys["db.sqlite"])
    assert sqlite3.connect(str(path)).execute("select count(*) from t").fetchone() == (500,)
    con.close()
