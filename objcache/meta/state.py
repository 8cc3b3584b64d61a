"""A group's replicated metadata state machine.

Every change is a log entry applied here, deterministically, on every
replica. Entries (msgpack arrays):

  ["tx", txn, ops]                         single-group transaction: all or nothing
  ["prep", txn, coordinator, ops, deadline] 2PC prepare: check, lock, vote
  ["decide", txn, commit]                  2PC outcome at a participant
  ["coord", txn, commit, participants]     the coordinator's decision record
  ["abort_undecided", txn]                 coordinator: abort unless decided
  ["forget", txn]                          coordinator: decision acknowledged by all
  ["listing", dir, gen, names, complete, at, start]  merge a bucket listing page
                                           (lazy entries); start: applied index
                                           read before the bucket was listed
  ["reserve", n]                           reserve n inode counters (returns the range)
  ["cwrite", ino, idx, off, data, size, eb]  a write into an owned chunk (new version);
                                           EAGAIN if it is partial and its base
                                           version is clean (re-base first)
  ["cbase", ino, idx, data, eb, of]        a chunk's whole content as a dirty local
                                           base: the bucket's (of: None; no local
                                           version) or clean version `of`'s (re-base)
  ["cdrop", ino, from_idx, floor]          forget local chunk versions >= from_idx;
                                           floor: later versions of the inode's
                                           chunks stay above the dropped ones
                                           (truncate), else forget the inode
                                           (a deleted file)
  ["cclean", ino, idx, version]            that version is in the bucket now (the
                                           cache may evict it from then on)
  ["cput", ino, idx, length, key, etag, size, eb]  a write of a whole chunk whose bytes
                                           went straight to spill key `key` (a new
                                           version, spilled from the start)
  ["cspill", ino, idx, version, key, etag] that version is also at spill key `key`
                                           (a hidden object of its own): evictable,
                                           loaded from there; a stale spill's key
                                           is tombstoned
  ["join", address, replicas] / ["freeze"] cluster membership (root group only)
  ["readdress", node, address]             a node restarted on another address

An *op* is a precondition plus an effect on records this group owns:

  ["mkentry", dir, name, child, kind, expect]  name absent (expect None) or bound to
                                               `expect` (replace); binds it to child
  ["rmentry", dir, name, expect, departed]     name bound to `expect`; unbinds it;
                                               departed: None, or the ETag of the
                                               name's bucket object ("": a
                                               directory prefix, or a file not
                                               uploaded yet — any object) to
                                               keep hidden from re-listings
  ["mkinode", inode_wire, s3_prefix, listed]   id unused; creates it (and, for a
                                               directory, its entries record: a new
                                               directory is `listed` (empty, known);
                                               one found in the bucket is not)
  ["setattr", id, fields]                      inode exists; sets fields
  ["relink", id, old, new, ctime]              inode exists; its name old ([dir, name])
                                               is now new (rename)
  ["nlink", id, delta, ctime, keep, link]      inode exists; link: the [dir, name]
                                               added or removed (a file's names:
                                               Inode.links); a file whose count
                                               reaches 0 is deleted, unless `keep`
                                               (optional; a mount holds it open:
                                               the lease's end, unix seconds):
                                               then it becomes an ORPHAN — nlink
                                               0, no name, parent 0, never written
                                               back, its bucket object kept (and
                                               protected as a pending source)
                                               until ["forget", id]
  ["lease", id, until]                         an orphan's lease now ends no
                                               earlier than `until` (its holder
                                               is alive); nothing for others
  ["forget", id, expired]                      deletes an orphan (its object is
                                               tombstoned then); nothing for a
                                               linked or absent inode, or (with
                                               `expired`, the lease end the
                                               expirer saw) for an orphan whose
                                               lease was renewed meanwhile
  ["rmdir", id]                                directory exists, listed, empty;
                                               deletes it
  ["isdir_empty", id]                          precondition only
  ["flush", id, size, chunks, drop_from, mtime] publish written data: new size,
                                               chunk versions, chunks >= drop_from gone
  ["alloc", counter]                           inode counter high-water mark
  ["uploaded", id, version, s3_wire]           write-back finished
  ["reload", id, etag, s3_wire, fields]        a clean inode whose object (ETag
                                               ``etag``) was replaced outside
                                               objcache: new epoch (cached
                                               chunks of the old one are never
                                               read again), no local chunks,
                                               the new object's s3 state and
                                               size/mtime/mode/uid/gid
  ["tombstone", key, etag] / ["untomb", key, etag]  bucket keys to delete / deleted
  ["dirmoved", dir] / ["setprefix", dir, prefix]    directory relocation (write-back)

Invariants:
* An op touches only records of this group (the proposer checks the ring).
* A key locked by a prepared transaction is not changed by anything else
  until that transaction is decided; ops on it fail with EAGAIN (the
  caller waits for the decision and retries) — so no reader or writer ever
  sees half of a multi-group transaction.
* Results are data (errno or values), never exceptions: a failed
  precondition is a normal outcome that every replica computes alike.
* A directory inode's nlink is 2 + the number of its entries that are
  directories (lazy prefixes from listings included; files and symlinks
  never count). A directory's inode and its entries live in the same group,
  so every change of an entry (mkentry, rmentry, a listing page) updates
  both the directory's ``subdirs`` and its inode's nlink, O(1); nothing
  else changes a directory's nlink. Snapshots do not carry the count: it
  is recomputed from the entries on restore (older snapshots, whose
  directories all say nlink 2, load right).
"""
from __future__ import annotations

