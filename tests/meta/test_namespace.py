"""Namespace operations over 3 in-process metadata groups and an in-memory
bucket: lazy listings, materialization, creates, removals, renames (in and
across groups), odd keys."""
import asyncio
import errno
import logging

import pytest

from objcache.backend.memory import MemoryStore
from objcache.cluster.ring import Ring
from objcache.meta.model import ROOT, Kind
from objcache.meta.namespace import Namespace
from objcache.txn.local import LocalCluster

U, G = 1000, 1000


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def world(objects=(), groups=3):
    store = MemoryStore("bucket")
    for key, body, meta in objects:
        await store.put(key, body, metadata=meta)
    cluster = await LocalCluster(groups).start()
    ring = Ring(range(1, groups + 1))
    ns = Namespace(cluster, lambda: ring, store, default_uid=U, default_gid=G)
    await ns.ensure_root()
    return cluster, ns, store


def names(entries):
    return sorted(n for n, _, _ in entries)


def test_lazy_listing_lookup_and_materialization():
    async def main():
        c, ns, store = await world([
            ("a.txt", b"hello", {"mode": str(0o100600), "uid": "7", "gid": "8", "mtime": "1700000000"}),
            ("dir/b.bin", b"x" * 10, {}),
            ("dir/sub/c", b"c", {}),
            ("empty/", b"", {}),
        ])
        assert names(await ns.readdir(ROOT)) == [b"a.txt", b"dir", b"empty"]
        a = await ns.lookup(ROOT, b"a.txt")
        assert a.kind == Kind.FILE and a.size == 5 and a.mode == 0o600
        assert (a.uid, a.gid) == (7, 8) and a.mtime_ns == 1700000000 * 10**9
        assert not a.dirty and a.s3.key == "a.txt"
        d = await ns.lookup(ROOT, b"dir")
        assert d.kind == Kind.DIR
        assert names(await ns.readdir(d.id)) == [b"b.bin", b"sub"]
        b = await ns.lookup(d.id, b"b.bin")
        assert b.size == 10 and b.mode == 0o644 and (b.uid, b.gid) == (U, G)
        assert ns.ring().meta_owner(b.id) == ns.ring().meta_owner(d.id)   # files live with their dir
        assert await ns.lookup(ROOT, b"a.txt") == a or (await ns.lookup(ROOT, b"a.txt")).id == a.id
        with pytest.raises(OSError) as exc:
            await ns.lookup(ROOT, b"nope")
        assert exc.value.errno == errno.ENOENT
        assert names(await ns.readdir((await ns.lookup(ROOT, b"empty")).id)) == []
        await c.close()
    run(main())


def test_odd_keys_are_hidden_with_one_warning(caplog):
    async def main():
        c, ns, store = await world([
            ("ok", b"1", {}), ("a//b", b"2", {}), ("./x", b"3", {}), ("../y", b"4", {}),
            ("l" * 300, b"5", {}), ("same", b"file", {}), ("same/inner", b"dir", {}),
            ("spaced name", b"6", {}), ("ünï", b"7", {}),
        ])
        with caplog.at_level(logging.WARNING, logger="objcache.meta.names"):
            got = names(await ns.readdir(ROOT))
        # "a//b" is the key "/b" inside directory "a": "a" shows, "/b" not.
        assert got == sorted([b"a", b"ok", b"same", b"spaced name", "ünï".encode()])
        assert (await ns.lookup(ROOT, b"same")).kind == Kind.DIR
        warnings = [r for r in caplog.records if "hidden" in r.message]
        assert len(warnings) == 1 and "4 key(s)" in warnings[0].message
        a = await ns.lookup(ROOT, b"a")
        assert names(await ns.readdir(a.id)) == []
        await c.close()
    run(main())


def test_create_respects_bucket_objects_and_names():
    async def main():
        c, ns, store = await world([("exists", b"1", {})])
        with pytest.raises(OSError) as exc:
            await ns.create(ROOT, b"exists", 0o644, U, G)
        assert exc.value.errno == errno.EEXIST
        f = await ns.create(ROOT, b"new", 0o640, U, G)
        assert f.dirty and (await ns.lookup(ROOT, b"new")).id == f.id
        for bad, code in ((b"x" * 256, errno.ENAMETOOLONG), (b"\xff\xfe", errno.EINVAL),
                          (b"a/b", errno.EINVAL), (b"..", errno.EINVAL)):
            with pytest.raises(OSError) as exc:
                await ns.create(ROOT, bad, 0o644, U, G)
            assert exc.value.errno == code
        await c.close()
    run(main())


