"""Durable log writer: parity of the io_uring extension, its compiled pwritev
fallback, and the pure-Python twin (contract: docs/logwriter.md).

Every behaviour runs on ``impl`` x ``backend``: the compiled module with
backend=None (io_uring when the kernel allows it) and backend="pwritev", and
the twin with both spellings of its only backend. Tests are plain functions
around ``asyncio.run`` (pytest-asyncio is not used); synchronization is by
awaiting futures, never by sleeping.
"""
import asyncio
import errno
import gc
import itertools
import logging
import os
import platform
import resource
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objcache._ext.errors import LogWriterClosed

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a project dependency
    uvloop = None

KiB = 1024
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def run(main, loop="asyncio"):
    """Run a coroutine on a fresh asyncio or uvloop event loop."""
    if loop == "uvloop":
        if uvloop is None:
            pytest.skip("uvloop is not installed")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


@pytest.fixture(params=["auto", "pwritev"])
def backend(request):
    return None if request.param == "auto" else request.param


@pytest.fixture
def Writer(impl, backend):
    """LogWriter factory of the implementation and backend under test."""
    def make(path, **kw):
        kw.setdefault("backend", backend)
        return impl.LogWriter(path, **kw)
    make.impl = impl
    make.backend = backend
    return make


def record(i, size):
    """Deterministic, position-revealing content for record number i."""
    pattern = i.to_bytes(4, "little") + b"<>"
    return (pattern * (size // len(pattern) + 1))[:size]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def as_kind(data, kind):
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(b"!" + data + b"!")[1:-1]
    if kind == "numpy":
        return np.frombuffer(data, dtype=np.uint8).copy()
    return data


# ---- content, offsets, ordering ----------------------------------------

def _check_log(path, results, start=0):
    """results: {call_index: (offset, bytes)}; records must sit back to back
    in call order, and the file must be exactly their concatenation."""
    expect = start
    chunks = []
    for i in sorted(results):
        off, data = results[i]
        assert off == expect, f"record {i} at {off}, expected {expect}"
        expect += len(data)
        chunks.append(data)
    assert read(path)[start:] == b"".join(chunks)
    return expect


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_concurrent_appenders_content_and_offsets(Writer, tmp_path, loop):
    path = tmp_path / "log"
    results = {}
    counter = itertools.count()

    async def appender(w, k):
        for j in range(10):
            i = next(counter)
            data = record(i, (k * 37 + j * 101) % 5000)
            results[i] = (await w.append(data), data)

    async def main():
        async with Writer(path) as w:
            assert w.offset == 0 and not w.closed
            await asyncio.gather(*(appender(w, k) for k in range(32)))
            end = _check_log(path, results)
            assert w.offset == end
            assert w.stats["appends"] == 320
        assert w.closed

    run(main(), loop)


_files = itertools.count()     # unique file per Hypothesis example
_task_plan = st.lists(   # tasks; each a list of (size, yields first, kind)
    st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 3),
                       st.sampled_from(["bytes", "bytearray", "memoryview",
                                        "numpy"])),
             min_size=1, max_size=5),
    min_size=1, max_size=10)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=_task_plan, prefix=st.integers(0, 3000))
