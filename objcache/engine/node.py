"""An objcache node (``objcache server``): one replica of one group, the
group's chunk cache, and the services every node offers over RPC.

Identity: ``DATA_DIR/node.json`` holds (node id, group id, cluster id) once
the node has joined; a restarted node comes back as itself. The first node
(no ``--join``) bootstraps the cluster: node 1 in group 1, the root group,
which also replicates the membership. Others ask any node to join
(``cluster.join``); the root group assigns a node id and a group: a new
group (the node bootstraps it alone) or a place in the newest group that
has fewer than ``--replicas`` members. A node placed in an existing group
starts its replica empty and asks the group's leader to add it
(``group.add_member``: as a learner until it has caught up, then as a
voter — one single-server change at a time); ``start`` returns once it is
a voter, so "serving" means the node holds a full replica.

Services (RPC methods):
  raft.*                  Raft messages between replicas (raft/host.py)
  group.propose/read      propose to / read from a group this node leads
  chunk.read/write        the data path at a chunk owner (engine/data.py)
  meta.*                  namespace operations (any node coordinates)
  data.read/write/flush   file I/O for clients (any node)
  cluster.*               join, membership, status, drain

Routing: ``NodeRouter`` reaches any group's leader: locally when this node
leads it, else over RPC to a member (following not-leader hints).
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time

import msgpack

from objcache.backend.base import normalize_prefix
from objcache.backend.s3 import S3Store
from objcache.cache import ChunkCache
from objcache.fsutil import fsync_dir
from objcache.ipc import socket_path
from objcache.ipc.server import LocalReadServer
from objcache.cluster.ring import Ring, StaleRing, ring_version
from objcache.meta.model import Inode
from objcache.meta.namespace import ORPHAN_LEASE, Namespace
from objcache.meta.reads import serve as serve_read
from objcache.raft.driver import GroupOptions, RaftGroup
from objcache.raft.host import RaftHost
from objcache.raft.storage import RaftStorage
from objcache.raft.types import (ConfChange, ConfChangeType, ConfState, NotLeader,
                                 ProposalDropped)
from objcache.rpc import ClientPool, HandlerError, RemoteError, RpcError, RpcServer
from objcache.txn.coordinator import Coordinator, Resolver

from .data import ChunkService, DataClient
from .machine import GroupMachine
from .remote import ChunkProxy, call_member
from .spill import Spiller
from .writeback import WriteBack

log = logging.getLogger(__name__)

ROOT_GROUP = 1
JOIN_WAIT = 120.0       # seconds a joining node waits for the node it joins to answer


class NodeConfig:
    def __init__(self, data_dir: str, listen: tuple[str, int], bucket: str, prefix: str = "",
                 *, endpoint_url: str | None = None, join: tuple[str, int] | None = None,
                 replicas: int = 1, cache_size: int = 4 << 30, memory_fraction: float = 0.25,
                 chunk_size: int = 8 << 20, secret: bytes = b"", writeback_delay: float = 5.0,
                 tick_seconds: float = 0.05, advertise: str | None = None,
                 ipc_dir: str | None = None):
        if chunk_size < (5 << 20) and chunk_size & (chunk_size - 1):
            raise ValueError("chunk size must be >= 5 MiB or a power of two (tests)")
        self.data_dir = data_dir
        self.listen = listen
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.join = join
        self.replicas = replicas
        self.cache_size = cache_size
        self.memory_fraction = memory_fraction
        self.chunk_size = chunk_size
        self.secret = secret
        self.writeback_delay = writeback_delay
        self.tick_seconds = tick_seconds
        self.advertise = advertise
        # Local zero-copy reads (objcache/ipc): the socket's directory;
        # None: the default (ipc.ipc_dir()); "": no local reads.
        self.ipc_dir = ipc_dir


def _addr(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def _errno(handler):
    """Client-facing handlers answer OSError as an "errno" error (the
    client raises it as the same OSError)."""
    async def wrapped(ctx, fields, payload):
        try:
            return await handler(ctx, fields, payload)
        except OSError as exc:
            raise HandlerError("errno", exc.strerror or str(exc) or type(exc).__name__,
                               {"errno": exc.errno or errno.EIO}) from None
        except RemoteError as exc:
            if exc.code != "errno":             # an owner's errno passes through
                raise
            raise HandlerError("errno", exc.message, exc.details) from None
    return wrapped


def _chunk_handler(handler):
    """The data path at an owner, called by clients directly: OSError as an
    "errno" error (like ``_errno``), and a leadership lost meanwhile as
    "not_leader" (the caller retries at the new leader; a write applied
    twice writes the same bytes, and the caller keeps the later version)."""
    handler = _errno(handler)

    async def wrapped(ctx, fields, payload):
        try:
            return await handler(ctx, fields, payload)
        except (NotLeader, ProposalDropped) as exc:
            raise HandlerError("not_leader", str(exc),
                               {"leader": getattr(exc, "leader", 0)}) from None
    return wrapped


# Requests addressed to a group by id, not placed by the ring (their target
# is valid under any ring): the transaction protocol's records after the
# prepare, membership, inode counters, per-group queries. Everything else
# sent to a group was placed there by this node's ring.
UNPLACED_COMMANDS = frozenset({"coord", "decide", "forget", "abort_undecided", "join",
                               "freeze", "readdress", "reserve"})
UNPLACED_READS = frozenset({"cluster", "counter", "sources", "orphans", "pending"})


class NodeRouter:
    """GroupRouter over the cluster: propose/read at any group's leader.

    Remote calls carry this node's ring version ("rv"). A receiver with a
    newer ring answers ``stale_ring`` with its map: the router adopts it
    and, for a request the ring placed, raises StaleRing (the caller places
    the keys again; the Node's handlers retry the whole operation); a
    request addressed by group id is simply sent again."""

    def __init__(self, node: "Node"):
        self.node = node
        self.leader_hint: dict[int, int] = {}

    def _members(self, g: int) -> list[int]:
        return list(self.node.cluster["groups"].get(g, []))

    async def at_leader(self, g: int, method: str, fields: dict, payload=None,
                         timeout: float = 10.0, placed: bool = True):
        node = self.node
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        members = self._members(g)
        if not members:
            raise OSError(errno.EHOSTUNREACH, f"group {g} is unknown")
        order = ([self.leader_hint[g]] if g in self.leader_hint else []) + members
        i = 0
        while True:
            target = order[i % len(order)]
            i += 1
            if target == node.node_id:
                handler = node.local_handlers[method]
                try:
                    result = await handler(None, fields, payload)
                    if isinstance(result, tuple):
                        return result[0], result[1]
                    return result or {}, None
                except HandlerError as exc:
                    if exc.code not in ("not_leader", "not_ready"):
                        raise RemoteError(exc.code, str(exc), details=exc.details) from None
                    hint = (exc.details or {}).get("leader")
            else:
                addr = node.cluster["nodes"].get(target)
                if addr is None and target in node.host.addresses:
                    addr = "%s:%d" % node.host.addresses[target]
                if addr is None:
                    # Not in our (stale) map yet: try the others; the map
                    # refreshes every second.
                    if loop.time() > end:
                        raise OSError(errno.ETIMEDOUT, f"no leader of group {g} answered")
                    if i % len(order) == 0:
                        await asyncio.sleep(0.02)
                    continue
                try:
                    answer, hint = await call_member(
                        node.pool, addr, method, dict(fields, rv=node.ring().version),
                        payload, max(0.1, end - loop.time()))
                except RemoteError as exc:
                    if exc.code != "stale_ring":
                        raise
                    mine = node.ring().version
                    node.adopt_cluster((exc.details or {}).get("cluster"))
                    if placed:
                        raise StaleRing(f"group {g}: ring v{mine} is stale "
                                        f"(now v{node.ring().version})") from None
                    continue
                if answer is not None:
                    self.leader_hint[g] = target
                    return answer
            if hint:
                order.insert(i, hint)
                self.leader_hint[g] = hint
            if loop.time() > end:
                raise OSError(errno.ETIMEDOUT, f"no leader of group {g} answered")
            if i % len(order) == 0:
                await asyncio.sleep(0.02)

    async def propose(self, group: int, command: list, timeout: float | None = 10.0) -> list:
        fields, _ = await self.at_leader(group, "group.propose",
                                          {"g": group, "c": msgpack.packb(command)},
                                          timeout=timeout or 10.0,
                                          placed=command[0] not in UNPLACED_COMMANDS)
        return fields["r"]

    async def read(self, group: int, request: list, timeout: float | None = 10.0) -> list:
        _, payload = await self.at_leader(group, "group.read", {"g": group, "q": request},
                                           timeout=timeout or 10.0,
                                           placed=request[0] not in UNPLACED_READS)
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)

    async def service(self, group: int):
        """The chunk service of ``group``'s leader (local object or proxy)."""
        node = self.node
        if group == node.group_id and node.group.is_leader:
            return node.chunks
        return ChunkProxy(self, group)


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.node_id = 0
        self.group_id = 0
        self.cluster: dict = {"nodes": {}, "groups": {}, "ring": [], "version": 0}
        self._ring: Ring | None = None
        self._tasks: list[asyncio.Task] = []
        self.started = time.time()
        # The RPC server answers from the start (Raft messages, joins, this
        # node's own group requests during start-up); everything that needs
        # the started node answers "not_ready" until start() has finished.
        self.ready = False

    # ------------------------------------------------------------ identity

    @property
    def address(self) -> str:
        return self.cfg.advertise or f"{self.cfg.listen[0]}:{self.server.port}"

    def _identity_path(self) -> str:
        return os.path.join(self.cfg.data_dir, "node.json")

    def _load_identity(self) -> dict | None:
        try:
            with open(self._identity_path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _save_identity(self, ident: dict) -> None:
        tmp = self._identity_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(ident, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._identity_path())
        fsync_dir(self.cfg.data_dir)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.cfg
        if not 1 <= cfg.replicas <= 7:
            raise ValueError(f"--replicas must be between 1 and 7, not {cfg.replicas}")
        os.makedirs(cfg.data_dir, exist_ok=True)
        self.pool = ClientPool(cfg.secret, connect_timeout=2.0, backoff_max=1.0,
                               max_payload=1 << 30)
        self.router = NodeRouter(self)
        self.host = RaftHost(0, self.pool)
        handlers = self._handlers()
        self.local_handlers = handlers
        self.server = RpcServer(handlers, cfg.secret, max_payload=1 << 30)
        await self.server.start(*cfg.listen)
        ident = self._load_identity()
        if ident is None:
            ident = await self._join()
            self._save_identity(ident)
        self.node_id, self.group_id = ident["node"], ident["group"]
        self.host.node_id = self.node_id
        self.host.advertise = self.address
        members = ident["members"]
        self.store = S3Store(cfg.bucket, cfg.prefix, endpoint_url=cfg.endpoint_url)
        mem = max(cfg.chunk_size * 4, int(cfg.cache_size * cfg.memory_fraction))
        mem -= mem % cfg.chunk_size
        self.cache = ChunkCache(os.path.join(cfg.data_dir, "cache"), memory_bytes=mem,
                                disk_bytes=max(cfg.chunk_size * 8, cfg.cache_size - mem),
                                chunk_size=cfg.chunk_size)
        await self.cache.open()
        # 16 MiB segments: compaction deletes whole segments, so the log on
        # disk stays within about two snapshots' worth of entries plus one
        # segment (GroupOptions.snapshot_bytes; docs/storage-engine.md).
        self.storage = await RaftStorage.open(os.path.join(cfg.data_dir, "raft",
                                                           f"g{self.group_id}"),
                                              segment_bytes=16 << 20)
        self.machine = GroupMachine(self.group_id, self.cache, cfg.chunk_size,
                                    fetch_chunk=self._fetch_chunk, store=self.store)
        opts = GroupOptions(tick_seconds=cfg.tick_seconds)
        # A group is bootstrapped by its first member alone, so every
        # replica's log starts from the membership {first member}: later
        # members start from that too (not promotable: they never campaign)
        # and learn the rest from the conf changes in the log as the leader
        # adds them (_become_member).
        first = members[0] == self.node_id
        self.group = RaftGroup(self.group_id, self.node_id, self.storage, self.machine,
                               self.host, opts, bootstrap=ConfState(frozenset([members[0]])))
        self.host.add_group(self.group)
        if ident.get("cluster"):
            self._set_cluster(ident["cluster"])
        await self.group.start()
        last_at_start = self.group.core.log.last_index()
        if not first:
            await self._become_member()
        if ident.get("bootstrap") and self.group_id == ROOT_GROUP:
            await self.group.wait_leader(30)
            r = await self.router.propose(ROOT_GROUP, ["join", self.address, cfg.replicas])
            if r[0] != "ok":
                raise RuntimeError(f"bootstrap failed: {r}")
            ident["bootstrap"] = False              # recorded in the root group now
            self._save_identity(ident)
        self.spiller = Spiller(self.group, self.store, cfg.chunk_size,
                               owner_of=lambda key: self.ring().chunk_owner(*key))
        self.chunks = ChunkService(self.group, self.store, cfg.chunk_size,
                                   spiller=self.spiller)
        self.local_reads = None
        path = socket_path(self.address, cfg.ipc_dir) if cfg.ipc_dir != "" else None
        if path is not None:
            server = LocalReadServer(path, cfg.secret, self.cache.arena, self._local_read,
                                     node_id=self.node_id)
            try:
                await server.start()
                self.local_reads = server
            except OSError as exc:                  # e.g. no permission for the directory
                log.warning("no local zero-copy reads: %s: %s", path, exc)
        self.data = DataClient(self.router.service, self.ring, self.router, cfg.chunk_size)
        self.coordinator = Coordinator(self.router)
        self.ns = Namespace(self.router, self.ring, self.store, coordinator=self.coordinator,
                            default_uid=os.getuid(), default_gid=os.getgid())
        self.writeback = WriteBack(self.group, self.store, self.data, self.router,
                                   chunk_size=cfg.chunk_size, delay=cfg.writeback_delay,
                                   namespace=self.ns, current_ring=self.current_ring)
        self.resolver = Resolver(self.group_id, self.machine.state, self.router)
        await self.refresh_cluster()
        if self.cluster["nodes"].get(self.node_id) != self.address:
            # Restarted on another address (a new port, a new pod IP).
            r = await self.router.propose(ROOT_GROUP, ["readdress", self.node_id, self.address])
            if r[0] != "ok":
                raise RuntimeError(f"recording this node's new address failed: {r}")
            await self.refresh_cluster()
        self._tasks = [asyncio.create_task(self._reconcile_cache(last_at_start),
                                           name="cache-reconcile"),
                       asyncio.create_task(self._refresh_loop(), name="cluster-refresh"),
                       asyncio.create_task(self.writeback.run(), name="write-back"),
                       asyncio.create_task(self.spiller.run(), name="spill"),
                       asyncio.create_task(self.resolver.run(lambda: self.group.is_leader),
                                           name="txn-resolver")]
        self._root_ready = False
        self.ready = True

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - shutting down
                pass
        if getattr(self, "local_reads", None) is not None:
            await self.local_reads.close()          # releases its pins before the cache closes
        await self.server.close()
        await self.group.stop()
        await self.host.close()
        await self.pool.close()
        await self.storage.close()
        await self.cache.close()
        await self.store.close()

    async def _reconcile_cache(self, last_at_start: int, timeout: float = 300.0) -> None:
        """Once this replica has applied its log as it was at start, drop
        dirty cache files a crash brought back (GroupMachine.reconcile).
        If the log's tail at start was never committed (a new leader
        replaced it) and nothing else commits, applied may stay short of
        it: then nothing is reconciled this run (logged)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.group.applied < last_at_start:
            if loop.time() > end:
                log.info("cache reconciliation skipped: applied %d of the %d entries "
                         "logged at start", self.group.applied, last_at_start)
                return
            await asyncio.sleep(0.05)
        n = self.machine.reconcile()
        if n:
            log.warning("discarded %d dirty cache versions no chunk record references "
                        "(removals a crash undid)", n)

    async def _become_member(self, timeout: float = 120.0) -> None:
        """Until this replica is a voter of its group: ask the leader."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        delay = 0.05
        while self.node_id not in self.group.core.conf.voters:
            try:
                await self.router.at_leader(self.group_id, "group.add_member",
                                             {"g": self.group_id, "node": self.node_id,
                                              "address": self.address},
                                             timeout=max(1.0, end - loop.time()))
            except (OSError, RpcError, RemoteError) as exc:
                if loop.time() > end:
                    raise RuntimeError(f"could not join group {self.group_id}: {exc!r}") from None
                log.info("joining group %d: %r; retrying", self.group_id, exc)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            if self.node_id not in self.group.core.conf.voters:
                # The leader committed the change; our replica learns it
                # with the next append (wait for it, briefly).
                await asyncio.sleep(0.05)
                if loop.time() > end:
                    raise RuntimeError(f"group {self.group_id} did not take node "
                                       f"{self.node_id} in")

    async def _join(self) -> dict:
        cfg = self.cfg
        if cfg.join is None:
            return {"node": 1, "group": ROOT_GROUP, "members": [1], "bootstrap": True,
                    "cluster": {"nodes": {1: f"{cfg.listen[0]}:{self.server.port}"},
                                "groups": {1: [1]}, "ring": [1], "version": 0}}
        # The node to join may not be up yet (pods start in any order):
        # wait for it, up to JOIN_WAIT seconds; a refusal is final.
        client = self.pool.get(*cfg.join)
        loop = asyncio.get_running_loop()
        end = loop.time() + JOIN_WAIT
        delay = 0.1
        while True:
            try:
                r = await client.call("cluster.join", {"address": self.address,
                                                       "replicas": cfg.replicas}, timeout=30)
                break
            except RemoteError as exc:
                if exc.code != "not_ready" or loop.time() + delay > end:
                    raise
            except (RpcError, OSError) as exc:
                if loop.time() + delay > end:
                    raise
                log.info("joining %s:%d: %s; trying again", *cfg.join, exc)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
        f = r.fields
        return {"node": f["node"], "group": f["group"], "members": f["members"],
                "cluster": f["cluster"]}

    # ------------------------------------------------------------ cluster map

    def _set_cluster(self, c: dict) -> None:
        c = dict(c)
        c["nodes"] = {int(k): v for k, v in c["nodes"].items()}
        c["groups"] = {int(k): list(v) for k, v in c["groups"].items()}
        if c.get("version", 0) < self.cluster.get("version", -1) and self.cluster["nodes"]:
            return
        old = self.cluster
        self.cluster = c
        if c["ring"] != old.get("ring") or c["version"] != old.get("version") \
                or self._ring is None:
            # Building a ring (many points per group) costs milliseconds:
            # not once a second for an unchanged map.
            self._ring = Ring(c["ring"] or [ROOT_GROUP], version=ring_version(c))
        for nid, addr in c["nodes"].items():
            self.host.set_address(nid, *_addr(addr))

    def adopt_cluster(self, c: dict | None) -> None:
        """A map a peer sent (with a stale_ring answer): kept if newer."""
        if c and ring_version(c) >= self._ring.version:
            self._set_cluster(c)

    def ring(self) -> Ring:
        return self._ring

    async def check_ring(self, fields: dict, owner: tuple[int, int] | None = None) -> None:
        """A request's ring version ("rv") against ours: a newer one makes
        us refresh first (the membership group has it); an older one is
        answered ``stale_ring`` with our map, before anything is done.
        ``owner``: the (inode, chunk) key the request names; it must be
        this node's group's under the ring both sides agree on."""
        rv = fields.get("rv")
        if rv is None:
            return                                  # an operator tool, a test
        if self._ring is None:
            raise self.not_ready()
        if rv > self._ring.version:
            await self.refresh_cluster()
        if rv < self._ring.version:
            raise HandlerError("stale_ring", f"ring v{rv} is stale: v{self._ring.version}",
                               {"cluster": self.cluster})
        if owner is not None and self._ring.chunk_owner(*owner) != self.group_id:
            raise HandlerError("stale_ring", f"chunk {owner} is group "
                                             f"{self._ring.chunk_owner(*owner)}'s, not "
                                             f"{self.group_id}'s (ring v{rv})",
                               {"cluster": self.cluster})

    async def current_ring(self) -> Ring:
        """The ring as the membership group has it now (a linearizable
        read), not this node's copy, which is refreshed once a second."""
        r = await self.router.read(ROOT_GROUP, ["cluster"], timeout=5)
        if r[0] != "ok":
            raise OSError(r[1], f"cluster map: {r[2]}")
        return Ring(r[1]["ring"] or [ROOT_GROUP], version=ring_version(r[1]))

    async def refresh_cluster(self) -> None:
        try:
            r = await self.router.read(ROOT_GROUP, ["cluster"], timeout=5)
            if r[0] == "ok":
                self._set_cluster(r[1])
        except Exception as exc:  # noqa: BLE001 - keep the last known map
            log.debug("cluster refresh failed: %r", exc)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.refresh_cluster()

    async def ensure_root(self) -> None:
        if self._root_ready:
            return
        r = await self.router.propose(ROOT_GROUP, ["freeze"])
        await self.refresh_cluster()
        await self.ns.ensure_root()
        self._root_ready = r[0] == "ok"

    # ------------------------------------------------------------ handlers

    def _handlers(self) -> dict:
        h = {}
        h.update({"group.propose": self._h_propose, "group.read": self._h_read,
                  "cluster.drain": self._h_drain,
                  "cluster.flush_group": self._h_flush_group,
                  "group.add_member": self._h_add_member})
        for name in ("getattr", "lookup", "readdir", "readdir_plus", "create", "mkdir", "symlink", "unlink",
                     "rmdir", "rename", "link", "setattr", "open", "forget",
                     "forget_orphans", "renew_orphans"):
            h["meta." + name] = self._meta_handler(name)
        h.update({"data.read": _errno(self._retry_stale(self._h_data_read)),
                  "data.write": _errno(self._retry_stale(self._h_data_write)),
                  "data.flush": _errno(self._retry_stale(self._h_data_flush)),
                  "data.fsync": _errno(self._retry_stale(self._h_data_fsync))})
        h = {name: self._ring_checked(fn) for name, fn in h.items()}
        # The data path checks the ring itself, with the chunk it names
        # (check_ring's owner), once per request.
        h.update({"chunk.read": _chunk_handler(self._h_chunk_read),
                  "chunk.write": _chunk_handler(self._h_chunk_write)})
        # Needs the started node (namespace, data path, write-back).
        h = {name: (fn if name.startswith("group.") else self._when_ready(fn))
             for name, fn in h.items()}
        # Not ring-versioned: membership and maps (how a stale sender gets
        # a new ring), status, and Raft's own messages (terms order them)
        # with the chunk fetches of a snapshot install.
        h.update({"raft.chunk": self._h_raft_chunk})
        h.update({"cluster.join": self._h_join, "cluster.map": self._h_map,
                  "cluster.status": self._h_status,
                  "cluster.node_status": self._h_node_status})
        h.update(self.host.handlers())
        return h

    def not_ready(self) -> HandlerError:
        """The answer of a node still starting: retryable (callers ask
        again, or another node, within their deadline)."""
        who = f"node {self.node_id}" if self.node_id else "this node"
        return HandlerError("not_ready", f"{who} is starting and not ready yet")

    def _when_ready(self, handler):
        async def wrapped(ctx, fields, payload):
            if not self.ready:
                raise self.not_ready()
            return await handler(ctx, fields, payload)
        return wrapped

    def _ring_checked(self, handler):
        """Answer ``stale_ring`` to a sender with an older ring, before the
        handler runs (check_ring)."""
        async def wrapped(ctx, fields, payload):
            if "rv" in fields:
                await self.check_ring(fields)
            return await handler(ctx, fields, payload)
        return wrapped

    def _retry_stale(self, handler, attempts: int = 3):
        """A client operation this node coordinates: when a group tells us
        our ring was stale (we adopted the new one), run it again — the
        refused request changed nothing, and the operation places its keys
        anew."""
        async def wrapped(ctx, fields, payload):
            for attempt in range(attempts):
                try:
                    return await handler(ctx, fields, payload)
                except StaleRing:
                    if attempt == attempts - 1:
                        raise
                    log.info("ring changed under a client operation; retrying")
        return wrapped

    def _local_group(self, g: int):
        if g != self.group_id or not getattr(self, "group", None):
            raise HandlerError("not_leader", f"group {g} is not on node {self.node_id}",
                               {"leader": 0})
        if not self.group.is_leader:
            raise HandlerError("not_leader", "not the leader", {"leader": self.group.leader})
        return self.group

    async def _h_propose(self, ctx, fields, payload):
        grp = self._local_group(fields["g"])
        try:
            r = await grp.propose(bytes(fields["c"]), timeout=10)
        except NotLeader as exc:
            raise HandlerError("not_leader", str(exc), {"leader": exc.leader}) from None
        except ProposalDropped as exc:
            raise HandlerError("not_leader", str(exc), {"leader": 0}) from None
        return {"r": r}

    async def _h_add_member(self, ctx, fields, payload):
        """Leader: add a node to this group — as a learner, then, once its
        log has caught up with the commit index seen at that point, as a
        voter (so that the group never waits for an empty replica to
        commit). Idempotent: a node already a voter is done."""
        grp = self._local_group(fields["g"])
        nid = int(fields["node"])
        self.host.set_address(nid, *_addr(fields["address"]))
        loop = asyncio.get_running_loop()
        end = loop.time() + 60
        try:
            if nid in grp.core.conf.voters:
                return {}
            if nid not in grp.core.conf.learners:
                await grp.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, nid),
                                              timeout=10)
            target = grp.core.log.committed
            while (grp.peer_match(nid) or 0) < target:
                if loop.time() > end or not grp.is_leader:
                    raise HandlerError("not_leader" if not grp.is_leader else "timeout",
                                       f"node {nid} did not catch up",
                                       {"leader": grp.leader})
                await asyncio.sleep(0.02)
            await grp.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, nid), timeout=10)
        except (NotLeader, ProposalDropped) as exc:
            raise HandlerError("not_leader", str(exc), {"leader": getattr(exc, "leader", 0)}) \
                from None
        except asyncio.TimeoutError:
            raise HandlerError("timeout", f"adding node {nid} timed out") from None
        return {}

    async def _h_read(self, ctx, fields, payload):
        grp = self._local_group(fields["g"])
        try:
            await grp.read_barrier(timeout=5)
        except NotLeader as exc:
            raise HandlerError("not_leader", str(exc), {"leader": exc.leader}) from None
        # The answer is the payload: a listing can pass the 1 MiB header limit.
        return {}, msgpack.packb(serve_read(self.machine.state, fields["q"]))

    async def _h_chunk_read(self, ctx, fields, payload):
        self._local_group(fields["g"])
        await self.check_ring(fields, (fields["i"], fields["x"]))
        view = await self.chunks.read(fields["i"], fields["x"], fields["v"], s3=fields["s3"],
                                      from_bucket=fields["b"], size=fields["n"],
                                      ahead=fields.get("a"), base=fields.get("base", -1))
        if view is None:
            return {"none": True}
        # No copy: the slice keeps the page pinned until the transport has
        # sent it and dropped it (ChunkView: derived objects hold the pin).
        # "r": only the bytes the reader wants travel.
        lo, hi = fields.get("r") or (0, view.length)
        data = view.data[lo:hi]
        view.release()
        return {}, data

    async def _local_read(self, g: int, inode: int, index: int, version: int, **kw):
        """A chunk read for a local reader (objcache/ipc/server.py). A chunk
        this group does not own under our ring (the reader's ring is stale)
        sends the reader to RPC, where ``stale_ring`` tells it so."""
        if g != self.group_id or self._ring.chunk_owner(inode, index) != g:
            raise NotLeader(0)
        return await self.chunks.read(inode, index, version, **kw)

    async def _h_chunk_write(self, ctx, fields, payload):
        self._local_group(fields["g"])
        await self.check_ring(fields, (fields["i"], fields["x"]))
        v = await self.chunks.write(fields["i"], fields["x"], fields["o"], payload or b"",
                                    epoch_base=fields["e"], s3=fields["s3"], s3_size=fields["n"])
        return {"v": v}

    async def _fetch_chunk(self, sender: int, key, version: int):
        """For GroupMachine.prepare_restore: chunk ``key`` at ``version``
        (or newer) from replica ``sender`` of our group, or None."""
        addr = self.host.addresses.get(sender)
        if addr is None:
            raise OSError(errno.EHOSTUNREACH, f"no address for node {sender}")
        r = await self.pool.get(*addr).call(
            "raft.chunk", {"g": self.group_id, "i": key[0], "x": key[1], "v": version},
            timeout=60)
        if r.fields.get("gone"):
            return None
        return r.fields["v"], r.payload if r.payload is not None else b""

    async def _h_raft_chunk(self, ctx, fields, payload):
        """A replica of our group installing our snapshot asks for a dirty
        chunk version it names (GroupMachine.chunk_for_peer). Leader or
        not: the sender of a snapshot has what it names."""
        if fields["g"] != self.group_id or not getattr(self, "machine", None):
            raise HandlerError("not_here", f"group {fields['g']} is not on node {self.node_id}")
        try:
            got = await self.machine.chunk_for_peer((fields["i"], fields["x"]), fields["v"])
        except LookupError as exc:
            raise HandlerError("missing", str(exc)) from None
        if got is None:
            return {"gone": True}
        return {"v": got[0]}, got[1]

    async def _h_join(self, ctx, fields, payload):
        r = await self.router.propose(ROOT_GROUP, ["join", fields["address"],
                                                   int(fields.get("replicas", 1))])
        if r[0] != "ok":
            raise HandlerError("join_failed", r[2])
        m = await self.router.read(ROOT_GROUP, ["cluster"])
        return {"node": r[1], "group": r[2], "members": r[3], "cluster": m[1]}

    async def _h_map(self, ctx, fields, payload):
        return {"cluster": self.cluster, "chunk_size": self.cfg.chunk_size,
                "bucket": self.cfg.bucket, "prefix": normalize_prefix(self.cfg.prefix)}

    async def _h_node_status(self, ctx, fields, payload):
        st = self.group.status()
        st.pop("progress", None)
        pend = serve_read(self.machine.state, ["pending"]) if self.group.is_leader else None
        return {"node": self.node_id, "group": self.group_id, "address": self.address,
                "raft": st, "cache": {k: v for k, v in self.cache.stats.items()
                                      if isinstance(v, (int, float))},
                "pending": pend[1:] if pend else None, "uptime": time.time() - self.started,
                "spill": dict(self.spiller.stats),
                "local_reads": (dict(self.local_reads.stats, pinned=self.local_reads.pinned,
                                     path=self.local_reads.path)
                                if self.local_reads is not None else None)}

    async def _h_status(self, ctx, fields, payload):
        await self.refresh_cluster()
        nodes = []
        for nid, addr in sorted(self.cluster["nodes"].items()):
            if nid == self.node_id:
                nodes.append(await self._h_node_status(None, {}, None))
                continue
            try:
                r = await self.pool.get(*_addr(addr)).call("cluster.node_status", {}, timeout=3)
                nodes.append(r.fields)
            except (RpcError, OSError) as exc:
                nodes.append({"node": nid, "address": addr, "error": repr(exc)})
        return {"ring_version": self._ring.version, "membership_version": self.cluster["version"],
                "ring": self.cluster["ring"],
                "groups": self.cluster["groups"], "nodes": nodes}

    async def _h_drain(self, ctx, fields, payload):
        """Flush every dirty byte to the bucket; returns when every group
        reports nothing pending."""
        timeout = float(fields.get("timeout", 600))
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        report_at = loop.time() + 10
        first = True
        while True:
            pending, what = 0, []
            for g in self.cluster["groups"]:
                fields2, _ = await self.router.at_leader(g, "cluster.flush_group",
                                                          {"g": g, "gc": first},
                                                          timeout=max(1.0, end - loop.time()))
                pending += fields2["pending"]
                what += fields2.get("what", [])
            first = False
            if pending == 0:
                return {"pending": 0}
            if loop.time() > report_at:
                log.warning("drain: %d items still pending, e.g. %s", pending, what[:5])
                report_at = loop.time() + 10
            if loop.time() > end:
                raise HandlerError("timeout", f"{pending} items still pending, e.g. {what[:3]}")
            await asyncio.sleep(0.1)

    # -- meta / data for clients ------------------------------------------------

    def _meta_handler(self, name):
        async def handler(ctx, fields, payload):
            await self.ensure_root()
            return await self._meta(name, fields)
        return _errno(self._retry_stale(handler))

    async def _meta(self, name, f):
        ns = self.ns
        if name == "getattr":
            return {"inode": (await ns.getattr(f["ino"])).to_wire()}
        if name == "open":
            return {"inode": (await ns.open(f["ino"])).to_wire()}
        if name == "lookup":
            return {"inode": (await ns.lookup(f["parent"], bytes(f["name"]))).to_wire()}
        # Listings travel as the payload (msgpack), not in the header: a
        # header is at most 1 MiB, and a 10k-entry readdir_plus is more.
        if name == "readdir_plus":
            return {}, msgpack.packb([[n, node.to_wire()]
                                      for n, node in await ns.readdir_plus(f["ino"])])
        if name == "readdir":
            return {}, msgpack.packb([[n, c, int(k)] for n, c, k in await ns.readdir(f["ino"])])
        if name == "create":
            return {"inode": (await ns.create(f["parent"], bytes(f["name"]), f["mode"],
                                              f["uid"], f["gid"])).to_wire()}
        if name == "mkdir":
            return {"inode": (await ns.mkdir(f["parent"], bytes(f["name"]), f["mode"],
                                             f["uid"], f["gid"])).to_wire()}
        if name == "symlink":
            return {"inode": (await ns.symlink(f["parent"], bytes(f["name"]),
                                               bytes(f["target"]), f["uid"], f["gid"])).to_wire()}
        if name == "unlink":
            return {"ino": await ns.unlink(f["parent"], bytes(f["name"]),
                                           keep=frozenset(f.get("keep") or ()),
                                           lease=float(f.get("lease") or ORPHAN_LEASE))}
        if name == "forget":
            await ns.forget(f["ino"])
            return {}
        if name == "forget_orphans":
            return {"n": await ns.forget_orphans()}
        if name == "renew_orphans":
            await ns.renew_orphans(f["inos"], float(f.get("lease") or ORPHAN_LEASE))
            return {}
        if name == "rmdir":
            await ns.rmdir(f["parent"], bytes(f["name"]))
            return {}
        if name == "rename":
            await ns.rename(f["sp"], bytes(f["sn"]), f["dp"], bytes(f["dn"]),
                            noreplace=bool(f.get("noreplace")),
                            keep=frozenset(f.get("keep") or ()),
                            lease=float(f.get("lease") or ORPHAN_LEASE))
            return {}
        if name == "link":
            return {"inode": (await ns.link(f["ino"], f["parent"], bytes(f["name"]))).to_wire()}
        if name == "setattr":
            return {"inode": (await ns.setattr(f["ino"], f["fields"])).to_wire()}
        raise HandlerError("bad_request", f"unknown meta op {name}")

    async def _h_data_read(self, ctx, fields, payload):
        await self.ensure_root()
        node = Inode.from_wire(fields["inode"])
        return {}, await self.data.read(node, fields["offset"], fields["length"])

    async def _h_data_write(self, ctx, fields, payload):
        await self.ensure_root()
        node = Inode.from_wire(fields["inode"])
        versions = await self.data.write(node, fields["offset"], payload or b"")
        return {"versions": list(versions.items())}

    async def _h_data_flush(self, ctx, fields, payload):
        await self.ensure_root()
        node = Inode.from_wire(fields["inode"])
        if fields.get("truncate"):
            await self.data.truncate(node, fields["size"], dict(fields["versions"]))
        else:
            await self.data.flush(node, fields["size"], dict(fields["versions"]))
        return {"inode": (await self.ns.getattr(node.id)).to_wire()}

    async def _h_data_fsync(self, ctx, fields, payload):
        """Wait until the bucket holds the inode's current data."""
        ino = fields["ino"]
        g = self.ring().meta_owner(ino)
        loop = asyncio.get_running_loop()
        end = loop.time() + float(fields.get("timeout", 300))
        while loop.time() < end:
            # The pass uploads the file: as long as that takes, within the
            # fsync's own deadline (the router's default 10 s cut large
            # files' fsync short with ETIMEDOUT).
            fields2, _ = await self.router.at_leader(g, "cluster.flush_group",
                                                      {"g": g, "only": ino},
                                                      timeout=max(1.0, end - loop.time()))
            node = await self.ns.getattr(ino)
            if not node.dirty:
                return {}
            await asyncio.sleep(0.05)
        raise HandlerError("timeout", "fsync timed out")

    async def _h_flush_group(self, ctx, fields, payload):
        self._local_group(fields["g"])
        if fields.get("gc"):
            # A drain leaves no spill object behind: also those of spills a
            # crash interrupted (their tombstones are deleted just below).
            await self.spiller.collect_garbage(min_age=0)
        await self.writeback.run_once(force=True, only=fields.get("only"))
        pending = self.writeback.pending()
        return {"pending": pending,
                "what": self.writeback.describe_pending() if pending else []}
