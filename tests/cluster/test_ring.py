"""The hash ring: balanced ownership, minimal movement, stable placement."""
import numpy as np
import pytest

from objcache.cluster.ring import META, Ring


@pytest.mark.parametrize("n", [3, 8, 32])
def test_ownership_spread_max_over_mean(n):
    ring = Ring(range(1, n + 1))
    shares = ring.shares(samples=1 << 20)
    spread = max(shares.values()) / (1 / n)
    print(f"\n{n} groups: max/mean ownership {spread:.3f}, "
          f"min/mean {min(shares.values()) * n:.3f}")
    assert spread <= 1.1


def test_adding_a_group_moves_about_one_nth_and_only_to_it():
    before = Ring(range(1, 8))
    after = Ring(range(1, 9), version=1)
    keys = np.random.default_rng(3).integers(0, 2**63, 200_000, dtype=np.uint64)
    zeros = np.zeros(len(keys), dtype=np.uint64)
    a, b = before.place(keys, zeros), after.place(keys, zeros)
    moved = a != b
    assert set(np.unique(b[moved]).tolist()) == {8}
    assert 0.09 < moved.mean() < 0.16            # ~1/8


def test_removing_a_group_moves_only_its_keys():
    before = Ring(range(1, 6))
    after = Ring([1, 2, 4, 5])
    keys = np.arange(1, 100_001, dtype=np.uint64)
    zeros = np.zeros(len(keys), dtype=np.uint64)
    a, b = before.place(keys, zeros), after.place(keys, zeros)
    assert np.all(a[a != b] == 3)


def test_meta_and_chunk_keys_are_placed_independently():
    ring = Ring(range(1, 9))
    owners = {ring.chunk_owner(42, c) for c in range(64)}
    assert len(owners) > 4                       # one file's chunks spread out
    assert ring.meta_owner(42) == ring.owner(42, META)


def test_placement_is_deterministic_across_instances():
    assert [Ring([1, 2, 3]).chunk_owner(i, 0) for i in range(100)] == \
        [Ring([3, 2, 1], version=9).chunk_owner(i, 0) for i in range(100)]


def test_bad_rings():
    with pytest.raises(ValueError):
        Ring([])
    with pytest.raises(ValueError):
        Ring([0, 1])
