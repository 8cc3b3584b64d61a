"""Helpers for the backend tests.

No pytest-asyncio: tests are sync functions that run one coroutine on a
fresh event loop with ``run``.

``backend`` (a fixture, imported by the test modules) is parametrized over
the three places an ObjectStore can live -- MemoryStore, moto, Ceph RGW --
and yields a :class:`Backend`: a fresh bucket there, a factory of stores on
it, a back door to change objects behind the store's back, and the request
counts seen at the server.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable

import pytest
import uvloop

from objcache.backend import MemoryServer, MemoryStore, ObjectStore
from objcache.backend.faults import FaultPlan, FaultyStore

MiB = 1 << 20


def run(coro_fn: Callable[..., Any], *args: Any, loop: str = "uvloop",
        timeout: float = 120.0) -> Any:
    """Run ``coro_fn(*args)`` on a new uvloop (or plain asyncio) loop."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(*args), timeout)
    if loop == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


class Backend:
    """One bucket on one kind of server, and stores on it."""

    def __init__(self, kind: str, bucket: str, server: Any = None,
                 memory: MemoryServer | None = None) -> None:
        self.kind = kind
        self.bucket = bucket
        self.server = server          # S3Server (moto / rgw) or None
        self.memory = memory          # MemoryServer for kind == "memory"

    def __repr__(self) -> str:
        return f"Backend({self.kind}, {self.bucket})"

    @property
    def is_s3(self) -> bool:
        return self.server is not None

    def make(self, prefix: str = "", *, bucket: str | None = None,
             **options: Any) -> ObjectStore:
        """A new store on this backend's bucket (or ``bucket``)."""
        bucket = bucket or self.bucket
        if self.kind == "memory":
            mem = {k: options.pop(k) for k in list(options)
                   if k in ("latency", "max_copy_bytes", "empty_multipart_etag")}
            return MemoryStore(bucket, prefix, server=self.memory, **mem, **options)
        from objcache.backend import S3Store
        creds = {"access_key": self.server.access_key,
                 "secret_key": self.server.secret_key}
        creds.update({k: options.pop(k) for k in list(options)
                      if k in ("access_key", "secret_key")})
        options.pop("latency", None)
        return S3Store(bucket, prefix, endpoint_url=options.pop("endpoint_url",
                                                                self.server.endpoint_url),
                       region=self.server.region, **creds, **options)

    def faulty(self, plan: FaultPlan, prefix: str = "", **options: Any) -> FaultyStore:
        return FaultyStore(self.make(prefix, **options), plan)

    # -- the back door: another writer, straight to the server -------------
    def sync_put(self, full_key: str, data: bytes) -> str:
        if self.kind == "memory":
            return self.memory.put_object(self.bucket, full_key, data)
        resp = self.server._client().put_object(Bucket=self.bucket, Key=full_key,
                                                 Body=data)
        return resp["ETag"].strip('"')

    def sync_get(self, full_key: str) -> bytes:
        if self.kind == "memory":
            return self.memory.get_object(self.bucket, full_key)
        return self.server._client().get_object(Bucket=self.bucket,
                                                Key=full_key)["Body"].read()

    # -- requests as the server counted them ------------------------------
    def mark(self) -> int:
        return self.server.request_mark() if self.is_s3 else 0

    def server_requests(self, mark: int) -> list[Any]:
        """Requests to this bucket since ``mark`` (S3 servers only)."""
        return [r for r in self.server.requests(mark) if r.bucket == self.bucket]


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("moto", marks=pytest.mark.moto, id="moto"),
    pytest.param("rgw", marks=pytest.mark.rgw, id="rgw"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    kind = request.param
    if kind == "memory":
        memory = MemoryServer()
        return Backend("memory", memory.create_bucket("bucket"), memory=memory)
    server, bucket = request.getfixturevalue(f"{kind}_bucket")
    return Backend(kind, bucket, server=server)


@pytest.fixture(params=[pytest.param("moto", marks=pytest.mark.moto, id="moto"),
                        pytest.param("rgw", marks=pytest.mark.rgw, id="rgw")])
def s3backend(request: pytest.FixtureRequest) -> Backend:
    server, bucket = request.getfixturevalue(f"{request.param}_bucket")
    return Backend(request.param, bucket, server=server)


async def collect(store: ObjectStore, prefix: str = "", **kw: Any
                  ) -> tuple[list[str], list[str], list[Any]]:
    """(object keys, common prefixes, pages) of a whole listing."""
    keys: list[str] = []
    prefixes: list[str] = []
    pages = []
    async for page in store.list(prefix, **kw):
        pages.append(page)
        keys += [o.key for o in page.objects]
        prefixes += page.common_prefixes
    return keys, prefixes, pages


async def put_many(store: ObjectStore, keys: list[str], data: bytes = b"x",
                   concurrency: int = 16) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(k: str) -> None:
        async with sem:
            await store.put(k, data)
    await asyncio.gather(*(one(k) for k in keys))


class TcpProxy:
    """A tiny TCP proxy in front of an S3 server, on the test's loop.

    Counts the connections it accepted. ``resets``: the next that many
    connections are cut once they carried more than ``reset_after`` bytes
    towards the client -- in the middle of a response body. The cut is a
    TCP RST (SO_LINGER 0), sent ``linger`` seconds after the last bytes so
    that the client has read them (an RST makes the client's kernel drop
    whatever it has not read yet), or with ``fin=True`` a plain close (the
    client sees the body end early). ``rate``: bytes per second towards the
    client (None: unlimited), to make a read slow.
    """

    def __init__(self, host: str, port: int, *, reset_after: int = 64 * 1024,
                 resets: int = 0, linger: float = 0.2, fin: bool = False,
                 rate: float | None = None) -> None:
        self.target = (host, port)
        self.reset_after = reset_after
        self.resets = resets
        self.linger = linger
        self.fin = fin
        self.rate = rate
        self.connections = 0
        self.resets_done = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):   # ends every pipe: the tasks finish
            w.transport.abort()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 10)
        await self._server.wait_closed()

    async def _handle(self, creader: asyncio.StreamReader,
                      cwriter: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            self._tasks.discard(task)
            return
        self._writers |= {cwriter, swriter}
        up = asyncio.ensure_future(self._pipe(creader, swriter))
        try:
            await self._down(sreader, cwriter)
        finally:
            swriter.transport.abort()
            cwriter.transport.abort()
            await asyncio.gather(up, return_exceptions=True)
            self._writers -= {cwriter, swriter}
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()

    async def _down(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        sent = 0
        armed = self.resets > 0
        if armed:
            self.resets -= 1
        try:
            while data := await reader.read(1 << 16):
                if armed and sent + len(data) > self.reset_after:
                    writer.write(data[:self.reset_after - sent])
                    await writer.drain()
                    self.resets_done += 1
                    if self.fin:
                        writer.close()
                        return
                    await asyncio.sleep(self.linger)
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
                sent += len(data)
                if self.rate:
                    await asyncio.sleep(len(data) / self.rate)
            if armed:  # this connection did not carry enough: give it back
                self.resets += 1
        except ConnectionError:
            pass
