"""Messages of the local-read protocol (docs/ipc.md): one msgpack array per
SOCK_SEQPACKET message, the kind first. The socket keeps message
boundaries, so there is no framing; a message longer than MAX_MESSAGE is
truncated by the kernel and fails to decode.

    server -> client  ["hello", VERSION, nonce, node_id]
    client -> server  ["auth", nonce, mac]
    server -> client  ["ok", mac, page_size, npages]   + the arena memfd (SCM_RIGHTS)
                      ["denied", reason]               (then the server closes)
    client -> server  ["pin", rid, group, inode, index, version, s3, from_bucket,
                       size, ahead, base]
                      ["unpin", [pin_id, ...]]
    server -> client  ["pinned", rid, pin_id, offset, length]
                      ["hole", rid]                    (never written: zeros)
                      ["not_leader", rid, leader]      (read over RPC instead)
                      ["busy", rid]                    (too many pins: read over RPC)
                      ["error", rid, errno, message]
"""
from __future__ import annotations

import array
import os
import socket

import msgpack

VERSION = 1
MAX_MESSAGE = 64 << 10


class ProtocolError(Exception):
    """A peer sent something this protocol does not allow."""


def encode(msg: list) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode(data: bytes, *, expect: str | None = None) -> list:
    """The message in ``data``; ProtocolError for anything malformed (not
    msgpack, not an array, no kind, or not the ``expect``-ed kind)."""
    if not data:
        raise ProtocolError("empty message")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:        # noqa: BLE001 - any decode failure is the peer's
        raise ProtocolError(f"undecodable message: {exc}") from None
    if type(msg) is not list or not msg or type(msg[0]) is not str:
        raise ProtocolError(f"not a message: {msg!r:.80}")
    if expect is not None and msg[0] != expect:
        raise ProtocolError(f"expected {expect!r}, got {msg[0]!r}")
    return msg


def send_with_fd(sock: socket.socket, msg: list, fd: int) -> None:
    """One message carrying ``fd``. The socket is non-blocking; this is
    called only on a socket whose send buffer is empty (the handshake)."""
    sock.sendmsg([encode(msg)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [fd]))])


def recv_with_fd(sock: socket.socket) -> tuple[list, int | None]:
    """One message and the fd it carried (None if none); blocking."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("control data truncated")
    for extra in fds[1:]:
        os.close(extra)
    return decode(data), (fds[0] if fds else None)
