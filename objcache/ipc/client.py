"""The reader side of local reads (docs/ipc.md): a connection to a chunk
owner on this host, its arena mapped read-only, and chunk views over the
mapping.

Lifetimes:
* ``LocalView.data`` is a read-only memoryview of a pinned page. The pin is
  held until the view and EVERY object derived from its data (slices,
  ``numpy``/``torch`` arrays) are gone — then the unpin is sent. Holding a
  slice holds the page; the owner answers "busy" past its per-client limit
  and the reader falls back to RPC, so a leak costs speed, not correctness.
* The mapping lives as long as any view of it; a closed or broken channel
  answers no new pins, and its views stay readable (the memfd outlives the
  owner process while mapped; a pinned page is never changed).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import socket
import threading
import time
import weakref

import numpy as np

from objcache.rpc.auth import AuthenticationFailed, ClientHandshake

from . import wire
from .paths import socket_path

log = logging.getLogger(__name__)

RETRY_CONNECT = 10.0        # seconds before a failed socket path is tried again


class NotLocal(Exception):
    """This pin cannot be served locally (not the leader, too many pins,
    channel gone): read over RPC."""


class LocalView:
    """A pinned chunk in a local owner's arena: the ChunkView interface
    (``data``, ``length``, ``start``, ``release``). ``owned``: slices of
    ``data`` may outlive the view (they keep the pin)."""
    __slots__ = ("data", "length")
    owned = True
    start = 0

    def __init__(self, data: memoryview):
        self.data = data
        self.length = len(data)

    def release(self) -> None:
        """Drop this view's reference; the pin ends with the last derived
        object (see the module docstring)."""
        self.data = None


class LocalChannel:
    """One connection to one owner's local-read socket."""

    def __init__(self, sock: socket.socket, node_id: int, mm: mmap.mmap, page_size: int,
                 npages: int):
        self.node_id = node_id
        self.page_size = page_size
        self.npages = npages
        self._sock = sock
        self._mm = mm
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._unpins: list[int] = []
        self._out: asyncio.Queue = asyncio.Queue()
        self._closed = False
        # Both end by themselves after close() (see there).
        self._tasks = [asyncio.create_task(self._read_loop(), name="local-read-in"),
                       asyncio.create_task(self._write_loop(), name="local-read-out")]

    @classmethod
    async def connect(cls, path: str, secret: bytes, *, node_id: int | None = None,
                      timeout: float = 2.0) -> "LocalChannel":
        """Connect, authenticate and map the arena; raises OSError when the
        socket is absent or dead, AuthenticationFailed / ProtocolError when
        the peer is not a node of this cluster (or not ``node_id``)."""
        sock, nid, fd, page_size, npages = await asyncio.to_thread(
            _handshake, path, secret, timeout)
        try:
            if node_id is not None and nid != node_id:
                raise wire.ProtocolError(f"{path} is node {nid}, not node {node_id}")
            mm = mmap.mmap(fd, page_size * npages, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            sock.close()
            raise
        finally:
            os.close(fd)
        sock.setblocking(False)
        return cls(sock, nid, mm, page_size, npages)

    @property
    def alive(self) -> bool:
        return not self._closed

    async def pin(self, group: int, inode: int, index: int, version: int, *, s3,
                  from_bucket: bool, size: int, ahead=None, base: int = -1):
        """A LocalView of the chunk, or None for a hole. Raises NotLocal
        when the owner wants this read done over RPC, OSError for the
        read's own errors (ESTALE, EIO...)."""
        if self._closed:
            raise NotLocal("channel closed")
        rid = next(self._rids)
        fut = self._loop.create_future()
        self._waiting[rid] = fut
        self._out.put_nowait(wire.encode(["pin", rid, group, inode, index, version, s3,
                                          from_bucket, size, ahead, base]))
        try:
            msg = await fut
        finally:
            self._waiting.pop(rid, None)
        kind = msg[0]
        if kind == "pinned":
            pid, offset, length = msg[2], msg[3], msg[4]
            return LocalView(memoryview(self._array(pid, offset, length)))
        if kind == "hole":
            return None
        if kind == "error":
            raise OSError(msg[2], msg[3])
        if kind == "not_leader":
            raise NotLocal(f"node {self.node_id} is not the leader of group {group}")
        raise NotLocal(f"node {self.node_id} answered {kind!r}")

    def _array(self, pid: int, offset: int, length: int) -> np.ndarray:
        if not (0 <= offset and offset + length <= self.page_size * self.npages):
            self._unpin(pid)
            raise wire.ProtocolError(f"pin {pid} [{offset}, +{length}) is outside the arena")
        # No MADV_POPULATE_READ: measured slower than the faults it saves
        # (shmem faults map 16 pages at a time; bench/RESULTS.md).
        arr = np.frombuffer(self._mm, np.uint8, count=length, offset=offset)
        # The pin ends when the array and every view of it are gone.
        weakref.finalize(arr, self._unpin, pid)
        return arr

    def _unpin(self, pid: int) -> None:
        if self._closed:
            return
        first = not self._unpins
        self._unpins.append(pid)
        if first:
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._flush_unpins)
            else:
                self._loop.call_soon_threadsafe(self._flush_unpins)

    def _flush_unpins(self) -> None:
        pids, self._unpins = self._unpins, []
        if pids and not self._closed:
            self._out.put_nowait(wire.encode(["unpin", pids]))

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._loop.sock_recv(self._sock, wire.MAX_MESSAGE)
                if not data:
                    if not self._closed:
                        log.info("local reads: node %d closed the channel", self.node_id)
                    return
                msg = wire.decode(data)
                if len(msg) < 2 or type(msg[1]) is not int:
                    raise wire.ProtocolError(f"answer without a request id: {msg!r:.80}")
                fut = self._waiting.get(msg[1])
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, OSError, wire.ProtocolError) as exc:
            log.info("local reads: channel to node %d closed: %r", self.node_id, exc)
        finally:
            self.close()
            self._sock.close()          # only here: no sock_recv is pending on it now

    async def _write_loop(self) -> None:
        try:
            while (msg := await self._out.get()) is not None:
                await self._loop.sock_sendall(self._sock, msg)
        except (ConnectionError, OSError) as exc:
            log.info("local reads: channel to node %d broken: %r", self.node_id, exc)
            self.close()

    def close(self) -> None:
        """No new pins; waiters get NotLocal. The owner releases every pin
        of this connection when it sees it close; views already handed out
        stay readable (pinned pages are never changed, see module doc).

        The socket is shut down, not closed: the reader's pending receive
        then returns (cancelling a pending uvloop sock_recv is unsafe), and
        the reader closes it."""
        if self._closed:
            return
        self._closed = True
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(["closed", 0])
        self._out.put_nowait(None)      # the writer stops
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _handshake(path: str, secret: bytes, timeout: float):
    """Blocking (run in a thread): connect, prove the secret, receive the
    arena. Returns (socket, node id, arena fd, page size, npages)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        hello = wire.decode(sock.recv(wire.MAX_MESSAGE), expect="hello")
        if len(hello) != 4 or hello[1] != wire.VERSION:
            raise wire.ProtocolError(f"unsupported hello {hello!r:.80}")
        hs = ClientHandshake(secret)
        auth = hs.on_hello({"nonce": hello[2]})
        sock.sendall(wire.encode(["auth", auth["nonce"], auth["mac"]]))
        msg, fd = wire.recv_with_fd(sock)
        try:
            if msg[0] == "denied":
                raise AuthenticationFailed(f"{path}: {msg[1:]}")
            if msg[0] != "ok" or len(msg) != 4 or fd is None:
                raise wire.ProtocolError(f"expected the arena, got {msg!r:.80}")
            hs.on_auth_ok({"mac": msg[1]})
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        return sock, hello[3], fd, msg[2], msg[3]
    except BaseException:
        sock.close()
        raise


class LocalReads:
    """The local channels of a cluster client: for each group, a channel to
    a member on this host, if there is one. Connections are made on first
    use; a path that failed is retried after RETRY_CONNECT seconds."""

    def __init__(self, secret: bytes, *, directory: str | None = None, clock=time.monotonic):
        self._secret = secret
        self._directory = directory
        self._clock = clock
        self._nodes: dict[int, str] = {}
        self._groups: dict[int, list[int]] = {}
        self._channels: dict[int, LocalChannel] = {}
        self._failed: dict[int, float] = {}
        self._connecting: dict[int, asyncio.Task] = {}

    def set_map(self, cluster: dict) -> None:
        self._nodes = {int(k): v for k, v in cluster["nodes"].items()}
        self._groups = {int(k): list(v) for k, v in cluster["groups"].items()}
        for nid in [n for n in self._channels if n not in self._nodes]:
            self._channels.pop(nid).close()

    async def channel(self, group: int, leader_hint: int | None = None) -> LocalChannel | None:
        members = self._groups.get(group, [])
        if leader_hint in members:
            members = [leader_hint] + [m for m in members if m != leader_hint]
        for nid in members:
            ch = await self._node_channel(nid)
            if ch is not None:
                return ch
        return None

    async def _node_channel(self, nid: int) -> LocalChannel | None:
        ch = self._channels.get(nid)
        if ch is not None and ch.alive:
            return ch
        if self._clock() < self._failed.get(nid, 0.0):
            return None
        task = self._connecting.get(nid)
        if task is None:
            task = self._connecting[nid] = asyncio.create_task(self._connect(nid))
            task.add_done_callback(lambda _t, n=nid: self._connecting.pop(n, None))
        return await asyncio.shield(task)

    async def _connect(self, nid: int) -> LocalChannel | None:
        addr = self._nodes.get(nid)
        path = socket_path(addr, self._directory) if addr else None
        if path is None or not os.path.exists(path):
            self._failed[nid] = self._clock() + RETRY_CONNECT
            return None
        try:
            ch = await LocalChannel.connect(path, self._secret, node_id=nid)
        except (OSError, AuthenticationFailed, wire.ProtocolError) as exc:
            log.info("local reads: node %d at %s not usable: %r", nid, path, exc)
            self._failed[nid] = self._clock() + RETRY_CONNECT
            return None
        log.info("local reads: node %d's arena mapped (%s)", nid, path)
        self._channels[nid] = ch
        return ch

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


class LocalFirst:
    """A chunk service (DataClient's ``services(group)``) that reads from a
    local owner's arena when it can and over ``rpc`` (a ChunkProxy)
    otherwise; writes always go over RPC (they are Raft proposals)."""
    ranged = True           # the RPC path honours ``want``; local views are whole chunks

    def __init__(self, channel: LocalChannel, group: int, rpc):
        self.channel = channel
        self.group = group
        self.rpc = rpc

    async def read(self, inode, index, version, *, s3, from_bucket, size, ahead=None,
                   base=-1, want=None):
        try:
            return await self.channel.pin(self.group, inode, index, version, s3=s3,
                                          from_bucket=from_bucket, size=size, ahead=ahead,
                                          base=base)
        except NotLocal:
            return await self.rpc.read(inode, index, version, s3=s3, from_bucket=from_bucket,
                                       size=size, ahead=ahead, base=base, want=want)

    async def write(self, *args, **kwargs):
        return await self.rpc.write(*args, **kwargs)
