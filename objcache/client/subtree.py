"""A cluster client whose root is a directory below the cluster's root.

``objcache mount s3://BUCKET/PREFIX/models/bert MNT --cluster ...`` shows
only that folder: the mount's root inode (1, as FUSE wants) is the folder's
inode in the cluster. ``SubtreeClient`` does the translation for the FUSE
operations, which speak inode numbers:

* an inode number passed in: 1 means the subtree's root; every other number
  is the cluster's own (children of the subtree keep their numbers);
* an inode returned: the subtree root's comes back as 1. Nothing below the
  subtree root has its number, and the cluster's root (1) is only ever
  asked for as the root's parent (``..`` of the mount's root), which the
  translation answers with the root itself, as a filesystem root does.

Data calls (read, write, flush, truncate) take and return file inodes,
whose numbers are the cluster's; they pass through unchanged.
"""
from __future__ import annotations

from objcache.meta.model import ROOT, Inode


class SubtreeClient:
    def __init__(self, client, root: int):
        self._client = client
        self.root = root

    def __getattr__(self, name):
        # Everything that does not name an inode by number: data calls,
        # status, close, chunk_size, ...
        return getattr(self._client, name)

    def _in(self, ino: int) -> int:
        return self.root if ino == ROOT else ino

    def _out(self, node: Inode) -> Inode:
        if node.id == self.root:
            node = node.copy()
            node.id = ROOT
            node.parent = ROOT
        return node

    async def getattr(self, ino):
        return self._out(await self._client.getattr(self._in(ino)))

    async def open(self, ino):
        return self._out(await self._client.open(self._in(ino)))

    async def lookup(self, parent, name):
        return self._out(await self._client.lookup(self._in(parent), name))

    async def readdir(self, ino):
        return await self._client.readdir(self._in(ino))

    async def readdir_plus(self, ino):
        return await self._client.readdir_plus(self._in(ino))

    async def create(self, parent, name, *args, **kwargs):
        return await self._client.create(self._in(parent), name, *args, **kwargs)

    async def mkdir(self, parent, name, *args, **kwargs):
        return await self._client.mkdir(self._in(parent), name, *args, **kwargs)

    async def symlink(self, parent, name, *args, **kwargs):
        return await self._client.symlink(self._in(parent), name, *args, **kwargs)

    async def unlink(self, parent, name, **kwargs):
        return await self._client.unlink(self._in(parent), name, **kwargs)

    async def rmdir(self, parent, name):
        return await self._client.rmdir(self._in(parent), name)

    async def rename(self, sp, sn, dp, dn, **kwargs):
        return await self._client.rename(self._in(sp), sn, self._in(dp), dn, **kwargs)

    async def link(self, ino, parent, name):
        return await self._client.link(ino, self._in(parent), name)

    async def setattr(self, ino, **fields):
        return self._out(await self._client.setattr(self._in(ino), **fields))

    async def fsync(self, ino, *args, **kwargs):
        return await self._client.fsync(self._in(ino), *args, **kwargs)
