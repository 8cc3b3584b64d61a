"""The ceiling of this FUSE stack: a minimal pyfuse3 filesystem (uvloop,
asyncio mode, like objcache's mount) with one read-only file whose bytes
sit in memory and are answered as zero-copy slices.

    python -m bench.macro.fuse_memfs MOUNTPOINT SIZE [--readahead-kib N]

Prints "mounted" once the kernel has the mount; SIGTERM unmounts.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import stat

import numpy as np
import pyfuse3
import pyfuse3.asyncio
import uvloop

from objcache.fuse.readahead import after_init
from objcache.units import parse_size

FILE_INO = pyfuse3.ROOT_INODE + 1
NAME = b"data"


def pattern(size: int) -> bytes:
    """The file's bytes (the benchmark compares checksums with objcache's copy)."""
    return np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()


class MemoryFS(pyfuse3.Operations):
    def __init__(self, data: bytes, mountpoint: str, readahead_kib: int):
        super().__init__()
        self.data = memoryview(data)
        self.mountpoint, self.readahead_kib = mountpoint, readahead_kib

    def init(self):
        if self.readahead_kib:
            after_init(self.mountpoint, self.readahead_kib)

    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = 1.0
        if ino == pyfuse3.ROOT_INODE:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            a.st_mode, a.st_size, a.st_nlink = stat.S_IFREG | 0o444, len(self.data), 1
        a.st_blksize = 1 << 20
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return self.data[off:off + size]


async def _serve(mountpoint: str, size: int, readahead_kib: int) -> None:
    pyfuse3.asyncio.enable()
    pyfuse3.init(MemoryFS(pattern(size), mountpoint, readahead_kib), mountpoint,
                 {"fsname=memfs", "ro"})
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, pyfuse3.terminate)
    print("mounted", flush=True)
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("size")
    ap.add_argument("--readahead-kib", type=int, default=0)
    args = ap.parse_args()
    uvloop.run(_serve(args.mountpoint, parse_size(args.size), args.readahead_kib))


if __name__ == "__main__":
    main()
