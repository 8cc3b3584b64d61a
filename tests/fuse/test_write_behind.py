"""The mount's write-behind (objcache/fuse/ops.py, _File) against an
in-memory cluster client, no kernel: consecutive writes reach the owners a
chunk at a time; a jump, a read, a close, an fsync or a truncate sends
what is gathered first; sends apply in order even when an earlier one is
slower; a failed send is reported by the file's next call and its bytes
are never published as if written."""
from __future__ import annotations

import asyncio
import errno

import pyfuse3
import pytest

from objcache.fuse.ops import ObjcacheOperations
from objcache.meta.model import Inode, Kind

from .test_readbuf import sync

CS = 1024


class Client:
    """Chunk owners and a publish, in memory: ``data`` is what the owners
    hold (unpublished writes included), ``published`` the flushed sizes."""

    def __init__(self):
        self.data = bytearray()
        self.sends: list[tuple[int, int]] = []      # (offset, length) per write call
        self.published: list[int] = []
        self.fail: OSError | None = None
        self.delay_first = 0.0
        self.version = 0

    async def open(self, ino):
        return Inode(ino, Kind.FILE, 0o644, 0, 0, size=len(self.data))

    async def write(self, node, off, buf):
        if self.delay_first:
            d, self.delay_first = self.delay_first, 0.0
            await asyncio.sleep(d)                  # a slow owner, not synchronization
        if self.fail is not None:
            raise self.fail
        self.sends.append((off, len(buf)))
        end = off + len(buf)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[off:end] = buf
        self.version += 1
        return {i: self.version for i in range(off // CS, (end - 1) // CS + 1)}

    async def flush(self, node, size, versions):
        self.published.append(size)
        n = node.copy()
        n.size = size
        return n

    async def read(self, node, off, length):
        return bytes(self.data[off:min(node.size, off + length)])

    async def getattr(self, ino):
        return Inode(ino, Kind.FILE, 0o644, 0, 0, size=len(self.data))


async def opened(client=None):
    c = client or Client()
    ops = ObjcacheOperations(c, chunk_size=CS)
    fi = await ops.open(7, 0, None)
    return c, ops, fi.fh


@sync
async def test_consecutive_writes_go_a_chunk_at_a_time_and_close_sends_the_rest():
    c, ops, fh = await opened()
    for i in range(10):
        assert await ops.write(fh, i * 300, bytes([i]) * 300) == 300
    await ops.flush(fh)
    # 900 bytes gathered (a 4th write would pass the 1024-byte chunk), 3 times, then the rest.
    assert c.sends == [(0, 900), (900, 900), (1800, 900), (2700, 300)]
    assert bytes(c.data) == b"".join(bytes([i]) * 300 for i in range(10))
    assert c.published == [3000]


@sync
async def test_a_jump_and_a_read_send_what_is_gathered_first():
    c, ops, fh = await opened()
    await ops.write(fh, 0, b"a" * 100)
    await ops.write(fh, 500, b"b" * 100)                 # not consecutive: [0, 100) goes
    assert await ops.read(fh, 50, 600) == b"a" * 50 + bytes(400) + b"b" * 100
    assert c.sends == [(0, 100), (500, 100)] and c.published == []
    assert (await ops.getattr(7)).st_size == 600         # with the unpublished writes
    await ops.write(fh, 600, b"c" * 10)
    await ops.flush(fh)
    assert c.sends[-1] == (600, 10) and c.published == [610]


@sync
async def test_sends_apply_in_order_when_the_first_is_slow():
    c, ops, fh = await opened()
    c.delay_first = 0.05
    await ops.write(fh, 0, b"x" * CS)                   # a full buffer: sent in the background
    await ops.write(fh, 0, b"y" * CS)                   # overwrites it: must land after
    await ops.flush(fh)
    assert [o for o, _ in c.sends] == [0, 0] and bytes(c.data) == b"y" * CS


@sync
async def test_a_failed_send_is_reported_and_not_published():
    c, ops, fh = await opened()
    await ops.write(fh, 0, b"z" * 100)
    c.fail = OSError(errno.ENOSPC, "disk tier full of dirty data")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.flush(fh)                              # close(2) gets ENOSPC
    assert e.value.errno == errno.ENOSPC and c.published == []
    c.fail = None
    await ops.write(fh, 100, b"w" * 10)
    c.fail = OSError(errno.EIO, "owner unreachable")
    await ops.write(fh, 0, b"v" * CS)                    # full: the send of [100, 110) fails
    await asyncio.wait(list(ops._files[7].sends))      # both sends have ended
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.write(fh, CS, b"u")                    # the next call reports it
    assert e.value.errno == errno.EIO
