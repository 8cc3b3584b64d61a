"""RaftCore, section by section of the Raft paper (and its thesis chapters on
membership, reads and leadership transfer).

Each test drives a small deterministic cluster (harness.Cluster): message
delivery is synchronous FIFO, faults are explicit cuts, crashes and drops.
The randomized properties are covered by the simulator (test_sim.py).
"""
import pytest

from objcache.raft.core import Config, RaftCore, RestoreState
from objcache.raft.log import LogSafetyError
from objcache.raft.types import (ConfChange, ConfChangeType, ConfState, Entry,
                                 EntryType, HardState, Message, MsgType,
                                 NotLeader, ProposalDropped, Role)

from .harness import Cluster


# ---------------------------------------------------------------- §5.2 election

def test_single_node_elects_itself_and_commits():
    c = Cluster(1)
    c.campaign(1)
    assert c.nodes[1].is_leader
    idx = c.propose(1, b"x")
    assert c.nodes[1].log.committed == idx
    assert c.applied[1] == [b"x"]


def test_three_nodes_elect_one_leader():
    c = Cluster(3)
    c.campaign(1)
    assert c.leader() == 1
    assert [c.nodes[i].leader for i in (1, 2, 3)] == [1, 1, 1]
    assert {c.nodes[i].term for i in (1, 2, 3)} == {1}


def test_election_timeout_starts_election():
    c = Cluster(3)
    c.tick_all(30)              # randomized timeouts in [10, 20)
    assert c.leader() is not None


def test_election_safety_one_vote_per_term():
    """§5.2: a node votes for at most one candidate per term, and the vote
    survives a restart."""
    c = Cluster(3, pre_vote=False)
    c.drop_types = {MsgType.VOTE_RESP}
    c.nodes[1].campaign()
    c.ready(1)
    votes = [m for m in c.queue if m.type == MsgType.VOTE]
    c.settle()
    assert c.nodes[2].vote == 1 and c.nodes[3].vote == 1
    # Node 2 restarts; a rival in the same term asks for its vote.
    c.crash(2)
    c.start(2)
    assert c.nodes[2].vote == 1 and c.nodes[2].term == votes[0].term
    c.nodes[2].step(Message(MsgType.VOTE, to=2, frm=3, term=votes[0].term,
                            index=10, log_term=10))
    c.ready(2)
    resp = [m for m in c.queue if m.type == MsgType.VOTE_RESP and m.frm == 2]
    assert resp and resp[-1].reject


def test_candidate_loses_to_a_majority_of_rejections():
    c = Cluster(3, pre_vote=False)
    c.campaign(1)
    c.propose(1, b"a")
    c.isolate(3)
    c.propose(1, b"b")                      # node 3 misses it
    c.heal()
    # Node 3 (stale log) campaigns: 1 and 2 refuse (§5.4.1).
    c.nodes[3].term = c.nodes[1].term       # so that its vote isn't dismissed as stale
    c.nodes[3].campaign()
    c.settle()
    assert c.nodes[3].role != Role.LEADER


def test_pre_vote_keeps_a_partitioned_node_from_inflating_terms():
    c = Cluster(3)
    c.campaign(1)
    term = c.nodes[1].term
    c.isolate(3)
    c.tick(3, 100)                          # many election timeouts alone
    assert c.nodes[3].term == term          # pre-votes never succeeded
    c.heal()
    c.tick_all(3)
    assert c.leader() == 1 and c.nodes[1].term == term


def test_without_pre_vote_a_rejoining_node_disrupts():
    """The counter-example that pre-vote prevents (checks the test's power)."""
    c = Cluster(3, pre_vote=False, check_quorum=False)
    c.campaign(1)
    term = c.nodes[1].term
    c.isolate(3)
    c.tick(3, 100)
    assert c.nodes[3].term > term


def test_check_quorum_leader_steps_down_when_isolated():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(1)
    # Activity is judged per election-timeout window: the window in which the
    # followers last answered still counts, the next silent one does not.
    c.tick(1, 10)
    assert c.nodes[1].is_leader
    c.tick(1, 10)
    assert c.nodes[1].role == Role.FOLLOWER


