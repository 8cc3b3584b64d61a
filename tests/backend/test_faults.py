"""Transient and permanent failures, on every backend, through FaultyStore.

The fault plan acts below each store's retry layer (botocore's retry mode
for S3Store: the synthetic 503/500/403 answers are parsed by botocore like
real ones), so these tests check what is retried, how often, and what
surfaces -- with the same numbers for MemoryStore, moto and RGW.
"""
from __future__ import annotations

import hashlib
import os

import pytest

from objcache.backend import (
    AccessDenied, InvalidCredentials, PreconditionFailed, TransientError)
from objcache.backend.faults import Fault, FaultPlan, FaultyStore
from tests.backend import MiB, backend, run  # noqa: F401

TRANSIENT = ["slowdown", "internal", "reset"]


@pytest.mark.parametrize("kind", TRANSIENT)
@pytest.mark.parametrize("op", ["HeadObject", "PutObject", "ListObjectsV2",
                                "CopyObject", "UploadPart"])
def test_transient_faults_are_retried(backend, kind, op):
    plan = FaultPlan([Fault(kind, op=op, times=2)])

    async def body():
        async with backend.faulty(plan) as store:
            await store.put("src", b"data")                       # may be faulted
            assert (await store.head("src")).size == 4
            assert [o.key async for p in store.list("") for o in p.objects] == ["src"]
            await store.copy("src", "dst")
            await store.multipart_upload("mp", [b"x" * 10], part_size=5 * MiB)
            assert plan.count(kind) == 2
            stats = store.stats
            assert stats["retries"] == 2
            # every attempt counts as a request; one call of each operation,
            # plus RGW's HEAD after its empty CompleteMultipartUpload ETag
            calls = 2 if op == "HeadObject" and backend.kind == "rgw" else 1
            assert stats["requests"][op] == calls + 2
    run(body)


@pytest.mark.parametrize("kind", ["slowdown", "internal"])
def test_get_error_answers_are_retried(backend, kind):
    data = os.urandom(100_000)
    plan = FaultPlan([Fault(kind, op="GetObject", times=2)])

    async def body():
        async with backend.faulty(plan) as store:
            await store.put("k", data)
            buf = bytearray(len(data))
            assert await store.get_range("k", 0, len(data), buf) == len(data)
            assert buf == data
            assert store.stats["retries"] == 2
            assert store.stats["requests"]["GetObject"] == 3
    run(body)


def test_transient_faults_surface_after_max_attempts(backend):
    plan = FaultPlan([Fault("slowdown", op="HeadObject", times=None),
                      Fault("internal", op="PutObject", times=None)])

    async def body():
        async with backend.faulty(plan, max_attempts=3) as store:
            with pytest.raises(TransientError) as exc:
                await store.head("k")
            assert exc.value.code in ("SlowDown", "503")
            assert exc.value.key == "k" and "k" in str(exc.value)
            with pytest.raises(TransientError) as exc:
                await store.put("k", b"x")
            assert exc.value.code == "InternalError" and exc.value.status == 500
            assert store.stats["requests"] == {"HeadObject": 3, "PutObject": 3}
            assert store.stats["retries"] == 4
    run(body)


@pytest.mark.parametrize("op", ["HeadObject", "GetObject", "PutObject", "DeleteObject",
                                "ListObjectsV2"])
def test_access_denied_is_never_retried(backend, op):
    plan = FaultPlan([Fault("access_denied", op=op, times=None)])

    async def body():
        async with backend.faulty(plan) as store:
            if op != "PutObject":   # (PutObject is not faulted then)
                await store.put("secret/k", b"x")
            calls = {"HeadObject": lambda: store.head("secret/k"),
                     "GetObject": lambda: store.get("secret/k"),
                     "PutObject": lambda: store.put("secret/k", b"y"),
                     "DeleteObject": lambda: store.delete("secret/k"),
                     "ListObjectsV2": lambda: store.list("secret/").__anext__()}
            before = store.stats["requests"].get(op, 0)
            with pytest.raises(AccessDenied) as exc:
                await calls[op]()
            assert not isinstance(exc.value, InvalidCredentials)
            assert exc.value.status == 403
            assert store.stats["requests"][op] == before + 1
            assert store.stats["retries"] == 0
            assert backend.bucket in str(exc.value)
    run(body)


def test_access_denied_on_chosen_keys_only(backend):
    plan = FaultPlan([Fault("access_denied", key=lambda k: k.startswith("private/"),
                            times=None)])

    async def body():
        async with backend.faulty(plan) as store:
            await store.put("public/a", b"ok")
            with pytest.raises(AccessDenied) as exc:
                await store.put("private/a", b"no")
            assert exc.value.key == "private/a"
            assert await store.get("public/a") == b"ok"
    run(body)


@pytest.mark.parametrize("breaks", [1, 3])
def test_get_resumes_after_a_broken_body(backend, breaks):
    data = os.urandom(3 * MiB)
    plan = FaultPlan([Fault("reset", op="GetObject", times=breaks, after_bytes=300_000)])

    async def body():
        async with backend.faulty(plan) as store:
            await store.put("k", data)
            mark = backend.mark()
            buf = bytearray(3 * MiB)
            assert await store.get_range("k", 0, len(data), buf) == len(data)
            assert buf == data
            assert store.stats["resumes"] == breaks
            assert store.stats["requests"]["GetObject"] == breaks + 1
            assert await store.get("k") == data      # whole-object GET: no more faults
            if backend.is_s3:
                ranges = [r.range for r in backend.server_requests(mark)
                          if r.method == "GET"]
                assert ranges[0] == f"bytes=0-{len(data) - 1}"
                # each resumption asks for the rest, from where the body broke
                starts = [int(r.split("=")[1].split("-")[0]) for r in ranges[1:breaks + 1]]
                assert starts == [300_000 * (i + 1) for i in range(breaks)]
    run(body)


