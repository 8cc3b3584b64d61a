"""S3Store against real servers: what only a real HTTP path can show.

* A connection reset in the middle of a GET body (a TCP proxy in front of
  the server cuts it with an RST) is resumed from the received offset.
* Ranged reads go from the socket straight into the caller's buffer, and
  the connection is reused afterwards.
* Wrong credentials and missing buckets fail at once, counted at the server.
* Never more than max_concurrency HTTP requests in flight.
* Cancellation stops a slow read before returning; nothing writes later.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time

import pytest
from botocore.response import StreamingBody

from objcache.backend import (
    AccessDenied, BackendError, InvalidCredentials, InvalidRequest, NoSuchBucket,
    NotFound, PreconditionFailed, TransientError)
from objcache.backend.s3 import READ_PIECE, S3Store, _BufferListReader, classify
from tests.backend import MiB, TcpProxy, run, s3backend  # noqa: F401


def proxied(backend, proxy: TcpProxy, **options) -> S3Store:
    return backend.make(endpoint_url=proxy.endpoint_url, **options)


@pytest.mark.parametrize("cut", ["rst", "fin"])
@pytest.mark.parametrize("resets", [1, 3])
def test_connection_reset_mid_body_is_resumed(s3backend, resets, cut):
    """A real RST (or an early close) in the middle of a body, from a proxy
    in front of the server."""
    backend = s3backend
    data = os.urandom(8 * MiB)
    backend.sync_put("big", data)

    async def body():
        async with TcpProxy(backend.server.host, backend.server.port,
                            reset_after=MiB + MiB // 2, resets=resets,
                            fin=cut == "fin") as proxy:
            async with proxied(backend, proxy) as store:
                mark = backend.mark()
                buf = bytearray(len(data))
                assert await store.get_range("big", 0, len(data), buf) == len(data)
                assert buf == data
                assert proxy.resets_done == resets
                assert store.stats["resumes"] == resets
                gets = [r for r in backend.server_requests(mark) if r.method == "GET"]
                assert len(gets) == resets + 1
                assert gets[0].range == f"bytes=0-{len(data) - 1}"
                # each resumption asks for the rest, from further on
                starts = [int(g.range.split("=")[1].split("-")[0]) for g in gets]
                assert starts == sorted(set(starts))
                assert all(g.range.endswith(f"-{len(data) - 1}") for g in gets)
                if cut == "fin":   # every byte that arrived counts
                    assert all(b - a > MiB for a, b in zip(starts, starts[1:]))
    run(body, loop="asyncio")


def test_reset_resumption_with_bytes_result(s3backend):
    backend = s3backend
    data = os.urandom(2 * MiB)
    backend.sync_put("big", data)

    async def body():
        async with TcpProxy(backend.server.host, backend.server.port,
                            reset_after=300_000, resets=1) as proxy:
            async with proxied(backend, proxy) as store:
                assert await store.get("big") == data
                assert await store.get_range("big", 1000, MiB) == data[1000:1000 + MiB]
                assert store.stats["resumes"] == 1
    run(body, loop="asyncio")


def test_reads_stream_into_the_buffer_and_reuse_the_connection(s3backend, monkeypatch):
    backend = s3backend
    data = os.urandom(3 * MiB + 5)
    backend.sync_put("obj", data)

    def no_copying_read(self, amt=None):
        raise AssertionError("StreamingBody.read used: the body was copied")

    async def body():
        async with TcpProxy(backend.server.host, backend.server.port) as proxy:
            async with proxied(backend, proxy, max_concurrency=1) as store:
                monkeypatch.setattr(StreamingBody, "read", no_copying_read)
                buf = bytearray(2 * MiB)
                for i in range(10):
                    n = await store.get_range("obj", i * 1000, 2 * MiB, buf)
                    assert n == 2 * MiB and buf == data[i * 1000:i * 1000 + 2 * MiB]
                assert await store.get_range("obj", len(data) - 10, 100, buf) == 10
                monkeypatch.undo()
                assert (await store.head("obj")).size == len(data)
                assert await store.get("obj") == data
                # one connection for everything: fully read bodies hand it
                # back (moto's server closes every connection after one answer)
                if backend.kind != "moto":
                    assert proxy.connections == 1
    run(body, loop="asyncio")


def test_wrong_secret_fails_at_once(s3backend):
    backend = s3backend
    if backend.kind == "moto":
        pytest.skip("moto does not check signatures")
    backend.sync_put("k", b"x")

    async def body():
        async with backend.make(secret_key="not-the-secret-5ee2") as store:
            mark = backend.mark()
            with pytest.raises(InvalidCredentials) as exc:
                await store.get("k")
            assert exc.value.code == "SignatureDoesNotMatch"
            assert isinstance(exc.value, AccessDenied)
            assert f"s3://{backend.bucket}/k" in str(exc.value)
            with pytest.raises(AccessDenied):          # HEAD: a bare 403
                await store.head("k")
            with pytest.raises(InvalidCredentials):
                await store.put("k", b"y")
            with pytest.raises(InvalidCredentials):
                await store.get_range("k", 0, 1, bytearray(1))
            seen = backend.server_requests(mark)
            assert [r.method for r in seen] == ["GET", "HEAD", "PUT", "GET"]
            assert all(r.status == 403 for r in seen)
            assert store.stats["retries"] == 0
        async with backend.make(access_key="NOSUCHKEY", secret_key="x") as store:
            with pytest.raises(InvalidCredentials) as exc:
                await store.get("k")
            assert exc.value.code == "InvalidAccessKeyId"
    run(body)


def test_credentials_never_appear_in_logs_or_errors(s3backend, caplog):
    backend = s3backend
    secret = "sekrit-Value-0123456789"

    async def body():
        async with backend.make(bucket="no-such-bucket-creds", secret_key=secret) as store:
            with pytest.raises(BackendError) as exc:
                await store.get("k")
            assert secret not in str(exc.value) and secret not in repr(exc.value)
            assert secret not in repr(store)
    with caplog.at_level(logging.DEBUG):
        run(body)
    assert secret not in caplog.text


def test_http_requests_in_flight_never_exceed_max_concurrency(s3backend):
    """Counted by botocore hooks around each HTTP request, independently of
    the store's own bookkeeping."""
    backend = s3backend
    backend.sync_put("k", os.urandom(512 * 1024))
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "threads": set()}

    def sent(**_):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["threads"].add(threading.get_ident())

    def received(**_):
        with lock:
            state["now"] -= 1

    async def body():
        async with backend.make(max_concurrency=4) as store:
            store.client.meta.events.register("before-send.s3", sent)
            store.client.meta.events.register("response-received.s3", received)
            bufs = [bytearray(512 * 1024) for _ in range(40)]
            await asyncio.gather(*(store.get_range("k", 0, len(b), b) for b in bufs),
                                 *(store.head("k") for _ in range(40)),
                                 *(store.put(f"p{i}", b"x") for i in range(20)))
            assert 2 <= state["peak"] <= 4   # parallel, never above the bound
            assert len(state["threads"]) <= 4
            assert store.stats["peak_in_flight"] == 4
            pool = store.client._endpoint.http_session._manager
            assert all(p.pool.maxsize == 4 for p in pool.pools._container.values())
    run(body)


