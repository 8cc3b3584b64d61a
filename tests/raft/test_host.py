"""RaftHost: several groups per process over the real RPC layer and real
storage; malformed frames are rejected without disturbing the groups."""
import asyncio

import msgpack
import pytest

from objcache.raft.driver import GroupOptions, RaftGroup
from objcache.raft.host import MSG_METHOD, RaftHost
from objcache.raft.storage import RaftStorage
from objcache.raft.types import ConfState
from objcache.rpc import ClientPool, RemoteError, RpcClient, RpcServer

SECRET = b"host-test-secret-0123456789"
OPTS = GroupOptions(tick_seconds=0.02, snapshot_entries=100)


class KV:
    def __init__(self):
        self.data = {}

    def apply(self, e):
        k, v = msgpack.unpackb(e.data)
        self.data[k] = v

    def snapshot(self):
        return msgpack.packb(self.data)

    def restore(self, data):
        self.data = msgpack.unpackb(data)


async def start_nodes(tmp_path, n=3, groups=(1, 2)):
    servers, hosts, gs, stores = [], [], {}, []
    for i in range(1, n + 1):
        pool = ClientPool(SECRET, connect_timeout=1.0, backoff_max=0.2)
        host = RaftHost(i, pool)
        srv = RpcServer(host.handlers(), SECRET)
        await srv.start("127.0.0.1", 0)
        servers.append(srv)
        hosts.append(host)
    for h in hosts:
        for j, s in enumerate(servers, start=1):
            h.set_address(j, "127.0.0.1", s.port)
    conf = ConfState(frozenset(range(1, n + 1)))
    for i, h in enumerate(hosts, start=1):
        for g in groups:
            st = await RaftStorage.open(str(tmp_path / f"n{i}-g{g}"))
            stores.append(st)
            grp = RaftGroup(g, i, st, KV(), h, OPTS, bootstrap=conf)
            h.add_group(grp)
            gs[(g, i)] = grp
    for grp in gs.values():
        await grp.start()
    return servers, hosts, gs, stores


async def stop_nodes(servers, hosts, gs, stores):
    for grp in gs.values():
        await grp.stop()
    for h in hosts:
        await h.close()
        await h.pool.close()
    for s in servers:
        await s.close()
    for st in stores:
        await st.close()


async def leader(gs, g):
    for _ in range(500):
        for (gid, _), grp in gs.items():
            if gid == g and grp.is_leader:
                return grp
        await asyncio.sleep(0.01)
    raise AssertionError(f"no leader for group {g}")


def test_two_groups_per_process_replicate_independently(tmp_path):
    async def main():
        nodes = await start_nodes(tmp_path)
        servers, hosts, gs, stores = nodes
        try:
            l1, l2 = await leader(gs, 1), await leader(gs, 2)
            await asyncio.gather(*(l1.propose(msgpack.packb([f"a{k}", k]), 5) for k in range(150)))
            await asyncio.gather(*(l2.propose(msgpack.packb([f"b{k}", k]), 5) for k in range(20)))
            for (g, i), grp in gs.items():
                await grp.read_barrier(5)
                want = ({f"a{k}": k for k in range(150)} if g == 1
                        else {f"b{k}": k for k in range(20)})
                assert grp.sm.data == want, (g, i)
            assert l1.core.log.snap_index > 0          # group 1 compacted
            assert sum(h.stats["received"] for h in hosts) > 0
        finally:
            await stop_nodes(*nodes)
    asyncio.run(asyncio.wait_for(main(), 60))


def test_malformed_raft_frames_are_rejected_and_groups_survive(tmp_path):
    async def main():
        nodes = await start_nodes(tmp_path, groups=(1,))
        servers, hosts, gs, stores = nodes
        try:
            l1 = await leader(gs, 1)
            c = RpcClient("127.0.0.1", servers[0].port, SECRET)
            bad = [
                ({}, None),
                ({"b": "x"}, None),
                ({"b": [[1, [1, 2, 3], 0]]}, None),                 # bad header
                ({"b": [[1, [10] + [0] * 11, 5]]}, b"ab"),          # length past payload
                ({"b": []}, b"extra"),                               # trailing payload
            ]
            for fields, payload in bad:
                with pytest.raises(RemoteError) as exc:
                    await c.call(MSG_METHOD, fields, payload, timeout=2)
                assert exc.value.code == "bad_request"
            await c.close()
            assert hosts[0].stats["malformed"] == len(bad)
            await l1.propose(msgpack.packb(["still", "fine"]), 5)
        finally:
            await stop_nodes(*nodes)
    asyncio.run(asyncio.wait_for(main(), 60))
