# cython: language_level=3
"""Durable append-only log writer on io_uring (compiled implementation).

The contract (ordering, durability, errors, batching, fallback) is in
docs/logwriter.md; ``objcache._ext.logwriter_py`` is the pure-Python twin with
the same API. This module is the asyncio glue around src/uring_log.c.

How a record travels
--------------------
``append(data)`` pins ``data`` (a buffer export, so a bytearray cannot be
resized or freed under the kernel), adds its pointer to the newest *pending*
batch, and returns a future. The first append that finds the writer idle
schedules ``_submit_next`` with ``loop.call_soon``, so every append made in
the same loop iteration joins the same batch.

Exactly one batch is in flight at a time (group commit). ``_submit_next``
takes the oldest pending batch, fixes its file offset (= ``offset``, the
acknowledged end) and either

* io_uring: submits linked writev SQEs + one linked fsync(DATASYNC) SQE and
  watches the ring's eventfd with ``loop.add_reader``; ``_on_ready`` reaps
  completions, or
* pwritev:  runs ``ul_batch_write_sync`` (pwritev + fdatasync, GIL released)
  on the writer's single worker thread.

When the batch is complete, ``_complete`` moves ``offset`` (success only),
releases the buffers, resolves every future of the batch, and schedules the
next batch - after the woken tasks have had a chance to append to it.

Lifetimes and references
------------------------
* A record's buffer export is held by its ``_Batch`` until the batch is
  complete (the kernel or the worker thread reads the memory until then),
  and released just before the futures resolve.
* The event loop holds only WEAK references to the writer (every callback
  gets a weakref), so an unclosed writer is collected as soon as the program
  drops it, even with a batch in flight. Its finalizer (``__del__``) warns
  (ResourceWarning), WAITS - blocking - until the kernel or the worker is
  done with the in-flight batch and resolves that batch's futures, fails
  appends not yet submitted with LogWriterClosed, then frees the ring, the
  eventfd and the fd. ``no_gc_clear`` keeps the in-flight batch (and its
  buffers) reachable until then, even when collected as part of a cycle.
* If the loop is closed first, futures are left as they are (nobody can
  await them), and the same finalizer or a ``close()`` from any thread
  frees the resources.
"""
import asyncio
import logging
import os
import sys
import warnings
import weakref

cimport cython
from cpython.buffer cimport (PyBUF_FULL_RO, PyBuffer_IsContiguous,
                             PyBuffer_Release, PyObject_GetBuffer)
from libc.errno cimport E2BIG, EIO
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memset
from posix.unistd cimport close as c_close

from asyncio import _get_running_loop
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from objcache._ext.errors import LogWriterClosed

__all__ = ["LogWriter", "debug_counters", "IOV_MAX", "MAX_BATCH_BYTES"]

_log = logging.getLogger("objcache._ext.logwriter")


cdef extern from "oc_debug.h":
    cdef enum oc_counter:
        OC_LOG_APPENDS
        OC_LOG_WRITERS
    void OC_DEBUG_INC(int c)
    void OC_DEBUG_DEC(int c)
    int oc_debug_enabled()
    long oc_debug_get(int c)


cdef extern from "uring_log.h" nogil:
    enum:
        UL_IOV_MAX
        UL_MAX_SEGS
    uint64_t UL_SEG_MAX_BYTES

    ctypedef struct ul_batch:
        size_t niov
        unsigned nsegs
        uint64_t start
        uint64_t total
        unsigned outstanding
        unsigned syncs

    ctypedef struct ul_ring:
        pass

    void ul_batch_init(ul_batch *b)
    void ul_batch_free(ul_batch *b)
    int ul_batch_add(ul_batch *b, const void *p, size_t len)
    int ul_ring_open(ul_ring *r)
    void ul_ring_close(ul_ring *r)
    int ul_ring_fd(const ul_ring *r)
    int ul_ring_submit(ul_ring *r, int fd, ul_batch *b)
    int ul_ring_reap(ul_ring *r, ul_batch *b)
    int ul_ring_wait(ul_ring *r, ul_batch *b)
    int ul_batch_finish(int fd, ul_batch *b)
    int ul_batch_write_sync(int fd, ul_batch *b)


IOV_MAX = UL_IOV_MAX
#: Bytes one batch can hold; appends beyond it go to the next batch, and a
#: single record larger than this is refused with ValueError.
MAX_BATCH_BYTES = UL_MAX_SEGS * UL_SEG_MAX_BYTES