def test_leader_lease_ignores_vote_requests():
    c = Cluster(3)
    c.campaign(1)
    term = c.nodes[1].term
    # A node that wants to start an election with a higher term is ignored
    # by followers who heard from the leader recently.
    c.nodes[2].step(Message(MsgType.VOTE, to=2, frm=3, term=term + 5,
                            index=100, log_term=term))
    c.ready(2)
    assert c.nodes[2].term == term and c.nodes[2].leader == 1


# ---------------------------------------------------------------- §5.3 replication

def test_replication_and_apply_order():
    c = Cluster(3)
    c.campaign(1)
    for k in range(20):
        c.propose(1, b"v%d" % k)
    c.tick_all(1)
    for i in (1, 2, 3):
        assert c.applied[i] == [b"v%d" % k for k in range(20)]


def test_followers_refuse_proposals_with_a_leader_hint():
    c = Cluster(3)
    c.campaign(1)
    with pytest.raises(NotLeader) as exc:
        c.nodes[2].propose(b"x")
    assert exc.value.leader == 1


def test_log_matching_conflicting_suffix_is_replaced():
    """§5.3: a follower's uncommitted conflicting entries are overwritten."""
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"a")
    # Old leader 1 appends entries nobody else receives.
    c.isolate(1)
    for k in range(5):
        c.nodes[1].propose(b"lost%d" % k)
        c.ready(1)
    c.queue.clear()
    c.tick_all(40)                          # 2 and 3 elect one of them
    new = c.leader()
    assert new in (2, 3) and not c.nodes[1].is_leader
    c.propose(new, b"b")
    c.heal()
    c.tick_all(3)
    logs = {i: [(e.term, bytes(e.data)) for e in c.nodes[i].log.entries] for i in (1, 2, 3)}
    assert logs[1] == logs[2] == logs[3]
    assert all(b"lost" not in d for _, d in logs[1])
    assert c.applied[1] == c.applied[new] == [b"a", b"b"]


def test_fast_backtracking_skips_whole_terms():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(3)
    for k in range(50):
        c.propose(1, b"%d" % k)
    c.heal()
    c.sent.clear()
    c.tick_all(2)
    rejects = [m for m in c.sent if m.type == MsgType.APP_RESP and m.reject]
    assert len(rejects) <= 2                # not one per missing entry
    assert c.nodes[3].log.committed == c.nodes[1].log.committed


def test_flow_control_bounds_inflight_appends():
    c = Cluster(3, max_inflight=2, max_msg_bytes=1)
    c.campaign(1)
    c.tick_all(1)
    c.cut.update({(2, 1), (3, 1)})          # acks don't come back
    for k in range(10):
        c.nodes[1].propose(b"p%d" % k)
    c.ready(1)
    apps = [m for m in c.queue if m.type == MsgType.APP and m.to == 2 and m.entries]
    assert len(apps) == 2                   # window of 2, one entry each
    c.settle()
    c.heal()
    c.tick_all(5)                           # heartbeats unstick the window
    assert c.nodes[2].log.committed == c.nodes[1].log.last_index()


# ---------------------------------------------------------------- §5.4 safety

