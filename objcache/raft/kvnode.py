"""A replicated key-value node: one Raft group over real storage and RPC.

    python -m objcache.raft.kvnode --id 1 --listen 127.0.0.1:7001 \\
        --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \\
        --data-dir /var/tmp/kv1 [--snapshot-entries 10000]

The cluster secret comes from OBJCACHE_SECRET or --secret-file. Used by the
real-process tests (tests/raft/test_processes.py) and the commit benchmark
(bench/macro/raft_commit.py); the storage engine's nodes are built the same
way from RaftStorage + RaftGroup + RaftHost.

RPC methods:
  kv.put   {k: str, v: any}  -> {index}        replicated write (leader only)
  kv.get   {k: str}          -> {v, found}     linearizable (ReadIndex)
  kv.dump  {}                -> {kv, applied}  every key, after a read barrier
  kv.status {}               -> group status
Errors: "not_leader" with details {leader: id} from followers.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import msgpack

from objcache.rpc import ClientPool, HandlerError, RpcServer, expects, load_secret

from .driver import GroupOptions, ProposalDropped, RaftGroup
from .host import RaftHost
from .storage import RaftStorage
from .types import ConfState, Entry, NotLeader

log = logging.getLogger("objcache.raft.kvnode")


class KVStateMachine:
    def __init__(self):
        self.data: dict[str, object] = {}

    def apply(self, entry: Entry):
        k, v = msgpack.unpackb(entry.data)
        self.data[k] = v
        return entry.index

    def snapshot(self) -> bytes:
        return msgpack.packb(self.data)

    def restore(self, data: bytes) -> None:
        self.data = msgpack.unpackb(data)


def parse_peers(text: str) -> dict[int, tuple[str, int]]:
    peers = {}
    for item in text.split(","):
        nid, _, addr = item.partition("=")
        host, _, port = addr.rpartition(":")
        if not nid.isdigit() or not port.isdigit() or not host:
            raise ValueError(f"bad peer {item!r}: expected ID=HOST:PORT")
        peers[int(nid)] = (host, int(port))
    return peers


class KVNode:
    def __init__(self, node_id: int, listen: tuple[str, int],
                 peers: dict[int, tuple[str, int]], data_dir: str, secret: bytes,
                 options: GroupOptions):
        self.node_id = node_id
        self.listen = listen
        self.peers = peers
        self.data_dir = data_dir
        self.secret = secret
        self.options = options

    async def start(self) -> None:
        self.storage = await RaftStorage.open(self.data_dir)
        self.pool = ClientPool(self.secret, connect_timeout=1.0, backoff_max=0.5,
                               max_payload=1 << 30)
        self.host = RaftHost(self.node_id, self.pool, self.peers)
        self.sm = KVStateMachine()
        self.group = RaftGroup(1, self.node_id, self.storage, self.sm, self.host,
                               self.options, bootstrap=ConfState(frozenset(self.peers)))
        self.host.add_group(self.group)
        handlers = dict(self.host.handlers())
        handlers.update({"kv.put": self._put, "kv.get": self._get,
                         "kv.dump": self._dump, "kv.status": self._status})
        self.server = RpcServer(handlers, self.secret, max_payload=1 << 30)
        await self.server.start(*self.listen)
        await self.group.start()

    async def stop(self) -> None:
        await self.server.close()
        await self.group.stop()
        await self.host.close()
        await self.pool.close()
        await self.storage.close()

    def _not_leader(self, exc: NotLeader):
        return HandlerError("not_leader", str(exc), {"leader": exc.leader})

    @expects(k=str)
    async def _put(self, ctx, fields, payload):
        try:
            index = await self.group.propose(msgpack.packb([fields["k"], fields.get("v")]),
                                             timeout=5.0)
        except NotLeader as exc:
            raise self._not_leader(exc) from None
        except ProposalDropped as exc:
            raise HandlerError("dropped", str(exc)) from None
        return {"index": index}

    @expects(k=str)
    async def _get(self, ctx, fields, payload):
        try:
            await self.group.read_barrier(timeout=5.0)
        except NotLeader as exc:
            raise self._not_leader(exc) from None
        k = fields["k"]
        return {"v": self.sm.data.get(k), "found": k in self.sm.data}

    async def _dump(self, ctx, fields, payload):
        await self.group.read_barrier(timeout=5.0)
        return {"kv": self.sm.data, "applied": self.group.applied}

    async def _status(self, ctx, fields, payload):
        st = self.group.status()
        st.pop("progress", None)
        st["storage"] = {k: v for k, v in self.storage.stats.items()
                         if isinstance(v, (int, float, str))}
        st["transport"] = dict(self.host.stats)
        return st


async def amain(args) -> int:
    host, _, port = args.listen.rpartition(":")
    peers = parse_peers(args.peers)
    if args.id not in peers:
        raise SystemExit(f"--id {args.id} is not among --peers")
    opts = GroupOptions(tick_seconds=args.tick, snapshot_entries=args.snapshot_entries)
    node = KVNode(args.id, (host, int(port)), peers, args.data_dir,
                  load_secret(args.secret_file), opts)
    await node.start()
    print(f"ready {args.id} {node.server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m objcache.raft.kvnode")
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--peers", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--secret-file")
    p.add_argument("--tick", type=float, default=0.05)
    p.add_argument("--snapshot-entries", type=int, default=10_000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s node{args.id} %(levelname)s %(name)s: %(message)s")
    import uvloop
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
