"""One RPC connection (either end): handshake, multiplexing, cancellation,
backpressure. docs/rpc.md states the rules; this is where they live.

``Connection`` is an ``asyncio.BufferedProtocol``: the transport reads into
the FrameDecoder's buffers (large payloads straight into their own buffer)
and every complete frame is dispatched from ``buffer_updated``.

Roles. A *client* connection sends REQUEST/NOTIFY/CANCEL and receives
RESPONSE/ERROR; a *server* connection the reverse. A frame of the wrong
kind for the role is a protocol error and closes the connection.

Lifecycle: HANDSHAKE -> OPEN -> CLOSED. Until the peer has authenticated
(objcache/rpc/auth.py) the decoder accepts only tiny headers and no payload,
and nothing but handshake frames is processed. CLOSED is final: a client
makes a new Connection to reconnect.

Invariants (the "who owns what" of this module):

* Request ids (client side) come from a per-connection counter starting at 1
  and are never reused on that connection. An id is *retired* - removed from
  ``_pending`` - exactly once, by the first of: its RESPONSE/ERROR arriving,
  its deadline passing (-> RpcTimeout, CANCEL sent), the caller being
  cancelled (-> CANCEL sent), the connection closing (-> ConnectionLost).
  Frames for retired ids are dropped silently (a response racing a cancel).
* Server side, an id is live from its REQUEST until its handler task ends;
  a second REQUEST with a live id is a protocol error. A CANCEL for a live
  id cancels the handler's task and no answer is sent; a CANCEL for an
  unknown id is ignored.
* In-flight calls on a closing connection fail with ConnectionLost (never
  retried here: the caller knows whether the call is idempotent); running
  handlers are cancelled.
* Payload buffers: a received payload belongs to whoever gets the frame
  (handler or caller). A payload passed to call/notify/a handler result is
  handed to the transport as is, which may keep a reference until it is
  written: the sender must not modify it afterwards.
* Write backpressure: senders wait while the transport is above its
  high-water mark (``pause_writing``) before writing a REQUEST or NOTIFY,
  and a handler waits after writing its response; so the transport buffer
  holds at most high-water + one frame per writer that got in just before
  the pause (bounded by the number of calling tasks), never a queue.
* Read backpressure (server): reading pauses while ``max_concurrent``
  handlers are running, while their request payloads total
  ``max_inflight_bytes``, or while our own output is paused; frames
  already received wait in the decoder. Memory per connection is then
  bounded by the decoder (scratch + one partial frame) + the running
  handlers' payloads + the write buffer.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

from . import framing
from .auth import ClientHandshake, ServerHandshake
from .errors import (AUTH_FAILED, BAD_REQUEST, HANDLER_ERROR, UNKNOWN_METHOD,
                     AuthenticationFailed, ConnectionLost, FrameError,
                     HandlerError, RemoteError, RpcTimeout, Unavailable)
from .framing import (AUTH, AUTH_OK, CANCEL, ERROR, HELLO, KIND_NAMES, NOTIFY,
                      REQUEST, RESPONSE, encode_head, payload_buffer)
from .handlers import CallContext, Handler, check_fields, normalize_result

log = logging.getLogger("objcache.rpc")

PREAUTH_MAX_HEADER = 4096       # handshake frames are ~100 bytes
_SMALL_PAYLOAD = 16 << 10       # below this, head+payload go in one write()
_CORK_LIMIT = 256 << 10         # flush corked small frames at this size
# writelines() is vectored (no concatenation) in uvloop and in asyncio from
# 3.12; 3.11's asyncio joins the list into one bytes object.
_ASYNCIO_WRITELINES_VECTORED = sys.version_info >= (3, 12)

_HANDSHAKE, _OPEN, _CLOSED = "handshake", "open", "closed"


class Response(NamedTuple):
    """A call's answer. ``payload`` is None or a memoryview the caller owns."""
    fields: dict
    payload: memoryview | None


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; both ends should agree on the frame sizes."""
    max_header: int = framing.MAX_HEADER
    max_payload: int = framing.DEFAULT_MAX_PAYLOAD
    max_concurrent: int = 128           # server: handlers running at once
    max_inflight_bytes: int = 256 << 20  # server: their request payloads
    write_high: int = 1 << 20           # transport write buffer high-water
    write_low: int = 256 << 10
    handshake_timeout: float = 10.0

    def __post_init__(self):
        if not 1 <= self.max_header <= framing.MAX_HEADER:
            raise ValueError(f"max_header must be in 1..{framing.MAX_HEADER}")
        if not 0 <= self.max_payload <= framing.PAYLOAD_LEN_CEILING:
            raise ValueError("max_payload must fit in 32 bits")
        if self.max_concurrent < 1 or self.max_inflight_bytes < 1:
            raise ValueError("max_concurrent and max_inflight_bytes must be "
                             ">= 1")
        if not 0 <= self.write_low <= self.write_high:
            raise ValueError("need 0 <= write_low <= write_high")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0")


def format_peer(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr) if addr else "?"


class Connection(asyncio.BufferedProtocol):
    """One end of an RPC connection. Made by RpcServer (role "server", with
    ``handlers``) or RpcClient (role "client"); not used directly."""

    # Optional observer of flow-control transitions, set on the class (all
    # connections): ``Connection.flow_observer = fn``, called as
    # ``fn(connection, event)`` with event one of "write_paused",
    # "write_resumed", "read_paused", "read_resumed" (tests, metrics).
    flow_observer: Callable[["Connection", str], None] | None = None

    def _flow(self, event: str) -> None:
        observer = Connection.flow_observer     # plain function, not bound
        if observer is not None:
            observer(self, event)

    def __init__(self, role: str, secret: bytes, limits: Limits, *,
                 handlers: Mapping[str, Handler] | None = None,
                 on_open: Callable[["Connection"], None] | None = None,
                 on_close: Callable[["Connection"], None] | None = None):
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self._is_server = role == "server"
        if self._is_server and handlers is None:
            raise ValueError("a server connection needs handlers")
        self._handlers = handlers
        self._limits = limits
        self._on_open = on_open
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._handshake = (ServerHandshake(secret) if self._is_server
                           else ClientHandshake(secret))
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Client: resolves when the handshake succeeded, fails otherwise.
        self.ready: asyncio.Future = self._loop.create_future()
        # Resolves once the transport is gone (connection_lost ran).
        self.closed: asyncio.Future = self._loop.create_future()
        self._auth_error: AuthenticationFailed | None = None
        self._state = _HANDSHAKE
        self._close_reason = "not connected"
        self._transport: asyncio.Transport | None = None
        self._vectored = _ASYNCIO_WRITELINES_VECTORED
        self._cork: list = []               # small frames written this iteration
        self._cork_bytes = 0
        self.peer = "?"
        self._decoder = framing.FrameDecoder(PREAUTH_MAX_HEADER, 0)
        self._pack = framing.new_packer()
        self._processing = False            # re-entrancy guard of _process
        # client side
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        # server side
        self._running: dict[int, tuple[asyncio.Task, CallContext]] = {}
        self._notify_tasks: set[asyncio.Task] = set()
        self._active = 0                    # running handler tasks
        self._inflight_bytes = 0            # their request payload bytes
        self._reading_paused = False
        # write backpressure
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []

    # -- state -----------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state is _OPEN

    @property
    def in_flight(self) -> int:
        """Client: calls awaiting an answer. Server: running handlers."""
        return len(self._pending) + self._active

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    def write_buffer_size(self) -> int:
        t = self._transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def __repr__(self):
        role = "server" if self._is_server else "client"
        return f"<rpc.Connection {role} {self.peer} {self._state}>"

    # -- asyncio protocol callbacks ---------------------------------------

    def connection_made(self, transport):
        self._transport = transport
        self.peer = format_peer(transport.get_extra_info("peername"))
        self._vectored = (_ASYNCIO_WRITELINES_VECTORED
                          or type(transport).__module__.startswith("uvloop"))
        transport.set_write_buffer_limits(self._limits.write_high,
                                          self._limits.write_low)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:    # notice dead peers on idle connections eventually
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                pass
        self._handshake_timer = self._loop.call_later(
            self._limits.handshake_timeout, self._handshake_expired)
        if self._is_server:
            self._send(HELLO, 0, "", self._handshake.hello())

    def get_buffer(self, sizehint):
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self._decoder.buffer_updated(nbytes)
        self._process()

    def eof_received(self):
        return False            # half-closed is closed: let the transport go

    def connection_lost(self, exc):
        if self._state is not _CLOSED:
            pending = self._decoder.pending_bytes()
            if pending and self._state is _OPEN:
                log.warning("rpc: %s closed the connection in the middle of "
                            "a frame (%d bytes of it received)", self.peer,
                            pending)
            why = f"{type(exc).__name__}: {exc}" if exc else "closed by peer"
            self._teardown(why)
        if not self.closed.done():
            self.closed.set_result(None)
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb(self)

    def pause_writing(self):
        self._write_paused = True
        self._flow("write_paused")

    def resume_writing(self):
        self._write_paused = False
        self._flow("write_resumed")
        self._wake_writers()
        if self._is_server:
            self._maybe_resume_reading()

    # -- frame intake ------------------------------------------------------

    def _process(self):
        """Dispatch every complete frame in the decoder, unless reading is
        paused (server admission limits). Never raises: a bad frame or an
        internal error closes this connection only."""
        if self._processing:
            return      # a nested call (e.g. resume_writing during a write);
                        # the outer loop re-checks the limits every frame
        self._processing = True
        try:
            dec = self._decoder
            while self._state is not _CLOSED:
                if (self._is_server and self._state is _OPEN
                        and self._admission_blocked()):
                    if not self._reading_paused:
                        self._reading_paused = True
                        self._transport.pause_reading()
                        self._flow("read_paused")
                    return
                frame = dec.next_frame()
                if frame is None:
                    return
                if self._state is _OPEN:
                    if self._is_server:
                        self._dispatch_server(frame)
                    else:
                        self._dispatch_client(frame)
                else:
                    self._handshake_frame(frame)
        except FrameError as exc:
            self._fail(f"protocol error: {exc}")
        except AuthenticationFailed as exc:
            self._auth_failed(exc)
        except Exception:
            log.exception("rpc: internal error on the connection with %s; "
                          "closing it", self.peer)
            self._fail("internal error", quiet=True)
        finally:
            self._processing = False

    def _admission_blocked(self) -> bool:
        lim = self._limits
        return (self._active >= lim.max_concurrent
                or self._inflight_bytes >= lim.max_inflight_bytes
                or self._write_paused)

    def _maybe_resume_reading(self):
        if (not self._reading_paused or self._processing
                or self._state is not _OPEN or self._admission_blocked()):
            return
        self._process()             # frames received before the pause first
        if (self._reading_paused and self._state is _OPEN
                and not self._admission_blocked()):
            self._reading_paused = False
            self._transport.resume_reading()
            self._flow("read_resumed")

    # -- handshake -----------------------------------------------------------

    def _handshake_frame(self, frame):
        kind = frame.kind
        if self._is_server:
            if kind != AUTH:
                raise AuthenticationFailed(
                    f"expected AUTH, got a {KIND_NAMES[kind]} frame")
            self._send(AUTH_OK, 0, "", self._handshake.on_auth(frame.fields))
        elif kind == HELLO:
            self._send(AUTH, 0, "", self._handshake.on_hello(frame.fields))
            return
        elif kind == AUTH_OK:
            self._handshake.on_auth_ok(frame.fields)
        elif kind == ERROR and frame.name == AUTH_FAILED:
            raise AuthenticationFailed(
                f"{self.peer} rejected our credentials (is the cluster secret "
                f"the same on both sides?)")
        else:
            raise AuthenticationFailed(
                f"unexpected {KIND_NAMES[kind]} frame during the handshake")
        # Authenticated.
        self._state = _OPEN
        self._close_reason = "open"
        self._cancel_handshake_timer()
        self._decoder.set_limits(self._limits.max_header,
                                 self._limits.max_payload)
        if not self.ready.done():
            self.ready.set_result(None)
        if self._on_open is not None:
            self._on_open(self)

    def _auth_failed(self, exc: AuthenticationFailed):
        """Log (peer address and reason only: never the secret or MACs) and
        disconnect. A server tells the client first, so that it can report
        a wrong secret rather than a dropped connection."""
        if self._is_server:
            log.warning("rpc: authentication failed for %s: %s; "
                        "disconnecting", self.peer, exc)
            self._send(ERROR, 0, AUTH_FAILED,
                       {"message": "authentication failed"})
            self._auth_error = exc
            self._teardown(f"authentication failed: {exc}")
            self._transport.close()         # flushes the ERROR frame
        else:
            # RpcClient logs the failed attempt (with its backoff).
            log.debug("rpc: authentication with %s failed: %s",
                      self.peer, exc)
            self._auth_error = AuthenticationFailed(str(exc))
            self._fail(f"authentication failed: {exc}", quiet=True)

    def _handshake_expired(self):
        self._handshake_timer = None
        if self._state is _HANDSHAKE:
            msg = (f"no handshake within {self._limits.handshake_timeout:g}s")
            self._auth_error = AuthenticationFailed(msg)
            self._fail(msg)

    def _cancel_handshake_timer(self):
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    # -- server: requests, notifications, cancels ---------------------------

    def _dispatch_server(self, frame):
        kind = frame.kind
        if kind == REQUEST:
            rid = frame.id
            if rid in self._running:
                raise FrameError(f"request id {rid} is already in flight")
            handler = self._handlers.get(frame.name)
            if handler is None:
                log.warning("rpc: unknown method %.100r from %s", frame.name,
                            self.peer)
                self._send_error(rid, UNKNOWN_METHOD,
                                 f"no method named {frame.name!r:.100}")
                return
            problem = check_fields(handler, frame.fields)
            if problem is not None:
                log.warning("rpc: bad request %.100r from %s: %s",
                            frame.name, self.peer, problem)
                self._send_error(rid, BAD_REQUEST, problem, "BadRequest")
                return
            ctx = CallContext(self.peer, frame.name, rid)
            task = self._loop.create_task(
                self._serve(handler, ctx, frame.fields, frame.payload))
            self._running[rid] = (task, ctx)
            self._admit(frame.payload)
        elif kind == NOTIFY:
            handler = self._handlers.get(frame.name)
            problem = ("unknown method" if handler is None
                       else check_fields(handler, frame.fields))
            if problem is not None:
                log.warning("rpc: dropped notification %.100r from %s: %s",
                            frame.name, self.peer, problem)
                return
            ctx = CallContext(self.peer, frame.name, None)
            task = self._loop.create_task(
                self._serve_notification(handler, ctx, frame.fields,
                                         frame.payload))
            self._notify_tasks.add(task)
            self._admit(frame.payload)
        elif kind == CANCEL:
            entry = self._running.get(frame.id)
            if entry is not None:
                task, ctx = entry
                ctx._cancelled = True
                task.cancel()
        else:
            raise FrameError(f"a client sent a {KIND_NAMES[kind]} frame")

    def _admit(self, payload):
        self._active += 1
        if payload is not None:
            self._inflight_bytes += payload.nbytes

    def _release(self, payload):
        self._active -= 1
        if payload is not None:
            self._inflight_bytes -= payload.nbytes
        self._maybe_resume_reading()

    async def _serve(self, handler, ctx: CallContext, fields, payload):
        """Run one request's handler and answer it. Holds its admission slot
        until the answer is handed to the transport and the transport is
        below high-water again (a peer that does not read our answers
        stops us reading its requests)."""
        rid = ctx.request_id
        try:
            try:
                result = handler(ctx, fields, payload)
                if inspect.isawaitable(result):
                    result = await result
                out_fields, out_payload = normalize_result(result)
                if out_payload is None:
                    body, blen = None, 0
                else:
                    body, blen = payload_buffer(out_payload)
                    if blen > self._limits.max_payload:
                        raise FrameError(f"response payload of {blen} bytes "
                                         f"exceeds the {self._limits.max_payload}"
                                         f"-byte limit")
                head = encode_head(RESPONSE, rid, "", out_fields, blen,
                                   self._limits.max_header, self._pack)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise       # cancelled by CANCEL or close: no answer
                # The handler let a CancelledError of its own escape.
                head, body = self._error_head(
                    rid, HANDLER_ERROR, "the handler was cancelled",
                    "CancelledError"), None
            except HandlerError as exc:
                log.info("rpc: %s from %s answered %s", ctx.method, ctx.peer,
                         exc)
                head, body = self._error_head(
                    rid, exc.code, exc.message, type(exc).__name__,
                    exc.details), None
            except Exception as exc:
                log.warning("rpc: handler %r (call from %s) raised %s: %s",
                            ctx.method, ctx.peer, type(exc).__name__, exc,
                            exc_info=True)
                head, body = self._error_head(
                    rid, HANDLER_ERROR, str(exc), type(exc).__name__), None
            if self._state is _OPEN:
                self._write(head, body)
                if self._write_paused:
                    await self._wait_writable(None, ctx.method)
        except (asyncio.CancelledError, Unavailable):
            pass    # the id is retired without an answer (see module doc)
        finally:
            self._running.pop(rid, None)
            self._release(payload)

    async def _serve_notification(self, handler, ctx, fields, payload):
        try:
            result = handler(ctx, fields, payload)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.warning("rpc: notification handler %r (from %s) raised %s: "
                        "%s", ctx.method, ctx.peer, type(exc).__name__, exc,
                        exc_info=True)
        finally:
            self._notify_tasks.discard(asyncio.current_task())
            self._release(payload)

    def _error_head(self, rid, code, message, exc_type="", details=None):
        fields = {"message": message, "type": exc_type}
        if details:
            fields["details"] = details
        try:
            return encode_head(ERROR, rid, code, fields, 0,
                               self._limits.max_header, self._pack)
        except (TypeError, ValueError, FrameError):
            # Unencodable details, or an enormous message: send the gist.
            fields = {"message": str(message)[:4000], "type": exc_type}
            return encode_head(ERROR, rid, code, fields, 0,
                               self._limits.max_header, self._pack)

    def _send_error(self, rid, code, message, exc_type=""):
        self._write(self._error_head(rid, code, message, exc_type), None)

    # -- client: answers ---------------------------------------------------

    def _dispatch_client(self, frame):
        kind = frame.kind
        if kind != RESPONSE and kind != ERROR:
            raise FrameError(f"a server sent a {KIND_NAMES[kind]} frame")
        fut = self._pending.pop(frame.id, None)
        if fut is None or fut.done():
            return      # retired id (timed out or cancelled): drop the answer
        fields = frame.fields
        if type(fields) is not dict:
            fut.set_exception(FrameError(
                f"malformed {KIND_NAMES[kind]} from {self.peer}: fields are "
                f"{type(fields).__name__}"))
        elif kind == RESPONSE:
            fut.set_result(Response(fields, frame.payload))
        else:
            details = fields.get("details")
            fut.set_exception(RemoteError(
                frame.name, str(fields.get("message", "")),
                str(fields.get("type", "")),
                details if type(details) is dict else None))

    # -- client: sending -----------------------------------------------------

    def _check_sendable(self, fields, payload):
        if self._state is not _OPEN:
            raise Unavailable(f"connection to {self.peer} is {self._state}: "
                              f"{self._close_reason}; nothing was sent")
        if type(fields) is not dict:
            raise TypeError(f"fields must be a dict, not "
                            f"{type(fields).__name__}")
        if payload is None:
            return None, 0
        body, blen = payload_buffer(payload)
        if blen > self._limits.max_payload:
            raise FrameError(f"payload of {blen} bytes exceeds the "
                             f"{self._limits.max_payload}-byte limit")
        return body, blen

    async def call(self, method: str, fields: dict, payload, deadline,
                   timeout) -> Response:
        """Send a request and await its answer. ``deadline`` is loop time
        (or None); ``timeout`` only names it in the RpcTimeout message."""
        body, blen = self._check_sendable(fields, payload)
        rid = self._next_id
        self._next_id += 1
        head = encode_head(REQUEST, rid, method, fields, blen,
                           self._limits.max_header, self._pack)
        if self._write_paused:
            await self._wait_writable(deadline, method)
        fut = self._loop.create_future()
        self._pending[rid] = fut
        self._write(head, body)
        timer = (None if deadline is None else
                 self._loop.call_at(deadline, self._expire, rid, method,
                                    timeout))
        try:
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None:
                self._send_cancel(rid)
            elif fut.done() and not fut.cancelled():
                fut.exception()     # answered as we were cancelled: consumed
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def notify(self, method: str, fields: dict, payload,
                     deadline) -> None:
        """Queue a one-way frame; waits (until ``deadline``) while the
        transport is above high-water."""
        body, blen = self._check_sendable(fields, payload)
        head = encode_head(NOTIFY, 0, method, fields, blen,
                           self._limits.max_header, self._pack)
        if self._write_paused:
            await self._wait_writable(deadline, method)
        self._write(head, body)

    def _expire(self, rid, method, timeout):
        fut = self._pending.pop(rid, None)
        if fut is None or fut.done():
            return
        fut.set_exception(RpcTimeout(
            f"{method} to {self.peer} timed out after {timeout:g}s"))
        self._send_cancel(rid)

    def _send_cancel(self, rid):
        # Not subject to backpressure: at most one per retired call, 24 bytes.
        if self._state is _OPEN:
            self._send(CANCEL, rid, "", {})

    # -- writing -----------------------------------------------------------

    def _send(self, kind, rid, name, fields):
        self._write(encode_head(kind, rid, name, fields, 0,
                                self._limits.max_header, self._pack), None)

    def _write(self, head: bytes, body) -> None:
        """Hand one frame to the transport. The payload object itself is
        passed on (no copy) unless it is small.

        Small frames of an open connection are corked: collected during the
        current event-loop iteration and written with one send at its end
        (call_soon), so a burst of frames — a Raft Ready's messages, many
        concurrent calls' answers — costs one syscall instead of one each
        (measured: the per-frame write was 35% of a Raft leader's CPU).
        A large payload flushes the cork first, so frames keep their order.
        """
        t = self._transport
        if t is None or t.is_closing():
            return
        small = body is None or len(body) <= _SMALL_PAYLOAD
        if small and self._state is _OPEN:
            if not self._cork:
                self._loop.call_soon(self._flush_cork)
            self._cork.append(head)
            if body is not None:
                self._cork.append(body)
                self._cork_bytes += len(body)
            self._cork_bytes += len(head)
            if self._cork_bytes >= _CORK_LIMIT:
                self._flush_cork()
            return
        self._flush_cork()
        if body is None:
            t.write(head)
        elif small:
            t.write(head + body)
        elif self._vectored:
            t.writelines((head, body))
        else:
            t.write(head)
            t.write(body)

    def _flush_cork(self) -> None:
        if not self._cork:
            return
        frames, self._cork, self._cork_bytes = self._cork, [], 0
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(b"".join(frames))

    async def _wait_writable(self, deadline, what) -> None:
        """Wait until the transport is below its low-water mark. Raises
        Unavailable if the connection closes meanwhile, RpcTimeout at
        ``deadline`` (either way the frame was not written)."""
        while self._write_paused:
            if self._state is _CLOSED:
                break
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            try:
                if deadline is None:
                    await fut
                else:
                    remaining = deadline - self._loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                raise RpcTimeout(f"{what} to {self.peer}: timed out waiting "
                                 f"for send buffer space (peer not reading)"
                                 ) from None
            finally:
                if not fut.done():
                    try:
                        self._drain_waiters.remove(fut)
                    except ValueError:
                        pass
        if self._state is not _OPEN:
            raise Unavailable(f"connection to {self.peer} closed before "
                              f"{what} was sent: {self._close_reason}")

    def _wake_writers(self):
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- closing ---------------------------------------------------------------

    def close(self, reason: str = "closed locally") -> None:
        """Close gracefully: fail in-flight calls (ConnectionLost), cancel
        running handlers, flush what is already written, disconnect."""
        self._flush_cork()
        self._teardown(reason)
        if self._transport is not None:
            self._transport.close()

    def abort(self, reason: str = "aborted locally") -> None:
        self._teardown(reason)
        if self._transport is not None:
            self._transport.abort()

    def handler_tasks(self) -> list[asyncio.Task]:
        return [t for t, _ in self._running.values()] + list(self._notify_tasks)

    def _fail(self, reason: str, quiet: bool = False):
        """Drop the connection after a protocol violation (logged)."""
        if self._state is _CLOSED:
            return
        if not quiet:
            log.warning("rpc: closing the connection with %s: %s",
                        self.peer, reason)
        self.abort(reason)

    def _teardown(self, reason: str):
        """Enter CLOSED (once): fail pending calls, cancel handlers, wake
        writers. The transport is closed by the caller / already gone."""
        if self._state is _CLOSED:
            return
        self._state = _CLOSED
        self._close_reason = reason
        self._cancel_handshake_timer()
        if not self.ready.done():
            self.ready.set_exception(self._auth_error or ConnectionLost(
                f"connection to {self.peer} closed during the handshake: "
                f"{reason}"))
            self.ready.exception()  # consumed here if nobody awaits it
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(
                    f"connection to {self.peer} lost with the call in "
                    f"flight ({reason}); it may or may not have run"))
        for task, ctx in self._running.values():
            ctx._cancelled = True
            task.cancel()
        for task in self._notify_tasks:
            task.cancel()
        self._wake_writers()