def test_mkdir_rmdir_and_nonempty():
    async def main():
        c, ns, store = await world()
        d = await ns.mkdir(ROOT, b"d", 0o750, U, G)
        assert d.kind == Kind.DIR and (await ns.lookup(ROOT, b"d")).id == d.id
        await ns.create(d.id, b"f", 0o644, U, G)
        with pytest.raises(OSError) as exc:
            await ns.rmdir(ROOT, b"d")
        assert exc.value.errno == errno.ENOTEMPTY
        with pytest.raises(OSError) as exc:
            await ns.unlink(ROOT, b"d")
        assert exc.value.errno == errno.EISDIR
        await ns.unlink(d.id, b"f")
        await ns.rmdir(ROOT, b"d")
        assert names(await ns.readdir(ROOT)) == []
        assert c.state(ns.ring().meta_owner(d.id)).tombstones.get("d/") == ""
        await c.close()
    run(main())


def test_rmdir_of_a_bucket_directory_with_objects_is_refused():
    async def main():
        c, ns, store = await world([("full/x", b"1", {})])
        with pytest.raises(OSError) as exc:
            await ns.rmdir(ROOT, b"full")
        assert exc.value.errno == errno.ENOTEMPTY
        await c.close()
    run(main())


def test_renames_within_and_across_groups():
    async def main():
        c, ns, store = await world([("a", b"A", {}), ("b", b"B", {})])
        dirs = [await ns.mkdir(ROOT, b"d%d" % i, 0o755, U, G) for i in range(6)]
        groups = {ns.ring().meta_owner(d.id) for d in dirs}
        assert len(groups) > 1                      # the tree spreads over groups
        # Replace b with a, atomically, in one directory.
        a = await ns.lookup(ROOT, b"a")
        await ns.rename(ROOT, b"a", ROOT, b"b")
        assert names(await ns.readdir(ROOT)) == sorted([b"b"] + [d.name for d in dirs])
        assert (await ns.lookup(ROOT, b"b")).id == a.id
        tomb = c.state(ns.ring().meta_owner(ROOT)).tombstones
        assert "b" in tomb                          # the replaced object goes at write-back
        # Across directories in different groups.
        src = next(d for d in dirs if ns.ring().meta_owner(d.id) != ns.ring().meta_owner(ROOT))
        f = await ns.create(src.id, b"f", 0o644, U, G)
        await ns.rename(src.id, b"f", ROOT, b"moved")
        assert (await ns.lookup(ROOT, b"moved")).id == f.id
        assert names(await ns.readdir(src.id)) == []
        moved = await ns.getattr(f.id)
        assert (moved.parent, moved.name) == (ROOT, b"moved")
        # A directory can't move into itself or its subtree.
        inner = await ns.mkdir(dirs[0].id, b"inner", 0o755, U, G)
        with pytest.raises(OSError) as exc:
            await ns.rename(ROOT, b"d0", inner.id, b"loop")
        assert exc.value.errno == errno.EINVAL
        # Directory rename onto an empty directory replaces it; onto a file fails.
        await ns.rename(ROOT, b"d1", ROOT, b"d2")
        assert b"d1" not in names(await ns.readdir(ROOT))
        with pytest.raises(OSError) as exc:
            await ns.rename(ROOT, b"d2", ROOT, b"b")
        assert exc.value.errno == errno.ENOTDIR
        with pytest.raises(OSError) as exc:
            await ns.rename(ROOT, b"b", ROOT, b"d3", noreplace=True)
        assert exc.value.errno == errno.EEXIST
        await c.close()
    run(main())


def test_hard_links_count():
    async def main():
        c, ns, store = await world()
        f = await ns.create(ROOT, b"f", 0o644, U, G)
        d = await ns.mkdir(ROOT, b"d", 0o755, U, G)
        linked = await ns.link(f.id, d.id, b"g")
        assert linked.nlink == 2
        await ns.unlink(ROOT, b"f")
        assert (await ns.getattr(f.id)).nlink == 1
        await ns.unlink(d.id, b"g")
        with pytest.raises(OSError) as exc:
            await ns.getattr(f.id)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(OSError) as exc:
            await ns.link(d.id, ROOT, b"dl")
        assert exc.value.errno == errno.EPERM
        await c.close()
    run(main())


