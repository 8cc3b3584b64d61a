"""ChunkCache: the node-local chunk cache (memory arena + disk tier).

A chunk is ``key = (inode, index)`` at a ``version``; the content of a
(key, version) never changes, and a newer version supersedes older ones.
Reads go memory -> disk -> ``loader`` (e.g. an S3 ranged GET straight into
the arena page); writes store a new version, durably first when dirty.
Design, rules and measurements: docs/cache.md.

Ownership and lifetimes (the invariants the code below maintains)
-----------------------------------------------------------------
Everything runs on ONE event loop thread; only blocking file work (and big
memcpys) runs in a bounded thread pool, on buffers the loop thread created
and releases.

* **Pages.** The memory tier is one ``PageArena`` of chunk-sized pages. A page
  is in exactly one of these states:

  - *free* (in the arena's free list);
  - *owned by an operation* (a load filling it, a write building it): not
    visible to anyone else; the operation installs it or gives it back;
  - *indexed*: ``_mem[key]`` is a ``_MemEntry`` for it, and the memory
    policy tracks the key (except while the entry is being demoted);
  - *orphaned*: in ``_orphans`` — dropped from the index (superseded,
    discarded, evicted during a demotion, or an old version handed to a
    reader) while something still pins it. It returns to the free list in
    ``_reclaim_orphans`` once its pin count is zero.

  An indexed page's content never changes: writes always build a NEW page
  (copy-on-write), so a view handed out earlier keeps showing its version.
* **Pins.** Every ``ChunkView`` holds a slice of an arena view, i.e. one
  pin, until ``release()`` (or until the last object derived from its
  ``data`` dies). A finished load keeps a "master" view (one pin) until
  every reader that waited for it has taken its own view. A demotion holds a
  view while it copies the page to disk. The cache never frees, reuses or
  evicts a page whose ``pin_count`` is not zero: eviction skips it.
* **Versions.** For each key, the memory index and the disk index hold at
  most one version each, and never one older than the other: installing a
  version in either tier removes older versions from both. A load or write
  that finishes after a newer version was installed (or after ``discard``)
  installs nothing. ``read(key, v)`` returns only content of version ``v``.
* **Dirty.** A dirty chunk is durable in the disk tier (file + directory
  fsync'ed) before ``write()`` returns; it may also be in memory. Dirty
  files are never evicted; only ``mark_clean`` (same version) or
  ``discard``/a newer version remove them. A memory copy of a dirty chunk
  can be evicted freely (the disk copy is the durable one).
* **Single flight.** ``_flights[(key, version)]`` is the one operation
  producing that version: a load (memory miss), or a write in progress.
  Readers of the same (key, version) wait for it instead of starting their
  own; a load's exception reaches every waiter and is not cached.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from objcache._ext import ArenaFullError, PageArena, PagePinnedError, crc32c

from .disk import CorruptChunkError, DiskEntry, DiskTier, file_size
from .policy import make_policy

__all__ = ["ChunkCache", "ChunkView", "CacheClosedError", "CacheFullError",
           "StaleVersionError", "CorruptChunkError", "DEFAULT_CHUNK_SIZE"]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 << 20
_U64 = 1 << 64
#: Writes building a chunk of at least this many bytes copy in the executor
#: (a memcpy of 8 MiB holds the loop for ~1 ms).
_INLINE_BUILD = 256 << 10
#: How often a task waiting for a page re-checks pins released by objects
#: derived from views (those releases are not observable otherwise).
_PIN_POLL = 0.05
_ZEROS = bytes(1 << 20)


class CacheClosedError(RuntimeError):
    """The cache is closed (or not open yet)."""


class CacheFullError(ArenaFullError):
    """Every memory page stayed pinned (by live views) or busy for
    ``pin_wait_timeout`` seconds; the read could not get a page."""


class StaleVersionError(ValueError):
    """write() of a version older than one the cache already holds."""


class _Retry(Exception):
    """Internal: the flight a reader waited for produced no page it can use
    (a readahead found no free page; a write failed or kept no memory copy).
    The reader tries again on its own."""


class _Op:
    """A cache operation in progress on one key (load, write, demotion).
    ``discard(key)`` sets ``discarded``; the operation then installs nothing."""
    __slots__ = ("key", "discarded")

    def __init__(self, key):
        self.key = key
        self.discarded = False


class _Flight(_Op):
    """The single producer of one (key, version). ``waiters`` readers are
    awaiting ``task``; on success ``master`` is a read-only view of the page
    (one pin) that keeps the page until each waiter has taken its own view;
    the last waiter (or the task itself, if none is left) releases it."""
    __slots__ = ("version", "kind", "task", "waiters", "master", "page", "length",
                 "readahead")

    def __init__(self, key, version, kind, readahead=False):
        super().__init__(key)
        self.version = version
        self.kind = kind             # "load" or "write"
        self.task: asyncio.Task | None = None
        self.waiters = 0
        self.master: memoryview | None = None
        self.page = -1
        self.length = 0
        self.readahead = readahead

    def drop_master(self) -> None:
        m, self.master = self.master, None
        if m is not None:
            m.release()


@dataclass(eq=False, slots=True)
class _MemEntry:
    key: tuple[int, int]
    version: int
    page: int
    length: int
    busy: bool = False           # a demotion is copying the page to disk


class ChunkView:
    """A pinned, read-only view of one version of one chunk.

    ``data`` is a read-only memoryview of exactly ``length`` bytes over the
    arena page ``page`` (byte ``offset`` in ``cache.arena.fd``). The page stays
    pinned — never evicted, reused or changed — until ``release()`` (or the
    end of a ``with`` block) AND every object derived from ``data`` (slices,
    ``numpy.frombuffer``, ``torch.frombuffer``) is gone. Release views
    promptly: a pinned page is memory the cache cannot use.
    """
    __slots__ = ("key", "version", "length", "page", "_data", "_cache")
    owned = False               # the arena's page: copy what outlives the view
    start = 0                   # chunk offset of data[0] (a whole chunk)

    def __init__(self, cache: "ChunkCache", key, version: int, page: int,
                 length: int, data: memoryview):
        self._cache = cache
        self.key = key
        self.version = version
        self.page = page
        self.length = length
        self._data = data

    @property
    def data(self) -> memoryview:
        if self._data is None:
            raise ValueError("this ChunkView has been released")
        return self._data

    @property
    def offset(self) -> int:
        """Byte offset of the page in the arena mapping and its memfd."""
        return self.page * self._cache.page_size

    @property
    def released(self) -> bool:
        return self._data is None

    def release(self) -> None:
        """Drop this view's pin (idempotent). If objects derived from
        ``data`` are still alive, the pin lasts until they die."""
        d, self._data = self._data, None
        if d is None:
            return
        try:
            d.release()
        except BufferError:
            pass              # exported (e.g. numpy): the pin dies with the export
        self._cache._view_released()

    def __enter__(self) -> "ChunkView":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        return self.data[item]

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def tobytes(self) -> bytes:
        return self.data.tobytes()

    def __repr__(self) -> str:
        state = "released" if self._data is None else f"page {self.page}"
        return (f"<ChunkView {self.key} v{self.version} {self.length} B, {state}>")


def _check_key(key) -> tuple[int, int]:
    if type(key) is tuple and len(key) == 2:           # the fast, common case
        a, b = key
        if type(a) is int and type(b) is int and 0 <= a < _U64 and 0 <= b < _U64:
            return key
    try:
        inode, index = key
    except (TypeError, ValueError):
        raise TypeError(f"a chunk key is (inode, index), not {key!r}") from None
    for x in (inode, index):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < _U64:
            raise ValueError(f"chunk key parts must be ints in [0, 2**64): {key!r}")
    return (inode, index)


def _check_version(version) -> int:
    if type(version) is int and 0 <= version < _U64:
        return version
    if isinstance(version, bool) or not isinstance(version, int) \
            or not 0 <= version < _U64:
        raise ValueError(f"a chunk version is an int in [0, 2**64), not {version!r}")
    return version


def _build(dst, base, base_len: int, offset: int, src) -> int:
    """Fill ``dst`` (the new chunk, exactly its length) = ``base`` with
    ``src`` written at ``offset``, zeros in any gap; return its CRC-32C."""
    if base is not None and base_len:
        dst[:base_len] = base[:base_len]
    pos = base_len
    while pos < offset:                     # a hole between old end and offset
        n = min(offset - pos, len(_ZEROS))
        dst[pos:pos + n] = _ZEROS[:n]
        pos += n
    dst[offset:offset + len(src)] = src
    return crc32c(dst)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class ChunkCache:
    """The node-local chunk cache. See the module docstring and docs/cache.md.

    ``directory``: the disk tier's directory (created). ``memory_bytes``:
    arena size (rounded down to whole pages; at least one page).
    ``disk_bytes``: disk tier budget (headers included; 0 = no disk tier:
    evicted chunks are dropped and dirty writes fail with ENOSPC).
    ``chunk_size``: the fixed chunk size; a chunk may be shorter.

    Tuning (keyword-only): ``policy`` ("s3fifo" or "lru"),
    ``correlation_window`` (seconds; hits closer than this to the previous
    counted access of a chunk count once — a chunk read in many small
    pieces is one access), ``io_workers`` (executor threads),
    ``readahead_concurrency`` (background loads at once; more readahead
    requests are dropped), ``dirty_wait_timeout`` (seconds a dirty write
    waits for disk space before ENOSPC), ``pin_wait_timeout`` (seconds a read
    waits for a page when all are pinned before CacheFullError),
    ``verify_clean_on_open`` (CRC-check every clean file at open instead of
    on first read), ``always_verify_reads`` (CRC-check every disk-tier read,
    not only a file's first one).
    """

    def __init__(self, directory, *, memory_bytes: int, disk_bytes: int,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, loop=None,
                 policy: str = "s3fifo", correlation_window: float = 1.0,
                 io_workers: int = 4, readahead_concurrency: int = 4,
                 dirty_wait_timeout: float = 30.0, pin_wait_timeout: float = 5.0,
                 verify_clean_on_open: bool = False, always_verify_reads: bool = False):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        self.chunk_size = chunk_size
        self.page_size = (chunk_size + 4095) & ~4095
        self.npages = memory_bytes // self.page_size
        if self.npages < 1:
            raise ValueError(f"memory_bytes={memory_bytes} holds no "
                             f"{self.page_size}-byte page")
        self.directory = os.fspath(directory)
        self._loop = loop
        self._policy_name = policy
        self._pin_wait_timeout = pin_wait_timeout
        self._dirty_wait_timeout = dirty_wait_timeout
        self._readahead_limit = readahead_concurrency
        self._readahead_active = 0
        self._mem_policy = make_policy(policy, correlation_window=correlation_window)
        self._executor = ThreadPoolExecutor(max_workers=io_workers,
                                            thread_name_prefix="objcache-cache-io")
        self._disk = DiskTier(self.directory, disk_bytes, executor=self._executor,
                              policy=make_policy(policy,
                                                 correlation_window=correlation_window),
                              verify_clean_on_open=verify_clean_on_open,
                              always_verify_reads=always_verify_reads,
                              max_length=chunk_size)
        self._arena: PageArena | None = None
        self._mem: dict[tuple[int, int], _MemEntry] = {}
        self._mem_bytes = 0
        self._orphans: set[int] = set()
        self._flights: dict[tuple, _Flight] = {}
        self._ops: dict[tuple[int, int], set[_Op]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._page_event: asyncio.Event | None = None
        self._page_waiters = 0         # tasks in _take_page waiting for a release
        self._state = "new"            # new -> open -> closed
        self._stats = dict(memory_hits=0, memory_misses=0, disk_hits=0, disk_misses=0,
                           loads=0, load_errors=0, joins=0, promotions=0,
                           demotions=0, memory_evictions=0, readahead_started=0,
                           readahead_dropped=0, readahead_errors=0, pin_waits=0,
                           writes=0, demotion_errors=0)
        self._last_demotion_warning = float("-inf")

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> "ChunkCache":
        """Create the arena and recover the disk tier (docs/cache.md,
        "Recovery"): dirty chunks always come back; clean ones come back when
        intact (size-checked now, CRC-checked on first read or now with
        ``verify_clean_on_open``)."""
        if self._state != "new":
            raise RuntimeError("a ChunkCache is opened once")
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif self._loop is not running:
            raise RuntimeError("open() must run on the loop given to ChunkCache")
        self._page_event = asyncio.Event()
        self._arena = PageArena(self.page_size, self.npages, name="objcache-chunks")
        try:
            self.recovery = await self._disk.open(self._now())
        except BaseException:
            self._arena.close()
            self._executor.shutdown(wait=False)
            self._state = "closed"
            raise
        self._state = "open"
        return self

    async def close(self) -> None:
        """Finish writes and demand loads (readahead loads nobody waits for
        are cancelled), wait for background disk work, release the memory.
        Raises ``PagePinnedError`` (after closing everything else) if views
        are still alive: the arena then stays mapped until they are gone."""
        if self._state != "open":
            self._state = "closed"
            return
        # "closing": new calls are refused; operations in progress finish
        # and install as usual (a dirty write that returns is installed).
        self._state = "closing"
        for fl in list(self._flights.values()):
            if fl.readahead and fl.waiters == 0 and fl.task is not None:
                fl.task.cancel()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._disk.close()
        self._executor.shutdown(wait=True)
        self._state = "closed"
        for e in list(self._mem.values()):
            self._drop_mem_entry(e)
        self._reclaim_orphans()
        self._arena.close()

    async def __aenter__(self) -> "ChunkCache":
        return await self.open()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await self.close()
        except PagePinnedError:
            if exc_type is None:
                raise
            # The body failed (probably leaving views alive): its exception
            # is the one worth seeing.
            log.warning("chunk cache closed with pinned pages after an error")

    def _check_open(self) -> None:
        if self._state != "open":
            raise CacheClosedError(f"the chunk cache is {self._state}")

    def _now(self) -> float:
        return self._loop.time()

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    # -- public queries ----------------------------------------------------

    @property
    def arena(self) -> PageArena:
        """The page arena (one memfd: ``arena.fd``; page ``i`` at byte
        ``i * page_size``). For local zero-copy readers: hand out ``fd``,
        and a ``ChunkView``'s ``offset``/``length`` while you hold it."""
        if self._arena is None:
            raise CacheClosedError("the chunk cache is not open")
        return self._arena

    def peek(self, key) -> tuple[int, bool] | None:
        """``(newest cached version, dirty)`` or None. No I/O, no counters."""
        key = _check_key(key)
        m = self._mem.get(key)
        d = self._disk.get(key)
        if m is None and d is None:
            return None
        version = max(x.version for x in (m, d) if x is not None)
        return version, d is not None and d.version == version and d.dirty

    def dirty_chunks(self) -> list[tuple[tuple[int, int], int, int]]:
        """``[(key, version, length)]`` of every dirty chunk, sorted by key."""
        return sorted((e.key, e.version, e.length) for e in self._disk.dirty_entries())

    @property
    def stats(self) -> dict:
        s = dict(self._stats)
        ds = self._disk.stats
        s.update(
            memory_chunks=len(self._mem), memory_bytes=self._mem_bytes,
            memory_capacity=self.npages * self.page_size,
            memory_pages_free=self._arena.free_pages if self._arena else 0,
            orphan_pages=len(self._orphans),
            disk_chunks=len(self._disk), disk_bytes=self._disk.used,
            disk_capacity=self._disk.capacity, dirty_bytes=self._disk.dirty_bytes,
            dirty_chunks=sum(1 for _ in self._disk.dirty_entries()),
            disk_evictions=ds["evictions"], crc_errors=ds["crc_errors"],
            dropped_on_open=ds["dropped_on_open"], quarantined=ds["quarantined"],
            dirty_waits=ds["dirty_waits"], enospc=ds["enospc"],
            disk_writes=ds["writes"])
        return s

    # -- read --------------------------------------------------------------

    async def read(self, key, version: int, loader, *, readahead=()) -> ChunkView:
        """A pinned view of chunk ``key`` at exactly ``version``.

        Memory hit -> a view at once. Else one flight per (key, version):
        the disk tier (promoted into a memory page, CRC-checked), else
        ``loader(into)`` — ``into`` is a writable memoryview of the page
        (``chunk_size`` bytes); the loader fills it and returns the chunk's
        length (sync or async). The loader must not keep ``into`` or anything
        derived from it. Its exception reaches every waiter and is not cached.

        ``readahead``: ``[(key, version, loader), ...]`` to load in the
        background (at most ``readahead_concurrency`` at once; extra requests
        are dropped, not queued). A readahead never waits for a page.

        A version older than the cached one is loaded but not cached.
        Raises CacheFullError when every page stays pinned for
        ``pin_wait_timeout``.
        """
        self._check_open()
        key = _check_key(key)
        version = _check_version(version)
        first = True
        while True:
            e = self._mem.get(key)
            if e is not None and e.version == version:
                view = self._view(e)
                if first:
                    self._stats["memory_hits"] += 1
                if readahead:
                    self._start_readahead(readahead)
                return view
            fl = self._flights.get((key, version))
            if fl is None:
                fl = self._start_load(key, version, loader, readahead=False)
            else:
                self._stats["joins"] += 1
            if first:
                first = False
                self._stats["memory_misses"] += 1
                if readahead:               # after our own load: it runs first
                    self._start_readahead(readahead)
            fl.waiters += 1
            try:
                try:
                    await asyncio.shield(fl.task)
                except _Retry:
                    continue
                except Exception:
                    if fl.kind == "write":      # the writer got the error; we reload
                        continue
                    raise
                if fl.master is None:
                    continue
                # Our own export of the page (pin_count == live views); the
                # master view kept the page pinned until this point.
                data = self._arena.view(fl.page, readonly=True)[:fl.length]
                return ChunkView(self, key, version, fl.page, fl.length, data)
            finally:
                fl.waiters -= 1
                if fl.waiters == 0 and fl.task.done():
                    fl.drop_master()
                    self._view_released()

    def _view(self, e: _MemEntry) -> ChunkView:
        self._mem_policy.access(e.key, self._now())
        data = self._arena.view(e.page, readonly=True)[:e.length]
        return ChunkView(self, e.key, e.version, e.page, e.length, data)

    def _start_load(self, key, version, loader, *, readahead: bool) -> _Flight:
        fl = _Flight(key, version, "load", readahead=readahead)
        self._flights[(key, version)] = fl
        self._op_begin(fl)
        fl.task = self._track(self._loop.create_task(self._load(fl, loader)))
        return fl

    def _start_readahead(self, items) -> None:
        for key, version, loader in items:
            key = _check_key(key)
            version = _check_version(version)
            if (key, version) in self._flights:
                continue
            e = self._mem.get(key)
            if e is not None and e.version == version:
                continue
            if self._readahead_active >= self._readahead_limit:
                self._stats["readahead_dropped"] += 1
                continue
            self._readahead_active += 1
            self._stats["readahead_started"] += 1
            fl = self._start_load(key, version, loader, readahead=True)
            fl.task.add_done_callback(self._readahead_done)

    def _readahead_done(self, task: asyncio.Task) -> None:
        self._readahead_active -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, _Retry):
            self._stats["readahead_errors"] += 1
            log.debug("readahead load failed: %r", exc)

    async def _load(self, fl: _Flight, loader) -> None:
        """The body of a load flight: take a page, fill it from the disk
        tier or the loader, publish it (install + master view)."""
        try:
            try:
                page = await self._take_page(wait=not fl.readahead)
            except _NoPage:
                raise _Retry() from None
            ok = False
            try:
                length = await self._fill(fl, page, loader)
                ok = True
            finally:
                if not ok:
                    self._release_page(page)
            # Publish: no await from here to the end.
            fl.page, fl.length = page, length
            fl.master = self._arena.view(page, readonly=True)[:length]
            if not self._install_memory(fl, page, length):
                self._release_page(page)        # pinned by master: orphaned
        finally:
            self._end_flight(fl)

    def _end_flight(self, fl: _Flight) -> None:
        if self._flights.get((fl.key, fl.version)) is fl:
            del self._flights[(fl.key, fl.version)]
        self._op_end(fl)
        if fl.waiters == 0:
            fl.drop_master()
            self._view_released()

    async def _fill(self, fl: _Flight, page: int, loader) -> int:
        key, version = fl.key, fl.version
        d = self._disk.get(key)
        if d is not None and d.version == version:
            dst = self._arena.view(page)[:d.length]
            try:
                await self._disk.read_into(d, dst)
            except FileNotFoundError:
                pass                        # evicted meanwhile: load it
            except CorruptChunkError:
                self._disk.corrupt(d)
                if d.dirty:                 # the only copy: never substitute
                    raise
            else:
                self._stats["disk_hits"] += 1
                self._stats["promotions"] += 1
                self._disk.touch(key, self._now())
                return d.length
            finally:
                dst.release()
        self._stats["disk_misses"] += 1
        if loader is None:
            raise LookupError(f"chunk {key} v{version} is not cached and no loader "
                              f"was given")
        self._stats["loads"] += 1
        into = self._arena.view(page)[:self.chunk_size]
        try:
            n = loader(into)
            if inspect.isawaitable(n):
                n = await n
        except BaseException:
            self._stats["load_errors"] += 1
            raise
        finally:
            try:
                into.release()
            except BufferError:
                pass
        if self._arena.pin_count(page):
            log.warning("chunk loader for %s v%d kept a reference to its buffer; "
                        "the page stays pinned until it is dropped", key, version)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.chunk_size:
            self._stats["load_errors"] += 1
            raise ValueError(f"chunk loader returned {n!r}; it must return the "
                             f"chunk length, an int in [0, {self.chunk_size}]")
        return n

    # -- write -------------------------------------------------------------

    async def wait_for_dirty_room(self, length: int) -> None:
        """Admission for a dirty write of a ``length``-byte chunk version:
        waits up to ``dirty_wait_timeout`` while the disk tier is full of
        dirty data, then raises ``OSError(ENOSPC)``. A chunk owner calls it
        BEFORE proposing a write, so the writer gets the ENOSPC and the
        write's apply (``admitted=True``) never waits on the budget."""
        self._check_open()
        await self._disk.wait_for_room(file_size(length), timeout=self._dirty_wait_timeout)

    async def write(self, key, version: int, data, *, offset: int = 0,
                    base: ChunkView | None = None, dirty: bool = True,
                    admitted: bool = False) -> None:
        """Store ``version`` of chunk ``key``: ``base``'s content (or nothing)
        with ``data`` written at ``offset`` (zeros fill any gap); its length
        is ``max(base.length, offset + len(data))``.

        ``dirty=True``: when this returns, the chunk is durable on the disk
        tier (file fdatasync'ed, renamed, directory fsync'ed) and stays
        there until ``mark_clean(key, version)`` or ``discard``. If the disk
        tier is full of dirty data, waits up to ``dirty_wait_timeout`` for
        space, then raises ``OSError(ENOSPC)``; a real ENOSPC from the file
        system raises the same. Nothing written before is lost either way.

        ``admitted=True`` (a committed log entry being applied, admitted
        by ``wait_for_dirty_room`` before it was proposed): takes the space
        at once, past the budget if need be — never ENOSPC from the budget.

        ``dirty=False``: cached like a loaded chunk (memory, else disk).

        Raises StaleVersionError if a newer version is cached. A write that
        races with a newer one, or with ``discard``, installs nothing. If
        the caller is cancelled once the write has started, it completes in
        the background (it may or may not have taken effect).
        """
        self._check_open()
        key = _check_key(key)
        version = _check_version(version)
        src = memoryview(data).cast("B")       # any C-contiguous bytes-like
        n = len(src)
        if offset < 0 or offset + n > self.chunk_size:
            raise ValueError(f"write of {n} bytes at offset {offset} does not fit "
                             f"a {self.chunk_size}-byte chunk")
        base_mv, base_len = None, 0
        if base is not None:
            if not isinstance(base, ChunkView):
                raise TypeError("base must be a ChunkView")
            if base.key != key:
                raise ValueError(f"base is chunk {base.key}, not {key}")
            # Our own slice: keeps the base page pinned until the write is
            # done, even if the caller releases ``base`` meanwhile.
            base_mv = base.data[:]
            base_len = base.length
        length = max(base_len, offset + n)
        d = self._disk.get(key)
        if d is not None and d.version == version and (d.dirty or not dirty):
            # A replay of a version already held (a version's content never
            # changes): nothing to do, and nothing to make durable again.
            if base_mv is not None:
                base_mv.release()
            return
        res = None
        try:
            self._check_stale(key, version)
            if dirty and admitted:
                res = self._disk.overcommit(file_size(length))
            elif dirty:
                res = await self._disk.reserve(file_size(length),
                                               timeout=self._dirty_wait_timeout)
            self._check_open()
            self._check_stale(key, version)
            fl = None
            if (key, version) not in self._flights:
                fl = _Flight(key, version, "write")
                self._flights[(key, version)] = fl
            op = fl if fl is not None else _Op(key)
            self._op_begin(op)
            task = self._track(self._loop.create_task(
                self._write_core(op, fl, res, key, version, src, offset, base_mv,
                                 base_len, length, dirty)))
            if fl is not None:
                fl.task = task
        except BaseException:
            if res is not None:
                res.release()
            if base_mv is not None:
                base_mv.release()
            raise
        # From here the task owns res, base_mv and the flight.
        await asyncio.shield(task)

    def _check_stale(self, key, version: int) -> None:
        newest = self._newest_version(key)
        if newest is not None and newest > version:
            raise StaleVersionError(f"chunk {key}: version {version} is older than "
                                    f"the cached version {newest}")

    async def _write_core(self, op: _Op, fl: _Flight | None, res, key, version, src,
                          offset, base_mv, base_len, length, dirty) -> None:
        page = None
        dst = buf = None
        entry: DiskEntry | None = None
        try:
            try:
                page = await self._take_page(wait=False)
                dst = self._arena.view(page)[:length]
            except _NoPage:
                buf = bytearray(length)      # memory is all pinned: disk only
                dst = memoryview(buf)
            if length >= _INLINE_BUILD:
                crc = await self._loop.run_in_executor(
                    self._executor, _build, dst, base_mv, base_len, offset, src)
            else:
                crc = _build(dst, base_mv, base_len, offset, src)
            if dirty:
                r, res = res, None
                entry = await self._disk.write_file(r, key, version, dst, crc, dirty=True)
            elif page is None:
                r = self._disk.try_reserve(file_size(length))
                if r is not None:
                    try:
                        entry = await self._disk.write_file(r, key, version, dst, crc,
                                                            dirty=False)
                    except OSError as exc:
                        log.warning("chunk cache: could not keep %s v%d on disk: %s",
                                    key, version, exc)
            # Install: no await from here to the end.
            if op.discarded or (self._newest_version(key) or 0) > version:
                if entry is not None:
                    self._disk.drop_file(entry)
                return
            if entry is not None:
                self._install_disk(entry)
            if page is not None:
                if fl is not None:
                    fl.page, fl.length = page, length
                    fl.master = self._arena.view(page, readonly=True)[:length]
                if self._install_memory(op, page, length, version=version):
                    page = None                 # now indexed
            self._stats["writes"] += 1
        finally:
            if res is not None:
                res.release()
            if dst is not None:
                dst.release()
            if base_mv is not None:
                base_mv.release()
            src.release()
            if page is not None:
                self._release_page(page)
            if fl is not None:
                self._end_flight(fl)
            else:
                self._op_end(op)

    def mark_clean(self, key, version: int) -> None:
        """The chunk's ``version`` is in S3: it may be evicted now. A no-op
        if the cache holds another version (a newer dirty one stays dirty).
        The on-disk flag is updated in the background without fsync (a
        crash can bring the chunk back dirty: it is then written back
        again)."""
        self._check_open()
        self._disk.mark_clean(_check_key(key), _check_version(version), self._now())

    def discard(self, key) -> None:
        """Drop every version of ``key`` from both tiers, dirty or not, and
        make loads/writes of it in progress install nothing. Views already
        handed out stay valid. Files go in the background."""
        self._check_open()
        key = _check_key(key)
        for op in self._ops.get(key, ()):
            op.discarded = True
        e = self._mem.get(key)
        if e is not None:
            self._drop_mem_entry(e)
        self._disk.remove(key)

    # -- installing and superseding ----------------------------------------

    def _newest_version(self, key) -> int | None:
        m = self._mem.get(key)
        d = self._disk.get(key)
        if m is None:
            return None if d is None else d.version
        return m.version if d is None else max(m.version, d.version)

    def _install_memory(self, op: _Op, page: int, length: int, *,
                        version: int | None = None) -> bool:
        """Index ``page`` as the key's memory copy, superseding older versions
        in both tiers. False (nothing changes) if discarded, closing, or the
        cache holds this or a newer version already."""
        key = op.key
        if version is None:
            version = op.version
        if op.discarded:
            return False
        newest = self._newest_version(key)
        cur = self._mem.get(key)
        if newest is not None and newest > version:
            return False
        if cur is not None:
            if cur.version == version:
                return False
            self._drop_mem_entry(cur)
        d = self._disk.get(key)
        if d is not None and d.version < version:
            if d.dirty:
                log.warning("chunk cache: dirty %s v%d superseded by v%d before "
                            "being marked clean", key, d.version, version)
            self._disk.remove(key)
        self._mem[key] = _MemEntry(key, version, page, length)
        self._mem_bytes += length
        self._mem_policy.insert(key, 1, self._now())
        return True

    def _install_disk(self, entry: DiskEntry) -> bool:
        if not self._disk.install(entry, self._now()):
            return False
        cur = self._mem.get(entry.key)
        if cur is not None and cur.version < entry.version:
            self._drop_mem_entry(cur)
        return True

    def _op_begin(self, op: _Op) -> None:
        self._ops.setdefault(op.key, set()).add(op)

    def _op_end(self, op: _Op) -> None:
        s = self._ops.get(op.key)
        if s is not None:
            s.discard(op)
            if not s:
                del self._ops[op.key]

    # -- pages -------------------------------------------------------------

    def _view_released(self) -> None:
        """A ChunkView (or a flight's master view) was released: orphaned
        pages whose last pin it was go back to the arena now."""
        if self._state == "closed":
            return
        if self._orphans:
            self._reclaim_orphans()
        if self._page_waiters:
            self._wake_page_waiters()

    def _wake_page_waiters(self) -> None:
        # A fresh Event per round: waiters re-check, no wakeup is lost (one
        # thread, and they take the current Event before re-checking).
        if self._page_waiters:
            self._page_event.set()
            self._page_event = asyncio.Event()

    def _release_page(self, page: int) -> None:
        """Give back a page nobody indexes: free now, or orphan it until its
        pins are gone."""
        if self._arena.pin_count(page):
            self._orphans.add(page)
        else:
            self._arena.free(page)
            self._wake_page_waiters()

    def _reclaim_orphans(self) -> None:
        if not self._orphans:
            return
        for page in [p for p in self._orphans if not self._arena.pin_count(p)]:
            self._orphans.discard(page)
            self._arena.free(page)

    def _drop_mem_entry(self, e: _MemEntry) -> None:
        del self._mem[e.key]
        self._mem_bytes -= e.length
        self._mem_policy.remove(e.key)
        self._release_page(e.page)

    def _evictable(self, key) -> bool:
        e = self._mem[key]
        return not e.busy and not self._arena.pin_count(e.page)

    async def _take_page(self, *, wait: bool) -> int:
        """A page for a new chunk: a free one, else evict a clean unpinned
        chunk (demoting it to disk first if the disk tier lacks it and has
        room). When every page is pinned or busy: ``_NoPage`` if not
        ``wait``, else wait for a release up to ``pin_wait_timeout``, then
        CacheFullError."""
        deadline = None
        while True:
            self._reclaim_orphans()
            if self._arena.free_pages:
                return self._arena.allocate()
            page = await self._evict_one()
            if page is not None:
                return page
            if self._arena.free_pages or self._orphans_free():
                continue
            if not wait:
                raise _NoPage()
            now = self._now()
            if deadline is None:
                deadline = now + self._pin_wait_timeout
                self._stats["pin_waits"] += 1
            remaining = deadline - now
            if remaining <= 0:
                raise CacheFullError(
                    f"all {self.npages} memory pages stayed pinned by live views "
                    f"(or busy) for {self._pin_wait_timeout:g}s; release ChunkViews "
                    f"sooner or give the cache more memory")
            ev = self._page_event
            self._page_waiters += 1
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, _PIN_POLL))
            except TimeoutError:
                pass
            finally:
                self._page_waiters -= 1

    def _orphans_free(self) -> bool:
        return any(not self._arena.pin_count(p) for p in self._orphans)

    async def _evict_one(self) -> int | None:
        """Evict one memory chunk; returns its page, or None if nothing could
        be evicted (or the victim got pinned, superseded or discarded while
        it was being demoted: try again)."""
        key = self._mem_policy.evict(self._evictable)
        if key is None:
            return None
        e = self._mem[key]
        self._stats["memory_evictions"] += 1
        d = self._disk.get(key)
        if d is None or d.version != e.version:
            res = self._disk.try_reserve(file_size(e.length))
            if res is not None:
                await self._demote(e, res)
        if self._mem.get(key) is not e:
            return None                 # dropped meanwhile: its page is orphaned
        if self._arena.pin_count(e.page):
            # A reader hit it during the demotion: keep it (it was just used).
            self._mem_policy.insert(key, 1, self._now())
            return None
        del self._mem[key]
        self._mem_bytes -= e.length
        return e.page

    async def _demote(self, e: _MemEntry, res) -> None:
        """Copy memory entry ``e`` to a clean disk file. The entry stays
        indexed (readable) meanwhile; ``busy`` keeps it from being chosen
        again, and the view held here keeps its page from being reused."""
        op = _Op(e.key)
        self._op_begin(op)
        e.busy = True
        src = self._arena.view(e.page, readonly=True)[:e.length]
        entry = None
        try:
            entry = await self._disk.write_file(res, e.key, e.version, src, None,
                                                dirty=False)
        except OSError as exc:
            self._stats["demotion_errors"] += 1
            now = self._now()
            if now - self._last_demotion_warning >= 60.0:
                self._last_demotion_warning = now
                log.warning("chunk cache: demotion of %s v%d to disk failed: %s "
                            "(%d failures so far; next warning in 60 s at the "
                            "earliest)", e.key, e.version, exc,
                            self._stats["demotion_errors"])
        finally:
            src.release()
            e.busy = False
            self._op_end(op)
            self._wake_page_waiters()
        if entry is None:
            return
        if op.discarded or (self._newest_version(e.key) or 0) > e.version:
            self._disk.drop_file(entry)
            return
        if self._install_disk(entry):
            self._stats["demotions"] += 1


class _NoPage(_Retry):
    """Internal: no page could be had without waiting."""
