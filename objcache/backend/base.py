"""The object-store interface every backend implements, its errors and values.

Everything above this package (cache, meta, write-back) talks to S3 through
:class:`ObjectStore`. Two implementations behave identically and are tested
by one parametrized suite (``tests/backend``):

* :class:`objcache.backend.s3.S3Store` -- boto3 in a bounded thread pool.
* :class:`objcache.backend.memory.MemoryStore` -- in memory, for tests.

The full contract (error model, retries, ETag rules, odd keys) is in
``docs/backend.md``; the invariants that code relies on are repeated where
they matter below.

Keys
    Every key passed in is *relative to the store's prefix*; the store adds
    the prefix and every key it returns (ObjectInfo.key, common prefixes) is
    relative again. Keys are str, compared and listed by their UTF-8 bytes,
    and go to S3 byte-exactly: ``a//b``, ``./x``, ``../x``, spaces, ``+``,
    ``%``, unicode -- nothing is normalised. The full key (prefix + key) is at
    most 1024 UTF-8 bytes.

ETags
    Returned WITHOUT the surrounding double quotes S3 puts on the wire:
    ``"9e107d9d372bb6826bd81d3542a419d6"`` is returned as
    ``9e107d9d372bb6826bd81d3542a419d6``. Pass them back (``if_match``) in the
    same form. Single PUT: MD5 hex of the body. Multipart: MD5 hex of the
    concatenated binary part MD5s, then ``-N`` (N = number of parts).

Buffers
    A buffer passed IN (``put`` data, ``multipart_upload`` pieces, the
    ``into`` of ``get_range``) stays owned by the caller, and the store uses
    it only until the coroutine returns or raises -- including when the
    coroutine is cancelled: the cancellation is held back until no worker
    thread touches the buffer any more. The caller must not modify data being
    uploaded (a retry re-sends it) nor read ``into`` before ``get_range``
    returns.

Metadata
    User metadata without the ``x-amz-meta-`` prefix, keys lower-cased (the
    boto3 convention). objcache stores s3fs's names: ``mode``, ``uid``,
    ``gid``, ``mtime`` (decimal strings).
"""
from __future__ import annotations

import abc
import asyncio
import collections.abc
import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

log = logging.getLogger("objcache.backend")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# S3 limits (AWS documents them; RGW and moto follow). Checked on the client
# side by every implementation so that all of them fail the same way, before
# any request is sent.
MAX_KEY_BYTES = 1024            # full key (prefix + key), UTF-8
MAX_METADATA_BYTES = 2 * KiB    # sum of len(name) + len(value) of user metadata
MAX_PUT_BYTES = 5 * GiB         # one PutObject / CopyObject
MIN_PART_BYTES = 5 * MiB        # every multipart part but the last
MAX_PART_BYTES = 5 * GiB
MAX_PARTS = 10_000
MAX_LIST_PAGE = 1000            # ListObjectsV2 MaxKeys ceiling
MAX_DELETE_BATCH = 1000         # keys per DeleteObjects request


# --------------------------------------------------------------------------
# Errors


