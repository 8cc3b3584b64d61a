"""RpcClient: calls to one peer over one multiplexed connection, with
reconnection; ClientPool: one client per peer address.

    client = RpcClient("10.0.0.7", 7070, secret)
    resp = await client.call("read_chunk", {"inode": 7, "index": 0})
    resp.fields, resp.payload                 # dict, memoryview | None
    await client.notify("raft", {...}, payload)
    await client.close()

Connecting is lazy: the first call (or ``connect()``) opens the connection,
and after it drops the next call opens a new one. Calls that arrive while
an attempt is under way share it (waiting within their own timeout).
Failed attempts back off exponentially with jitter (``backoff_initial``
doubling up to ``backoff_max``, each delay shortened by up to
``backoff_jitter`` of itself, so that the clients of a restarted server do
not retry in lock-step); a call made while the client is backing off, or
whose attempt fails, raises Unavailable at once - the request was NOT sent,
retrying is always safe. ``connect(timeout)`` instead waits through the
backoff until the peer is reachable (e.g. at start-up).

A call in flight when the connection drops fails with ConnectionLost and is
never re-sent here: only the caller knows whether the method is
idempotent. A wrong cluster secret (either side) raises
AuthenticationFailed.
"""
from __future__ import annotations

import asyncio
import logging
import random

from . import framing
from .connection import Connection, Limits, Response
from .errors import AuthenticationFailed, Unavailable

log = logging.getLogger("objcache.rpc")

_DEFAULT = object()


