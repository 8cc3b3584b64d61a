"""GroupState: single-group transactions, 2PC records and locks, listings,
snapshots — applied directly (the Raft layer is tested elsewhere)."""
import errno

import msgpack
import pytest

from objcache.meta.model import ROOT, Inode, Kind
from objcache.meta.state import GroupState

T0 = 1_700_000_000_000_000_000


def cmd(state, *c, index=[0]):
    index[0] += 1
    return state.apply_data(msgpack.packb(list(c)), index[0])


def root_state():
    s = GroupState(1)
    r = cmd(s, "tx", b"t0", [["mkinode", Inode(ROOT, Kind.DIR, 0o755, 0, 0).to_wire(), "", True]])
    assert r[0] == "ok"
    return s


def file_wire(i, mode=0o644):
    return Inode(i, Kind.FILE, mode, 1000, 1000, mtime_ns=T0, parent=ROOT, name=b"f").to_wire()


def create(s, name, i, txn=None):
    return cmd(s, "tx", txn or b"c%d" % i, [["mkinode", file_wire(i), "", False],
                                            ["mkentry", ROOT, name, i, 1, None],
                                            ["alloc", i]])


def test_create_lookup_and_duplicate():
    s = root_state()
    assert create(s, b"a", 10)[0] == "ok"
    assert s.dirs[ROOT].entries[b"a"].child == 10
    assert s.inodes[10].kind == Kind.FILE and s.counter == 10
    r = create(s, b"a", 11)
    assert r[:2] == ["err", errno.EEXIST]
    assert 11 not in s.inodes                   # all or nothing


def test_unlink_rename_replace_within_a_group():
    s = root_state()
    create(s, b"a", 10)
    create(s, b"b", 11)
    # rename a -> b replacing b atomically.
    r = cmd(s, "tx", b"r1", [["rmentry", ROOT, b"a", 10],
                             ["mkentry", ROOT, b"b", 10, 1, 11],
                             ["nlink", 11, -1, T0]])
    assert r[0] == "ok", r
    assert set(s.dirs[ROOT].entries) == {b"b"} and 11 not in s.inodes
    # A stale expectation fails without effect.
    r = cmd(s, "tx", b"r2", [["rmentry", ROOT, b"b", 99]])
    assert r[:2] == ["err", errno.ESTALE]


def test_rmdir_requires_empty_and_listed():
    s = root_state()
    d = Inode(20, Kind.DIR, 0o755, 0, 0).to_wire()
    cmd(s, "tx", b"m", [["mkinode", d, "d/", True], ["mkentry", ROOT, b"d", 20, 2, None]])
    cmd(s, "tx", b"c", [["mkinode", file_wire(21), "", False], ["mkentry", 20, b"x", 21, 1, None]])
    assert cmd(s, "tx", b"r", [["rmdir", 20]])[:2] == ["err", errno.ENOTEMPTY]
    cmd(s, "tx", b"u", [["rmentry", 20, b"x", 21], ["nlink", 21, -1, T0]])
    assert cmd(s, "tx", b"r2", [["rmentry", ROOT, b"d", 20], ["rmdir", 20]])[0] == "ok"
    # A directory found in the bucket but not listed yet can't be removed.
    lazy = Inode(30, Kind.DIR, 0o755, 0, 0).to_wire()
    cmd(s, "tx", b"m2", [["mkinode", lazy, "e/", False]])
    assert cmd(s, "tx", b"r3", [["rmdir", 30]])[:2] == ["err", errno.EAGAIN]


def test_prepare_locks_until_decided():
    s = root_state()
    create(s, b"a", 10)
    r = cmd(s, "prep", b"X", 2, [["rmentry", ROOT, b"a", 10]], 123)
    assert r == ["ok", "prepared"]
    assert cmd(s, "prep", b"X", 2, [["rmentry", ROOT, b"a", 10]], 123) == ["ok", "prepared"]
    # Anything else touching the locked entry waits (EAGAIN)...
    assert cmd(s, "tx", b"Y", [["rmentry", ROOT, b"a", 10]])[:2] == ["err", errno.EAGAIN]
    assert cmd(s, "tx", b"Z", [["isdir_empty", ROOT]])[:2] == ["err", errno.EAGAIN]
    # ...and a listing doesn't resurrect or drop it.
    cmd(s, "listing", ROOT, 1, [], True, 1.0)
    assert b"a" in s.dirs[ROOT].entries
    # Abort: nothing happened, lock released.
    assert cmd(s, "decide", b"X", False) == ["ok", "aborted"]
    assert b"a" in s.dirs[ROOT].entries and not s.locks
    # Commit applies the prepared effects.
    cmd(s, "prep", b"W", 2, [["rmentry", ROOT, b"a", 10]], 123)
    assert cmd(s, "decide", b"W", True)[0] == "ok"
    assert b"a" not in s.dirs[ROOT].entries
    assert cmd(s, "decide", b"W", True) == ["ok", "unknown"]      # retried decision


