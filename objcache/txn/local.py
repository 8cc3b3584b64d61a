"""An in-process cluster of metadata groups for tests: G groups of R
RaftGroup replicas each (GroupState state machines), in-memory storage and
transport, and a GroupRouter that proposes through each group's leader.

Faults: ``stop_leader(g)`` (crash a replica, keep its storage for restart),
``restart(g, node)``, ``transfer(g)``; ``network.cut`` for partitions.
"""
from __future__ import annotations

import asyncio

import msgpack

from objcache.meta.state import GroupState
from objcache.raft.driver import GroupOptions, RaftGroup
from objcache.raft.memory import LocalNetwork, MemoryStorage
from objcache.raft.types import ConfState, NotLeader, ProposalDropped

FAST = GroupOptions(tick_seconds=0.01, election_ticks=10, snapshot_entries=200)


class LocalCluster:
    def __init__(self, groups: int = 3, replicas: int = 1, options: GroupOptions = FAST,
                 machine_factory=None, on_start=None):
        self.net = LocalNetwork()
        # machine_factory(group, node) -> state machine (default: GroupState);
        # on_start(group, node, raft_group) -> services for that replica.
        self.machine_factory = machine_factory or (lambda g, node: GroupState(g))
        self.on_start = on_start
        self.services: dict[tuple[int, int], object] = {}
        self.options = options
        self.replicas = replicas
        self.groups: dict[int, dict[int, RaftGroup]] = {}
        self.storages: dict[tuple[int, int], MemoryStorage] = {}
        self.group_ids = list(range(1, groups + 1))

    def _node_id(self, g: int, r: int) -> int:
        return g * 100 + r

    async def start(self) -> "LocalCluster":
        for g in self.group_ids:
            self.groups[g] = {}
            for r in range(1, self.replicas + 1):
                self.storages[(g, self._node_id(g, r))] = MemoryStorage()
            for r in range(1, self.replicas + 1):
                await self.restart(g, self._node_id(g, r))
        for g in self.group_ids:
            await self.leader(g)
        return self

    async def restart(self, g: int, node: int) -> RaftGroup:
        conf = ConfState(frozenset(self._node_id(g, r) for r in range(1, self.replicas + 1)))
        rg = RaftGroup(g, node, self.storages[(g, node)], self.machine_factory(g, node),
                       self.net.transport(node), self.options, bootstrap=conf)
        self.net.register(rg)
        self.groups[g][node] = rg
        await rg.start()
        if self.on_start is not None:
            self.services[(g, node)] = self.on_start(g, node, rg)
        return rg

    async def service(self, g: int):
        """The service object of group ``g``'s current leader."""
        rg = await self.leader(g)
        return self.services[(g, rg.node_id)]

    async def stop_replica(self, g: int, node: int) -> None:
        rg = self.groups[g].pop(node)
        self.net.unregister(rg)
        await rg.stop()

    async def leader(self, g: int, timeout: float = 5.0) -> RaftGroup:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for rg in self.groups[g].values():
                if rg.is_leader and not rg._stopping:
                    return rg
            if loop.time() > end:
                raise TimeoutError(f"group {g} has no leader")
            await asyncio.sleep(0.005)

    def state(self, g: int) -> GroupState:
        """The leader's state (for assertions; call after a read barrier)."""
        for rg in self.groups[g].values():
            if rg.is_leader:
                return _state(rg.sm)
        return _state(next(iter(self.groups[g].values())).sm)

    async def close(self) -> None:
        for g in list(self.groups):
            for node in list(self.groups[g]):
                await self.stop_replica(g, node)

    # GroupRouter
    async def read(self, group: int, request: list, timeout: float | None = 5.0) -> list:
        from objcache.meta.reads import serve
        rg = await self.leader(group, timeout or 5.0)
        await rg.read_barrier(timeout)
        return serve(_state(rg.sm), request)

    async def propose(self, group: int, command: list, timeout: float | None = 5.0) -> list:
        loop = asyncio.get_running_loop()
        end = loop.time() + (timeout or 30)
        data = msgpack.packb(command)
        while True:
            rg = await self.leader(group, max(0.01, end - loop.time()))
            try:
                return await rg.propose(data, max(0.01, end - loop.time()))
            except (NotLeader, ProposalDropped):
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.005)


def _state(sm) -> GroupState:
    return getattr(sm, "state", sm)
