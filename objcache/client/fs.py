"""An fsspec filesystem over an objcache cluster (protocol ``objcache``).

Paths are written as for s3fs: the object's full location
``BUCKET/PREFIX/KEY``, with or without ``objcache://`` — switching a URL's
``s3://`` to ``objcache://`` is the only change a user makes::

    import fsspec
    fs = fsspec.filesystem("objcache", cluster="10.0.0.5:7070")
    fs.ls("models/prod")                       # the cluster serves s3://models/prod/
    with fs.open("models/prod/bert/weights.bin", "rb") as f: f.read(10)
    fs.pipe_file("models/prod/new/config.json", b"{}")    # parents are created
    fsspec.open("objcache://models/prod/bert/config.json").open()   # cluster from the env

A path outside the bucket and prefix the cluster serves is an error that
names both (OutsideCluster, a ValueError); the folders above the cluster's
root list the way toward it and are read-only. Writes create missing parent
directories, as object stores have none. The cluster's addresses come from
``cluster=`` ("HOST:PORT[,HOST:PORT...]") or OBJCACHE_CLUSTER; the secret
from ``secret=``, ``secret_file=`` or OBJCACHE_SECRET. ``bucket=``, when
given, is checked against the cluster's at first use.

Durability: a write is durable in the cluster when ``close()`` (or
``pipe_file``) returns; ``fsync(path)`` waits until the bucket holds it.
``mv`` is a rename (atomic, one transaction), not copy + delete.
"""
from __future__ import annotations

import asyncio
import errno
import os
from datetime import datetime, timezone

from fsspec.asyn import AsyncFileSystem, sync, sync_wrapper
from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import other_paths

from objcache.meta.model import ROOT, Inode, Kind
from objcache.rpc import load_secret

from .cluster import ClusterClient
from .location import ABOVE_ROOT, ClusterRoot, OutsideCluster

__all__ = ["ObjcacheFileSystem", "ObjcacheFile", "OutsideCluster"]

_KIND = {Kind.FILE: "file", Kind.DIR: "directory", Kind.SYMLINK: "link"}


def _info(location: str, node: Inode) -> dict:
    return {"name": location, "size": node.size if node.kind != Kind.DIR else 0,
            "type": _KIND[node.kind], "mode": node.st_mode, "uid": node.uid, "gid": node.gid,
            "mtime": node.mtime_ns / 1e9, "ino": node.id, "nlink": node.nlink,
            "etag": node.s3.etag if node.s3 else None}


def _folder(location: str) -> dict:
    """A folder above the cluster's root (listing only)."""
    return {"name": location, "size": 0, "type": "directory"}


def _enoent(location: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "no such file or directory", location)


