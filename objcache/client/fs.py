"""An fsspec filesystem over an objcache cluster (protocol ``objcache``).

    import fsspec
    fs = fsspec.filesystem("objcache", cluster="127.0.0.1:7000", bucket="models")
    fs.ls("/")
    with fs.open("dir/weights.bin", "rb") as f: f.seek(1024); f.read(10)
    fs.pipe_file("dir/new.txt", b"hello"); fs.fsync("dir/new.txt")

Paths are relative to the cluster's bucket prefix ("a/b" is s3://bucket/
prefix/a/b). Writes go to the cluster (durable there when ``close()``
returns: close = flush); ``fsync(path)`` waits until the bucket holds them.
The cluster secret comes from ``secret=``, ``secret_file=``, or
OBJCACHE_SECRET. ``bucket=``, when given, must match the cluster's.
"""
from __future__ import annotations

import errno
import os

from fsspec.asyn import AsyncFileSystem, sync_wrapper
from fsspec.spec import AbstractBufferedFile

from objcache.meta.model import ROOT, Inode, Kind
from objcache.rpc import load_secret

from .cluster import ClusterClient


def _info(path: str, node: Inode) -> dict:
    kind = {Kind.FILE: "file", Kind.DIR: "directory", Kind.SYMLINK: "link"}[node.kind]
    return {"name": path.strip("/"), "size": node.size if node.kind != Kind.DIR else 0,
            "type": kind, "mode": node.st_mode, "uid": node.uid, "gid": node.gid,
            "mtime": node.mtime_ns / 1e9, "ino": node.id, "nlink": node.nlink,
            "etag": node.s3.etag if node.s3 else None}


