"""CRC-32C and ring placement: known values, parity between the compiled
module and its twin (Hypothesis), and bad input."""
import array

import crc32c as pypi_crc32c
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

CHECK_VALUE = 0xE3069283  # CRC-32C of b"123456789" (RFC 3720 / the catalogue)


def test_published_check_value(impl):
    assert impl.crc32c(b"123456789") == CHECK_VALUE
    assert impl.crc32c(b"") == 0
    assert impl.crc32c(b"", 1234) == 1234


def test_rfc3720_vectors(impl):
    # iSCSI (RFC 3720, B.4) test patterns.
    assert impl.crc32c(bytes(32)) == 0x8A9136AA
    assert impl.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert impl.crc32c(bytes(range(32))) == 0x46DD794E
    assert impl.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70_000), st.integers(0, 2**32 - 1), st.integers(0, 7))
def test_parity_with_reference(c_impl, py_impl, data, value, skew):
    # `skew` misaligns the buffer start: the compiled code has an alignment
    # prologue and three block sizes (8, 256*3, 8192*3 bytes).
    buf = memoryview(b"\0" * skew + data)[skew:]
    expected = pypi_crc32c.crc32c(data, value)
    assert c_impl.crc32c(buf, value) == expected
    assert c_impl.hashing.crc32c_software(buf, value) == expected
    assert py_impl.crc32c(buf, value) == expected


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_incremental(impl, a, b):
    assert impl.crc32c(b, impl.crc32c(a)) == impl.crc32c(a + b)


def test_large_block_boundaries(c_impl, py_impl):
    rng = np.random.default_rng(1)
    for n in (3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 6 * 8192 + 770, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert c_impl.crc32c(data) == pypi_crc32c.crc32c(data)
    assert py_impl.crc32c(data) == pypi_crc32c.crc32c(data)


def test_accepts_any_contiguous_buffer(impl):
    data = bytes(range(256)) * 4
    want = impl.crc32c(data)
    assert impl.crc32c(bytearray(data)) == want
    assert impl.crc32c(memoryview(data)) == want
    assert impl.crc32c(np.frombuffer(data, dtype=np.uint32)) == want
    assert impl.crc32c(array.array("B", data)) == want


def test_hardware_path_in_use(c_impl):
    assert c_impl.crc32c_backend() in ("sse4.2", "software")
    import platform
    if platform.machine() == "x86_64":
        with open("/proc/cpuinfo") as f:
            if "sse4_2" in f.read():
                assert c_impl.crc32c_backend() == "sse4.2"


@pytest.mark.parametrize("bad, exc", [
    ("text", TypeError), (123, TypeError), (None, TypeError),
    (memoryview(bytearray(100))[::2], (BufferError, ValueError)),
    (np.arange(100, dtype=np.uint8)[::3], (BufferError, ValueError)),
])
def test_bad_data(impl, bad, exc):
    with pytest.raises(exc):
        impl.crc32c(bad)


@pytest.mark.parametrize("value, exc", [(-1, ValueError), (2**32, ValueError),
                                        ("1", TypeError), (1.5, TypeError)])
def test_bad_value(impl, value, exc):
    with pytest.raises(exc):
        impl.crc32c(b"x", value)


# ---- ring placement ---------------------------------------------------------

def _ring(impl, groups=8, vnodes=64):
    pts = {}
    for g in range(groups):
        for v in range(vnodes):
            pts[impl.hash64(g, v)] = g
    keys = sorted(pts)
    return np.array(keys, dtype=np.uint64), np.array([pts[k] for k in keys])


u64 = st.integers(0, 2**64 - 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(u64, min_size=1, max_size=200), st.integers(0, 1000))
def test_hash64_parity(c_impl, py_impl, values, b):
    for a in values:
        assert c_impl.hash64(a, b) == py_impl.hash64(a, b)


@settings(max_examples=60, deadline=None)
@given(st.sets(u64, min_size=1, max_size=300),
       st.lists(st.tuples(u64, u64), max_size=300), st.integers(1, 50))
def test_placement_parity(c_impl, py_impl, points, keys, ngroups):
    pts = np.array(sorted(points), dtype=np.uint64)
    owners = np.arange(len(pts)) % ngroups
    ino = np.array([k[0] for k in keys], dtype=np.uint64)
    chk = np.array([k[1] for k in keys], dtype=np.uint64)
    got_c = c_impl.ring_place(pts, owners, ino, chk)
    got_py = py_impl.ring_place(pts, owners, ino, chk)
    assert got_c.dtype == np.int64 and got_py.dtype == np.int64
    np.testing.assert_array_equal(got_c, got_py)
    # Against the definition: first point >= hash, wrapping to point 0.
    for (i, c), owner in zip(keys, got_c):
        h = py_impl.hash64(i, c)
        idx = int(np.searchsorted(pts, np.uint64(h), side="left"))
        assert owner == owners[idx % len(pts)]
        assert c_impl.RingTable(pts, owners).place_one(i, c) == owner


def test_placement_edges(impl):
    pts = np.array([10, 20, 2**64 - 1], dtype=np.uint64)
    table = impl.RingTable(pts, [0, 1, 2])
    assert len(table) == 3
    # Single-point ring: everything goes to that point's owner.
    one = impl.RingTable(np.array([5], dtype=np.uint64), [7])
    out = one.place(np.arange(100, dtype=np.uint64), np.zeros(100, dtype=np.uint64))
    assert set(out.tolist()) == {7}
    # Empty batch.
    assert table.place(np.array([], dtype=np.uint64),
                       np.array([], dtype=np.uint64)).shape == (0,)


def test_placement_spread(impl):
    pts, owners = _ring(impl, groups=8, vnodes=256)
    n = 20000
    out = impl.ring_place(pts, owners, np.arange(n, dtype=np.uint64) + 1,
                          np.zeros(n, dtype=np.uint64))
    counts = np.bincount(out, minlength=8)
    assert counts.max() / counts.mean() < 1.25


@pytest.mark.parametrize("points, owners, exc", [
    (np.array([], dtype=np.uint64), [], ValueError),
    (np.array([3, 2, 1], dtype=np.uint64), [0, 1, 2], ValueError),
    (np.array([1, 1], dtype=np.uint64), [0, 1], ValueError),
    (np.array([1, 2], dtype=np.uint64), [0], ValueError),
    (np.array([[1, 2]], dtype=np.uint64), [0, 1], ValueError),
    (np.array([-1, 2], dtype=np.int64), [0, 1], ValueError),
    (np.array([1.0, 2.0]), [0, 1], TypeError),
    (np.array([1, 2], dtype=np.uint64), ["a", "b"], TypeError),
])
def test_bad_ring(impl, points, owners, exc):
    with pytest.raises(exc):
        impl.RingTable(points, owners)


def test_bad_keys(impl):
    table = impl.RingTable(np.array([1, 2], dtype=np.uint64), [0, 1])
    with pytest.raises(ValueError):
        table.place(np.array([1, 2], dtype=np.uint64), np.array([1], dtype=np.uint64))
    with pytest.raises(ValueError):
        table.place(np.array([-5]), np.array([1]))
    with pytest.raises(TypeError):
        table.place(np.array(["x"]), np.array([1]))
    with pytest.raises(ValueError):
        table.place_one(-1, 0)
    with pytest.raises(TypeError):
        table.place_one("1", 0)
    with pytest.raises(ValueError):
        impl.hash64(2**64, 0)
