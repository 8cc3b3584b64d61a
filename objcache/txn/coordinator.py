"""Transactions over Raft groups: one entry when one group is involved,
two-phase commit otherwise. See docs/transactions.md for the protocol, the
states and the recovery rules; this module is the coordinator side and the
in-doubt resolver.

Everything durable lives in the groups' Raft logs (objcache/meta/state.py
applies the records): PREPARE (with the locks taken) at each participant,
the decision at the coordinator group, DECIDE at each participant, FORGET at
the coordinator. The coordinator process holds no state that matters: if it
dies at any point, the logs alone decide the outcome (an undecided prepare
times out and is aborted by the coordinator group; a logged decision is
re-sent by whoever leads the coordinator group next).
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import time
from typing import Protocol

import msgpack

from objcache.cluster.ring import StaleRing

log = logging.getLogger(__name__)

PREPARE_TIMEOUT = 10.0          # seconds an undecided prepare may hold its locks


class GroupRouter(Protocol):
    """Reaches the current leader of any group."""

    async def propose(self, group: int, command: list, timeout: float | None = None) -> list:
        """Replicate ``command`` in ``group``; returns the state machine's
        result (["ok", ...] / ["err", errno, message]). Raises on
        unreachability or timeout (outcome unknown)."""


class TransactionFailed(OSError):
    """A precondition failed (``errno`` says which: ENOENT, EEXIST, ...)."""


class TransactionAborted(TransactionFailed):
    pass


_ids = itertools.count(1)
_node_tag = os.urandom(6)


def new_txn_id() -> bytes:
    """Unique across the cluster and across restarts (random node tag)."""
    return _node_tag + next(_ids).to_bytes(8, "big")


def _raise_for(result: list, what: str):
    if result[0] != "ok":
        code, message = result[1], result[2]
        raise TransactionFailed(code, f"{what}: {message}")


class Coordinator:
    def __init__(self, router: GroupRouter, *, prepare_timeout: float = PREPARE_TIMEOUT,
                 call_timeout: float = 10.0, clock=time.time):
        self.router = router
        self.prepare_timeout = prepare_timeout
        self.call_timeout = call_timeout
        self.clock = clock
        self.stats = {"single": 0, "two_phase": 0, "aborted": 0, "retried": 0}

    async def run(self, parts: dict[int, list], coordinator: int | None = None,
                  *, retries: int = 20) -> dict[int, list]:
        """Apply ``parts`` (group -> ops) atomically; returns group -> op
        results. Raises TransactionFailed with the failing precondition's
        errno. Lock conflicts (EAGAIN) are retried with backoff."""
        if not parts:
            return {}
        coordinator = coordinator if coordinator is not None else min(parts)
        delay = 0.002
        for attempt in range(retries + 1):
            try:
                if len(parts) == 1:
                    return await self._single(parts)
                return await self._two_phase(parts, coordinator)
            except TransactionFailed as exc:
                if exc.errno != errno.EAGAIN or attempt == retries:
                    raise
                self.stats["retried"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        raise AssertionError("unreachable")

    async def _single(self, parts: dict[int, list]) -> dict[int, list]:
        (group, ops), = parts.items()
        self.stats["single"] += 1
        r = await self.router.propose(group, ["tx", new_txn_id(), ops], self.call_timeout)
        _raise_for(r, f"transaction in group {group}")
        return {group: r[1]}

    async def _two_phase(self, parts: dict[int, list], coordinator: int) -> dict[int, list]:
        self.stats["two_phase"] += 1
        txn = new_txn_id()
        deadline = self.clock() + self.prepare_timeout
        groups = sorted(parts)

        stale: list[StaleRing] = []

        async def prepare(g):
            try:
                return await self.router.propose(
                    g, ["prep", txn, coordinator, parts[g], deadline], self.call_timeout)
            except StaleRing as exc:                # placed by an old ring: abort, re-place
                stale.append(exc)
                return ["err", errno.EAGAIN, f"prepare in group {g}: {exc}"]
            except Exception as exc:  # noqa: BLE001 - unreachable = a no vote
                return ["err", errno.EIO, f"prepare in group {g}: {exc!r}"]

        # Phase 1. Prepares go out concurrently; the locks are per key and a
        # conflict is an immediate "no" (EAGAIN), never a wait, so there is
        # no deadlock to order around.
        votes = await asyncio.gather(*(prepare(g) for g in groups))
        commit = all(v[0] == "ok" for v in votes)
        # Phase 2. The decision is what the coordinator group's log says:
        # the first "coord" record for this txn, or an abort the resolver
        # logged first if we were too slow (then we must follow it).
        d = await self.router.propose(coordinator, ["coord", txn, commit, groups],
                                      self.call_timeout)
        _raise_for(d, "logging the decision")
        decided = bool(d[1])
        results = await self._decide_everywhere(txn, groups, decided)
        if decided:
            await self._forget(coordinator, txn)
            return results
        self.stats["aborted"] += 1
        await self._forget(coordinator, txn)
        if stale:
            raise stale[0]                          # the locks are released: re-place
        if not commit:
            failed = next(v for v in votes if v[0] != "ok")
            raise TransactionFailed(failed[1], failed[2])
        raise TransactionAborted(errno.EAGAIN, "the transaction timed out before "
                                               "its decision was logged")

    async def _decide_everywhere(self, txn: bytes, groups, commit: bool) -> dict[int, list]:
        async def decide(g):
            # A participant that can't be told now learns the outcome from
            # its resolver (it asks the coordinator group after the deadline).
            try:
                return g, await self.router.propose(g, ["decide", txn, commit],
                                                    self.call_timeout)
            except Exception as exc:  # noqa: BLE001 - resolved later, see above
                log.warning("txn %s: telling group %d the decision failed: %r",
                            txn.hex(), g, exc)
                return g, None
        results = {}
        for g, r in await asyncio.gather(*(decide(g) for g in groups)):
            results[g] = r[1] if r and r[0] == "ok" else None
        return results

    async def _forget(self, coordinator: int, txn: bytes) -> None:
        try:
            await self.router.propose(coordinator, ["forget", txn], self.call_timeout)
        except Exception as exc:  # noqa: BLE001 - the resolver forgets it later
            log.info("txn %s: forget failed: %r", txn.hex(), exc)


class Resolver:
    """Runs on every group leader: finishes transactions whose coordinator
    went away.

    * A participant's prepared transaction past its deadline: ask the
      coordinator group (``abort_undecided``: returns the logged decision,
      logging an abort if there was none) and log that decision here.
    * A decision the coordinator group logged but never forgot: tell every
      participant again, then forget it.
    """

    def __init__(self, group_id: int, state, router: GroupRouter, *, interval: float = 1.0,
                 clock=time.time, grace: float = 2.0):
        self.group_id = group_id
        self.state = state
        self.router = router
        self.interval = interval
        self.clock = clock
        self.grace = grace                          # decisions younger than this are left alone
        self._seen_decisions: dict[bytes, float] = {}

    async def run_once(self) -> int:
        """One pass; returns how many transactions it finished."""
        done = 0
        now = self.clock()
        for txn, (coordinator, _ops, deadline) in list(self.state.prepared.items()):
            if now < deadline:
                continue
            try:
                d = await self.router.propose(coordinator, ["abort_undecided", txn])
                if d[0] != "ok":
                    continue
                await self.router.propose(self.group_id, ["decide", txn, bool(d[1])])
                done += 1
            except Exception as exc:  # noqa: BLE001 - try again next pass
                log.info("resolver %d: txn %s unresolved: %r", self.group_id, txn.hex(), exc)
        for txn, (commit, participants) in list(self.state.decisions.items()):
            first = self._seen_decisions.setdefault(txn, now)
            if now - first < self.grace:
                continue
            try:
                for g in participants:
                    await self.router.propose(g, ["decide", txn, bool(commit)])
                await self.router.propose(self.group_id, ["forget", txn])
                self._seen_decisions.pop(txn, None)
                done += 1
            except Exception as exc:  # noqa: BLE001 - try again next pass
                log.info("resolver %d: decision %s not delivered: %r", self.group_id,
                         txn.hex(), exc)
        return done

    async def run(self, is_leader) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if is_leader():
                await self.run_once()


def encode(command: list) -> bytes:
    return msgpack.packb(command)
