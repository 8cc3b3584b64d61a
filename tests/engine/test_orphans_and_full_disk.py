"""Two things a mount needs from the engine that stress-ng found missing:

* an unlinked file that is still open keeps working (an ORPHAN: nlink 0,
  no name, never written back, deleted by ``forget``);
* a chunk owner whose disk tier is full of dirty data answers the WRITER
  ENOSPC (after waiting for write-back) and stays alive: the write is
  refused before it is proposed, never in the apply of a committed entry
  (where it used to stop the group).
"""
import asyncio
import errno
import os

import pytest

from objcache.cache import ChunkCache
from objcache.engine.writeback import WriteBack
from objcache.meta.model import ROOT

from .harness import CHUNK, Engine


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _write_file(e, name: bytes, data: bytes):
    f = await e.ns.create(ROOT, name, 0o644, 1000, 1000)
    versions = await e.data.write(f, 0, data)
    await e.data.flush(f, len(data), versions)
    return await e.ns.getattr(f.id)


def test_an_unlinked_open_file_is_an_orphan_until_forgotten(tmp_path):
    async def main():
        e = await Engine(tmp_path).start()
        data = os.urandom(CHUNK + 100)
        f = await _write_file(e, b"tmp", data)
        assert await e.ns.unlink(ROOT, b"tmp", keep={f.id}) == f.id
        with pytest.raises(OSError) as exc:
            await e.ns.lookup(ROOT, b"tmp")
        assert exc.value.errno == errno.ENOENT
        orphan = await e.ns.getattr(f.id)               # still there for its opens
        assert orphan.nlink == 0 and orphan.name == b"" and orphan.parent == 0
        assert await e.data.read(orphan, 0, len(data)) == data
        # It can still be written and truncated, like any open file.
        v = await e.data.write(orphan, 10, b"xyz")
        await e.data.flush(orphan, len(data), v)
        orphan = await e.ns.getattr(f.id)
        assert await e.data.read(orphan, 8, 7) == data[8:10] + b"xyz" + data[13:15]
        # Never written back: no name.
        leader = await e.cluster.leader(e.ring.meta_owner(f.id))
        wb = WriteBack(leader, e.store, e.data, e.cluster, chunk_size=CHUNK, delay=0,
                       namespace=e.ns)
        assert not wb._owed(wb.state.inodes[f.id]) and wb.pending() == 0
        # A name bound to a file nobody keeps open is deleted as before.
        other = await _write_file(e, b"plain", b"abc")
        await e.ns.unlink(ROOT, b"plain", keep={f.id})
        with pytest.raises(OSError):
            await e.ns.getattr(other.id)
        assert await e.ns.forget_orphans() == 1
        with pytest.raises(OSError) as exc:
            await e.ns.getattr(f.id)
        assert exc.value.errno == errno.ENOENT
        await e.ns.forget(f.id)                         # idempotent
        await e.close()
    run(main())


def test_rename_over_an_open_file_keeps_it_as_an_orphan(tmp_path):
    async def main():
        e = await Engine(tmp_path).start()
        old = await _write_file(e, b"target", b"old bytes")
        await _write_file(e, b"src", b"new bytes")
        await e.ns.rename(ROOT, b"src", ROOT, b"target", keep={old.id})
        kept = await e.ns.getattr(old.id)
        assert kept.nlink == 0
        assert await e.data.read(kept, 0, 9) == b"old bytes"
        now = await e.ns.lookup(ROOT, b"target")
        assert await e.data.read(now, 0, 9) == b"new bytes"
        await e.ns.forget(old.id)
        with pytest.raises(OSError):
            await e.ns.getattr(old.id)
        await e.close()
    run(main())


class SmallDiskEngine(Engine):
    """Disk tiers of 6 chunks and a 0.5 s wait for dirty room."""

    def _machine(self, g, node):
        if (g, node) not in self.caches:
            cache = ChunkCache(str(self.tmp / f"cache-{g}-{node}"), memory_bytes=2 * self.chunk,
                               disk_bytes=6 * (self.chunk + 4096), chunk_size=self.chunk,
                               dirty_wait_timeout=0.5)
            self.caches[(g, node)] = cache
            self._to_open.append(cache)
        return super()._machine(g, node)


