"""Many Raft groups in one process, talking to peers over the RPC layer.

``RaftHost`` owns the transport of every ``RaftGroup`` on a node:

* outgoing messages go to a bounded queue per peer, drained by one sender
  task per peer: whatever is queued goes out as one batched
  ``notify("raft.msg")`` (one-way, respects RPC backpressure). When a queue is full the oldest messages are dropped and
  counted: Raft retransmits, and an unbounded queue to a dead peer would
  grow without limit.
* snapshots go as a ``call("raft.snap")`` with the data as the payload, so
  the sender learns the outcome and reports it to the core (the driver's
  contract for SNAP messages).
* incoming ``raft.msg``/``raft.snap`` frames are decoded (codec.py) and
  delivered to the addressed group; malformed ones are dropped with one log
  line each, never raised into the RPC layer as anything but BadRequest.

Node addresses come from an address book (node id -> (host, port)) that the
cluster layer keeps current; unknown destinations are dropped. Every
batched frame also names its sender and the address it serves on
(``advertise``), and the receiver records it: a node added to a group can
be answered by every member as soon as it has spoken, without waiting for
the membership map to reach them (which may need the very group whose
election is in progress).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

from objcache.rpc import BadRequest, ClientPool, RpcError

from . import codec
from .driver import RaftGroup
from .types import Message

log = logging.getLogger(__name__)

MSG_METHOD = "raft.msg"
_BATCH_BYTES = 4 << 20          # payload bytes per batched frame
SNAP_METHOD = "raft.snap"


def _join(buffers: list) -> bytes | memoryview | None:
    if not buffers:
        return None
    if len(buffers) == 1:
        return buffers[0]
    return b"".join(buffers)


class _PeerQueue:
    __slots__ = ("messages", "wake", "task", "dropped")

    def __init__(self):
        self.messages: deque[tuple[int, Message]] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.dropped = 0


class RaftHost:
    def __init__(self, node_id: int, pool: ClientPool,
                 addresses: dict[int, tuple[str, int]] | None = None, *,
                 max_queued: int = 4096, snapshot_timeout: float = 300.0):
        self.node_id = node_id
        self.pool = pool
        self.addresses: dict[int, tuple[str, int]] = dict(addresses or {})
        self.groups: dict[int, RaftGroup] = {}
        self.max_queued = max_queued
        self.snapshot_timeout = snapshot_timeout
        self._peers: dict[int, _PeerQueue] = {}
        self._closed = False
        self.advertise: str | None = None               # "host:port" sent with frames
        self.stats = {"sent": 0, "dropped": 0, "received": 0, "malformed": 0}

    # -- wiring ------------------------------------------------------------

    def handlers(self) -> dict:
        """RPC handlers to register on the node's server."""
        return {MSG_METHOD: self._on_msg, SNAP_METHOD: self._on_snap}

    def add_group(self, group: RaftGroup) -> None:
        self.groups[group.group_id] = group

    def remove_group(self, group_id: int) -> None:
        self.groups.pop(group_id, None)

    def set_address(self, node_id: int, host: str, port: int) -> None:
        self.addresses[node_id] = (host, port)

    # -- Transport (used by RaftGroup) --------------------------------------

    def send(self, group: int, messages: list[Message]) -> None:
        if self._closed:
            return
        for m in messages:
            peer = self._peers.get(m.to)
            if peer is None:
                if m.to not in self.addresses:
                    self.stats["dropped"] += 1
                    continue
                peer = self._peers[m.to] = _PeerQueue()
                peer.task = asyncio.create_task(self._sender(m.to, peer),
                                                name=f"raft-send-{m.to}")
            if len(peer.messages) >= self.max_queued:
                peer.messages.popleft()
                peer.dropped += 1
                self.stats["dropped"] += 1
            peer.messages.append((group, m))
            peer.wake.set()

    async def send_snapshot(self, group: int, message: Message) -> bool:
        addr = self.addresses.get(message.to)
        if addr is None:
            return False
        header, buffers = codec.encode(message)
        try:
            await self.pool.get(*addr).call(SNAP_METHOD, {"g": group, "h": header},
                                            _join(buffers), timeout=self.snapshot_timeout)
            return True
        except (RpcError, OSError, asyncio.TimeoutError) as exc:
            log.warning("snapshot for group %d to node %d failed: %r", group,
                        message.to, exc)
            return False

    async def _sender(self, to: int, peer: _PeerQueue) -> None:
        """Drain ``peer``'s queue: everything queued goes out as ONE frame
        (a batch of messages, up to ``_BATCH_BYTES`` of payload), so a
        Ready's worth of messages costs one RPC frame, not one each."""
        while not self._closed:
            if not peer.messages:
                peer.wake.clear()
                await peer.wake.wait()
                continue
            addr = self.addresses.get(to)
            if addr is None:
                peer.messages.clear()
                continue
            batch, buffers, size = [], [], 0
            while peer.messages and size < _BATCH_BYTES:
                group, m = peer.messages.popleft()
                header, bufs = codec.encode(m)
                n = sum(len(b) for b in bufs)
                batch.append((group, header, n))
                buffers.extend(bufs)
                size += n
            try:
                fields = {"b": batch}
                if self.advertise:
                    fields["f"], fields["a"] = self.node_id, self.advertise
                await self.pool.get(*addr).notify(MSG_METHOD, fields, _join(buffers))
                self.stats["sent"] += len(batch)
            except (RpcError, OSError, asyncio.TimeoutError):
                # The peer is unreachable: drop what is queued for it (Raft
                # retransmits once it answers again) and let the client's
                # reconnect backoff pace the next attempt.
                self.stats["dropped"] += len(batch) + len(peer.messages)
                peer.messages.clear()
                for group in {g for g, _, _ in batch}:
                    g = self.groups.get(group)
                    if g is not None:
                        g.report_unreachable(to)

    # -- receiving ----------------------------------------------------------

    def _malformed(self, why) -> BadRequest:
        self.stats["malformed"] += 1
        log.warning("dropping a malformed raft message: %s", why)
        return BadRequest(f"malformed raft message: {why}")

    def _decode_one(self, gid, header, payload) -> tuple[RaftGroup, Message] | None:
        try:
            m = codec.decode(header, payload)
        except codec.MalformedMessage as exc:
            raise self._malformed(exc) from None
        group = self.groups.get(gid)
        if group is None or m.to != self.node_id:
            return None
        self.stats["received"] += 1
        return group, m

    async def _on_msg(self, ctx, fields, payload):
        batch = fields.get("b")
        if not isinstance(batch, list):
            raise self._malformed("no message batch")
        self._learn_address(fields.get("f"), fields.get("a"))
        view = memoryview(payload if payload is not None else b"")
        pos = 0
        for item in batch:
            if not (isinstance(item, list) and len(item) == 3
                    and type(item[2]) is int and 0 <= item[2] <= len(view) - pos):
                raise self._malformed("bad batch item")
            gid, header, n = item
            got = self._decode_one(gid, header, view[pos:pos + n])
            pos += n
            if got is not None:
                got[0].deliver(got[1])
        if pos != len(view):
            raise self._malformed("payload longer than the batch")

    def _learn_address(self, node, address) -> None:
        if type(node) is not int or not isinstance(address, str) or node == self.node_id:
            return
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            return
        if self.addresses.get(node) != (host, int(port)):
            self.addresses[node] = (host, int(port))

    async def _on_snap(self, ctx, fields, payload):
        got = self._decode_one(fields.get("g"), fields.get("h"), payload)
        if got is None:
            raise BadRequest("no such raft group here")
        await got[0].accept_snapshot(got[1])
        return {}

    async def close(self) -> None:
        self._closed = True
        for peer in self._peers.values():
            if peer.task is not None:
                peer.task.cancel()
        for peer in self._peers.values():
            if peer.task is not None:
                try:
                    await peer.task
                except BaseException:  # noqa: BLE001 - shutting down
                    pass
        self._peers.clear()
