"""Eviction policy (objcache/cache/policy.py): S3-FIFO mechanics, scan
resistance, hit ratio on Zipf traces against LRU, and invariants under random
operations."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from objcache.cache.policy import LRU, S3FIFO, make_policy, simulate


def fill(policy, keys, now=0.0):
    for k in keys:
        policy.insert(k, 1, now)


# ------------------------------------------------------------------ mechanics

def test_one_hit_wonders_leave_first_in_insertion_order():
    p = S3FIFO()
    fill(p, range(10))
    assert [p.evict() for _ in range(3)] == [0, 1, 2]
    assert all(p.in_ghost(k) for k in (0, 1, 2))
    assert len(p) == 7 and p.weight == 7


def test_reaccessed_entry_moves_to_main_and_survives():
    p = S3FIFO()
    fill(p, range(10))
    assert p.access(0, 1.0) and p.access(1, 1.0)
    assert not p.access(99)                      # not resident: no effect
    victims = [p.evict() for _ in range(3)]
    assert victims == [2, 3, 4]                  # 0 and 1 were hit: moved to M
    assert p.in_main(0) and p.in_main(1)


def test_ghost_hit_goes_straight_to_main():
    p = S3FIFO()
    fill(p, range(10))
    assert p.evict() == 0 and p.in_ghost(0)
    p.insert(0, 1, 1.0)
    assert p.in_main(0) and not p.in_ghost(0)


def test_main_gives_second_chances():
    p = S3FIFO(small_ratio=0.5)
    for k in ("g1", "g2"):
        p.insert(k)
        assert p.evict() == k                    # one-hit wonders: into the ghost
    p.insert("g1")
    p.insert("g2")                               # ghost hits: straight into M
    assert p.in_main("g1") and p.in_main("g2")
    p.access("g1", 5.0)                          # g1 has one credit
    assert p.evict() == "g2"                     # the oldest without credit
    assert p.evict() == "g1"                     # its credit went on the first pass


def test_unevictable_keys_are_passed_over():
    p = S3FIFO()
    fill(p, range(5))
    pinned = {0, 1}
    assert p.evict(lambda k: k not in pinned) == 2
    # Passed-over keys go to the back of their queue (they are in use).
    assert p.keys() == [3, 4, 0, 1]
    assert p.evict(lambda k: False) is None      # nothing evictable: None
    assert p.keys() == [3, 4, 0, 1]              # a full rotation: same order
    pinned.clear()
    assert [p.evict() for _ in range(4)] == [3, 4, 0, 1]


def test_unevictable_in_main_then_small_fallback():
    p = S3FIFO(small_ratio=0.5)
    for k in ("m1", "m2"):
        p.insert(k), p.evict()                   # through the ghost into M later
    p.insert("m1"), p.insert("m2"), p.insert("s1")
    assert p.in_main("m1") and not p.in_main("s1")
    # M is over its share, but all of M is pinned: S gives a victim instead.
    assert p.evict(lambda k: k.startswith("s")) == "s1"
    assert p.evict(lambda k: k.startswith("s")) is None


def test_remove_and_weights():
    p = S3FIFO()
    p.insert("a", 5)
    p.insert("b", 7)
    assert p.weight == 12 and "a" in p
    assert p.remove("a") and not p.remove("a")
    assert p.weight == 7 and "a" not in p and not p.in_ghost("a")
    with pytest.raises(KeyError):
        p.insert("b")


def test_correlation_window_counts_a_burst_once():
    p = S3FIFO(correlation_window=1.0)
    fill(p, range(10), now=0.0)
    for t in np.linspace(0.01, 0.5, 30):         # 30 hits in one burst
        p.access(0, float(t))
    assert p.evict() == 0                        # the burst was no new access
    p.access(1, 2.0)                             # a separate, later access counts
    assert p.evict() == 2 and p.in_main(1)


def test_lru_basics_and_factory():
    p = make_policy("lru")
    fill(p, "abc")
    p.access("a")
    assert p.evict() == "b"
    assert p.evict(lambda k: k != "c") == "a"
    assert isinstance(make_policy("s3fifo"), S3FIFO)
    with pytest.raises(ValueError):
        make_policy("arc")


# ------------------------------------------------------------ scan resistance

def _scan_experiment(policy, capacity=100, hot=50, scan=2000, pieces=16):
    """Warm a hot set with repeated separate accesses, then read a one-pass
    scan (each scanned chunk read in ``pieces`` pieces within a burst, like
    FUSE reads of one chunk). Returns the fraction of the hot set still
    resident, and the hot-set hit ratio of one more round after the scan."""
    now = 0.0
    for rnd in range(5):
        for k in range(hot):
            now += 0.01
            key = ("hot", k)
            if not policy.access(key, now):
                policy.insert(key, 1, now)
                while len(policy) > capacity:
                    policy.evict()
    for s in range(scan):
        now += 0.002
        key = ("scan", s)
        policy.insert(key, 1, now)
        while len(policy) > capacity:
            policy.evict()
        for piece in range(1, pieces):
            policy.access(key, now + piece * 1e-4)
    retained = sum(("hot", k) in policy for k in range(hot)) / hot
    hits = 0
    for k in range(hot):
        now += 0.01
        hits += policy.access(("hot", k), now)
    return retained, hits / hot


def test_one_pass_scan_does_not_flush_the_hot_set():
    s3_kept, s3_hits = _scan_experiment(S3FIFO(correlation_window=0.05))
    lru_kept, lru_hits = _scan_experiment(LRU())
    print(f"\nhot set kept after a 2000-chunk scan: S3-FIFO {s3_kept:.0%} "
          f"(next-round hits {s3_hits:.0%}), LRU {lru_kept:.0%} ({lru_hits:.0%})")
    assert s3_kept == 1.0 and s3_hits == 1.0
    assert lru_kept == 0.0


def test_without_the_correlation_window_piecewise_scans_pollute_main():
    # Documents why the cache sets a correlation window: counted naively,
    # every scanned chunk read in pieces looks reused and is promoted.
    kept, _ = _scan_experiment(S3FIFO(correlation_window=0.0))
    assert kept < 0.5


def test_a_second_pass_of_the_scan_is_admitted_through_the_ghost():
    p = S3FIFO()
    fill(p, range(100))
    for k in range(100, 300):                    # a scan
        p.insert(k)
        while len(p) > 100:
            p.evict()
    assert p.in_ghost(150) and 150 not in p
    p.insert(150)                                # seen recently: goes to M
    assert p.in_main(150)


# ---------------------------------------------------------------- hit ratio

def zipf_trace(n_keys, length, alpha, seed):
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, n_keys + 1, dtype=np.float64)
    probs = ranks ** -alpha
    probs /= probs.sum()
    # Shuffle ranks onto keys so that key order carries no information.
    keys = rng.permutation(n_keys)
    return keys[rng.choice(n_keys, size=length, p=probs)].tolist()


@pytest.mark.parametrize("alpha", [0.8, 1.0, 1.2])
def test_zipf_hit_ratio_vs_lru(alpha):
    trace = zipf_trace(10_000, 100_000, alpha, seed=int(alpha * 10))
    rows = []
    for capacity in (100, 1000):
        s3_h, s3_m = simulate(S3FIFO(), trace, capacity)
        lru_h, lru_m = simulate(LRU(), trace, capacity)
        s3, lru = s3_h / len(trace), lru_h / len(trace)
        rows.append(f"capacity {capacity}: S3-FIFO {s3:.3f}, LRU {lru:.3f}")
        assert s3 >= lru, rows[-1]
    print(f"\nZipf alpha={alpha}, 10k keys, 100k requests: " + "; ".join(rows))


def test_zipf_with_scans_mixed_in():
    zipf = zipf_trace(5_000, 60_000, 1.0, seed=3)
    trace, scan_id = [], 10_000_000
    for i, k in enumerate(zipf):
        trace.append(k)
        if i % 10_000 == 5_000:                  # a 2000-chunk scan every 10k requests
            trace.extend(range(scan_id, scan_id + 2000))
            scan_id += 2000
    s3_h, _ = simulate(S3FIFO(), trace, 500)
    lru_h, _ = simulate(LRU(), trace, 500)
    print(f"\nZipf 1.0 + periodic scans, capacity 500: S3-FIFO {s3_h / len(trace):.3f}, "
          f"LRU {lru_h / len(trace):.3f}")
    assert s3_h > lru_h * 1.1


# --------------------------------------------------------------- properties

ops = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove", "evict"]),
                         st.integers(0, 30), st.integers(1, 4),
                         st.frozensets(st.integers(0, 30), max_size=10)),
               max_size=300)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_s3fifo_invariants_under_random_operations(seq):
    p = S3FIFO(small_ratio=0.25, min_ghost=4)
    model: dict[int, int] = {}                   # resident key -> weight
    for now, (op, key, weight, pinned) in enumerate(seq):
        if op == "insert" and key not in model:
            p.insert(key, weight, float(now))
            model[key] = weight
        elif op == "access":
            assert p.access(key, float(now)) == (key in model)
        elif op == "remove":
            assert p.remove(key) == (key in model)
            model.pop(key, None)
        elif op == "evict":
            victim = p.evict(lambda k: k not in pinned)
            evictable = set(model) - pinned
            if victim is None:
                assert not evictable
            else:
                assert victim in evictable
                del model[victim]
        assert len(p) == len(model)
        assert p.weight == sum(model.values())
        assert set(p.keys()) == set(model)
        assert not any(p.in_ghost(k) for k in model)
