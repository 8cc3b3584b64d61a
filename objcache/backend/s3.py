"""S3Store: the ObjectStore interface on boto3.

How it runs
    One boto3 client, created in the constructor and shared by every call
    (botocore clients are thread-safe). Calls run in a ThreadPoolExecutor of
    ``max_concurrency`` threads; an asyncio.Semaphore of the same size is
    taken BEFORE a job is submitted, so the executor's internal queue never
    holds more than the running jobs: callers beyond the limit wait on the
    semaphore (one waiter per caller, nothing unbounded). The connection pool
    (``max_pool_connections``) has the same size: one connection per thread.

Retries (what is retried, where)
    * Inside botocore, per request, by its retry mode (``standard`` or
      ``adaptive``; ``max_attempts`` attempts in total): 5xx answers,
      throttling (SlowDown, 503, Throttling...), RequestTimeout, connection
      errors and resets, connect/read timeouts -- anything that fails before
      a response body is handed to us.
    * Here, for GetObject: a body that breaks mid-way (reset, EOF, read
      timeout) is resumed from the byte received last with a new ranged GET
      pinned to the first answer's ETag (If-Match), at most
      ``max_attempts - 1`` times per call. If the object was replaced in
      between, the read restarts from the beginning -- unless the caller
      pinned the version with ``if_match``, then PreconditionFailed.
    * Never retried: 4xx answers other than throttling/timeouts --
      NotFound, NoSuchBucket, PreconditionFailed, AccessDenied,
      InvalidAccessKeyId, SignatureDoesNotMatch, InvalidRequest. botocore's
      retry modes do not retry them; the suite checks it at the server.

Server quirks handled
    * Ceph RGW 16 rejects botocore's default flexible checksums: checksums
      are sent only when an operation requires them (``when_required``).
    * RGW 16 returns an empty ETag from CompleteMultipartUpload: the ETag is
      then taken from a HEAD (``ObjectStore._etag_after_empty_complete``).
    * RGW 16 ignores ``x-amz-copy-source-if-match`` and reads its own older
      name ``x-amz-copy-if-match``: both are sent (``rgw_copy_conditions``).
      It ignores both on UploadPartCopy, hence the HEAD-before-and-after in
      multipart copies.

Credentials come from the standard AWS chain (environment, profile,
instance role) unless given; they are never logged nor put in messages.
"""
from __future__ import annotations

import asyncio
import functools
import http.client
import io
import logging
import random
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterable

import boto3
import botocore.exceptions as bex
import urllib3.exceptions
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from . import faults as _faults
from .base import (
    MAX_DELETE_BATCH, MAX_LIST_PAGE, MAX_PUT_BYTES, AccessDenied, BackendError,
    DeleteFailure, InvalidCredentials, InvalidRequest, ListPage, NoSuchBucket,
    NotFound, ObjectInfo, ObjectStore, PreconditionFailed, Stats, StoreClosed,
    TransientError, await_uncancellable, byte_views, check_metadata, check_range,
    full_key, list_prefix, make_error, normalize_prefix, quote_etag, unquote_etag,
    views_nbytes, writable_view, xml_safe)

log = logging.getLogger("objcache.backend.s3")

#: Body bytes read per readinto() call: the granularity at which a read
#: notices cancellation. Large enough that the per-call cost is negligible.
READ_PIECE = 1 << 20

# S3 operation -> boto3 client method.
_METHODS = {
    "HeadObject": "head_object", "GetObject": "get_object",
    "PutObject": "put_object", "CopyObject": "copy_object",
    "DeleteObject": "delete_object", "DeleteObjects": "delete_objects",
    "ListObjectsV2": "list_objects_v2", "HeadBucket": "head_bucket",
    "CreateMultipartUpload": "create_multipart_upload",
    "UploadPart": "upload_part", "UploadPartCopy": "upload_part_copy",
    "CompleteMultipartUpload": "complete_multipart_upload",
    "AbortMultipartUpload": "abort_multipart_upload",
    "ListMultipartUploads": "list_multipart_uploads",
}

