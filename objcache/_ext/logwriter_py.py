"""Durable append-only log writer - pure-Python twin of ``_logwriter``.

Same API and semantics as the compiled module (see docs/logwriter.md), on the
portable path only: each batch is written by ``os.pwritev`` (IOV_MAX buffers
per call, continuing after short writes) and made durable by ONE
``os.fdatasync``, on a single worker thread per writer. ``backend`` is always
``"pwritev"``.

Structure (mirrors _logwriter.pyx, so the two read side by side):

* ``append`` pins the data (a memoryview: a bytearray cannot be resized while
  it is exported), adds it to the newest pending ``_Batch`` and returns a
  future. The first append that finds the writer idle schedules
  ``_submit_next`` with ``loop.call_soon``: appends made in the same loop
  iteration share the batch.
* One batch is in flight at a time; when it completes, ``offset`` moves (on
  success), the memoryviews are released, every future of the batch
  resolves, and the next pending batch is submitted.
* Lifetimes: a batch's memoryviews live until the worker has returned from
  the batch. The loop holds only weak references to the writer, so an
  unclosed writer is collected as soon as it is dropped; its finalizer warns
  with ResourceWarning, waits (blocking) for the in-flight job, resolves that
  batch, fails unsubmitted appends with LogWriterClosed, and closes the file.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from objcache._ext.errors import LogWriterClosed

__all__ = ["LogWriter", "debug_counters", "IOV_MAX"]

_log = logging.getLogger("objcache._ext.logwriter")

IOV_MAX = 1024
try:
    IOV_MAX = min(IOV_MAX, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):  # pragma: no cover
    pass

_get_running_loop = asyncio._get_running_loop


def debug_counters():
    """The twin has no live-object counters."""
    return None


def _record_view(data) -> memoryview:
    """A flat byte view of `data` (holding its buffer export), or raise."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(
            f"LogWriter.append() needs a bytes-like object (buffer "
            f"protocol), not {type(data).__name__!r}") from None
    except BufferError as exc:
        raise ValueError(
            f"LogWriter.append() cannot export the buffer: {exc}") from None
    if not mv.c_contiguous:
        mv.release()
        raise ValueError(
            "LogWriter.append() needs a C-contiguous buffer; copy it first "
            "(bytes(data) or numpy.ascontiguousarray(data))")
    if mv.ndim == 1 and mv.format == "B":
        return mv
    try:
        flat = mv.cast("B")
    except TypeError:
        # Formats memoryview cannot cast (non-native byte order, structs):
        # copy. Only the twin does this; the C version writes the memory.
        flat = memoryview(mv.tobytes())
    mv.release()
    return flat


def _pwritev_all(fd: int, views: list, off: int) -> None:
    """pwritev every view at `off`, continuing after short writes; raises
    OSError with the kernel's errno when no progress can be made."""
    views = list(views)
    i, n = 0, len(views)
    while i < n:
        if not len(views[i]):
            i += 1
            continue
        written = os.pwritev(fd, views[i:i + IOV_MAX], off)
        if written == 0:
            raise OSError(errno.EIO, "pwritev made no progress")
        off += written
        while written:
            size = len(views[i])
            if written >= size:
                written -= size
                i += 1
            else:
                views[i] = views[i][written:]
                written = 0


def _write_batch(fd: int, views: list, start: int) -> tuple[int, int]:
    """Worker-thread body: write + fdatasync one batch. Returns (errno or 0,
    fdatasync calls made); on failure truncates back to `start`."""
    err = syncs = 0
    try:
        _pwritev_all(fd, views, start)
        syncs = 1
        os.fdatasync(fd)
    except OSError as exc:
        err = exc.errno or errno.EIO
    if err:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass  # best effort; the batch is reported failed either way
    return err, syncs