_BACKENDS = (None, "io_uring", "pwritev")

# Reasons for the pwritev fallback already logged by this process: the
# fallback is logged once per reason, not once per writer.
_fallback_logged = set()

# In-flight batches that could not be waited for (ring wait failed in a
# finalizer): their buffers are deliberately kept alive forever rather than
# freed while the kernel might still read them. Expected to stay empty.
_never_free = []

# io_uring: how often a batch in flight is checked for completions the
# eventfd did not report (_on_watchdog), and how many were found so.
_WATCHDOG_SECONDS = 1.0
_rescued = 0


def _forget_fallback_log():
    """Test hook: make the next fallback log its line again."""
    _fallback_logged.clear()


def _log_fallback(str reason, bint warn):
    if reason in _fallback_logged:
        return
    _fallback_logged.add(reason)
    _log.log(logging.WARNING if warn else logging.INFO,
             "log writer: using the pwritev+fdatasync backend (%s)", reason)


def _env_no_uring():
    return os.environ.get("OBJCACHE_NO_URING", "").strip().lower() not in (
        "", "0", "false", "no")


def debug_counters():
    """Live-object counters of a debug build (OBJCACHE_DEBUG=1), else None."""
    if not oc_debug_enabled():
        return None
    return {"log_appends": oc_debug_get(OC_LOG_APPENDS),
            "log_writers": oc_debug_get(OC_LOG_WRITERS)}


cdef int _get_record(object data, Py_buffer *view) except -1:
    """Export `data` as a C-contiguous buffer into *view (caller releases)."""
    try:
        PyObject_GetBuffer(data, view, PyBUF_FULL_RO)
    except TypeError:
        raise TypeError(
            f"LogWriter.append() needs a bytes-like object (buffer "
            f"protocol), not {type(data).__name__!r}") from None
    except BufferError:
        # (no `as` target: Cython's warn.unused_result flags it)
        exc = sys.exc_info()[1]
        raise ValueError(
            f"LogWriter.append() cannot export the buffer: {exc}") from None
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise ValueError(
            "LogWriter.append() needs a C-contiguous buffer; copy it first "
            "(bytes(data) or numpy.ascontiguousarray(data))")
    return 0


cdef _settle(object fut, object result, object exc):
    """Resolve `fut` unless its awaiter cancelled it. A future whose loop is
    already closed is left alone (nobody can await it any more)."""
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


cdef object _fresh(object exc):
    """A new exception like `exc`: each awaiter gets its own instance (a
    shared one would collect every awaiter's traceback)."""
    if isinstance(exc, OSError):
        return type(exc)(exc.errno, exc.strerror, exc.filename)
    return type(exc)(*exc.args)


cdef struct _Rec:
    Py_buffer view      # export of the record's data (owns a reference)
    bint held           # view not yet released
    uint64_t rel        # offset of the record from the start of its batch