def test_figure8_leader_does_not_commit_old_term_entries_by_counting():
    """§5.4.2 / Figure 8: an entry from an earlier term is not committed just
    because a majority stores it; only entries of the leader's own term
    commit by counting replicas."""
    c = Cluster(5, pre_vote=False, check_quorum=False, max_msg_bytes=1)
    c.campaign(1)                                   # term 1, entry 1 everywhere
    # (a) Leader 1 replicates entry 2 (term 1) to node 2 only, then crashes.
    c.cut.update({(1, 3), (1, 4), (1, 5)})
    c.nodes[1].propose(b"old")
    c.settle()
    assert c.nodes[2].log.term(2) == 1 and c.nodes[1].log.committed == 1
    c.crash(1)
    c.heal()
    # (b) Node 5 is elected for term 2 (votes of 3, 4) and crashes before
    # replicating its own entry 2.
    c.drop_types = {MsgType.APP}
    c.campaign(5)
    assert c.nodes[5].is_leader and c.nodes[5].log.term(2) == 2
    c.crash(5)
    c.drop_types = set()
    # (c) Node 1 restarts and is elected for term 3; it replicates entry 2
    # (term 1) to nodes 3 and 4 — now on a majority it knows of (1, 3, 4) —
    # but its own term-3 entry reaches nobody: appends carrying it are
    # dropped once the receiver holds entry 2.
    c.start(1)
    c.drop_if = lambda m: (m.type == MsgType.APP and c.nodes[m.to].log.term(2) == 1
                           and any(e.index >= 3 for e in m.entries))
    c.campaign(1)                                   # term 2: 3 and 4 voted for 5
    if not c.nodes[1].is_leader:
        c.campaign(1)                               # term 3
    assert c.nodes[1].is_leader and c.nodes[1].term == 3
    assert [c.nodes[i].log.term(2) for i in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert c.nodes[1].prs[3].match == 2 and c.nodes[1].prs[4].match == 2
    assert c.nodes[1].log.committed < 2             # NOT committed by counting
    # (d) Once the term-3 entry reaches a majority, both commit together.
    c.drop_if = None
    c.tick_all(2)
    assert c.nodes[1].log.committed == 3
    assert c.applied[1] == [b"old"]


def test_commit_never_overwritten():
    lg_entries = [Entry(1, 1, data=b"a"), Entry(1, 2, data=b"b")]
    core = RaftCore(Config(id=1), RestoreState(HardState(1, 0, 2), None, lg_entries))
    with pytest.raises(LogSafetyError):
        core.log.append([Entry(2, 2, data=b"x")])


def test_leader_completeness_new_leader_has_committed_entries():
    c = Cluster(5, pre_vote=False)
    c.campaign(1)
    c.propose(1, b"committed")
    committed = c.nodes[1].log.committed
    c.crash(1)
    c.tick_all(40)
    leader = c.leader()
    assert leader not in (None, 1)
    assert c.nodes[leader].log.term(committed) is not None


def test_state_machine_safety_after_leader_churn():
    c = Cluster(5)
    c.campaign(1)
    for r in range(5):
        leader = c.leader()
        c.propose(leader, b"r%d" % r)
        c.crash(leader)
        c.tick_all(40)
        c.start(leader)
        c.tick_all(5)
    leader = c.leader()
    c.propose(leader, b"end")
    c.tick_all(3)
    base = c.applied[leader]
    for i in c.nodes:
        assert c.applied[i] == base[:len(c.applied[i])]
    assert base.count(b"end") == 1


# ---------------------------------------------------------------- persistence

def test_restart_restores_log_and_normalizes_a_torn_hard_state():
    # Entries of term 3 were durable but the hard state record (term 3) was torn.
    ents = [Entry(1, 1, data=b"a"), Entry(3, 2, data=b"b")]
    core = RaftCore(Config(id=1), RestoreState(HardState(2, 7, 5), None, ents,
                                               ConfState(frozenset({1, 2, 3}))))
    assert core.term == 3 and core.vote == 0          # term raised, no vote
    assert core.log.committed == 2                    # clamped to the log
    core.check_invariants()


def test_restarted_cluster_keeps_committed_entries():
    c = Cluster(3)
    c.campaign(1)
    for k in range(5):
        c.propose(1, b"%d" % k)
    for i in (1, 2, 3):
        c.crash(i)
    for i in (1, 2, 3):
        c.start(i)
    c.tick_all(40)
    leader = c.leader()
    c.propose(leader, b"after")
    c.tick_all(2)
    for i in (1, 2, 3):
        assert c.applied[i] == [b"0", b"1", b"2", b"3", b"4", b"after"]


# ---------------------------------------------------------------- reads (thesis §6.4)

def test_read_index_on_leader_needs_a_quorum():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"x")
    c.nodes[1].read_index(b"r1")
    c.settle()
    assert [(r.index, r.context) for r in c.reads[1]] == [(c.nodes[1].log.committed, b"r1")]
    # An isolated leader can't confirm its leadership: no read state.
    c.isolate(1)
    c.nodes[1].read_index(b"r2")
    c.settle()
    assert [r.context for r in c.reads[1]] == [b"r1"]


