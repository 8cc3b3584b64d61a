"""Truncation and partial writes over data the bucket already holds."""
import asyncio
import os

import pytest

from objcache.meta.model import ROOT

from .harness import CHUNK, Engine
from .test_writeback import drain, writebacks


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _uploaded_file(e, data):
    f = await e.ns.create(ROOT, b"f", 0o644, 1000, 1000)
    await e.data.flush(f, len(data), await e.data.write(f, 0, data))
    await drain(await writebacks(e))
    node = await e.ns.getattr(f.id)
    assert not node.dirty and node.s3 is not None
    return node


def test_truncate_down_then_up_over_an_uploaded_object_reads_zeros(tmp_path):
    async def main():
        e = await Engine(tmp_path).start()
        data = os.urandom(3 * CHUNK)
        node = await _uploaded_file(e, data)
        await e.data.truncate(node, 100, {})
        node = await e.ns.getattr(node.id)
        await e.data.truncate(node, 3 * CHUNK, {})
        node = await e.ns.getattr(node.id)
        got = await e.data.read(node, 0, 3 * CHUNK)
        assert got[:100] == data[:100] and got[100:] == bytes(3 * CHUNK - 100)
        await e.close()
    run(main())


def test_a_write_into_a_chunk_cut_away_by_truncate_reads_zeros_around_it(tmp_path):
    """fsx's failure on a 24 MiB file: data in chunk 1, a truncate into
    chunk 0, a write into chunk 1 again — the write built on chunk 1's old
    local version, so the cut bytes came back (and reached the bucket).
    Uploaded or not before the cut, the chunk must read zeros around the
    new write, and its new version must never reuse an old number."""
    async def main():
        e = await Engine(tmp_path).start()
        for upload in (False, True):
            f = await e.ns.create(ROOT, f"f{upload}".encode(), 0o644, 0, 0)
            old = os.urandom(CHUNK + 4096)
            f = await e.data.flush(f, len(old), await e.data.write(f, 0, old))
            if upload:
                await drain(await writebacks(e))
            node = await e.ns.getattr(f.id)
            before = node.chunk_version(1)
            await e.data.truncate(node, CHUNK // 2, {})
            node = await e.ns.getattr(f.id)
            v = await e.data.write(node, CHUNK + 100, b"Z")
            assert v[1] > before                     # a new number for new content
            await e.data.flush(node, CHUNK + 101, v)
            node = await e.ns.getattr(f.id)
            got = await e.data.read(node, 0, CHUNK + 101)
            assert got == old[:CHUNK // 2] + bytes(CHUNK // 2 + 100) + b"Z", upload
            await drain(await writebacks(e))
            node = await e.ns.getattr(f.id)
            assert bytes(await e.store.get(node.s3.key)) == got    # the bucket too
        await e.close()
    run(main())


@pytest.mark.parametrize("groups,replicas", [(3, 1), (1, 3)])
def test_partial_write_after_every_replica_evicted_the_clean_version(tmp_path, groups,
                                                                      replicas):
    """Write-back made the chunk clean and every replica's cache dropped it
    (as an eviction would); a partial write must reach every replica with
    the whole chunk (the leader re-bases it from the bucket), so any of
    them can serve it after a leader change."""
    async def main():
        e = await Engine(tmp_path, groups=groups, replicas=replicas).start()
        data = os.urandom(CHUNK)
        node = await _uploaded_file(e, data)
        for cache in e.caches.values():
            cache.discard((node.id, 0))
        v = await e.data.write(node, 10, b"xyz")
        await e.data.flush(node, CHUNK, v)
        want = data[:10] + b"xyz" + data[13:]
        node = await e.ns.getattr(node.id)
        owners = e.cluster.groups[e.ring.chunk_owner(node.id, 0)]
        for rg in owners.values():                  # every replica applied it
            await _wait_applied(rg, owners)
            view = await rg.sm.cache.read((node.id, 0), v[0], None)
            assert bytes(view.data) == want, rg.node_id
            view.release()
        assert await e.data.read(node, 0, CHUNK) == want
        await e.close()
    run(main())


async def _wait_applied(rg, replicas):
    target = max(r.core.log.committed for r in replicas.values())
    while rg.core.log.applied < target:
        await asyncio.sleep(0.01)
