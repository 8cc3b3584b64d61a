"""Where a node's local-read socket lives, so that a client that knows only
the node's cluster address ("host:port") finds it.

The directory is ``$OBJCACHE_IPC_DIR``, else ``/run/objcache`` for root and
``$XDG_RUNTIME_DIR/objcache`` (or ``<tmp>/objcache-<uid>``) for others. In
a container cluster it is a host directory shared by the node pods and the
mount pods of one host; pods on other hosts never find the socket and read
over RPC.

Two nodes cannot share a path: a name is the node's advertised address,
and one host has one listener per address. A stale socket (its node died)
is replaced by the next node that binds the name; a client that reaches a
node other than the one it expects drops the connection at the handshake
(docs/ipc.md).
"""
from __future__ import annotations

import os
import tempfile

ENV_DIR = "OBJCACHE_IPC_DIR"
SUN_PATH_MAX = 107                  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def ipc_dir() -> str:
    d = os.environ.get(ENV_DIR)
    if d:
        return d
    if os.geteuid() == 0:
        return "/run/objcache"
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "objcache")
    return os.path.join(tempfile.gettempdir(), f"objcache-{os.geteuid()}")


def socket_path(address: str, directory: str | None = None) -> str | None:
    """The socket path of the node at ``address``, or None when the path
    would not fit in a Unix socket address (then there are no local reads)."""
    name = "node-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in address)
    path = os.path.join(directory if directory is not None else ipc_dir(), name + ".sock")
    return path if len(os.fsencode(path)) <= SUN_PATH_MAX else None
