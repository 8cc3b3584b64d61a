"""The loopback S3 servers behave like S3 where objcache relies on it.

Each behaviour runs against moto and Ceph RGW (parametrized). Then RGW's
lifetime guarantees: clusters coexist, stop() and the end of the parent
process leave no daemon behind, failures say why, and the command line works.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from objcache.testing.s3servers import (
    RgwServer, RgwUnavailable, S3ServerError, s3_client)

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20

SERVERS = [pytest.param("moto", marks=pytest.mark.moto, id="moto"),
           pytest.param("rgw", marks=pytest.mark.rgw, id="rgw")]

_clients: dict[int, object] = {}


@pytest.fixture(params=SERVERS)
def s3(request):
    """(server, client, bucket): a fresh bucket on each server."""
    server, bucket = request.getfixturevalue(f"{request.param}_bucket")
    if id(server) not in _clients:  # one client per server: creating one costs ~30 ms
        _clients[id(server)] = server.client()
    return server, _clients[id(server)], bucket


def error_of(exc: pytest.ExceptionInfo) -> tuple[int, str]:
    err = exc.value.response
    return err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"]


def md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


# ---------------------------------------------------------------- fidelity


def test_put_get_head(s3):
    _, c, b = s3
    data = os.urandom(MIB + 7)
    put = c.put_object(Bucket=b, Key="obj", Body=data)
    assert put["ETag"] == md5_etag(data)
    got = c.get_object(Bucket=b, Key="obj")
    assert got["Body"].read() == data
    assert got["ETag"] == put["ETag"]
    head = c.head_object(Bucket=b, Key="obj")
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == put["ETag"]
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="missing")
    assert error_of(exc) == (404, "NoSuchKey")


def test_ranged_get(s3):
    _, c, b = s3
    size = 300_000
    data = os.urandom(size)
    c.put_object(Bucket=b, Key="r", Body=data)
    cases = {
        "bytes=0-0": (0, 0),
        "bytes=100-199": (100, 199),
        "bytes=65536-131071": (65536, 131071),
        "bytes=299000-": (299000, size - 1),          # open-ended
        "bytes=-500": (size - 500, size - 1),         # suffix
        f"bytes=0-{size + 999}": (0, size - 1),       # end past EOF: clamped
    }
    for header, (first, last) in cases.items():
        got = c.get_object(Bucket=b, Key="r", Range=header)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, header
        assert got["ContentRange"] == f"bytes {first}-{last}/{size}", header
        assert got["ContentLength"] == last - first + 1, header
        assert got["Body"].read() == data[first:last + 1], header
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="r", Range=f"bytes={size}-")
    assert error_of(exc) == (416, "InvalidRange")


def test_conditional_requests(s3):
    _, c, b = s3
    data = b"version one"
    etag = c.put_object(Bucket=b, Key="k", Body=data)["ETag"]
    other = '"0123456789abcdef0123456789abcdef"'

    assert c.get_object(Bucket=b, Key="k", IfMatch=etag)["Body"].read() == data
    ranged = c.get_object(Bucket=b, Key="k", IfMatch=etag, Range="bytes=0-6")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert c.get_object(Bucket=b, Key="k", IfNoneMatch=other)["Body"].read() == data

    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="k", IfMatch=other)
    assert error_of(exc) == (412, "PreconditionFailed")
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="k", IfMatch=other, Range="bytes=0-3")
    assert error_of(exc)[0] == 412
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="k", IfNoneMatch=etag)
    assert error_of(exc)[0] == 304
    with pytest.raises(ClientError) as exc:
        c.head_object(Bucket=b, Key="k", IfMatch=other)
    assert error_of(exc)[0] == 412

    # A new version has a new ETag: the old one no longer matches.
    new_etag = c.put_object(Bucket=b, Key="k", Body=b"version two")["ETag"]
    assert new_etag != etag
    with pytest.raises(ClientError) as exc:
        c.get_object(Bucket=b, Key="k", IfMatch=etag)
    assert error_of(exc)[0] == 412


def test_multipart_upload(s3):
    server, c, b = s3
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(1000)]
    up = c.create_multipart_upload(Bucket=b, Key="mp", Metadata={"mode": "33188"})
    done = []
    for n, body in enumerate(parts, start=1):
        r = c.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"],
                          PartNumber=n, Body=body)
        assert r["ETag"] == md5_etag(body)
        done.append({"PartNumber": n, "ETag": r["ETag"]})
    listed = c.list_parts(Bucket=b, Key="mp", UploadId=up["UploadId"])
    assert [(p["PartNumber"], p["Size"]) for p in listed["Parts"]] == [
        (1, 5 * MIB), (2, 5 * MIB), (3, 1000)]
    uploads = c.list_multipart_uploads(Bucket=b).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["mp"]
    fin = c.complete_multipart_upload(Bucket=b, Key="mp", UploadId=up["UploadId"],
                                      MultipartUpload={"Parts": done})

    # S3's multipart ETag: md5 of the parts' binary md5s, then "-<parts>".
    digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts))
    expected = f'"{digest.hexdigest()}-3"'
    head = c.head_object(Bucket=b, Key="mp")
    assert re.fullmatch(r'"[0-9a-f]{32}-3"', head["ETag"])
    assert head["ETag"] == expected
    # RGW 16 answers CompleteMultipartUpload with an empty <ETag></ETag> (a
    # Ceph bug, fixed in later releases; Red Hat BZ 2266579). Clients must
    # take the new object's ETag from a HEAD, or compute it as above.
    if isinstance(server, RgwServer):
        assert fin["ETag"] in ("", expected)
    else:
        assert fin["ETag"] == expected
    assert head["ContentLength"] == 10 * MIB + 1000
    assert head["Metadata"] == {"mode": "33188"}
    whole = b"".join(parts)
    across = c.get_object(Bucket=b, Key="mp",
                          Range=f"bytes={5 * MIB - 10}-{5 * MIB + 9}")
    assert across["Body"].read() == whole[5 * MIB - 10:5 * MIB + 10]
    assert c.get_object(Bucket=b, Key="mp")["Body"].read() == whole


def _list_all(c, **kwargs) -> tuple[list[str], list[str], int]:
    """Follow ListObjectsV2 pages: (keys, common prefixes, pages)."""
    keys, prefixes, pages, token = [], [], 0, None
    while True:
        kw = dict(kwargs, **({"ContinuationToken": token} if token else {}))
        page = c.list_objects_v2(**kw)
        pages += 1
        got = ([o["Key"] for o in page.get("Contents", [])]
               + [p["Prefix"] for p in page.get("CommonPrefixes", [])])
        assert page["KeyCount"] == len(got)
        assert len(got) <= kwargs.get("MaxKeys", 1000)
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        if not page["IsTruncated"]:
            return keys, prefixes, pages
        token = page["NextContinuationToken"]


def test_list_objects_v2_delimiter_and_paging(s3):
    _, c, b = s3
    keys = ["a/1", "a/2", "a/sub/3", "b/x", "c", "d/", "e"]  # "d/": empty dir
    for k in keys:
        c.put_object(Bucket=b, Key=k, Body=b"")

    assert _list_all(c, Bucket=b, Delimiter="/") == (
        ["c", "e"], ["a/", "b/", "d/"], 1)
    assert _list_all(c, Bucket=b, Prefix="a/", Delimiter="/") == (
        ["a/1", "a/2"], ["a/sub/"], 1)
    assert _list_all(c, Bucket=b, Prefix="d/", Delimiter="/") == (["d/"], [], 1)
    assert _list_all(c, Bucket=b, Prefix="nothing/", Delimiter="/") == ([], [], 1)

    found, _, pages = _list_all(c, Bucket=b, MaxKeys=2)
    assert found == sorted(keys) and pages == 4
    found, prefixes, pages = _list_all(c, Bucket=b, Delimiter="/", MaxKeys=1)
    assert (found, prefixes, pages) == (["c", "e"], ["a/", "b/", "d/"], 5)
    after = c.list_objects_v2(Bucket=b, StartAfter="b/x")
    assert [o["Key"] for o in after["Contents"]] == ["c", "d/", "e"]


def test_copy_object_replace_metadata(s3):
    _, c, b = s3
    c.put_object(Bucket=b, Key="src", Body=b"payload", ContentType="text/plain",
                 Metadata={"mode": "33188", "uid": "1000"})
    c.copy_object(Bucket=b, Key="kept", CopySource={"Bucket": b, "Key": "src"})
    assert c.head_object(Bucket=b, Key="kept")["Metadata"] == {
        "mode": "33188", "uid": "1000"}

    new = {"mode": "33261", "mtime": "1700000000"}
    c.copy_object(Bucket=b, Key="dst", CopySource={"Bucket": b, "Key": "src"},
                  MetadataDirective="REPLACE", Metadata=new,
                  ContentType="application/octet-stream")
    head = c.head_object(Bucket=b, Key="dst")
    assert head["Metadata"] == new
    assert head["ContentType"] == "application/octet-stream"
    assert c.get_object(Bucket=b, Key="dst")["Body"].read() == b"payload"

    # chmod in place: an object copied onto itself with new metadata.
    c.copy_object(Bucket=b, Key="src", CopySource={"Bucket": b, "Key": "src"},
                  MetadataDirective="REPLACE", Metadata={"mode": "33216"})
    assert c.head_object(Bucket=b, Key="src")["Metadata"] == {"mode": "33216"}
    assert c.get_object(Bucket=b, Key="src")["Body"].read() == b"payload"


def test_user_metadata_roundtrip(s3):
    _, c, b = s3
    meta = {"mode": "16877", "uid": "1000", "gid": "100",
            "mtime": "1700000000", "symlink-target": "../target/x y"}
    c.put_object(Bucket=b, Key="m", Body=b"", Metadata=meta)
    head = c.head_object(Bucket=b, Key="m")
    assert head["Metadata"] == meta
    assert c.get_object(Bucket=b, Key="m")["Metadata"] == meta
    raw = head["ResponseMetadata"]["HTTPHeaders"]
    assert raw["x-amz-meta-mode"] == "16877"       # the names s3fs uses
    assert raw["x-amz-meta-uid"] == "1000"


ODD_KEYS = ["a//b", "../x", "./y", "a/./b", "a/../b", "/lead", "trail/",
            "ü/日本語.txt", "sp ace+plus%pct?q#h&amp", "tab\tkey", "~tilde",
            "k" * 1024]


def test_odd_keys(s3):
    _, c, b = s3
    for key in ODD_KEYS:
        c.put_object(Bucket=b, Key=key, Body=key.encode())
    for key in ODD_KEYS:
        assert c.get_object(Bucket=b, Key=key)["Body"].read() == key.encode(), key
        assert c.head_object(Bucket=b, Key=key)["ContentLength"] == len(key.encode())
    keys, prefixes, _ = _list_all(c, Bucket=b)
    assert keys == sorted(ODD_KEYS, key=lambda k: k.encode())
    keys, prefixes, _ = _list_all(c, Bucket=b, Prefix="a/", Delimiter="/")
    assert (keys, prefixes) == ([], ["a/../", "a/./", "a//"])  # "." < "/"


# ------------------------------------------------------------ request log


def test_request_log_counts_each_request(s3):
    server, c, b = s3
    data = os.urandom(1 << 18)
    c.put_object(Bucket=b, Key="chunks/ü x", Body=data)
    c.put_object(Bucket=b, Key="other", Body=b"x")
    mark = server.request_mark()

    chunk = 1 << 14
    ranges = [f"bytes={i * chunk}-{(i + 1) * chunk - 1}" for i in range(16)]

    def read(rng: str) -> None:
        assert (c.get_object(Bucket=b, Key="chunks/ü x", Range=rng)["Body"].read()
                == data[int(rng[6:].split("-")[0]):][:chunk])
    threads = [threading.Thread(target=read, args=(r,)) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.get_object(Bucket=b, Key="other")["Body"].read()
    c.head_object(Bucket=b, Key="other")
    with pytest.raises(ClientError):
        c.get_object(Bucket=b, Key="missing")

    reqs = server.requests(since=mark)
    assert server.request_counts(since=mark) == {"GET": 18, "HEAD": 1}
    ranged = sorted(r.range for r in reqs if r.is_ranged_get)
    assert ranged == sorted(ranges)  # each chunk exactly once, counted at the server
    assert server.object_get_counts(since=mark, bucket=b) == {
        **{("chunks/ü x", r): 1 for r in ranges},
        ("other", None): 1, ("missing", None): 1}
    assert {r.key for r in reqs if r.is_ranged_get} == {"chunks/ü x"}
    assert all(r.status == 206 for r in reqs if r.is_ranged_get)
    assert {(r.key, r.status) for r in reqs if not r.is_ranged_get} == {
        ("other", 200), ("missing", 404)}
    assert all(r.bucket == b for r in reqs)
    # Nothing new happened: a second look sees the same log.
    assert server.requests(since=mark) == reqs


# ------------------------------------------------------- RGW lifetimes


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_rgw_missing_binaries_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    server = RgwServer(tmp_path / "c")
    with pytest.raises(RgwUnavailable, match="ceph-mon ceph-osd radosgw ceph-common"):
        server.start()
    assert not (tmp_path / "c").exists()


@pytest.mark.rgw
def test_rgw_busy_port_fails_clearly(tmp_path, rgw_s3):
    with pytest.raises(S3ServerError, match="already in use"):
        RgwServer(tmp_path / "c", mon_port=rgw_s3.port).start()
    assert not (tmp_path / "c").exists()


def test_rgw_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "precious.txt").write_text("stop() would delete me")
    with pytest.raises(S3ServerError, match="not an empty directory"):
        RgwServer(tmp_path).start()
    assert (tmp_path / "precious.txt").exists()


@pytest.mark.rgw
def test_rgw_second_cluster_coexists_and_stops_clean(tmp_path, rgw_s3):
    # Another loopback address with the mon's default port 3300, while the
    # session cluster keeps running. Started from a thread that ends at once:
    # the daemons must outlive that thread (PDEATHSIG is per thread).
    server = RgwServer(tmp_path / "second", host="127.0.0.3", mon_port=3300)
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    assert server.running
    with server:
        pids = server.daemon_pids()
        assert set(pids) == {"mon.a", "osd.0", "client.rgw.a"}
        for pid in pids.values():
            assert os.getpgid(pid) == pid      # own process group
        c = server.client()
        server.create_bucket("second")
        c.put_object(Bucket="second", Key="k", Body=b"2")
        assert [b["Name"] for b in c.list_buckets()["Buckets"]] == ["second"]
        assert "second" not in [
            b["Name"] for b in rgw_s3.client().list_buckets()["Buckets"]]
    assert not any(_alive(p) for p in pids.values())
    assert not server.directory.exists()
    assert server.timings["start"] < 20 and server.timings["stop"] < 5
    # The request log outlives the cluster.
    assert [(r.method, r.key) for r in server.requests()][-3:] == [
        ("PUT", None), ("PUT", "k"), ("GET", None)]


@pytest.mark.rgw
def test_rgw_start_failure_shows_log_tail(tmp_path):
    server = RgwServer(tmp_path / "bad", start_timeout=20,
                       extra_conf={"rgw_frontends": "beast endpoint=no-such-host:1"})
    with pytest.raises(S3ServerError, match="tail of .*client.rgw.a") as exc:
        server.start()
    assert "radosgw" in str(exc.value)
    assert not server.daemon_pids() and not server.running
    assert (tmp_path / "bad" / "log").is_dir()   # kept for the post-mortem


_CHILD = """
import json, os, sys, time
from objcache.testing.s3servers import RgwServer
server = RgwServer(sys.argv[1]).start()
print(json.dumps(server.daemon_pids()), flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)          # no stop(): the atexit hook must do it
time.sleep(600)          # killed with SIGKILL: PDEATHSIG must do it
"""


@pytest.mark.rgw
@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_rgw_daemons_never_outlive_their_process(tmp_path, how):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "c"), how],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(_readline(child.stdout, timeout=30))
        assert all(_alive(p) for p in pids.values())
        if how == "sigkill":
            child.kill()
        assert child.wait(timeout=30) == (0 if how == "exit" else -9)
    finally:
        child.kill()
        child.wait()
    _wait_for(lambda: not any(_alive(p) for p in pids.values()), 10,
              f"daemons {pids} outlived their parent ({how})")
    if how == "exit":
        assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ CLI


def _readline(stream, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"no output within {timeout} s")
    return stream.readline()


def _wait_for(cond, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "objcache.testing.s3servers", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.rgw
def test_cli_rgw_foreground_stops_on_sigterm(tmp_path):
    directory = tmp_path / "cli"
    proc = subprocess.Popen(
        [sys.executable, "-m", "objcache.testing.s3servers", "rgw",
         "--dir", str(directory), "--foreground"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(_readline(proc.stdout, timeout=30))
        assert {"endpoint_url", "access_key", "secret_key", "region"} <= set(info)
        daemons = json.loads((directory / "server.json").read_text())["daemons"]
        c = s3_client(info["endpoint_url"], info["access_key"], info["secret_key"])
        c.create_bucket(Bucket="cli")
        c.put_object(Bucket="cli", Key="k", Body=b"v")
        assert c.get_object(Bucket="cli", Key="k")["Body"].read() == b"v"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert not any(_alive(p) for p in daemons.values())
    assert not directory.exists()


@pytest.mark.moto
def test_cli_moto_background_start_status_stop(tmp_path):
    started = _cli("moto", "--dir", str(tmp_path))
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    try:
        c = s3_client(info["endpoint_url"], info["access_key"], info["secret_key"])
        c.create_bucket(Bucket="cli-moto")
        assert c.list_buckets()["Buckets"][0]["Name"] == "cli-moto"
        status = _cli("status", "--dir", str(tmp_path))
        assert json.loads(status.stdout)["running"] is True
        stopped = _cli("stop", "--dir", str(tmp_path))
        assert stopped.returncode == 0, stopped.stderr
        assert not _alive(info["pid"])
    finally:
        if _alive(info["pid"]):
            os.kill(info["pid"], signal.SIGKILL)
