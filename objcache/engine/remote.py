"""Reaching a group's leader from outside it: the chunk service over RPC
(ChunkProxy), and a leader-finding caller for processes that are not
cluster nodes (LeaderCaller: the cluster client's direct data path).

A *router* here is anything with ``at_leader(group, method, fields,
payload=None, timeout=...) -> (fields, payload)`` that delivers a call to
the group's current leader (following not-leader hints).
"""
from __future__ import annotations

import asyncio
import errno

from objcache.cluster.ring import StaleRing
from objcache.rpc import ClientPool, RemoteError, RpcError


async def call_member(pool: ClientPool, address: str, method: str, fields: dict, payload,
                      timeout: float):
    """One try at a group member: ``((fields, payload), None)`` when it
    answered as the leader, ``(None, hint)`` when it is not the leader
    (``hint``: the leader it knows, or 0/None), ``(None, None)`` when it
    could not be reached or is still starting ("not_ready": asked again
    within the caller's deadline). Any other remote error is raised."""
    host, _, port = address.rpartition(":")
    try:
        r = await pool.get(host, int(port)).call(method, fields, payload, timeout=timeout)
        return (r.fields, r.payload), None
    except RemoteError as exc:
        if exc.code not in ("not_leader", "not_ready"):
            raise
        return None, (exc.details or {}).get("leader")
    except RpcError:
        return None, None


class LeaderCaller:
    """``at_leader`` over a cluster map (node id -> "host:port", group ->
    member ids) for a process outside the cluster. ``refresh`` is awaited
    when a group's members can't be reached (the map may be stale).

    Calls carry the ring version ``ring_version()``; a ``stale_ring``
    answer hands its map to ``adopt`` and raises StaleRing (the caller
    placed keys with the old ring: place them again)."""

    def __init__(self, pool: ClientPool, refresh, ring_version=lambda: None,
                 adopt=lambda cluster: None):
        self.pool = pool
        self.refresh = refresh
        self.ring_version = ring_version
        self.adopt = adopt
        self.nodes: dict[int, str] = {}
        self.groups: dict[int, list[int]] = {}
        self.leader_hint: dict[int, int] = {}

    def set_map(self, cluster: dict) -> None:
        self.nodes = {int(k): v for k, v in cluster["nodes"].items()}
        self.groups = {int(k): list(v) for k, v in cluster["groups"].items()}

    async def at_leader(self, g: int, method: str, fields: dict, payload=None,
                        timeout: float = 30.0):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        tries = 0
        rv = self.ring_version()
        if rv is not None:
            fields = dict(fields, rv=rv)
        while True:
            members = self.groups.get(g, [])
            order = ([self.leader_hint[g]] if g in self.leader_hint else []) + members
            for target in order:
                addr = self.nodes.get(target)
                if addr is None:
                    continue
                try:
                    answer, hint = await call_member(self.pool, addr, method, fields, payload,
                                                     max(0.1, end - loop.time()))
                except RemoteError as exc:
                    if exc.code != "stale_ring":
                        raise
                    cluster = (exc.details or {}).get("cluster")
                    if cluster:
                        self.adopt(cluster)
                    else:
                        await self.refresh()
                    raise StaleRing(f"group {g}: ring v{rv} is stale") from None
                if answer is not None:
                    self.leader_hint[g] = target
                    return answer
                if hint:
                    self.leader_hint[g] = hint
                else:
                    self.leader_hint.pop(g, None)
            if loop.time() > end:
                raise OSError(errno.ETIMEDOUT, f"no leader of group {g} answered")
            tries += 1
            if tries % 3 == 0:
                await self.refresh()
            await asyncio.sleep(min(0.5, 0.02 * tries))


class ChunkProxy:
    """ChunkService's methods over RPC to the group's leader (``router``:
    see the module docstring)."""
    ranged = True               # read(..., want=(lo, hi)) moves only that range

    def __init__(self, router, group: int):
        self.router = router
        self.group = group

    async def read(self, inode, index, version, *, s3, from_bucket, size, ahead=None, base=-1,
                   want: tuple[int, int] | None = None):
        """``want``: only bytes [lo, hi) of the chunk travel (the view's
        ``start`` is then lo)."""
        fields = {"g": self.group, "i": inode, "x": index, "v": version, "s3": s3,
                  "b": from_bucket, "n": size, "a": ahead, "base": base}
        if want is not None:
            fields["r"] = list(want)
        fields, payload = await self.router.at_leader(self.group, "chunk.read", fields)
        if fields.get("none"):
            return None
        return RemoteBytes(payload if payload is not None else b"",
                           want[0] if want is not None else 0)

    async def write(self, inode, index, offset, data, *, epoch_base, s3, s3_size):
        fields, _ = await self.router.at_leader(
            self.group, "chunk.write", {"g": self.group, "i": inode, "x": index, "o": offset,
                                        "e": epoch_base, "s3": s3, "n": s3_size}, data)
        return fields["v"]


class RemoteBytes:
    """A ChunkView look-alike for data that arrived over RPC."""
    __slots__ = ("data", "length", "start")
    owned = True                # the buffer belongs to the receiver (no pin)

    def __init__(self, data, start: int = 0):
        self.data = memoryview(data)
        self.length = len(self.data)
        self.start = start      # chunk offset of data[0]

    def release(self):
        pass
