"""``objcache server`` / ``status`` / ``drain``: run a node, talk to a cluster."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys

from objcache.units import format_size, parse_size

log = logging.getLogger("objcache.server")


def parse_bucket(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ("bucket", "prefix/")."""
    if not url.startswith("s3://"):
        raise ValueError(f"bucket must look like s3://BUCKET[/PREFIX], not {url!r}")
    rest = url[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket name in {url!r}")
    return bucket, prefix


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def run_server(args) -> int:
    from objcache.engine.node import Node, NodeConfig
    from objcache.rpc import RpcError, load_secret
    if args.metrics_listen is not None:
        print("objcache server: --metrics-listen: metrics are not built in this version; "
              "start the server without it", file=sys.stderr)
        return 2
    try:
        bucket, prefix = parse_bucket(args.bucket)
        cfg = NodeConfig(args.data_dir, _hostport(args.listen), bucket, prefix,
                         endpoint_url=args.endpoint_url,
                         join=_hostport(args.join) if args.join else None,
                         replicas=args.replicas,
                         cache_size=parse_size(args.cache_size) if args.cache_size else 4 << 30,
                         chunk_size=parse_size(args.chunk_size), secret=load_secret(args.secret_file),
                         writeback_delay=args.writeback_delay)
    except (ValueError, OSError) as exc:
        print(f"objcache server: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        node = Node(cfg)
        try:
            await node.start()
        except (ValueError, OSError, RuntimeError, RpcError) as exc:
            what = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "")
            print(f"objcache server: could not start: {type(exc).__name__}: {what}",
                  file=sys.stderr)
            return 1
        print(f"objcache node {node.node_id} (group {node.group_id}) serving on "
              f"{node.address}; cache {format_size(cfg.cache_size)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await node.stop()
        return 0

    import uvloop
    return uvloop.run(main())


def run_admin(args) -> int:
    from objcache.client.cluster import ClusterClient
    from objcache.rpc import load_secret

    async def main() -> int:
        async with ClusterClient(args.cluster, load_secret(args.secret_file)) as c:
            if args.command == "status":
                st = await c.status()
                if args.json:
                    print(json.dumps(st, default=str))
                else:
                    print(f"ring version {st['ring_version']} (membership version "
                          f"{st.get('membership_version', '?')}), groups in the ring: "
                          f"{st['ring']}")
                    for n in st["nodes"]:
                        if "error" in n:
                            print(f"  node {n['node']} {n['address']}: unreachable ({n['error']})")
                            continue
                        r, p = n["raft"], n.get("pending") or [0, 0, 0]
                        print(f"  node {n['node']} {n['address']} group {n['group']} "
                              f"{r['role']} (leader {r['leader']}, term {r['term']}, "
                              f"applied {r['applied']}); dirty {p[0]} inodes "
                              f"{format_size(p[2])}")
                return 0
            await c.drain()
            print("drained: the bucket holds every byte")
            return 0

    try:
        return asyncio.run(main())
    except OSError as exc:
        print(f"objcache {args.command}: {exc}", file=sys.stderr)
        return 1
