"""Every exception the RPC layer raises, and the error codes on the wire.

What a caller of ``RpcClient.call`` can see, and what it tells about the
remote side effects (the caller decides whether to retry; this package never
re-sends a request by itself):

==================  ========================================================
``Unavailable``     no connection could be had in time: the request was
                    NOT sent. Always safe to retry.
``RpcTimeout``      the deadline passed. If the request had been written, a
                    cancel frame was sent; the handler may or may not have
                    run (partly or fully).
``ConnectionLost``  the connection dropped with the call in flight: the
                    handler may or may not have run.
``RemoteError``     the server answered with an error response (unknown
                    method, bad fields, handler raised ...): ``code``,
                    ``message``, ``remote_type``, ``details``.
``AuthenticationFailed``  the handshake failed (wrong cluster secret on
                    either side). Not transient: a configuration problem.
``FrameError``      a frame we were asked to send is over the limits, or
                    (internally) a peer sent a malformed frame; the latter
                    closes the connection, so callers see ConnectionLost.
==================  ========================================================
"""
from __future__ import annotations

# Error codes carried in error responses (the ``name`` slot of an ERROR frame).
UNKNOWN_METHOD = "unknown_method"   # no handler registered under that name
BAD_REQUEST = "bad_request"         # fields of the wrong shape or type
HANDLER_ERROR = "handler_error"     # the handler raised (type + message sent)
AUTH_FAILED = "auth_failed"         # handshake proof rejected (then closed)


class RpcError(Exception):
    """Base class of every error raised by ``objcache.rpc``."""


class FrameError(RpcError):
    """A frame is malformed or over a limit (bad magic, oversize lengths,
    undecodable header, ...). Received: the connection is closed. Sending:
    raised to the caller before anything is written."""


class AuthenticationFailed(RpcError):
    """The HMAC handshake failed: the peer does not know the cluster secret
    (or we do not). Raised by the client; the server logs and disconnects."""


class ConnectionLost(RpcError):
    """The connection closed while a call was in flight. The request may or
    may not have been executed."""


class Unavailable(RpcError):
    """The request was not sent: no connection to the peer (refused,
    unreachable, still backing off, the client is closed), or the
    connection closed while the call waited for send-buffer space."""


class RpcTimeout(RpcError, TimeoutError):
    """The call's deadline passed. A cancel frame was sent if the request
    had been written; the handler may or may not have run."""


class RemoteError(RpcError):
    """The peer answered with an error response."""

    def __init__(self, code: str, message: str = "", remote_type: str = "",
                 details: dict | None = None):
        self.code = code
        self.message = message
        self.remote_type = remote_type      # exception class name, if any
        self.details = details or {}
        super().__init__(code, message)

    def __str__(self):
        kind = f"{self.remote_type}: " if self.remote_type else ""
        return f"[{self.code}] {kind}{self.message}"


class HandlerError(RpcError):
    """Raised BY A HANDLER to answer with a chosen error code (e.g. a
    storage layer's ``not_owner`` with a hint in ``details``); the caller
    gets ``RemoteError(code, message, details=details)``. ``details`` must
    be msgpack-encodable."""

    code = HANDLER_ERROR

    def __init__(self, code: str | None = None, message: str = "",
                 details: dict | None = None):
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}
        super().__init__(self.code, message)

    def __str__(self):
        return f"[{self.code}] {self.message}"


class BadRequest(HandlerError):
    """Raised by a handler (or by field validation) when the request's
    fields have the wrong shape or types: error code ``bad_request``."""

    code = BAD_REQUEST

    def __init__(self, message: str = "", details: dict | None = None):
        super().__init__(None, message, details)