# S3 error codes -> exception class. Codes of bodiless answers (HEAD) are
# the status as a string. Anything not listed is classified by status.
_CODES: dict[str, type[BackendError]] = {}
for _cls, _names in (
        (NotFound, "NoSuchKey NoSuchUpload NoSuchVersion NotFound 404"),
        (NoSuchBucket, "NoSuchBucket"),
        (PreconditionFailed, "PreconditionFailed 412 ConditionalRequestConflict"),
        (InvalidCredentials, "InvalidAccessKeyId SignatureDoesNotMatch ExpiredToken "
                             "InvalidToken TokenRefreshRequired InvalidSecurity"),
        (AccessDenied, "AccessDenied AllAccessDisabled AccountProblem 403"),
        (TransientError, "SlowDown Throttling ThrottlingException "
                         "ThrottledException RequestThrottled TooManyRequests "
                         "TooManyRequestsException RequestLimitExceeded "
                         "BandwidthLimitExceeded RequestTimeout RequestTimeoutException "
                         "InternalError ServiceUnavailable PriorRequestNotComplete "
                         "500 502 503 504"),
        (InvalidRequest, "InvalidRequest InvalidArgument InvalidRange EntityTooSmall "
                         "EntityTooLarge InvalidPart InvalidPartOrder KeyTooLongError "
                         "InvalidObjectName MalformedXML MetadataTooLarge InvalidDigest "
                         "BadDigest InvalidBucketName MethodNotAllowed 400 405 416")):
    for _name in _names.split():
        _CODES[_name] = _cls


def classify(code: str | None, status: int | None) -> type[BackendError]:
    """The exception class of an S3 error answer."""
    if code in _CODES:
        return _CODES[code]
    if status is None:
        return BackendError
    if status == 404:
        return NotFound
    if status == 403:
        return AccessDenied
    if status == 412:
        return PreconditionFailed
    if status == 429 or status >= 500:
        return TransientError
    if 400 <= status < 500:
        return InvalidRequest
    return BackendError


# Failures of a body being read: the connection broke, timed out, or ended.
_STREAM_ERRORS = (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError,
                  bex.BotoCoreError)


class _Call:
    """State of one store-level S3 call, seen by the botocore hooks of the
    worker thread running it (thread-local): its attempts and the fault the
    plan chose for it."""
    __slots__ = ("op", "key", "attempts", "reset")

    def __init__(self, op: str, key: str | None) -> None:
        self.op = op
        self.key = key              # relative to the store prefix (fault matching)
        self.attempts = 0
        self.reset: _faults.Fault | None = None


_tls = threading.local()


class _BodyBroken(Exception):
    def __init__(self, received: int, cause: BaseException | str) -> None:
        super().__init__(f"body broke after {received} bytes: {cause}")
        self.received = received


class _Cancelled(Exception):
    """The awaiting task was cancelled: the worker stops reading."""


class _FakeRaw:
    """The ``raw`` of a synthetic AWSResponse (fault injection)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterable[bytes]:
        yield self._body


class _BufferListReader(io.RawIOBase):
    """Several buffers read as one seekable file, without joining them.

    botocore sends a file-like body in blocks and seeks back to 0 to re-send
    it on a retry. The views stay owned by the caller (see base.py)."""

    def __init__(self, views: list[memoryview]) -> None:
        super().__init__()
        self._views = views
        self._size = views_nbytes(views)
        self._pos = 0
        self._i = 0      # view holding _pos
        self._off = 0    # offset of _pos in that view

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = max(0, min(self._size, base + offset))
        self._pos, self._i, self._off = pos, 0, pos
        while self._i < len(self._views) and self._off >= self._views[self._i].nbytes:
            self._off -= self._views[self._i].nbytes
            self._i += 1
        return pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = 0
        while n < out.nbytes and self._i < len(self._views):
            v = self._views[self._i]
            take = min(out.nbytes - n, v.nbytes - self._off)
            out[n:n + take] = v[self._off:self._off + take]
            n += take
            self._off += take
            if self._off == v.nbytes:
                self._i += 1
                self._off = 0
        self._pos += n
        return n


def _body(data: Any, views: list[memoryview]) -> Any:
    """What to hand botocore as a request body: a bytes/bytearray as is
    (sent in one piece), anything else through a reader (no joining copy)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if len(views) == 1 and isinstance(views[0].obj, bytes) and \
            views[0].nbytes == len(views[0].obj):
        return views[0].obj
    return _BufferListReader(views)


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of finished frames in the tracebacks of ``exc`` and
    of every exception it links to (cause, context): a view of a caller's
    buffer in any of them keeps that buffer exported."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += (e.__cause__, e.__context__)