class ObjcacheFileSystem(AsyncFileSystem):
    protocol = "objcache"
    root_marker = ""
    async_impl = True

    def __init__(self, cluster: str | None = None, secret: bytes | str | None = None,
                 secret_file: str | None = None, bucket: str | None = None, **kwargs):
        super().__init__(**kwargs)
        cluster = cluster or os.environ.get("OBJCACHE_CLUSTER")
        if not cluster:
            raise ValueError("no cluster given: pass cluster='HOST:PORT[,HOST:PORT...]' "
                             "or set OBJCACHE_CLUSTER")
        if secret is None:
            secret = load_secret(secret_file)
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.cluster = cluster
        self.bucket = bucket
        self._client: ClusterClient | None = None
        self._root: ClusterRoot | None = None

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

    def close(self) -> None:
        """Close the connections to the cluster (a later call reconnects)."""
        if self._client is not None:
            client, self._client = self._client, None
            sync(self.loop, client.close)

    # where a path is -------------------------------------------------------

    async def _cluster_root(self) -> ClusterRoot:
        if self._root is None:
            root = await self.client.root()
            if self.bucket is not None and self.bucket.strip("/") not in (root.bucket, root.path):
                raise OutsideCluster(f"bucket={self.bucket!r} was given, but the cluster at "
                                     f"{self.cluster} serves {root.url}")
            self._root = root
        return self._root

    async def _relative(self, path: str) -> tuple[str, str | None]:
        """(location, path inside the cluster or ABOVE_ROOT)."""
        loc = self._strip_protocol(path)
        return loc, (await self._cluster_root()).relative(loc)

    async def _writable(self, path: str) -> tuple[str, str]:
        loc, rel = await self._relative(path)
        if rel is ABOVE_ROOT:
            raise OutsideCluster(f"{loc!r} is above this cluster's root "
                                 f"{self._root.url}: nothing can be written there")
        return loc, rel

    async def _resolve(self, loc: str, rel: str) -> Inode:
        try:
            return await self.client.resolve(rel)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise _enoent(loc) from None
            raise

    async def _node(self, path: str) -> Inode:
        loc, rel = await self._relative(path)
        if rel is ABOVE_ROOT:
            raise IsADirectoryError(errno.EISDIR, "is a directory", loc)
        return await self._resolve(loc, rel)

    async def _opened(self, path: str) -> Inode:
        """The file as an open sees it (a replacement in the bucket made by
        another tool is picked up)."""
        node = await self._node(path)
        if node.kind == Kind.DIR:
            raise IsADirectoryError(errno.EISDIR, "is a directory", self._strip_protocol(path))
        return await self.client.open(node.id)

    async def _ensure_dir(self, rel: str) -> Inode:
        """The directory at ``rel``, created with its missing parents. Safe
        against concurrent creators (EEXIST -> look it up)."""
        node = await self.client.getattr(ROOT)
        done = []
        for part in [p for p in rel.split("/") if p]:
            name = part.encode()
            try:
                node = await self.client.lookup(node.id, name)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                try:
                    node = await self.client.mkdir(node.id, name, 0o755, os.getuid(), os.getgid())
                except OSError as exc2:
                    if exc2.errno != errno.EEXIST:
                        raise
                    node = await self.client.lookup(node.id, name)
            done.append(part)
            if node.kind != Kind.DIR:
                where = self._root.location("/".join(done))
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", where)
        return node

    async def _parent_dir(self, path: str) -> tuple[str, Inode, bytes]:
        """(location, parent directory created as needed, name) of a path
        to write."""
        loc, rel = await self._writable(path)
        if not rel:
            raise IsADirectoryError(errno.EISDIR, "the cluster's root is a directory", loc)
        parent, _, name = rel.rpartition("/")
        return loc, await self._ensure_dir(parent), name.encode()

    async def _create(self, path: str, *, exclusive: bool = False) -> tuple[Inode, bool]:
        """The file at ``path``, created (with its parents) if missing:
        (inode, existed)."""
        loc, parent, name = await self._parent_dir(path)
        try:
            node = await self.client.lookup(parent.id, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        else:
            if exclusive:
                raise FileExistsError(errno.EEXIST, "file exists", loc)
            if node.kind == Kind.DIR:
                raise IsADirectoryError(errno.EISDIR, "is a directory", loc)
            return await self.client.open(node.id), True
        try:
            return await self.client.create(parent.id, name, 0o644, os.getuid(), os.getgid()), False
        except OSError as exc:
            if exc.errno != errno.EEXIST or exclusive:
                raise
            return await self.client.open((await self.client.lookup(parent.id, name)).id), True

    # reading the namespace ---------------------------------------------------

    async def _info(self, path, **kwargs):
        loc, rel = await self._relative(path)
        if rel is ABOVE_ROOT:
            return _folder(loc)
        return _info(loc, await self._resolve(loc, rel))

    async def _ls(self, path, detail=True, **kwargs):
        loc, rel = await self._relative(path)
        if rel is ABOVE_ROOT:
            out = [_folder(self._root.below(loc))]
        else:
            node = await self._resolve(loc, rel)
            if node.kind != Kind.DIR:
                out = [_info(loc, node)]
            else:
                out = sorted((_info(f"{loc}/{name.decode()}", child)
                              for name, child in await self.client.readdir_plus(node.id)),
                             key=lambda i: i["name"])
        return out if detail else [i["name"] for i in out]

    async def _modified(self, path):
        info = await self._info(path)
        if "mtime" not in info:
            raise IsADirectoryError(errno.EISDIR, "a folder above the cluster's root "
                                    "has no modification time", info["name"])
        return datetime.fromtimestamp(info["mtime"], tz=timezone.utc)

    modified = sync_wrapper(_modified)

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        node = await self._opened(path)
        start = 0 if start is None else (start if start >= 0 else max(0, node.size + start))
        end = node.size if end is None else (end if end >= 0 else max(0, node.size + end))
        end = min(end, node.size)
        if end <= start:
            return b""
        return bytes(await self.client.read(node, start, end - start))

    # writing -----------------------------------------------------------------

    async def _pipe_file(self, path, value, mode="overwrite", **kwargs):
        node, _ = await self._create(path, exclusive=(mode == "create"))
        value = memoryview(value).cast("B") if not isinstance(value, bytes) else value
        versions = await self.client.write(node, 0, value) if len(value) else {}
        await self.client.flush(node, len(value), versions, truncate=True)

    async def _stream_in(self, node: Inode, read_piece, callback=DEFAULT_CALLBACK,
                         offset: int = 0) -> Inode:
        """Write the pieces ``read_piece()`` returns (until b"") from
        ``offset`` on, and publish the file with that end."""
        versions: dict[int, int] = {}
        pos = offset
        while True:
            piece = await read_piece()
            if not piece:
                break
            versions.update(await self.client.write(node, pos, piece))
            pos += len(piece)
            callback.relative_update(len(piece))
        return await self.client.flush(node, pos, versions, truncate=True)

    async def _cp_file(self, path1, path2, **kwargs):
        loc1, rel1 = await self._relative(path1)
        src = await self._node(path1) if rel1 is not ABOVE_ROOT else None
        if src is None or src.kind == Kind.DIR:
            await self._makedirs(path2, exist_ok=True)
            return
        src = await self.client.open(src.id)
        dst, _ = await self._create(path2)
        step = await self.client.chunk_size()
        pos = 0

        async def piece():
            nonlocal pos
            n = min(step, src.size - pos)
            data = bytes(await self.client.read(src, pos, n)) if n > 0 else b""
            pos += len(data)
            return data
        await self._stream_in(dst, piece)

    async def _put_file(self, lpath, rpath, callback=DEFAULT_CALLBACK, mode="overwrite",
                        **kwargs):
        if os.path.isdir(lpath):
            await self._makedirs(rpath, exist_ok=True)
            return
        node, _ = await self._create(rpath, exclusive=(mode == "create"))
        step = await self.client.chunk_size()
        loop = asyncio.get_running_loop()
        with open(lpath, "rb") as f:
            callback.set_size(os.fstat(f.fileno()).st_size)
            await self._stream_in(node, lambda: loop.run_in_executor(None, f.read, step),
                                  callback)

    async def _get_file(self, rpath, lpath, callback=DEFAULT_CALLBACK, **kwargs):
        if os.path.isdir(lpath):
            return
        loc, rel = await self._relative(rpath)
        node = await self._node(rpath) if rel is not ABOVE_ROOT else None
        if node is None or node.kind == Kind.DIR:
            os.makedirs(lpath, exist_ok=True)
            return
        node = await self.client.open(node.id)
        step = await self.client.chunk_size()
        callback.set_size(node.size)
        loop = asyncio.get_running_loop()
        with open(lpath, "wb") as f:
            for pos in range(0, node.size, step):
                data = await self.client.read(node, pos, min(step, node.size - pos))
                await loop.run_in_executor(None, f.write, data)
                callback.relative_update(len(data))

    async def _mkdir(self, path, create_parents=True, exist_ok=True, **kwargs):
        loc, rel = await self._relative(path)
        if rel is ABOVE_ROOT or not rel:
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, "exists", loc)
            return
        parent, _, name = rel.rpartition("/")
        if not create_parents and parent:
            await self._resolve(self._root.location(parent), parent)
        dparent = await self._ensure_dir(parent)
        try:
            await self.client.mkdir(dparent.id, name.encode(), 0o755, os.getuid(), os.getgid())
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
            node = await self.client.lookup(dparent.id, name.encode())
            if node.kind != Kind.DIR:
                raise FileExistsError(errno.EEXIST, "a file exists there", loc) from None
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, "exists", loc) from None

    async def _makedirs(self, path, exist_ok=False):
        await self._mkdir(path, create_parents=True, exist_ok=exist_ok)

    # removing ------------------------------------------------------------------

    async def _rm_file(self, path, **kwargs):
        loc, parent, name = await self._parent_dir(path)
        node = await self.client.lookup(parent.id, name)
        if node.kind == Kind.DIR:
            raise IsADirectoryError(errno.EISDIR, "is a directory", loc)
        await self.client.unlink(parent.id, name)

    async def _rmdir(self, path):
        loc, parent, name = await self._parent_dir(path)
        await self.client.rmdir(parent.id, name)

    rmdir = sync_wrapper(_rmdir)

    async def _rm(self, path, recursive=False, maxdepth=None, batch_size=None, **kwargs):
        """Remove files (and, with ``recursive``, directories with what is
        in them). The cluster's root and the folders above it stay."""
        paths = await self._expand_path(path, recursive=recursive, maxdepth=maxdepth)
        files, dirs = [], []
        for p in paths:
            loc, rel = await self._relative(p)
            if rel is ABOVE_ROOT or not rel:
                continue
            info = await self._info(p)
            (dirs if info["type"] == "directory" else files).append(p)
        if dirs and not recursive:
            raise IsADirectoryError(errno.EISDIR, "is a directory (use recursive=True)", dirs[0])
        sem = asyncio.Semaphore(batch_size or 32)

        async def one(p):
            async with sem:
                await self._rm_file(p)
        await asyncio.gather(*(one(p) for p in files))
        for d in sorted(dirs, key=lambda p: p.count("/"), reverse=True):
            await self._rmdir(d)

    # moving ----------------------------------------------------------------------

    async def _mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        """A rename per source (atomic in the cluster). As ``mv`` in a
        shell: into ``path2`` when it is an existing directory or ends
        with ``/``; several sources (a list or a glob) go into ``path2``."""
        if isinstance(path1, list) or any(c in path1 for c in "*?["):
            sources = await self._expand_path(path1, maxdepth=maxdepth)
            targets = other_paths(sources, path2, exists=await self._isdir(path2))
        else:
            sources, targets = [path1], [path2]
        for src, dst in zip(sources, targets):
            dst_loc = self._strip_protocol(dst)
            if str(dst).endswith("/") or await self._isdir(dst_loc):
                dst_loc = f"{dst_loc}/{self._strip_protocol(src).rsplit('/', 1)[-1]}"
            _, sp, sn = await self._parent_dir(src)
            _, dp, dn = await self._parent_dir(dst_loc)
            await self.client.rename(sp.id, sn, dp.id, dn)

    mv = sync_wrapper(_mv)

    async def _fsync(self, path):
        node = await self._node(path)
        await self.client.fsync(node.id)

    fsync = sync_wrapper(_fsync)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        if not autocommit:
            raise NotImplementedError("objcache files commit at close (autocommit=True)")
        return ObjcacheFile(self, path, mode, block_size=block_size or (8 << 20),
                            cache_options=cache_options, **kwargs)


