"""Model-based test through the kernel: random namespace and data operations
on the mount and on a local directory (the oracle) must agree after every
step — same tree, same bytes, same errors. One mount serves every example
(each in a fresh directory)."""
import itertools
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

NAMES = st.sampled_from(["a", "b", "c.txt", "dir1", "ü"])
_counter = itertools.count()
MOUNT = {}


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory, moto_s3):
    from .conftest import Mount
    s3 = moto_s3
    bucket = "model-mount"
    s3.client().create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("model-mount")
    m = Mount(s3, bucket, tmp / "mnt", tmp / "data")
    MOUNT["m"] = m
    yield m
    assert m.unmount() == 0


class MountModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        n = next(_counter)
        self.root = os.path.join(MOUNT["m"].path, f"ex{n}")
        self.oracle_dir = tempfile.mkdtemp(prefix="objcache-oracle-")
        self.oracle = os.path.join(self.oracle_dir, f"ex{n}")
        os.mkdir(self.root)
        os.mkdir(self.oracle)

    def teardown(self):
        shutil.rmtree(getattr(self, "oracle_dir", "/nonexistent"), ignore_errors=True)

    def paths(self, want_dir):
        out = [""] if want_dir else []
        for d, dirs, files in os.walk(self.oracle):
            rel = os.path.relpath(d, self.oracle)
            rel = "" if rel == "." else rel
            if want_dir:
                out += [os.path.join(rel, x) for x in dirs]
            else:
                out += [os.path.join(rel, x) for x in files]
        return sorted(out)

    def both(self, fn):
        """Run fn(base) on the oracle and the mount; same outcome."""
        def outcome(base):
            try:
                return ("ok", fn(base))
            except OSError as exc:
                return ("err", exc.errno)
        want = outcome(self.oracle)
        got = outcome(self.root)
        assert got == want, (got, want)

    @rule(d=st.data(), name=NAMES)
    def create(self, d, name):
        parent = d.draw(st.sampled_from(self.paths(True)))
        self.both(lambda b: os.close(os.open(os.path.join(b, parent, name),
                                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)))

    @rule(d=st.data(), name=NAMES)
    def mkdir(self, d, name):
        parent = d.draw(st.sampled_from(self.paths(True)))
        self.both(lambda b: os.mkdir(os.path.join(b, parent, name)))

    @precondition(lambda self: self.paths(False))
    @rule(d=st.data(), off=st.integers(0, 3 << 20), size=st.integers(1, 300_000),
          seed=st.integers(0, 255), append=st.booleans())
    def write(self, d, off, size, seed, append):
        path = d.draw(st.sampled_from(self.paths(False)))
        data = bytes((seed + i) % 251 for i in range(size))

        def w(b):
            fd = os.open(os.path.join(b, path), os.O_WRONLY | (os.O_APPEND if append else 0))
            try:
                if not append:
                    os.lseek(fd, off, os.SEEK_SET)
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(w)

    @precondition(lambda self: self.paths(False))
    @rule(d=st.data(), size=st.integers(0, 3 << 20))
    def truncate(self, d, size):
        path = d.draw(st.sampled_from(self.paths(False)))
        self.both(lambda b: os.truncate(os.path.join(b, path), size))

    @precondition(lambda self: self.paths(False))
    @rule(d=st.data())
    def unlink(self, d):
        path = d.draw(st.sampled_from(self.paths(False)))
        self.both(lambda b: os.unlink(os.path.join(b, path)))

    @rule(d=st.data())
    def rmdir(self, d):
        dirs = self.paths(True)[1:]
        if dirs:
            path = d.draw(st.sampled_from(dirs))
            self.both(lambda b: os.rmdir(os.path.join(b, path)))

    @rule(d=st.data(), name=NAMES)
    def rename(self, d, name):
        srcs = self.paths(False) + self.paths(True)[1:]
        if not srcs:
            return
        src = d.draw(st.sampled_from(srcs))
        parent = d.draw(st.sampled_from(self.paths(True)))
        self.both(lambda b: os.rename(os.path.join(b, src), os.path.join(b, parent, name)))

    @invariant()
    def same_tree(self):
        if not hasattr(self, "root"):
            return
        for d in self.paths(True):
            assert sorted(os.listdir(os.path.join(self.root, d))) == \
                sorted(os.listdir(os.path.join(self.oracle, d))), d
        for f in self.paths(False):
            with open(os.path.join(self.oracle, f), "rb") as a, \
                    open(os.path.join(self.root, f), "rb") as b:
                want, got = a.read(), b.read()
            assert len(got) == len(want) and got == want, (f, len(got), len(want))


def test_mount_matches_a_local_directory(shared_mount):
    MountModel.TestCase.settings = settings(
        max_examples=int(os.environ.get("OBJCACHE_MOUNT_MODEL_EXAMPLES", "15")),
        stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    MountModel.TestCase().runTest()
