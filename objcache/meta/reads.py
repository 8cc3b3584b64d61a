"""Reads of a group's metadata, served by the group's leader after a read
barrier (so they are linearizable with every committed transaction).

``serve(state, request) -> result`` is pure. A record locked by a prepared
transaction answers EAGAIN: the caller waits for the decision and asks
again, so no read sees half of a multi-group transaction.

Requests:
  ["getattr", ino]            -> ["ok", inode_wire]
  ["lookup", dir, name]       -> ["ok", child, kind, info]  (child 0: lazy entry)
                                 ["err", ENODATA, ...] when the directory is not listed
  ["readdir", dir]            -> ["ok", [[name, child, kind], ...], listed, listed_at, prefix]
  ["dirinfo", dir]            -> ["ok", prefix, listed, listed_at, n_entries, moved,
                                   applied index]
  ["counter"]                 -> ["ok", counter]
  ["cluster"]                 -> ["ok", membership]  (root group)
  ["pending"]                 -> ["ok", dirty inodes, tombstones, dirty bytes, inodes, prepared]
"""
from __future__ import annotations

import errno

from .state import GroupState, err, ok


def serve(state: GroupState, request: list) -> list:
    try:
        kind = request[0]
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
        if kind == "counter":
            return ok(state.counter)
        if kind == "cluster":
            return ok(state.cluster)
        if kind == "pending":
            dirty = sum(1 for n in state.inodes.values() if n.dirty)
            dirty_bytes = sum(n.size for n in state.inodes.values() if n.dirty)
            return ok(dirty, len(state.tombstones), dirty_bytes, len(state.inodes),
                      len(state.prepared))
        return err(errno.EINVAL, f"unknown read {kind!r}")
    except (IndexError, TypeError, KeyError) as exc:
        return err(errno.EINVAL, f"malformed read: {exc!r}")