def _settle(fut, result, exc) -> None:
    """Resolve `fut` unless its awaiter cancelled it; leave futures of a
    closed loop alone."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except RuntimeError:
        if not fut.get_loop().is_closed():
            raise


def _fresh(exc: BaseException) -> BaseException:
    """A new exception like `exc`: each awaiter gets its own instance (a
    shared one would collect every awaiter's traceback)."""
    if isinstance(exc, OSError):
        return type(exc)(exc.errno, exc.strerror, exc.filename)
    return type(exc)(*exc.args)


class _Batch:
    """One group-commit batch. Owned by the writer (pending, then in
    flight); its memoryviews are released only when it is complete."""

    __slots__ = ("loop", "views", "mvs", "rels", "futs", "total", "start",
                 "done", "err", "complete")

    def __init__(self, loop):
        self.loop = loop
        self.mvs: list[memoryview] = []    # one per record (pins the data)
        self.views: list[memoryview] = []  # the non-empty ones, to write
        self.rels: list[int] = []          # record offset from batch start
        self.futs: list = []
        self.total = 0
        self.start = 0
        self.done = None
        self.err = 0
        self.complete = False

    def add(self, mv: memoryview, fut) -> None:
        self.mvs.append(mv)
        if len(mv):
            self.views.append(mv)
        self.rels.append(self.total)
        self.futs.append(fut)
        self.total += len(mv)

    def _release(self) -> None:
        for mv in self.mvs:
            mv.release()
        self.mvs = []
        self.views = []

    def _finish_waiters(self) -> None:
        self.complete = True
        if self.done is not None:
            _settle(self.done, None, None)

    def resolve(self, err: int, path) -> None:
        futs, self.futs = self.futs, []
        self.err = err
        self._release()
        for rel, fut in zip(self.rels, futs):
            if err:
                _settle(fut, None, OSError(err, os.strerror(err), path))
            else:
                _settle(fut, self.start + rel, None)
        self._finish_waiters()

    def abandon(self, exc: BaseException) -> None:
        futs, self.futs = self.futs, []
        self.err = errno.EIO
        self._release()
        for fut in futs:
            _settle(fut, None, _fresh(exc))
        self._finish_waiters()

    def wait(self):
        if self.done is None:
            self.done = self.loop.create_future()
            if self.complete:
                self.done.set_result(None)
        return self.done


class LogWriter:
    """LogWriter(path, *, backend=None, loop=None)

    Durable append-only writer for one file; see docs/logwriter.md.
    ``await w.append(data)`` returns the file offset of ``data`` once it is
    written and fdatasync'ed. One writer belongs to one event loop.
    """

    _fd = -1            # class defaults: a half-constructed writer is closed
    _loop = None

    def __init__(self, path, *, backend=None, loop=None):
        if self._loop is not None:
            raise RuntimeError("LogWriter.__init__() called twice")
        if backend == "io_uring":
            raise ValueError("the pure-Python LogWriter has no io_uring "
                             "backend; use backend=None or 'pwritev' (or the "
                             "compiled objcache._ext._logwriter)")
        if backend not in (None, "pwritev"):
            raise ValueError(f"backend must be None, 'io_uring' or 'pwritev', "
                             f"not {backend!r}")
        if loop is None:
            loop = _get_running_loop()
            if loop is None:
                raise RuntimeError("LogWriter() needs a running event loop "
                                   "or an explicit loop=")
        path = os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self._offset = size
        self._pending: list[_Batch] = []
        self._inflight: _Batch | None = None
        self._job = None            # concurrent future of the in-flight job
        self._executor: ThreadPoolExecutor | None = None
        self._submit_scheduled = False
        self._closed = False
        self._close_task = None
        self._selfref = weakref.ref(self)   # what loop callbacks hold
        self._n_batches = self._n_appends = self._n_syncs = 0
        self._loop = loop
        self._fd = fd

    # ---- public API ---------------------------------------------------

    @property
    def backend(self) -> str:
        return "pwritev"

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def closed(self) -> bool:
        return self._loop is None or self._closed

    @property
    def stats(self) -> dict:
        return {"batches": self._n_batches, "appends": self._n_appends,
                "syncs": self._n_syncs}

    def __repr__(self):
        state = "closed" if self.closed else f"offset={self._offset}"
        return (f"<objcache._ext.logwriter_py.LogWriter "
                f"{getattr(self, 'path', None)!r} pwritev {state}>")

    def append(self, data):
        """Queue `data` after every earlier append; returns a future that
        resolves to its file offset once it is durable."""
        self._check_loop("append")
        if self._closed:
            raise LogWriterClosed(f"append to closed LogWriter {self.path!r}")
        mv = _record_view(data)
        try:
            fut = self._loop.create_future()
            if not self._pending:
                self._pending.append(_Batch(self._loop))
            self._pending[-1].add(mv, fut)
        except BaseException:
            mv.release()
            raise
        self._n_appends += 1
        self._kick(False)
        return fut

    async def flush(self):
        """Wait until every append made so far has completed; raise the
        OSError of a failed batch among them."""
        self._check_loop("flush")
        batches = list(self._pending)
        if self._inflight is not None:
            batches.insert(0, self._inflight)
        if not batches:
            return
        await batches[-1].wait()
        for b in batches:
            if b.err:
                raise OSError(b.err, os.strerror(b.err), self.path)

    async def close(self):
        """Refuse new appends, let pending ones complete, close the file.
        Idempotent; cancelling the await does not stop the closing."""
        if self._loop is None or (self._fd < 0 and self._close_task is None):
            return
        if self._close_task is not None and self._close_task.done():
            return
        if self._loop.is_closed():
            # Its loop is gone (nothing can complete through it): settle
            # what is in flight synchronously and free everything, from
            # whatever loop we are called on.
            self._shutdown("the writer's event loop was closed")
            return
        self._check_loop("close")
        if self._close_task is None:
            self._closed = True
            self._close_task = self._loop.create_task(self._close_impl())
        await asyncio.shield(self._close_task)

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.close()

    # ---- internals ----------------------------------------------------

    def _check_loop(self, what: str) -> None:
        running = _get_running_loop()
        if running is self._loop and running is not None:
            return
        if self._loop is None:
            raise RuntimeError("LogWriter is not initialised")
        if running is None:
            raise RuntimeError(
                f"LogWriter.{what}() must be called from the writer's event "
                f"loop (no event loop is running in this thread)")
        raise RuntimeError(
            f"LogWriter.{what}() called from a different event loop than the "
            f"one the writer was created for")

    def _kick(self, force: bool) -> None:
        """Schedule _submit_next once (call_soon) unless a batch is in
        flight; `force`: even with nothing pending (after a completion, so
        the tasks it woke append first and share the next batch)."""
        if self._submit_scheduled or self._inflight is not None:
            return
        if not force and not self._pending:
            return
        self._submit_scheduled = True
        self._loop.call_soon(_submit_cb, self._selfref)

    def _submit_next(self) -> None:
        self._submit_scheduled = False
        if self._inflight is not None or not self._pending or self._fd < 0:
            return
        b = self._pending.pop(0)
        b.start = self._offset
        self._n_batches += 1
        if b.total == 0:
            self._complete(b, 0, 0, True)
            return
        self._inflight = b
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1, thread_name_prefix="objcache-logwriter")
            self._job = self._executor.submit(_write_batch, self._fd,
                                              b.views, b.start)
            self._job.add_done_callback(
                partial(_job_done_threadsafe, self._loop, self._selfref))
        except BaseException as exc:
            if self._job is not None:
                self._settle_inflight(True)
                return
            self._inflight = None
            b.abandon(OSError(errno.EIO, f"log writer cannot start I/O: "
                                         f"{exc!r}", self.path))
            self._kick(False)

    def _on_job_done(self) -> None:
        if self._job is not None and self._job.done():
            self._settle_inflight(True)

    def _settle_inflight(self, kick: bool) -> None:
        """Wait (blocking if need be) for the in-flight job; complete it."""
        b = self._inflight
        if b is None:
            return
        err, syncs = errno.EIO, 0
        if self._job is not None:
            job, self._job = self._job, None
            if job.exception() is None:     # blocks until the job is done
                err, syncs = job.result()
        self._complete(b, err, syncs, kick)

    def _complete(self, b: _Batch, err: int, syncs: int, kick: bool) -> None:
        if self._inflight is b:
            self._inflight = None
        self._n_syncs += syncs
        if err == 0:
            self._offset = b.start + b.total
        b.resolve(err, self.path)
        if kick:
            self._kick(True)

    async def _close_impl(self):
        try:
            while self._inflight is not None or self._pending:
                b = self._pending[-1] if self._pending else self._inflight
                await b.wait()
        finally:
            self._shutdown("close() was interrupted before this append "
                           "was written")

    def _shutdown(self, why: str) -> None:
        self._closed = True
        self._settle_inflight(False)
        pending, self._pending = self._pending, []
        for b in pending:
            b.abandon(LogWriterClosed(f"LogWriter {self.path!r}: {why}"))
        self._release()

    def _release(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle; its thread exits
            self._executor = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        if self._fd < 0:
            return
        warnings.warn(f"unclosed LogWriter {self.path!r}", ResourceWarning,
                      source=self)
        self._shutdown("the writer was garbage-collected without close()")


# Loop callbacks get a weak reference: the loop never keeps a writer alive.

def _submit_cb(ref) -> None:
    w = ref()
    if w is not None:
        w._submit_next()


def _job_cb(ref) -> None:
    w = ref()
    if w is not None:
        w._on_job_done()


def _job_done_threadsafe(loop, ref, _) -> None:
    """Done-callback of a job, in the worker thread: hand over to the loop
    (a closed loop cannot take it: close()/the finalizer settle the batch)."""
    try:
        loop.call_soon_threadsafe(_job_cb, ref)
    except RuntimeError:
        pass
