"""The FUSE mount end to end: `objcache server` processes on Ceph RGW, a
client mount (`objcache mount --cluster`), the kernel.

    python -m bench.macro.fuse_read [--size 1GiB] [--nodes 3] [--rounds 3]
                                    [--readahead-kib 1024] [--files 2000]
                                    [--dir-entries 10000] [--json]

Reported in one run (ratios are same-run; absolute figures drift on a
shared machine):

* sequential read, warm cluster, new mount: a ``--size`` file the cluster
  already holds in memory, read with 1 MiB ``readinto`` calls on a freshly
  started mount, versus the ceiling of this FUSE stack: a minimal pyfuse3
  filesystem (bench/macro/fuse_memfs.py) serving the same number of bytes
  from memory, also freshly mounted, with the same readahead window.
  Target >= 0.8x. Rounds alternate which side goes first. The same read
  with the mount's zero-copy local reads off (OBJCACHE_LOCAL_READS=0: every
  chunk over RPC) is reported too, as the baseline of that path.
* repeat read on the same mount (the kernel page cache, kept across opens)
  versus a read of the same bytes from tmpfs. Target >= 0.8x.
* metadata on the mount, next to the same work on tmpfs: creates/s
  (open O_CREAT + close), stats/s (lstat of names not yet looked up on a
  new mount), ``os.scandir`` + stat of a ``--dir-entries`` directory,
  64 KiB files written and closed per second, and a 64 MiB file written
  with 64 KiB and with 1 MiB writes, to close.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.macro.cluster_read import BUCKET, SECRET, Servers, read_through, require_rgw
from bench.macro.fuse_memfs import pattern
from objcache.meta.model import ROOT
from objcache.testing.processes import stop_processes
from objcache.testing.s3servers import RgwServer
from objcache.units import format_size, parse_size

MiB = 1 << 20
READ_BLOCK = MiB
SMALL_FILE = 64 << 10


def read_file(path: str, buf: bytearray) -> tuple[float, int]:
    """(seconds, bytes) to read ``path`` sequentially with readinto."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        t0 = time.perf_counter()
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
        return time.perf_counter() - t0, n


class _Mount:
    """A mount process: started, waited for, stopped (unmounting)."""

    def __init__(self, argv, mountpoint: str, env=None):
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
        if "mounted" not in self.proc.stdout.readline():
            self.proc.wait()
            raise RuntimeError(f"{argv[:4]} did not mount")

    def stop(self):
        stop_processes([self.proc], timeout=60)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], check=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--chunk", default="8MiB")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--readahead-kib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--dir-entries", type=int, default=10000)
    ap.add_argument("--no-metadata", action="store_true", help="only the read benchmarks")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    if not require_rgw():
        return 2
    out: dict = {"size": size, "chunk": chunk, "nodes": args.nodes,
                 "readahead_kib": args.readahead_kib}
    data = pattern(size)
    with tempfile.TemporaryDirectory(prefix="objcache-fusebench-") as base:
        rgw = RgwServer(os.path.join(base, "rgw"), store_bytes=2 * size + (1 << 30)).start()
        servers = None
        try:
            rgw.create_bucket(BUCKET)
            s3 = rgw.client()
            s3.put_object(Bucket=BUCKET, Key="big.bin", Body=data)
            servers = Servers(os.path.join(base, "nodes"), rgw, args.nodes, chunk,
                              cache=max(2 << 30, 2 * size))
            asyncio.run(_warm(servers, chunk))
            env = dict(os.environ, OBJCACHE_SECRET=SECRET)
            cluster = ",".join(f"{h}:{p}" for h, p in servers.addresses)

            def objcache_mount(name: str, local_reads: bool = True) -> _Mount:
                mnt = os.path.join(base, name)
                os.makedirs(mnt, exist_ok=True)
                return _Mount([sys.executable, "-m", "objcache", "mount", f"s3://{BUCKET}",
                               mnt, "-f", "--cluster", cluster,
                               "--readahead-kib", str(args.readahead_kib)], mnt,
                              dict(env, OBJCACHE_LOCAL_READS="1" if local_reads else "0"))

            def memfs_mount() -> _Mount:
                mnt = os.path.join(base, "memfs")
                os.makedirs(mnt, exist_ok=True)
                return _Mount([sys.executable, "-m", "bench.macro.fuse_memfs", mnt, str(size),
                               "--readahead-kib", str(args.readahead_kib)], mnt)

            out.update(_reads(objcache_mount, memfs_mount, data, args.rounds))
            if not args.no_metadata:
                out.update(_metadata(objcache_mount, base, args.files, args.dir_entries))
        finally:
            if servers is not None:
                servers.stop()
            rgw.stop()
    _report(out)
    if args.json:
        print(json.dumps(out))
    return 0


async def _warm(servers, chunk: int) -> None:
    async with servers.client() as c:
        node = await c.lookup(ROOT, b"big.bin")
        await read_through(c, node, chunk, 8)


