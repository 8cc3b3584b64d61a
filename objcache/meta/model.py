"""The metadata records a group replicates: inodes and directory entries.

Plain slotted classes with msgpack-able ``to_wire``/``from_wire`` forms (the
snapshot format and the RPC format). A record is owned by exactly one
group: an inode by ``ring.meta_owner(inode)``; a directory's entries by the
directory's own group (the same key).

Inode ids are ``(allocating group << GROUP_SHIFT) | counter``. The counter
is part of the allocating group's replicated state, so ids are never reused
(restarts replay or restore it). Regular files and symlinks are allocated
by their parent directory's group with an id the ring places in that same
group, so creating or removing a file touches one group; directories get
ids placed anywhere on the ring, which spreads the tree over the groups.
"""
from __future__ import annotations

import enum
import stat

ROOT = 1                    # the root directory's inode id
GROUP_SHIFT = 40
EPOCH_SHIFT = 32            # chunk versions: epoch << 32 | local write count


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3

    @property
    def s_ifmt(self) -> int:
        return {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR,
                Kind.SYMLINK: stat.S_IFLNK}[self]


class S3State:
    """What the bucket holds for a file: the object objcache last saw or
    wrote. An inode is clean when its data version is the one uploaded and
    the bucket still has ``etag`` at ``key``."""
    __slots__ = ("key", "etag", "size", "mtime")

    def __init__(self, key: str, etag: str, size: int, mtime: float):
        self.key = key
        self.etag = etag
        self.size = size
        self.mtime = mtime

    def to_wire(self) -> list:
        return [self.key, self.etag, self.size, self.mtime]

    @classmethod
    def from_wire(cls, w) -> "S3State":
        return cls(*w)

    def __eq__(self, other):
        return isinstance(other, S3State) and self.to_wire() == other.to_wire()

    def __repr__(self):
        return f"S3State({self.key!r}, {self.etag!r}, {self.size})"


class Inode:
    __slots__ = ("id", "kind", "mode", "uid", "gid", "size", "mtime_ns",
                 "ctime_ns", "atime_ns", "nlink", "parent", "name", "target",
                 "s3", "chunks", "data_version", "uploaded_version", "xattrs",
                 "epoch", "links")

    def __init__(self, id: int, kind: Kind, mode: int, uid: int, gid: int, *,
                 size: int = 0, mtime_ns: int = 0, ctime_ns: int | None = None,
                 atime_ns: int | None = None, nlink: int = 1, parent: int = 0,
                 name: bytes = b"", target: bytes = b"", s3: S3State | None = None,
                 chunks: dict[int, int] | None = None, data_version: int = 0,
                 uploaded_version: int = 0, xattrs: dict[bytes, bytes] | None = None,
                 epoch: int = 0, links: list | None = None):
        self.id = id
        self.kind = Kind(kind)
        self.mode = mode & 0o7777           # permission bits only; type from kind
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = mtime_ns if ctime_ns is None else ctime_ns
        self.atime_ns = mtime_ns if atime_ns is None else atime_ns
        self.nlink = nlink
        self.parent = parent                # primary link (S3 key = parent key + name)
        self.name = name
        self.target = target                # symlink target
        self.s3 = s3
        self.chunks: dict[int, int] = dict(chunks or {})   # chunk index -> version
        self.data_version = data_version    # bumped by every published change
        self.uploaded_version = uploaded_version  # the version S3 holds
        self.xattrs: dict[bytes, bytes] = dict(xattrs or {})
        # Bumped whenever the bucket's object changed behind objcache's back
        # (a new ETag at open): chunk versions of an epoch start at
        # epoch << EPOCH_SHIFT, so cached chunks of an older epoch can never
        # be mistaken for current ones.
        self.epoch = epoch
        # A file's other names (hard links), [parent, name] each; the
        # primary one is (parent, name) and the bucket holds the file at
        # that key only. When the primary name goes, the first of these
        # becomes primary (write-back then moves the object there).
        self.links: list[list] = [[p, bytes(n)] for p, n in (links or ())]

    def base_version(self) -> int:
        """The chunk version meaning "the bucket's content" in this epoch."""
        return self.epoch << EPOCH_SHIFT

    def chunk_version(self, index: int) -> int:
        return self.chunks.get(index, self.base_version())

    @property
    def dirty(self) -> bool:
        """Local changes not yet in the bucket."""
        return self.data_version != self.uploaded_version

    @property
    def st_mode(self) -> int:
        return self.kind.s_ifmt | self.mode

    def to_wire(self) -> list:
        return [self.id, int(self.kind), self.mode, self.uid, self.gid, self.size,
                self.mtime_ns, self.ctime_ns, self.atime_ns, self.nlink, self.parent,
                self.name, self.target, self.s3.to_wire() if self.s3 else None,
                list(self.chunks.items()), self.data_version, self.uploaded_version,
                list(self.xattrs.items()), self.epoch, self.links]

    @classmethod
    def from_wire(cls, w) -> "Inode":
        (id_, kind, mode, uid, gid, size, mtime, ctime, atime, nlink, parent, name,
         target, s3, chunks, dv, uv, xattrs, epoch) = w[:19]
        links = w[19] if len(w) > 19 else None      # absent in older records
        return cls(id_, Kind(kind), mode, uid, gid, size=size, mtime_ns=mtime,
                   ctime_ns=ctime, atime_ns=atime, nlink=nlink, parent=parent,
                   name=bytes(name), target=bytes(target),
                   s3=S3State.from_wire(s3) if s3 is not None else None,
                   chunks=dict(chunks), data_version=dv, uploaded_version=uv,
                   xattrs={bytes(k): bytes(v) for k, v in xattrs}, epoch=epoch,
                   links=links)

    def copy(self) -> "Inode":
        return Inode.from_wire(self.to_wire())

    def __repr__(self):
        return (f"Inode({self.id}, {self.kind.name}, {oct(self.mode)}, size={self.size}, "
                f"nlink={self.nlink}, v{self.data_version}/{self.uploaded_version})")