class BackendError(Exception):
    """Base of every error an ObjectStore raises.

    ``bucket``/``key`` name the object (the full key, prefix included),
    ``operation`` the S3 operation (``GetObject`` ...), ``code`` the S3
    error code (``NoSuchKey``, ``SlowDown`` ...) and ``status`` the HTTP
    status, when known. The message never contains credentials.
    """

    def __init__(self, message: str, *, bucket: str | None = None,
                 key: str | None = None, operation: str | None = None,
                 code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key
        self.operation = operation
        self.code = code
        self.status = status


class NotFound(BackendError):
    """The object (or multipart upload) does not exist. Never retried."""


class NoSuchBucket(BackendError):
    """The bucket does not exist: a configuration error. Never retried."""


class PreconditionFailed(BackendError):
    """``if_match`` / ``if_none_match`` did not hold: the object changed (or
    exists). Never retried."""


class AccessDenied(BackendError):
    """The credentials may not do this (403). Never retried."""


class InvalidCredentials(AccessDenied):
    """The credentials themselves are wrong (InvalidAccessKeyId,
    SignatureDoesNotMatch, expired token). Never retried."""


class InvalidRequest(BackendError, ValueError):
    """The request breaks an S3 rule or an argument is invalid (key too long,
    part too small, bad range, ...). Raised before sending when the store can
    tell; never retried. Also a ValueError."""


class TransientError(BackendError):
    """A transient failure (5xx, SlowDown/throttling, connection reset, read
    timeout) that persisted through every retry. The operation may or may not
    have taken effect on the server (a PUT whose answer was lost)."""


class StoreClosed(BackendError):
    """The store was closed; no request was sent."""


def make_error(cls: type[BackendError], operation: str, bucket: str,
               key: str | None, code: str | None, status: int | None,
               message: str | None = None) -> BackendError:
    """An error whose message says what failed where, e.g.
    ``GetObject s3://bkt/a/b: AccessDenied (403): Access Denied``."""
    where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
    text = f"{operation} {where}: {code or 'error'}"
    if status is not None:
        text += f" ({status})"
    if message:
        text += f": {message}"
    return cls(text, bucket=bucket, key=key, operation=operation, code=code,
               status=status)


# --------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object. ``key`` is relative to the store's prefix; ``etag`` has no
    quotes; ``mtime`` is S3's Last-Modified in seconds since the epoch (S3's
    own clock, whole seconds on most servers -- NOT the ``mtime`` user
    metadata); ``metadata`` is empty for objects that come from a listing
    (ListObjectsV2 does not return it: HEAD the object)."""
    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One ListObjectsV2 page: objects and (with a delimiter) common
    prefixes, both relative to the store's prefix, each in S3 order
    (ascending UTF-8 bytes). Together at most ``page_size`` entries."""
    objects: list[ObjectInfo]
    common_prefixes: list[str]


@dataclass(frozen=True, slots=True)
class DeleteFailure:
    """A key that ``delete_many`` could not delete, with S3's reason."""
    key: str
    code: str
    message: str


# --------------------------------------------------------------------------
# Statistics