class S3Store(ObjectStore):
    """An ObjectStore on S3 (or any S3-compatible server) through boto3.

    ``endpoint_url``/``region``: where (None: AWS and the chain's region).
    ``access_key``/``secret_key``/``session_token``/``profile``: override
    the standard credential chain. ``max_concurrency``: worker threads =
    pooled connections = requests in flight at most. ``retry_mode``:
    botocore's ``standard`` or ``adaptive`` (client-side rate limiting on
    throttling); ``max_attempts``: attempts per request in total (and GET
    resumptions per call). ``rgw_copy_conditions``: also send RGW 16's name
    of the copy-source If-Match header.
    """

    def __init__(self, bucket: str, prefix: str = "", *,
                 endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 session_token: str | None = None, profile: str | None = None,
                 max_concurrency: int = 16, retry_mode: str = "standard",
                 max_attempts: int = 5, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0,
                 multipart_copy_threshold: int | None = None,
                 copy_part_size: int | None = None, copy_concurrency: int = 4,
                 rgw_copy_conditions: bool = True) -> None:
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        if retry_mode not in ("standard", "adaptive"):
            raise ValueError(f"retry_mode must be 'standard' or 'adaptive', "
                             f"not {retry_mode!r}")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        if multipart_copy_threshold is not None:
            self.multipart_copy_threshold = multipart_copy_threshold
        if copy_part_size is not None:
            self.copy_part_size = copy_part_size
        self.copy_concurrency = copy_concurrency
        self._faults: _faults.FaultPlan | None = None  # set by FaultyStore
        self._stats = Stats()
        self._closed = False
        self._bucket_known = False  # a request on the bucket has succeeded

        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            aws_session_token=session_token, profile_name=profile,
            region_name=region)
        config = Config(
            region_name=region or session.region_name or "us-east-1",
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            max_pool_connections=max_concurrency,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            tcp_keepalive=True,
            # RGW 16 (and other older S3 servers) reject the CRC32 checksums
            # botocore >= 1.36 adds by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="objcache")
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        events = self._client.meta.events
        events.register("before-send.s3", self._before_send)
        if rgw_copy_conditions:
            for op in ("CopyObject", "UploadPartCopy"):
                events.register(f"before-sign.s3.{op}", _rgw_copy_if_match)
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="objcache-s3")
        # Taken before submitting to the pool: the pool's queue stays empty.
        self._slots = asyncio.Semaphore(max_concurrency)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    @property
    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot()

    @property
    def client(self) -> Any:
        """The boto3 client (for diagnostics and tests; do not call it from
        the event loop thread: it blocks)."""
        return self._client

    # -- plumbing ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"{self!r} is closed", bucket=self.bucket)

    def _rel(self, full: str | None) -> str | None:
        if full is None:
            return None
        return full[len(self.prefix):] if full.startswith(self.prefix) else full

    async def _run(self, fn: Callable[..., Any], *args: Any,
                   on_cancel: Callable[[], None] | None = None) -> Any:
        """Run ``fn(*args)`` on a worker thread, holding one of the
        max_concurrency slots until the thread is done with it -- also when
        the caller is cancelled (``on_cancel`` asks it to stop early), so
        that no thread touches the caller's buffers after we return."""
        self._check_open()
        async with self._slots:
            self._stats.enter()
            try:
                fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
                return await await_uncancellable(fut, on_cancel)
            finally:
                self._stats.leave()

    def _invoke(self, op: str, full: str | None, call: _Call | None = None,
                **params: Any) -> Any:
        """In a worker thread: one S3 operation (botocore retries inside it),
        its failure mapped to a BackendError."""
        if call is None:
            call = _Call(op, self._rel(full))
        _tls.call = call
        try:
            resp = getattr(self._client, _METHODS[op])(Bucket=self.bucket, **params)
        except (bex.ClientError, bex.BotoCoreError) as exc:
            raise self._map_error(exc, op, full, call) from exc
        finally:
            _tls.call = None
        self._bucket_known = True
        return resp

    def _map_error(self, exc: Exception, op: str, full: str | None,
                   call: _Call) -> BackendError:
        tries = f" (after {call.attempts} attempts)" if call.attempts > 1 else ""
        if isinstance(exc, bex.ClientError):
            err = exc.response.get("Error", {})
            code = err.get("Code")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            cls = classify(code, status)
            if op == "HeadBucket" and status == 404:
                cls, code = NoSuchBucket, "NoSuchBucket"
            message = err.get("Message") or http.client.responses.get(status or 0, "")
            return make_error(cls, op, self.bucket, full, code, status,
                              (message or "") + (tries if cls is TransientError else ""))
        if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
            return make_error(InvalidCredentials, op, self.bucket, full,
                              "NoCredentials", None, str(exc))
        if isinstance(exc, bex.ParamValidationError):
            return make_error(InvalidRequest, op, self.bucket, full,
                              "ParamValidation", None, str(exc))
        if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError,
                            bex.ResponseStreamingError)):
            return make_error(TransientError, op, self.bucket, full,
                              type(exc).__name__, None, f"{exc}{tries}")
        return make_error(BackendError, op, self.bucket, full, type(exc).__name__,
                          None, str(exc))

    def _before_send(self, request: Any, event_name: str, **_: Any) -> Any:
        """botocore hook, once per HTTP attempt (worker thread): counts the
        request and the retry, and applies the fault plan."""
        op = event_name.rsplit(".", 1)[-1]
        self._stats.request(op)
        call: _Call | None = getattr(_tls, "call", None)
        if call is None:
            return None
        call.attempts += 1
        if call.attempts > 1:
            self._stats.add("retries")
            log.debug("retrying %s s3://%s/%s (attempt %d)", op, self.bucket,
                      call.key, call.attempts)
        plan = self._faults
        if plan is None:
            return None
        fault = plan.take(op, call.key)
        if fault is None:
            return None
        if fault.kind == "reset":
            if op == "GetObject":
                call.reset = fault  # the body reader breaks it
                return None
            _faults.fire(fault)
            raise bex.ConnectionClosedError(endpoint_url=request.url)
        _faults.fire(fault)
        status, code, message = _faults.ERROR_RESPONSES[fault.kind]
        body = b"" if request.method == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f'<Message>{message}</Message><RequestId>objcache-fault</RequestId>'
            f'</Error>').encode()
        return AWSResponse(request.url, status,
                           {"Content-Type": "application/xml",
                            "Content-Length": str(len(body)),
                            "x-amz-request-id": "objcache-fault"}, _FakeRaw(body))

    def _info(self, full: str, resp: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(
            key=self._rel(full) or "", size=int(resp["ContentLength"]),
            etag=unquote_etag(resp.get("ETag")),
            mtime=resp["LastModified"].timestamp(),
            metadata={k.lower(): v for k, v in resp.get("Metadata", {}).items()},
            content_type=resp.get("ContentType"))

    # -- reads -------------------------------------------------------------
    async def head(self, key: str) -> ObjectInfo | None:
        return await self._head_full(full_key(self.prefix, key))

    async def _head_full(self, full: str) -> ObjectInfo | None:
        try:
            resp = await self._run(functools.partial(
                self._invoke, "HeadObject", full, Key=full))
        except NotFound:
            # HEAD answers have no body: a missing bucket is a bare 404 too.
            # Until some request on the bucket succeeded, ask once.
            if not self._bucket_known:
                await self._run(functools.partial(self._invoke, "HeadBucket", None))
            return None
        return self._info(full, resp)

    async def get_range(self, key: str, start: int, length: int, into: Any = None,
                        *, if_match: str | None = None) -> int | bytes:
        full = full_key(self.prefix, key)
        check_range(start, length)
        dst = writable_view(into, length)[:length] if into is not None else None
        if length == 0:
            return 0 if dst is not None else b""
        cancel = threading.Event()
        try:
            n, buf = await self._run(self._read, full, start, length, dst, if_match,
                                     cancel, on_cancel=cancel.set)
        except BaseException as exc:
            # The worker's frames in the traceback hold slices of ``dst``:
            # the caller's buffer (a cache page) would stay exported until
            # the exception is garbage-collected.
            _clear_frames(exc)
            dst = None
            raise
        if dst is None:
            return bytes(buf[:n])
        # No view of the caller's buffer outlives the call: the worker's
        # result (n, dst) sits in its concurrent future until that is
        # collected, and a cache page with an export stays pinned.
        del buf
        dst.release()
        return n

    async def get(self, key: str) -> bytes:
        full = full_key(self.prefix, key)
        cancel = threading.Event()
        n, buf = await self._run(self._read, full, 0, None, None, None, cancel,
                                 on_cancel=cancel.set)
        return bytes(buf[:n])

    def _read(self, full: str, start: int, length: int | None,
              dst: memoryview | None, if_match: str | None,
              cancel: threading.Event) -> tuple[int, memoryview]:
        """In a worker thread: GET [start, start+length) (length None: to the
        end) into ``dst`` (None: a new buffer); returns (bytes, buffer).

        Invariants: bytes land only in dst[0:n] and only before this returns;
        a resumed GET is pinned to the ETag of the first answer, so the bytes
        come from one version of the object."""
        want = unquote_etag(if_match) if if_match is not None else None
        pinned = want
        got = 0
        breaks = 0
        buf = dst
        while True:
            if cancel.is_set():
                raise _Cancelled()
            offset = start + got
            params: dict[str, Any] = {"Key": full}
            if length is not None:
                params["Range"] = f"bytes={offset}-{start + length - 1}"
            elif offset:
                params["Range"] = f"bytes={offset}-"
            if pinned is not None:
                params["IfMatch"] = quote_etag(pinned)
            call = _Call("GetObject", self._rel(full))
            try:
                resp = self._invoke("GetObject", full, call, **params)
            except PreconditionFailed:
                if want is not None or pinned is None:
                    raise
                log.info("s3://%s/%s was replaced while being read; reading the "
                         "new version from the start", self.bucket, full)
                pinned, got, buf = None, 0, dst
                continue
            except InvalidRequest as exc:
                if exc.status == 416:  # start at or past the end
                    return got, buf if buf is not None else memoryview(bytearray(0))
                raise
            body = resp["Body"]
            n = int(resp["ContentLength"])
            etag = unquote_etag(resp.get("ETag"))
            try:
                self._check_content_range(full, resp, params, offset, length, n)
                if buf is None:
                    buf = memoryview(bytearray(n))
                if got + n > buf.nbytes:
                    raise BackendError(f"GetObject s3://{self.bucket}/{full}: "
                                       f"{n} bytes answered, {buf.nbytes - got} "
                                       f"expected", bucket=self.bucket, key=full)
            except BaseException:
                body.close()
                raise
            try:
                got += self._read_body(body, buf[got:got + n], cancel, call.reset)
                return got, buf
            except _BodyBroken as exc:
                got += exc.received
                breaks += 1
                if breaks >= self.max_attempts:
                    err = make_error(TransientError, "GetObject", self.bucket, full,
                                     "ResponseStreamingError", None,
                                     f"{exc} (gave up after {breaks} broken bodies)")
                    raise err from None
                self._stats.add("resumes")
                log.info("GetObject s3://%s/%s: %s; resuming at byte %d", self.bucket,
                         full, exc, start + got)
                pinned = etag
                if breaks > 1 and cancel.wait(min(1.0, 0.05 * 2 ** breaks) * random.random()):
                    raise _Cancelled() from None

    def _check_content_range(self, full: str, resp: dict[str, Any],
                             params: dict[str, Any], offset: int,
                             length: int | None, n: int) -> None:
        """The answer must start at ``offset``: a server that ignores Range
        (answers 200 with the whole object) cannot be used for partial reads."""
        if "Range" not in params:
            return
        cr = resp.get("ContentRange")
        if cr:
            first = int(cr.split()[1].split("-")[0])
            if first == offset:
                return
        elif offset == 0 and (length is None or n <= length):
            return  # the whole object is what was asked for
        raise BackendError(f"GetObject s3://{self.bucket}/{full}: the server ignored "
                           f"the Range header ({params['Range']} answered with "
                           f"{cr or 'the whole object'})", bucket=self.bucket, key=full)

    def _read_body(self, body: Any, dst: memoryview, cancel: threading.Event,
                   fault: _faults.Fault | None) -> int:
        """Fill ``dst`` from the response body; returns dst.nbytes or raises
        _BodyBroken (with the bytes received) / _Cancelled.

        Fast path: readinto() on the http.client response under urllib3,
        which reads from the socket straight into ``dst`` (no intermediate
        bytes object). Only for plain Content-Length bodies (no chunked or
        content encoding), which is what S3 sends for GetObject; otherwise
        (or on another urllib3/botocore layout) it reads and copies.
        """
        raw = getattr(body, "_raw_stream", None)
        fp = getattr(raw, "_fp", None)
        fast = (isinstance(fp, http.client.HTTPResponse) and not fp.chunked
                and raw.headers.get("content-encoding", "identity").lower()
                in ("", "identity") and getattr(raw, "_fp_bytes_read", None) == 0)
        want = dst.nbytes
        stop_at = fault.after_bytes if fault is not None else None
        got = 0
        done = False
        try:
            while got < want:
                if cancel.is_set():
                    raise _Cancelled()
                end = min(want, got + READ_PIECE)
                if stop_at is not None:
                    if got >= stop_at:
                        _faults.fire(fault)  # type: ignore[arg-type]
                        raise ConnectionResetError("connection reset (injected fault)")
                    end = min(end, stop_at)
                if fast:
                    n = fp.readinto(dst[got:end])
                else:
                    data = body.read(end - got)
                    n = len(data)
                    dst[got:got + n] = data
                if not n:
                    raise _BodyBroken(got, f"the connection closed after {got} of "
                                           f"{want} bytes")
                got += n
            done = True
            return got
        except _STREAM_ERRORS as exc:
            raise _BodyBroken(got, exc) from None
        finally:
            self._stats.add("bytes_in", got)
            if done and fast:
                # Keep urllib3's accounting true, then hand the (fully read,
                # reusable) connection back to the pool.
                raw._fp_bytes_read += got
                if raw.length_remaining is not None:
                    raw.length_remaining -= got
                raw.release_conn()
            elif not done:
                # Unread bytes (or a broken socket): the connection cannot be
                # reused. Close it, and give its place back to the pool.
                try:
                    if raw is not None:
                        raw.close()
                        raw.release_conn()
                    else:
                        body.close()
                except Exception:  # noqa: BLE001 -- already failing
                    pass
            # (slow path, done: urllib3 released the connection at EOF)

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
        params: dict[str, Any] = {"Key": full, "Body": _body(data, views),
                                  "ContentLength": total, "Metadata": meta}
        if content_type:
            params["ContentType"] = content_type
        if if_none_match:
            params["IfNoneMatch"] = "*"
        resp = await self._run(functools.partial(self._invoke, "PutObject", full, **params))
        self._stats.add("bytes_out", total)
        return unquote_etag(resp.get("ETag"))

    async def _mpu_create(self, full: str, metadata: dict[str, str],
                          content_type: str | None) -> str:
        params: dict[str, Any] = {"Key": full, "Metadata": metadata}
        if content_type:
            params["ContentType"] = content_type
        resp = await self._run(functools.partial(
            self._invoke, "CreateMultipartUpload", full, **params))
        return str(resp["UploadId"])

    async def _mpu_upload_part(self, full: str, upload_id: str, number: int,
                               views: list[memoryview]) -> str:
        total = views_nbytes(views)
        resp = await self._run(functools.partial(
            self._invoke, "UploadPart", full, Key=full, UploadId=upload_id,
            PartNumber=number, Body=_body(None, views), ContentLength=total))
        self._stats.add("bytes_out", total)
        return unquote_etag(resp.get("ETag"))

    async def _mpu_upload_part_copy(self, dst: str, upload_id: str, number: int,
                                    src: str, first: int, last: int,
                                    src_etag: str) -> str:
        resp = await self._run(functools.partial(
            self._invoke, "UploadPartCopy", dst, Key=dst, UploadId=upload_id,
            PartNumber=number, CopySource={"Bucket": self.bucket, "Key": src},
            CopySourceRange=f"bytes={first}-{last}",
            CopySourceIfMatch=quote_etag(src_etag)))
        return unquote_etag(resp["CopyPartResult"].get("ETag"))

    async def _mpu_complete(self, full: str, upload_id: str, etags: list[str]) -> str:
        parts = [{"ETag": quote_etag(e), "PartNumber": i}
                 for i, e in enumerate(etags, 1)]
        resp = await self._run(functools.partial(
            self._invoke, "CompleteMultipartUpload", full, Key=full,
            UploadId=upload_id, MultipartUpload={"Parts": parts}))
        return unquote_etag(resp.get("ETag"))  # "" from RGW 16: see base.py

    async def _mpu_abort(self, full: str, upload_id: str) -> None:
        try:
            await self._run(functools.partial(
                self._invoke, "AbortMultipartUpload", full, Key=full,
                UploadId=upload_id))
        except NotFound:
            pass  # already aborted or completed

    async def abort_multipart_upload(self, key: str, upload_id: str) -> None:
        await self._mpu_abort(full_key(self.prefix, key), upload_id)

    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        full_prefix = list_prefix(self.prefix, prefix)
        out: list[tuple[str, str]] = []
        params: dict[str, Any] = {"Prefix": full_prefix}
        while True:
            resp = await self._run(functools.partial(
                self._invoke, "ListMultipartUploads", None, **params))
            out += [(self._rel(u["Key"]) or "", u["UploadId"])
                    for u in resp.get("Uploads", [])]
            if not resp.get("IsTruncated"):
                return sorted(out)
            params["KeyMarker"] = resp.get("NextKeyMarker", "")
            params["UploadIdMarker"] = resp.get("NextUploadIdMarker", "")

    async def _copy_object(self, src: str, dst: str, metadata: dict[str, str] | None,
                           if_match: str | None, content_type: str | None) -> str:
        params: dict[str, Any] = {
            "Key": dst, "CopySource": {"Bucket": self.bucket, "Key": src},
            "MetadataDirective": "COPY" if metadata is None else "REPLACE"}
        if metadata is not None:
            params["Metadata"] = metadata
            if content_type:
                params["ContentType"] = content_type
        if if_match is not None:
            params["CopySourceIfMatch"] = quote_etag(if_match)
        resp = await self._run(functools.partial(self._invoke, "CopyObject", dst, **params))
        return unquote_etag(resp["CopyObjectResult"].get("ETag"))

    async def delete(self, key: str) -> None:
        full = full_key(self.prefix, key)
        try:
            await self._run(functools.partial(self._invoke, "DeleteObject", full, Key=full))
        except NotFound:
            pass  # S3 answers 204 anyway; some servers 404

    async def delete_many(self, keys: Iterable[str]) -> list[DeleteFailure]:
        keys = list(keys)
        fulls = [full_key(self.prefix, k) for k in keys if xml_safe(k)]
        failures: list[DeleteFailure] = []
        for k in keys:
            if not xml_safe(k):
                try:
                    await self.delete(k)
                except (AccessDenied, InvalidRequest) as exc:
                    failures.append(DeleteFailure(k, exc.code or "", str(exc)))
        for i in range(0, len(fulls), MAX_DELETE_BATCH):
            batch = fulls[i:i + MAX_DELETE_BATCH]
            resp = await self._run(functools.partial(
                self._invoke, "DeleteObjects", None,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}))
            for e in resp.get("Errors", []):
                if e.get("Code") in ("NoSuchKey", "404"):
                    continue
                failures.append(DeleteFailure(self._rel(e.get("Key")) or "",
                                              e.get("Code", ""), e.get("Message", "")))
        return failures

    # -- listing -----------------------------------------------------------
    async def list(self, prefix: str = "", *, delimiter: str | None = "/",
                   start_after: str | None = None,
                   page_size: int = MAX_LIST_PAGE) -> AsyncIterator[ListPage]:
        full_prefix = list_prefix(self.prefix, prefix)
        if not isinstance(page_size, int) or page_size < 1:
            raise InvalidRequest(f"page_size must be >= 1, not {page_size!r}")
        # botocore asks for EncodingType=url and decodes the answer itself, so
        # keys with characters XML 1.0 cannot carry come back intact.
        params: dict[str, Any] = {"Prefix": full_prefix,
                                  "MaxKeys": min(page_size, MAX_LIST_PAGE)}
        if delimiter:
            params["Delimiter"] = delimiter
        if start_after:
            params["StartAfter"] = self.prefix + start_after
        while True:
            resp = await self._run(functools.partial(
                self._invoke, "ListObjectsV2", None, **params))
            objects = [ObjectInfo(key=self._rel(o["Key"]) or "", size=int(o["Size"]),
                                  etag=unquote_etag(o.get("ETag")),
                                  mtime=o["LastModified"].timestamp())
                       for o in resp.get("Contents", [])]
            prefixes = [self._rel(p["Prefix"]) or "" for p in resp.get("CommonPrefixes", [])]
            if objects or prefixes:
                yield ListPage(objects, prefixes)
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:
                raise make_error(BackendError, "ListObjectsV2", self.bucket, full_prefix,
                                 "NoContinuationToken", None,
                                 "a truncated listing without a continuation token")
            params["ContinuationToken"] = token

    # -- lifetime ----------------------------------------------------------
    async def close(self) -> None:
        """Refuse new calls, wait for the ones in flight, then stop the
        threads and close the connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Calls already waiting for a slot were admitted before close: they
        # get their slots first (FIFO); then every slot is ours.
        for _ in range(self.max_concurrency):
            await self._slots.acquire()
        self._pool.shutdown(wait=False)
        self._client.close()


def _rgw_copy_if_match(request: Any, **_: Any) -> None:
    """before-sign hook: RGW 16 reads the copy-source If-Match condition
    under its older name; send both. (Unknown x-amz-* headers are ignored by
    the servers tried; ``rgw_copy_conditions=False`` turns this off for one
    that objects.)"""
    value = request.headers.get("x-amz-copy-source-if-match")
    if value is not None:
        request.headers["x-amz-copy-if-match"] = value