def test_get_gives_up_after_max_attempts_broken_bodies(backend):
    plan = FaultPlan([Fault("reset", op="GetObject", times=None, after_bytes=1000)])

    async def body():
        async with backend.faulty(plan, max_attempts=3) as store:
            await store.put("k", os.urandom(100_000))
            buf = bytearray(100_000)
            with pytest.raises(TransientError):
                await store.get_range("k", 0, 100_000, buf)
            assert store.stats["requests"]["GetObject"] == 3
    run(body)


def test_resume_never_splices_two_versions(backend):
    """The object is replaced between the broken body and the resumption:
    without if_match the read starts over on the new version; with if_match
    it is PreconditionFailed."""
    old, new = os.urandom(MiB), os.urandom(MiB)

    def replace():
        backend.sync_put("k", new)

    async def body():
        store = backend.faulty(FaultPlan([Fault("reset", op="GetObject",
                                                after_bytes=100_000, action=replace)]))
        async with store:
            etag = await store.put("k", old)
            buf = bytearray(MiB)
            assert await store.get_range("k", 0, MiB, buf) == MiB
            assert buf == new
            assert store.stats["requests"]["GetObject"] == 3  # broken, 412, whole
            backend.sync_put("k", old)
            store.plan = FaultPlan([Fault("reset", op="GetObject", after_bytes=100_000,
                                          action=replace)])
            with pytest.raises(PreconditionFailed):
                await store.get_range("k", 0, MiB, buf, if_match=etag)
            assert hashlib.md5(backend.sync_get("k")).hexdigest() != etag
    run(body)


def test_multipart_part_failure_aborts_the_upload(backend):
    plan = FaultPlan([Fault("access_denied", op="UploadPart", skip=1)])

    async def body():
        async with backend.faulty(plan) as store:
            with pytest.raises(AccessDenied):
                await store.multipart_upload("mp", [bytes(5 * MiB)] * 3,
                                             part_size=5 * MiB, concurrency=1)
            assert await store.list_multipart_uploads() == []
            assert store.stats["requests"]["AbortMultipartUpload"] == 1
            assert await store.head("mp") is None
    run(body)


def test_multipart_transient_part_failures_are_retried(backend):
    plan = FaultPlan([Fault("slowdown", op="UploadPart", times=2),
                      Fault("reset", op="CompleteMultipartUpload", times=1)])
    parts = [os.urandom(5 * MiB), os.urandom(100)]

    async def body():
        async with backend.faulty(plan) as store:
            etag = await store.multipart_upload("mp", parts, part_size=5 * MiB)
            assert (await store.head("mp")).etag == etag
            assert await store.get("mp") == b"".join(parts)
            assert store.stats["retries"] == 3
    run(body)


def test_faulty_store_forwards_everything(backend):
    async def body():
        store = FaultyStore(backend.make("pfx"))
        assert (store.bucket, store.prefix) == (backend.bucket, "pfx/")
        assert repr(store).startswith("FaultyStore(")
        async with store:
            await store.put("a", b"1")
            await store.copy("a", "b", metadata={"mode": "1"})
            assert (await store.head("b")).metadata == {"mode": "1"}
            assert await store.get_range("b", 0, 1) == b"1"
            assert await store.delete_many(["a"]) == []
            await store.delete("b")
            assert await store.list_multipart_uploads() == []
            await store.abort_multipart_upload("zz", "no-such-upload")
    run(body)


def test_fault_rules():
    plan = FaultPlan([Fault("slowdown", op="GetObject", key="a", skip=1, times=2)])
    got = [plan.take("GetObject", "a") is not None for _ in range(5)]
    assert got == [False, True, True, False, False]
    assert plan.take("GetObject", "b") is None and plan.take("PutObject", "a") is None
    assert plan.take("GetObject", None) is None
    assert plan.injected == [("GetObject", "a", "slowdown")] * 2
    assert FaultPlan([Fault("internal")]).take("ListObjectsV2", None) is not None
    with pytest.raises(ValueError):
        Fault("explode")


def test_get_range_leaves_no_view_of_the_callers_buffer(backend):
    """The destination is usually a cache page, which stays pinned while
    any view of it lives: after get_range returns — or fails — the caller's
    buffer has no exports left (a bytearray can be resized at once)."""
    data = os.urandom(100_000)

    async def body():
        async with backend.faulty(FaultPlan([])) as store:
            await store.put("k", data)
            buf = bytearray(len(data))
            assert await store.get_range("k", 0, len(data), buf) == len(data)
            buf.append(0)                           # BufferError if a view survived
            del buf[-1]
            with pytest.raises(PreconditionFailed):
                await store.get_range("k", 0, len(data), buf,
                                      if_match=hashlib.md5(b"other").hexdigest())
            buf.append(0)
            del buf[-1]
            store.plan = FaultPlan([Fault("reset", op="GetObject", times=None,
                                          after_bytes=1000)])
            with pytest.raises(TransientError):
                await store.get_range("k", 0, len(data), buf)
            buf.append(0)
    run(body)
