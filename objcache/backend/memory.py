"""MemoryStore: the ObjectStore interface in memory, behaving like S3.

For tests of the layers above and as the executable specification the S3
suite is compared with. What it reproduces, because code above relies on it:

* ETags as S3 computes them: MD5 hex of a single PUT's body; for multipart,
  MD5 of the concatenated binary part MD5s + ``-N``. A copy keeps the
  source's ETag (single CopyObject) or gets a multipart one (UploadPartCopy).
* Listings: ascending UTF-8 byte order (== code point order), delimiter
  grouping into common prefixes, at most ``page_size`` entries (objects +
  prefixes) per page, continuation from the last entry (a common prefix is
  never repeated on the next page), ``start_after``.
* Limits and errors: key length, metadata size, 5 GiB single PUT / copy
  (``max_copy_bytes`` lowers the copy limit, to test the multipart-copy
  fallback), multipart part sizes (EntityTooSmall at completion), self-copy
  without new metadata, If-Match / If-None-Match, missing bucket.
* Request accounting like S3Store: one ``stats["requests"]`` count per
  simulated HTTP request, retries and GET resumes counted the same way, at
  most ``max_concurrency`` calls running (the rest wait), optional
  ``latency`` per request, and fault injection below the retry layer
  (``faults.FaultyStore``).

Several stores may share one :class:`MemoryServer` (different prefixes, or
a second store on a bucket that does not exist). Everything runs on the
event loop; big copies block it briefly (this is a test store).
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

from . import faults as _faults
from .base import (
    MAX_DELETE_BATCH, MAX_LIST_PAGE, MAX_PUT_BYTES, MIN_PART_BYTES, AccessDenied,
    BackendError, DeleteFailure, InvalidRequest, ListPage, NoSuchBucket, NotFound,
    ObjectInfo, ObjectStore, PreconditionFailed, Stats, StoreClosed, TransientError,
    byte_views, check_metadata, check_range, full_key, list_prefix, make_error,
    md5_etag, multipart_etag, normalize_prefix, unquote_etag, views_nbytes,
    writable_view, xml_safe)

T = TypeVar("T")


@dataclass
class _Object:
    data: bytes
    etag: str
    mtime: float
    metadata: dict[str, str]
    content_type: str


@dataclass
class _Upload:
    key: str
    metadata: dict[str, str]
    content_type: str
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)


class _Bucket:
    def __init__(self) -> None:
        self.objects: dict[str, _Object] = {}
        self.order: list[str] = []          # keys, sorted (== UTF-8 byte order)
        self.uploads: dict[str, _Upload] = {}

    def store(self, key: str, obj: _Object) -> None:
        if key not in self.objects:
            bisect.insort(self.order, key)
        self.objects[key] = obj

    def remove(self, key: str) -> None:
        if self.objects.pop(key, None) is not None:
            del self.order[bisect.bisect_left(self.order, key)]


def _now() -> float:
    return float(int(time.time()))  # S3's Last-Modified has whole seconds


DEFAULT_CONTENT_TYPE = "binary/octet-stream"


class MemoryServer:
    """The in-memory "S3 service": buckets of objects and pending uploads.

    ``put_object``/``get_object`` are a synchronous back door for tests
    (another writer changing an object behind a store's back).
    """

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}

    def create_bucket(self, name: str) -> str:
        self.buckets.setdefault(name, _Bucket())
        return name

    def delete_bucket(self, name: str) -> None:
        self.buckets.pop(name, None)

    def put_object(self, bucket: str, key: str, data: bytes,
                   metadata: dict[str, str] | None = None) -> str:
        etag = hashlib.md5(data).hexdigest()
        self.buckets[bucket].store(key, _Object(bytes(data), etag, _now(),
                                                dict(metadata or {}),
                                                DEFAULT_CONTENT_TYPE))
        return etag

    def get_object(self, bucket: str, key: str) -> bytes:
        return self.buckets[bucket].objects[key].data


class MemoryStore(ObjectStore):
    """An ObjectStore in memory (see the module docstring).

    ``server``: share a MemoryServer (default: a private one holding
    ``bucket``). ``latency``: seconds added to every simulated request.
    ``max_attempts``: attempts per request for transient (injected) faults,
    like S3Store's. ``empty_multipart_etag``: answer CompleteMultipartUpload
    without an ETag, as Ceph RGW 16 does. ``faults``: a FaultPlan acting
    below the retry layer (the same as wrapping in ``FaultyStore``).
    """

    def __init__(self, bucket: str = "bucket", prefix: str = "", *,
                 server: MemoryServer | None = None, latency: float = 0.0,
                 max_concurrency: int = 16, max_attempts: int = 5,
                 max_copy_bytes: int = MAX_PUT_BYTES,
                 multipart_copy_threshold: int | None = None,
                 copy_part_size: int | None = None,
                 empty_multipart_etag: bool = False,
                 faults: _faults.FaultPlan | None = None) -> None:
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        if server is None:
            server = MemoryServer()
            server.create_bucket(bucket)
        self.server = server
        self.latency = latency
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.max_copy_bytes = max_copy_bytes
        if multipart_copy_threshold is not None:
            self.multipart_copy_threshold = multipart_copy_threshold
        if copy_part_size is not None:
            self.copy_part_size = copy_part_size
        self.empty_multipart_etag = empty_multipart_etag
        self._faults = faults  # also set by FaultyStore
        self._slots = asyncio.Semaphore(max_concurrency)
        self._stats = Stats()
        self._closed = False

    def __repr__(self) -> str:
        return f"MemoryStore(s3://{self.bucket}/{self.prefix})"

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    # -- plumbing ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self!r} is closed", bucket=self.bucket)

    def _rel(self, full: str | None) -> str | None:
        if full is None:
            return None
        return full[len(self.prefix):] if full.startswith(self.prefix) else full

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of max_concurrency slots, held for a whole call (its retries
        included), as S3Store holds a worker thread."""
        self._check_open()
        async with self._slots:
            self._stats.enter()
            try:
                yield
            finally:
                self._stats.leave()

    async def _request(self, op: str, full: str | None,
                       serve: Callable[[_Bucket, Any], T]) -> T:
        """One simulated HTTP request, with S3Store's retry rules: injected
        transient faults are retried up to max_attempts attempts, then
        TransientError; everything else surfaces at once. ``serve`` gets the
        bucket and the reset fault of this attempt (GetObject only)."""
        attempt = 0
        while True:
            attempt += 1
            self._stats.request(op)
            if attempt > 1:
                self._stats.add("retries")
            if self.latency:
                await asyncio.sleep(self.latency)
            plan = self._faults
            fault = plan.take(op, self._rel(full)) if plan is not None else None
            reset = None
            if fault is not None:
                if fault.kind == "reset" and op == "GetObject":
                    reset = fault  # breaks the body in serve's caller
                else:
                    _faults.fire(fault)
                    if fault.kind == "access_denied":
                        raise self._fault_error(AccessDenied, op, full, fault)
                    if attempt < self.max_attempts:
                        await asyncio.sleep(0.001 * 2 ** attempt)
                        continue
                    raise self._fault_error(TransientError, op, full, fault)
            bucket = self.server.buckets.get(self.bucket)
            if bucket is None:
                raise make_error(NoSuchBucket, op, self.bucket, full, "NoSuchBucket",
                                 404, "The specified bucket does not exist")
            return serve(bucket, reset)

    def _fault_error(self, cls: type[BackendError], op: str, full: str | None,
                     fault: _faults.Fault) -> BackendError:
        if fault.kind == "reset":
            return make_error(cls, op, self.bucket, full, "ConnectionReset", None,
                              f"connection reset; gave up after {self.max_attempts} "
                              f"attempts")
        status, code, message = _faults.ERROR_RESPONSES[fault.kind]
        if cls is TransientError:
            message += f" (gave up after {self.max_attempts} attempts)"
        return make_error(cls, op, self.bucket, full, code, status, message)

    def _info(self, full: str, obj: _Object, with_meta: bool = True) -> ObjectInfo:
        return ObjectInfo(key=self._rel(full) or "", size=len(obj.data), etag=obj.etag,
                          mtime=obj.mtime,
                          metadata=dict(obj.metadata) if with_meta else {},
                          content_type=obj.content_type if with_meta else None)

    # -- reads -------------------------------------------------------------
    async def head(self, key: str) -> ObjectInfo | None:
        full = full_key(self.prefix, key)
        async with self._slot():
            return await self._head_unslotted(full)

    async def _head_full(self, full: str) -> ObjectInfo | None:
        async with self._slot():
            return await self._head_unslotted(full)

    async def _head_unslotted(self, full: str) -> ObjectInfo | None:
        def serve(b: _Bucket, _: Any) -> ObjectInfo | None:
            obj = b.objects.get(full)
            return None if obj is None else self._info(full, obj)
        return await self._request("HeadObject", full, serve)

    async def get_range(self, key: str, start: int, length: int, into: Any = None,
                        *, if_match: str | None = None) -> int | bytes:
        full = full_key(self.prefix, key)
        check_range(start, length)
        dst = writable_view(into, length) if into is not None else None
        if length == 0:
            return 0 if dst is not None else b""
        async with self._slot():
            n, buf = await self._read(full, start, length, dst, if_match)
        return n if dst is not None else bytes(buf[:n])

    async def get(self, key: str) -> bytes:
        full = full_key(self.prefix, key)
        async with self._slot():
            n, buf = await self._read(full, 0, None, None, None)
        return bytes(buf[:n])

    async def _read(self, full: str, start: int, length: int | None,
                    dst: memoryview | None, if_match: str | None
                    ) -> tuple[int, memoryview]:
        """The resume loop of S3Store._read, on simulated requests: a body
        broken by a ``reset`` fault is continued with a ranged GET pinned to
        the first answer's ETag; a replaced object restarts the read (or,
        with if_match, is PreconditionFailed)."""
        want_etag = unquote_etag(if_match) if if_match is not None else None
        pinned = want_etag
        got = 0
        breaks = 0
        buf = dst
        while True:
            offset = start + got

            def serve(b: _Bucket, reset: Any) -> tuple[str, bytes, Any] | None:
                obj = b.objects.get(full)
                if obj is None:
                    raise make_error(NotFound, "GetObject", self.bucket, full,
                                     "NoSuchKey", 404, "The specified key does not exist.")
                if pinned is not None and obj.etag != pinned:
                    raise make_error(PreconditionFailed, "GetObject", self.bucket, full,
                                     "PreconditionFailed", 412,
                                     "At least one of the pre-conditions you "
                                     "specified did not hold")
                size = len(obj.data)
                if offset >= size and (offset > 0 or length is not None):
                    return None  # 416: nothing there
                end = size if length is None else min(size, start + length)
                return obj.etag, obj.data[offset:end], reset

            try:
                answer = await self._request("GetObject", full, serve)
            except PreconditionFailed:
                if want_etag is not None or pinned is None:
                    raise
                # Replaced between a broken body and its resumption: the
                # caller did not pin a version, so read the new one whole.
                pinned, got, buf = None, 0, dst
                continue
            if answer is None:
                return got, buf if buf is not None else memoryview(bytearray(0))
            etag, body, reset = answer
            if buf is None:
                buf = memoryview(bytearray(len(body)))
            room = buf.nbytes - got
            if len(body) > room:
                raise BackendError(f"GetObject s3://{self.bucket}/{full}: the object "
                                   f"grew during the read", bucket=self.bucket, key=full)
            deliver = len(body) if reset is None else min(reset.after_bytes, len(body))
            buf[got:got + deliver] = body[:deliver]
            got += deliver
            self._stats.add("bytes_in", deliver)
            if deliver == len(body):
                return got, buf
            _faults.fire(reset)
            breaks += 1
            if breaks >= self.max_attempts:
                raise self._fault_error(TransientError, "GetObject", full, reset)
            self._stats.add("resumes")
            pinned = etag

    # -- writes ------------------------------------------------------------
    async def put(self, key: str, data: Any, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, if_none_match: bool = False) -> str:
        full = full_key(self.prefix, key)
        meta = check_metadata(metadata)
        views = byte_views(data)
        total = views_nbytes(views)
        if total > MAX_PUT_BYTES:
            raise InvalidRequest(f"{total} bytes is over S3's 5 GiB single-PUT limit: "
                                 f"use multipart_upload", bucket=self.bucket, key=full)

        def serve(b: _Bucket, _: Any) -> str:
            if if_none_match and full in b.objects:
                raise make_error(PreconditionFailed, "PutObject", self.bucket, full,
                                 "PreconditionFailed", 412,
                                 "At least one of the pre-conditions you specified "
                                 "did not hold")
            body = b"".join(views)
            etag = md5_etag([memoryview(body)])
            b.store(full, _Object(body, etag, _now(), meta,
                                  content_type or DEFAULT_CONTENT_TYPE))
            self._stats.add("bytes_out", total)
            return etag

        async with self._slot():
            return await self._request("PutObject", full, serve)

    async def _mpu_create(self, full: str, metadata: dict[str, str],
                          content_type: str | None) -> str:
        def serve(b: _Bucket, _: Any) -> str:
            upload_id = uuid.uuid4().hex
            b.uploads[upload_id] = _Upload(full, metadata,
                                           content_type or DEFAULT_CONTENT_TYPE)
            return upload_id
        async with self._slot():
            return await self._request("CreateMultipartUpload", full, serve)

    def _upload(self, b: _Bucket, op: str, full: str, upload_id: str) -> _Upload:
        up = b.uploads.get(upload_id)
        if up is None or up.key != full:
            raise make_error(NotFound, op, self.bucket, full, "NoSuchUpload", 404,
                             "The specified multipart upload does not exist.")
        return up

    async def _mpu_upload_part(self, full: str, upload_id: str, number: int,
                               views: list[memoryview]) -> str:
        def serve(b: _Bucket, _: Any) -> str:
            up = self._upload(b, "UploadPart", full, upload_id)
            body = b"".join(views)
            etag = md5_etag([memoryview(body)])
            up.parts[number] = (body, etag)
            self._stats.add("bytes_out", len(body))
            return etag
        async with self._slot():
            return await self._request("UploadPart", full, serve)

    async def _mpu_upload_part_copy(self, dst: str, upload_id: str, number: int,
                                    src: str, first: int, last: int,
                                    src_etag: str) -> str:
        def serve(b: _Bucket, _: Any) -> str:
            up = self._upload(b, "UploadPartCopy", dst, upload_id)
            obj = b.objects.get(src)
            if obj is None:
                raise make_error(NotFound, "UploadPartCopy", self.bucket, src,
                                 "NoSuchKey", 404, "The specified key does not exist.")
            if obj.etag != src_etag:
                raise make_error(PreconditionFailed, "UploadPartCopy", self.bucket, src,
                                 "PreconditionFailed", 412,
                                 "At least one of the pre-conditions you specified "
                                 "did not hold")
            if last >= len(obj.data):
                raise make_error(InvalidRequest, "UploadPartCopy", self.bucket, src,
                                 "InvalidRange", 416, "The requested range is not "
                                 "satisfiable")
            body = obj.data[first:last + 1]
            etag = md5_etag([memoryview(body)])
            up.parts[number] = (body, etag)
            return etag
        async with self._slot():
            return await self._request("UploadPartCopy", dst, serve)

    async def _mpu_complete(self, full: str, upload_id: str, etags: list[str]) -> str:
        def serve(b: _Bucket, _: Any) -> str:
            up = self._upload(b, "CompleteMultipartUpload", full, upload_id)
            numbers = list(range(1, len(etags) + 1))
            for n, etag in zip(numbers, etags):
                if n not in up.parts or up.parts[n][1] != etag:
                    raise make_error(InvalidRequest, "CompleteMultipartUpload",
                                     self.bucket, full, "InvalidPart", 400,
                                     f"part {n} was not uploaded with ETag {etag}")
                if n != numbers[-1] and len(up.parts[n][0]) < MIN_PART_BYTES:
                    raise make_error(InvalidRequest, "CompleteMultipartUpload",
                                     self.bucket, full, "EntityTooSmall", 400,
                                     "Your proposed upload is smaller than the "
                                     "minimum allowed object size.")
            if not etags:
                raise make_error(InvalidRequest, "CompleteMultipartUpload", self.bucket,
                                 full, "MalformedXML", 400, "no parts")
            body = b"".join(up.parts[n][0] for n in numbers)
            etag = multipart_etag(etags) or ""
            del b.uploads[upload_id]
            b.store(full, _Object(body, etag, _now(), up.metadata, up.content_type))
            return "" if self.empty_multipart_etag else etag
        async with self._slot():
            return await self._request("CompleteMultipartUpload", full, serve)

    async def _mpu_abort(self, full: str, upload_id: str) -> None:
        def serve(b: _Bucket, _: Any) -> None:
            b.uploads.pop(upload_id, None)
        async with self._slot():
            await self._request("AbortMultipartUpload", full, serve)

    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        full_prefix = list_prefix(self.prefix, prefix)

        def serve(b: _Bucket, _: Any) -> list[tuple[str, str]]:
            return sorted((self._rel(u.key) or "", uid) for uid, u in b.uploads.items()
                          if u.key.startswith(full_prefix))
        async with self._slot():
            return await self._request("ListMultipartUploads", None, serve)

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await self._mpu_abort(full_key(self.prefix, key), upload_id)

    async def _copy_object(self, src: str, dst: str, metadata: dict[str, str] | None,
                           if_match: str | None, content_type: str | None) -> str:
        def serve(b: _Bucket, _: Any) -> str:
            obj = b.objects.get(src)
            if obj is None:
                raise make_error(NotFound, "CopyObject", self.bucket, src, "NoSuchKey",
                                 404, "The specified key does not exist.")
            if if_match is not None and obj.etag != if_match:
                raise make_error(PreconditionFailed, "CopyObject", self.bucket, src,
                                 "PreconditionFailed", 412,
                                 "At least one of the pre-conditions you specified "
                                 "did not hold")
            if len(obj.data) > self.max_copy_bytes:
                raise make_error(InvalidRequest, "CopyObject", self.bucket, src,
                                 "InvalidRequest", 400,
                                 "The specified copy source is larger than the "
                                 "maximum allowable size for a copy source")
            if metadata is None:
                meta, ctype = dict(obj.metadata), obj.content_type
            else:
                meta, ctype = metadata, content_type or DEFAULT_CONTENT_TYPE
            b.store(dst, _Object(obj.data, obj.etag, _now(), meta, ctype))
            return obj.etag
        async with self._slot():
            return await self._request("CopyObject", dst, serve)

    async def delete(self, key: str) -> None:
        full = full_key(self.prefix, key)

        def serve(b: _Bucket, _: Any) -> None:
            b.remove(full)
        async with self._slot():
            await self._request("DeleteObject", full, serve)

    async def delete_many(self, keys: Iterable[str]) -> list[DeleteFailure]:
        keys = list(keys)
        fulls = [full_key(self.prefix, k) for k in keys if xml_safe(k)]
        failures: list[DeleteFailure] = []
        for k in keys:
            if not xml_safe(k):  # as S3Store: one DeleteObject each
                try:
                    await self.delete(k)
                except (AccessDenied, InvalidRequest) as exc:
                    failures.append(DeleteFailure(k, exc.code or "", str(exc)))
        for i in range(0, len(fulls), MAX_DELETE_BATCH):
            batch = fulls[i:i + MAX_DELETE_BATCH]

            def serve(b: _Bucket, _: Any, batch: list[str] = batch) -> None:
                for full in batch:
                    b.remove(full)
            async with self._slot():
                await self._request("DeleteObjects", None, serve)
        return failures

    # -- listing -----------------------------------------------------------
    async def list(self, prefix: str = "", *, delimiter: str | None = "/",
                   start_after: str | None = None,
                   page_size: int = MAX_LIST_PAGE) -> AsyncIterator[ListPage]:
        full_prefix = list_prefix(self.prefix, prefix)
        if not isinstance(page_size, int) or page_size < 1:
            raise InvalidRequest(f"page_size must be >= 1, not {page_size!r}")
        max_keys = min(page_size, MAX_LIST_PAGE)
        marker = self.prefix + start_after if start_after else None
        delimiter = delimiter or None
        while True:
            def serve(b: _Bucket, _: Any, marker: str | None = marker
                      ) -> tuple[list[ObjectInfo], list[str], str | None]:
                return self._list_page(b, full_prefix, delimiter, marker, max_keys)
            async with self._slot():
                objects, prefixes, marker = await self._request("ListObjectsV2", None,
                                                                serve)
            if objects or prefixes:
                yield ListPage(objects, prefixes)
            if marker is None:
                return

    def _list_page(self, b: _Bucket, full_prefix: str, delimiter: str | None,
                   marker: str | None, max_keys: int
                   ) -> tuple[list[ObjectInfo], list[str], str | None]:
        """One ListObjectsV2 page, as S3 computes it: the entries (keys, and
        common prefixes standing for every key under them) that sort after
        ``marker`` (start_after, or the last entry of the previous page: the
        continuation), at most max_keys of them. A common prefix that sorts
        at or before the marker is skipped with all its keys -- so a prefix
        is never repeated on the next page, and a start_after inside a
        group skips that group (RGW and moto agree). Returns the page and
        the next marker (None: not truncated)."""
        order = b.order
        pos = bisect.bisect_left(order, full_prefix)
        if marker is not None:
            pos = max(pos, bisect.bisect_right(order, marker))
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        last: str | None = None
        while pos < len(order):
            key = order[pos]
            if not key.startswith(full_prefix):
                break
            group = None
            if delimiter is not None:
                i = key.find(delimiter, len(full_prefix))
                if i >= 0:
                    group = key[:i + len(delimiter)]
            if group is not None and marker is not None and group <= marker:
                while pos < len(order) and order[pos].startswith(group):
                    pos += 1
                continue
            if len(objects) + len(prefixes) == max_keys:
                return objects, prefixes, last  # truncated
            if group is not None:
                prefixes.append(self._rel(group) or "")
                last = group
                while pos < len(order) and order[pos].startswith(group):
                    pos += 1
            else:
                objects.append(self._info(key, b.objects[key], with_meta=False))
                last = key
                pos += 1
        return objects, prefixes, None

    # -- lifetime ----------------------------------------------------------
    async def close(self) -> None:
        self._closed = True
