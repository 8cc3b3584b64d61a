"""Directory link counts: a directory's nlink is 2 + the number of its
entries that are directories, kept by the group state machine as entries
change (mkdir, rmdir, renames in and across parents and groups, listings)
and recomputed from the entries when a snapshot is restored."""
import asyncio

import msgpack

from objcache.backend.memory import MemoryStore
from objcache.cluster.ring import Ring
from objcache.meta.model import ROOT, Directory, Entry, Inode, Kind
from objcache.meta.namespace import Namespace
from objcache.meta.state import GroupState
from objcache.txn.local import LocalCluster

T0 = 1_700_000_000_000_000_000
U, G = 1000, 1000
DIR, FILE = int(Kind.DIR), int(Kind.FILE)


# ---------------------------------------------------------------- state machine

def cmd(state, *c, index=[0]):
    index[0] += 1
    return state.apply_data(msgpack.packb(list(c)), index[0])


def ok(r):
    assert r[0] == "ok", r
    return r


def root_state():
    s = GroupState(1)
    ok(cmd(s, "tx", b"t0", [["mkinode", Inode(ROOT, Kind.DIR, 0o755, 0, 0).to_wire(), "",
                                                True]]))
    return s


def mkdir(s, parent, name, i):
    w = Inode(i, Kind.DIR, 0o755, 0, 0, nlink=2, parent=parent, name=name).to_wire()
    ok(cmd(s, "tx", b"m%d" % i, [["mkentry", parent, name, i, DIR, None],
                                 ["mkinode", w, name.decode() + "/", True]]))


def mkfile(s, parent, name, i):
    w = Inode(i, Kind.FILE, 0o644, 0, 0, parent=parent, name=name).to_wire()
    ok(cmd(s, "tx", b"f%d" % i, [["mkinode", w, "", True],
                                 ["mkentry", parent, name, i, FILE, None]]))


def nlink(s, d):
    assert s.inodes[d].nlink == s.dirs[d].nlink    # inode and entries record agree
    return s.inodes[d].nlink


def test_mkdir_and_rmdir_count_subdirectories_only():
    s = root_state()
    assert nlink(s, ROOT) == 2
    mkdir(s, ROOT, b"a", 10)
    assert nlink(s, ROOT) == 3 and nlink(s, 10) == 2
    mkdir(s, ROOT, b"b", 11)
    mkdir(s, 10, b"inner", 12)
    assert nlink(s, ROOT) == 4 and nlink(s, 10) == 3
    # Files and symlinks don't count.
    mkfile(s, ROOT, b"f", 20)
    ok(cmd(s, "tx", b"s", [["mkinode", Inode(21, Kind.SYMLINK, 0o777, 0, 0).to_wire(), "", True],
                           ["mkentry", ROOT, b"l", 21, int(Kind.SYMLINK), None]]))
    assert nlink(s, ROOT) == 4
    ok(cmd(s, "tx", b"u", [["rmentry", ROOT, b"f", 20], ["nlink", 20, -1, T0]]))
    assert nlink(s, ROOT) == 4
    ok(cmd(s, "tx", b"r1", [["rmentry", 10, b"inner", 12], ["rmdir", 12]]))
    assert nlink(s, 10) == 2
    ok(cmd(s, "tx", b"r2", [["rmentry", ROOT, b"a", 10], ["rmdir", 10]]))
    assert nlink(s, ROOT) == 3
    # A failed transaction changes nothing.
    assert cmd(s, "tx", b"r3", [["rmentry", ROOT, b"b", 11], ["rmdir", 99]])[0] == "err"
    assert nlink(s, ROOT) == 3


def test_orphaned_files_do_not_touch_the_count():
    s = root_state()
    mkdir(s, ROOT, b"d", 10)
    mkfile(s, 10, b"f", 20)
    ok(cmd(s, "tx", b"u", [["rmentry", 10, b"f", 20], ["nlink", 20, -1, T0, True]]))
    assert s.inodes[20].nlink == 0                  # an orphan
    assert nlink(s, 10) == 2 and nlink(s, ROOT) == 3
    ok(cmd(s, "tx", b"g", [["forget", 20]]))
    assert nlink(s, 10) == 2 and nlink(s, ROOT) == 3


def test_renames_within_and_across_parents():
    s = root_state()
    mkdir(s, ROOT, b"a", 10)
    mkdir(s, ROOT, b"b", 11)
    mkdir(s, 10, b"x", 12)
    assert (nlink(s, ROOT), nlink(s, 10), nlink(s, 11)) == (4, 3, 2)
    # Within a parent: no change.
    ok(cmd(s, "tx", b"r1", [["rmentry", 10, b"x", 12], ["mkentry", 10, b"y", 12, DIR, None]]))
    assert nlink(s, 10) == 3
    # Across parents: the source loses one, the destination gains one.
    ok(cmd(s, "tx", b"r2", [["rmentry", 10, b"y", 12], ["mkentry", 11, b"y", 12, DIR, None],
                            ["setattr", 12, {"parent": 11, "name": b"y"}]]))
    assert (nlink(s, ROOT), nlink(s, 10), nlink(s, 11)) == (4, 2, 3)
    # A file renamed across parents changes neither.
    mkfile(s, 10, b"f", 20)
    ok(cmd(s, "tx", b"r3", [["rmentry", 10, b"f", 20], ["mkentry", 11, b"f", 20, FILE, None]]))
    assert (nlink(s, 10), nlink(s, 11)) == (2, 3)