import errno

import msgpack

from objcache.cluster.ring import ring_version

from .model import Directory, Entry, Inode, Kind, S3State

Result = list     # ["ok", ...] | ["err", errno, message]


def evictable(rec: list) -> bool:
    """A chunk record whose version replicas may have evicted: clean (the
    bucket object holds it) or spilled (its spill object does)."""
    return rec[2] or len(rec) > 3


def spill_of(rec: list | None, version: int) -> list | None:
    """[key, etag] of the spill object holding ``version``, if recorded."""
    if rec is not None and rec[0] == version and len(rec) > 3:
        return rec[3]
    return None


def covers(offset: int, size: int, length: int) -> bool:
    """A write of ``size`` bytes at ``offset`` replaces all ``length``
    bytes of a chunk's base (it needs no base). The state's refusal of a
    partial write over a clean version and the leader's decision to
    re-base first (ChunkService.write) use this one rule."""
    return offset == 0 and size >= length


def ok(*values) -> Result:
    return ["ok", *values]


def err(code: int, message: str) -> Result:
    return ["err", code, message]


class OpError(Exception):
    """A failed precondition while applying (turned into a result)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _key_entry(d: int, name: bytes) -> tuple:
    return ("e", d, bytes(name))


def _key_inode(i: int) -> tuple:
    return ("i", i)


def op_keys(op: list) -> list[tuple]:
    """The lock keys an op changes or depends on."""
    kind = op[0]
    if kind == "absent":
        # Its own kind of lock: it holds back whatever would bind the name
        # (mkentry), but not readers — the name is absent, and a lookup or
        # readdir waiting on it could wait on the very write-back pass that
        # holds it (which looks names up while it gates others).
        return [("a", op[1], bytes(op[2]))]
    if kind in ("mkentry", "rmentry"):
        keys = [_key_entry(op[1], op[2])]
        if kind == "mkentry":
            keys.append(_key_inode(op[1]))          # the directory must not be going away
        return keys
    if kind == "mkinode":
        return [_key_inode(op[1][0])]
    if kind in ("setattr", "nlink", "rmdir", "isdir_empty", "flush", "uploaded",
                "dirmoved", "setprefix", "reload", "forget", "relink", "lease"):
        return [_key_inode(op[1])]
    if kind in ("alloc", "tombstone", "untomb"):
        return []
    raise OpError(errno.EINVAL, f"unknown op {kind!r}")


class GroupState:
    """The replicated state of one group (its metadata shard)."""

    def __init__(self, group_id: int):
        self.group_id = group_id
        self.inodes: dict[int, Inode] = {}
        self.dirs: dict[int, Directory] = {}
        self.counter = 0                            # inode ids allocated so far
        self.locks: dict[tuple, bytes] = {}         # lock key -> txn id
        self.dir_entry_locks: dict[int, int] = {}   # dir -> entry locks held in it
        self.prepared: dict[bytes, list] = {}       # txn -> [coordinator, ops, deadline]
        self.decisions: dict[bytes, list] = {}      # txn -> [commit, participants]
        # Bucket keys whose objects must be deleted by write-back (removed
        # files, the old key of a renamed file, removed directory markers):
        # key -> the ETag seen ("" = whatever is there).
        self.tombstones: dict[str, str] = {}
        # Chunks this group owns that have local versions (written through
        # objcache): (inode, index) -> [version, length, clean] or
        # [version, length, clean, [spill key, etag]]. Version 0 — no
        # record — means "the bucket's content at the inode's ETag".
        # ``clean``: cclean'd, so any replica's cache may have evicted it;
        # a partial cwrite needs its base in every replica's cache, so it
        # is refused over a clean version (the leader re-bases with cbase,
        # which ships the whole content): every replica decides alike, in
        # log order, whatever its cache evicted meanwhile. A *spilled*
        # version (cspill: its bytes also sit in a hidden object of their
        # own, engine/spill.py) is treated the same way: evictable, loaded
        # from the spill object, re-based before a partial write. A spill
        # object is tombstoned (deleted by this group's write-back) once its
        # record moves on: a newer version, a drop, or the bucket object
        # holding the version (cclean).
        self.chunks: dict[tuple[int, int], list] = {}
        # inode -> highest chunk version dropped by a truncate (cdrop with
        # floor): new versions of its chunks start above it, so that a
        # version number never names two contents (readers cache by it).
        self.chunk_floors: dict[int, int] = {}
        # Orphan -> the end of its holder's lease (unix seconds, the
        # proposer's clock): a mount renews the orphans it holds open; the
        # group's leader forgets those whose lease ended (a killed mount's).
        # Every orphan has an entry (those recorded before leases: 0.0,
        # expired).
        self.orphan_leases: dict[int, float] = {}
        # Cluster membership (kept by the root group, group 1): node id ->
        # address, group id -> member node ids, the groups in the ring, and
        # the ring version (bumped by every change).
        self.cluster = {"nodes": {}, "groups": {}, "ring": [], "version": 0,
                        "frozen": False}
        self.applied_index = 0

    # ------------------------------------------------------------ state machine API

    def apply(self, entry) -> Result:
        """RaftGroup's StateMachine.apply."""
        return self.apply_data(entry.data, entry.index)

    def apply_data(self, data: bytes, index: int) -> Result:
        try:
            cmd = msgpack.unpackb(data, use_list=True)
        except Exception as exc:  # noqa: BLE001 - a corrupt command must not stop the group
            self.applied_index = index
            return err(errno.EINVAL, f"undecodable command: {exc}")
        return self.apply_command(cmd, index)

    def apply_command(self, cmd, index: int) -> Result:
        """Apply a decoded command (see the module docstring)."""
        self.applied_index = index
        if not isinstance(cmd, list) or not cmd or not isinstance(cmd[0], str):
            return err(errno.EINVAL, "malformed command")
        handler = getattr(self, "_cmd_" + cmd[0], None)
        if handler is None:
            return err(errno.EINVAL, f"unknown command {cmd[0]!r}")
        try:
            return handler(*cmd[1:])
        except OpError as exc:
            return err(exc.code, str(exc))
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            return err(errno.EINVAL, f"malformed {cmd[0]}: {exc!r}")

    def snapshot(self) -> bytes:
        return msgpack.packb({
            "g": self.group_id,
            "inodes": [i.to_wire() for i in self.inodes.values()],
            "dirs": [(d, x.to_wire()) for d, x in self.dirs.items()],
            "counter": self.counter,
            "locks": [(list(k), t) for k, t in self.locks.items()],
            "prepared": list(self.prepared.items()),
            "decisions": list(self.decisions.items()),
            "tombstones": list(self.tombstones.items()),
            "chunks": [[i, c, *rec] for (i, c), rec in self.chunks.items()],
            "chunk_floors": list(self.chunk_floors.items()),
            "orphan_leases": list(self.orphan_leases.items()),
            "cluster": self.cluster,
            "applied": self.applied_index,
        })

    def restore(self, data: bytes) -> None:
        s = msgpack.unpackb(data, strict_map_key=False)
        self.group_id = s["g"]
        self.inodes = {w[0]: Inode.from_wire(w) for w in s["inodes"]}
        self.dirs = {d: Directory.from_wire(w) for d, w in s["dirs"]}
        for d, dr in self.dirs.items():             # subdirs were recounted on load
            ino = self.inodes.get(d)
            if ino is not None and ino.kind == Kind.DIR:
                ino.nlink = dr.nlink
        self.counter = s["counter"]
        self.locks = {}
        self.dir_entry_locks = {}
        for k, t in s["locks"]:
            self._lock(tuple(k if k[0] == "i" else (k[0], k[1], bytes(k[2]))), bytes(t))
        self.prepared = {bytes(t): p for t, p in s["prepared"]}
        self.decisions = {bytes(t): d for t, d in s["decisions"]}
        self.tombstones = dict(s["tombstones"])
        # Older snapshots have no clean flag: their versions count as dirty
        # until their next cclean (one written back before the upgrade and
        # evicted by a follower is the old gap, until then).
        self.chunks = {(r[0], r[1]): [r[2], r[3], bool(r[4]) if len(r) > 4 else False,
                                      *([r[5]] if len(r) > 5 and r[5] else [])]
                       for r in s["chunks"]}
        self.chunk_floors = dict(s.get("chunk_floors", ()))
        self.orphan_leases = dict(s.get("orphan_leases", ()))
        for i, n in self.inodes.items():            # orphans from before leases
            if n.nlink <= 0 and n.kind != Kind.DIR:
                self.orphan_leases.setdefault(i, 0.0)
        self.cluster = s["cluster"]
        self.cluster["nodes"] = {int(k): v for k, v in self.cluster["nodes"].items()}
        self.cluster["groups"] = {int(k): v for k, v in self.cluster["groups"].items()}
        self.applied_index = s["applied"]

    # ------------------------------------------------------------ commands

    def _cmd_tx(self, txn, ops) -> Result:
        txn = bytes(txn)
        self._check_unlocked(txn, ops)
        self._check_all(ops)
        return ok([self._apply(op) for op in ops])

    def _cmd_prep(self, txn, coordinator, ops, deadline) -> Result:
        txn = bytes(txn)
        if txn in self.prepared:
            return ok("prepared")                   # a retried prepare
        self._check_unlocked(txn, ops)
        self._check_all(ops)
        for op in ops:
            for k in op_keys(op):
                self._lock(k, txn)
        self.prepared[txn] = [coordinator, ops, deadline]
        return ok("prepared")

    def _cmd_decide(self, txn, commit) -> Result:
        txn = bytes(txn)
        prep = self.prepared.pop(txn, None)
        if prep is None:
            return ok("unknown")                    # already decided (retry) or never prepared
        ops = prep[1]
        for op in ops:
            for k in op_keys(op):
                self._unlock(k, txn)
        if not commit:
            return ok("aborted")
        # The preconditions were checked at prepare time and the keys stayed
        # locked since: the effects apply unconditionally.
        return ok([self._apply(op) for op in ops])

    def _cmd_coord(self, txn, commit, participants) -> Result:
        txn = bytes(txn)
        if txn in self.decisions:
            return ok(self.decisions[txn][0])       # the first decision stands
        self.decisions[txn] = [bool(commit), participants]
        return ok(bool(commit))

    def _cmd_abort_undecided(self, txn) -> Result:
        txn = bytes(txn)
        if txn not in self.decisions:
            self.decisions[txn] = [False, []]
        return ok(self.decisions[txn][0])

    def _cmd_forget(self, txn) -> Result:
        self.decisions.pop(bytes(txn), None)
        return ok()

    def _cmd_listing(self, d, gen, names, complete, at, start=None) -> Result:
        """Merge one page of listing generation ``gen`` into directory
        ``d``: names not known locally become lazy entries (info =
        [gen, size, etag, mtime] for files, [gen] for directories); with
        ``complete`` (after the last page), lazy entries this generation did
        not see are dropped. Entries with an inode (looked up, created or
        changed locally) are kept."""
        dr = self.dirs.get(d)
        if dr is None:
            raise OpError(errno.ENOENT, f"directory {d} is not here")
        for name, kind, info in names:
            name = bytes(name)
            if _key_entry(d, name) in self.locks:
                continue                            # a transaction owns it now
            mark = dr.departed.get(name)
            if mark is not None:
                etag = info[1] if kind != Kind.DIR and info and len(info) > 1 else ""
                if kind == Kind.DIR or not mark[0] or mark[0] == etag:
                    mark[2] = gen                   # still there: keep it hidden
                    continue
                del dr.departed[name]               # a different object: show it
            cur = dr.entries.get(name)
            if cur is None or cur.child == 0:
                self._bind(d, dr, name, Entry(0, Kind(kind), [gen] + list(info or [])))
        if complete:
            for name in [n for n, e in dr.entries.items()
                         if e.child == 0 and e.info and e.info[0] != gen
                         and _key_entry(d, n) not in self.locks]:
                self._bind(d, dr, name, None)
            if start is not None:
                for name in [n for n, m in dr.departed.items()
                             if m[1] < start and m[2] != gen]:
                    del dr.departed[name]           # gone from the bucket
            dr.listed = True
            dr.listed_at = at
        return ok(len(dr.entries))

    # ------------------------------------------------------------ chunk records
    # The data itself lives in the node's chunk cache; engine/machine.py
    # performs these commands' effects on it, using what they return.

    def _cmd_cwrite(self, inode, index, offset, data, chunk_size, epoch_base) -> Result:
        """A write into a chunk: the new version is the next one after the
        local one (or after ``epoch_base``, the inode's "bucket content"
        version, for a chunk never written here); returns [version, base
        version (0: none), new length]. A partial write over bucket content
        needs a local base: the leader ships it first with cbase. So does a
        partial write over a clean local version (EAGAIN: re-base)."""
        cur = self.chunks.get((inode, index))
        if cur is not None and cur[0] < epoch_base:
            cur = None                              # an older epoch: stale
        if offset < 0 or offset + len(data) > chunk_size:
            raise OpError(errno.EINVAL, "write outside the chunk")
        if cur is not None and evictable(cur) and not covers(offset, len(data), cur[1]):
            raise OpError(errno.EAGAIN, f"chunk {index} v{cur[0]} is clean: re-base it")
        base_v, base_len = (cur[0], cur[1]) if cur else (0, 0)
        prev = base_v or max(epoch_base, self.chunk_floors.get(inode, 0))
        length = max(base_len, offset + len(data))
        self._set_chunk((inode, index), [prev + 1, length, False])
        # A write covering a clean version needs no base (its apply must
        # not look for one: the cache may have evicted it).
        return ok(prev + 1, base_v if cur is None or not evictable(cur) else 0, length)

    def _set_chunk(self, key, rec: list | None) -> None:
        """Replace (None: drop) chunk ``key``'s record; the spill object of
        the record it replaces is tombstoned."""
        old = self.chunks.get(key)
        if old is not None and len(old) > 3:
            self.tombstones[old[3][0]] = old[3][1]
        if rec is None:
            self.chunks.pop(key, None)
        else:
            self.chunks[key] = rec

    def _cmd_cbase(self, inode, index, data, epoch_base, of=None) -> Result:
        """A chunk's whole content as a dirty local base, shipped in the
        entry so that later partial writes find it on every replica: the
        bucket's content (``of`` None: no local version yet) or clean local
        version ``of``'s (re-base: ``data`` is its content; caches may have
        evicted it). Returns [version, length, new]; not new: the local
        state is not what the leader saw (a dirty base exists, or another
        version came meanwhile) and the entry is a no-op — the cwrite that
        follows answers EAGAIN if it still lacks a base."""
        cur = self.chunks.get((inode, index))
        if cur is not None and cur[0] >= epoch_base:
            if not evictable(cur) or cur[0] != of:
                return ok(cur[0], cur[1], False)
            v = cur[0] + 1
        else:
            v = max(epoch_base, self.chunk_floors.get(inode, 0)) + 1
        self._set_chunk((inode, index), [v, len(data), False])
        return ok(v, len(data), True)

    def _cmd_cclean(self, inode, index, version) -> Result:
        """Write-back stored chunk ``version`` in the bucket: the node may
        evict it (the bucket can give it back). Its spill object, if any,
        is not needed any more."""
        cur = self.chunks.get((inode, index))
        if cur is not None and cur[0] == version:
            self._set_chunk((inode, index), [cur[0], cur[1], True])
        return ok()

    def _cmd_cput(self, inode, index, length, key, etag, chunk_size, epoch_base) -> Result:
        """A write covering a whole chunk whose bytes were PUT straight to
        spill key ``key`` (engine/spill.py, write-through): the next version,
        spilled from the start (no data in the log, none in the caches).
        Returns [version]."""
        if not 0 < length <= chunk_size:
            raise OpError(errno.EINVAL, "a chunk put outside the chunk")
        cur = self.chunks.get((inode, index))
        if cur is not None and cur[0] < epoch_base:
            cur = None
        prev = cur[0] if cur else max(epoch_base, self.chunk_floors.get(inode, 0))
        self._set_chunk((inode, index), [prev + 1, length, False, [key, etag]])
        return ok(prev + 1)

    def _cmd_cspill(self, inode, index, version, key, etag) -> Result:
        """Chunk ``version``'s bytes were stored at spill key ``key``
        (engine/spill.py): it may be evicted, and is loaded from there.
        Returns [True] when recorded; [False] when the record moved on
        meanwhile (another version, clean, dropped, spilled already): the
        object is then garbage and tombstoned at once."""
        cur = self.chunks.get((inode, index))
        if cur is None or cur[0] != version or evictable(cur):
            self.tombstones[key] = etag
            return ok(False)
        self.chunks[(inode, index)] = [cur[0], cur[1], False, [key, etag]]
        return ok(True)

    def _cmd_cdrop(self, inode, from_index, floor=False) -> Result:
        """Forget local versions of chunks >= from_index: a truncate
        (``floor``: later versions stay above the dropped ones) or a
        deleted file (its floor goes too)."""
        dropped = [c for (i, c) in self.chunks if i == inode and c >= from_index]
        top = max((self.chunks[(inode, c)][0] for c in dropped), default=0)
        for c in dropped:
            self._set_chunk((inode, c), None)
        if floor:
            if top > self.chunk_floors.get(inode, 0):
                self.chunk_floors[inode] = top
        else:
            self.chunk_floors.pop(inode, None)
        return ok(dropped)

    # ------------------------------------------------------------ membership (root group)

    def _cmd_join(self, address, replicas) -> Result:
        """A node asks to join: it gets the next node id and a place in a
        group — the newest group while it has fewer than ``replicas``
        members, else a new group. A group enters the ring once it is full
        and the ring is not frozen (data placed by a frozen ring would be
        stranded by a new one until rebalancing moves it). Rejoining with
        a known address returns the same assignment."""
        c = self.cluster
        want = c.setdefault("replicas", replicas)
        if replicas != want:
            raise OpError(errno.EINVAL, f"the cluster makes groups of {want} replicas; "
                                        f"this node asked for {replicas} (--replicas)")
        for nid, addr in c["nodes"].items():
            if addr == address:
                g = next(g for g, m in c["groups"].items() if nid in m)
                return ok(nid, g, c["groups"][g], c["version"])
        nid = max(c["nodes"], default=0) + 1
        c["nodes"][nid] = address
        newest = max(c["groups"], default=0)
        if newest and len(c["groups"][newest]) < replicas:
            g = newest
            c["groups"][g].append(nid)
        else:
            g = newest + 1
            c["groups"][g] = [nid]
        if len(c["groups"][g]) == replicas and g not in c["ring"] and not c["frozen"]:
            c["ring_version"] = ring_version(c) + 1
            c["ring"].append(g)
        c["version"] += 1
        return ok(nid, g, c["groups"][g], c["version"])

    def _cmd_readdress(self, node, address) -> Result:
        c = self.cluster
        if node not in c["nodes"]:
            raise OpError(errno.ENOENT, f"node {node} is not a member")
        if c["nodes"][node] != address:
            c["nodes"][node] = address
            c["version"] += 1
        return ok(c["version"])

    def _cmd_freeze(self) -> Result:
        """The first namespace use fixes the ring (see _cmd_join)."""
        c = self.cluster
        if not c["frozen"]:
            c["frozen"] = True
            c["version"] += 1
        return ok(c["version"])

    def _cmd_reserve(self, n) -> Result:
        """Reserve ``n`` inode counters; returns the first and last. Each
        caller gets its own range (ids are never handed out twice)."""
        if not isinstance(n, int) or not 0 < n <= 1 << 20:
            raise OpError(errno.EINVAL, f"bad reservation size {n!r}")
        first = self.counter + 1
        self.counter += n
        return ok(first, self.counter)

    # ------------------------------------------------------------ ops

    def _check_unlocked(self, txn: bytes, ops) -> None:
        for op in ops:
            for k in op_keys(op):
                holder = self.locks.get(k)
                if holder is not None and holder != txn:
                    raise OpError(errno.EAGAIN, f"{k} is locked by a transaction "
                                                f"in progress")
            if op[0] == "mkentry":
                holder = self.locks.get(("a", op[1], bytes(op[2])))
                if holder is not None and holder != txn:
                    raise OpError(errno.EAGAIN, f"{bytes(op[2])!r} is being deleted from "
                                                f"the bucket")
            if op[0] in ("rmdir", "isdir_empty") and self.dir_entry_locks.get(op[1]):
                raise OpError(errno.EAGAIN, f"directory {op[1]} has entries being "
                                            f"changed by a transaction")

    def _check_all(self, ops) -> None:
        """Check every precondition against the state as the ops before it
        would leave it (ops of one transaction may depend on each other,
        e.g. mkinode then mkentry)."""
        created: set[int] = set()
        removed: dict[tuple, int | None] = {}       # (dir, name) -> bound child after earlier ops
        for op in ops:
            kind = op[0]
            if kind == "mkentry":
                _, d, name, child, k, expect = op
                if d not in self.dirs and d not in created:
                    raise OpError(errno.ENOENT, f"directory {d} does not exist")
                key = (d, bytes(name))
                cur = removed[key] if key in removed else self._bound(d, bytes(name))
                if expect is None and cur is not None:
                    raise OpError(errno.EEXIST, f"{bytes(name)!r} exists")
                if expect is not None and cur != expect:
                    raise OpError(errno.ESTALE if cur else errno.ENOENT,
                                  f"{bytes(name)!r} is not bound to {expect}")
                removed[key] = child
            elif kind == "rmentry":
                d, name, expect = op[1:4]
                key = (d, bytes(name))
                cur = removed[key] if key in removed else self._bound(d, bytes(name))
                if cur is None:
                    raise OpError(errno.ENOENT, f"{bytes(name)!r} does not exist")
                if expect is not None and cur != expect:
                    raise OpError(errno.ESTALE, f"{bytes(name)!r} is bound to {cur}, "
                                                f"not {expect}")
                removed[key] = None
            elif kind == "mkinode":
                if op[1][0] in self.inodes or op[1][0] in created:
                    raise OpError(errno.EEXIST, f"inode {op[1][0]} exists")
                created.add(op[1][0])
            elif kind in ("setattr", "nlink", "flush", "uploaded", "relink"):
                if op[1] not in self.inodes and op[1] not in created:
                    raise OpError(errno.ENOENT, f"inode {op[1]} does not exist")
            elif kind == "reload":
                n = self.inodes.get(op[1])
                if n is None:
                    raise OpError(errno.ENOENT, f"inode {op[1]} does not exist")
                if n.dirty or n.s3 is None or n.s3.etag != op[2]:
                    raise OpError(errno.ESTALE, f"inode {op[1]} changed meanwhile")
            elif kind in ("dirmoved", "setprefix"):
                if op[1] not in self.dirs and op[1] not in created:
                    raise OpError(errno.ENOENT, f"directory {op[1]} does not exist")
            elif kind in ("rmdir", "isdir_empty"):
                dr = self.dirs.get(op[1])
                if dr is None:
                    raise OpError(errno.ENOENT, f"directory {op[1]} does not exist")
                if not dr.listed:
                    raise OpError(errno.EAGAIN, f"directory {op[1]} is not listed yet")
                names = [n for n in dr.entries if removed.get((op[1], n), 0) is not None]
                if names:
                    raise OpError(errno.ENOTEMPTY, f"directory {op[1]} is not empty")
            elif kind == "absent":
                # Precondition only: no entry of this kind has the name (a
                # write-back about to delete the name's old object holds
                # this, prepared, so nothing can create it meanwhile).
                _, d, name, k = op
                key = (d, bytes(name))
                cur = removed[key] if key in removed else self._bound(d, bytes(name))
                if cur is not None:
                    e = self.dirs[d].entries.get(bytes(name)) if d in self.dirs else None
                    if e is None or e.kind == Kind(k):
                        raise OpError(errno.EEXIST, f"{bytes(name)!r} exists")
            elif kind in ("alloc", "tombstone", "untomb", "forget", "lease"):
                pass
            else:
                raise OpError(errno.EINVAL, f"unknown op {kind!r}")

    def _bound(self, d: int, name: bytes) -> int | None:
        """What ``name`` in ``d`` is bound to: a child id, -1 for a lazy
        entry (exists in the bucket, no inode yet), None if absent."""
        dr = self.dirs.get(d)
        if dr is None:
            return None
        e = dr.entries.get(name)
        if e is None:
            return None
        return e.child or -1

    @staticmethod
    def _track_link(ino: Inode, delta: int, link: list) -> None:
        """Keep the file's names: a new link joins ``links``; a removed one
        leaves — if it was the primary name, the first other name becomes
        primary, so the bucket never keeps the file only under a removed
        name (fsstress: ``ln a b; rm a`` lost b)."""
        primary = [ino.parent, ino.name]
        if delta > 0:
            if link != primary and link not in ino.links:
                ino.links.append(link)
        elif link == primary:
            if ino.links:
                ino.parent, ino.name = ino.links.pop(0)
        elif link in ino.links:
            ino.links.remove(link)

    def _bind(self, d: int, dr: Directory, name: bytes, entry: Entry | None) -> None:
        """Bind ``name`` in directory ``d`` (record ``dr``) to ``entry``, or
        unbind it (None) — the one place entries change, so that the
        directory's ``subdirs`` and its inode's nlink (2 + subdirs) stay
        right in O(1)."""
        if entry is None:
            old = dr.entries.pop(name, None)
        else:
            old = dr.entries.get(name)
            dr.entries[name] = entry
        delta = ((entry is not None and entry.kind == Kind.DIR)
                 - (old is not None and old.kind == Kind.DIR))
        if delta:
            dr.subdirs += delta
            ino = self.inodes.get(d)
            if ino is not None and ino.kind == Kind.DIR:
                ino.nlink = dr.nlink

    def _apply(self, op: list):
        kind = op[0]
        if kind == "mkentry":
            _, d, name, child, k, _expect = op
            dr = self.dirs[d]
            self._bind(d, dr, bytes(name), Entry(child, Kind(k)))
            dr.departed.pop(bytes(name), None)
            return child
        if kind == "rmentry":
            d, name = op[1], bytes(op[2])
            dr = self.dirs[d]
            self._bind(d, dr, name, None)
            if len(op) > 4 and op[4] is not None:
                dr.departed[name] = [op[4], self.applied_index, None]
            return None
        if kind == "mkinode":
            ino = Inode.from_wire(op[1])
            self.inodes[ino.id] = ino
            if ino.kind == Kind.DIR:
                self.dirs[ino.id] = dr = Directory(op[2], listed=op[3])
                ino.nlink = dr.nlink                # a new directory: no subdirectories
            return ino.id
        if kind == "setattr":
            ino = self.inodes[op[1]]
            owed = False
            for field, value in op[2].items():
                if field not in _SETTABLE:
                    raise OpError(errno.EINVAL, f"field {field!r} can't be set")
                if field == "xattrs":
                    value = {bytes(a): bytes(b) for a, b in value}
                elif field in ("name", "target"):
                    value = bytes(value)
                owed |= field in _IN_OBJECT_METADATA and getattr(ino, field) != value
                setattr(ino, field, value)
            if owed and ino.kind != Kind.DIR and not ino.dirty:
                # The bucket's object carries these (s3fs metadata): a new
                # version makes write-back upload it again.
                ino.data_version += 1
            return ino.to_wire()
        if kind == "nlink":
            ino = self.inodes[op[1]]
            ino.nlink += op[2]
            ino.ctime_ns = op[3]
            if len(op) > 5 and op[5] is not None and ino.kind != Kind.DIR:
                self._track_link(ino, op[2], [op[5][0], bytes(op[5][1])])
            if ino.nlink <= 0 and ino.kind != Kind.DIR and len(op) > 4 and op[4]:
                ino.nlink, ino.parent, ino.name = 0, 0, b""     # an orphan
                # keep: the lease's end (a float); True (older records): none.
                self.orphan_leases[op[1]] = op[4] if isinstance(op[4], float) else 0.0
                return 0
            if ino.nlink <= 0 and ino.kind != Kind.DIR:
                del self.inodes[op[1]]
                if ino.s3 is not None:
                    self.tombstones[ino.s3.key] = ino.s3.etag
                return 0
            return ino.nlink
        if kind == "relink":
            # A rename of one of the inode's names: the primary one moves
            # the bucket key; another one just changes in the list.
            _, i, old, new, now = op
            ino = self.inodes[i]
            old, new = [old[0], bytes(old[1])], [new[0], bytes(new[1])]
            if old in ino.links and old != [ino.parent, ino.name]:
                ino.links[ino.links.index(old)] = new
            else:
                ino.parent, ino.name = new
            ino.ctime_ns = now
            return None
        if kind == "forget":
            ino = self.inodes.get(op[1])
            if len(op) > 2 and op[2] is not None \
                    and self.orphan_leases.get(op[1], 0.0) > op[2]:
                return None                         # renewed since the expirer looked
            if ino is None:
                self.orphan_leases.pop(op[1], None)
            elif ino.nlink <= 0 and ino.kind != Kind.DIR:
                del self.inodes[op[1]]
                self.orphan_leases.pop(op[1], None)
                if ino.s3 is not None:
                    self.tombstones[ino.s3.key] = ino.s3.etag
            return None
        if kind == "lease":
            if op[1] in self.orphan_leases and op[2] > self.orphan_leases[op[1]]:
                self.orphan_leases[op[1]] = float(op[2])
            return None
        if kind == "rmdir":
            self.inodes.pop(op[1], None)
            dr = self.dirs.pop(op[1], None)
            if dr is not None and dr.s3_prefix:
                self.tombstones[dr.s3_prefix] = ""  # the marker, if there is one
            return None
        if kind == "absent":
            return None
        if kind == "dirmoved":
            self.dirs[op[1]].moved = True
            return None
        if kind == "setprefix":
            # Relocated: the directory's objects now go under the new prefix
            # (write-back copies each file; the old marker is deleted and a
            # new one written).
            _, d, prefix = op
            dr = self.dirs[d]
            if dr.s3_prefix and dr.s3_prefix != prefix:
                self.tombstones[dr.s3_prefix] = ""
            dr.s3_prefix = prefix
            dr.moved = False
            ino = self.inodes.get(d)
            if ino is not None:
                ino.data_version += 1
            return None
        if kind == "tombstone":
            self.tombstones[op[1]] = op[2]
            return None
        if kind == "untomb":
            if self.tombstones.get(op[1]) == op[2]:
                del self.tombstones[op[1]]
            return None
        if kind == "isdir_empty":
            return None
        if kind == "flush":
            _, i, size, chunks, drop_from, mtime = op
            ino = self.inodes[i]
            ino.size = size
            if drop_from is not None:               # truncation: chunks past the end go
                for index in [c for c in ino.chunks if c >= drop_from]:
                    del ino.chunks[index]
                if ino.s3 is not None and size < ino.s3.size:
                    # The object's bytes past the new end are not the file's
                    # any more: past it, base-version chunks read as holes
                    # (an extension shows zeros, not the old object).
                    ino.s3 = S3State(ino.s3.key, ino.s3.etag, size, ino.s3.mtime)
            for index, v in chunks:
                # Concurrent flushes of one file may arrive in any order: a
                # chunk never goes back to an older version.
                if v > ino.chunks.get(index, -1):
                    ino.chunks[index] = v
            ino.mtime_ns = ino.ctime_ns = mtime
            ino.data_version += 1
            return ino.data_version
        if kind == "uploaded":
            _, i, version, s3 = op
            ino = self.inodes[i]
            ino.uploaded_version = max(ino.uploaded_version, version)
            ino.s3 = S3State.from_wire(s3)
            return ino.uploaded_version
        if kind == "reload":
            _, i, _etag, s3, fields = op
            ino = self.inodes[i]
            ino.epoch += 1
            ino.chunks = {}
            ino.s3 = S3State.from_wire(s3)
            for field in ("size", "mtime_ns", "mode", "uid", "gid"):
                if field in fields:
                    setattr(ino, field, fields[field])
            if "xattrs" in fields:
                ino.xattrs = {bytes(a): bytes(b) for a, b in fields["xattrs"]}
            return ino.to_wire()
        if kind == "alloc":
            self.counter = max(self.counter, op[1])
            return self.counter
        raise OpError(errno.EINVAL, f"unknown op {kind!r}")

    # ------------------------------------------------------------ locks

    def _lock(self, k: tuple, txn: bytes) -> None:
        if k in self.locks:
            return
        self.locks[k] = txn
        if k[0] == "e":
            self.dir_entry_locks[k[1]] = self.dir_entry_locks.get(k[1], 0) + 1

    def _unlock(self, k: tuple, txn: bytes) -> None:
        if self.locks.get(k) != txn:
            return
        del self.locks[k]
        if k[0] == "e":
            n = self.dir_entry_locks.get(k[1], 0) - 1
            if n > 0:
                self.dir_entry_locks[k[1]] = n
            else:
                self.dir_entry_locks.pop(k[1], None)

    def locked(self, k: tuple) -> bytes | None:
        return self.locks.get(k)


# Fields write-back stores in the object's user metadata (engine/writeback.py
# s3_metadata): changing one on a clean file makes it owed again.
_IN_OBJECT_METADATA = frozenset({"mode", "uid", "gid", "mtime_ns", "xattrs"})

_SETTABLE = frozenset({"mode", "uid", "gid", "size", "mtime_ns", "ctime_ns", "atime_ns",
                       "parent", "name", "target", "xattrs", "chunks"})