def test_read_index_forwarded_from_follower():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"x")
    c.nodes[3].read_index(b"f1")
    c.settle()
    assert [r.context for r in c.reads[3]] == [b"f1"]
    assert c.reads[3][0].index == c.nodes[1].log.committed


def test_read_index_waits_for_a_commit_in_the_new_term():
    c = Cluster(3)
    c.campaign(1)
    c.drop_types = {MsgType.APP_RESP}       # the new leader's entry can't commit
    c.nodes[1].transfer_leader(2)
    c.settle()
    assert c.leader() == 2
    c.nodes[2].read_index(b"early")
    c.settle()
    assert c.reads[2] == []
    c.drop_types = set()
    c.tick_all(2)
    assert [r.context for r in c.reads[2]] == [b"early"]


# ---------------------------------------------------------------- membership (thesis ch. 4)

def test_add_learner_catch_up_then_promote():
    c = Cluster(4, voters=[1, 2, 3])
    c.campaign(1)
    for k in range(5):
        c.propose(1, b"%d" % k)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.settle()
    c.tick_all(2)
    assert 4 in c.nodes[1].conf.learners
    assert c.applied[4] == c.applied[1]     # the learner caught up
    assert not c.nodes[4].promotable()
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, 4))
    c.settle()
    c.tick_all(2)
    assert c.nodes[1].conf.voters == {1, 2, 3, 4}
    # With 4 voters the quorum is 3: two nodes down stop commits.
    c.crash(2)
    c.crash(3)
    c.nodes[1].propose(b"needs3")
    c.settle()
    assert c.applied[1][-1] != b"needs3"


def test_one_membership_change_at_a_time():
    c = Cluster(5, voters=[1, 2, 3])
    c.campaign(1)
    c.drop_types = {MsgType.APP_RESP}        # keep the first change uncommitted
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 5))


def test_removed_leader_steps_down_and_the_rest_continue():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"a")
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE, 1))
    c.settle()
    c.tick_all(2)
    assert not c.nodes[1].is_leader
    c.tick_all(40)
    leader = c.leader()
    assert leader in (2, 3)
    assert c.nodes[leader].conf.voters == {2, 3}
    c.propose(leader, b"b")
    assert c.applied[2][-1] == b"b" and c.applied[3][-1] == b"b"
    c.tick_all(40)                          # the removed node never campaigns
    assert c.leader() == leader


def test_bad_conf_change_rejected_before_logging():
    c = Cluster(1)
    c.campaign(1)
    with pytest.raises(ValueError):
        c.nodes[1]._propose(Entry(0, 0, EntryType.CONF_CHANGE, b"\x07junk"))
    assert c.nodes[1].log.last_index() == 1


# ---------------------------------------------------------------- leader transfer (thesis §3.10)

def test_transfer_to_an_up_to_date_follower():
    c = Cluster(3)
    c.campaign(1)
    c.propose(1, b"x")
    c.nodes[1].transfer_leader(3)
    c.settle()
    assert c.leader() == 3


def test_transfer_to_a_lagging_follower_catches_it_up_first():
    c = Cluster(3)
    c.campaign(1)
    c.isolate(3)
    for k in range(10):
        c.propose(1, b"%d" % k)
    c.heal()
    c.nodes[1].transfer_leader(3)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"during")       # proposals pause during a transfer
    c.settle()
    assert c.leader() == 3
    assert c.nodes[3].log.term(c.nodes[1].log.committed) is not None


def test_transfer_aborts_after_an_election_timeout():
    c = Cluster(3)
    c.campaign(1)
    c.crash(3)
    c.nodes[1].transfer_leader(3)
    c.settle()
    c.tick(1, 10)
    assert c.leader() == 1 and c.nodes[1].lead_transferee == 0
    c.propose(1, b"ok")


# ---------------------------------------------------------------- snapshots (§7)