def test_prepare_fails_cleanly_on_a_bad_precondition():
    s = root_state()
    r = cmd(s, "prep", b"X", 2, [["rmentry", ROOT, b"nope", 10]], 1)
    assert r[:2] == ["err", errno.ENOENT] and not s.locks and not s.prepared


def test_coordinator_decision_is_first_wins():
    s = root_state()
    assert cmd(s, "coord", b"T", True, [2, 3]) == ["ok", True]
    assert cmd(s, "abort_undecided", b"T") == ["ok", True]      # too late to abort
    assert cmd(s, "abort_undecided", b"U") == ["ok", False]     # never decided: aborted
    assert cmd(s, "coord", b"U", True, [2]) == ["ok", False]    # the abort stands
    cmd(s, "forget", b"T")
    assert b"T" not in s.decisions


def test_listing_merges_lazily():
    s = root_state()
    s.dirs[ROOT].listed = False                 # a bucket's root starts unlisted
    create(s, b"local", 10)
    cmd(s, "listing", ROOT, 1, [[b"a", 1, [5, "e1", 1.0]], [b"d", 2, None]], False, 0)
    ents = s.dirs[ROOT].entries
    assert ents[b"a"].child == 0 and ents[b"d"].kind == Kind.DIR
    assert not s.dirs[ROOT].listed
    cmd(s, "listing", ROOT, 2, [[b"d", 2, None]], True, 2.0)  # generation 2: "a" is gone
    assert set(ents) == {b"local", b"d"} and s.dirs[ROOT].listed
    # Creating over a lazy entry requires expecting it (-1 = lazy).
    r = cmd(s, "tx", b"m", [["mkinode", Inode(40, Kind.DIR, 0o755, 0, 0).to_wire(), "d/", False],
                            ["mkentry", ROOT, b"d", 40, 2, -1]])
    assert r[0] == "ok" and ents[b"d"].child == 40


def test_snapshot_roundtrip_including_locks():
    s = root_state()
    create(s, b"a", 10)
    cmd(s, "prep", b"X", 2, [["rmentry", ROOT, b"a", 10]], 5)
    cmd(s, "coord", b"Y", True, [3])
    t = GroupState(0)
    t.restore(s.snapshot())
    assert t.snapshot() == s.snapshot()
    assert t.locked(("e", ROOT, b"a")) == b"X"
    assert cmd(t, "decide", b"X", True)[0] == "ok" and b"a" not in t.dirs[ROOT].entries


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([]), msgpack.packb(["nope"]),
                                  msgpack.packb(["tx", b"t", [["bogus"]]]),
                                  msgpack.packb(["tx", b"t", [["mkentry", 1]]]),
                                  msgpack.packb(["tx"]), msgpack.packb({"a": 1})])
def test_malformed_commands_are_results_not_crashes(data):
    s = root_state()
    r = s.apply_data(data, 99)
    assert r[0] == "err" and r[1] == errno.EINVAL


def test_reserve_hands_out_disjoint_ranges():
    s = root_state()
    a = cmd(s, "reserve", 100)
    b = cmd(s, "reserve", 50)
    assert a == ["ok", 1, 100] and b == ["ok", 101, 150]
    assert cmd(s, "reserve", 0)[:2] == ["err", errno.EINVAL]


def test_chunk_versions_never_repeat_after_a_truncate_drop():
    """cdrop with a floor (truncate): a cut-away chunk written again gets a
    version above every dropped one — readers cache chunks by version —
    and the floor survives a snapshot; a deleted file's cdrop forgets it."""
    s = GroupState(1)
    base = 7 << 32
    for k in range(3):
        assert s.apply_command(["cwrite", 5, 1, 0, b"x", 1024, base], k + 1)[0] == "ok"
    assert s.chunks[(5, 1)][0] == base + 3
    assert s.apply_command(["cdrop", 5, 1, True], 4) == ["ok", [1]]
    t = GroupState(1)
    t.restore(s.snapshot())
    for st in (s, t):
        r = st.apply_command(["cwrite", 5, 1, 0, b"y", 1024, base], 5)
        assert r[1] == base + 4 and r[2] == 0             # above the floor, no old base
        r = st.apply_command(["cbase", 5, 2, b"z", base], 6)
        assert r[1] == base + 4 and r[3] is True
        st.apply_command(["cdrop", 5, 0], 7)                  # the file is deleted
        assert st.chunk_floors == {} and st.apply_command(
            ["cwrite", 5, 1, 0, b"y", 1024, base], 8)[1] == base + 1
