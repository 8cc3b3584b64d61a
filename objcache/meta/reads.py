"""Reads of a group's metadata, served by the group's leader after a read
barrier (so they are linearizable with every committed transaction).

``serve(state, request) -> result`` is pure. A record locked by a prepared
transaction answers EAGAIN: the caller waits for the decision and asks
again, so no read sees half of a multi-group transaction.

Requests:
  ["getattr", ino]            -> ["ok", inode_wire]
  ["getattrs", [ino, ...]]    -> ["ok", [inode_wire or None, ...]]  None: absent, or
                                 locked by a transaction (ask it alone)
  ["lookup", dir, name]       -> ["ok", child, kind, info]  (child 0: lazy entry)
                                 ["err", ENODATA, ...] when the directory is not listed
  ["readdir", dir]            -> ["ok", [[name, child, kind], ...], listed, listed_at, prefix]
  ["dirinfo", dir]            -> ["ok", prefix, listed, listed_at, n_entries, moved,
                                   applied index]
  ["counter"]                 -> ["ok", counter]
  ["cluster"]                 -> ["ok", membership]  (root group)
  ["orphans"]                 -> ["ok", [inode, ...]]  unlinked files kept for a
                                 mount that held them open (state.py "nlink")
  ["pending"]                 -> ["ok", dirty inodes, tombstones, dirty bytes, inodes, prepared]
  ["shadowed", prefix]        -> ["ok", [key, ...], [[prefix, dir], ...]]  keys under
                                 prefix that are not what their name shows (tombstoned,
                                 or pending sources), and moved directories' old prefixes
  ["sources"]                 -> ["ok", [[key, inode], ...], [[prefix, dir], ...]]
                                 bucket keys inodes of this group still take their
                                 data from although they are no longer at them
                                 (renamed, not yet copied), and the old prefixes of
                                 moved directories (engine/writeback.py)
  ["spills", ino, [idx, ...]] -> ["ok", [[idx, version, length, key, etag], ...]] the
                                 chunks among those whose current version is spilled
                                 (engine/spill.py)
"""
from __future__ import annotations

import errno

from .model import Kind
from .state import GroupState, err, ok


def pending_sources(state: GroupState) -> tuple[list, list]:
    """See ``["sources"]``. A file whose parent lives in another group is
    listed whatever its key (its parent's prefix is not known here):
    harmless, since only another inode writing exactly that key is held
    back by it."""
    files = []
    for n in state.inodes.values():
        if n.s3 is None or n.kind == Kind.DIR:
            continue
        d = state.dirs.get(n.parent)
        if (d is not None and n.name
                and d.s3_prefix + n.name.decode("utf-8", "surrogateescape") == n.s3.key):
            continue                            # at its place (or in a moved
                                                # directory: its prefix covers it)
        files.append([n.s3.key, n.id])
    prefixes = [[dr.s3_prefix, d] for d, dr in state.dirs.items() if dr.moved and dr.s3_prefix]
    return files, prefixes


def serve(state: GroupState, request: list) -> list:
    try:
        kind = request[0]
        if kind == "getattrs":
            out = []
            for ino in request[1]:
                node = state.inodes.get(ino)
                out.append(None if node is None or ("i", ino) in state.locks
                           else node.to_wire())
            return ok(out)
        if kind == "spills":
            # [[index, version, length, key, etag]] of the inode's chunks
            # among ``indexes`` whose current version is spilled.
            ino, indexes = request[1], request[2]
            out = []
            for idx in indexes:
                rec = state.chunks.get((ino, idx))
                if rec is not None and len(rec) > 3:
                    out.append([idx, rec[0], rec[1], rec[3][0], rec[3][1]])
            return ok(out)
        if kind == "getattr":
            ino = request[1]
            if ("i", ino) in state.locks:
                return err(errno.EAGAIN, f"inode {ino} is in a transaction")
            node = state.inodes.get(ino)
            if node is None:
                return err(errno.ENOENT, f"inode {ino} not found")
            return ok(node.to_wire())
        if kind == "lookup":
            d, name = request[1], bytes(request[2])
            dr = state.dirs.get(d)
            if dr is None:
                return err(errno.ENOENT, f"directory {d} not found")
            if ("e", d, name) in state.locks:
                return err(errno.EAGAIN, f"{name!r} is in a transaction")
            e = dr.entries.get(name)
            if e is None:
                if not dr.listed:
                    return err(errno.ENODATA, f"directory {d} is not listed")
                return err(errno.ENOENT, f"{name!r} not found")
            return ok(e.child, int(e.kind), e.info)
        if kind == "readdir":
            d = request[1]
            dr = state.dirs.get(d)
            if dr is None:
                return err(errno.ENOENT, f"directory {d} not found")
            if state.dir_entry_locks.get(d):
                return err(errno.EAGAIN, f"directory {d} has entries in a transaction")
            return ok([[n, e.child, int(e.kind)] for n, e in dr.entries.items()],
                      dr.listed, dr.listed_at, dr.s3_prefix)
        if kind == "dirinfo":
            d = request[1]
            dr = state.dirs.get(d)
            if dr is None:
                return err(errno.ENOENT, f"directory {d} not found")
            return ok(dr.s3_prefix, dr.listed, dr.listed_at, len(dr.entries), dr.moved,
                      state.applied_index)
        if kind == "shadowed":
            prefix = request[1]
            files, moving = pending_sources(state)
            keys = [k for k in state.tombstones if k.startswith(prefix)]
            keys += [k for k, _ in files if k.startswith(prefix)]
            return ok(keys[:100_000], moving)
        if kind == "sources":
            return ok(*pending_sources(state))
        if kind == "counter":
            return ok(state.counter)
        if kind == "cluster":
            return ok(state.cluster)
        if kind == "orphans":
            return ok([n.id for n in state.inodes.values()
                       if n.nlink <= 0 and n.kind != Kind.DIR])
        if kind == "pending":
            dirty = sum(1 for n in state.inodes.values() if n.dirty)
            dirty_bytes = sum(n.size for n in state.inodes.values() if n.dirty)
            return ok(dirty, len(state.tombstones), dirty_bytes, len(state.inodes),
                      len(state.prepared))
        return err(errno.EINVAL, f"unknown read {kind!r}")
    except (IndexError, TypeError, KeyError) as exc:
        return err(errno.EINVAL, f"malformed read: {exc!r}")