def test_random_interleavings_match_ack_order(Writer, tmp_path, plan,
                                              prefix):
    path = tmp_path / f"log{next(_files)}"
    path.write_bytes(b"P" * prefix)
    results = {}
    counter = itertools.count()

    async def task(w, steps):
        for size, yields, kind in steps:
            for _ in range(yields):
                await asyncio.sleep(0)      # a scheduling point, not a wait
            i = next(counter)
            data = record(i, size)
            results[i] = (await w.append(as_kind(data, kind)), data)

    async def main():
        async with Writer(path) as w:
            assert w.offset == prefix
            await asyncio.gather(*(task(w, steps) for steps in plan))
            assert w.offset == _check_log(path, results, start=prefix)
            st_ = w.stats
            assert st_["appends"] == sum(map(len, plan))
            assert st_["batches"] <= st_["appends"]

    run(main())
    assert read(path)[:prefix] == b"P" * prefix


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_group_commit_batches_concurrent_appends(Writer, tmp_path, loop):
    rounds, appenders = 8, 64

    async def appender(w, k):
        for j in range(rounds):
            await w.append(record(k * rounds + j, 4 * KiB))

    async def main():
        async with Writer(tmp_path / "log") as w:
            await asyncio.gather(*(appender(w, k) for k in range(appenders)))
            return w.stats

    stats = run(main(), loop)
    assert stats["appends"] == rounds * appenders
    assert stats["batches"] < stats["appends"]
    # The batching rule: appends made in the same loop iteration share a
    # batch, and tasks woken by a batch's completion append before the next
    # batch is formed - so each round is exactly one batch, one fdatasync.
    assert stats["batches"] == rounds
    assert stats["syncs"] == stats["batches"]
    assert os.path.getsize(tmp_path / "log") == rounds * appenders * 4 * KiB


def test_more_than_iov_max_records_in_one_batch(Writer, tmp_path):
    n = 2 * 1024 + 500          # > 2 * IOV_MAX: three writev SQEs / calls
    path = tmp_path / "log"
    datas = [record(i, 1 + i % 97) for i in range(n)]

    async def main():
        async with Writer(path) as w:
            futs = [w.append(d) for d in datas]     # one loop iteration
            offs = await asyncio.gather(*futs)
            return offs, w.stats, w.offset

    offs, stats, end = run(main())
    assert stats == {"batches": 1, "appends": n, "syncs": 1}
    assert end == sum(map(len, datas))
    sizes = [len(d) for d in datas]
    assert offs == list(itertools.accumulate([0] + sizes))[:n]
    assert read(path) == b"".join(datas)


def test_reopen_appends_after_existing_data(Writer, tmp_path):
    path = tmp_path / "log"

    async def session(payloads):
        async with Writer(path) as w:
            start = w.offset
            return start, [await w.append(p) for p in payloads]

    s1, offs1 = run(session([b"a" * 10, b"b" * 20]))
    s2, offs2 = run(session([b"c" * 5]))
    assert (s1, offs1) == (0, [0, 10])
    assert (s2, offs2) == (30, [30])
    assert read(path) == b"a" * 10 + b"b" * 20 + b"c" * 5


def test_zero_length_append_is_a_barrier(Writer, tmp_path):
    path = tmp_path / "log"

    async def main():
        async with Writer(path) as w:
            assert await w.append(b"") == 0
            f1 = w.append(b"x" * 100)
            f0 = w.append(b"")              # same batch as f1, after it
            assert await f0 == 100
            assert f1.done() and f1.result() == 0
            assert await w.append(memoryview(b"")) == 100
            assert w.offset == 100
            assert w.stats["syncs"] == 1    # empty batches need no sync

    run(main())
    assert read(path) == b"x" * 100


def test_flush_waits_for_everything_so_far(Writer, tmp_path):
    async def main():
        async with Writer(tmp_path / "log") as w:
            await w.flush()                 # nothing pending: returns
            futs = [w.append(record(i, 1000)) for i in range(50)]
            await w.flush()
            assert all(f.done() for f in futs)
            assert w.offset == 50_000
            futs2 = [w.append(b"y")]
            await asyncio.sleep(0)          # let the batch be submitted
            futs2.append(w.append(b"z"))    # joins the next batch
            await w.flush()
            assert all(f.done() for f in futs2) and w.offset == 50_002

    run(main())


def test_cancelled_append_is_still_written(Writer, tmp_path):
    path = tmp_path / "log"

    async def main():
        async with Writer(path) as w:
            fut = w.append(b"kept")
            fut.cancel()                    # the awaiter gives up ...
            await w.flush()                 # ... but the record is written
            assert w.offset == 4

    run(main())
    assert read(path) == b"kept"


