"""Namespace operations: lookups, listings and the transactions that change
the tree, over any set of metadata groups.

``Namespace`` runs wherever a request is handled (a node serving a client,
or a test). It reads group state through the router (linearizable reads at
the group leaders), turns each operation into group -> ops for the
transaction layer, and loads directory listings from the bucket lazily.

Placement (docs/storage-engine.md): an inode's record lives in
``ring.meta_owner(inode)``; a directory's entries live in the directory's
own group. A file or symlink gets an id the ring places in its parent
directory's group, so creating or removing one is a single-group
transaction; a directory gets an id anywhere (spreading the tree), so
mkdir/rmdir and cross-directory renames are two-phase.

Errors are OSError with the errno a filesystem call should return.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import random
import stat
import time
from typing import Callable

from objcache.txn.coordinator import Coordinator, TransactionFailed

from objcache.backend import MAX_KEY_BYTES

from . import names as nm
from . import xattrs as xattr_codec
from .model import ROOT, Inode, Kind, S3State, make_inode_id

log = logging.getLogger(__name__)

ALL = object()          # _shadowed: every name under the prefix

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
READDIR_LOOKUPS = 64    # readdir_plus: lookups of bucket-only names in flight
# Seconds an orphan (an unlinked file a mount holds open) lives without a
# renewal from its holder. The holder renews every third of it (client/
# cluster.py); a killed holder's orphans are forgotten this long after its
# last renewal (engine/writeback.py expires them).
ORPHAN_LEASE = 300.0


def _ns(t: float) -> int:
    return int(t * 1e9)


class Namespace:
    def __init__(self, router, ring: Callable, store, *, coordinator: Coordinator | None = None,
                 list_ttl: float = 60.0, clock=time.time, default_uid: int = 0,
                 default_gid: int = 0, list_page: int = 1000, reserve_block: int = 256,
                 revalidate_ttl: float = 1.0):
        self.router = router
        self.ring = ring                            # () -> current Ring
        self.store = store
        self.tx = coordinator or Coordinator(router)
        self.list_ttl = list_ttl
        self.clock = clock
        self.uid, self.gid = default_uid, default_gid
        self.list_page = list_page
        self.reserve_block = reserve_block
        self._pools: dict[int, list[int]] = {}      # group -> reserved counters
        self._pool_locks: dict[int, asyncio.Lock] = {}
        self._listing: dict[int, asyncio.Future] = {}
        self.revalidate_ttl = revalidate_ttl
        self._validated: dict[int, float] = {}      # inode -> when open() last checked its ETag
        # Listing generations: random, so that listings by different clients
        # of one directory never share one.
        self._gen_rng = random.Random()

    # ------------------------------------------------------------ plumbing

    def _group(self, inode: int) -> int:
        return self.ring().meta_owner(inode)

    async def _read(self, group: int, request: list) -> list:
        """A read at the group leader; waits out transactions in progress."""
        delay = 0.002
        for _ in range(200):
            r = await self.router.read(group, request)
            if r[0] == "ok" or r[1] != errno.EAGAIN:
                return r
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise OSError(errno.EAGAIN, f"{request[0]}: still locked by a transaction")

    @staticmethod
    def _check(r: list, what: str) -> list:
        if r[0] != "ok":
            raise OSError(r[1], f"{what}: {r[2]}")
        return r

    async def _run(self, parts: dict[int, list], coordinator: int | None = None):
        try:
            return await self.tx.run(parts, coordinator)
        except TransactionFailed as exc:
            raise OSError(exc.errno, exc.strerror or str(exc)) from None

    async def _alloc(self, group: int, *, near: int | None = None) -> int:
        """A fresh inode id allocated by ``group``; with ``near``, one the
        ring places in ``near``'s group (so it lives with that directory)."""
        ring = self.ring()
        target = ring.meta_owner(near) if near is not None else None
        lock = self._pool_locks.setdefault(group, asyncio.Lock())
        async with lock:
            pool = self._pools.setdefault(group, [])
            for _ in range(64):
                while pool:
                    c = pool.pop()
                    ino = make_inode_id(group, c)
                    if target is None or ring.meta_owner(ino) == target:
                        return ino
                n = self.reserve_block * max(1, len(ring.groups))
                r = self._check(await self.router.propose(group, ["reserve", n]), "reserve")
                pool.extend(range(r[2], r[1] - 1, -1))
        raise OSError(errno.ENOSPC, "could not allocate an inode id")

    # ------------------------------------------------------------ bootstrap

    async def ensure_root(self) -> Inode:
        """Create the root directory record if this bucket has none yet."""
        g = self._group(ROOT)
        r = await self._read(g, ["getattr", ROOT])
        if r[0] == "ok":
            return Inode.from_wire(r[1])
        root = Inode(ROOT, Kind.DIR, DEFAULT_DIR_MODE, self.uid, self.gid,
                     mtime_ns=_ns(self.clock()), nlink=2, data_version=1, uploaded_version=1)
        try:
            await self._run({g: [["mkinode", root.to_wire(), "", False]]})
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        return await self.getattr(ROOT)

    # ------------------------------------------------------------ reads

    async def getattr(self, ino: int) -> Inode:
        r = self._check(await self._read(self._group(ino), ["getattr", ino]), "getattr")
        return Inode.from_wire(r[1])

    async def lookup(self, parent: int, name: bytes) -> Inode:
        name = bytes(name)
        if len(name) > nm.NAME_MAX:
            # No such name can exist; POSIX wants ENAMETOOLONG, not ENOENT.
            raise OSError(errno.ENAMETOOLONG, "file name longer than 255 bytes")
        g = self._group(parent)
        for _ in range(5):
            r = await self._read(g, ["lookup", parent, name])
            if r[0] == "err" and r[1] == errno.ENODATA:
                await self.load_listing(parent)
                continue
            self._check(r, f"lookup {name!r}")
            child, kind, info = r[1], Kind(r[2]), r[3]
            if child:
                return await self.getattr(child)
            try:
                return await self._materialize(parent, name, kind, info)
            except OSError as exc:
                if exc.errno not in (errno.ESTALE, errno.EEXIST):
                    raise
                # Someone materialized or changed it meanwhile: look again.
        raise OSError(errno.EAGAIN, f"lookup {name!r}: the entry keeps changing")

    async def open(self, ino: int) -> Inode:
        """The inode as an open should see it: for a clean file whose
        object objcache did not write last (its ETag changed in the bucket
        — somebody else replaced it), the new object, in a new epoch so
        that no chunk cached from the old one is read again. A dirty file
        keeps its local data (write-back will replace the object: last
        writer wins); a deleted object changes nothing (the file reads
        what the cluster still holds). One HEAD per open, skipped when
        this process checked the inode less than ``revalidate_ttl`` ago."""
        node = await self.getattr(ino)
        if node.kind != Kind.FILE or node.dirty or node.s3 is None:
            return node
        now = self.clock()
        if now - self._validated.get(ino, float("-inf")) < self.revalidate_ttl:
            return node
        # Only an object at the file's own key is the file's: a renamed file
        # not yet copied still reads its old key, which is not its name's.
        r = await self._read(self._group(node.parent), ["dirinfo", node.parent])
        if (r[0] != "ok" or r[5]
                or r[1] + node.name.decode("utf-8", "surrogateescape") != node.s3.key):
            return node
        head = await self.store.head(node.s3.key)
        self._validated[ino] = now
        if len(self._validated) > 100_000:
            self._validated.clear()
        if head is None or head.etag == node.s3.etag:
            return node
        md = head.metadata or {}
        mtime = _int_meta(md, "mtime", None)
        fields = {"size": head.size,
                  "mtime_ns": mtime * 10**9 if mtime is not None and mtime < 10**11
                  else (mtime if mtime is not None else _ns(head.mtime))}
        mode = _int_meta(md, "mode", None)
        if mode is not None and stat.S_ISREG(mode):
            fields["mode"] = mode & 0o7777
        for name in ("uid", "gid"):
            v = _int_meta(md, name, None)
            if v is not None:
                fields[name] = v
        fields["xattrs"] = [[k, v] for k, v in
                            xattr_codec.decode(md.get(xattr_codec.METADATA_KEY)).items()]
        s3 = [node.s3.key, head.etag, head.size, head.mtime]
        try:
            await self._run({self._group(ino): [["reload", ino, node.s3.etag, s3, fields]]})
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise                               # changed meanwhile: take what is there
        return await self.getattr(ino)

    async def readdir(self, d: int) -> list[tuple[bytes, int, Kind]]:
        """Entries of ``d`` as (name, inode or 0 for not-yet-looked-up, kind),
        listing the bucket first if needed (or if the listing is older than
        the TTL)."""
        g = self._group(d)
        r = self._check(await self._read(g, ["dirinfo", d]), "readdir")
        listed, listed_at = r[2], r[3]
        if not listed or self.clock() - listed_at > self.list_ttl:
            await self.load_listing(d)
        r = self._check(await self._read(g, ["readdir", d]), "readdir")
        return [(bytes(n), c, Kind(k)) for n, c, k in r[1]]

    async def readdir_plus(self, d: int) -> list[tuple[bytes, Inode]]:
        """Entries of ``d`` with their inodes (readdirplus): one batched
        read per group instead of one getattr per entry. Names only the
        bucket knew are looked up (which gives them inodes); entries gone
        meanwhile are left out."""
        entries = await self.readdir(d)
        by_group: dict[int, list[int]] = {}
        for _name, child, _kind in entries:
            if child:
                by_group.setdefault(self._group(child), []).append(child)
        found: dict[int, Inode] = {}

        async def batch(g, ids):
            r = self._check(await self._read(g, ["getattrs", ids]), "readdir")
            for ino, w in zip(ids, r[1]):
                if w is not None:
                    found[ino] = Inode.from_wire(w)
        await asyncio.gather(*(batch(g, ids[i:i + 1000]) for g, ids in by_group.items()
                               for i in range(0, len(ids), 1000)))
        async def one(name, child):
            try:
                return found.get(child) or (await self.getattr(child) if child
                                            else await self.lookup(d, name))
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None                     # gone meanwhile
                raise
        # Names only the bucket knew need a lookup each (it gives them an
        # inode): READDIR_LOOKUPS at a time, so that a fresh listing of a
        # large directory costs batched commits, not one round trip each.
        nodes: list = []
        for i in range(0, len(entries), READDIR_LOOKUPS):
            nodes += await asyncio.gather(*(one(name, child)
                                            for name, child, _ in entries[i:i + READDIR_LOOKUPS]))
        return [(name, node) for (name, _, _), node in zip(entries, nodes) if node is not None]

    async def load_listing(self, d: int) -> None:
        """List the directory's bucket prefix into its group (once at a
        time per directory in this process)."""
        fut = self._listing.get(d)
        if fut is None:
            fut = asyncio.ensure_future(self._load_listing(d))
            self._listing[d] = fut
            fut.add_done_callback(lambda _f, d=d: self._listing.pop(d, None))
        await asyncio.shield(fut)

    async def _load_listing(self, d: int) -> None:
        g = self._group(d)
        r = self._check(await self._read(g, ["dirinfo", d]), "list")
        prefix, start = r[1], r[6]
        gen = self._gen_rng.getrandbits(62)
        hidden: list[str] = []
        shadowed = await self._shadowed(d, prefix)
        async for page in self.store.list(prefix, delimiter="/", page_size=self.list_page):
            rows = nm.entries_from_page(prefix, page, hidden)
            if shadowed is ALL:
                rows = []
            elif shadowed:
                rows = [r for r in rows if bytes(r[0]) not in shadowed]
            if rows:
                self._check(await self.router.propose(g, ["listing", d, gen, rows, False, 0.0]),
                            "listing")
        nm.warn_hidden(prefix, hidden)
        self._check(await self.router.propose(
            g, ["listing", d, gen, [], True, self.clock(), start]), "listing")

    async def _shadowed(self, d: int, prefix: str):
        """Names under ``prefix`` a listing must not show, because their
        bucket objects are not what the name holds now: objects write-back
        is about to delete (tombstones), objects renamed inodes still read
        from (pending sources), and everything under a renamed directory's
        old prefix (ALL if ``prefix`` is under one, unless ``d`` is that
        renamed directory or inside it) — e.g. a new directory
        created where a removed or renamed one's objects still are. A
        subdirectory is shadowed if anything below it is (it shows again,
        if something else is there, once write-back is done with it)."""
        names: set[bytes] = set()
        for g in self.ring().groups:
            r = await self._read(g, ["shadowed", prefix])
            if r[0] != "ok":
                continue
            for moving, mdir in r[2]:
                if mdir == d or (prefix.startswith(moving) and await self._is_ancestor(mdir, d)):
                    continue                        # our own (old) objects
                if prefix.startswith(moving):
                    return ALL
                if moving.startswith(prefix):
                    names.add(moving[len(prefix):].partition("/")[0].encode())
            for key in r[1]:
                head = key[len(prefix):].partition("/")[0]
                if head:
                    names.add(head.encode())
        names.discard(b"")
        return names

    async def _materialize(self, parent: int, name: bytes, kind: Kind, info) -> Inode:
        """Give a lazy entry (seen in a listing) an inode."""
        pg = self._group(parent)
        dr = self._check(await self._read(pg, ["dirinfo", parent]), "lookup")
        prefix = dr[1]
        key = prefix + name.decode()
        now = _ns(self.clock())
        if kind == Kind.DIR:
            ino_id = await self._alloc(pg)
            node = Inode(ino_id, Kind.DIR, DEFAULT_DIR_MODE, self.uid, self.gid, mtime_ns=now,
                         nlink=2, parent=parent, name=name, data_version=1,
                         uploaded_version=1)
            parts = {pg: [["mkentry", parent, name, ino_id, int(Kind.DIR), -1]]}
            parts.setdefault(self._group(ino_id), []).append(
                ["mkinode", node.to_wire(), key + "/", False])
            await self._run(parts, coordinator=pg)
            return node
        head = await self.store.head(key)
        if head is None:
            raise OSError(errno.ENOENT, f"{key!r} is gone from the bucket")
        md = head.metadata or {}
        mode = _int_meta(md, "mode", stat.S_IFREG | DEFAULT_FILE_MODE)
        target = b""
        if stat.S_ISLNK(mode):
            target = (await self.store.get(key))
            k = Kind.SYMLINK
        else:
            k = Kind.FILE
        mtime = _int_meta(md, "mtime", None)
        mtime_ns = mtime * 10**9 if mtime is not None and mtime < 10**11 else (
            mtime if mtime is not None else _ns(head.mtime))
        ino_id = await self._alloc(pg, near=parent)
        node = Inode(ino_id, k, mode & 0o7777, _int_meta(md, "uid", self.uid),
                     _int_meta(md, "gid", self.gid), size=head.size if k == Kind.FILE else len(target),
                     mtime_ns=mtime_ns, parent=parent, name=name, target=target,
                     s3=S3State(key, head.etag, head.size, head.mtime),
                     data_version=1, uploaded_version=1,
                     xattrs=xattr_codec.decode(md.get(xattr_codec.METADATA_KEY)))
        await self._run({pg: [["mkinode", node.to_wire(), "", False],
                              ["mkentry", parent, name, ino_id, int(k), -1]]})
        return node

    # ------------------------------------------------------------ changes

    async def _ensure_listed(self, d: int) -> str:
        g = self._group(d)
        r = self._check(await self._read(g, ["dirinfo", d]), "directory")
        if not r[2]:
            await self.load_listing(d)
        return r[1]

    async def _entry(self, parent: int, name: bytes) -> Inode | None:
        """The inode bound to name (materializing a lazy one), or None."""
        try:
            return await self.lookup(parent, name)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    @staticmethod
    def _departed(node: Inode) -> str | None:
        """rmentry's ``departed`` for a name bound to ``node``: what of it
        the bucket may still hold, to hide from re-listings until
        write-back has deleted or moved it."""
        if node.kind == Kind.DIR:
            return ""
        # A file not uploaded yet may still get an object at this key: an
        # upload in flight lands after the rename or unlink (write-back
        # chose the key before). "" hides whatever is there until a
        # complete listing no longer sees the name.
        return node.s3.etag if node.s3 is not None else ""

    async def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *,
                     kind: Kind = Kind.FILE, target: bytes = b"") -> Inode:
        """A new file (or symlink): fails with EEXIST if the name exists,
        in the bucket included."""
        nm.check_new_name(name)
        _check_key_length(await self._ensure_listed(parent), name)
        pg = self._group(parent)
        ino_id = await self._alloc(pg, near=parent)
        now = _ns(self.clock())
        node = Inode(ino_id, kind, mode, uid, gid, size=len(target) if target else 0,
                     mtime_ns=now, parent=parent, name=bytes(name), target=bytes(target),
                     data_version=1)
        await self._run({pg: [["mkinode", node.to_wire(), "", True],
                              ["mkentry", parent, bytes(name), ino_id, int(kind), None],
                              ["setattr", parent, {"mtime_ns": now, "ctime_ns": now}]]})
        return node

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return await self.create(parent, name, 0o777, uid, gid, kind=Kind.SYMLINK,
                                 target=target)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        key = nm.check_new_name(name)
        prefix = await self._ensure_listed(parent)
        _check_key_length(prefix, name, directory=True)
        pg = self._group(parent)
        ino_id = await self._alloc(pg)
        now = _ns(self.clock())
        node = Inode(ino_id, Kind.DIR, mode, uid, gid, mtime_ns=now, nlink=2, parent=parent,
                     name=bytes(name), data_version=1)
        parts = {pg: [["mkentry", parent, bytes(name), ino_id, int(Kind.DIR), None],
                      ["setattr", parent, {"mtime_ns": now, "ctime_ns": now}]]}
        parts.setdefault(self._group(ino_id), []).append(
            ["mkinode", node.to_wire(), prefix + key + "/", True])
        await self._run(parts, coordinator=pg)
        return node

    async def unlink(self, parent: int, name: bytes, *, keep=(),
                     lease: float = ORPHAN_LEASE) -> int:
        """Remove the name; returns the inode it was bound to. A file in
        ``keep`` (inodes a mount holds open) whose last link goes becomes an
        orphan (state.py "nlink") until ``forget``."""
        found = await self._entry(parent, bytes(name))
        if found is None:
            raise OSError(errno.ENOENT, f"{name!r} not found")
        child, kind = found.id, found.kind
        if kind == Kind.DIR:
            raise OSError(errno.EISDIR, f"{name!r} is a directory")
        now = _ns(self.clock())
        pg = self._group(parent)
        parts = {pg: [["rmentry", parent, bytes(name), child, self._departed(found)],
                      ["setattr", parent, {"mtime_ns": now, "ctime_ns": now}]]}
        parts.setdefault(self._group(child), []).append(
            _unlink_op(child, now, keep, [parent, bytes(name)], self.clock() + lease))
        await self._run(parts, coordinator=pg)
        return child

    async def forget(self, ino: int) -> None:
        """Delete an orphan (a mount closed the last open of an unlinked
        file); nothing for a file that still has a name."""
        await self._run({self._group(ino): [["forget", ino]]})

    async def renew_orphans(self, inodes, lease: float = ORPHAN_LEASE) -> None:
        """The holder of these orphans is alive: their leases end no
        earlier than ``lease`` seconds from now (one entry per group;
        inodes that are no orphans any more are left alone)."""
        until = self.clock() + lease
        parts: dict[int, list] = {}
        for ino in inodes:
            parts.setdefault(self._group(ino), []).append(["lease", ino, until])
        for g, ops in parts.items():
            await self._run({g: ops})

    async def forget_orphans(self) -> int:
        """Delete every orphan (a mount's start: no open survives its
        process). Returns how many."""
        n = 0
        for g in self.ring().groups:
            r = self._check(await self._read(g, ["orphans"]), "orphans")
            for ino in r[1]:
                await self.forget(ino)
                n += 1
        return n

    async def rmdir(self, parent: int, name: bytes) -> None:
        found = await self._entry(parent, bytes(name))
        if found is None:
            raise OSError(errno.ENOENT, f"{name!r} not found")
        child, kind = found.id, found.kind
        if kind != Kind.DIR:
            raise OSError(errno.ENOTDIR, f"{name!r} is not a directory")
        await self._ensure_listed(child)
        now = _ns(self.clock())
        pg = self._group(parent)
        parts = {pg: [["rmentry", parent, bytes(name), child, self._departed(found)],
                      ["setattr", parent, {"mtime_ns": now, "ctime_ns": now}]]}
        parts.setdefault(self._group(child), []).append(["rmdir", child])
        await self._run(parts, coordinator=pg)

    async def link(self, ino: int, parent: int, name: bytes) -> Inode:
        nm.check_new_name(name)
        node = await self.getattr(ino)
        if node.kind == Kind.DIR:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        _check_key_length(await self._ensure_listed(parent), name)
        now = _ns(self.clock())
        pg = self._group(parent)
        parts = {pg: [["mkentry", parent, bytes(name), ino, int(node.kind), None],
                      ["setattr", parent, {"mtime_ns": now, "ctime_ns": now}]]}
        parts.setdefault(self._group(ino), []).append(
            ["nlink", ino, 1, now, False, [parent, bytes(name)]])
        await self._run(parts, coordinator=pg)
        return await self.getattr(ino)

    async def setattr(self, ino: int, fields: dict) -> Inode:
        fields = dict(fields)
        fields.setdefault("ctime_ns", _ns(self.clock()))
        await self._run({self._group(ino): [["setattr", ino, fields]]})
        return await self.getattr(ino)

    async def rename(self, sp: int, sn: bytes, dp: int, dn: bytes, *,
                     noreplace: bool = False, exchange: bool = False, keep=(),
                     lease: float = ORPHAN_LEASE) -> None:
        sn, dn = bytes(sn), bytes(dn)
        nm.check_new_name(dn)
        if exchange:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        src = await self._entry(sp, sn)
        if src is None:
            raise OSError(errno.ENOENT, f"{sn!r} not found")
        child, kind = src.id, src.kind
        _check_key_length(await self._ensure_listed(dp), dn, directory=kind == Kind.DIR)
        found = await self._entry(dp, dn)
        dst = (found.id, found.kind) if found is not None else None
        if dst is not None and dst[0] == child:
            return                                  # same file: POSIX says do nothing
        if dst is not None and noreplace:
            raise OSError(errno.EEXIST, f"{dn!r} exists")
        if dst is not None and dst[1] == Kind.DIR and await self._is_ancestor(dst[0], sp):
            # The target directory contains the source, so it is not empty
            # (Linux's rename answers ENOTEMPTY here whatever the source is).
            raise OSError(errno.ENOTEMPTY, f"{dn!r} is not empty")
        if kind == Kind.DIR:
            await self._check_not_ancestor(child, dp)
        now = _ns(self.clock())
        spg, dpg = self._group(sp), self._group(dp)
        parts: dict[int, list] = {}

        def add(g, op):
            parts.setdefault(g, []).append(op)

        add(spg, ["rmentry", sp, sn, child, self._departed(src)])
        add(spg, ["setattr", sp, {"mtime_ns": now, "ctime_ns": now}])
        if dst is None:
            add(dpg, ["mkentry", dp, dn, child, int(kind), None])
        else:
            target, tkind = dst
            if kind == Kind.DIR and tkind != Kind.DIR:
                raise OSError(errno.ENOTDIR, f"{dn!r} is not a directory")
            if kind != Kind.DIR and tkind == Kind.DIR:
                raise OSError(errno.EISDIR, f"{dn!r} is a directory")
            add(dpg, ["mkentry", dp, dn, child, int(kind), target])
            if tkind == Kind.DIR:
                await self._ensure_listed(target)
                add(self._group(target), ["rmdir", target])
            else:
                add(self._group(target), _unlink_op(target, now, keep, [dp, dn],
                                                    self.clock() + lease))
        if dpg != spg or dp != sp:
            add(dpg, ["setattr", dp, {"mtime_ns": now, "ctime_ns": now}])
        add(self._group(child), ["relink", child, [sp, sn], [dp, dn], now])
        if kind == Kind.DIR:
            add(self._group(child), ["dirmoved", child])    # write-back relocates it
        await self._run(parts, coordinator=spg)

    async def _is_ancestor(self, d: int, node: int) -> bool:
        """Is directory ``d`` ``node`` or one of its ancestors?"""
        try:
            await self._check_not_ancestor(d, node)
            return False
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return True
            raise

    async def _check_not_ancestor(self, d: int, node: int) -> None:
        """EINVAL if directory ``d`` is ``node`` or one of its ancestors
        (a directory can't be moved into itself)."""
        seen = 0
        while True:
            if node == d:
                raise OSError(errno.EINVAL, "can't move a directory into itself")
            if node == ROOT:
                return
            node = (await self.getattr(node)).parent
            seen += 1
            if seen > 4096 or not node:
                return


def _int_meta(md: dict, name: str, default):
    v = md.get(name)
    if v is None:
        return default
    try:
        return int(v, 8) if name == "mode" and v.startswith("0") else int(v)
    except ValueError:
        return default


def _unlink_op(ino: int, now: int, keep, link: list, lease_until: float) -> list:
    """The nlink op removing the name ``link`` ([dir, name]) of ``ino``;
    ``keep``: inodes a mount holds open (kept as orphans when their last
    link goes, until ``lease_until`` unless renewed)."""
    return ["nlink", ino, -1, now, float(lease_until) if ino in keep else False, link]


def _check_key_length(prefix: str, name: bytes, *, directory: bool = False) -> None:
    """A new entry's bucket key must fit S3's limit: past it the object could
    never be written back or deleted (write-back retried forever and an
    unmount never finished: found by pjdfstest's PATH_MAX cases). Such
    paths answer ENAMETOOLONG. A directory renamed so that keys below it
    grow past the limit is not caught here."""
    if len(prefix.encode("utf-8", "surrogateescape")) + len(name) + directory > MAX_KEY_BYTES:
        raise OSError(errno.ENAMETOOLONG,
                      f"the bucket key would exceed S3's {MAX_KEY_BYTES} bytes")
