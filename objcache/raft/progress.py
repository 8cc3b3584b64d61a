"""The leader's view of each follower's log (replication flow control).

States (as in etcd-io/raft):
* PROBE: we don't know where the follower's log ends; send one append at a
  time (``probe_sent``) and wait for its answer or a heartbeat response.
* REPLICATE: the follower is caught up to ``match``; pipeline appends
  optimistically (``next`` advances as we send), at most ``max_inflight``
  messages unacknowledged (``inflights`` holds each one's last index).
* SNAPSHOT: a snapshot at ``pending_snapshot`` is being sent; no appends.

Invariant: match < next.
"""
from __future__ import annotations

import enum
from collections import deque


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class Progress:
    __slots__ = ("match", "next", "state", "probe_sent", "pending_snapshot",
                 "recent_active", "inflights", "is_learner")

    def __init__(self, next_index: int, is_learner: bool = False):
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.pending_snapshot = 0
        self.recent_active = False
        self.inflights: deque[int] = deque()
        self.is_learner = is_learner

    def __repr__(self):
        return (f"Progress({self.state.name} match={self.match} next={self.next}"
                f"{' learner' if self.is_learner else ''} "
                f"inflight={len(self.inflights)})")

    def _reset(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.clear()

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            # Resume after the snapshot: the follower has at least it.
            pending = self.pending_snapshot
            self._reset(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return len(self.inflights) >= max_inflight
        return True

    def sent_entries(self, last_index: int) -> None:
        """An append carrying entries up to ``last_index`` went out."""
        if self.state == ProgressState.REPLICATE:
            self.next = last_index + 1
            self.inflights.append(last_index)
        elif self.state == ProgressState.PROBE:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """The follower acknowledged everything up to ``index``. Returns
        whether ``match`` advanced."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def free_inflights_to(self, index: int) -> None:
        while self.inflights and self.inflights[0] <= index:
            self.inflights.popleft()

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an append whose previous index was
        ``rejected``; its log may match up to ``match_hint``. Returns False
        for a stale rejection (of an append we already moved past)."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True