@cython.final
cdef class _Batch:
    """One group-commit batch: the records, their futures, the C iovecs.

    Owner: the writer (in ``_pending``, then ``_inflight``). The buffer
    exports in ``recs`` live until ``_resolve``/``_abandon`` (or, as a last
    resort, ``__dealloc__``) - and the writer never lets go of a batch the
    kernel or the worker thread may still be reading.
    """
    cdef ul_batch cb
    cdef _Rec *recs
    cdef Py_ssize_t nrecs
    cdef Py_ssize_t recs_cap
    cdef list futs          # one future per record, same order as recs
    cdef object done        # future for flush()/close(), made on demand
    cdef object loop
    cdef int err            # errno after completion; 0 = durable
    cdef bint complete

    def __cinit__(self):
        ul_batch_init(&self.cb)
        self.recs = NULL
        self.nrecs = 0
        self.recs_cap = 0
        self.futs = []
        self.err = 0
        self.complete = False

    def __dealloc__(self):
        self._release_buffers()
        free(self.recs)
        self.recs = NULL
        ul_batch_free(&self.cb)

    cdef int add(self, Py_buffer *view, object fut) except -1:
        """Add a record. Returns 0 and takes over *view (the caller must not
        release it any more), or returns 1 ("batch full") leaving *view with
        the caller. On an exception *view stays with the caller."""
        cdef _Rec *grown
        cdef Py_ssize_t cap
        cdef uint64_t rel = self.cb.total
        cdef int rc
        if self.nrecs == self.recs_cap:
            cap = self.recs_cap * 2 if self.recs_cap else 8
            grown = <_Rec *>realloc(self.recs, cap * sizeof(_Rec))
            if grown == NULL:
                raise MemoryError()
            self.recs = grown
            self.recs_cap = cap
        self.futs.append(fut)
        rc = ul_batch_add(&self.cb, view.buf, <size_t>view.len)
        if rc != 0:
            self.futs.pop()
            if rc == -E2BIG:
                return 1
            raise MemoryError()
        self.recs[self.nrecs].view = view[0]
        self.recs[self.nrecs].rel = rel
        self.recs[self.nrecs].held = True
        self.nrecs += 1
        OC_DEBUG_INC(OC_LOG_APPENDS)
        return 0

    cdef void _release_buffers(self) noexcept:
        """Drop every record's buffer export. Only once the batch is done
        with the memory (complete, or never submitted)."""
        cdef Py_ssize_t i
        for i in range(self.nrecs):
            if self.recs[i].held:
                self.recs[i].held = False
                PyBuffer_Release(&self.recs[i].view)
                OC_DEBUG_DEC(OC_LOG_APPENDS)

    cdef _finish_waiters(self):
        self.complete = True
        if self.done is not None and not self.done.done():
            _settle(self.done, None, None)

    cdef _resolve(self, int err, object path):
        """Complete the batch: release buffers, then resolve every future
        with its record's offset, or fail it with OSError(err)."""
        cdef Py_ssize_t i
        cdef uint64_t start = self.cb.start
        futs, self.futs = self.futs, []
        self.err = err
        self._release_buffers()
        for i, fut in enumerate(futs):
            if err:
                _settle(fut, None, OSError(err, os.strerror(err), path))
            else:
                _settle(fut, start + self.recs[i].rel, None)
        self._finish_waiters()

    cdef _abandon(self, object exc):
        """Give up on a batch that is not (or no longer) being written:
        release buffers and fail its futures with `exc`."""
        futs, self.futs = self.futs, []
        self.err = EIO
        self._release_buffers()
        for fut in futs:
            _settle(fut, None, _fresh(exc))
        self._finish_waiters()

    cdef object wait(self):
        """Future that resolves (with None) when the batch is complete."""
        if self.done is None:
            self.done = self.loop.create_future()
            if self.complete:
                self.done.set_result(None)
        return self.done


def _pwritev_job(_Batch b, int fd):
    """Worker-thread body of the pwritev backend: blocking, GIL released.
    `b` (and with it every buffer export) is referenced by this call until
    it returns."""
    cdef int err
    with nogil:
        err = ul_batch_write_sync(fd, &b.cb)
    return err