def test_buffer_is_pinned_until_durable(Writer, tmp_path):
    async def main():
        async with Writer(tmp_path / "log") as w:
            buf = bytearray(b"abc")
            fut = w.append(buf)
            with pytest.raises(BufferError):
                buf.extend(b"def")          # exported: cannot move under I/O
            await fut
            buf.extend(b"def")              # released once durable

    run(main())


# ---- close, misuse -----------------------------------------------------

def test_closed_writer_raises_and_close_is_idempotent(Writer, tmp_path):
    async def main():
        w = Writer(tmp_path / "log")
        await w.append(b"data")
        await w.close()
        assert w.closed
        with pytest.raises(LogWriterClosed):
            w.append(b"more")
        with pytest.raises(LogWriterClosed):
            await w.append(b"more")
        await w.close()                     # idempotent
        await w.flush()                     # nothing pending: fine
        assert w.offset == 4
        assert w.stats["appends"] == 1

    run(main())


def test_close_waits_for_pending_appends(Writer, tmp_path):
    path = tmp_path / "log"
    datas = [record(i, 3000) for i in range(200)]

    async def main():
        w = Writer(path)
        futs = [w.append(d) for d in datas[:100]]
        await asyncio.sleep(0)              # first batch in flight
        futs += [w.append(d) for d in datas[100:]]
        closing = asyncio.ensure_future(w.close())
        await asyncio.sleep(0)
        assert w.closed
        with pytest.raises(LogWriterClosed):
            w.append(b"late")
        await asyncio.gather(w.close(), closing)    # concurrent closes
        assert all(f.done() and not f.cancelled() for f in futs)
        return [f.result() for f in futs]

    offs = run(main())
    assert offs == [3000 * i for i in range(200)]
    assert read(path) == b"".join(datas)


def test_cancelling_close_does_not_abort_it(Writer, tmp_path):
    async def main():
        w = Writer(tmp_path / "log")
        fut = w.append(b"x" * 10)
        closing = asyncio.ensure_future(w.close())
        await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert await fut == 0               # still completed
        await w.close()                     # finishes the same closing
        assert w.closed

    run(main())


@pytest.mark.parametrize("bad", ["text", 42, None, [b"a"], object()])
def test_non_buffer_data_is_a_type_error(Writer, tmp_path, bad):
    async def main():
        async with Writer(tmp_path / "log") as w:
            with pytest.raises(TypeError, match="bytes-like object"):
                w.append(bad)
            assert await w.append(b"ok") == 0
            assert w.stats["appends"] == 1

    run(main())


@pytest.mark.parametrize("make_bad", [
    lambda: memoryview(bytearray(100))[::2],
    lambda: np.arange(100, dtype=np.uint8)[::2],
    lambda: np.zeros((8, 8), dtype=np.uint8, order="F"),
    lambda: np.zeros((8, 8), dtype=np.int32)[:, :4],
], ids=["memoryview-strided", "numpy-strided", "numpy-fortran",
        "numpy-2d-slice"])
def test_non_contiguous_buffer_is_a_value_error(Writer, tmp_path, make_bad):
    async def main():
        async with Writer(tmp_path / "log") as w:
            with pytest.raises(ValueError, match="C-contiguous"):
                w.append(make_bad())
            assert w.offset == 0 and w.stats["appends"] == 0

    run(main())


def test_contiguous_numpy_arrays_write_their_memory(Writer, tmp_path):
    path = tmp_path / "log"
    arrays = [np.arange(12, dtype=np.float64).reshape(3, 4),
              np.arange(10, dtype=">i4"),         # non-native byte order
              np.float32(1.5),                    # 0-d
              np.zeros((4, 4), dtype=np.uint16)[1:3]]

    async def main():
        async with Writer(path) as w:
            return [await w.append(a) for a in arrays]

    offs = run(main())
    blobs = [np.ascontiguousarray(a).tobytes() for a in arrays]
    assert offs == list(itertools.accumulate([0] + list(map(len, blobs))))[:4]
    assert read(path) == b"".join(blobs)