def test_rename_over_an_empty_directory():
    s = root_state()
    mkdir(s, ROOT, b"a", 10)
    mkdir(s, ROOT, b"b", 11)
    mkdir(s, 10, b"src", 12)
    mkdir(s, 11, b"dst", 13)
    # a/src over b/dst: a loses a subdirectory; b keeps one (dst replaced).
    ok(cmd(s, "tx", b"r", [["rmentry", 10, b"src", 12], ["mkentry", 11, b"dst", 12, DIR, 13],
                           ["rmdir", 13]]))
    assert (nlink(s, 10), nlink(s, 11)) == (2, 3) and 13 not in s.dirs
    # Within one parent, over an empty sibling: one fewer.
    mkdir(s, ROOT, b"c", 14)
    assert nlink(s, ROOT) == 5
    ok(cmd(s, "tx", b"r2", [["rmentry", ROOT, b"a", 10], ["mkentry", ROOT, b"c", 10, DIR, 14],
                            ["rmdir", 14]]))
    assert nlink(s, ROOT) == 4


def test_two_phase_changes_count_at_the_decision():
    """mkdir/rename across groups: the parent's entry changes only when the
    prepared transaction commits; an abort leaves the count alone."""
    s = root_state()
    mkdir(s, ROOT, b"a", 10)
    assert ok(cmd(s, "prep", b"X", 2, [["mkentry", ROOT, b"n", 30, DIR, None]], 9))
    assert nlink(s, ROOT) == 3
    cmd(s, "decide", b"X", False)
    assert nlink(s, ROOT) == 3
    ok(cmd(s, "prep", b"Y", 2, [["rmentry", ROOT, b"a", 10]], 9))
    ok(cmd(s, "decide", b"Y", True))
    assert nlink(s, ROOT) == 2


def test_listing_prefixes_count_as_subdirectories():
    s = root_state()
    s.dirs[ROOT].listed = False                     # a bucket's root starts unlisted
    mkdir(s, ROOT, b"local", 10)
    mkfile(s, ROOT, b"lf", 20)
    cmd(s, "listing", ROOT, 1, [[b"f", FILE, [5, "e1", 1.0]], [b"p", DIR, None],
                                [b"q", DIR, None]], False, 0)
    assert nlink(s, ROOT) == 5                      # local + p + q
    # The same names again (next page of another generation) don't double-count.
    cmd(s, "listing", ROOT, 1, [[b"p", DIR, None]], False, 0)
    assert nlink(s, ROOT) == 5
    # Materializing a lazy directory keeps the count (lazy DIR -> DIR).
    w = Inode(40, Kind.DIR, 0o755, 0, 0, nlink=2, parent=ROOT, name=b"p").to_wire()
    ok(cmd(s, "tx", b"m", [["mkentry", ROOT, b"p", 40, DIR, -1], ["mkinode", w, "p/", False]]))
    assert nlink(s, ROOT) == 5
    # A new generation: "q" is gone from the bucket, "f" became a prefix.
    cmd(s, "listing", ROOT, 2, [[b"f", DIR, None], [b"p", DIR, None]], False, 0)
    assert nlink(s, ROOT) == 6                      # local, p, q (not dropped yet), f
    cmd(s, "listing", ROOT, 2, [], True, 2.0)
    assert nlink(s, ROOT) == 5                      # local, p, f
    assert set(s.dirs[ROOT].entries) == {b"local", b"lf", b"p", b"f"}
    # A departed (renamed-away, not yet relocated) prefix stays hidden and uncounted.
    ok(cmd(s, "tx", b"rm", [["rmentry", ROOT, b"local", 10, ""], ["rmdir", 10]]))
    assert nlink(s, ROOT) == 4
    cmd(s, "listing", ROOT, 3, [[b"local", DIR, None], [b"f", DIR, None],
                                [b"p", DIR, None]], True, 3.0)
    assert nlink(s, ROOT) == 4 and b"local" not in s.dirs[ROOT].entries


def test_snapshot_restore_keeps_and_recomputes_the_count():
    s = root_state()
    mkdir(s, ROOT, b"a", 10)
    mkdir(s, ROOT, b"b", 11)
    mkdir(s, 10, b"c", 12)
    mkfile(s, ROOT, b"f", 20)
    cmd(s, "listing", ROOT, 1, [[b"lazy", DIR, None]], False, 0)
    t = GroupState(0)
    t.restore(s.snapshot())
    assert t.snapshot() == s.snapshot()
    assert (nlink(t, ROOT), nlink(t, 10), nlink(t, 11)) == (5, 3, 2)
    # Changes after a restore keep counting from the recomputed value.
    ok(cmd(t, "tx", b"r", [["rmentry", 10, b"c", 12], ["rmdir", 12]]))
    assert nlink(t, 10) == 2