def test_cancelled_slow_read_stops_and_leaves_the_buffer_alone(s3backend):
    backend = s3backend
    size = 6 * MiB
    backend.sync_put("slow", os.urandom(size))

    async def body():
        async with TcpProxy(backend.server.host, backend.server.port,
                            rate=4 * MiB) as proxy:
            async with proxied(backend, proxy) as store:
                buf = bytearray(size)
                task = asyncio.ensure_future(store.get_range("slow", 0, size, buf))
                await asyncio.sleep(0.4)
                t0 = time.monotonic()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # stopped at the next READ_PIECE, not at the end of the body
                assert time.monotonic() - t0 < 2 * READ_PIECE / (4 * MiB) + 0.5
                snapshot = bytes(buf)
                assert 0 < len(snapshot.rstrip(b"\0")) < size
                await asyncio.sleep(0.5)
                assert bytes(buf) == snapshot
                assert store.stats["in_flight"] == 0
                # the store still works (the broken connection was dropped)
                assert await store.get_range("slow", 0, 10) == buf[:10]
    run(body, loop="asyncio")


def test_adaptive_retry_mode(s3backend):
    async def body():
        async with s3backend.make(retry_mode="adaptive") as store:
            await store.put("k", b"x")
            assert await store.get("k") == b"x"
    run(body)
    with pytest.raises(ValueError):
        s3backend.make(retry_mode="legacy")


def test_head_of_missing_key_asks_for_the_bucket_once(s3backend):
    async def body():
        async with s3backend.make() as store:
            assert await store.head("a") is None
            assert await store.head("b") is None
            assert store.stats["requests"] == {"HeadObject": 2, "HeadBucket": 1}
        async with s3backend.make(bucket="no-such-bucket-head") as store:
            for _ in range(2):
                with pytest.raises(NoSuchBucket):
                    await store.head("a")
    run(body)


# ------------------------------------------------------------ units


def test_error_classification():
    assert classify("NoSuchKey", 404) is NotFound
    assert classify("404", 404) is NotFound
    assert classify("NoSuchBucket", 404) is NoSuchBucket
    assert classify("PreconditionFailed", 412) is PreconditionFailed
    assert classify("SignatureDoesNotMatch", 403) is InvalidCredentials
    assert classify("InvalidAccessKeyId", 403) is InvalidCredentials
    assert classify("403", 403) is AccessDenied
    assert classify("AccessDenied", 403) is AccessDenied
    for code, status in (("SlowDown", 503), ("503", 503), ("InternalError", 500),
                         ("RequestTimeout", 400), ("Weird", 502), ("X", 429)):
        assert classify(code, status) is TransientError, code
    assert classify("EntityTooSmall", 400) is InvalidRequest
    assert classify("Whatever", 409) is InvalidRequest
    assert classify(None, None) is BackendError


def test_buffer_list_reader():
    views = [memoryview(b"abc"), memoryview(b"defgh"), memoryview(b"ij")]
    r = _BufferListReader(views)
    assert len(r) == 10 and r.seekable()
    assert r.read(4) == b"abcd"
    assert r.read() == b"efghij"
    assert r.read(3) == b""
    r.seek(0)
    assert r.read() == b"abcdefghij"
    r.seek(5)
    assert r.tell() == 5 and r.read(2) == b"fg"
    assert r.seek(0, io.SEEK_END) == 10
    buf = bytearray(7)
    r.seek(2)
    assert r.readinto(buf) == 7 and buf == b"cdefghi"
