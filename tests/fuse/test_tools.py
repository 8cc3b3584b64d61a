"""Outside filesystem test tools from Debian on a real mount: stress-ng's
filesystem stressors (one at a time, with --verify), fio with verify= on
sequential and random read/write jobs, dbench and fs_mark.

One embedded mount (moto bucket) serves the module; each tool works in its
own directory, and after each the mount must still answer (a handler that
let an exception escape would have ended it: ENOTCONN) and its log must
show no handler failure.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from objcache.testing.pytest_plugin import unique_bucket_name

from .conftest import Mount

TOOLS = ("stress-ng", "fio", "dbench", "fs_mark")

# stress-ng 0.15 filesystem and io stressors that apply to a FUSE mount.
# Left out, each for its reason: bind-mount, binderfs, chattr, fanotify,
# file-ioctl, fiemap, handle, inode-flags, verity (ioctls and kernel
# features FUSE does not pass through); procfs, io, ioprio (not about the
# mount: `io` is sync(2) of every filesystem); fallocate, fpunch (no
# fallocate in pyfuse3: ENOTSUP/EOPNOTSUPP, which stress-ng reports as a skip); mknod (device
# nodes and FIFOs are not objects in a bucket; mknod answers ENOSYS);
# lease (F_SETLEASE is refused on FUSE by the kernel); dnotify/inotify
# (local notifications only; not a property of this filesystem); aio,
# io-uring, rawdev (block-device or O_DIRECT-only stressors).
STRESSORS = (
    "access", "chdir", "chmod", "chown", "copy-file", "dentry", "dir", "dirdeep",
    "dirmany", "fcntl", "filename", "flock", "fsize", "fstat", "getdent", "hdd",
    "iomix", "link", "locka", "lockf", "lockofd", "open", "readahead", "rename",
    "revio", "seek", "symlink", "sync-file", "touch", "utime", "xattr",
)
# Seconds per stressor: 2 in the default run (31 stressors; each runs
# hundreds to thousands of verified operations in that time), 10 with
# OBJCACHE_SLOW=1.
STRESS_SECONDS = "10" if os.environ.get("OBJCACHE_SLOW") == "1" else "2"


@pytest.fixture(scope="module")
def tool_mount(moto_s3, tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing test tools {missing}: run scripts/install-system-deps.sh")
    bucket = moto_s3.create_bucket(unique_bucket_name("tools"))
    base = tmp_path_factory.mktemp("tools")
    m = Mount(moto_s3, bucket, base / "mnt", base / "data", extra=("--cache-size", "2GiB"))
    yield m
    assert m.unmount(timeout=600) == 0


def _workdir(mount: Mount, name: str) -> str:
    d = os.path.join(mount.path, name)
    os.makedirs(d, exist_ok=True)
    return d


def _log_size(mount: Mount) -> int:
    return os.path.getsize(mount.log)


def _check_alive(mount: Mount, log_from: int) -> None:
    """The daemon answers, and no handler failed (an unexpected exception
    is logged as ERROR by ops._errno and answered EIO) since ``log_from``."""
    assert mount.proc.poll() is None, "the mount process died"
    os.listdir(mount.path)                           # ENOTCONN if the daemon is gone
    with open(mount.log) as f:
        f.seek(log_from)
        log = f.read()
    bad = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert not bad, "\n".join(bad[:20])


def _run(argv, cwd, timeout=300) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{argv[0]} exited {p.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.parametrize("stressor", STRESSORS)
def test_stress_ng_stressor(tool_mount, stressor):
    d = _workdir(tool_mount, f"stress-{stressor}")
    at = _log_size(tool_mount)
    # Exit status 0: every instance ran and --verify found nothing wrong
    # (2 is a failed stressor, 3 one that could not run, 4 unimplemented).
    out = _run(["stress-ng", f"--{stressor}", "2", "--timeout", STRESS_SECONDS, "--verify",
                "--temp-path", d, "--metrics-brief"], cwd=d)
    assert "successful run completed" in out, out[-3000:]
    _check_alive(tool_mount, at)


FIO_JOBS = {
    "seq-write-read": ["--rw=write", "--bs=1M", "--size=64M"],
    # Random jobs stay small: every write is a Raft entry at the chunk's
    # owner that rewrites its chunk version in the disk tier (docs/fuse.md).
    "rand-write-read": ["--rw=randwrite", "--bs=4k", "--size=2M"],
    "rand-readwrite": ["--rw=randrw", "--bs=16k", "--size=4M", "--rwmixread=50"],
}


@pytest.mark.parametrize("job", sorted(FIO_JOBS))
def test_fio_verify(tool_mount, job):
    d = _workdir(tool_mount, f"fio-{job}")
    at = _log_size(tool_mount)
    _run(["fio", f"--name={job}", f"--directory={d}", "--ioengine=psync",
          "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--numjobs=2",
          "--group_reporting", *FIO_JOBS[job]], cwd=d)
    _check_alive(tool_mount, at)


def test_dbench(tool_mount):
    d = _workdir(tool_mount, "dbench")
    at = _log_size(tool_mount)
    seconds = "60" if os.environ.get("OBJCACHE_SLOW") == "1" else "10"
    out = _run(["dbench", "-D", d, "-t", seconds, "2"], cwd=d, timeout=300)
    assert "Throughput" in out, out[-3000:]
    _check_alive(tool_mount, at)


def test_fs_mark(tool_mount):
    d = _workdir(tool_mount, "fsmark")
    at = _log_size(tool_mount)
    # fs_mark wants a directory path shorter than 40 bytes.
    short = f"/tmp/ocfsm-{os.getpid()}"
    if os.path.lexists(short):
        os.unlink(short)
    os.symlink(d, short)
    try:
        out = _run(["fs_mark", "-d", short, "-s", "65536", "-n", "50", "-t", "2", "-L", "2",
                    "-S", "1"], cwd=d, timeout=600)
    finally:
        os.unlink(short)
    assert "Files/sec" in out, out[-3000:]
    _check_alive(tool_mount, at)