def test_backend_argument(Writer, tmp_path):
    async def main():
        with pytest.raises(ValueError, match="backend"):
            Writer(tmp_path / "log", backend="aio")
        async with Writer(tmp_path / "log") as w:
            if Writer.backend == "pwritev" or Writer.impl.IMPL == "python":
                assert w.backend == "pwritev"
            else:
                assert w.backend in ("io_uring", "pwritev")
            assert w.path == str(tmp_path / "log")

    run(main())


def test_twin_refuses_io_uring(py_impl, tmp_path):
    async def main():
        with pytest.raises(ValueError, match="io_uring"):
            py_impl.LogWriter(tmp_path / "log", backend="io_uring")
    run(main())
    assert not (tmp_path / "log").exists()


def test_needs_a_loop_and_only_one_loop(Writer, tmp_path):
    with pytest.raises(RuntimeError, match="event loop"):
        Writer(tmp_path / "nolog")          # no running loop, no loop=

    async def create():
        w = Writer(tmp_path / "log")
        await w.append(b"1")
        return w

    w = run(create())                       # its loop is now closed

    async def elsewhere():
        with pytest.raises(RuntimeError, match="different event loop"):
            w.append(b"2")
        with pytest.raises(RuntimeError, match="different event loop"):
            await w.flush()
        await w.close()     # allowed: the writer's own loop is gone

    run(elsewhere())
    assert w.closed
    with pytest.raises(RuntimeError, match="event loop"):
        w.append(b"3")      # no loop running at all
    assert read(tmp_path / "log") == b"1"


def test_explicit_loop_argument(Writer, tmp_path):
    loop = asyncio.new_event_loop()
    try:
        w = Writer(tmp_path / "log", loop=loop)   # constructed outside it

        async def main():
            assert await w.append(b"abc") == 0
            await w.close()

        loop.run_until_complete(main())
    finally:
        loop.close()
    assert read(tmp_path / "log") == b"abc"


def test_unclosed_writer_warns_and_frees(Writer, tmp_path):
    async def main():
        w = Writer(tmp_path / "log")
        await w.append(b"durable")
        return w

    w = run(main())
    with pytest.warns(ResourceWarning, match="unclosed LogWriter"):
        del w
        gc.collect()
    assert read(tmp_path / "log") == b"durable"


def test_dropped_writer_finishes_in_flight_and_fails_pending(Writer,
                                                             tmp_path):
    """The loop holds only weak references: dropping an unclosed writer
    collects it at once; the finalizer completes the batch in flight and
    fails the appends not yet submitted."""
    async def main():
        w = Writer(tmp_path / "log")
        f1 = w.append(b"a" * 10)
        await asyncio.sleep(0)              # f1's batch is submitted
        f2 = w.append(b"b")                 # waits for the next batch
        with pytest.warns(ResourceWarning, match="unclosed LogWriter"):
            del w
        assert await f1 == 0
        with pytest.raises(LogWriterClosed, match="garbage-collected"):
            await f2

    run(main())
    assert read(tmp_path / "log") == b"a" * 10


def test_loop_closed_with_append_in_flight(Writer, tmp_path):
    """The loop goes away while a batch may be in flight: collecting the
    writer waits for the kernel/worker, then frees everything."""
    async def main():
        w = Writer(tmp_path / "log")
        w.append(b"z" * 4096)       # never awaited
        return w

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        w = run(main())
        del w
        gc.collect()
    assert os.path.getsize(tmp_path / "log") in (0, 4096)


def test_uninitialised_writer_does_not_crash(impl):
    w = impl.LogWriter.__new__(impl.LogWriter)
    assert w.closed
    with pytest.raises(RuntimeError):
        w.append(b"x")
    asyncio.run(w.close())
    del w
    gc.collect()


# ---- I/O errors --------------------------------------------------------

