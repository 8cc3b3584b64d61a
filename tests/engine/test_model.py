"""Model-based test: random namespace and data operations on a 3-group
engine and on a local directory (the oracle) must agree after every step;
after a drain-style flush, the bucket's keys and bytes equal the oracle's
files."""
import asyncio
import errno
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from objcache.engine.writeback import WriteBack
from objcache.meta.model import ROOT, Kind

from .harness import CHUNK, Engine

NAMES = st.sampled_from(["a", "b", "c", "d.txt", "ü", "long" * 10])


class NamespaceModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="objcache-model-"))
        self.oracle = self.tmp / "oracle"
        self.oracle.mkdir()
        self.loop = asyncio.new_event_loop()
        self.engine = self.run(Engine(self.tmp / "engine").start())
        # Re-list the bucket on every readdir, so that listings race with the
        # write-back passes below (what a long-running mount sees).
        self.engine.ns.list_ttl = 0
        self.errors = 0
        self.history: list[str] = []

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    def teardown(self):
        try:
            self.run(self._drain_and_compare())
            self.run(self.engine.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------

    def dirs(self) -> list[str]:
        out = [""]
        for root, ds, _ in os.walk(self.oracle):
            rel = os.path.relpath(root, self.oracle)
            for d in ds:
                out.append(os.path.normpath(os.path.join(rel, d)).lstrip("./") if rel != "." else d)
        return sorted(out)

    def files(self) -> list[str]:
        out = []
        for root, _, fs in os.walk(self.oracle):
            rel = os.path.relpath(root, self.oracle)
            for f in fs:
                out.append(f if rel == "." else f"{rel}/{f}")
        return sorted(out)

    async def resolve(self, path):
        node = await self.engine.ns.getattr(ROOT)
        for part in [p for p in path.split("/") if p]:
            node = await self.engine.ns.lookup(node.id, part.encode())
        return node

    async def parent_and_name(self, path):
        parent, _, name = path.rpartition("/")
        return await self.resolve(parent), name.encode()

    def expect(self, oracle_fn, engine_coro):
        """Run both; they must both succeed or fail with the same errno."""
        try:
            oracle_fn()
            want = None
        except OSError as exc:
            want = exc.errno
        self.history.append(f"{getattr(engine_coro, '__qualname__', '?')} "
                            f"{engine_coro.cr_frame.f_locals if engine_coro.cr_frame else ''} "
                            f"-> {want}")
        try:
            self.run(engine_coro)
            got = None
        except OSError as exc:
            got = exc.errno
        assert got == want, f"engine errno {got}, oracle errno {want}"

    # -- rules -----------------------------------------------------------------

    @rule(d=st.data(), name=NAMES)
    def create(self, d, name):
        parent = d.draw(st.sampled_from(self.dirs()))
        path = f"{parent}/{name}" if parent else name
        target = self.oracle / path

        def oracle():
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)

        async def engine():
            p, n = await self.parent_and_name(path)
            await self.engine.ns.create(p.id, n, 0o644, 0, 0)
        self.expect(oracle, engine())

    @rule(d=st.data(), name=NAMES)
    def mkdir(self, d, name):
        parent = d.draw(st.sampled_from(self.dirs()))
        path = f"{parent}/{name}" if parent else name

        async def engine():
            p, n = await self.parent_and_name(path)
            await self.engine.ns.mkdir(p.id, n, 0o755, 0, 0)
        self.expect(lambda: os.mkdir(self.oracle / path), engine())

    @precondition(lambda self: self.files())
    @rule(d=st.data(), offset=st.integers(0, 3 * CHUNK), size=st.integers(1, CHUNK + 100),
          seed=st.integers(0, 255))
    def write(self, d, offset, size, seed):
        path = d.draw(st.sampled_from(self.files()))
        data = bytes((seed + i) % 251 for i in range(size))
        with open(self.oracle / path, "r+b") as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            new_size = os.fstat(f.fileno()).st_size

        async def engine():
            node = await self.resolve(path)
            v = await self.engine.data.write(node, offset, data)
            await self.engine.data.flush(node, new_size, v)
        self.run(engine())

    @precondition(lambda self: self.files())
    @rule(d=st.data())
    def unlink(self, d):
        path = d.draw(st.sampled_from(self.files()))

        async def engine():
            p, n = await self.parent_and_name(path)
            await self.engine.ns.unlink(p.id, n)
        self.expect(lambda: os.unlink(self.oracle / path), engine())

    @rule(d=st.data())
    def rmdir(self, d):
        dirs = [x for x in self.dirs() if x]
        if not dirs:
            return
        path = d.draw(st.sampled_from(dirs))

        async def engine():
            p, n = await self.parent_and_name(path)
            await self.engine.ns.rmdir(p.id, n)
        self.expect(lambda: os.rmdir(self.oracle / path), engine())

    @rule(d=st.data(), name=NAMES)
    def rename(self, d, name):
        src = d.draw(st.sampled_from(self.files() + [x for x in self.dirs() if x] or [""]))
        if not src:
            return
        parent = d.draw(st.sampled_from(self.dirs()))
        dst = f"{parent}/{name}" if parent else name

        async def engine():
            sp, sn = await self.parent_and_name(src)
            dp, dn = await self.parent_and_name(dst)
            await self.engine.ns.rename(sp.id, sn, dp.id, dn)
        self.expect(lambda: os.rename(self.oracle / src, self.oracle / dst), engine())

    @rule()
    def write_back_pass(self):
        """One write-back pass on every group mid-run: uploads, copies for
        renames, tombstone deletes, directory relocations."""
        async def go():
            for wb in await self._write_backs():
                await wb.run_once(force=True)
        self.history.append("write_back_pass")
        self.run(go())

    async def _write_backs(self):
        e = self.engine
        wbs = []
        for g in e.cluster.group_ids:
            leader = await e.cluster.leader(g)
            wbs.append(WriteBack(leader, e.store, e.data, e.cluster, chunk_size=CHUNK, delay=0,
                                 namespace=e.ns))
        return wbs

    # -- invariants ------------------------------------------------------------

    @invariant()
    def same_tree_and_contents(self):
        async def check():
            for dpath in self.dirs():
                node = await self.resolve(dpath)
                assert node.kind == Kind.DIR
                got = sorted((n.decode(), k) for n, _, k in await self.engine.ns.readdir(node.id))
                want = sorted((e.name, Kind.DIR if e.is_dir() else Kind.FILE)
                              for e in os.scandir(self.oracle / dpath))
                assert got == want, (dpath, got, want)
            for fpath in self.files():
                node = await self.resolve(fpath)
                want = (self.oracle / fpath).read_bytes()
                assert node.size == len(want), fpath
                assert await self.engine.data.read(node, 0, node.size) == want, fpath
        self.run(check())

    async def _drain_and_compare(self):
        e = self.engine
        wbs = await self._write_backs()
        for _ in range(30):
            for wb in wbs:
                await wb.run_once(force=True)
            if all(wb.pending() == 0 for wb in wbs):
                break
        assert all(wb.pending() == 0 for wb in wbs), (
            [wb.pending() for wb in wbs],
            [(n.id, n.kind.name, n.dirty, n.s3, n.parent, n.name) for wb in wbs
             for n in wb.state.inodes.values()],
            [(d, dr.moved, dr.s3_prefix) for wb in wbs for d, dr in wb.state.dirs.items()],
            [wb.state.tombstones for wb in wbs], self.history)
        bucket = {}
        async for page in e.store.list("", delimiter=None):
            for o in page.objects:
                bucket[o.key] = await e.store.get(o.key)
        want = {f: (self.oracle / f).read_bytes() for f in self.files()}
        want.update({d + "/": b"" for d in self.dirs() if d})
        extra = {k: v for k, v in bucket.items() if want.get(k) != v}
        missing = {k: v for k, v in want.items() if bucket.get(k) != v}
        assert not extra and not missing, \
            f"bucket has {extra}, lacks {missing}; history: {self.history}"


TestNamespaceModel = NamespaceModel.TestCase
TestNamespaceModel.settings = settings(max_examples=int(os.environ.get("OBJCACHE_MODEL_EXAMPLES", "25")), stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
