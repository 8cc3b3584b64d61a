"""Namespace.readdir_plus: names with their inodes in batched reads."""
import asyncio

from objcache.meta.model import ROOT, Kind

from tests.engine.harness import Engine


def test_readdir_plus_matches_readdir_and_getattr(tmp_path):
    async def main():
        e = Engine(tmp_path)
        await e.store.put("from-bucket", b"12345")          # a lazy entry: no inode yet
        await e.start()
        made = {}
        for i in range(40):
            made[b"f%d" % i] = await e.ns.create(ROOT, b"f%d" % i, 0o640, 1000, 1000)
        await e.ns.mkdir(ROOT, b"sub", 0o755, 1000, 1000)
        plus = dict(await e.ns.readdir_plus(ROOT))
        assert set(plus) == {n for n, _c, _k in await e.ns.readdir(ROOT)}
        for name, node in made.items():
            assert plus[name].id == node.id and plus[name].mode == 0o640
        assert plus[b"from-bucket"].size == 5 and plus[b"sub"].kind == Kind.DIR
        for name, node in plus.items():
            assert (await e.ns.getattr(node.id)).to_wire() == node.to_wire()
        await e.close()
    asyncio.run(asyncio.wait_for(main(), 60))