def _fill(path):
    """Append to `path` until the file system is full; return its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        chunk = b"F" * (64 * KiB)
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    chunk = chunk[:4096]
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 4096:
                    break
                chunk = chunk[:4096]
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@pytest.mark.root
def test_full_disk_fails_batch_and_recovers(Writer, small_tmpfs):
    log, filler = small_tmpfs / "log", small_tmpfs / "filler"
    acked = [record(i, 4 * KiB) for i in range(3)]

    async def main():
        async with Writer(log) as w:
            for i, data in enumerate(acked):
                assert await w.append(data) == i * 4 * KiB
            size = _fill(filler)
            os.truncate(filler, size - 8 * KiB)    # two free pages left
            # One batch: the first writev is short (8 KiB fit), then the
            # disk is full. Every append of the batch fails with ENOSPC.
            big = w.append(record(9, 64 * KiB))
            small = w.append(record(10, 100))
            for fut in (big, small):
                with pytest.raises(OSError) as err:
                    await fut
                assert err.value.errno == errno.ENOSPC
            assert w.offset == 12 * KiB
            assert read(log) == b"".join(acked)    # rewound, nothing lost
            # Still full: a new batch fails the same way.
            _fill(filler)
            with pytest.raises(OSError) as err:
                await w.append(record(11, 8 * KiB))
            assert err.value.errno == errno.ENOSPC
            with pytest.raises(OSError):
                await asyncio.gather(w.append(b"a"), w.flush())
            assert w.offset == 12 * KiB
            os.unlink(filler)                      # free space again
            assert await w.append(record(12, 4 * KiB)) == 12 * KiB
            await w.flush()
            assert w.offset == 16 * KiB

    run(main())
    assert read(log) == b"".join(acked) + record(12, 4 * KiB)


def test_short_write_error_reports_errno_and_rewinds(Writer, tmp_path):
    """RLIMIT_FSIZE makes the kernel write part of a batch and then fail it
    with EFBIG: the same path as a full disk, without needing root."""
    path = tmp_path / "log"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 256 * KiB
    if hard != resource.RLIM_INFINITY and hard < 2 * limit:
        pytest.skip("RLIMIT_FSIZE hard limit too low for this test")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    async def main():
        async with Writer(path) as w:
            assert await w.append(record(0, 192 * KiB)) == 0
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            try:
                futs = [w.append(record(1, 100 * KiB)),
                        w.append(record(2, 10))]
                results = await asyncio.gather(*futs, return_exceptions=True)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            for exc in results:
                assert isinstance(exc, OSError) and exc.errno == errno.EFBIG
            assert str(path) in str(results[0])
            assert w.offset == 192 * KiB
            assert read(path) == record(0, 192 * KiB)
            assert await w.append(record(3, 100 * KiB)) == 192 * KiB

    try:
        run(main())
    finally:
        signal.signal(signal.SIGXFSZ, old_handler)
    assert read(path) == record(0, 192 * KiB) + record(3, 100 * KiB)


# ---- compiled module: io_uring fallback ---------------------------------

def test_no_uring_env_forces_fallback_and_logs_once(c_impl, tmp_path,
                                                    monkeypatch, caplog):
    mod = c_impl.logwriter
    monkeypatch.setenv("OBJCACHE_NO_URING", "1")
    mod._forget_fallback_log()
    caplog.set_level(logging.INFO, logger="objcache._ext.logwriter")

    async def main():
        async with mod.LogWriter(tmp_path / "a") as w1:
            assert w1.backend == "pwritev"
            assert await w1.append(b"one") == 0
        async with mod.LogWriter(tmp_path / "b") as w2:
            assert w2.backend == "pwritev"
        # An explicit request wins over the environment.
        try:
            async with mod.LogWriter(tmp_path / "c", backend="io_uring") as w3:
                assert w3.backend == "io_uring"
        except OSError as exc:      # io_uring refused on this machine
            assert exc.errno in (errno.EPERM, errno.ENOSYS)

    run(main())
    lines = [r for r in caplog.records
             if r.name == "objcache._ext.logwriter"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "pwritev" in lines[0].getMessage()
    assert "OBJCACHE_NO_URING" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()


def test_a_lost_eventfd_wakeup_is_reaped_by_the_watchdog(c_impl, tmp_path, monkeypatch,
                                                         caplog):
    """io_uring completions normally arrive through the ring's eventfd. If
    that wakeup were lost (the loop never calls the reader back), the
    watchdog reaps the batch anyway: the writer is late, never stuck."""
    mod = c_impl.logwriter
    monkeypatch.setattr(mod, "_WATCHDOG_SECONDS", 0.05)
    caplog.set_level(logging.WARNING, logger="objcache._ext.logwriter")

    class DeafLoop(asyncio.SelectorEventLoop):
        def add_reader(self, fd, callback, *args):
            pass                                # the eventfd is never watched

    async def main():
        try:
            w = mod.LogWriter(tmp_path / "log", backend="io_uring")
        except OSError as exc:                  # io_uring refused on this machine
            pytest.skip(f"io_uring unavailable: {exc}")
        async with w:
            before = mod._rescued
            offs = await asyncio.wait_for(asyncio.gather(
                *(w.append(record(i, 100)) for i in range(3))), 10)
            assert offs == [0, 100, 200]
            assert await asyncio.wait_for(w.append(record(3, 100)), 10) == 300
            assert mod._rescued >= before + 2        # both batches were rescued

    with asyncio.Runner(loop_factory=DeafLoop) as runner:
        runner.run(main())
    assert any("without an eventfd wakeup" in r.getMessage() for r in caplog.records)


_SECCOMP_CHILD = textwrap.dedent("""
    import asyncio, ctypes, errno, logging, struct, sys
    ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[sys.argv[2]]
    NR_IO_URING_SETUP = 425
    # Classic BPF: if arch matches and nr == io_uring_setup: ERRNO(EPERM).
    insns = [(0x20, 0, 0, 4), (0x15, 0, 3, ARCH), (0x20, 0, 0, 0),
             (0x15, 0, 1, NR_IO_URING_SETUP),
             (0x06, 0, 0, 0x00050000 | errno.EPERM), (0x06, 0, 0, 0x7FFF0000)]
    prog = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HxxxxxxP", len(insns), ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    assert libc.prctl(38, 1, 0, 0, 0) == 0            # NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.addressof(fbuf), 0, 0) == 0, \\
        ctypes.get_errno()                            # SECCOMP_MODE_FILTER
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s",
                        stream=sys.stdout)
    from objcache._ext import _logwriter

    async def main():
        for name in ("a", "b"):
            async with _logwriter.LogWriter(sys.argv[1] + name) as w:
                print("backend", w.backend, await w.append(b"xyz"))
        try:
            _logwriter.LogWriter(sys.argv[1] + "c", backend="io_uring")
        except OSError as exc:
            print("explicit", errno.errorcode[exc.errno])
    asyncio.run(main())
""")


def test_seccomp_refusal_falls_back_to_pwritev(c_impl, tmp_path):
    """io_uring_setup blocked by a seccomp filter (as in many container
    runtimes): the writer falls back and logs one line saying why."""
    arch = platform.machine()
    if arch not in ("x86_64", "aarch64"):
        pytest.skip(f"seccomp filter in this test is for x86_64/aarch64, "
                    f"not {arch}")
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("OBJCACHE_NO_URING", None)
    res = subprocess.run([sys.executable, "-c", _SECCOMP_CHILD,
                          str(tmp_path / "log"), arch],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out.count("backend pwritev 0") == 2, out
    logs = [line for line in out if line.startswith("LOG ")]
    assert len(logs) == 1, out
    assert "io_uring_queue_init" in logs[0] and "EPERM" in logs[0]
    assert "explicit EPERM" in out
