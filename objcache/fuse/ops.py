"""The FUSE operations: pyfuse3 requests onto the cluster client.

Inode numbers are objcache's (the root is 1, as FUSE wants). The cluster
is the truth; the mount keeps only the state of open files (``_File``, one
per inode with opens, shared by its handles):

* an open takes the inode as ``ClusterClient.open`` returns it (a file
  replaced in the bucket by another tool is reloaded there);
* writes gather in the open file (write-behind, at most a chunk) and go
  to the chunk owners (durable in the cluster) when a chunk's worth is
  there, a non-consecutive write comes, or the file is read, flushed,
  synced or truncated; they are remembered in the open file (chunk
  versions, size), so that every open
  of the file in this mount — and getattr — sees them at once, as POSIX
  wants on one machine; ``flush`` (every close(2) of a descriptor)
  publishes them with one flush transaction — visible to other mounts and
  nodes after it (close-to-open consistency); ``fsync`` also waits until
  the bucket holds the file;
* kernel caching: entries and attributes are cached ``ATTR_TIMEOUT``
  seconds; an open keeps the kernel's page cache (``keep_cache``) when the
  file's data is the version this mount saw last.

Every handler maps failures to an errno: an exception escaping a pyfuse3
handler would end the mount for everyone (``_errno``).
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat

import pyfuse3

from objcache.meta.model import Inode, Kind

from .readahead import after_init
from .readbuf import ChunkBuffers

log = logging.getLogger(__name__)

WRITE_BEHIND_SENDS = 2      # sends of gathered writes in flight per file (see _File)
# Mount-wide bound on write-behind memory (gathered + being sent), in
# write-behind buffers: one sequential writer needs three (one filling, two
# sending); many files written at once share the rest, so the mount's
# memory does not grow with the number of open files.
WRITE_BEHIND_BUDGET = 4
ATTR_TIMEOUT = 1.0          # seconds the kernel may cache entries and attributes
BLOCK = 4096


def _errno(handler):
    @functools.wraps(handler)
    async def wrapped(self, *args, **kwargs):
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:  # noqa: BLE001 - never let one request end the mount
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapped


class _File:
    """An inode with opens in this mount: its unpublished writes.

    ``orphan``: its last name was removed (unlink, rename over it) while it
    was open here. The cluster keeps it (nlink 0, no name, never written
    back: state.py "nlink" keep) so that the open descriptors keep working,
    as POSIX wants; the last release here forgets it.

    Write-behind: consecutive writes gather in ``pending`` (bytes at
    ``pending_off``, at most ``write_behind`` of them) and go to the chunk
    owners together: one durable Raft write per chunk instead of one per
    write(2) — a 64 KiB write costs a replicated commit otherwise
    (bench/RESULTS.md). Up to ``WRITE_BEHIND_SENDS`` sends run while the
    writer fills the next buffer; a write that would start another waits
    first. All files together hold at most ``WRITE_BEHIND_BUDGET``
    buffers' worth (gathered or being sent): a write over that sends every
    gathered buffer and waits for a send to end. Invariants:
    * Sends apply in the order they took their bytes: each waits for the
      one before it (``sends``, oldest first).
    * Every publish (close, fsync, truncate, unmount) and every read of
      the file drains first (``_drain``), so close = durable in the
      cluster still holds and reads see every write made before them.
    * A send that fails keeps its error in ``error``; the next write,
      read, flush, fsync or close of the file reports it (like the
      kernel's writeback errors), so lost bytes never go unreported."""
    __slots__ = ("node", "versions", "size", "dirty", "opens", "orphan", "pending",
                 "pending_off", "sends", "error")

    def __init__(self, node: Inode):
        self.node = node
        self.versions: dict[int, int] = {}      # chunk -> version written, not yet published
        self.size = node.size
        self.dirty = False
        self.opens = 0
        self.orphan = False
        self.pending: bytearray | None = None   # written here, not yet sent to the owners
        self.pending_off = 0
        self.sends: list[asyncio.Task] = []     # sends not yet finished, oldest first
        self.error: OSError | None = None

    @property
    def unsent(self) -> bool:
        return self.pending is not None or bool(self.sends)


class _Handle:
    """One open file description."""
    __slots__ = ("file", "append")

    def __init__(self, file: _File, append: bool):
        self.file = file
        self.append = append


class ObjcacheOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, client, *, chunk_size: int, mountpoint: str | None = None,
                 readahead_kib: int = 0, block_size: int = 1 << 20,
                 total_bytes: int = 1 << 50, write_behind: int | None = None):
        super().__init__()
        self.client = client
        self.mountpoint, self.readahead_kib = mountpoint, readahead_kib
        self.buffers = ChunkBuffers(client.read, chunk_size)
        self.block_size = block_size
        self.write_behind = write_behind if write_behind is not None else chunk_size
        self.write_behind_budget = WRITE_BEHIND_BUDGET * self.write_behind
        self._wb_bytes = 0                          # gathered + being sent, all files
        self._wb_freed = asyncio.Event()            # set when a send ends
        self.total_bytes = total_bytes
        self._handles: dict[int, _Handle] = {}
        self._files: dict[int, _File] = {}          # inode -> open file
        self._next_fh = 1
        self._dirs: dict[int, list] = {}
        self._seen: dict[int, tuple] = {}           # inode -> (epoch, data_version) at last open

    def init(self):
        if self.mountpoint and self.readahead_kib:
            after_init(self.mountpoint, self.readahead_kib)

    # -- attributes ------------------------------------------------------------

    def _attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.id
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = node.st_mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = 0
        a.st_size = node.size if node.kind != Kind.DIR else 4096
        a.st_blksize = self.block_size
        a.st_blocks = -(-a.st_size // 512)
        a.st_atime_ns = node.atime_ns or node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns or node.mtime_ns
        return a

    def _with_pending(self, node: Inode) -> Inode:
        """``node`` with this mount's unpublished writes (size, mtime)."""
        f = self._files.get(node.id)
        if f is not None and f.dirty:
            node = node.copy()
            node.size = f.size
            node.mtime_ns = max(node.mtime_ns, f.node.mtime_ns)
        return node

    def _open_handle(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        f = self._files.get(node.id)
        if f is None:
            f = self._files[node.id] = _File(node)
        elif not f.dirty:
            f.node, f.size = node, node.size
        f.opens += 1
        self._handles[fh] = _Handle(f, bool(flags & os.O_APPEND))
        seen = (node.epoch, node.data_version, node.size)
        keep = self._seen.get(node.id) == seen
        self._seen[node.id] = seen
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=False)

    # -- names -----------------------------------------------------------------

    @_errno
    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._attr(await self.client.getattr(parent_inode))
        if name == b"..":
            node = await self.client.getattr(parent_inode)
            return self._attr(await self.client.getattr(node.parent or parent_inode))
        return self._attr(self._with_pending(await self.client.lookup(parent_inode, name)))

    @_errno
    async def getattr(self, inode, ctx=None):
        return self._attr(self._with_pending(await self.client.getattr(inode)))

    @_errno
    async def setattr(self, inode, attr, fields, fh, ctx):
        changes = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_size:
            await self._truncate(inode, attr.st_size)
        if changes:
            node = await self.client.setattr(inode, **changes)
        else:
            node = await self.client.getattr(inode)
        return self._attr(self._with_pending(node))

    async def _truncate(self, inode: int, size: int) -> Inode:
        f = self._files.get(inode)
        if f is not None and f.dirty:
            await self._publish(f)
        # The node as published: truncating a stale one (its size before
        # this mount's writes) skipped the zeroing of the cut-off bytes,
        # and a later extension showed them again (fsx).
        node = await self.client.getattr(inode)
        if node.kind == Kind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        node = await self.client.truncate(node, size)
        if f is not None:
            f.node, f.size = node, node.size
        return node

    @_errno
    async def readlink(self, inode, ctx):
        node = await self.client.getattr(inode)
        if node.kind != Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return bytes(node.target)

    @_errno
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(await self.client.mkdir(parent_inode, name, stat.S_IMODE(mode),
                                                  ctx.uid, ctx.gid))

    @_errno
    async def symlink(self, parent_inode, name, target, ctx):
        return self._attr(await self.client.symlink(parent_inode, name, target,
                                                    ctx.uid, ctx.gid))

    @_errno
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._attr(await self.client.link(inode, new_parent_inode, new_name))

    def _open_here(self) -> list[int]:
        return [ino for ino, f in self._files.items() if f.opens > 0]

    async def _mark_orphan(self, ino: int) -> None:
        f = self._files.get(ino)
        if f is not None and f.opens > 0 and (await self.client.getattr(ino)).nlink <= 0:
            f.orphan = True
            self.client.hold_orphan(ino)            # its lease is renewed while we live

    @_errno
    async def unlink(self, parent_inode, name, ctx):
        keep = self._open_here()
        ino = await self.client.unlink(parent_inode, name, keep=keep)
        if ino in keep:
            await self._mark_orphan(ino)

    @_errno
    async def rmdir(self, parent_inode, name, ctx):
        await self.client.rmdir(parent_inode, name)

    @_errno
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        keep, target = self._open_here(), 0
        if keep:
            try:
                target = (await self.client.lookup(parent_inode_new, name_new)).id
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        await self.client.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                 noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE), keep=keep)
        if target in keep:
            await self._mark_orphan(target)

    async def forget(self, inode_list):
        pass                                         # no per-inode state to drop

    # -- directories -----------------------------------------------------------

    @_errno
    async def opendir(self, inode, ctx):
        node = await self.client.getattr(inode)
        if node.kind != Kind.DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = [inode, None]
        return fh

    @_errno
    async def readdir(self, fh, start_id, token):
        d = self._dirs[fh]
        if d[1] is None or start_id == 0:
            # Names and attributes in one call (the kernel asks readdirplus).
            d[1] = sorted(await self.client.readdir_plus(d[0]), key=lambda e: e[0])
        entries = d[1]
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(self._with_pending(node)),
                                         i + 1):
                return

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------

    @_errno
    async def open(self, inode, flags, ctx):
        node = await self.client.open(inode)
        if node.kind == Kind.DIR:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and (node.size or (inode in self._files
                                                 and self._files[inode].size)):
            # The kernel passes O_TRUNC to open (atomic_o_trunc) instead of
            # a setattr before it.
            node = await self._truncate(inode, 0)
        return self._open_handle(node, flags)

    @_errno
    async def create(self, parent_inode, name, mode, flags, ctx):
        node = await self.client.create(parent_inode, name, stat.S_IMODE(mode), ctx.uid, ctx.gid)
        return self._open_handle(node, flags), self._attr(node)

    @_errno
    async def read(self, fh, off, size):
        f = self._handles[fh].file
        if off >= f.size:
            return b""
        if f.unsent or f.error is not None:
            await self._drain(f)
        node = f.node
        if f.dirty:
            node = node.copy()
            node.size = f.size
        return await self.buffers.read(node, off, size)

    @_errno
    async def write(self, fh, off, buf):
        h = self._handles[fh]
        f = h.file
        # Room first: a write that would start a send waits until fewer
        # than WRITE_BEHIND_SENDS are in flight. The kernel sends many
        # WRITEs of one file at once (the writeback of an mmap's dirty
        # pages); waiting after starting the send let 148 1 MiB sends pile
        # up in one fsx run. No await from here on: the checks below and
        # the sends they start happen together.
        while True:
            if len(f.sends) >= WRITE_BEHIND_SENDS and \
                    self._starts_send(f, f.size if h.append else off, len(buf)):
                await asyncio.wait([f.sends[0]])
            elif self._wb_bytes and self._wb_bytes + len(buf) > self.write_behind_budget:
                # Over the mount's budget: every gathered buffer goes out
                # (only sends free memory), then wait for one to end.
                for other in list(self._files.values()):
                    if other.pending is not None:
                        self._send(other)
                self._wb_freed.clear()
                await self._wb_freed.wait()
            else:
                break
        if h.append:
            off = f.size
        self._raise_error(f)
        p = f.pending                                # see _File: write-behind
        if p is not None and off == f.pending_off + len(p) and len(p) + len(buf) <= self.write_behind:
            p += buf
        else:
            if p is not None:
                self._send(f)
            f.pending, f.pending_off = bytearray(buf), off
        self._wb_bytes += len(buf)
        if not f.dirty:
            node = f.node.copy()
            node.data_version += 1                   # local marker: not the bucket's
            f.node = node
        f.size = max(f.size, off + len(buf))
        f.dirty = True
        if len(f.pending) >= self.write_behind:
            self._send(f)
        return len(buf)

    def _starts_send(self, f: _File, off: int, n: int) -> bool:
        """Would a write of ``n`` bytes at ``off`` start a send?"""
        p = f.pending
        if p is not None and off == f.pending_off + len(p) and len(p) + n <= self.write_behind:
            return len(p) + n >= self.write_behind
        return p is not None or n >= self.write_behind

    def _send(self, f: _File) -> None:
        """Start sending the gathered bytes, after the sends before them."""
        buf, off = f.pending, f.pending_off
        f.pending = None
        prev = f.sends[-1] if f.sends else None
        task = asyncio.create_task(self._send_after(f, prev, buf, off))
        f.sends.append(task)
        task.add_done_callback(f.sends.remove)

    async def _send_after(self, f: _File, prev, buf: bytearray, off: int) -> None:
        try:
            await self._send_now(f, prev, buf, off)
        finally:
            self._wb_bytes -= len(buf)
            self._wb_freed.set()

    async def _send_now(self, f: _File, prev, buf: bytearray, off: int) -> None:
        if prev is not None:
            await asyncio.wait([prev])
        try:
            versions = await self.client.write(f.node, off, buf)
        except OSError as exc:
            f.error = f.error or exc
            return
        except Exception as exc:  # noqa: BLE001 - kept for the next call on the file
            log.exception("write-behind of inode %d failed", f.node.id)
            f.error = f.error or OSError(errno.EIO, f"write-behind failed: {exc!r}")
            return
        f.versions.update(versions)
        node = f.node.copy()
        node.chunks.update(versions)
        f.node = node

    async def _drain(self, f: _File) -> None:
        """Every write made so far is at the chunk owners (durable in the
        cluster, not yet published); raises a failed send's error."""
        if f.pending is not None:
            self._send(f)
        if f.sends:
            await asyncio.wait([f.sends[-1]])        # the last waits for the others
        self._raise_error(f)

    @staticmethod
    def _raise_error(f: _File) -> None:
        if f.error is not None:
            err, f.error = f.error, None
            raise err

    async def _publish(self, f: _File) -> None:
        await self._drain(f)
        versions, size = f.versions, f.size
        f.versions, f.dirty = {}, False
        try:
            node = await self.client.flush(f.node, size, versions)
        except BaseException:
            versions.update(f.versions)              # writes made meanwhile stay too
            f.versions, f.dirty = versions, True
            raise
        if not f.dirty:
            f.node, f.size = node, node.size
        self._seen[node.id] = (node.epoch, node.data_version, node.size)

    @_errno
    async def flush(self, fh):
        h = self._handles.get(fh)
        if h is not None and h.file.dirty and not h.file.orphan:
            await self._publish(h.file)

    @_errno
    async def fsync(self, fh, datasync):
        f = self._handles[fh].file
        if f.orphan:
            return                                   # no name: nothing owed to the bucket
        if f.dirty:
            await self._publish(f)
        await self.client.fsync(f.node.id)

    @_errno
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is None:
            return
        f = h.file
        f.opens -= 1
        if f.orphan:
            if f.opens == 0:
                self._files.pop(f.node.id, None)
                self.buffers.forget(f.node.id)
                await self.client.forget(f.node.id)
            return
        try:
            if f.dirty:
                await self._publish(f)
        finally:
            if f.opens == 0 and not f.dirty:
                self._files.pop(f.node.id, None)
                self.buffers.forget(f.node.id)

    async def publish_all(self) -> None:
        """Publish every open file's writes (unmount)."""
        for f in list(self._files.values()):
            if f.orphan:
                try:
                    await self.client.forget(f.node.id)
                except Exception:  # noqa: BLE001 - the next embedded start forgets it
                    log.exception("forgetting orphan %d at unmount failed", f.node.id)
            elif f.dirty:
                try:
                    await self._publish(f)
                except Exception:  # noqa: BLE001 - reported; the rest still go
                    log.exception("publishing inode %d at unmount failed", f.node.id)

    # -- extended attributes (user.*) -----------------------------------------

    @_errno
    async def getxattr(self, inode, name, ctx):
        node = await self.client.getattr(inode)
        try:
            return node.xattrs[bytes(name)]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    @_errno
    async def listxattr(self, inode, ctx):
        return list((await self.client.getattr(inode)).xattrs)

    @_errno
    async def setxattr(self, inode, name, value, ctx):
        if not bytes(name).startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = await self.client.getattr(inode)
        xattrs = dict(node.xattrs)
        xattrs[bytes(name)] = bytes(value)
        await self.client.setattr(inode, xattrs=[[k, v] for k, v in xattrs.items()])

    @_errno
    async def removexattr(self, inode, name, ctx):
        node = await self.client.getattr(inode)
        xattrs = dict(node.xattrs)
        if xattrs.pop(bytes(name), None) is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self.client.setattr(inode, xattrs=[[k, v] for k, v in xattrs.items()])

    # -- the filesystem --------------------------------------------------------

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.block_size
        s.f_frsize = BLOCK
        s.f_blocks = self.total_bytes // BLOCK
        s.f_bfree = s.f_bavail = s.f_blocks
        s.f_files = 1 << 40
        s.f_ffree = s.f_favail = 1 << 40
        s.f_namemax = 255
        return s
