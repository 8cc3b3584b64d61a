"""The disk tier of the chunk cache: one file per chunk version.

``DiskTier`` owns a directory, an index of the chunk files in it, a byte
budget, and an eviction policy over the CLEAN files. It does no caching
decisions of its own beyond "which clean file goes when space is needed":
``ChunkCache`` (chunks.py) decides what is written, installed and removed.

Directory layout::

    LOCK                                              flock()ed while open
    <inode:016x>-<index:016x>-<version:016x>-<seq:016x>.chunk
    *.tmp                                             interrupted writes (removed at open)
    *.corrupt                                         quarantined files (kept, logged)

``seq`` is unique per file (a counter restarted above the largest one found
at open), so a path is never reused: a background job (flag update, unlink)
can never touch a newer file of the same chunk by mistake.

File format (little endian)::

    0   magic        8s   b"OCCHUNK1"
    8   format       u32  1
    12  reserved     u32  0
    16  inode        u64
    24  index        u64
    32  version      u64
    40  length       u64  payload bytes (<= chunk size)
    48  seq          u64  as in the file name
    56  payload_crc  u32  CRC-32C of the payload
    60  header_crc   u32  CRC-32C of bytes 0..60
    64  state        u32  DIRTY or CLEAN (rewritten in place by mark_clean)
    68  zeros up to 4096
    4096 payload     ``length`` bytes

The payload starts on a 4 KiB boundary (page-aligned reads into the arena;
a file can be mmap-ed at offset 4096 by a future zero-copy disk path). The
state word is outside the header CRC because ``mark_clean`` rewrites it; it
is one aligned 4-byte write, and any value other than CLEAN reads as dirty
(the safe side: at worst a chunk is uploaded twice).

Durability rules (what is on disk when):

* A DIRTY file is written to ``<name>.tmp``, fdatasync'ed, renamed to its
  final name, and the directory is fsync'ed (one directory fsync serves every
  rename that happened before it started: ``_DirSync``) before
  ``write_file`` returns. So a dirty chunk whose write returned survives
  kill -9 and power loss.
* A CLEAN file is written the same way without either fsync: after a crash
  it may be missing, short, or hold garbage. ``open`` drops it when its size
  is wrong; its CRC is checked on its first read after open (``read_into``)
  or, with ``verify_clean_on_open``, at open. A file checked once (or written
  by this process, from a buffer whose CRC it computed) is not checked
  again unless ``always_verify_reads``: the check is for torn writes, which
  only a crash makes, not for media errors (the drive's ECC catches those).
* ``mark_clean`` flips the state word in the background, without fsync: if
  that is lost, the chunk comes back dirty after a crash and is written back
  again (harmless).
* Removing a DIRTY file (superseded or discarded) is followed by a directory
  fsync, so a superseded dirty version does not come back after a crash once
  the removal has run. Removals happen in the background; a crash before
  they run can bring a removed dirty version back, and the owner must
  reconcile ``dirty_chunks()`` against its metadata after a restart (see
  docs/cache.md).

Space: every file costs ``file_size(length)`` (header + payload rounded up to
4 KiB) against ``capacity``. Space is *reserved* before a file is written
(``reserve``/``try_reserve``) and belongs to the file once written; it is
released when the file is dropped or removed. Only clean files are ever
evicted to make room. A dirty reservation that does not fit even after
evicting every clean file WAITS until ``mark_clean``/``remove`` frees space,
and raises ``OSError(ENOSPC)`` after its timeout. Nothing dirty is dropped.

All methods run on the event loop thread; blocking file work runs in the
executor the cache hands in.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import struct
from concurrent.futures import Executor
from dataclasses import dataclass

from objcache._ext import crc32c
from objcache.fsutil import fsync_dir as _fsync_dir

__all__ = ["DiskTier", "DiskEntry", "Reservation", "CorruptChunkError",
           "HEADER_SIZE", "file_size", "encode_header", "decode_header",
           "STATE_DIRTY", "STATE_CLEAN"]

log = logging.getLogger(__name__)

HEADER_SIZE = 4096
MAGIC = b"OCCHUNK1"
FORMAT = 1
_HDR = struct.Struct("<8sIIQQQQQI")           # bytes 0..60, then header_crc
_HDR_CRC = struct.Struct("<I")
_STATE = struct.Struct("<I")
STATE_OFFSET = 64
STATE_DIRTY = int.from_bytes(b"DIRT", "little")
STATE_CLEAN = int.from_bytes(b"CLEN", "little")

NAME_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})\.chunk$")
LOCK_NAME = "LOCK"
_VERIFY_PIECE = 1 << 20


class CorruptChunkError(Exception):
    """A chunk file failed its header or CRC check. For a clean chunk the
    cache drops the file and reloads; for a dirty one it is raised to the
    reader (the only copy of unwritten data is damaged: the file is
    quarantined as ``*.corrupt``, never silently replaced by older data)."""


def file_size(length: int) -> int:
    """Bytes a chunk of ``length`` payload bytes costs on disk."""
    return HEADER_SIZE + ((length + 4095) & ~4095)


def file_name(key, version: int, seq: int) -> str:
    return f"{key[0]:016x}-{key[1]:016x}-{version:016x}-{seq:016x}.chunk"


def encode_header(key, version: int, length: int, seq: int, crc: int,
                  dirty: bool) -> bytes:
    head = _HDR.pack(MAGIC, FORMAT, 0, key[0], key[1], version, length, seq, crc)
    head += _HDR_CRC.pack(crc32c(head))
    head += _STATE.pack(STATE_DIRTY if dirty else STATE_CLEAN)
    return head + bytes(HEADER_SIZE - len(head))


@dataclass(frozen=True)
class Header:
    key: tuple[int, int]
    version: int
    length: int
    seq: int
    crc: int
    dirty: bool


def decode_header(buf: bytes) -> Header:
    """Parse the first 68 bytes of a chunk file; CorruptChunkError if they
    are not a valid header."""
    if len(buf) < STATE_OFFSET + 4:
        raise CorruptChunkError(f"short header ({len(buf)} bytes)")
    magic, fmt, _, inode, index, version, length, seq, crc = _HDR.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptChunkError("bad magic")
    (hcrc,) = _HDR_CRC.unpack_from(buf, _HDR.size)
    if hcrc != crc32c(buf[:_HDR.size]):
        raise CorruptChunkError("header CRC mismatch")
    if fmt != FORMAT:
        raise CorruptChunkError(f"unknown format {fmt}")
    (state,) = _STATE.unpack_from(buf, STATE_OFFSET)
    return Header((inode, index), version, length, seq, crc, state != STATE_CLEAN)


@dataclass(eq=False, slots=True)
class DiskEntry:
    """One chunk file. ``dirty`` and membership in the index change on the
    loop thread only; the file at ``path`` is immutable except for its state
    word."""
    key: tuple[int, int]
    version: int
    length: int
    seq: int
    crc: int
    dirty: bool
    path: str
    verified: bool = False       # payload CRC checked (or written) by this process

    @property
    def size(self) -> int:
        return file_size(self.length)


class Reservation:
    """``nbytes`` of the tier's budget, held for a file about to be written.
    Exactly one of: consumed by ``write_file`` (the bytes then belong to the
    file), or ``release()``d. Releasing twice is harmless."""
    __slots__ = ("_tier", "nbytes")

    def __init__(self, tier: "DiskTier", nbytes: int):
        self._tier = tier
        self.nbytes = nbytes

    def release(self) -> None:
        if self._tier is not None:
            self._tier._used -= self.nbytes
            self._tier._notify_space()
            self._tier = None

    def _consume(self) -> None:
        self._tier = None


class _DirSync:
    """Group-committed directory fsync. ``await sync()`` returns once an
    fsync of the directory that STARTED after the call has completed; every
    caller waiting at that moment shares it."""

    def __init__(self, path: str, run):
        self._path = path
        self._run = run
        self._waiting: asyncio.Future | None = None
        self._runner: asyncio.Task | None = None

    async def sync(self) -> None:
        fut = self._waiting
        if fut is None:
            fut = self._waiting = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            if self._runner is None or self._runner.done():
                self._runner = asyncio.get_running_loop().create_task(self._loop())
        await asyncio.shield(fut)

    async def _loop(self) -> None:
        while self._waiting is not None:
            fut, self._waiting = self._waiting, None
            try:
                await self._run(_fsync_dir, self._path)
            except BaseException as exc:            # noqa: BLE001 - handed to waiters
                if not fut.done():
                    fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            if not fut.done():
                fut.set_result(None)

    async def close(self) -> None:
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class DiskTier:
    """See the module docstring. ``policy`` is an eviction policy over clean
    files (objcache.cache.policy), weighted by file size."""

    def __init__(self, directory, capacity: int, *, executor: Executor, policy,
                 verify_clean_on_open: bool = False, always_verify_reads: bool = False,
                 max_length: int | None = None):
        if capacity < 0:
            raise ValueError("disk capacity must be >= 0")
        self.directory = os.fspath(directory)
        self.capacity = capacity
        self.verify_clean_on_open = verify_clean_on_open
        self.always_verify_reads = always_verify_reads
        self.max_length = max_length          # the cache's chunk size
        self._executor = executor
        self._policy = policy                     # keys of CLEAN entries only
        self._entries: dict[tuple[int, int], DiskEntry] = {}
        self._used = 0           # installed files + reservations, bytes
        self._dirty_bytes = 0    # installed dirty files
        self._clean_bytes = 0    # installed clean files (== policy.weight)
        self._seq = 0
        self._lock_fd = -1
        self._space_event = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._dirsync = _DirSync(self.directory, self._run)
        self.stats = dict(files=0, evictions=0, crc_errors=0, dropped_on_open=0,
                          quarantined=0, dirty_waits=0, enospc=0, writes=0,
                          dirty_writes=0)

    # -- plumbing ----------------------------------------------------------

    def _run(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _job(self, fn, *args):
        return await self._run(fn, *args)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("disk tier background job failed: %r", task.exception())

    def _notify_space(self) -> None:
        # Wake every waiter; each re-checks. A fresh Event for the next round
        # (single-threaded: no wakeup can be lost between check and wait).
        self._space_event.set()
        self._space_event = asyncio.Event()

    # -- queries -----------------------------------------------------------

    def get(self, key) -> DiskEntry | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used(self) -> int:
        return self._used

    @property
    def dirty_bytes(self) -> int:
        return self._dirty_bytes

    def dirty_entries(self) -> list[DiskEntry]:
        return [e for e in self._entries.values() if e.dirty]

    def touch(self, key, now: float) -> None:
        """A read served from this tier (counts as an access for eviction)."""
        self._policy.access(key, now)

    # -- open / close ------------------------------------------------------

    async def open(self, now: float = 0.0) -> dict:
        """Take the directory lock, remove leftovers, index the chunk files.
        Returns a small report (also merged into ``stats``)."""
        d = self.directory
        os.makedirs(d, exist_ok=True)
        self._lock_fd = os.open(os.path.join(d, LOCK_NAME),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise RuntimeError(f"{d} is in use by another chunk cache "
                               f"(its {LOCK_NAME} file is locked)") from None
        try:
            return await self._recover(now)
        except BaseException:
            self._unlock()
            raise

    async def _recover(self, now: float) -> dict:
        d = self.directory
        names = await self._run(os.listdir, d)
        removed_dirty = False
        scans = []
        for name in names:
            path = os.path.join(d, name)
            if name.endswith(".tmp"):
                await self._run(_unlink_quiet, path)
                continue
            m = NAME_RE.match(name)
            if m is None:
                if name != LOCK_NAME and not name.endswith(".corrupt"):
                    log.warning("chunk cache: ignoring unknown file %s", path)
                continue
            inode, index, version, seq = (int(g, 16) for g in m.groups())
            scans.append(self._run(_scan_file, path, (inode, index), version, seq,
                                   self.verify_clean_on_open))
        found: dict[tuple[int, int], list[tuple[DiskEntry, float]]] = {}
        for res in await asyncio.gather(*scans):
            verdict, path, entry, mtime, why = res
            if verdict == "ok":
                found.setdefault(entry.key, []).append((entry, mtime))
                self._seq = max(self._seq, entry.seq + 1)
            elif verdict == "drop":
                log.warning("chunk cache: dropping damaged clean chunk file %s (%s)",
                            path, why)
                self.stats["dropped_on_open"] += 1
                await self._run(_unlink_quiet, path)
            else:   # quarantine
                log.error("chunk cache: QUARANTINED damaged chunk file %s (%s); "
                          "it may hold dirty data that was never written back",
                          path, why)
                self.stats["quarantined"] += 1
                await self._run(_rename_quiet, path, path[:-len(".chunk")] + ".corrupt")
        too_long = [e for vs in found.values() for e, _ in vs
                    if self.max_length is not None and e.length > self.max_length]
        if any(e.dirty for e in too_long):
            raise RuntimeError(
                f"{d} holds dirty chunks longer than the chunk size "
                f"{self.max_length} (was the chunk size changed?): "
                f"{sorted(e.path for e in too_long if e.dirty)[:3]}; open it with "
                f"the old chunk size and write them back first")
        for e in too_long:                      # clean: just drop them
            found[e.key] = [p for p in found[e.key] if p[0] is not e]
            self.stats["dropped_on_open"] += 1
            await self._run(_unlink_quiet, e.path)
        clean: list[tuple[float, DiskEntry]] = []
        for key, versions in found.items():
            if not versions:
                continue
            versions.sort(key=lambda p: (p[0].version, p[0].seq))
            keep, mtime = versions[-1]
            for old, _ in versions[:-1]:        # superseded versions
                removed_dirty |= old.dirty
                await self._run(_unlink_quiet, old.path)
            self._entries[key] = keep
            self._used += keep.size
            if keep.dirty:
                self._dirty_bytes += keep.size
            else:
                clean.append((mtime, keep))
        for _, e in sorted(clean, key=lambda p: p[0]):   # oldest first: FIFO order
            self._policy.insert(e.key, e.size, now)
            self._clean_bytes += e.size
        over = 0
        while self._used > self.capacity:
            victim = self._policy.evict()
            if victim is None:
                break
            e = self._entries.pop(victim)
            self._clean_bytes -= e.size
            self._used -= e.size
            over += 1
            await self._run(_unlink_quiet, e.path)
        if self._used > self.capacity:
            log.warning("chunk cache: %d dirty bytes exceed the disk budget of %d; "
                        "writes wait until some are written back",
                        self._dirty_bytes, self.capacity)
        if removed_dirty or self.stats["quarantined"]:
            await self._run(_fsync_dir, d)
        self.stats["evictions"] += over
        report = dict(chunks=len(self._entries),
                      dirty=sum(1 for e in self._entries.values() if e.dirty),
                      dropped=self.stats["dropped_on_open"],
                      quarantined=self.stats["quarantined"], evicted=over)
        log.info("chunk cache: recovered %s", report)
        return report

    async def close(self) -> None:
        """Wait for background jobs (unlinks, flag updates); release the lock."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._dirsync.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- space -------------------------------------------------------------

    def _make_room(self, nbytes: int) -> bool:
        """Evict clean files until ``nbytes`` more fit. Evicts nothing when
        even evicting every clean file would not be enough."""
        if self.capacity - self._used >= nbytes:
            return True
        if self.capacity - self._used + self._clean_bytes < nbytes:
            return False
        while self.capacity - self._used < nbytes:
            victim = self._policy.evict()
            if victim is None:             # cannot happen: clean bytes suffice
                return False
            e = self._entries.pop(victim)
            self._clean_bytes -= e.size
            self._used -= e.size
            self.stats["evictions"] += 1
            self._spawn(self._unlink(e.path, sync=False))
        return True

    def try_reserve(self, nbytes: int) -> Reservation | None:
        """Room for a clean file, now, or None (nothing waits)."""
        if not self._make_room(nbytes):
            return None
        self._used += nbytes
        return Reservation(self, nbytes)

    def overcommit(self, nbytes: int) -> Reservation:
        """Room for a dirty file, now, past the budget if need be (clean
        files are evicted first). For a write that was admitted
        (``wait_for_room``) before it became a committed log entry: its
        apply must not fail on the budget, since a group cannot skip an
        entry."""
        if not self._make_room(nbytes):
            self.stats["overcommits"] = self.stats.get("overcommits", 0) + 1
        self._used += nbytes
        return Reservation(self, nbytes)

    async def wait_for_room(self, nbytes: int, *, timeout: float) -> None:
        """Admission of a dirty write: returns once ``nbytes`` would fit
        (evicting clean files), reserving nothing; ``OSError(ENOSPC)``
        after ``timeout`` seconds of a tier full of dirty data."""
        (await self.reserve(nbytes, timeout=timeout)).release()

    async def reserve(self, nbytes: int, *, timeout: float) -> Reservation:
        """Room for a dirty file: evicts clean files, else waits for
        ``mark_clean``/``remove`` to free space; ``OSError(ENOSPC)`` after
        ``timeout`` seconds (or at once if it can never fit). Cancellable."""
        if nbytes > self.capacity:
            self.stats["enospc"] += 1
            raise OSError(errno.ENOSPC, f"a {nbytes}-byte chunk file does not fit in "
                                        f"the {self.capacity}-byte disk tier")
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            if self._make_room(nbytes):
                self._used += nbytes
                return Reservation(self, nbytes)
            if deadline is None:
                deadline = loop.time() + timeout
                self.stats["dirty_waits"] += 1
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats["enospc"] += 1
                raise OSError(errno.ENOSPC,
                              f"disk tier full of dirty data ({self._dirty_bytes} dirty "
                              f"of {self.capacity} bytes) for {timeout:g}s; nothing "
                              f"was dropped")
            event = self._space_event
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass

    # -- files -------------------------------------------------------------

    async def write_file(self, res: Reservation, key, version: int, src,
                         crc: int | None, *, dirty: bool) -> DiskEntry:
        """Write ``src`` (exactly the payload) as a new file; durable first
        when ``dirty`` (see the module docstring). ``crc`` is the payload's
        CRC-32C, computed in the executor when None. Consumes ``res`` on
        success, releases it on failure. The entry is NOT installed: the
        caller decides (``install`` or ``drop_file``) without awaiting in
        between."""
        length = len(src)
        assert res.nbytes == file_size(length), (res.nbytes, length)
        seq = self._seq
        self._seq += 1
        path = os.path.join(self.directory, file_name(key, version, seq))
        renamed = False
        try:
            if crc is None:
                crc = await self._run(crc32c, src)
            header = encode_header(key, version, length, seq, crc, dirty)
            try:
                await self._run(_write_file, path, header, src, dirty)
            except OSError as exc:
                # The file system may be fuller than the budget says (it is
                # shared): shed clean files and try once more.
                if exc.errno != errno.ENOSPC or not dirty or not await self._shed_clean(res.nbytes):
                    raise
                await self._run(_write_file, path, header, src, dirty)
            renamed = True
            if dirty:
                await self._dirsync.sync()
        except BaseException as exc:
            res.release()
            if renamed:
                self._spawn(self._unlink(path, sync=dirty))
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                self.stats["enospc"] += 1
            raise
        res._consume()
        self.stats["writes"] += 1
        self.stats["dirty_writes"] += dirty
        return DiskEntry(key, version, length, seq, crc, dirty, path, verified=True)

    async def _shed_clean(self, nbytes: int) -> bool:
        freed, paths = 0, []
        while freed < nbytes:
            victim = self._policy.evict()
            if victim is None:
                break
            e = self._entries.pop(victim)
            self._clean_bytes -= e.size
            self._used -= e.size
            self.stats["evictions"] += 1
            freed += e.size
            paths.append(e.path)
        for p in paths:
            await self._run(_unlink_quiet, p)
        if paths:
            self._notify_space()
        return bool(paths)

    def install(self, e: DiskEntry, now: float) -> bool:
        """Make a written file the key's entry, superseding an older version
        (removed in the background). Loses, and deletes its own file, if the
        index already holds a newer version, or the same version and the new
        file would not add dirtiness (same content by contract)."""
        cur = self._entries.get(e.key)
        if cur is not None:
            if cur.version > e.version or (cur.version == e.version
                                           and (cur.dirty or not e.dirty)):
                self.drop_file(e)
                return False
            self._remove_entry(cur)
        self._entries[e.key] = e
        if e.dirty:
            self._dirty_bytes += e.size
        else:
            self._clean_bytes += e.size
            self._policy.insert(e.key, e.size, now)
        self.stats["files"] = len(self._entries)
        return True

    def drop_file(self, e: DiskEntry) -> None:
        """Delete a written, never-installed file and release its space."""
        self._used -= e.size
        self._spawn(self._unlink(e.path, sync=e.dirty))
        self._notify_space()

    def remove(self, key) -> DiskEntry | None:
        """Forget ``key`` (discarded or superseded); its file goes in the
        background (with a directory fsync if it was dirty)."""
        e = self._entries.get(key)
        if e is not None:
            self._remove_entry(e)
        return e

    def remove_older(self, key, version: int) -> None:
        """Remove the key's file if it holds a version older than ``version``."""
        e = self._entries.get(key)
        if e is not None and e.version < version:
            self._remove_entry(e)

    def _forget(self, e: DiskEntry) -> None:
        """Drop ``e`` from the index and its byte counts (not its file)."""
        del self._entries[e.key]
        if e.dirty:
            self._dirty_bytes -= e.size
        else:
            self._clean_bytes -= e.size
            self._policy.remove(e.key)
        self._used -= e.size
        self.stats["files"] = len(self._entries)
        self._notify_space()

    def _remove_entry(self, e: DiskEntry) -> None:
        self._forget(e)
        self._spawn(self._unlink(e.path, sync=e.dirty))

    def mark_clean(self, key, version: int, now: float) -> bool:
        """The key's dirty file of exactly ``version`` becomes clean (and
        evictable). False if the key holds another version or is clean."""
        e = self._entries.get(key)
        if e is None or e.version != version or not e.dirty:
            return False
        e.dirty = False
        self._dirty_bytes -= e.size
        self._clean_bytes += e.size
        self._policy.insert(key, e.size, now)
        self._spawn(self._job(_write_state, e.path, STATE_CLEAN))
        self._notify_space()
        return True

    async def read_into(self, e: DiskEntry, dst) -> None:
        """Read the payload of ``e`` into ``dst`` (``e.length`` bytes),
        checking the header always and the CRC when the file was not checked
        yet (see the module docstring). CorruptChunkError on a bad header or
        CRC; FileNotFoundError if the file was removed meanwhile (the caller
        falls back)."""
        check = self.always_verify_reads or not e.verified
        await self._run(_read_file, e.path, e.key, e.version, e.length, dst,
                        e.crc if check else None)
        e.verified = True

    def corrupt(self, e: DiskEntry) -> None:
        """``e`` failed a check on read: forget it; delete a clean file,
        quarantine a dirty one."""
        self.stats["crc_errors"] += 1
        if self._entries.get(e.key) is e:
            self._forget(e)
        if e.dirty:
            self.stats["quarantined"] += 1
            log.error("chunk cache: dirty chunk %s version %d failed its check; "
                      "quarantined as %s.corrupt", e.key, e.version,
                      e.path[:-len(".chunk")])
            self._spawn(self._job(_rename_quiet, e.path,
                                  e.path[:-len(".chunk")] + ".corrupt"))
        else:
            log.warning("chunk cache: clean chunk file %s failed its check; dropped",
                        e.path)
            self._spawn(self._unlink(e.path, sync=False))

    async def _unlink(self, path: str, *, sync: bool) -> None:
        await self._run(_unlink_quiet, path)
        if sync:
            await self._dirsync.sync()