class ObjcacheFileSystem(AsyncFileSystem):
    protocol = "objcache"
    root_marker = ""
    async_impl = True

    def __init__(self, cluster: str, bucket: str | None = None, secret: bytes | str | None = None,
                 secret_file: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if secret is None:
            secret = load_secret(secret_file)
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.cluster = cluster
        self.bucket = bucket
        self._client: ClusterClient | None = None

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("objcache://"):
            path = path[len("objcache://"):]
        return path.strip("/")

    @property
    def client(self) -> ClusterClient:
        if self._client is None:
            self._client = ClusterClient(self.cluster, self._secret)
        return self._client

    async def _node(self, path: str) -> Inode:
        path = self._strip_protocol(path)
        try:
            return await self.client.resolve(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
            raise

    async def _opened(self, path: str) -> Inode:
        """The file as an open sees it (a replacement in the bucket made by
        another tool is picked up)."""
        node = await self._node(path)
        return await self.client.open(node.id) if node.kind == Kind.FILE else node

    async def _parent_dir(self, path: str) -> tuple[Inode, bytes]:
        path = self._strip_protocol(path)
        parent, _, name = path.rpartition("/")
        if not name:
            raise ValueError(f"{path!r} has no file name")
        node = await self._node(parent) if parent else await self.client.getattr(ROOT)
        if node.kind != Kind.DIR:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
        return node, name.encode()

    async def _info(self, path, **kwargs):
        return _info(self._strip_protocol(path), await self._node(path))

    async def _ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        node = await self._node(path) if path else await self.client.getattr(ROOT)
        if node.kind != Kind.DIR:
            return [_info(path, node)] if detail else [path]
        out = []
        for name, child, kind in await self.client.readdir(node.id):
            full = f"{path}/{name.decode()}" if path else name.decode()
            if not detail:
                out.append(full)
                continue
            if child:
                out.append(_info(full, await self.client.getattr(child)))
            else:
                out.append(_info(full, await self.client.lookup(node.id, name)))
        return sorted(out, key=lambda i: i["name"]) if detail else sorted(out)

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        node = await self._opened(path)
        if node.kind == Kind.DIR:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        start = 0 if start is None else (start if start >= 0 else max(0, node.size + start))
        end = node.size if end is None else (end if end >= 0 else max(0, node.size + end))
        if end <= start:
            return b""
        return bytes(await self.client.read(node, start, end - start))

    async def _pipe_file(self, path, value, **kwargs):
        parent, name = await self._parent_dir(path)
        try:
            node = await self.client.lookup(parent.id, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            node = await self.client.create(parent.id, name, 0o644, os.getuid(), os.getgid())
        versions = await self.client.write(node, 0, value) if value else {}
        await self.client.flush(node, len(value), versions, truncate=True)

    async def _rm_file(self, path, **kwargs):
        parent, name = await self._parent_dir(path)
        await self.client.unlink(parent.id, name)

    async def _rm(self, path, recursive=False, **kwargs):
        paths = path if isinstance(path, list) else [path]
        for p in paths:
            info = await self._info(p)
            if info["type"] == "directory":
                if not recursive:
                    raise IsADirectoryError(errno.EISDIR, "is a directory (recursive=False)", p)
                for child in await self._ls(p, detail=False):
                    await self._rm(child, recursive=True)
                parent, name = await self._parent_dir(p)
                await self.client.rmdir(parent.id, name)
            else:
                await self._rm_file(p)

    async def _mkdir(self, path, create_parents=True, **kwargs):
        path = self._strip_protocol(path)
        parts = [p for p in path.split("/") if p]
        node = await self.client.getattr(ROOT)
        for i, part in enumerate(parts):
            try:
                node = await self.client.lookup(node.id, part.encode())
                if i == len(parts) - 1 and not kwargs.get("exist_ok", True):
                    raise FileExistsError(errno.EEXIST, "exists", path)
            except OSError as exc:
                if exc.errno != errno.ENOENT or (not create_parents and i < len(parts) - 1):
                    raise
                node = await self.client.mkdir(node.id, part.encode(), 0o755,
                                               os.getuid(), os.getgid())

    async def _makedirs(self, path, exist_ok=False):
        await self._mkdir(path, create_parents=True, exist_ok=exist_ok)

    async def _mv(self, path1, path2, **kwargs):
        sp, sn = await self._parent_dir(path1)
        dp, dn = await self._parent_dir(path2)
        await self.client.rename(sp.id, sn, dp.id, dn)

    mv = sync_wrapper(_mv)          # a rename, not fsspec's copy + delete

    async def _fsync(self, path):
        node = await self._node(path)
        await self.client.fsync(node.id)

    fsync = sync_wrapper(_fsync)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        return ObjcacheFile(self, path, mode, block_size=block_size or 8 << 20,
                            cache_options=cache_options, **kwargs)


class ObjcacheFile(AbstractBufferedFile):
    """Reads fetch ranges from the cluster; writes are buffered and written
    at ``flush``/``close`` (close = durable in the cluster)."""

    def __init__(self, fs, path, mode="rb", **kwargs):
        self._node = None
        self._versions: dict[int, int] = {}
        super().__init__(fs, path, mode, **kwargs)
        if "r" in mode:
            self._node = fs.loop and sync_call(fs, fs._opened, path)
            self.size = self._node.size

    def _fetch_range(self, start, end):
        return bytes(sync_call(self.fs, self.fs.client.read, self._node, start, end - start)) \
            if end > start else b""

    def _initiate_upload(self):
        fs = self.fs
        parent, name = sync_call(fs, fs._parent_dir, self.path)

        async def create_or_truncate():
            try:
                node = await fs.client.lookup(parent.id, name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                return await fs.client.create(parent.id, name, 0o644, os.getuid(), os.getgid())
            return node
        self._node = sync_call(fs, create_or_truncate)

    def _upload_chunk(self, final=False):
        data = self.buffer.getvalue()
        if data:
            vs = sync_call(self.fs, self.fs.client.write, self._node, self.offset, data)
            self._versions.update(vs)
        if final:
            size = self.offset + len(data)
            self._node = sync_call(self.fs, self.fs.client.flush, self._node, size,
                                   self._versions, truncate=True)
        return True


def sync_call(fs, fn, *args, **kwargs):
    from fsspec.asyn import sync
    return sync(fs.loop, fn, *args, **kwargs)