def test_concurrent_creates_of_one_name_one_wins():
    async def main():
        c, ns, store = await world()
        async def attempt(i):
            try:
                return (await ns.create(ROOT, b"race", 0o644, U, G)).id
            except OSError as exc:
                assert exc.errno == errno.EEXIST
        got = [x for x in await asyncio.gather(*(attempt(i) for i in range(30))) if x]
        assert len(got) == 1
        await c.close()
    run(main())


def test_hundred_thousand_entry_directory():
    """Paginated listing (100 pages), kept as lazy entries: one replicated
    record per page, no inode per file until it is looked up."""
    async def main():
        store = MemoryStore("bucket")
        n = 100_000
        for start in range(0, n, 5000):
            await asyncio.gather(*(store.put(f"big/f{i:06d}", b"")
                                   for i in range(start, min(n, start + 5000))))
        c = await LocalCluster(3).start()
        ring = Ring([1, 2, 3])
        ns = Namespace(c, lambda: ring, store)
        await ns.ensure_root()
        d = await ns.lookup(ROOT, b"big")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        entries = await ns.readdir(d.id)
        elapsed = loop.time() - t0
        assert len(entries) == n and all(child == 0 for _, child, _ in entries[:100])
        f = await ns.lookup(d.id, b"f099999")
        assert f.size == 0 and f.s3.key == "big/f099999"
        print(f"\nlisted {n} entries in {elapsed:.2f} s")
        await c.close()
    run(main(), timeout=300)


def test_relisting_does_not_resurrect_names_write_back_still_owes():
    """Removed and renamed-away names whose objects are still in the bucket
    (write-back has not run) stay gone across re-listings; once the objects
    are gone the marks go; an object somebody else writes at such a name
    later is shown."""
    async def main():
        c, ns, store = await world([("a", b"A", {}), ("b", b"B", {}), ("c", b"C", {}),
                                    ("d/x", b"X", {})])
        ns.list_ttl = 0                                    # re-list on every readdir
        assert names(await ns.readdir(ROOT)) == [b"a", b"b", b"c", b"d"]
        await ns.rename(ROOT, b"a", ROOT, b"a2")
        old_b = await ns.lookup(ROOT, b"b")
        await ns.unlink(ROOT, b"b")
        await ns.rename(ROOT, b"d", ROOT, b"d2")
        for _ in range(2):
            assert names(await ns.readdir(ROOT)) == [b"a2", b"c", b"d2"]
        with pytest.raises(OSError):
            await ns.lookup(ROOT, b"b")
        # Write-back deletes "a" and "b"; "b" then reappears, written by
        # another tool: it is a new object, shown once the tombstone of the
        # old "b" is done with (write-back finds a different ETag there and
        # drops the tombstone without deleting).
        await store.delete("a")
        await store.delete("b")
        assert names(await ns.readdir(ROOT)) == [b"a2", b"c", b"d2"]
        await store.put("b", b"new B")
        assert names(await ns.readdir(ROOT)) == [b"a2", b"c", b"d2"]
        for g in c.group_ids:
            await c.propose(g, ["tx", b"untomb%d" % g, [["untomb", "b", old_b.s3.etag]]])
        assert names(await ns.readdir(ROOT)) == [b"a2", b"b", b"c", b"d2"]
        b = await ns.lookup(ROOT, b"b")
        assert b.size == 5
        await c.close()
    run(main())


def test_an_upload_landing_after_its_file_was_renamed_does_not_show_the_old_name():
    """A file renamed (or removed) before its first upload finished: the
    upload may land at the old key afterwards (write-back computed the key
    before the rename). Re-listings must not show the old name — the crash
    test saw an acknowledged rename with both names listed."""
    async def main():
        c, ns, store = await world()
        ns.list_ttl = 0                                    # re-list on every readdir
        await ns.create(ROOT, b"f", 0o644, U, G)
        await ns.create(ROOT, b"g", 0o644, U, G)
        await ns.rename(ROOT, b"f", ROOT, b"r")
        await ns.unlink(ROOT, b"g")
        await store.put("f", b"late upload")               # lands after the rename
        await store.put("g", b"late upload")               # ... after the unlink
        for _ in range(2):
            assert names(await ns.readdir(ROOT)) == [b"r"]
        await store.delete("f")                            # write-back moved / deleted them
        await store.delete("g")
        assert names(await ns.readdir(ROOT)) == [b"r"]
        await store.put("f", b"somebody else")             # a new object later: shown
        assert names(await ns.readdir(ROOT)) == [b"f", b"r"]
        await c.close()
    run(main())