def test_snapshot_written_before_the_count_existed_loads_right():
    """Older snapshots hold nlink 2 in every directory inode (and never had
    a count in the directory record): restore recomputes from the entries."""
    s = root_state()
    mkdir(s, ROOT, b"a", 10)
    mkdir(s, 10, b"b", 11)
    mkfile(s, 10, b"f", 20)
    snap = msgpack.unpackb(s.snapshot(), strict_map_key=False)
    for w in snap["inodes"]:
        if w[1] == DIR:
            w[9] = 2                                # what the old code stored
    assert all(len(w) == 6 for _, w in snap["dirs"])    # the wire form is unchanged
    t = GroupState(0)
    t.restore(msgpack.packb(snap))
    assert (nlink(t, ROOT), nlink(t, 10), nlink(t, 11)) == (3, 3, 2)
    # And the oldest directory wire form (no departed marks) too.
    d = Directory.from_wire(["x/", [(b"s", Entry(5, Kind.DIR).to_wire()),
                                    (b"g", Entry(6, Kind.FILE).to_wire())], True, 0.0, False])
    assert d.subdirs == 1 and d.nlink == 3


# ---------------------------------------------------------------- namespace (2PC over groups)

def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def world(objects=(), groups=3):
    store = MemoryStore("bucket")
    for key, body in objects:
        await store.put(key, body)
    cluster = await LocalCluster(groups).start()
    ring = Ring(range(1, groups + 1))
    ns = Namespace(cluster, lambda: ring, store, default_uid=U, default_gid=G)
    await ns.ensure_root()
    return cluster, ns, store


async def links(ns, *inodes):
    return tuple([(await ns.getattr(i)).nlink for i in inodes])


def test_namespace_mkdir_rmdir_and_renames_across_groups():
    async def main():
        c, ns, _ = await world()
        owner = ns.ring().meta_owner
        dirs = [await ns.mkdir(ROOT, b"d%d" % i, 0o755, U, G) for i in range(6)]
        assert dirs[0].nlink == 2
        assert await links(ns, ROOT) == (8,)
        # Two parents in different groups (and different from the child's).
        a = dirs[0]
        b = next(d for d in dirs[1:] if owner(d.id) != owner(a.id))
        sub = await ns.mkdir(a.id, b"sub", 0o755, U, G)
        await ns.create(a.id, b"file", 0o644, U, G)
        assert await links(ns, a.id, b.id) == (3, 2)
        await ns.rename(a.id, b"sub", b.id, b"sub2")             # across parents
        assert await links(ns, a.id, b.id, sub.id) == (2, 3, 2)
        await ns.rename(b.id, b"sub2", b.id, b"sub3")            # within a parent
        assert await links(ns, b.id) == (3,)
        await ns.rename(a.id, b"file", b.id, b"file")            # a file: no change
        assert await links(ns, a.id, b.id) == (2, 3)
        # Over an empty directory in another parent: the target parent keeps
        # its count, the source parent loses one.
        empty = await ns.mkdir(a.id, b"empty", 0o755, U, G)
        assert await links(ns, a.id) == (3,)
        await ns.rename(b.id, b"sub3", a.id, b"empty")
        assert await links(ns, a.id, b.id) == (3, 2)
        assert (await ns.lookup(a.id, b"empty")).id == sub.id
        del empty
        # A directory moved to the root and removed there.
        await ns.rename(a.id, b"empty", ROOT, b"top")
        assert await links(ns, ROOT, a.id) == (9, 2)
        await ns.rmdir(ROOT, b"top")
        await ns.rmdir(ROOT, b"d0")                              # a, empty again
        assert await links(ns, ROOT) == (7,)
        await c.close()
    run(main())


def test_namespace_listed_prefixes_and_restart_from_snapshots():
    async def main():
        c, ns, _ = await world([("f", b"1"), ("p/x", b"2"), ("q/", b""), ("q/y/z", b"3")])
        await ns.readdir(ROOT)
        assert await links(ns, ROOT) == (4,)                     # p and q
        q = await ns.lookup(ROOT, b"q")
        assert q.nlink == 2                                      # not listed yet
        await ns.readdir(q.id)
        assert await links(ns, q.id) == (3,)                     # y
        # Enough records for every group to snapshot (snapshot_entries=200),
        # then restart every replica: the counts come back from snapshots.
        d = await ns.mkdir(ROOT, b"d", 0o755, U, G)
        await ns.mkdir(d.id, b"e", 0o755, U, G)
        for i in range(120):                                     # all in d's group
            await ns.create(d.id, b"f%d" % i, 0o644, U, G)
            await ns.unlink(d.id, b"f%d" % i)
        dg = ns.ring().meta_owner(d.id)
        assert c.storages[(dg, (await c.leader(dg)).node_id)].snapshot() is not None
        before = await links(ns, ROOT, q.id, d.id)
        assert before == (5, 3, 3)
        for g in c.group_ids:
            node = (await c.leader(g)).node_id
            await c.stop_replica(g, node)
            await c.restart(g, node)
        assert await links(ns, ROOT, q.id, d.id) == before
        await c.close()
    run(main())
