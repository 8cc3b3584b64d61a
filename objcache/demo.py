"""``objcache demo``: the end-to-end demonstration, on Ceph RGW on loopback.

It uploads a sample model (safetensors shards of random weights, ``--size``
in total), loads it once straight from S3 with boto3, then starts a 3-node
objcache cluster and two client mounts ("pods" on different nodes) and
loads the model with the ``safetensors`` library through pod 1 (cold: the
cluster fetches each chunk from S3 once) and pod 2 (warm: served from the
cluster's memory, no S3 request). It prints time, GB/s and the S3 GETs
counted at the server for each, and cleans everything up on exit or
Ctrl-C.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from objcache import _ext
from objcache.testing.processes import stop_processes
from objcache.testing.s3servers import free_port
from objcache.units import format_size, parse_size

SHARDS = 4
CHUNK = 8 << 20


def safetensors_shard(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialize float32 tensors in the safetensors format (a little-endian
    u64 header length, a JSON header, then the raw data)."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(blobs)


def _row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))


def run_demo(size: str = "1GiB", keep: bool = False) -> int:
    from objcache.testing.s3servers import RgwServer

    total = parse_size(size)
    if total < SHARDS * 4096:
        raise SystemExit(f"--size must be at least {SHARDS * 4096} bytes")
    work = tempfile.mkdtemp(prefix="objcache-demo-")
    print(f"objcache demo — extensions: {_ext.IMPL} "
          f"(crc32c: {_ext.crc32c_backend()}), work dir {work}")
    rgw = RgwServer(os.path.join(work, "rgw"), store_bytes=max(4 * total, 1 << 30))
    servers: list[subprocess.Popen] = []
    pods: list[tuple[subprocess.Popen, str]] = []
    try:
        t0 = time.perf_counter()
        rgw.start()
        print(f"Ceph RGW on {rgw.endpoint_url} (started in "
              f"{time.perf_counter() - t0:.1f} s)")
        s3 = rgw.client()
        bucket = rgw.create_bucket("demo-models")

        rng = np.random.default_rng(0)
        per_shard = total // SHARDS // 4
        shards = {}
        for i in range(SHARDS):
            w = rng.standard_normal(per_shard, dtype=np.float32)
            shards[f"model/model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"] = \
                safetensors_shard({f"layer{i}.weight": w.reshape(-1, 256)
                                   if per_shard % 256 == 0 else w})
        nbytes = sum(len(b) for b in shards.values())
        t0 = time.perf_counter()
        for key, blob in shards.items():
            s3.put_object(Bucket=bucket, Key=key, Body=blob)
        put_s = time.perf_counter() - t0
        print(f"uploaded a {format_size(nbytes)} model in {SHARDS} safetensors "
              f"shards ({nbytes / put_s / 1e9:.2f} GB/s)")
        sums = {k: _ext.crc32c(v) for k, v in shards.items()}
        nchunks = sum(-(-len(v) // CHUNK) for v in shards.values())
        del shards

        from safetensors.numpy import load as st_load, load_file

        # 1. The way a pod loads without objcache: every byte from S3.
        mark = rgw.request_mark()
        t0 = time.perf_counter()

        def fetch(key):
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

        with ThreadPoolExecutor(SHARDS) as pool:
            blobs = dict(zip(sums, pool.map(fetch, sums)))
        tensors = {k: st_load(v) for k, v in blobs.items()}
        direct = (time.perf_counter() - t0, _object_gets(rgw, mark))
        assert all(_ext.crc32c(v) == sums[k] for k, v in blobs.items())
        del blobs

        # 2. A 3-node cluster and two pods mounting it.
        secret = os.urandom(16).hex()
        env = dict(os.environ, OBJCACHE_SECRET=secret, AWS_ACCESS_KEY_ID=rgw.access_key,
                   AWS_SECRET_ACCESS_KEY=rgw.secret_key, AWS_DEFAULT_REGION=rgw.region)
        ports = [free_port() for _ in range(3)]
        t0 = time.perf_counter()
        for n, port in enumerate(ports):
            argv = [sys.executable, "-m", "objcache", "server", "--data-dir",
                    os.path.join(work, f"node{n}"), "--listen", f"127.0.0.1:{port}",
                    "--bucket", f"s3://{bucket}", "--endpoint-url", rgw.endpoint_url,
                    "--cache-size", str(max(2 << 30, 2 * total))]
            if n:
                argv += ["--join", f"127.0.0.1:{ports[0]}"]
            servers.append(_start(argv, env, "serving"))
        for n, node in ((1, 0), (2, 2)):
            mnt = os.path.join(work, f"pod{n}")
            os.mkdir(mnt)
            argv = [sys.executable, "-m", "objcache", "mount", f"s3://{bucket}", mnt, "-f",
                    "--cluster", f"127.0.0.1:{ports[node]}"]
            pods.append((_start(argv, env, "mounted"), mnt))
        print(f"3-node cluster and 2 pods mounted in {time.perf_counter() - t0:.1f} s")

        def load_through(mnt):
            mark = rgw.request_mark()
            t0 = time.perf_counter()
            got = {k: load_file(os.path.join(mnt, k)) for k in sums}
            dt = time.perf_counter() - t0
            for k, ts in got.items():
                for name, arr in ts.items():
                    assert np.array_equal(arr, tensors[k][name]), f"{k}:{name} differs"
            return dt, _object_gets(rgw, mark)

        cold = load_through(pods[0][1])
        warm = load_through(pods[1][1])

        widths = (50, 9, 8, 8)
        print()
        print(_row(("load the model with safetensors", "time", "GB/s", "S3 GETs"), widths))
        for label, (dt, gets) in (("straight from S3 (boto3 get_object)", direct),
                                  ("pod 1, cold cluster (fetches from S3)", cold),
                                  ("pod 2, another node, warm cluster", warm)):
            print(_row((label, f"{dt:.2f} s", f"{nbytes / dt / 1e9:.2f}", gets), widths))
        print(f"\nThe model is {nchunks} chunks of {format_size(CHUNK)}: the cold load "
              f"cost {cold[1]} GETs, the warm one {warm[1]}.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up")
        return 130
    finally:
        stop_processes([proc for proc, _ in pods], timeout=60)
        for _, mnt in pods:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", mnt])
        stop_processes(servers, timeout=60)
        rgw.stop()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _object_gets(rgw, mark) -> int:
    """Object GETs (not listings) since ``mark``, counted at RGW."""
    return sum(rgw.object_get_counts(mark).values())


def _start(argv, env, ready: str) -> subprocess.Popen:
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    line = p.stdout.readline()
    if ready not in line:
        p.kill()
        raise RuntimeError(f"{argv[3]} did not start: {p.stderr.read()[-2000:]}")
    return p