@cython.no_gc_clear
cdef class LogWriter:
    """LogWriter(path, *, backend=None, loop=None)

    Durable append-only writer for one file; see docs/logwriter.md.
    ``await w.append(data)`` returns the file offset of ``data`` once it is
    written and fdatasync'ed. One writer belongs to one event loop.
    """
    cdef readonly object path
    cdef object _loop
    cdef int _fd                 # -1 once closed (or never opened)
    cdef bint _uring             # io_uring backend (else pwritev)
    cdef ul_ring _ring           # valid while _ring_open
    cdef bint _ring_open
    cdef bint _reader_on         # eventfd registered with the loop (from
                                 # the first batch until close: a weakref
                                 # callback, so it never pins the writer)
    cdef uint64_t _offset        # acknowledged (durable) end of the file
    cdef list _pending           # _Batch objects not yet submitted, in order
    cdef _Batch _inflight        # the one batch being written, or None
    cdef object _executor        # pwritev backend: single worker thread
    cdef object _job             # pwritev backend: concurrent future of the
                                 # in-flight batch's job
    cdef bint _submit_scheduled
    cdef bint _closed            # close() was called: appends refused
    cdef object _close_task
    cdef object _watchdog        # io_uring: TimerHandle while batches are in flight
    cdef Py_ssize_t _watch_batch # _n_batches when the watchdog was armed
    cdef object _selfref         # weakref.ref(self), given to loop callbacks
    cdef Py_ssize_t _n_batches
    cdef Py_ssize_t _n_appends
    cdef Py_ssize_t _n_syncs
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._fd = -1
        self._pending = []
        memset(&self._ring, 0, sizeof(self._ring))

    def __init__(self, path, *, backend=None, loop=None):
        cdef int rc = 0
        if self._loop is not None:
            raise RuntimeError("LogWriter.__init__() called twice")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be None, 'io_uring' or 'pwritev', "
                             f"not {backend!r}")
        if loop is None:
            loop = _get_running_loop()
            if loop is None:
                raise RuntimeError("LogWriter() needs a running event loop "
                                   "or an explicit loop=")
        path = os.fspath(path)
        use_uring = backend == "io_uring" or (
            backend is None and not _env_no_uring())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if use_uring:
                rc = ul_ring_open(&self._ring)
                if rc < 0 and backend == "io_uring":
                    raise OSError(-rc, f"io_uring unavailable: "
                                       f"{os.strerror(-rc)}", path)
        except BaseException:
            os.close(fd)
            raise
        if use_uring and rc == 0:
            self._ring_open = True
            self._uring = True
        elif use_uring:
            _log_fallback(f"io_uring_queue_init failed: {os.strerror(-rc)} "
                          f"[{_errname(-rc)}]", True)
        elif backend is None:
            _log_fallback("OBJCACHE_NO_URING is set", False)
        self.path = path
        self._selfref = weakref.ref(self)
        self._loop = loop
        self._offset = size
        self._fd = fd
        OC_DEBUG_INC(OC_LOG_WRITERS)

    # ---- public API ---------------------------------------------------

    @property
    def backend(self):
        """"io_uring" or "pwritev": the path this writer actually uses."""
        return "io_uring" if self._uring else "pwritev"

    @property
    def offset(self):
        """End of the acknowledged (durable) data: where the next batch
        goes."""
        return self._offset

    @property
    def closed(self):
        """True once close() was called (appends are refused from then on)."""
        return self._closed or self._loop is None

    @property
    def stats(self):
        """{"batches", "appends", "syncs"}: batches formed, appends accepted,
        fdatasync calls made."""
        return {"batches": self._n_batches, "appends": self._n_appends,
                "syncs": self._n_syncs}

    def __repr__(self):
        state = "closed" if self.closed else f"offset={self._offset}"
        return (f"<objcache._ext._logwriter.LogWriter {self.path!r} "
                f"{self.backend} {state}>")

    def append(self, data):
        """Queue `data` (a C-contiguous buffer) after every earlier append.

        Returns a future resolving to the file offset of `data` once it is
        durable. The record's position is fixed by this call, not by the
        await. Raises LogWriterClosed, TypeError (not a buffer), ValueError
        (not contiguous / too large) immediately.
        """
        cdef Py_buffer view
        cdef _Batch b
        self._check_loop("append")
        if self._closed:
            raise LogWriterClosed(f"append to closed LogWriter {self.path!r}")
        _get_record(data, &view)
        taken = False       # did a batch take over `view`?
        try:
            fut = self._loop.create_future()
            if self._pending and (<_Batch>self._pending[
                    len(self._pending) - 1]).add(&view, fut) == 0:
                taken = True
            else:
                b = _Batch.__new__(_Batch)
                b.loop = self._loop
                if b.add(&view, fut) != 0:
                    raise ValueError(
                        f"record of {view.len} bytes exceeds the largest "
                        f"batch ({MAX_BATCH_BYTES} bytes)")
                taken = True
                self._pending.append(b)
        finally:
            if not taken:
                PyBuffer_Release(&view)
        self._n_appends += 1
        self._kick(False)
        return fut

    async def flush(self):
        """Wait until every append made so far has completed. Raises the
        OSError of a failed batch among them (their awaiters get it too)."""
        self._check_loop("flush")
        batches = list(self._pending)
        if self._inflight is not None:
            batches.insert(0, self._inflight)
        if not batches:
            return
        await (<_Batch>batches[len(batches) - 1]).wait()
        for b in batches:
            if (<_Batch>b).err:
                err = (<_Batch>b).err
                raise OSError(err, os.strerror(err), self.path)

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

    cdef int _check_loop(self, str what) except -1:
        running = _get_running_loop()
        if running is self._loop and running is not None:
            return 0
        if self._loop is None:
            raise RuntimeError("LogWriter is not initialised")
        if running is None:
            raise RuntimeError(
                f"LogWriter.{what}() must be called from the writer's event "
                f"loop (no event loop is running in this thread)")
        raise RuntimeError(
            f"LogWriter.{what}() called from a different event loop than the "
            f"one the writer was created for")

    cdef _kick(self, bint force):
        """Schedule _submit_next once, with call_soon, unless a batch is in
        flight (its completion kicks again). Appends made before it runs
        join the batch. `force` schedules it even with nothing pending: a
        completion does so, right after queueing the wakeups of the tasks
        it resolved - those tasks append first, and their records leave
        together in the very next loop iteration."""
        if self._submit_scheduled or self._inflight is not None:
            return
        if not force and not self._pending:
            return
        self._submit_scheduled = True
        self._loop.call_soon(_submit_cb, self._selfref)

    cdef _submit_next(self):
        cdef _Batch b
        cdef int rc
        self._submit_scheduled = False
        if self._inflight is not None or not self._pending or self._fd < 0:
            return
        b = self._pending.pop(0)
        b.cb.start = self._offset
        self._n_batches += 1
        if b.cb.total == 0:
            # Only empty records: every earlier batch is already durable, so
            # they are complete without any I/O.
            self._complete(b, 0, True)
            return
        self._inflight = b
        if self._uring:
            rc = ul_ring_submit(&self._ring, self._fd, &b.cb)
            if rc == 0:
                self._arm_watchdog()
                if self._reader_on:
                    return
                try:
                    self._loop.add_reader(ul_ring_fd(&self._ring),
                                          _ready_cb, self._selfref)
                    self._reader_on = True
                    return
                except BaseException:
                    # (no `as` target: Cython's warn.unused_result flags it)
                    exc = sys.exc_info()[1]
                    # Cannot watch the eventfd: finish this batch by waiting
                    # (blocking), then continue on the pwritev backend.
                    self._settle_inflight(True)
                    self._abandon_ring(f"cannot watch the io_uring eventfd: "
                                       f"{exc!r}")
                    return
            self._abandon_ring(f"io_uring submit failed: "
                               f"{os.strerror(-rc)} [{_errname(-rc)}]")
        self._start_job(b)

    cdef _on_ready(self):
        """Eventfd readable: reap completions; finish the batch if complete."""
        cdef _Batch b = self._inflight
        cdef int err
        cdef int fd = self._fd
        if b is None or not self._uring:
            if self._ring_open:
                ul_ring_reap(&self._ring, NULL)     # stray wakeup: drain
            return
        if ul_ring_reap(&self._ring, &b.cb) != 1:
            return                  # more completions to come
        with nogil:                 # blocks only on the short-write retry path
            err = ul_batch_finish(fd, &b.cb)
        self._complete(b, err, True)

    cdef _arm_watchdog(self):
        if self._watchdog is None:
            self._watch_batch = self._n_batches
            self._watchdog = self._loop.call_later(_WATCHDOG_SECONDS, _watchdog_cb,
                                                   self._selfref)

    cdef _on_watchdog(self):
        """Every _WATCHDOG_SECONDS while io_uring batches are in flight: a
        batch that was already in flight a whole period ago gets its
        completions reaped without an eventfd wakeup. A lost wakeup would
        otherwise stall the writer (and its Raft group) forever: one such
        stall was seen in a debug-build test run under load and never
        reproduced. A reap that finds nothing costs one eventfd read."""
        global _rescued
        cdef _Batch b = self._inflight
        self._watchdog = None
        if b is None or not self._uring or not self._ring_open:
            return
        if self._n_batches == self._watch_batch:
            self._on_ready()
            if self._inflight is not b:
                _rescued += 1
                _log.warning("LogWriter %r: a batch completed without an eventfd "
                             "wakeup (found by the watchdog; %d so far)",
                             self.path, _rescued)
        if self._inflight is not None:
            self._arm_watchdog()

    cdef _start_job(self, _Batch b):
        """pwritev backend: run the batch on the worker thread."""
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    1, thread_name_prefix="objcache-logwriter")
            self._job = self._executor.submit(_pwritev_job, b, self._fd)
            self._job.add_done_callback(
                partial(_job_done_threadsafe, self._loop, self._selfref))
        except BaseException:
            # (no `as` target: Cython's warn.unused_result flags it)
            exc = sys.exc_info()[1]
            self._job_not_started(b, exc)

    cdef _job_not_started(self, _Batch b, object exc):
        if self._job is not None:       # it did start: wait for it
            self._settle_inflight(True)
            return
        self._inflight = None
        b._abandon(OSError(EIO, f"log writer cannot start I/O: {exc!r}",
                           self.path))
        self._kick(False)

    cdef _on_job_done(self):
        # The job may already have been settled synchronously; then
        # self._job is another job (or None) and this callback is stale.
        if self._job is not None and self._job.done():
            self._settle_inflight(True)

    cdef _settle_inflight(self, bint kick):
        """Wait (blocking if need be) until the kernel or the worker is done
        with the in-flight batch, then complete it."""
        cdef _Batch b = self._inflight
        cdef int rc
        cdef int err = EIO
        cdef int fd = self._fd
        if b is None:
            return
        if self._uring and self._ring_open:
            with nogil:
                rc = ul_ring_wait(&self._ring, &b.cb)
            if rc < 0:
                # The kernel may still read these buffers: never free them
                # (nor the ring). Their futures never resolve.
                _never_free.append(b)
                self._inflight = None
                self._ring_open = False
                self._uring = False
                return
            with nogil:
                err = ul_batch_finish(fd, &b.cb)
        elif self._job is not None:
            job, self._job = self._job, None
            if job.exception() is None:     # blocks until the job is done
                err = job.result()
        self._complete(b, err, kick)

    cdef _complete(self, _Batch b, int err, bint kick):
        """The batch is finished: the kernel/worker no longer uses it."""
        if self._inflight is b:
            self._inflight = None
        self._n_syncs += b.cb.syncs
        if err == 0:
            self._offset = b.cb.start + b.cb.total
        # else: the file was truncated back to b.cb.start; _offset stays.
        b._resolve(err, self.path)
        if kick:
            self._kick(True)

    cdef _stop_reader(self):
        self._reader_on = False
        try:
            if not self._loop.is_closed():
                self._loop.remove_reader(ul_ring_fd(&self._ring))
        except Exception:
            pass

    cdef _abandon_ring(self, str reason):
        """Stop using io_uring for good (no batch of it may be in flight)."""
        _log_fallback(reason, True)
        if self._reader_on:
            self._stop_reader()
        if self._ring_open:
            ul_ring_close(&self._ring)
            self._ring_open = False
        self._uring = False

    async def _close_impl(self):
        try:
            while self._inflight is not None or self._pending:
                b = (self._pending[len(self._pending) - 1] if self._pending
                     else self._inflight)
                await (<_Batch>b).wait()
        finally:
            # Normally nothing is left here. If the wait was interrupted (the
            # loop is shutting down), finish the in-flight batch
            # synchronously and drop the rest before freeing anything.
            self._shutdown("close() was interrupted before this append "
                           "was written")

    cdef _shutdown(self, str why):
        """Settle the in-flight batch, abandon pending ones, free resources."""
        self._closed = True
        self._settle_inflight(False)
        pending, self._pending = self._pending, []
        for b in pending:
            (<_Batch>b)._abandon(LogWriterClosed(
                f"LogWriter {self.path!r}: {why}"))
        self._release()

    cdef _release(self):
        """Free the OS resources. Nothing may be in flight."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._reader_on:
            self._stop_reader()
        if self._ring_open:
            ul_ring_close(&self._ring)
            self._ring_open = False
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle; its thread exits
            self._executor = None
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
            OC_DEBUG_DEC(OC_LOG_WRITERS)

    def __del__(self):
        if self._fd < 0 and not self._ring_open:
            return
        warnings.warn(f"unclosed LogWriter {self.path!r}", ResourceWarning,
                      source=self)
        self._shutdown("the writer was garbage-collected without close()")

    def __dealloc__(self):
        # Last resort if __del__ did not run to the end. Never free a ring
        # with a batch in flight: wait for it first.
        if self._ring_open:
            if self._inflight is not None:
                ul_ring_wait(&self._ring, &self._inflight.cb)
            ul_ring_close(&self._ring)
            self._ring_open = False
        if self._fd >= 0:
            c_close(self._fd)
            self._fd = -1
            OC_DEBUG_DEC(OC_LOG_WRITERS)


# Loop callbacks get a weak reference: the loop never keeps a writer alive
# (see "Lifetimes" in the module docstring).

def _submit_cb(ref):
    cdef LogWriter w = ref()
    if w is not None:
        w._submit_next()


def _ready_cb(ref):
    cdef LogWriter w = ref()
    if w is not None:
        w._on_ready()


def _watchdog_cb(ref):
    cdef LogWriter w = ref()
    if w is not None:
        w._on_watchdog()


def _job_cb(ref):
    cdef LogWriter w = ref()
    if w is not None:
        w._on_job_done()


def _job_done_threadsafe(loop, ref, _):
    """Done-callback of a pwritev job, in the worker thread: hand over to
    the loop (one hop). A closed loop cannot take it; then the finalizer or
    close() settles the batch synchronously."""
    try:
        loop.call_soon_threadsafe(_job_cb, ref)
    except RuntimeError:
        pass


def _errname(int err):
    import errno
    return errno.errorcode.get(err, str(err))
