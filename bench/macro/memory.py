"""Memory and disk that objcache processes hold under filesystem workloads.

    python -m bench.macro.memory [--mode embedded|cluster|both]
                                 [--workloads fsx,stress,random4k,seq,readers]
                                 [--cache-size 1GiB] [--scale 1.0] [--json]

Each workload runs on a fresh FUSE mount of a fresh bucket in Ceph RGW on
loopback (bluestore on a sparse file, so 10 GiB fit):

* ``embedded``: one ``objcache mount`` process with its own server
  (``--cache-size``);
* ``cluster``: three ``objcache server`` processes (R=1, ``--cache-size``
  each) and one ``objcache mount --cluster`` process.

Workloads (``--scale`` multiplies their sizes; 1.0 is the issue's figure):

* fsx: random writes of 1 B .. 1 MiB, reads, truncates, mmap writes and
  reads on one 24 MiB file, checked against a model (100,000 operations);
* stress: an fsstress-like mix in a tree (create, write, append, read,
  rename, unlink, mkdir, rmdir, truncate, fsync; 20,000 operations);
* random4k: 4 KiB writes at random offsets over 1 GiB of files (8 x
  128 MiB, written first; 50,000 writes);
* seq: one 10 GiB file written with 1 MiB writes, then closed;
* readers: 64 concurrent sequential readers of 1 GiB of files (4 x 256 MiB,
  written and synced first; every reader reads a whole file).

Sampled every 50 ms for each process: resident anonymous memory
(RssAnon), its share of resident shared memory (Pss_Shmem: the page arena,
counted once although an embedded mount maps it twice), and the kernel's
peak of the whole RSS (VmHWM, which counts such pages twice); every 0.5 s the bytes on disk under each data
directory's Raft logs (``*/raft``) and chunk cache. After the workload the
processes are stopped (SIGTERM: the mount drains) and started again on the
same data directories: the restart's figures are reported too (a log that
replays into memory shows there). Timings are wall-clock for the workload.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from objcache.testing.processes import stop_processes
from objcache.testing.s3servers import RgwServer, free_port
from objcache.units import format_size, parse_size

from .cluster_read import require_rgw

MiB = 1 << 20
GiB = 1 << 30
SECRET = "memory-benchmark-secret"


# -- measuring -----------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
        # Shared memory as a proportional share: an arena page mapped twice
        # (an embedded mount maps its node's arena for zero-copy reads too)
        # counts once, not twice as RssShmem has it.
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "Pss_Shmem":
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _raft_dirs(data_dir: str) -> list[str]:
    out = []
    for root, dirs, _files in os.walk(data_dir):
        for d in dirs:
            if d == "raft" or d.startswith("raft"):
                out.append(os.path.join(root, d))
    return out


class Sampler:
    """Peaks of each process's memory and of its data directory's log
    and cache bytes, sampled on a thread."""

    def __init__(self, procs: dict[str, tuple[int, str | None]]):
        self.procs = procs                          # name -> (pid, data dir)
        self.peak = {n: {"anon": 0, "shmem": 0, "rss": 0, "hwm": 0, "log": 0, "disk": 0}
                     for n in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample(disk=True)

    def _sample(self, disk: bool) -> None:
        for name, (pid, data_dir) in self.procs.items():
            st = _status(pid)
            p = self.peak[name]
            p["anon"] = max(p["anon"], st.get("RssAnon", 0))
            p["shmem"] = max(p["shmem"], st.get("Pss_Shmem", st.get("RssShmem", 0)))
            p["rss"] = max(p["rss"], st.get("VmRSS", 0))
            p["hwm"] = max(p["hwm"], st.get("VmHWM", 0))
            if disk and data_dir:
                p["log"] = max(p["log"], sum(_tree_bytes(d) for d in _raft_dirs(data_dir)))
                p["disk"] = max(p["disk"], _tree_bytes(data_dir))

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            self._sample(disk=(n % 10 == 0))


# -- the system under test --------------------------------------------------------


class System:
    """RGW + (an embedded mount | three servers and a client mount)."""

    def __init__(self, base: str, rgw: RgwServer, bucket: str, mode: str, cache: int):
        self.base, self.rgw, self.bucket, self.mode, self.cache = base, rgw, bucket, mode, cache
        self.mnt = os.path.join(base, "mnt")
        os.makedirs(self.mnt, exist_ok=True)
        self.env = dict(os.environ, OBJCACHE_SECRET=SECRET, AWS_ACCESS_KEY_ID=rgw.access_key,
                        AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_DEFAULT_REGION=rgw.region)
        self.ports = [free_port() for _ in range(3)] if mode == "cluster" else []
        self.servers: list[subprocess.Popen] = []
        self.mount: subprocess.Popen | None = None

    def _spawn(self, argv, log_name: str, ready: str) -> subprocess.Popen:
        log = open(os.path.join(self.base, log_name), "ab")
        p = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=log, text=True)
        line = p.stdout.readline()
        if ready not in line:
            p.kill()
            p.wait()
            with open(log.name, errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{log_name}: did not start: {line!r}\n{tail}")
        return p

    def start(self) -> None:
        url = f"s3://{self.bucket}/w"
        if self.mode == "cluster":
            for i, port in enumerate(self.ports):
                argv = [sys.executable, "-m", "objcache", "server",
                        "--data-dir", os.path.join(self.base, f"node{i}"),
                        "--listen", f"127.0.0.1:{port}", "--bucket", url,
                        "--endpoint-url", self.rgw.endpoint_url,
                        "--cache-size", str(self.cache), "--writeback-delay", "1"]
                if i:
                    argv += ["--join", f"127.0.0.1:{self.ports[0]}"]
                self.servers.append(self._spawn(argv, f"node{i}.log", "serving"))
            argv = [sys.executable, "-m", "objcache", "mount", url, self.mnt, "-f",
                    "--cluster", ",".join(f"127.0.0.1:{p}" for p in self.ports)]
        else:
            argv = [sys.executable, "-m", "objcache", "mount", url, self.mnt, "-f",
                    "--endpoint-url", self.rgw.endpoint_url,
                    "--data-dir", os.path.join(self.base, "embedded"),
                    "--cache-size", str(self.cache)]
        self.mount = self._spawn(argv, "mount.log", "mounted")

    def processes(self) -> dict[str, tuple[int, str | None]]:
        out = {f"server{i}": (p.pid, os.path.join(self.base, f"node{i}"))
               for i, p in enumerate(self.servers)}
        out["mount"] = (self.mount.pid, os.path.join(self.base, "embedded")
                        if self.mode == "embedded" else None)
        return out

    def stop(self) -> None:
        if self.mount is not None and self.mount.poll() is None:
            self.mount.send_signal(signal.SIGTERM)
            try:
                self.mount.wait(3600)
            except subprocess.TimeoutExpired:
                self.mount.kill()
        subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
        stop_processes(self.servers, timeout=120)
        self.servers, self.mount = [], None


# -- workloads ---------------------------------------------------------------------


def fsx(mnt: str, scale: float, seed: int = 1) -> dict:
    ops = max(200, int(100_000 * scale))
    size_max = 24 * MiB
    rng = random.Random(seed)
    path = os.path.join(mnt, "fsx.bin")
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    counts: dict[str, int] = {}
    try:
        for i in range(ops):
            op = rng.choice(("write", "write", "read", "truncate", "mapwrite", "mapread"))
            counts[op] = counts.get(op, 0) + 1
            if op == "write" or (op.startswith("map") and len(model) == 0):
                off = rng.randrange(size_max)
                n = min(rng.randint(1, MiB), size_max - off)
                data = rng.randbytes(n)
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + n] = data
            elif op == "read":
                off = rng.randrange(max(1, len(model)))
                n = rng.randint(1, MiB)
                got = os.pread(fd, n, off)
                assert got == bytes(model[off:off + n]), f"fsx: read mismatch at op {i}"
            elif op == "truncate":
                n = rng.randrange(size_max)
                os.ftruncate(fd, n)
                if n < len(model):
                    del model[n:]
                else:
                    model.extend(bytes(n - len(model)))
            else:
                with mmap.mmap(fd, len(model)) as m:
                    off = rng.randrange(len(model))
                    n = min(rng.randint(1, 64 << 10), len(model) - off)
                    if op == "mapwrite":
                        data = rng.randbytes(n)
                        m[off:off + n] = data
                        model[off:off + n] = data
                    else:
                        assert m[off:off + n] == bytes(model[off:off + n]), \
                            f"fsx: mapped read mismatch at op {i}"
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == bytes(model), "fsx: the file differs from the model at the end"
    return {"ops": ops, **counts}


def stress(mnt: str, scale: float, seed: int = 2) -> dict:
    ops = max(200, int(20_000 * scale))
    rng = random.Random(seed)
    root = os.path.join(mnt, "stress")
    os.makedirs(root, exist_ok=True)
    dirs = [root]
    files: dict[str, int] = {}
    n = 0
    for i in range(ops):
        op = rng.choice(("create", "create", "write", "append", "read", "rename", "unlink",
                         "mkdir", "rmdir", "truncate", "fsync"))
        try:
            if op == "create" or not files:
                p = os.path.join(rng.choice(dirs), f"f{n}")
                n += 1
                with open(p, "wb") as f:
                    f.write(rng.randbytes(rng.randint(0, 256 << 10)))
                files[p] = 1
            elif op == "mkdir":
                p = os.path.join(rng.choice(dirs), f"d{n}")
                n += 1
                os.mkdir(p)
                dirs.append(p)
            elif op == "rmdir" and len(dirs) > 1:
                d = rng.choice(dirs[1:])
                try:
                    os.rmdir(d)
                    dirs.remove(d)
                except OSError:
                    pass
            else:
                p = rng.choice(list(files))
                if op == "write":
                    with open(p, "r+b") as f:
                        f.seek(rng.randrange(1 << 20))
                        f.write(rng.randbytes(rng.randint(1, 128 << 10)))
                elif op == "append":
                    with open(p, "ab") as f:
                        f.write(rng.randbytes(rng.randint(1, 64 << 10)))
                elif op == "read":
                    with open(p, "rb") as f:
                        f.read()
                elif op == "rename":
                    q = os.path.join(rng.choice(dirs), f"r{n}")
                    n += 1
                    os.rename(p, q)
                    del files[p]
                    files[q] = 1
                elif op == "unlink":
                    os.unlink(p)
                    del files[p]
                elif op == "truncate":
                    os.truncate(p, rng.randrange(1 << 20))
                elif op == "fsync":
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except FileNotFoundError:
            # A file inside a directory another step removed meanwhile is
            # not possible (rmdir needs it empty); a vanished name is a bug.
            raise
    return {"ops": ops, "files": len(files), "dirs": len(dirs)}


def random4k(mnt: str, scale: float, seed: int = 3) -> dict:
    nfiles, fsize = 8, max(8 * MiB, int(128 * MiB * scale))
    writes = max(500, int(50_000 * scale))
    rng = random.Random(seed)
    block = rng.randbytes(MiB)
    paths = [os.path.join(mnt, f"r4k-{i}.bin") for i in range(nfiles)]
    for p in paths:
        with open(p, "wb") as f:
            for _ in range(fsize // MiB):
                f.write(block)
    fds = [os.open(p, os.O_RDWR) for p in paths]
    t0 = time.perf_counter()
    try:
        for _ in range(writes):
            os.pwrite(rng.choice(fds), rng.randbytes(4096), rng.randrange(fsize // 4096) * 4096)
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    dt = time.perf_counter() - t0
    return {"files": nfiles, "file_bytes": fsize, "writes": writes,
            "writes_per_s": round(writes / dt, 1)}


def seq(mnt: str, scale: float) -> dict:
    total = max(64 * MiB, int(10 * GiB * scale)) // MiB * MiB
    block = os.urandom(MiB)
    t0 = time.perf_counter()
    with open(os.path.join(mnt, "seq.bin"), "wb") as f:
        for _ in range(total // MiB):
            f.write(block)
    dt = time.perf_counter() - t0
    return {"bytes": total, "MB_per_s_to_close": round(total / dt / 1e6, 1)}


def readers(mnt: str, scale: float) -> dict:
    nfiles, fsize = 4, max(16 * MiB, int(256 * MiB * scale)) // MiB * MiB
    block = os.urandom(MiB)
    paths = [os.path.join(mnt, f"rd-{i}.bin") for i in range(nfiles)]
    for p in paths:
        with open(p, "wb") as f:
            for _ in range(fsize // MiB):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())

    def read_all(i):
        n = 0
        with open(paths[i % nfiles], "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                n += len(chunk)
        return n
    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as ex:
        total = sum(ex.map(read_all, range(64)))
    dt = time.perf_counter() - t0
    return {"readers": 64, "bytes_read": total, "GB_per_s": round(total / dt / 1e9, 2)}


WORKLOADS = {"fsx": fsx, "stress": stress, "random4k": random4k, "seq": seq,
             "readers": readers}


# -- driver -------------------------------------------------------------------------


def run_one(rgw: RgwServer, base: str, mode: str, name: str, cache: int, scale: float) -> dict:
    bucket = rgw.create_bucket(f"mem-{mode}-{name}".lower())
    sysm = System(base, rgw, bucket, mode, cache)
    out: dict = {"mode": mode, "workload": name, "cache_size": cache}
    try:
        sysm.start()
        with Sampler(sysm.processes()) as s:
            t0 = time.perf_counter()
            out["result"] = WORKLOADS[name](sysm.mnt, scale)
            out["seconds"] = round(time.perf_counter() - t0, 2)
            # The mount's stop drains (embedded) or publishes: part of the run.
            sysm.stop()
        out["run"] = s.peak
        sysm.start()                                   # restart on the same data
        with Sampler(sysm.processes()) as s:
            os.listdir(sysm.mnt)
        out["restart"] = s.peak
    finally:
        sysm.stop()
    return out


def _row(r: dict, phase: str) -> list[str]:
    rows = []
    for proc, p in r[phase].items():
        rows.append(f"| {r['mode']} | {r['workload']} | {phase} | {proc} | "
                    f"{format_size(p['anon'])} | {format_size(p['shmem'])} | "
                    f"{format_size(p['hwm'])} | {format_size(p['log'])} | "
                    f"{format_size(p['disk'])} | {r.get('seconds', '')} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("embedded", "cluster", "both"), default="both")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--cache-size", default="1GiB")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not require_rgw():
        return 2
    cache = parse_size(args.cache_size)
    names = [w for w in args.workloads.split(",") if w]
    for w in names:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    modes = ("embedded", "cluster") if args.mode == "both" else (args.mode,)
    results = []
    with tempfile.TemporaryDirectory(prefix="objcache-mem-") as base:
        rgw = RgwServer(os.path.join(base, "rgw"), objectstore="bluestore",
                        store_bytes=max(16 * GiB, int(24 * GiB * args.scale))).start()
        try:
            for mode in modes:
                for name in names:
                    run_base = tempfile.mkdtemp(prefix=f"{mode}-{name}-", dir=base)
                    r = run_one(rgw, run_base, mode, name, cache, args.scale)
                    results.append(r)
                    if not args.json:
                        for row in _row(r, "run") + _row(r, "restart"):
                            print(row, flush=True)
        finally:
            rgw.stop()
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
