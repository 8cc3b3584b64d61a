"""A client of an objcache cluster: namespace operations and file I/O
through any node (which coordinates them).

Errors come back as OSError with the errno a filesystem call would give
(ENOENT, EEXIST, ...). Calls fail over to the next node address when one is
unreachable.

Reads go straight to the chunks' owners (the client fetches the cluster
map and the ring and runs the same DataClient the nodes run, over RPC):
one network hop per chunk instead of two through a coordinating node.
Everything else goes through a node. An owner on this host is read from
its page arena (shared memory, objcache/ipc) instead of over RPC, unless
``local_reads=False`` or OBJCACHE_LOCAL_READS=0.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os

import msgpack

from objcache.cluster.ring import Ring, StaleRing, ring_version
from objcache.client.location import ClusterRoot
from objcache.ipc.client import LocalFirst, LocalReads
from objcache.meta.model import Inode, ROOT
from objcache.meta.namespace import ORPHAN_LEASE
from objcache.rpc import ClientPool, RemoteError, RpcClient, RpcError, Unavailable


log = logging.getLogger(__name__)


def parse_addresses(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad cluster address {item!r}: expected HOST:PORT")
        out.append((host, int(port)))
    return out


def _as_oserror(exc: RemoteError) -> Exception:
    """A remote handler's errno failure as the OSError a filesystem call
    gives; other remote errors unchanged."""
    if exc.code == "errno":
        return OSError((exc.details or {}).get("errno", errno.EIO), exc.message)
    return exc


async def _placed(op, attempts: int = 3):
    """Run a data operation that places chunks with the ring; when an owner
    says the ring was stale (the new one is adopted), place them again.
    Chunks an attempt wrote at the right owners are written again: their
    newer versions are the ones the flush publishes."""
    for attempt in range(attempts):
        try:
            return await op()
        except StaleRing:
            if attempt == attempts - 1:
                raise


class ClusterClient:
    def __init__(self, addresses, secret: bytes, *, timeout: float = 60.0,
                 local_reads: bool | None = None):
        if isinstance(addresses, str):
            addresses = parse_addresses(addresses)
        self.addresses = list(addresses)
        self.timeout = timeout
        self._clients = [RpcClient(h, p, secret, connect_timeout=5.0, backoff_max=1.0,
                                   max_payload=1 << 30) for h, p in self.addresses]
        self._current = 0
        self._secret = secret
        self._pool: ClientPool | None = None
        self._caller = None
        self._data = None                           # DataClient over the owners
        self._ring: Ring | None = None
        if local_reads is None:
            local_reads = os.environ.get("OBJCACHE_LOCAL_READS", "1") != "0"
        self._local = None
        if local_reads:
            self._local = LocalReads(secret)
        # Orphans this client holds (unlinked files a mount has open): their
        # lease is renewed every third of ``orphan_lease`` seconds while the
        # client lives; a killed client's expire (Namespace.ORPHAN_LEASE).
        self.orphan_lease = float(os.environ.get("OBJCACHE_ORPHAN_LEASE", ORPHAN_LEASE))
        self._orphans: set[int] = set()
        self._renewer: asyncio.Task | None = None

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except BaseException:  # noqa: BLE001 - closing
                pass
            self._renewer = None
        for c in self._clients:
            await c.close()
        if self._pool is not None:
            await self._pool.close()
        if self._local is not None:
            self._local.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def call(self, method: str, fields: dict | None = None, payload=None,
                   timeout: float | None = None):
        """``method`` at the first node that answers. Once this client has
        a ring (its direct data path), requests carry its version; a node
        with a newer ring refuses ("stale_ring", nothing done): the client
        adopts the node's map and sends the request again. A node still
        starting answers "not_ready": the next node is asked, and when
        every node is starting the client waits for them (backing off)
        within ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (timeout or self.timeout)
        delay = 0.05
        while True:
            last, starting = None, None
            for k in range(len(self._clients)):
                c = self._clients[(self._current + k) % len(self._clients)]
                try:
                    for attempt in range(3):
                        f = fields or {}
                        if self._ring is not None:
                            f = dict(f, rv=self._ring.version)
                        try:
                            r = await c.call(method, f, payload,
                                             timeout=max(0.1, end - loop.time()))
                            break
                        except RemoteError as exc:
                            if exc.code != "stale_ring" or attempt == 2:
                                raise
                            self._adopt((exc.details or {}).get("cluster"))
                    self._current = (self._current + k) % len(self._clients)
                    return r
                except RemoteError as exc:
                    if exc.code == "errno":
                        code = (exc.details or {}).get("errno", errno.EIO)
                        raise OSError(code, exc.message) from None
                    if exc.code != "not_ready":
                        raise
                    last = starting = exc
                except (Unavailable, RpcError, OSError) as exc:
                    last = exc
            if starting is None:
                raise OSError(errno.EHOSTUNREACH, f"no node of the cluster answered: {last!r}")
            if loop.time() + delay > end:
                raise OSError(errno.EAGAIN, f"no node of the cluster is ready: "
                                            f"{starting.message}")
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    # namespace ------------------------------------------------------------

    async def _inode(self, method, **fields) -> Inode:
        r = await self.call("meta." + method, fields)
        return Inode.from_wire(r.fields["inode"])

    async def getattr(self, ino: int) -> Inode:
        return await self._inode("getattr", ino=ino)

    async def open(self, ino: int) -> Inode:
        """getattr as an open sees it: a file replaced in the bucket by
        another tool is reloaded (Namespace.open)."""
        return await self._inode("open", ino=ino)

    async def lookup(self, parent: int, name: bytes) -> Inode:
        return await self._inode("lookup", parent=parent, name=bytes(name))

    async def readdir(self, ino: int) -> list[tuple[bytes, int, int]]:
        r = await self.call("meta.readdir", {"ino": ino})
        return [(bytes(n), c, k) for n, c, k in msgpack.unpackb(r.payload, strict_map_key=False)]

    async def readdir_plus(self, ino: int) -> list[tuple[bytes, Inode]]:
        """Entries with their inodes, in one call."""
        r = await self.call("meta.readdir_plus", {"ino": ino})
        return [(bytes(n), Inode.from_wire(w)) for n, w in msgpack.unpackb(r.payload, strict_map_key=False)]

    async def create(self, parent, name, mode=0o644, uid=0, gid=0) -> Inode:
        return await self._inode("create", parent=parent, name=bytes(name), mode=mode,
                                 uid=uid, gid=gid)

    async def mkdir(self, parent, name, mode=0o755, uid=0, gid=0) -> Inode:
        return await self._inode("mkdir", parent=parent, name=bytes(name), mode=mode,
                                 uid=uid, gid=gid)

    async def symlink(self, parent, name, target, uid=0, gid=0) -> Inode:
        return await self._inode("symlink", parent=parent, name=bytes(name),
                                 target=bytes(target), uid=uid, gid=gid)

    async def unlink(self, parent, name, *, keep=()) -> int:
        """Remove the name; returns its inode. ``keep``: inodes held open
        by the caller, kept as orphans if this was their last link
        (``forget`` them at the last close)."""
        r = await self.call("meta.unlink", {"parent": parent, "name": bytes(name),
                                            "keep": list(keep), "lease": self.orphan_lease})
        return r.fields.get("ino", 0)

    def hold_orphan(self, ino: int) -> None:
        """This client keeps orphan ``ino`` open: renew its lease until
        ``forget(ino)`` or ``close()``."""
        self._orphans.add(ino)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_orphans(), name="orphan-leases")

    async def _renew_orphans(self) -> None:
        while True:
            await asyncio.sleep(self.orphan_lease / 3)
            if not self._orphans:
                continue
            try:
                await self.call("meta.renew_orphans", {"inos": sorted(self._orphans),
                                                       "lease": self.orphan_lease})
            except Exception as exc:  # noqa: BLE001 - two more tries before the lease ends
                log.warning("renewing the leases of %d unlinked open files failed: %r",
                            len(self._orphans), exc)

    async def forget(self, ino: int) -> None:
        self._orphans.discard(ino)
        await self.call("meta.forget", {"ino": ino})

    async def forget_orphans(self) -> int:
        return (await self.call("meta.forget_orphans")).fields["n"]

    async def rmdir(self, parent, name) -> None:
        await self.call("meta.rmdir", {"parent": parent, "name": bytes(name)})

    async def rename(self, sp, sn, dp, dn, *, noreplace=False, keep=()) -> None:
        await self.call("meta.rename", {"sp": sp, "sn": bytes(sn), "dp": dp, "dn": bytes(dn),
                                        "noreplace": noreplace, "keep": list(keep),
                                        "lease": self.orphan_lease})

    async def link(self, ino, parent, name) -> Inode:
        return await self._inode("link", ino=ino, parent=parent, name=bytes(name))

    async def setattr(self, ino, **fields) -> Inode:
        return await self._inode("setattr", ino=ino, fields=fields)

    async def resolve(self, path: str) -> Inode:
        """The inode at ``path`` ("a/b/c", relative to the bucket prefix)."""
        node = await self.getattr(ROOT)
        for part in [p for p in path.split("/") if p]:
            node = await self.lookup(node.id, part.encode())
        return node

    # data -----------------------------------------------------------------

    async def _refresh_map(self) -> int:
        r = await self.call("cluster.map")
        self._adopt(r.fields["cluster"], force=True)
        return r.fields["chunk_size"]

    def _adopt(self, c: dict | None, force: bool = False) -> None:
        """Use cluster map ``c`` (from cluster.map, or with a stale_ring
        answer) if its ring is at least as new as ours."""
        if not c or (not force and self._ring is not None
                     and ring_version(c) < self._ring.version):
            return
        if self._caller is not None:
            self._caller.set_map(c)
        if self._local is not None:
            self._local.set_map(c)
        if self._ring is None or self._ring.version != ring_version(c) \
                or list(self._ring.groups) != sorted(c["ring"] or [1]):
            self._ring = Ring(c["ring"] or [1], version=ring_version(c))

    async def _direct(self):
        if self._data is None:
            from objcache.engine.data import DataClient
            from objcache.engine.remote import ChunkProxy, LeaderCaller
            self._pool = ClientPool(self._secret, connect_timeout=5.0, backoff_max=1.0,
                                    max_payload=1 << 30)
            self._caller = LeaderCaller(
                self._pool, self._refresh_map,
                ring_version=lambda: self._ring.version if self._ring else None,
                adopt=self._adopt)
            chunk = await self._refresh_map()

            async def service(g):
                proxy = ChunkProxy(self._caller, g)
                if self._local is not None:
                    ch = await self._local.channel(g, self._caller.leader_hint.get(g))
                    if ch is not None:
                        return LocalFirst(ch, g, proxy)
                return proxy
            self._data = DataClient(service, lambda: self._ring, None, chunk)
        return self._data

    async def root(self) -> ClusterRoot:
        """The bucket and prefix the cluster serves (its root directory)."""
        r = await self.call("cluster.map")
        return ClusterRoot(r.fields["bucket"], r.fields["prefix"])

    async def chunk_size(self) -> int:
        return (await self._direct()).chunk_size

    async def read(self, node: Inode, offset: int, length: int) -> bytes:
        """Bytes of the file as ``node`` (a getattr/lookup result)
        describes it, read from the chunks' owners directly."""
        data = await self._direct()
        try:
            return await _placed(lambda: data.read(node, offset, length))
        except RemoteError as exc:
            raise _as_oserror(exc) from None

    async def write(self, node: Inode, offset: int, data) -> dict[int, int]:
        """Write at the chunks' owners directly (one hop: the owner's Raft
        group commits it); returns {chunk: version} for ``flush``."""
        direct = await self._direct()
        try:
            return await _placed(lambda: direct.write(node, offset, data))
        except RemoteError as exc:
            raise _as_oserror(exc) from None

    async def flush(self, node: Inode, size: int, versions: dict[int, int], *,
                    truncate: bool = False) -> Inode:
        r = await self.call("data.flush", {"inode": node.to_wire(), "size": size,
                                           "versions": list(versions.items()),
                                           "truncate": truncate})
        return Inode.from_wire(r.fields["inode"])

    async def truncate(self, node: Inode, size: int) -> Inode:
        """Set the file's size (the node zeroes the partial chunk past a
        shrunk end: DataClient.truncate)."""
        return await self.flush(node, size, {}, truncate=True)

    async def fsync(self, ino: int, timeout: float = 300) -> None:
        await self.call("data.fsync", {"ino": ino, "timeout": timeout}, timeout=timeout + 10)

    # cluster ----------------------------------------------------------------

    async def status(self) -> dict:
        return (await self.call("cluster.status")).fields

    async def drain(self, timeout: float = 600) -> None:
        await self.call("cluster.drain", {"timeout": timeout}, timeout=timeout + 10)