class ObjcacheFile(AbstractBufferedFile):
    """Reads fetch ranges from the chunks' owners. Writes are buffered and
    sent to the owners as blocks fill; ``close`` publishes the file (durable
    in the cluster). Modes: ``rb``; ``wb`` (the file is created, with its
    parents, at open; its old contents stay visible until close); ``ab``
    (appends to the end as it was at open); ``xb`` (FileExistsError if the
    file exists)."""

    def __init__(self, fs, path, mode="rb", **kwargs):
        self._node = None
        self._base = 0                      # where the first written byte goes
        self._versions: dict[int, int] = {}
        if mode != "rb":
            node, existed = sync(fs.loop, fs._create, path, exclusive=(mode == "xb"))
            self._node = node
            if mode == "ab" and existed:
                self._base = node.size
            super().__init__(fs, path, mode, **kwargs)
            self.loc = self._base
            return
        node = sync(fs.loop, fs._opened, path)
        super().__init__(fs, path, mode, size=node.size, **kwargs)
        self._node = node

    def _fetch_range(self, start, end):
        if end <= start:
            return b""
        return bytes(sync(self.fs.loop, self.fs.client.read, self._node, start, end - start))

    def _initiate_upload(self):
        pass                                # the file was created at open

    def _upload_chunk(self, final=False):
        data = self.buffer.getvalue()
        at = self._base + self.offset
        if data:
            self._versions.update(sync(self.fs.loop, self.fs.client.write, self._node, at, data))
        if final:
            self._node = sync(self.fs.loop, self.fs.client.flush, self._node, at + len(data),
                              self._versions, truncate=True)
        return True