# -- blocking jobs (executor threads) -----------------------------------------
# They receive buffers created on the loop thread and keep no reference to
# them after returning, so every page view is released on the loop thread.

def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rename_quiet(src: str, dst: str) -> None:
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        pass


def _write_state(path: str, state: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return                              # removed meanwhile: nothing to mark
    try:
        os.pwrite(fd, _STATE.pack(state), STATE_OFFSET)
    finally:
        os.close(fd)


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    try:
        while views:
            n = os.pwritev(fd, views, offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0).release()
            if n:
                views[0] = views[0][n:]
    finally:
        for v in views:
            v.release()


def _write_file(path: str, header: bytes, payload, durable: bool) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _pwritev_all(fd, [header, payload], 0)
        if durable:
            os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _preadinto_all(fd: int, dst, offset: int) -> int:
    view = memoryview(dst).cast("B")
    total = 0
    try:
        while total < len(view):
            n = os.preadv(fd, [view[total:]], offset + total)
            if n == 0:
                break
            total += n
    finally:
        view.release()
    return total


def _read_file(path: str, key, version: int, length: int, dst, crc) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = decode_header(os.pread(fd, STATE_OFFSET + 4, 0))
        if (h.key, h.version, h.length) != (key, version, length) \
                or (crc is not None and h.crc != crc):
            raise CorruptChunkError(f"header says {h.key} v{h.version} "
                                    f"{h.length} B, index says {key} v{version} "
                                    f"{length} B")
        n = _preadinto_all(fd, dst, HEADER_SIZE)
    finally:
        os.close(fd)
    if n != length:
        raise CorruptChunkError(f"short payload: {n} of {length} bytes")
    if crc is not None and crc32c(dst) != crc:
        raise CorruptChunkError("payload CRC mismatch")


def _scan_file(path: str, key, version: int, seq: int, verify_clean: bool):
    """Classify one chunk file at open: ("ok", path, entry, mtime, None),
    ("drop", path, None, 0, why) for a torn/damaged clean file, or
    ("quarantine", path, None, 0, why) when it is (or may be) dirty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return ("drop", path, None, 0.0, "vanished")
    try:
        st = os.fstat(fd)
        head = os.pread(fd, STATE_OFFSET + 4, 0)
        if len(head) < STATE_OFFSET + 4 or not any(head):
            # Short or zero-filled: a write that never reached the disk, which
            # only a clean file (written without fsync) can be.
            return ("drop", path, None, 0.0, "torn header")
        try:
            h = decode_header(head)
        except CorruptChunkError as exc:
            return ("quarantine", path, None, 0.0, str(exc))
        if (h.key, h.version, h.seq) != (key, version, seq):
            return ("quarantine", path, None, 0.0, "header does not match file name")
        bad = None
        if st.st_size != HEADER_SIZE + h.length:
            bad = f"size {st.st_size}, header says {HEADER_SIZE + h.length}"
        elif h.dirty or verify_clean:
            crc, off, end = 0, HEADER_SIZE, HEADER_SIZE + h.length
            while off < end:
                piece = os.pread(fd, min(_VERIFY_PIECE, end - off), off)
                if not piece:
                    break
                crc = crc32c(piece, crc)
                off += len(piece)
            if off != end or crc != h.crc:
                bad = "payload CRC mismatch"
        if bad is not None:
            return ("quarantine" if h.dirty else "drop", path, None, 0.0, bad)
        return ("ok", path, DiskEntry(h.key, h.version, h.length, h.seq, h.crc,
                                      h.dirty, path, verified=h.dirty or verify_clean),
                st.st_mtime, None)
    finally:
        os.close(fd)