def test_a_disk_full_of_dirty_data_answers_the_writer_enospc_and_the_group_lives(tmp_path):
    async def main():
        e = await SmallDiskEngine(tmp_path, groups=1).start()
        f = await e.ns.create(ROOT, b"big", 0o644, 1000, 1000)
        written = bytearray()
        versions = {}
        with pytest.raises(OSError) as exc:
            for i in range(12):                         # twice what the tier holds
                chunk = os.urandom(CHUNK)
                versions.update(await e.data.write(f, i * CHUNK, chunk))
                written += chunk
        assert exc.value.errno == errno.ENOSPC
        # The group still answers, and nothing acknowledged was dropped.
        await e.data.flush(f, len(written), versions)
        node = await e.ns.getattr(f.id)
        assert await e.data.read(node, 0, len(written)) == bytes(written)
        assert (await e.ns.getattr(f.id)).size == len(written)
        await e.ns.mkdir(ROOT, b"still-works", 0o755, 1000, 1000)
        await e.close()
    run(main())


def test_chunks_of_a_file_deleted_before_write_back_are_collected(tmp_path):
    async def main():
        e = await Engine(tmp_path).start()
        kept = await _write_file(e, b"kept", os.urandom(2 * CHUNK))
        gone = await _write_file(e, b"gone", os.urandom(4 * CHUNK))
        orphan = await _write_file(e, b"orphan", os.urandom(CHUNK))
        await e.ns.unlink(ROOT, b"gone")
        await e.ns.unlink(ROOT, b"orphan", keep={orphan.id})

        def dirty():
            return sum(c.stats["dirty_bytes"] for c in e.caches.values())
        before = dirty()
        wbs = []
        for g in e.cluster.group_ids:
            leader = await e.cluster.leader(g)
            wbs.append(WriteBack(leader, e.store, e.data, e.cluster, chunk_size=CHUNK,
                                 delay=3600, namespace=e.ns))
        owners = {e.ring.chunk_owner(gone.id, i) for i in range(4)}
        # One drop per group holding chunks of the deleted file.
        assert sum([await wb.collect_chunks_of_deleted_inodes() for wb in wbs]) == len(owners)
        # Only the deleted file's four chunks went; the live file's and the
        # orphan's stay (dirty: write-back has not run).
        assert before - dirty() >= 4 * CHUNK
        assert dirty() >= 3 * CHUNK
        node = await e.ns.getattr(kept.id)
        assert len(await e.data.read(node, 0, 2 * CHUNK)) == 2 * CHUNK
        assert len(await e.data.read(await e.ns.getattr(orphan.id), 0, CHUNK)) == CHUNK
        assert gone.id not in {i for wb in wbs for i, _ in wb.state.chunks}
        await e.close()
    run(main())


def test_orphans_of_a_holder_that_stopped_renewing_expire(tmp_path):
    """A mount killed while holding unlinked files open never forgets
    them: each orphan carries its holder's lease, renewals push it out,
    and the group's write-back pass forgets the orphans whose lease ended
    (their chunks are then collected like any deleted file's)."""
    import time

    from objcache.meta.state import GroupState
    from objcache.txn.coordinator import new_txn_id

    async def main():
        e = await Engine(tmp_path).start()
        a = await _write_file(e, b"a", os.urandom(100))
        b = await _write_file(e, b"b", os.urandom(100))
        await e.ns.unlink(ROOT, b"a", keep={a.id}, lease=100)
        await e.ns.unlink(ROOT, b"b", keep={b.id}, lease=100)
        t0 = time.time()

        async def expire(at):
            n = 0
            for g in e.cluster.group_ids:
                leader = await e.cluster.leader(g)
                wb = WriteBack(leader, e.store, e.data, e.cluster, chunk_size=CHUNK,
                               delay=3600, namespace=e.ns, clock=lambda: at)
                n += await wb.expire_orphans()
            return n

        assert await expire(t0 + 50) == 0               # both leases still run
        await e.ns.renew_orphans([b.id], lease=1000)    # b's holder is alive
        assert await expire(t0 + 200) == 1
        with pytest.raises(OSError) as exc:
            await e.ns.getattr(a.id)
        assert exc.value.errno == errno.ENOENT
        assert (await e.ns.getattr(b.id)).nlink == 0    # still an orphan
        # An expirer that saw b's old lease end loses against the renewal.
        g = e.ring.meta_owner(b.id)
        await e.cluster.propose(g, ["tx", new_txn_id(), [["forget", b.id, t0 + 100]]])
        assert (await e.ns.getattr(b.id)).nlink == 0
        state = e.cluster.state(g)
        assert state.orphan_leases[b.id] >= t0 + 1000
        # Leases survive a snapshot; orphans from before leases expire.
        copy = GroupState(g)
        copy.restore(state.snapshot())
        assert copy.orphan_leases == state.orphan_leases
        assert await expire(t0 + 2000) == 1
        with pytest.raises(OSError):
            await e.ns.getattr(b.id)
        assert not any(e.cluster.state(g).orphan_leases for g in e.cluster.group_ids)
        await e.close()
    run(main())
