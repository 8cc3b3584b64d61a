"""The owner side of local reads: pins chunk versions in this node's page
arena for processes on the same host (docs/ipc.md).

Lifetimes:
* A pin is a ``ChunkView`` held in its connection's table from the
  "pinned" answer until the client's "unpin" or the end of the connection
  (closed, killed client, malformed message): then every pin of the
  connection is released. A client therefore cannot leak pages beyond its
  own life.
* A connection holds at most ``max_pins`` pins (pinned or being loaded);
  past that it is answered "busy" and reads over RPC. Pinned pages cannot
  be evicted, so one client must not be able to fill the arena.
* ``close()`` stops accepting, drops every connection (releasing their
  pins) and removes the socket file, before the arena is closed.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from objcache.raft.types import NotLeader
from objcache.rpc.auth import AuthenticationFailed, ServerHandshake

from . import wire

log = logging.getLogger(__name__)


class LocalReadServer:
    """``read(group, inode, index, version, s3=, from_bucket=, size=, ahead=,
    base=)`` returns a pinned ChunkView, or None for a hole; it raises
    NotLeader when this node does not lead ``group`` (ChunkService.read)."""

    def __init__(self, path: str, secret: bytes, arena, read, *, node_id: int,
                 max_pins: int | None = None, handshake_timeout: float = 5.0):
        self.path = path
        self._secret = secret
        self._arena = arena
        self._read = read
        self.node_id = node_id
        self.max_pins = max_pins if max_pins is not None else max(2, arena.npages // 4)
        self._handshake_timeout = handshake_timeout
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[_Connection] = set()
        self.stats = {"connections": 0, "pins": 0, "busy": 0, "denied": 0, "bad_messages": 0}

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(self.path)            # a dead node's socket (see paths.py)
            except FileNotFoundError:
                pass
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(), name="local-reads")
        log.info("local reads: listening on %s", self.path)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            try:
                await self._accepting
            except BaseException:   # noqa: BLE001 - shutting down
                pass
        for conn in list(self._connections):
            conn.shutdown()                 # its task ends and releases the pins
            if conn.task is not None:
                await asyncio.gather(conn.task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @property
    def pinned(self) -> int:
        """Pins held for all clients (tests, status)."""
        return sum(len(c.pins) for c in self._connections)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                log.warning("local reads: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            conn = _Connection(self, sock)
            self._connections.add(conn)
            conn.task = asyncio.create_task(conn.run(), name="local-read-conn")


class _Connection:
    """One client: its handshake, requests, answers and pins."""

    def __init__(self, server: LocalReadServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.pins: dict[int, object] = {}          # pin id -> ChunkView
        self.loading = 0                           # pin requests being served
        self._next_pin = 1
        self._requests: set[asyncio.Task] = set()
        self._out: asyncio.Queue = asyncio.Queue()
        self._closed = False
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = asyncio.create_task(self._write_loop())
        try:
            if not await self._handshake(loop):
                return
            if self._closed:
                return
            self.server.stats["connections"] += 1
            while True:
                data = await loop.sock_recv(self.sock, wire.MAX_MESSAGE)
                if not data:
                    return                              # the client closed
                self._dispatch(wire.decode(data))
        except wire.ProtocolError as exc:
            self.server.stats["bad_messages"] += 1
            log.warning("local reads: dropping a client that sent a bad message: %s", exc)
        except (ConnectionError, OSError) as exc:
            log.debug("local reads: client connection ended: %r", exc)
        finally:
            self._out.put_nowait(None)          # the writer stops
            await asyncio.gather(writer, return_exceptions=True)
            self.release()
            # Closed only here, where no sock_recv is pending (cancelling a
            # pending uvloop sock_recv is unsafe).
            self.sock.close()

    async def _handshake(self, loop) -> bool:
        hs = ServerHandshake(self.server._secret)
        try:
            async with asyncio.timeout(self.server._handshake_timeout):
                await loop.sock_sendall(self.sock, wire.encode(
                    ["hello", wire.VERSION, hs.hello()["nonce"], self.server.node_id]))
                msg = wire.decode(await loop.sock_recv(self.sock, wire.MAX_MESSAGE),
                                  expect="auth")
                if len(msg) != 3:
                    raise wire.ProtocolError("auth: expected [auth, nonce, mac]")
                reply = hs.on_auth({"nonce": msg[1], "mac": msg[2]})
        except (AuthenticationFailed, wire.ProtocolError, TimeoutError) as exc:
            self.server.stats["denied"] += 1
            log.warning("local reads: handshake refused: %s", exc)
            try:
                self.sock.send(wire.encode(["denied", str(exc)]))
            except OSError:
                pass
            return False
        arena = self.server._arena
        # The send buffer is empty here (the client waits for this answer).
        wire.send_with_fd(self.sock, ["ok", reply["mac"], arena.page_size, arena.npages],
                          arena.fd)
        return True

    def _dispatch(self, msg: list) -> None:
        kind = msg[0]
        if kind == "pin":
            if len(msg) != 11 or type(msg[1]) is not int:
                raise wire.ProtocolError("pin: expected 11 fields")
            t = asyncio.create_task(self._pin(msg))
            self._requests.add(t)
            t.add_done_callback(self._requests.discard)
        elif kind == "unpin":
            if len(msg) != 2 or type(msg[1]) is not list:
                raise wire.ProtocolError("unpin: expected [unpin, [pin ids]]")
            for pid in msg[1]:
                view = self.pins.pop(pid, None)
                if view is not None:
                    view.release()
        else:
            raise wire.ProtocolError(f"unknown message kind {kind!r}")

    async def _pin(self, msg: list) -> None:
        _, rid, group, inode, index, version, s3, from_bucket, size, ahead, base = msg
        if len(self.pins) + self.loading >= self.server.max_pins:
            self.server.stats["busy"] += 1
            self._send(["busy", rid])
            return
        self.loading += 1
        try:
            view = await self.server._read(group, inode, index, version, s3=s3,
                                           from_bucket=from_bucket, size=size, ahead=ahead,
                                           base=base)
        except NotLeader as exc:
            self._send(["not_leader", rid, exc.leader or 0])
            return
        except OSError as exc:
            self._send(["error", rid, exc.errno or errno.EIO, str(exc)])
            return
        except (TypeError, ValueError, KeyError) as exc:
            self._send(["error", rid, errno.EINVAL, f"bad pin request: {exc}"])
            return
        except Exception as exc:   # noqa: BLE001 - answered, never kills the connection
            log.exception("local reads: pin of chunk %s/%s failed", inode, index)
            self._send(["error", rid, errno.EIO, repr(exc)])
            return
        finally:
            self.loading -= 1
        if view is None:
            self._send(["hole", rid])
            return
        if self._closed:
            view.release()
            return
        pid = self._next_pin
        self._next_pin += 1
        self.pins[pid] = view
        self.server.stats["pins"] += 1
        self._send(["pinned", rid, pid, view.offset, view.length])

    def _send(self, msg: list) -> None:
        if not self._closed:
            self._out.put_nowait(wire.encode(msg))   # None (the stop) is never a message

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (msg := await self._out.get()) is not None:
                await loop.sock_sendall(self.sock, msg)
        except (ConnectionError, OSError):
            self.shutdown()

    def shutdown(self) -> None:
        """End the connection: its pending receive returns and ``run``
        releases the pins and closes the socket."""
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def release(self) -> None:
        """Cancel the requests being served and release every pin."""
        self._closed = True
        for t in list(self._requests):
            t.cancel()
        for view in self.pins.values():
            view.release()
        self.pins.clear()
        self.server._connections.discard(self)
