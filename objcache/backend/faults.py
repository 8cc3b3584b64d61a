"""Fault injection for tests: throttling, 500s, resets mid-body, AccessDenied.

A :class:`FaultPlan` says which requests fail and how; a :class:`FaultyStore`
wraps any ObjectStore and makes the plan act *inside* it, below its retry
layer -- exactly where a real S3 failure would hit:

* ``S3Store``: the plan is consulted for every HTTP attempt (botocore's
  ``before-send``). ``slowdown``/``internal``/``access_denied`` answer with a
  synthetic HTTP response (503 SlowDown, 500 InternalError, 403 AccessDenied)
  that botocore parses like a real one, so botocore's retry mode and the
  store's error mapping run for real. ``reset`` breaks a GetObject body after
  ``after_bytes`` bytes (the connection is dropped, the store resumes) and,
  for other operations, fails the attempt with a connection error.
* ``MemoryStore``: the same faults at the same points of its simulated
  requests, with the same retry and resume rules.

So a layer above sees what it would see from S3: transient faults that fit
in the retry budget are absorbed (``stats["retries"]``/``["resumes"]`` count
them), more of them surface as TransientError, AccessDenied surfaces at
once, never retried::

    plan = FaultPlan([Fault("slowdown", op="GetObject", times=2),
                      Fault("access_denied", key="secret/x", times=None)])
    store = FaultyStore(MemoryStore("bucket"), plan)

Operation names are S3's: HeadObject, GetObject, PutObject,
CreateMultipartUpload, UploadPart, UploadPartCopy, CompleteMultipartUpload,
AbortMultipartUpload, CopyObject, DeleteObject, DeleteObjects,
ListObjectsV2, ListMultipartUploads, HeadBucket.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from .base import DeleteFailure, ListPage, ObjectInfo, ObjectStore

#: kind -> (HTTP status, S3 error code, message) of the synthetic response.
ERROR_RESPONSES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError",
                 "We encountered an internal error. Please try again."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
}
KINDS = frozenset(ERROR_RESPONSES) | {"reset"}
#: Faults a store retries (within its budget); the others surface at once.
TRANSIENT = frozenset({"slowdown", "internal", "reset"})


@dataclass
class Fault:
    """One rule. Matches requests of operation ``op`` (None: any) on ``key``
    (relative to the store's prefix; a str for one key, a predicate, or None
    for any key -- requests without a key, like listings, only match None).

    The first ``skip`` matching requests pass; the next ``times`` fail
    (None: all of them). ``after_bytes``: for ``reset`` on GetObject, how
    many body bytes arrive before the connection breaks. ``action``: called
    (with no arguments) when the fault takes effect -- for a reset, at the
    moment the body breaks -- e.g. to replace the object in between.
    """
    kind: str
    op: str | None = None
    key: str | Callable[[str], bool] | None = None
    times: int | None = 1
    skip: int = 0
    after_bytes: int = 0
    action: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")

    def matches(self, op: str, key: str | None) -> bool:
        if self.op is not None and self.op != op:
            return False
        if self.key is None:
            return True
        if key is None:
            return False
        if callable(self.key):
            return bool(self.key(key))
        return self.key == key

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT


class FaultPlan:
    """A thread-safe list of faults (S3Store consults it from worker
    threads). ``injected`` records (op, key, kind) of every fault fired."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[int] = []
        self._fired: list[int] = []
        self.injected: list[tuple[str, str | None, str]] = []
        for f in faults:
            self.add(f)

    def add(self, fault: Fault) -> "FaultPlan":
        with self._lock:
            self._faults.append(fault)
            self._seen.append(0)
            self._fired.append(0)
        return self

    def take(self, op: str, key: str | None) -> Fault | None:
        """The fault for this request attempt, if any (consumes one use)."""
        with self._lock:
            if not self._faults:
                return None
            for i, f in enumerate(self._faults):
                if not f.matches(op, key):
                    continue
                self._seen[i] += 1
                if self._seen[i] <= f.skip:
                    continue
                if f.times is not None and self._fired[i] >= f.times:
                    continue
                self._fired[i] += 1
                self.injected.append((op, key, f.kind))
                return f
        return None

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(1 for _, _, k in self.injected if kind is None or k == kind)


def fire(fault: Fault) -> None:
    """Run the fault's action, if any (stores call this when it takes effect)."""
    if fault.action is not None:
        fault.action()


