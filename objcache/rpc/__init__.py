"""Cluster RPC: length-prefixed msgpack headers + raw payloads over TCP,
mutual HMAC authentication, many calls in flight per connection.

Modules, one concept each (docs/rpc.md has the wire format and the rules):

* ``framing``    - frame byte layout, encoder, incremental decoder
* ``auth``       - the HMAC-SHA256 challenge-response (sans-I/O)
* ``secret``     - loading the cluster secret (--secret-file / env)
* ``connection`` - one connection: handshake, multiplexing, cancellation,
                   backpressure (an asyncio.BufferedProtocol)
* ``handlers``   - what handlers receive and return; ``@expects`` checks
* ``server``     - RpcServer
* ``client``     - RpcClient (reconnect with backoff), ClientPool
* ``errors``     - the exceptions and wire error codes
"""
from .client import ClientPool, RpcClient
from .connection import Response
from .errors import (AuthenticationFailed, BadRequest, ConnectionLost,
                     FrameError, HandlerError, RemoteError, RpcError,
                     RpcTimeout, Unavailable)
from .handlers import CallContext, expects
from .secret import SecretError, load_secret
from .server import RpcServer

__all__ = [
    "RpcServer", "RpcClient", "ClientPool", "Response", "CallContext",
    "expects", "load_secret", "SecretError",
    "RpcError", "RemoteError", "RpcTimeout", "ConnectionLost", "Unavailable",
    "AuthenticationFailed", "FrameError", "HandlerError", "BadRequest",
]
