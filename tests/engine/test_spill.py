"""Spilling (engine/spill.py): a file larger than its owners' disk tiers is
written whole — full dirty chunks go to spill objects and leave the cache —
read back (from the spill objects), partially rewritten (re-based from
them), written back (copied server-side), and the spill objects are gone
once the bucket holds the file."""
import asyncio
import os

import pytest

from objcache.engine.spill import Spiller
from objcache.meta import names as nm
from objcache.meta.model import ROOT

from .harness import CHUNK, Engine
from .test_writeback import bucket, drain, writebacks


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def spillers(e):
    out = list(e.spillers.values())
    tasks = [asyncio.ensure_future(s.run(interval=0.005)) for s in out]
    return out, tasks


async def spill_keys(e):
    keys = []
    async for page in e.store.list(nm.SPILL, delimiter=None):
        keys += [o.key for o in page.objects]
    return keys


@pytest.mark.parametrize("replicas", [1, 3])
def test_a_file_three_times_the_disk_tiers_is_written_read_and_written_back(tmp_path, replicas):
    async def main():
        # 2 groups x 4-chunk disk tiers; a 24-chunk file. 5 MiB chunks: the
        # smallest that can be multipart parts (write-back copies them).
        chunk = 5 << 20
        e = await Engine(tmp_path, groups=2, replicas=replicas, disk_chunks=4,
                         chunk=chunk, spill=True).start()
        sp, tasks = await spillers(e)
        f = await e.ns.create(ROOT, b"big.bin", 0o644, 0, 0)
        data = os.urandom(24 * chunk + 1000)
        versions = {}
        for off in range(0, len(data), 2 * chunk):       # a writer going forward
            versions.update(await e.data.write(f, off, data[off:off + 2 * chunk]))
        f = await e.data.flush(f, len(data), versions)
        node = await e.ns.getattr(f.id)
        spilled = sum(s.stats["spilled"] + s.stats["written_through"] for s in sp)
        assert spilled >= 24 - 2 * 4
        assert sum(s.stats["written_through"] for s in sp) > 0  # whole chunks skip the log
        for c in e.caches.values():                    # every replica's tier
            st = c.stats
            assert st["disk_bytes"] <= st["disk_capacity"] * 1.5   # admitted overshoot only
        assert len(await spill_keys(e)) == spilled
        # Read back: spilled chunks come from their spill objects.
        assert await e.data.read(node, 0, len(data)) == data
        # A partial write into a spilled (evicted) chunk re-bases from it.
        patch = b"rewritten"
        v = await e.data.write(node, 5, patch)
        node = await e.data.flush(node, len(data), v)
        data = data[:5] + patch + data[5 + len(patch):]
        node = await e.ns.getattr(f.id)
        assert await e.data.read(node, 0, 2 * chunk) == data[:2 * chunk]
        # Write-back copies spilled chunks server-side; then the spill
        # objects are deleted.
        wbs = await writebacks(e, chunk)
        await drain(wbs)
        await drain(wbs)                    # the owners delete what cclean tombstoned
        got = await bucket(e)
        assert got["big.bin"] == data
        assert sum(wb.stats["bytes_copied"] for wb in wbs) >= (spilled - 1) * chunk
        assert await spill_keys(e) == []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await e.close()
    run(main())


def test_a_stale_spill_is_tombstoned_and_garbage_is_collected(tmp_path):
    """A cspill for a version that moved on records nothing and tombstones
    its object; an object no record names (a crash between PUT and cspill)
    is collected once old enough."""
    async def main():
        e = await Engine(tmp_path, groups=1, replicas=1).start()
        f = await e.ns.create(ROOT, b"f", 0o644, 0, 0)
        v = await e.data.write(f, 0, os.urandom(CHUNK))
        rg = await e.cluster.leader(1)
        s = Spiller(rg, e.store, CHUNK, owner_of=lambda key: 1)
        (idx, version), = v.items()
        await e.data.write(f, 0, os.urandom(CHUNK))       # the version moves on
        assert await s._spill((f.id, idx), version) == 0   # nothing cached at it any more
        etag = await e.store.put(f"{nm.SPILL}{f.id}/0-{version}-stale", b"x" * CHUNK)
        import msgpack
        r = await rg.propose(msgpack.packb(["cspill", f.id, 0, version,
                                            f"{nm.SPILL}{f.id}/0-{version}-stale", etag]))
        assert r == ["ok", False]
        assert f"{nm.SPILL}{f.id}/0-{version}-stale" in rg.sm.state.tombstones
        orphan = f"{nm.SPILL}{f.id}/0-99-orphan"
        await e.store.put(orphan, b"y")
        assert await s.collect_garbage(now=0) == 0          # too young
        import time
        assert await s.collect_garbage(now=time.time() + 3600) == 1
        assert orphan in rg.sm.state.tombstones
        await e.close()
    run(main())