class Entry:
    """A name in a directory. ``child == 0`` marks a *lazy* entry: an object
    or prefix seen in a listing and not looked up yet (no inode allocated);
    ``info`` then carries what the listing said (size, ETag, mtime)."""
    __slots__ = ("child", "kind", "info")

    def __init__(self, child: int, kind: Kind, info: list | None = None):
        self.child = child
        self.kind = Kind(kind)
        self.info = info

    def to_wire(self) -> list:
        return [self.child, int(self.kind), self.info]

    @classmethod
    def from_wire(cls, w) -> "Entry":
        return cls(w[0], Kind(w[1]), w[2])

    def __repr__(self):
        return f"Entry({self.child or 'lazy'}, {self.kind.name})"


class Directory:
    """The entries of one directory, kept in the directory's group.

    ``listed`` tells whether the bucket listing has been loaded (lazily, on
    the first readdir or lookup miss) and ``listed_at`` when (leader's clock,
    carried in the log entry, so replicas agree). ``s3_prefix`` is where the
    directory's objects are in the bucket.

    ``departed`` remembers names removed or renamed away whose bucket
    objects may still exist (write-back deletes or moves them later), so that
    a re-listing does not bring them back: name -> [ETag ("" for a
    directory prefix), log index of the removal, listing generation that
    last saw it]. A mark goes when a complete listing that started after the
    removal no longer sees the name, when a listing shows an object with a
    different ETag (somebody else's new object: it is shown), or when the
    name is bound again.

    ``subdirs`` counts the entries that are directories (lazy prefixes seen
    in a listing included): the directory inode's link count is
    ``2 + subdirs`` (POSIX: "." and the parent's entry, plus each child's
    ".."). GroupState keeps it as entries change (O(1) per change); it is
    not in the wire form but recomputed from the entries when one is
    loaded, so snapshots written before it existed load unchanged."""
    __slots__ = ("entries", "listed", "listed_at", "s3_prefix", "moved", "departed",
                 "subdirs")

    def __init__(self, s3_prefix: str, entries: dict[bytes, Entry] | None = None,
                 listed: bool = False, listed_at: float = 0.0, moved: bool = False,
                 departed: dict[bytes, list] | None = None):
        self.entries: dict[bytes, Entry] = dict(entries or {})
        self.listed = listed
        self.listed_at = listed_at
        self.s3_prefix = s3_prefix
        # The directory (or an ancestor) was renamed: its objects are still
        # at ``s3_prefix`` and write-back relocates them (engine/writeback).
        self.moved = moved
        self.departed: dict[bytes, list] = dict(departed or {})
        self.subdirs = sum(1 for e in self.entries.values() if e.kind == Kind.DIR)

    @property
    def nlink(self) -> int:
        """The directory inode's link count."""
        return 2 + self.subdirs

    def to_wire(self) -> list:
        return [self.s3_prefix, [(n, e.to_wire()) for n, e in self.entries.items()],
                self.listed, self.listed_at, self.moved, list(self.departed.items())]

    @classmethod
    def from_wire(cls, w) -> "Directory":
        prefix, ents, listed, at, moved = w[:5]
        departed = {bytes(n): list(m) for n, m in w[5]} if len(w) > 5 else {}
        return cls(prefix, {bytes(n): Entry.from_wire(e) for n, e in ents}, listed, at, moved,
                   departed)


def inode_group(inode: int) -> int:
    """The group that allocated ``inode`` (not necessarily its owner)."""
    return inode >> GROUP_SHIFT


def make_inode_id(group: int, counter: int) -> int:
    if not 0 < counter < 1 << GROUP_SHIFT:
        raise ValueError(f"inode counter {counter} out of range")
    return (group << GROUP_SHIFT) | counter
