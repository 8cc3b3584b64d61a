"""The mount holds its memory and disk budget (docs/fuse.md, "Memory and
disk"): an embedded mount with --cache-size 256MiB (a 64 MiB page arena, a
192 MiB disk tier) runs fsx-style random I/O and writes a file 1.5 times
the cache's size (twice its disk tier); its anonymous memory stays under the fixed overhead, its
shared memory under the arena, its Raft log under the compaction bound,
and its data directory under the cache plus the log — during the run and
after a restart on the same data."""
import hashlib
import os

from bench.macro.memory import Sampler, fsx

from .conftest import Mount

MiB = 1 << 20
CACHE = 256 * MiB
ARENA = CACHE // 4                  # NodeConfig.memory_fraction
ANON_OVERHEAD = 192 * MiB           # docs/fuse.md: Python, libraries, buffers, log entries
LOG_BOUND = 3 * 32 * MiB + 16 * MiB  # two snapshots' worth of entries + one segment


def _check(peak, what):
    assert peak["anon"] <= ANON_OVERHEAD, (what, peak)
    assert peak["shmem"] <= ARENA + 4 * MiB, (what, peak)
    assert peak["log"] <= LOG_BOUND, (what, peak)
    assert peak["disk"] <= CACHE + LOG_BOUND + 16 * MiB, (what, peak)


def test_the_mount_holds_its_memory_and_disk_budget(tmp_path, moto_bucket):
    s3, bucket = moto_bucket
    m = Mount(s3, bucket, tmp_path / "mnt", tmp_path / "data")
    try:
        with Sampler({"mount": (m.proc.pid, m.data_dir)}) as s:
            fsx(m.path, 0.01)
            block = os.urandom(MiB)
            digest = hashlib.sha256()
            with open(os.path.join(m.path, "big.bin"), "wb") as f:
                for i in range(3 * CACHE // 2 // MiB):
                    piece = block[i % 7:] + block[:i % 7]
                    f.write(piece)
                    digest.update(piece)
                f.flush()
                os.fsync(f.fileno())
            got = hashlib.sha256()
            with open(os.path.join(m.path, "big.bin"), "rb") as f:
                while piece := f.read(4 * MiB):
                    got.update(piece)
            assert got.digest() == digest.digest()
        _check(s.peak["mount"], "run")
    finally:
        assert m.unmount() == 0
    again = Mount(s3, bucket, tmp_path / "mnt", tmp_path / "data")
    try:
        with Sampler({"mount": (again.proc.pid, again.data_dir)}) as s:
            assert os.path.getsize(os.path.join(again.path, "big.bin")) == 3 * CACHE // 2
        _check(s.peak["mount"], "restart")
    finally:
        assert again.unmount() == 0