def _reads(objcache_mount, memfs_mount, data: bytes, rounds: int) -> dict:
    size = len(data)
    buf = bytearray(READ_BLOCK)
    new, ceiling, repeat, tmpfs, rpc = [], [], [], [], []
    shm = tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="objcache-bench-")
    with shm:
        shm.write(data)
        shm.flush()
        for r in range(rounds):
            def ours():
                m = objcache_mount("pod")
                try:
                    path = os.path.join(m.mountpoint, "big.bin")
                    dt, n = read_file(path, buf)
                    assert n == size
                    new.append(size / dt / 1e9)
                    dt, n = read_file(path, buf)
                    assert n == size
                    repeat.append(size / dt / 1e9)
                    if r == 0:
                        with open(path, "rb") as f:
                            assert f.read() == data, "the mount returned wrong bytes"
                finally:
                    m.stop()

            def one_read(m: _Mount, name: str, into: list) -> None:
                """A fresh mount read once; GB/s appended to ``into``."""
                try:
                    dt, n = read_file(os.path.join(m.mountpoint, name), buf)
                    assert n == size
                    into.append(size / dt / 1e9)
                finally:
                    m.stop()

            def over_rpc():
                one_read(objcache_mount("pod-rpc", local_reads=False), "big.bin", rpc)

            def theirs():
                one_read(memfs_mount(), "data", ceiling)
            for side in ((ours, theirs, over_rpc) if r % 2 == 0 else (over_rpc, theirs, ours)):
                side()
            dt, n = read_file(shm.name, buf)
            tmpfs.append(size / dt / 1e9)
    return {"new_mount_GBps": new, "ceiling_GBps": ceiling, "repeat_GBps": repeat,
            "tmpfs_GBps": tmpfs, "new_mount_rpc_GBps": rpc,
            "local_vs_rpc": statistics.median(a / b for a, b in zip(new, rpc)),
            "new_mount_ratio": statistics.median(a / b for a, b in zip(new, ceiling)),
            "repeat_ratio": statistics.median(a / b for a, b in zip(repeat, tmpfs))}


def _metadata(objcache_mount, base: str, files: int, entries: int) -> dict:
    out = {}
    payload = np.random.default_rng(3).bytes(SMALL_FILE)
    local = tempfile.mkdtemp(dir="/dev/shm", prefix="objcache-bench-")
    try:
        m = objcache_mount("meta")
        try:
            ours = _meta_run(m.mountpoint, files, entries, payload)
        finally:
            m.stop()
        m = objcache_mount("meta")                  # a new mount: nothing cached
        try:
            t0 = time.perf_counter()
            for i in range(files):
                os.lstat(os.path.join(m.mountpoint, "creates", f"f{i}"))
            ours["stats_per_s"] = files / (time.perf_counter() - t0)
        finally:
            m.stop()
        theirs = _meta_run(local, files, entries, payload)
        t0 = time.perf_counter()
        for i in range(files):
            os.lstat(os.path.join(local, "creates", f"f{i}"))
        theirs["stats_per_s"] = files / (time.perf_counter() - t0)
    finally:
        subprocess.run(["rm", "-rf", local], check=False)
    for k, v in ours.items():
        out[f"mount_{k}"] = v
        out[f"tmpfs_{k}"] = theirs[k]
    return out


def _meta_run(root: str, files: int, entries: int, payload: bytes) -> dict:
    r = {}
    d = os.path.join(root, "creates")
    os.mkdir(d)
    t0 = time.perf_counter()
    for i in range(files):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    r["creates_per_s"] = files / (time.perf_counter() - t0)

    d = os.path.join(root, "small")
    os.mkdir(d)
    t0 = time.perf_counter()
    for i in range(files):
        with open(os.path.join(d, f"s{i}"), "wb") as f:
            f.write(payload)
    dt = time.perf_counter() - t0
    r["small_files_per_s"] = files / dt
    r["small_MBps"] = files * len(payload) / dt / 1e6

    # Sequential writes of one file, 64 KiB and 1 MiB write(2) calls, to
    # close (close = durable in the cluster): the mount's write-behind.
    for block, name in ((64 << 10, "seq_write_64k_MBps"), (1 << 20, "seq_write_1m_MBps")):
        chunk = (payload * (block // len(payload) + 1))[:block]
        total = 64 << 20
        t0 = time.perf_counter()
        with open(os.path.join(root, name), "wb", buffering=0) as f:
            for _ in range(total // block):
                f.write(chunk)
        r[name] = total / (time.perf_counter() - t0) / 1e6

    d = os.path.join(root, "wide")
    os.mkdir(d)
    for i in range(entries):
        os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    t0 = time.perf_counter()
    n = sum(1 for e in os.scandir(d) if e.stat(follow_symlinks=False))
    r["readdir_s"] = time.perf_counter() - t0
    assert n == entries, (n, entries)
    return r


def _report(out: dict) -> None:
    def med(k):
        return statistics.median(out[k])
    print(f"{format_size(out['size'])} file, {format_size(out['chunk'])} chunks, "
          f"{out['nodes']} nodes on RGW, readahead {out['readahead_kib']} KiB")
    print(f"  new mount, warm cluster  {med('new_mount_GBps'):.2f} GB/s   minimal pyfuse3 "
          f"memory fs {med('ceiling_GBps'):.2f} GB/s   ratio {out['new_mount_ratio']:.2f}x")
    print(f"  repeat read, same mount  {med('repeat_GBps'):.2f} GB/s   tmpfs "
          f"{med('tmpfs_GBps'):.2f} GB/s   ratio {out['repeat_ratio']:.2f}x")
    print(f"  same, chunks over RPC    {med('new_mount_rpc_GBps'):.2f} GB/s   local reads "
          f"vs RPC {out['local_vs_rpc']:.2f}x")
    if "mount_creates_per_s" not in out:
        return
    for k, unit in (("creates_per_s", "/s"), ("stats_per_s", "/s"),
                    ("small_files_per_s", "/s"), ("small_MBps", " MB/s"),
                    ("seq_write_64k_MBps", " MB/s"), ("seq_write_1m_MBps", " MB/s"),
                    ("readdir_s", " s")):
        print(f"  {k:<24} mount {out['mount_' + k]:10.1f}{unit:<6} tmpfs "
              f"{out['tmpfs_' + k]:10.1f}{unit}")


if __name__ == "__main__":
    sys.exit(main())
