"""Zero-copy local reads: a process on the same host as a chunk owner reads
the owner's cached chunks straight out of its page arena (shared memory)
instead of receiving copies over a TCP socket.

* ``server.LocalReadServer`` (in every ``objcache server``): a Unix
  SOCK_SEQPACKET socket at ``paths.socket_path(node address)``. After the
  cluster-secret handshake it passes the arena's memfd (SCM_RIGHTS); then it
  pins chunk versions on request and unpins them when told.
* ``client.LocalReads`` (in ``ClusterClient``): finds the owners on this
  host by their socket paths, maps each arena read-only, and serves chunk
  reads as views of the mapping (``client.LocalView``).

Protocol, lifetimes and ordering rules: docs/ipc.md.
"""
from .paths import ipc_dir, socket_path

__all__ = ["ipc_dir", "socket_path"]