class Stats:
    """Counters of one store, updated from worker threads (hence the lock).

    ``requests``: HTTP requests sent per S3 operation (every attempt, so a
    retried GET counts twice: compare with the server's own count);
    ``retries``: requests re-sent after a transient failure; ``resumes``:
    ranged GETs re-issued after the body broke mid-way; ``bytes_in`` /
    ``bytes_out``: object bytes received / sent; ``in_flight`` and
    ``peak_in_flight``: store calls holding a worker slot now / at most so
    far (never above max_concurrency).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: collections.Counter[str] = collections.Counter()
        self._n = {"retries": 0, "resumes": 0, "bytes_in": 0, "bytes_out": 0,
                   "in_flight": 0, "peak_in_flight": 0}

    def request(self, operation: str) -> None:
        with self._lock:
            self._requests[operation] += 1

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._n[name] += n

    def enter(self) -> None:
        with self._lock:
            self._n["in_flight"] += 1
            if self._n["in_flight"] > self._n["peak_in_flight"]:
                self._n["peak_in_flight"] = self._n["in_flight"]

    def leave(self) -> None:
        with self._lock:
            self._n["in_flight"] -= 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self._requests), **self._n}


# --------------------------------------------------------------------------
# Argument checks shared by every implementation (same failures everywhere)


@dataclass(frozen=True)
class CopyPart:
    """A ``multipart_compose`` part copied server-side: ``length`` bytes
    from ``start`` of object ``key`` (relative to the store's prefix), which
    must have ETag ``etag``."""
    key: str
    start: int
    length: int
    etag: str


def normalize_prefix(prefix: str) -> str:
    """``""`` stays the bucket root; anything else ends with exactly the
    ``/`` the caller gave or one added: ``"data"`` -> ``"data/"``."""
    if not isinstance(prefix, str):
        raise InvalidRequest(f"prefix must be str, not {type(prefix).__name__}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix


def full_key(prefix: str, key: str, *, what: str = "key") -> str:
    """prefix + key, checked: a non-empty str, valid UTF-8 (no lone
    surrogates), at most MAX_KEY_BYTES bytes in full."""
    if not isinstance(key, str):
        raise InvalidRequest(f"{what} must be str, not {type(key).__name__}")
    if not key:
        raise InvalidRequest(f"{what} must not be empty")
    full = prefix + key
    try:
        n = len(full.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{what} {key!r} is not valid UTF-8 text: {exc}") from None
    if n > MAX_KEY_BYTES:
        raise InvalidRequest(f"{what} is {n} bytes with the prefix; S3 allows "
                             f"{MAX_KEY_BYTES}", key=full)
    return full


def list_prefix(prefix: str, sub: str) -> str:
    """The full ListObjectsV2 prefix (may be empty: the whole store)."""
    if not isinstance(sub, str):
        raise InvalidRequest(f"list prefix must be str, not {type(sub).__name__}")
    full = prefix + sub
    try:
        full.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"list prefix {sub!r} is not valid UTF-8: {exc}") from None
    return full


_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """User metadata as it will be stored: names lower-cased; names must be
    HTTP token characters, values printable ASCII without leading/trailing
    spaces (both travel as HTTP headers), 2 KiB in total."""
    if metadata is None:
        return {}
    if not isinstance(metadata, collections.abc.Mapping):
        raise InvalidRequest("metadata must be a dict of str to str")
    out: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequest(f"metadata {name!r}: names and values must be str")
        low = name.lower()
        if not low or not set(low) <= _TOKEN:
            raise InvalidRequest(f"metadata name {name!r}: only letters, digits "
                                 f"and !#$%&'*+-.^_`|~ are allowed")
        if low in out:
            raise InvalidRequest(f"metadata name {name!r} given twice (names "
                                 f"are case-insensitive)")
        if not value.isascii() or not value.isprintable() or value != value.strip():
            raise InvalidRequest(f"metadata {name!r}: the value must be printable "
                                 f"ASCII without leading/trailing spaces")
        total += len(low) + len(value)
        out[low] = value
    if total > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata is {total} bytes; S3 allows "
                             f"{MAX_METADATA_BYTES}")
    return out


# Characters XML 1.0 cannot carry (and \r, which XML parsers turn into \n):
# keys with them cannot go into a DeleteObjects request body.
_XML_UNSAFE = frozenset(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, 0x0D,
                                          *range(0x0E, 0x20), 0xFFFE, 0xFFFF))


def xml_safe(key: str) -> bool:
    """True if ``key`` survives an XML request body (DeleteObjects)."""
    return not (_XML_UNSAFE & set(key))


def check_range(start: int, length: int) -> None:
    if not isinstance(start, int) or not isinstance(length, int):
        raise InvalidRequest("start and length must be int")
    if start < 0 or length < 0:
        raise InvalidRequest(f"bad range: start={start} length={length}")


def writable_view(into: Any, length: int) -> memoryview:
    """A flat writable byte view of ``into`` (bytearray, memoryview, numpy
    array, mmap ...) with room for ``length`` bytes."""
    try:
        mv = memoryview(into)
    except TypeError:
        raise InvalidRequest(f"into must support the buffer protocol, not "
                             f"{type(into).__name__}") from None
    if mv.readonly:
        raise InvalidRequest("into is read-only")
    if not mv.c_contiguous:
        raise InvalidRequest("into must be C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    if mv.nbytes < length:
        raise InvalidRequest(f"into has {mv.nbytes} bytes, {length} requested")
    return mv


def byte_views(data: Any) -> list[memoryview]:
    """``data`` (one bytes-like or a list/tuple of them) as flat byte views,
    empty ones dropped. No copy."""
    items = data if isinstance(data, (list, tuple)) else [data]
    views = []
    for item in items:
        try:
            mv = memoryview(item)
        except TypeError:
            raise InvalidRequest(f"data must be bytes-like or a list of "
                                 f"bytes-like, not {type(item).__name__}") from None
        if not mv.c_contiguous:
            raise InvalidRequest("data buffers must be C-contiguous")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.nbytes:
            views.append(mv)
    return views


def unquote_etag(etag: str | None) -> str:
    """``'"abc"'`` -> ``'abc'`` (S3 quotes ETags on the wire; RGW sometimes
    does not, in CopyObject results)."""
    if not etag:
        return ""
    if len(etag) >= 2 and etag[0] == '"' and etag[-1] == '"':
        return etag[1:-1]
    return etag


def quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def md5_etag(views: Iterable[memoryview]) -> str:
    h = hashlib.md5()
    for v in views:
        h.update(v)
    return h.hexdigest()


def multipart_etag(part_etags: list[str]) -> str | None:
    """The ETag S3 (and RGW) compute for a completed multipart upload from
    the part ETags: MD5 of the concatenated binary part MD5s, ``-N``. None
    if a part ETag is not an MD5 (e.g. SSE-KMS on AWS)."""
    h = hashlib.md5()
    for etag in part_etags:
        try:
            raw = bytes.fromhex(etag)
        except ValueError:
            return None
        if len(raw) != 16:
            return None
        h.update(raw)
    return f"{h.hexdigest()}-{len(part_etags)}"


def check_part_size(part_size: int) -> None:
    if not isinstance(part_size, int) or not MIN_PART_BYTES <= part_size <= MAX_PART_BYTES:
        raise InvalidRequest(
            f"part_size must be between {MIN_PART_BYTES} (5 MiB) and "
            f"{MAX_PART_BYTES} (5 GiB) bytes, not {part_size!r}")


async def cut_parts(pieces: Any, part_size: int) -> AsyncIterator[list[memoryview]]:
    """Cut a stream of bytes-like pieces (list, iterable or async iterable)
    into parts of exactly ``part_size`` bytes (the last may be shorter, and
    an empty stream is one empty part). A part is a list of views into the
    pieces: nothing is copied, so a piece must stay unchanged until its part
    is uploaded."""
    async def each() -> AsyncIterator[Any]:
        if isinstance(pieces, AsyncIterable):
            async for p in pieces:
                yield p
        else:
            for p in pieces:
                yield p

    current: list[memoryview] = []
    have = 0
    emitted = False
    async for piece in each():
        for mv in byte_views(piece):
            while mv.nbytes:
                take = min(mv.nbytes, part_size - have)
                current.append(mv[:take])
                have += take
                mv = mv[take:]
                if have == part_size:
                    yield current
                    emitted = True
                    current, have = [], 0
    if current or not emitted:
        yield current


def views_nbytes(views: list[memoryview]) -> int:
    return sum(v.nbytes for v in views)


# --------------------------------------------------------------------------
# Running blocking work without losing the caller's buffers on cancellation


async def await_uncancellable(fut: Awaitable[Any], on_cancel: Callable[[], None] | None = None) -> Any:
    """Await ``fut`` (e.g. a worker thread's future); if the awaiting task is
    cancelled, call ``on_cancel`` (ask the worker to stop early), still wait
    for ``fut`` to finish, then re-raise CancelledError.

    Why: the worker may be reading or writing the caller's buffers; returning
    to the caller before it stops would let the caller reuse a buffer the
    worker still writes into (a cache page being recycled).
    """
    fut = asyncio.ensure_future(fut)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except BaseException:  # noqa: BLE001 -- the worker's own failure
                break
        if not fut.cancelled():
            fut.exception()  # retrieved: no "never retrieved" warning
        raise


# --------------------------------------------------------------------------
# The interface


class ObjectStore(abc.ABC):
    """Asynchronous access to the objects under ``bucket``/``prefix``.

    Every method is a coroutine; one store is used from one event loop.
    Calls may run concurrently; the store bounds how many requests are in
    flight (``max_concurrency``), and callers beyond that wait their turn
    (no unbounded queue anywhere in the store).

    Error model (docs/backend.md): transient failures are retried inside the
    store and surface as TransientError only once the retries are exhausted;
    NotFound, NoSuchBucket, PreconditionFailed, AccessDenied (incl.
    InvalidCredentials) and InvalidRequest are never retried.
    """

    bucket: str
    prefix: str

    # -- reads -------------------------------------------------------------
    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag, mtime and user metadata; None if there
        is no such object (a missing bucket raises NoSuchBucket)."""

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, length: int, into: Any = None,
                        *, if_match: str | None = None) -> int | bytes:
        """Read ``length`` bytes from ``start`` (one ranged GET).

        Short at the end of the object like ``pread``: returns
        ``min(length, size - start)`` bytes, nothing (0 / ``b""``) when
        ``start >= size``; ``length == 0`` sends no request.

        With ``into`` (a writable C-contiguous buffer of at least ``length``
        bytes, e.g. a cache-arena page or a numpy array) the body is streamed
        straight into ``into[0:n]`` and ``n`` is returned; without it the
        bytes are returned. ``if_match``: PreconditionFailed if the object's
        ETag is not this one. NotFound if the object does not exist.

        If the body breaks mid-way the rest is fetched with another ranged
        GET pinned to the first response's ETag (If-Match), so the result
        is never spliced from two versions: an object replaced in between is
        read again from the start (or, with ``if_match``, PreconditionFailed).
        """

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """The whole object (resumed like get_range if the body breaks)."""

    # -- writes ------------------------------------------------------------
    @abc.abstractmethod
    async def put(self, key: str, data: Any, *, metadata: dict[str, str] | None = None,
                  content_type: str | None = None, if_none_match: bool = False) -> str:
        """Store ``data`` (bytes-like, or a list of bytes-like sent as one
        body without joining) as the object; returns its ETag. At most 5 GiB
        (larger: ``multipart_upload``). ``if_none_match``: PreconditionFailed
        if the object already exists."""

    async def multipart_upload(self, key: str, parts: Any, *, part_size: int,
                               metadata: dict[str, str] | None = None,
                               content_type: str | None = None,
                               concurrency: int = 4) -> str:
        """Upload a large object in parts; returns its ETag (``...-N``).

        ``parts`` is the object's bytes as pieces (a list, an iterable or an
        async iterator of bytes-like); they are cut into parts of exactly
        ``part_size`` bytes (5 MiB..5 GiB; the last part may be shorter) --
        pieces of exactly part_size (cache chunks) go through uncopied. Up
        to ``concurrency`` parts upload at once; the iterator is pulled only
        when a slot is free, so at most ``concurrency`` parts are held.

        More than 10,000 parts is InvalidRequest: for a list of pieces before
        anything is sent, for an iterator when the 10,001st part appears.
        Any failure (or cancellation) aborts the upload (no orphan uploads
        are left behind) and re-raises.
        """
        check_part_size(part_size)
        if not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequest(f"concurrency must be >= 1, not {concurrency!r}")
        full = full_key(self.prefix, key)
        meta = check_metadata(metadata)
        if isinstance(parts, (list, tuple)):
            total = views_nbytes(byte_views(list(parts)))
            nparts = max(1, -(-total // part_size))
            if nparts > MAX_PARTS:
                raise InvalidRequest(
                    f"{total} bytes in parts of {part_size} is {nparts} parts; "
                    f"S3 allows {MAX_PARTS}: use a larger part_size", key=full)
        self._check_open()
        upload_id = await self._mpu_create(full, meta, content_type)
        return await self._drive_multipart(
            full, upload_id, cut_parts(parts, part_size), concurrency,
            lambda n, views: self._mpu_upload_part(full, upload_id, n, views))

    async def multipart_compose(self, key: str, parts: Any, *,
                                metadata: dict[str, str] | None = None,
                                content_type: str | None = None,
                                concurrency: int = 4) -> str:
        """An object made of parts given one by one; returns its ETag.

        ``parts`` (an iterable or an async iterator) yields, in order, each
        part as its bytes (bytes-like, or a list of them sent as one part)
        or as a ``CopyPart``: a range of another object in this store,
        copied server-side (UploadPartCopy: no byte passes through this
        process). S3's rules hold: every part but the last is 5 MiB..5 GiB,
        at most 10,000 parts (InvalidRequest on the 10,001st; the server
        refuses a short middle part). Up to ``concurrency`` parts at once,
        the iterator pulled only when a slot is free. Any failure (or
        cancellation) aborts the upload and re-raises.
        """
        if not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidRequest(f"concurrency must be >= 1, not {concurrency!r}")
        full = full_key(self.prefix, key)
        meta = check_metadata(metadata)
        self._check_open()

        async def jobs() -> AsyncIterator[Any]:
            if hasattr(parts, "__aiter__"):
                async for part in parts:
                    yield part
            else:
                for part in parts:
                    yield part

        async def do_part(n: int, part: Any) -> str:
            if isinstance(part, CopyPart):
                if part.length <= 0:
                    raise InvalidRequest(f"part {n}: an empty copy range", key=full)
                src = full_key(self.prefix, part.key, what="copy source")
                return await self._mpu_upload_part_copy(
                    full, upload_id, n, src, part.start, part.start + part.length - 1,
                    unquote_etag(part.etag))
            return await self._mpu_upload_part(full, upload_id, n, byte_views(part))

        upload_id = await self._mpu_create(full, meta, content_type)
        return await self._drive_multipart(full, upload_id, jobs(), concurrency, do_part)

    async def _drive_multipart(self, full: str, upload_id: str,
                               jobs: AsyncIterator[Any], concurrency: int,
                               do_part: Callable[[int, Any], Awaitable[str]],
                               before_complete: Callable[[], Awaitable[None]] | None = None,
                               ) -> str:
        """Run ``do_part(n, job)`` for each job with at most ``concurrency``
        at once, then (after ``before_complete``, which may veto by raising)
        complete the upload; abort it on any failure.

        Shared by multipart_upload and multipart copy of every store, so that
        they all abort, bound memory and report errors the same way.
        """
        slots = asyncio.Semaphore(concurrency)
        tasks: list[asyncio.Task] = []
        failed: list[BaseException] = []

        def finished(task: asyncio.Task) -> None:
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())

        try:
            n = 0
            async for job in jobs:
                n += 1
                if n > MAX_PARTS:
                    raise InvalidRequest(
                        f"more than {MAX_PARTS} parts: S3's limit; use a larger "
                        f"part_size", key=full, bucket=self.bucket)
                await slots.acquire()
                if failed:
                    slots.release()
                    break
                task = asyncio.ensure_future(do_part(n, job))
                task.add_done_callback(finished)
                tasks.append(task)
                del job  # the task holds the part's views until it is uploaded
            # Raises the first part failure, if any (also one noticed above).
            etags = list(await asyncio.gather(*tasks))
            if before_complete is not None:
                await before_complete()
            etag = await self._mpu_complete(full, upload_id, etags)
        except BaseException:
            aclose = getattr(jobs, "aclose", None)
            if aclose is not None:  # stop pulling the caller's pieces
                try:
                    await aclose()
                except Exception:  # noqa: BLE001 -- the original error wins
                    pass
            for t in tasks:
                t.cancel()
            # Wait for every part: each waits for its worker thread, so no
            # thread reads the caller's pieces after we return.
            await asyncio.gather(*tasks, return_exceptions=True)
            abort = asyncio.ensure_future(self._abort_quietly(full, upload_id))
            try:
                await asyncio.shield(abort)
            except asyncio.CancelledError:
                pass  # the abort goes on in the background
            raise
        if not etag:
            etag = await self._etag_after_empty_complete(full, etags)
        return etag

    async def _abort_quietly(self, full: str, upload_id: str) -> None:
        try:
            await self._mpu_abort(full, upload_id)
        except Exception as exc:  # noqa: BLE001 -- reported, the original error wins
            log.warning("could not abort multipart upload of s3://%s/%s (%s); "
                        "it stays until a bucket lifecycle rule or "
                        "list_multipart_uploads()+abort removes it",
                        self.bucket, full, exc)

    async def _etag_after_empty_complete(self, full: str, part_etags: list[str]) -> str:
        """CompleteMultipartUpload answered without an ETag (Ceph RGW 16 does:
        a known bug). Ask with HEAD; if HEAD disagrees with the ETag computed
        from the parts, the object was replaced right after our upload (or
        the server computes ETags differently): return the computed one --
        the safe direction, since a later comparison then sees a change."""
        expected = multipart_etag(part_etags)
        info = await self._head_full(full)
        if info is not None and (expected is None or info.etag == expected):
            return info.etag
        if expected is None:
            raise BackendError(f"s3://{self.bucket}/{full}: the multipart upload "
                               f"completed without an ETag and the object is gone",
                               bucket=self.bucket, key=full)
        log.warning("s3://%s/%s: CompleteMultipartUpload gave no ETag and HEAD "
                    "shows %s, not %s (replaced since?); using the computed one",
                    self.bucket, full, info.etag if info else None, expected)
        return expected

    # Tunables of copy(); implementations may set them per instance.
    multipart_copy_threshold: int = MAX_PUT_BYTES
    copy_part_size: int = 512 * MiB
    copy_concurrency: int = 4

    async def copy(self, src_key: str, dst_key: str, *,
                   metadata: dict[str, str] | None = None,
                   if_match: str | None = None, content_type: str | None = None,
                   size: int | None = None) -> str:
        """Server-side copy; returns the new object's ETag.

        ``metadata=None`` keeps the source's metadata and content type
        (MetadataDirective COPY); a dict replaces them (REPLACE; content type
        ``content_type``, else the server's default). ``if_match``:
        PreconditionFailed if the source's ETag differs. Copying an object
        onto itself needs ``metadata`` (S3 refuses a no-op self-copy).

        Sources larger than ``multipart_copy_threshold`` (default 5 GiB,
        S3's CopyObject limit) are copied in parts (UploadPartCopy,
        ``copy_part_size`` each, ``copy_concurrency`` at once). Pass the
        source's ``size`` when known; without it a single CopyObject is
        tried first and, if the server refuses it, the size is asked with
        HEAD. A multipart copy HEADs the source before and after copying the
        parts and aborts if its ETag changed (servers like RGW 16 ignore the
        per-part source conditions), so the copy is never a mix of versions.
        """
        src = full_key(self.prefix, src_key, what="src_key")
        dst = full_key(self.prefix, dst_key, what="dst_key")
        meta = None if metadata is None else check_metadata(metadata)
        if src == dst and meta is None:
            raise InvalidRequest(
                f"copying s3://{self.bucket}/{src} onto itself without new "
                f"metadata: S3 refuses it", bucket=self.bucket, key=src)
        if if_match is not None:
            if_match = unquote_etag(if_match)
        self._check_open()
        if size is not None and size > self.multipart_copy_threshold:
            return await self._multipart_copy(src, dst, meta, if_match, content_type)
        try:
            return await self._copy_object(src, dst, meta, if_match, content_type)
        except InvalidRequest:
            if size is not None:
                raise
            info = await self._head_full(src)
            if info is None or info.size <= self.multipart_copy_threshold:
                raise
        return await self._multipart_copy(src, dst, meta, if_match, content_type)

    async def _multipart_copy(self, src: str, dst: str, meta: dict[str, str] | None,
                              if_match: str | None, content_type: str | None) -> str:
        info = await self._head_full(src)
        if info is None:
            raise make_error(NotFound, "HeadObject", self.bucket, src, "NoSuchKey", 404,
                             "the copy source does not exist")
        if if_match is not None and info.etag != if_match:
            raise make_error(PreconditionFailed, "UploadPartCopy", self.bucket, src,
                             "PreconditionFailed", 412,
                             f"the source's ETag is {info.etag}, not {if_match}")
        if meta is None:
            meta, content_type = dict(info.metadata), info.content_type
        part = max(self.copy_part_size, MIN_PART_BYTES, -(-info.size // MAX_PARTS))
        ranges = [(off, min(off + part, info.size)) for off in range(0, info.size, part)]

        async def jobs() -> AsyncIterator[tuple[int, int]]:
            for r in ranges:
                yield r

        async def unchanged() -> None:
            after = await self._head_full(src)
            if after is None or after.etag != info.etag:
                raise make_error(
                    PreconditionFailed, "UploadPartCopy", self.bucket, src,
                    "PreconditionFailed", 412,
                    f"the source changed during the multipart copy "
                    f"({info.etag} -> {after.etag if after else 'deleted'})")

        upload_id = await self._mpu_create(dst, meta, content_type)
        return await self._drive_multipart(
            dst, upload_id, jobs(), self.copy_concurrency,
            lambda n, r: self._mpu_upload_part_copy(dst, upload_id, n, src,
                                                    r[0], r[1] - 1, info.etag),
            before_complete=unchanged)

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object succeeds."""

    @abc.abstractmethod
    async def delete_many(self, keys: Iterable[str]) -> list[DeleteFailure]:
        """Delete many objects (DeleteObjects, 1000 per request); returns
        the keys that could not be deleted (missing keys are not failures).
        Keys an XML body cannot carry (control characters) are deleted one
        by one with DeleteObject."""

    # -- listing -----------------------------------------------------------
    @abc.abstractmethod
    def list(self, prefix: str = "", *, delimiter: str | None = "/",
             start_after: str | None = None,
             page_size: int = MAX_LIST_PAGE) -> AsyncIterator[ListPage]:
        """``async for page in store.list("dir/")``: ListObjectsV2 pages
        (paginated with continuation tokens) of keys under ``prefix``, in
        ascending UTF-8 byte order, after ``start_after`` if given. With a
        delimiter, keys containing it after the prefix are grouped into
        common prefixes (``"dir/sub/"``). ``delimiter=None`` lists every key.
        Empty pages are not yielded (an empty listing yields nothing).
        ``page_size`` is capped at 1000 (S3's maximum)."""

    @abc.abstractmethod
    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """(key, upload id) of the unfinished multipart uploads under
        ``prefix`` -- for checks and for cleaning up after crashes."""

    @abc.abstractmethod
    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        """Abort one unfinished multipart upload (idempotent)."""

    # -- lifetime ----------------------------------------------------------
    @abc.abstractmethod
    async def close(self) -> None:
        """Wait for calls in flight, release threads and connections.
        Idempotent; later calls raise StoreClosed."""

    @property
    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see :class:`Stats`)."""

    async def __aenter__(self) -> "ObjectStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- primitives behind multipart_upload (per implementation) -----------
    @abc.abstractmethod
    def _check_open(self) -> None: ...

    @abc.abstractmethod
    async def _head_full(self, full: str) -> ObjectInfo | None: ...

    @abc.abstractmethod
    async def _mpu_create(self, full: str, metadata: dict[str, str],
                          content_type: str | None) -> str: ...

    @abc.abstractmethod
    async def _mpu_upload_part(self, full: str, upload_id: str, number: int,
                               views: list[memoryview]) -> str: ...

    @abc.abstractmethod
    async def _mpu_complete(self, full: str, upload_id: str,
                            etags: list[str]) -> str: ...

    @abc.abstractmethod
    async def _mpu_abort(self, full: str, upload_id: str) -> None: ...

    @abc.abstractmethod
    async def _copy_object(self, src: str, dst: str, metadata: dict[str, str] | None,
                           if_match: str | None, content_type: str | None) -> str: ...

    @abc.abstractmethod
    async def _mpu_upload_part_copy(self, dst: str, upload_id: str, number: int,
                                    src: str, first: int, last: int,
                                    src_etag: str) -> str: ...
