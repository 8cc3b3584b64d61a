"""RpcServer: accepts connections, authenticates them, runs handlers.

    server = RpcServer({"echo": echo}, secret)
    await server.start("127.0.0.1", 0)       # port 0: a free port
    ... server.port ...
    await server.close()

Handlers and what they may return: objcache/rpc/handlers.py. Per-connection
behaviour (multiplexing, cancellation, backpressure, bad input):
objcache/rpc/connection.py and docs/rpc.md.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from . import framing
from .connection import Connection, Limits
from .handlers import Handler

log = logging.getLogger("objcache.rpc")


class RpcServer:
    """An RPC endpoint serving ``handlers`` (method name -> handler)."""

    def __init__(self, handlers: Mapping[str, Handler], secret: bytes, *,
                 max_payload: int = framing.DEFAULT_MAX_PAYLOAD,
                 max_header: int = framing.MAX_HEADER,
                 max_concurrent_per_conn: int = 128,
                 max_inflight_bytes_per_conn: int = 256 << 20,
                 write_buffer_high: int = 1 << 20,
                 handshake_timeout: float = 10.0,
                 close_timeout: float = 5.0):
        for name, fn in handlers.items():
            if type(name) is not str or not callable(fn):
                raise TypeError(f"handlers must map str -> callable; got "
                                f"{name!r} -> {fn!r}")
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the cluster secret must be non-empty bytes")
        self._handlers = dict(handlers)
        self._secret = bytes(secret)
        self._limits = Limits(
            max_header=max_header, max_payload=max_payload,
            max_concurrent=max_concurrent_per_conn,
            max_inflight_bytes=max_inflight_bytes_per_conn,
            write_high=write_buffer_high, write_low=write_buffer_high // 4,
            handshake_timeout=handshake_timeout)
        self._close_timeout = close_timeout
        self._server: asyncio.AbstractServer | None = None
        # Every accepted connection until it is lost (authenticated or not).
        self._connections: set[Connection] = set()
        self._closing = False
        self.host: str | None = None
        self.port: int | None = None

    @property
    def connections(self) -> int:
        """Open connections (authenticated or still in the handshake)."""
        return len(self._connections)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("server already started")
        self._server = await asyncio.get_running_loop().create_server(
            self._new_connection, host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]
        log.info("rpc: listening on %s:%d", self.host, self.port)

    def _new_connection(self) -> Connection:
        conn = Connection("server", self._secret, self._limits,
                          handlers=self._handlers,
                          on_close=self._connections.discard)
        self._connections.add(conn)
        return conn

    async def close(self) -> None:
        """Stop listening, cancel running handlers (waiting up to
        ``close_timeout`` for them to finish), close every connection.
        Clients see ConnectionLost for calls in flight."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        conns = list(self._connections)
        tasks = [t for c in conns for t in c.handler_tasks()]
        for c in conns:
            c.close("server shutting down")     # cancels the handler tasks
        if tasks:
            done, stuck = await asyncio.wait(tasks,
                                             timeout=self._close_timeout)
            if stuck:
                log.warning("rpc: %d handlers did not finish within %gs of "
                            "being cancelled", len(stuck), self._close_timeout)
        if self._server is not None:
            await self._server.wait_closed()
        log.info("rpc: server on %s:%s closed", self.host, self.port)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
