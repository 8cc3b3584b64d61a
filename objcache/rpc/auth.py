"""Mutual HMAC-SHA256 challenge-response over the cluster secret.

Sans-I/O: these classes take and return frame ``fields`` dicts; the
connection moves them in HELLO / AUTH / AUTH_OK frames (docs/rpc.md):

    server -> client  HELLO    {nonce: Ns}                 Ns: 32 random bytes
    client -> server  AUTH     {nonce: Nc, mac: Mc}        Nc: 32 random bytes
                      Mc = HMAC-SHA256(secret, "objcache-rpc/1 client\\0" | Ns | Nc)
    server -> client  AUTH_OK  {mac: Ms}
                      Ms = HMAC-SHA256(secret, "objcache-rpc/1 server\\0" | Nc | Ns)

The server proves nothing until the client has proven itself, so a peer
without the secret learns only a MAC over nonces it chose half of (useless
for any later handshake, whose Ns is fresh). The role labels keep a client
proof from being reflected as a server proof. Both nonces have a fixed
length, so the concatenations are unambiguous. MACs are compared with
``hmac.compare_digest``.

Scope: this authenticates the two ends when the connection opens. It does
not encrypt or integrity-protect later frames (no TLS, no per-frame MAC):
see "Open problems" in docs/rpc.md.

Nothing here logs; callers log the peer address and the reason, never the
secret, the nonces or the MACs.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from .errors import AuthenticationFailed

NONCE_LEN = 32
_CLIENT_LABEL = b"objcache-rpc/1 client\0"
_SERVER_LABEL = b"objcache-rpc/1 server\0"


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + first + second, hashlib.sha256).digest()


def _nonce_field(fields, what: str) -> bytes:
    if not isinstance(fields, dict):
        raise AuthenticationFailed(f"malformed {what}")
    nonce = fields.get("nonce")
    if type(nonce) is not bytes or len(nonce) != NONCE_LEN:
        raise AuthenticationFailed(f"malformed nonce in {what}")
    return nonce


def _mac_field(fields, what: str) -> bytes:
    if not isinstance(fields, dict):
        raise AuthenticationFailed(f"malformed {what}")
    mac = fields.get("mac")
    if type(mac) is not bytes or len(mac) != hashlib.sha256().digest_size:
        raise AuthenticationFailed(f"malformed proof in {what}")
    return mac


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise ValueError("the cluster secret must be non-empty bytes")
    return bytes(secret)


class ServerHandshake:
    """Server side: ``hello()`` -> send HELLO; ``on_auth(fields)`` -> send
    AUTH_OK with the returned fields, or AuthenticationFailed."""

    def __init__(self, secret: bytes):
        self._secret = _check_secret(secret)
        self._nonce = os.urandom(NONCE_LEN)
        self.done = False

    def hello(self) -> dict:
        return {"nonce": self._nonce}

    def on_auth(self, fields) -> dict:
        nonce_c = _nonce_field(fields, "AUTH")
        mac_c = _mac_field(fields, "AUTH")
        if nonce_c == self._nonce:
            raise AuthenticationFailed("client echoed the server's nonce")
        expected = _mac(self._secret, _CLIENT_LABEL, self._nonce, nonce_c)
        if not hmac.compare_digest(mac_c, expected):
            raise AuthenticationFailed("client proof does not match the "
                                       "cluster secret")
        self.done = True
        return {"mac": _mac(self._secret, _SERVER_LABEL, nonce_c, self._nonce)}


class ClientHandshake:
    """Client side: ``on_hello(fields)`` -> send AUTH with the returned
    fields; ``on_auth_ok(fields)`` verifies the server, or raises
    AuthenticationFailed."""

    def __init__(self, secret: bytes):
        self._secret = _check_secret(secret)
        self._nonce = os.urandom(NONCE_LEN)
        self._server_nonce: bytes | None = None
        self.done = False

    def on_hello(self, fields) -> dict:
        if self._server_nonce is not None:
            raise AuthenticationFailed("second HELLO from the server")
        nonce_s = _nonce_field(fields, "HELLO")
        self._server_nonce = nonce_s
        return {"nonce": self._nonce,
                "mac": _mac(self._secret, _CLIENT_LABEL, nonce_s, self._nonce)}

    def on_auth_ok(self, fields) -> None:
        if self._server_nonce is None:
            raise AuthenticationFailed("AUTH_OK before HELLO")
        mac_s = _mac_field(fields, "AUTH_OK")
        expected = _mac(self._secret, _SERVER_LABEL, self._nonce,
                        self._server_nonce)
        if not hmac.compare_digest(mac_s, expected):
            raise AuthenticationFailed("server proof does not match the "
                                       "cluster secret")
        self.done = True
