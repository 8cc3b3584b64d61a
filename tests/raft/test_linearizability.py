"""The register linearizability checker: known histories, and the zone
characterization cross-checked against exhaustive search."""
from hypothesis import given, settings, strategies as st

from objcache.testing.linearizability import INF, Op, check, normalize, wgl_ok, zones_ok


def P(v, a, b=INF):
    return Op("put", "k", v, a, b)


def G(v, a, b):
    return Op("get", "k", v, a, b)


def test_sequential_history():
    h = [P(1, 1, 2), G(1, 3, 4), P(2, 5, 6), G(2, 7, 8)]
    assert zones_ok(h) and wgl_ok(h) and check(h) == []


def test_stale_read_is_caught():
    h = [P(1, 1, 2), P(2, 3, 4), G(1, 5, 6)]
    assert not zones_ok(h) and not wgl_ok(h)


def test_read_before_write_invoked_is_caught():
    assert not zones_ok([G(1, 1, 2), P(1, 3, 4)])


def test_read_of_initial_value_after_a_write_is_caught():
    assert not zones_ok([P(1, 1, 2), G(None, 3, 4)])


def test_concurrent_write_may_be_seen_either_way():
    h = [P(1, 1, 10), G(1, 2, 3), G(None, 4, 5)]
    # The write can't be undone: reading None after having read 1 is stale.
    assert not zones_ok(h) and not wgl_ok(h)
    assert zones_ok([P(1, 1, 10), G(None, 2, 3), G(1, 4, 5)])


def test_unanswered_writes():
    # Never observed: may never have happened.
    assert check([P(1, 1), G(None, 5, 6)]) == []
    # Observed: happened before the first read of it returned.
    assert check([P(1, 1), G(1, 5, 6), G(None, 7, 8)]) == ["k"]
    assert [o.ret for o in normalize([P(1, 1), G(1, 5, 6)]) if o.kind == "put"] == [6]


@st.composite
def histories(draw):
    n = draw(st.integers(1, 7))
    times = draw(st.permutations(list(range(2 * n))))
    ops, next_value = [], 1
    for i in range(n):
        a, b = sorted(times[2 * i:2 * i + 2])
        if draw(st.booleans()):
            ops.append(P(next_value, a, b))
            next_value += 1
        else:
            ops.append(G(draw(st.integers(0, n)) or None, a, b))
    return ops


@settings(max_examples=1500, deadline=None)
@given(histories())
def test_zones_agree_with_exhaustive_search(h):
    assert zones_ok(h) == wgl_ok(h)
