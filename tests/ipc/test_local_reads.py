"""Local zero-copy reads (objcache/ipc) against a real chunk cache: the
handshake and the arena fd, pinned views that read the owner's bytes, pins
that end with the last derived object or with the connection, the per-
client pin limit, and bad peers (wrong secret, wrong node, malformed
messages) — each refused without harm to the server."""
import asyncio
import errno
import gc
import socket

import numpy as np
import pytest

from objcache.ipc import wire
from objcache.ipc.client import LocalChannel, LocalFirst, LocalReads, NotLocal
from objcache.ipc.server import LocalReadServer
from objcache.raft.types import NotLeader
from objcache.rpc.auth import AuthenticationFailed

from tests.cache import CS, Loader, make_cache, pattern, run

SECRET = b"local-read-test-secret"
GROUP = 7


async def until(cond, timeout=5.0):
    """Yield to the loop until ``cond()`` holds (the server acts on messages
    as they arrive; this waits for that, with a deadline)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


class Owner:
    """A chunk cache served by a LocalReadServer, as a node serves it."""

    def __init__(self, tmp_path, *, max_pins=None, pages=4):
        self.cache = make_cache(tmp_path / "cache", pages=pages)
        self.loader = Loader()
        self.path = str(tmp_path / "s" / "node.sock")
        self.leader = True
        self.max_pins = max_pins

    async def read(self, group, inode, index, version, *, s3, from_bucket, size, ahead, base):
        if group != GROUP or not self.leader:
            raise NotLeader(3)
        if version == 0:
            return None                     # a hole
        if version == 13:
            raise OSError(errno.ESTALE, "gone from the bucket")
        return await self.cache.read((inode, index), version, self.loader((inode, index), version))

    async def __aenter__(self):
        await self.cache.open()
        self.server = LocalReadServer(self.path, SECRET, self.cache.arena, self.read,
                                      node_id=5, max_pins=self.max_pins)
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.close()
        await self.cache.close()            # raises if a pin leaked


async def pin(ch, inode=1, index=0, version=1):
    return await ch.pin(GROUP, inode, index, version, s3=None, from_bucket=True, size=CS)


def test_pinned_view_reads_the_owners_bytes_and_unpins_with_its_last_slice(tmp_path):
    async def main():
        async with Owner(tmp_path) as o:
            ch = await LocalChannel.connect(o.path, SECRET, node_id=5)
            assert (ch.node_id, ch.page_size, ch.npages) == (5, CS, 4)
            view = await pin(ch)
            assert bytes(view.data) == pattern((1, 0), 1, CS)
            arr = np.frombuffer(view.data[100:200], np.uint8)      # derived: keeps the pin
            view.release()
            await until(lambda: o.server.pinned == 1)
            assert arr.tobytes() == pattern((1, 0), 1, CS)[100:200]
            del arr
            gc.collect()
            await until(lambda: o.server.pinned == 0)
            # Pinned again: a memory hit, no second load.
            view = await pin(ch)
            assert bytes(view.data[:8]) == pattern((1, 0), 1, 8) and len(o.loader.calls) == 1
            del view
            await until(lambda: o.server.pinned == 0)
            assert await pin(ch, version=0) is None                 # hole
            with pytest.raises(OSError) as e:
                await pin(ch, version=13)
            assert e.value.errno == errno.ESTALE
            ch.close()
    run(main())


def test_connection_end_releases_every_pin_and_views_stay_readable(tmp_path):
    async def main():
        async with Owner(tmp_path, max_pins=4) as o:
            ch = await LocalChannel.connect(o.path, SECRET)
            views = [await pin(ch, inode=i) for i in (1, 2, 3)]
            assert o.server.pinned == 3
            ch.close()                      # a killed client looks the same to the owner
            await until(lambda: o.server.pinned == 0)
            assert bytes(views[2].data[:24]) == pattern((3, 0), 1, 24)
            with pytest.raises(NotLocal):
                await pin(ch)
            del views
    run(main())


def test_pin_limit_answers_busy_and_local_first_falls_back_to_rpc(tmp_path):
    class Rpc:
        calls = 0

        async def read(self, *a, **kw):
            Rpc.calls += 1
            return "from rpc"

    async def main():
        async with Owner(tmp_path, max_pins=2) as o:
            ch = await LocalChannel.connect(o.path, SECRET)
            held = [await pin(ch, inode=1), await pin(ch, inode=2)]
            with pytest.raises(NotLocal):
                await pin(ch, inode=3)
            svc = LocalFirst(ch, GROUP, Rpc())
            assert await svc.read(3, 0, 1, s3=None, from_bucket=True, size=CS) == "from rpc"
            o.leader = False                # leadership moved: RPC finds the new leader
            del held
            await until(lambda: o.server.pinned == 0)
            assert await svc.read(1, 0, 1, s3=None, from_bucket=True, size=CS) == "from rpc"
            assert Rpc.calls == 2 and o.server.stats["busy"] == 2
            ch.close()
    run(main())


def test_wrong_secret_or_wrong_node_gets_no_arena(tmp_path):
    async def main():
        async with Owner(tmp_path) as o:
            with pytest.raises(AuthenticationFailed):
                await LocalChannel.connect(o.path, b"not-the-secret")
            with pytest.raises(wire.ProtocolError):
                await LocalChannel.connect(o.path, SECRET, node_id=6)
            with pytest.raises(OSError):
                await LocalChannel.connect(str(tmp_path / "absent.sock"), SECRET)
            assert o.server.stats["denied"] == 1
            ch = await LocalChannel.connect(o.path, SECRET)     # the server still serves
            assert bytes((await pin(ch)).data[:8]) == pattern((1, 0), 1, 8)
            ch.close()
    run(main())


@pytest.mark.parametrize("garbage", [b"\xc1not msgpack", wire.encode({"a": 1}),
                                     wire.encode(["pin", 1, 2]), wire.encode(["explode"]),
                                     wire.encode(["unpin", 5])])
def test_malformed_messages_drop_only_that_client_and_its_pins(tmp_path, garbage):
    async def main():
        async with Owner(tmp_path) as o:
            good = await LocalChannel.connect(o.path, SECRET)
            bad = await LocalChannel.connect(o.path, SECRET)
            kept = await pin(good, inode=1)
            await pin(bad, inode=2)
            assert o.server.pinned == 2
            bad._out.put_nowait(garbage)
            await until(lambda: not bad.alive)
            await until(lambda: o.server.pinned == 1)
            assert o.server.stats["bad_messages"] == 1
            assert bytes((await pin(good, inode=4)).data[:8]) == pattern((4, 0), 1, 8)
            assert bytes(kept.data[:8]) == pattern((1, 0), 1, 8)
            good.close()
    run(main())


def test_a_silent_peer_is_dropped_at_the_handshake_timeout(tmp_path):
    async def main():
        async with Owner(tmp_path) as o:
            o.server._handshake_timeout = 0.2
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(o.path)
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            hello = wire.decode(await loop.sock_recv(s, 4096), expect="hello")
            assert hello[3] == 5
            denied = wire.decode(await loop.sock_recv(s, 4096))
            assert denied[0] == "denied" and o.server.stats["denied"] == 1
            s.close()
    run(main())


def test_local_reads_finds_a_groups_member_by_its_address(tmp_path, monkeypatch):
    async def main():
        async with Owner(tmp_path) as o:
            # The node at "10.1.2.3:7000" listens on its path in the directory.
            from objcache.ipc.paths import socket_path
            path = socket_path("10.1.2.3:7000", str(tmp_path / "s"))
            o.server.path = path
            await o.server.close()
            o.server = LocalReadServer(path, SECRET, o.cache.arena, o.read, node_id=5)
            await o.server.start()
            lr = LocalReads(SECRET, directory=str(tmp_path / "s"))
            lr.set_map({"nodes": {"5": "10.1.2.3:7000", "6": "10.9.9.9:7000"},
                        "groups": {str(GROUP): [6, 5], "8": [6]}})
            assert await lr.channel(8) is None                 # no socket for node 6
            ch = await lr.channel(GROUP)
            assert ch is not None and ch.node_id == 5
            assert await lr.channel(GROUP) is ch                # one connection per node
            lr.close()
    run(main())


def test_server_close_ends_every_channel_and_releases_its_pins(tmp_path):
    async def main():
        o = Owner(tmp_path)
        await o.__aenter__()
        ch = await LocalChannel.connect(o.path, SECRET)
        view = await pin(ch)
        await o.server.close()                  # a node stopping: before its cache closes
        assert o.server.pinned == 0
        await until(lambda: not ch.alive)
        with pytest.raises(NotLocal):
            await pin(ch)
        assert bytes(view.data[:8]) == pattern((1, 0), 1, 8)   # still mapped, unchanged
        del view
        await o.cache.close()
        assert not (tmp_path / "s" / "node.sock").exists()
    run(main())
