"""Helpers for the RPC tests (no pytest-asyncio: tests are sync functions
that run one coroutine on a fresh loop with ``run``)."""
from __future__ import annotations

import asyncio
import collections
import contextlib

import uvloop

from objcache.rpc import RpcClient, RpcServer, framing
from objcache.rpc.auth import ClientHandshake
from objcache.rpc.connection import Connection

SECRET = b"test-cluster-secret-0123456789"
WAIT = 10.0         # bound for anything that should happen "soon"


def run(coro_fn, *args, loop: str = "uvloop", timeout: float = 60.0):
    """Run ``coro_fn(*args)`` to completion on a new uvloop (or plain
    asyncio) event loop, bounded by ``timeout``."""
    async def bounded():
        return await asyncio.wait_for(coro_fn(*args), timeout)
    if loop == "uvloop":
        return uvloop.run(bounded())
    assert loop == "asyncio"
    return asyncio.run(bounded())


async def echo(ctx, fields, payload):
    return fields, payload


@contextlib.asynccontextmanager
async def serving(handlers=None, secret=SECRET, **opts):
    """A started RpcServer on a free loopback port."""
    server = RpcServer(handlers if handlers is not None else {"echo": echo},
                       secret, **opts)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def client_of(server, secret=SECRET, **opts):
    client = RpcClient("127.0.0.1", server.port, secret, **opts)
    try:
        yield client
    finally:
        await client.close()


@contextlib.contextmanager
def flow_events():
    """Record flow-control transitions of every connection: yields a dict
    event-name -> asyncio.Event (create inside a running loop)."""
    events = {name: asyncio.Event() for name in
              ("write_paused", "write_resumed", "read_paused", "read_resumed")}
    seen = []

    def observer(conn, event):
        seen.append((conn, event))
        events[event].set()
    old = Connection.flow_observer
    Connection.flow_observer = observer
    try:
        yield events
    finally:
        Connection.flow_observer = old


def feed(decoder: framing.FrameDecoder, data) -> list:
    """Push ``data`` through a decoder the way a BufferedProtocol does;
    the complete frames."""
    frames = []
    mv = memoryview(data).cast("B")
    pos = 0
    while pos < len(mv):
        buf = decoder.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), len(mv) - pos)
        buf[:n] = mv[pos:pos + n]
        decoder.buffer_updated(n)
        pos += n
        while (f := decoder.next_frame()) is not None:
            frames.append(f)
    return frames


def frame_bytes(kind, rid, name, fields, payload=b"") -> bytes:
    head = framing.encode_head(kind, rid, name, fields, len(payload))
    return head + bytes(payload)


class RawPeer:
    """A hand-driven client on asyncio streams, for sending bad input."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.decoder = framing.FrameDecoder()
        self._frames = collections.deque()

    @classmethod
    async def connect(cls, port, secret: bytes | None = SECRET):
        """Connect; complete the handshake if ``secret`` is given."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        if secret is not None:
            hs = ClientHandshake(secret)
            hello = await peer.read_frame()
            assert hello.kind == framing.HELLO
            peer.send(frame_bytes(framing.AUTH, 0, "",
                                  hs.on_hello(hello.fields)))
            ok = await peer.read_frame()
            assert ok is not None and ok.kind == framing.AUTH_OK, ok
            hs.on_auth_ok(ok.fields)
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def request(self, rid, method, fields, payload=b"") -> None:
        self.send(frame_bytes(framing.REQUEST, rid, method, fields, payload))

    async def read_frame(self, timeout: float = WAIT):
        """The next frame, or None at EOF."""
        async def read():
            while not self._frames:
                data = await self.reader.read(1 << 16)
                if not data:
                    return None
                self._frames.extend(feed(self.decoder, data))
            return self._frames.popleft()
        return await asyncio.wait_for(read(), timeout)

    async def closed_by_peer(self, timeout: float = WAIT) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        async def drain():
            try:
                while await self.reader.read(1 << 16):
                    pass
            except ConnectionError:
                pass
            return True
        closed = await asyncio.wait_for(drain(), timeout)
        await self.close()
        return closed

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