class RpcClient:
    """A client for one peer (host, port). Use from one event loop."""

    def __init__(self, host: str, port: int, secret: bytes, *,
                 connect_timeout: float = 5.0,
                 call_timeout: float | None = 30.0,
                 backoff_initial: float = 0.05,
                 backoff_max: float = 5.0,
                 backoff_multiplier: float = 2.0,
                 backoff_jitter: float = 0.5,
                 max_payload: int = framing.DEFAULT_MAX_PAYLOAD,
                 max_header: int = framing.MAX_HEADER,
                 write_buffer_high: int = 1 << 20):
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the cluster secret must be non-empty bytes")
        if connect_timeout <= 0 or (call_timeout is not None
                                    and call_timeout <= 0):
            raise ValueError("timeouts must be > 0")
        if not (0 < backoff_initial <= backoff_max and backoff_multiplier >= 1
                and 0 <= backoff_jitter < 1):
            raise ValueError("need 0 < backoff_initial <= backoff_max, "
                             "backoff_multiplier >= 1, 0 <= backoff_jitter < 1")
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self._secret = bytes(secret)
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_multiplier = backoff_multiplier
        self.backoff_jitter = backoff_jitter
        self._limits = Limits(max_header=max_header, max_payload=max_payload,
                              write_high=write_buffer_high,
                              write_low=write_buffer_high // 4,
                              handshake_timeout=connect_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None
        # Reconnection state. At most one attempt task at a time; every call
        # that needs a connection meanwhile waits for that task.
        self._connector: asyncio.Task | None = None
        self._failures = 0                  # consecutive failed attempts
        self._next_attempt = 0.0            # loop time of the next attempt
        self._last_error: BaseException | None = None
        self._closed = False
        self.connects = 0                   # successful connections, ever

    # -- public API ----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_open

    @property
    def connection(self) -> Connection | None:
        """The current connection (for tests and metrics)."""
        return self._conn

    async def connect(self, timeout: float | None = _DEFAULT) -> None:
        """Wait until connected, making attempts as the backoff allows
        (default timeout ``connect_timeout``). Raises Unavailable if not
        connected in time, AuthenticationFailed on a wrong secret."""
        if timeout is _DEFAULT:
            timeout = self.connect_timeout
        deadline = self._deadline(timeout)
        loop = self._loop
        while True:
            try:
                await self._connection(deadline)
                return
            except Unavailable:
                wait = max(0.0, self._next_attempt - loop.time())
                if self._closed or (deadline is not None
                                    and loop.time() + wait >= deadline):
                    raise
            await asyncio.sleep(wait)       # the backoff delay itself

    async def call(self, method: str, fields: dict | None = None,
                   payload=None, *, timeout: float | None = _DEFAULT
                   ) -> Response:
        """Send a request, await its answer (see the module doc for the
        errors). ``timeout`` (default ``call_timeout``; None: no limit)
        covers getting a connection, send-buffer space and the answer."""
        if timeout is _DEFAULT:
            timeout = self.call_timeout
        deadline = self._deadline(timeout)
        conn = self._conn
        if conn is None or not conn.is_open:
            conn = await self._connection(deadline)
        return await conn.call(method, {} if fields is None else fields,
                               payload, deadline, timeout)

    async def notify(self, method: str, fields: dict | None = None,
                     payload=None, *, timeout: float | None = _DEFAULT
                     ) -> None:
        """Send a one-way message: returns once it is handed to the
        transport, after waiting (within ``timeout``) for a connection and
        for the send buffer to drain below high-water. No delivery
        guarantee: a connection can drop with it still buffered."""
        if timeout is _DEFAULT:
            timeout = self.call_timeout
        deadline = self._deadline(timeout)
        conn = self._conn
        if conn is None or not conn.is_open:
            conn = await self._connection(deadline)
        await conn.notify(method, {} if fields is None else fields, payload,
                          deadline)

    async def close(self) -> None:
        """Close the connection (calls in flight: ConnectionLost) and stop
        reconnecting; later calls raise Unavailable."""
        if self._closed:
            return
        self._closed = True
        if self._connector is not None:
            self._connector.cancel()
            try:
                await self._connector
            except (asyncio.CancelledError, Exception):
                pass
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close("client closed")
            try:
                await asyncio.wait_for(asyncio.shield(conn.closed), 5.0)
            except TimeoutError:
                conn.abort("client closed")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- connection management ---------------------------------------------

    def _deadline(self, timeout) -> float | None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if timeout is None:
            return None
        if timeout <= 0:
            raise ValueError("timeout must be > 0 or None")
        return self._loop.time() + timeout

    async def _connection(self, deadline: float | None) -> Connection:
        """The open connection, or the outcome of one connection attempt
        (started now, or already under way). Unavailable if backing off,
        if the attempt fails or does not finish by ``deadline``."""
        if self._closed:
            raise Unavailable(f"client for {self.address} is closed")
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        loop = self._loop
        if self._connector is None:
            wait = self._next_attempt - loop.time()
            if wait > 0:
                raise Unavailable(
                    f"{self.address} is unreachable (next attempt in "
                    f"{wait:.2f}s){self._last_error_text()}"
                ) from self._last_error
            self._connector = loop.create_task(self._attempt())
        remaining = None if deadline is None else deadline - loop.time()
        try:
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(self._connector), remaining)
        except asyncio.CancelledError:
            # close() cancelled the attempt under us (we ourselves were not)
            if self._closed and not asyncio.current_task().cancelling():
                raise Unavailable(f"client for {self.address} is closed"
                                  ) from None
            raise
        except TimeoutError:
            raise Unavailable(f"no connection to {self.address} within the "
                              f"deadline (attempt still under way)") from None
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        err = self._last_error
        if self._closed:
            raise Unavailable(f"client for {self.address} is closed")
        if isinstance(err, AuthenticationFailed):
            raise AuthenticationFailed(f"{self.address}: {err}") from err
        if err is None:
            raise Unavailable(f"the connection to {self.address} closed "
                              f"right after it opened")
        raise Unavailable(f"cannot connect to {self.address}"
                          f"{self._last_error_text()}") from err

    def _last_error_text(self) -> str:
        err = self._last_error
        return f": {type(err).__name__}: {err}" if err is not None else ""

    async def _attempt(self) -> None:
        """One connection attempt; records its outcome, never raises."""
        loop = self._loop
        try:
            conn = await self._open()
        except Exception as exc:            # OSError, TimeoutError, RpcError
            self._failures += 1
            self._last_error = exc
            backoff = min(self.backoff_max, self.backoff_initial
                          * self.backoff_multiplier
                          ** min(self._failures - 1, 64))
            backoff *= 1.0 - self.backoff_jitter * random.random()
            self._next_attempt = loop.time() + backoff
            level = (logging.WARNING if self._failures == 1
                     or isinstance(exc, AuthenticationFailed)
                     else logging.DEBUG)
            log.log(level, "rpc: connecting to %s failed (%s: %s); attempt "
                    "%d, next one allowed in %.2fs", self.address,
                    type(exc).__name__, exc, self._failures, backoff)
        else:
            self._failures = 0
            self._next_attempt = 0.0
            self._last_error = None
            self._conn = conn
            self.connects += 1
            log.debug("rpc: connected to %s", self.address)
        finally:
            self._connector = None

    async def _open(self) -> Connection:
        """One attempt: TCP connect + handshake within connect_timeout."""
        loop = self._loop
        transport = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: Connection("client", self._secret, self._limits,
                                       on_close=self._lost),
                    self.host, self.port)
                await conn.ready
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        return conn

    def _lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None
            if not self._closed:
                log.info("rpc: connection to %s lost (%s)", self.address,
                         conn._close_reason)


class ClientPool:
    """One RpcClient per peer address, created on first use.

        pool = ClientPool(secret, call_timeout=5.0)
        await pool.get("10.0.0.7", 7070).call("ping")
        await pool.close()
    """

    def __init__(self, secret: bytes, **client_options):
        self._secret = secret
        self._options = client_options
        self._clients: dict[tuple[str, int], RpcClient] = {}
        self._closed = False

    def get(self, host: str, port: int) -> RpcClient:
        if self._closed:
            raise Unavailable("client pool is closed")
        key = (host, int(port))
        client = self._clients.get(key)
        if client is None:
            client = RpcClient(host, key[1], self._secret, **self._options)
            self._clients[key] = client
        return client

    def __contains__(self, key) -> bool:
        return (key[0], int(key[1])) in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    async def discard(self, host: str, port: int) -> None:
        """Close and forget the client of a peer that left the cluster."""
        client = self._clients.pop((host, int(port)), None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
