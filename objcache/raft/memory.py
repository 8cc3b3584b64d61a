"""In-memory stand-ins for unit tests of code above the Raft core: a
storage with RaftStorage's API (over the simulator's Disk model) and a
transport that delivers between RaftGroups of one process, with cuts.

Tests of the real thing use objcache.raft.storage and the RPC transport;
these exist to make driver and state-machine tests fast and deterministic.
"""
from __future__ import annotations

import asyncio

from .sim import Disk
from .types import ConfState, HardState, Message, Ready, Snapshot


class MemoryStorage:
    def __init__(self):
        self.disk: Disk | None = None
        self.saves = 0

    def restore_state(self, bootstrap: ConfState | None = None):
        if self.disk is None:
            self.disk = Disk(bootstrap or ConfState())
        return self.disk.restore_state()

    def snapshot(self) -> Snapshot | None:
        return self.disk.snapshot if self.disk else None

    async def save(self, hard_state: HardState | None, entries, snapshot) -> None:
        self.saves += 1
        self.disk.persist(Ready(hard_state=hard_state, entries=list(entries),
                                snapshot=snapshot), None)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        self.disk.save_snapshot(snapshot)

    async def close(self) -> None:
        pass


class LocalNetwork:
    """Routes messages between RaftGroups registered by (group, node)."""

    def __init__(self):
        self.groups: dict[tuple[int, int], object] = {}
        self.cut: set[tuple[int, int]] = set()      # (from node, to node)

    def register(self, group) -> None:
        self.groups[(group.group_id, group.node_id)] = group

    def unregister(self, group) -> None:
        self.groups.pop((group.group_id, group.node_id), None)

    def transport(self, node_id: int) -> "LocalTransport":
        return LocalTransport(self, node_id)

    def isolate(self, node: int, others) -> None:
        for o in others:
            if o != node:
                self.cut.update({(node, o), (o, node)})


class LocalTransport:
    def __init__(self, net: LocalNetwork, node_id: int):
        self.net = net
        self.node_id = node_id

    def send(self, group: int, messages: list[Message]) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            if (m.frm, m.to) in self.net.cut:
                continue
            target = self.net.groups.get((group, m.to))
            if target is not None:
                loop.call_soon(target.deliver, m)

    async def send_snapshot(self, group: int, message: Message) -> bool:
        if (message.frm, message.to) in self.net.cut:
            return False
        target = self.net.groups.get((group, message.to))
        if target is None:
            return False
        try:
            await target.accept_snapshot(message)
        except Exception:  # noqa: BLE001 - refused by the receiver: the core retries
            return False
        return True