def test_compaction_and_install_snapshot():
    c = Cluster(3)
    c.campaign(1)
    c.crash(3)
    for k in range(30):
        c.propose(1, b"%d" % k)
    c.compact(1)
    c.compact(2)
    assert c.nodes[1].log.snap_index == c.nodes[1].log.applied
    c.start(3)
    c.tick_all(3)
    assert c.nodes[3].log.snap_index > 0            # installed the snapshot
    assert c.applied[3] == c.applied[1]
    c.propose(1, b"after")
    assert c.applied[3][-1] == b"after"


def test_failed_snapshot_send_is_retried():
    c = Cluster(3)
    c.campaign(1)
    c.crash(3)
    for k in range(10):
        c.propose(1, b"%d" % k)
    c.compact(1)
    c.compact(2)
    c.start(3)
    c.drop_types = {MsgType.SNAP}
    c.tick_all(3)
    assert c.nodes[3].log.snap_index == 0
    c.drop_types = set()
    c.tick_all(3)
    assert c.applied[3] == c.applied[1]


def test_snapshot_carries_membership():
    c = Cluster(4, voters=[1, 2, 3])
    c.campaign(1)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.settle()
    c.tick_all(1)
    c.propose(1, b"x")
    meta = c.nodes[1].compact(c.nodes[1].log.applied)
    assert meta.conf.learners == {4} and meta.conf.voters == {1, 2, 3}


# ---------------------------------------------------------------- bad input

def test_config_validation():
    for bad in (dict(id=0), dict(id=1, election_ticks=1, heartbeat_ticks=1),
                dict(id=1, max_inflight=0)):
        with pytest.raises(ValueError):
            RaftCore(Config(**bad))


def test_conf_state_rejects_overlap():
    with pytest.raises(ValueError):
        ConfState(frozenset({1}), frozenset({1}))


def test_read_index_needs_a_context():
    with pytest.raises(ValueError):
        RaftCore(Config(id=1)).read_index(b"")


def test_stale_term_messages_are_ignored_or_answered():
    c = Cluster(3)
    c.campaign(1)
    c.nodes[1].transfer_leader(2)
    c.settle()                              # term 2, leader 2
    term = c.nodes[2].term
    assert c.leader() == 2 and term == 2
    c.nodes[2].step(Message(MsgType.APP, to=2, frm=1, term=term - 1, index=0))
    c.ready(2)
    resp = [m for m in c.queue if m.frm == 2 and m.to == 1]
    assert resp and resp[-1].term == term   # tells the stale leader the new term
    assert c.nodes[2].is_leader


def test_propose_many_is_one_append_round():
    c = Cluster(3)
    c.campaign(1)
    c.sent.clear()
    first = c.nodes[1].propose_many([b"a", b"b", b"c"])
    c.settle()
    apps = [m for m in c.sent if m.type == MsgType.APP and m.entries]
    assert len(apps) == 2 and all(len(m.entries) == 3 for m in apps)
    assert [e.index for e in apps[0].entries] == [first, first + 1, first + 2]
    assert c.applied[2] == [b"a", b"b", b"c"]
    with pytest.raises(ValueError):
        c.nodes[1].propose_many([])
    with pytest.raises(NotLeader):
        c.nodes[2].propose_many([b"x"])


def test_membership_follows_the_log_not_the_commit_index():
    """Regression (simulator seed 11277): a node restarting with a stale
    commit index must still use the membership its log says, or it counts
    votes of servers already removed and can win without committed
    entries."""
    five = ConfState(frozenset({1, 2, 3, 4, 5}))
    rm1 = ConfChange(ConfChangeType.REMOVE, 1).encode()
    rm2 = ConfChange(ConfChangeType.REMOVE, 2).encode()
    ents = [Entry(1, 1), Entry(1, 2, EntryType.CONF_CHANGE, rm1),
            Entry(1, 3, EntryType.CONF_CHANGE, rm2), Entry(1, 4)]
    core = RaftCore(Config(id=4), RestoreState(HardState(1, 0, 1), None, ents, five))
    assert core.conf.voters == {3, 4, 5}
    # A conflicting append that truncates the removals undoes them.
    core.step(Message(MsgType.APP, to=4, frm=3, term=2, index=1, log_term=1,
                      entries=[Entry(2, 2)], commit=1))
    assert core.conf.voters == {1, 2, 3, 4, 5}