class FaultyStore(ObjectStore):
    """``inner`` with ``plan`` acting inside it (see the module docstring).

    The wrapper owns ``inner``: closing it closes ``inner``. ``plan`` may be
    replaced at any time (``faulty.plan = FaultPlan(...)``).
    """

    def __init__(self, inner: ObjectStore, plan: FaultPlan | None = None) -> None:
        if not hasattr(inner, "_faults"):
            raise TypeError(f"{type(inner).__name__} has no fault injection point")
        self.inner = inner
        self.plan = plan if plan is not None else FaultPlan()

    @property
    def plan(self) -> FaultPlan:
        return self.inner._faults  # type: ignore[attr-defined, no-any-return]

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        self.inner._faults = plan  # type: ignore[attr-defined]

    @property
    def bucket(self) -> str:  # type: ignore[override]
        return self.inner.bucket

    @property
    def prefix(self) -> str:  # type: ignore[override]
        return self.inner.prefix

    @property
    def stats(self) -> dict[str, Any]:
        return self.inner.stats

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    async def head(self, key: str) -> ObjectInfo | None:
        return await self.inner.head(key)

    async def get_range(self, key: str, start: int, length: int, into: Any = None,
                        *, if_match: str | None = None) -> int | bytes:
        return await self.inner.get_range(key, start, length, into, if_match=if_match)

    async def get(self, key: str) -> bytes:
        return await self.inner.get(key)

    async def put(self, key: str, data: Any, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, if_none_match: bool = False) -> str:
        return await self.inner.put(key, data, metadata=metadata,
                                    content_type=content_type,
                                    if_none_match=if_none_match)

    async def multipart_upload(self, key: str, parts: Any, *, part_size: int,
                               metadata: dict[str, str] | None = None,
                               content_type: str | None = None,
                               concurrency: int = 4) -> str:
        return await self.inner.multipart_upload(
            key, parts, part_size=part_size, metadata=metadata,
            content_type=content_type, concurrency=concurrency)

    async def multipart_compose(self, key: str, parts: Any, *,
                                metadata: dict[str, str] | None = None,
                                content_type: str | None = None,
                                concurrency: int = 4) -> str:
        return await self.inner.multipart_compose(key, parts, metadata=metadata,
                                                  content_type=content_type,
                                                  concurrency=concurrency)

    async def copy(self, src_key: str, dst_key: str, *,
                   metadata: dict[str, str] | None = None,
                   if_match: str | None = None, content_type: str | None = None,
                   size: int | None = None) -> str:
        return await self.inner.copy(src_key, dst_key, metadata=metadata,
                                     if_match=if_match, content_type=content_type,
                                     size=size)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def delete_many(self, keys: Iterable[str]) -> list[DeleteFailure]:
        return await self.inner.delete_many(keys)

    def list(self, prefix: str = "", *, delimiter: str | None = "/",
             start_after: str | None = None,
             page_size: int = 1000) -> AsyncIterator[ListPage]:
        return self.inner.list(prefix, delimiter=delimiter, start_after=start_after,
                               page_size=page_size)

    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        return await self.inner.list_multipart_uploads(prefix)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await self.inner.abort_multipart_upload(key, upload_id)

    async def close(self) -> None:
        await self.inner.close()

    # Primitives: the inner store's (multipart_upload and multipart_compose
    # are delegated whole).
    def _check_open(self) -> None:
        self.inner._check_open()

    async def _head_full(self, full: str) -> ObjectInfo | None:
        return await self.inner._head_full(full)

    async def _mpu_create(self, full: str, metadata: dict[str, str],
                          content_type: str | None) -> str:
        return await self.inner._mpu_create(full, metadata, content_type)

    async def _mpu_upload_part(self, full: str, upload_id: str, number: int,
                               views: list[memoryview]) -> str:
        return await self.inner._mpu_upload_part(full, upload_id, number, views)

    async def _mpu_complete(self, full: str, upload_id: str, etags: list[str]) -> str:
        return await self.inner._mpu_complete(full, upload_id, etags)

    async def _mpu_abort(self, full: str, upload_id: str) -> None:
        await self.inner._mpu_abort(full, upload_id)

    async def _copy_object(self, src: str, dst: str, metadata: dict[str, str] | None,
                           if_match: str | None, content_type: str | None) -> str:
        return await self.inner._copy_object(src, dst, metadata, if_match, content_type)

    async def _mpu_upload_part_copy(self, dst: str, upload_id: str, number: int,
                                    src: str, first: int, last: int,
                                    src_etag: str) -> str:
        return await self.inner._mpu_upload_part_copy(dst, upload_id, number, src,
                                                       first, last, src_etag)
