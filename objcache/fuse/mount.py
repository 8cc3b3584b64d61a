"""``objcache mount``: run the FUSE filesystem.

Without ``--cluster`` the process embeds a single-node server (data under
``--data-dir``, default ``~/.cache/objcache/<bucket>``) listening on
loopback only, with a per-mount random secret; with ``--cluster`` it is a
client of the cluster, and ``s3://BUCKET/PREFIX`` names the cluster's own
bucket and prefix (the mount shows the cluster's root) or a folder below it
(the mount shows that folder: objcache/client/subtree.py); anything else,
and the embedded server's options (``--endpoint-url``, ``--data-dir``,
``--cache-size``), are refused. Either way the FUSE side talks to the
cluster through ``ClusterClient`` (objcache/fuse/ops.py).

Lifetime: "mounted on MOUNTPOINT" is printed once the kernel has the mount.
SIGTERM, SIGINT and ``fusermount3 -u`` end it the same way: every open
file's writes are published, then — embedded mode — every dirty byte is
written to the bucket (a drain) before the process exits 0, so that after
an unmount the bucket holds the files. A killed embedded mount finds its
dirty data in ``--data-dir`` (the node's Raft log and chunk cache) at the
next mount and writes it back then. Without ``-f`` the command starts
itself in the foreground in a new session and returns once it is mounted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys

log = logging.getLogger("objcache.mount")


def _options(args) -> set[str]:
    opts = {"fsname=objcache", "subtype=objcache", "default_permissions"}
    for group in args.options:
        for o in group.split(","):
            o = o.strip()
            if o:
                opts.add(o)
    return opts


# Options of the embedded server: with --cluster the cluster's nodes hold
# the data, the cache and the S3 connection, so these are refused there.
EMBEDDED_ONLY = (("endpoint_url", "--endpoint-url"), ("data_dir", "--data-dir"),
                 ("cache_size", "--cache-size"))


def run_mount(args) -> int:
    if args.cluster:
        for attr, flag in EMBEDDED_ONLY:
            if getattr(args, attr) is not None:
                print(f"objcache mount: {flag} is an option of the embedded server; with "
                      f"--cluster the cluster's nodes have their own (drop {flag}, or "
                      f"drop --cluster to run an embedded server)", file=sys.stderr)
                return 2
    if not os.path.isdir(args.mountpoint):
        print(f"objcache mount: {args.mountpoint}: not a directory", file=sys.stderr)
        return 2
    if not args.foreground:
        return _background(args)
    import uvloop
    from objcache.client.location import OutsideCluster
    try:
        return uvloop.run(_main(args))
    except OutsideCluster as exc:
        print(f"objcache mount: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"objcache mount: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _background(args) -> int:
    argv = [sys.executable, "-m", "objcache"] + [a for a in sys.argv[1:]] + ["-f"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True,
                         start_new_session=True)
    line = p.stdout.readline()
    if "mounted" not in line:
        p.wait()
        return p.returncode or 1
    print(line, end="")
    return 0


async def _main(args) -> int:
    import pyfuse3
    import pyfuse3.asyncio

    from objcache.client.cluster import ClusterClient
    from objcache.rpc import load_secret
    from objcache.server import parse_bucket
    from objcache.units import parse_size

    from .ops import ObjcacheOperations
    from .readahead import DEFAULT_READAHEAD_KIB, mount_device

    pyfuse3.asyncio.enable()
    bucket, prefix = parse_bucket(args.bucket)
    node = None
    if args.cluster:
        client = await _cluster_folder(ClusterClient(args.cluster, load_secret(args.secret_file)),
                                       args.bucket)
    else:
        from objcache.engine.node import Node, NodeConfig
        data_dir = args.data_dir or os.path.join(
            os.path.expanduser("~/.cache/objcache"), bucket + ("-" + prefix.strip("/").replace(
                "/", "-") if prefix else ""))
        secret = secrets.token_bytes(32)
        cfg = NodeConfig(data_dir, ("127.0.0.1", 0), bucket, prefix,
                         endpoint_url=args.endpoint_url,
                         cache_size=parse_size(args.cache_size) if args.cache_size else 4 << 30,
                         secret=secret, writeback_delay=5.0)
        node = Node(cfg)
        await node.start()
        client = ClusterClient([("127.0.0.1", node.server.port)], secret)
    await client.getattr(1)                          # the cluster answers before we mount
    if node is not None:
        # Files a killed run held open after unlinking them: no open
        # survives the process, and this node has no other client.
        forgotten = await client.forget_orphans()
        if forgotten:
            log.info("forgot %d unlinked files the last run held open", forgotten)
    readahead = DEFAULT_READAHEAD_KIB if args.readahead_kib is None else args.readahead_kib
    ops = ObjcacheOperations(client, chunk_size=await client.chunk_size(),
                             mountpoint=args.mountpoint, readahead_kib=readahead)
    pyfuse3.init(ops, args.mountpoint, _options(args))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_worker_exception_handler)
    stopping = False

    def stop():
        nonlocal stopping
        stopping = True
        pyfuse3.terminate()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    print(f"mounted on {args.mountpoint}", flush=True)
    code = 0
    try:
        while True:
            await pyfuse3.main()
            # main() also returns when its last worker died (see
            # _worker_exception_handler) although the mount is still there:
            # then start the workers again. A signal or an unmount
            # (fusermount3 -u: the mount is gone) really ends it.
            if stopping or mount_device(args.mountpoint) is None:
                break
            log.warning("every FUSE worker ended while mounted: restarting them")
    finally:
        try:
            await ops.publish_all()
            if node is not None:
                await client.drain(timeout=3600)
        except Exception as exc:  # noqa: BLE001 - report, still unmount
            log.error("flushing at unmount failed: %r (dirty data stays in %s)", exc,
                      getattr(getattr(node, "cfg", None), "data_dir", "the cluster"))
            code = 1
        pyfuse3.close(unmount=True)
        await client.close()
        if node is not None:
            await node.stop()
    return code


async def _cluster_folder(client, url: str):
    """The client to mount ``url`` with: the cluster's root when ``url``
    is the cluster's bucket and prefix, a SubtreeClient for a folder below
    it (created if missing, as object-store folders exist only by their
    keys); anything else is refused (OutsideCluster names both)."""
    from objcache.client.location import ABOVE_ROOT, OutsideCluster
    from objcache.client.subtree import SubtreeClient
    from objcache.meta.model import Kind
    try:
        root = await client.root()
        rel = root.relative(url)
        if rel is ABOVE_ROOT:
            raise OutsideCluster(f"{url} is above the root of the cluster, which serves "
                                 f"{root.url}: mount {root.url} or a folder below it")
        if not rel:
            return client
        node = await client.getattr(1)
        for i, part in enumerate(rel.split("/")):
            try:
                node = await client.lookup(node.id, part.encode())
            except FileNotFoundError:
                node = await client.mkdir(node.id, part.encode(), 0o755, os.getuid(), os.getgid())
                log.info("created the folder %s", root.location("/".join(rel.split("/")[:i + 1])))
            if node.kind != Kind.DIR:
                raise OutsideCluster(f"{root.location('/'.join(rel.split('/')[:i + 1]))} is a "
                                     f"file, not a folder: cannot mount {url}")
        return SubtreeClient(client, node.id)
    except BaseException:
        await client.close()
        raise


def _worker_exception_handler(loop, context) -> None:
    """Two expected events of pyfuse3 3.5's asyncio mode are not errors;
    everything else goes to asyncio's default handler.

    A worker task raises when reading /dev/fuse answers EAGAIN: the fd
    polled readable, then the kernel withdrew the request before the read
    (its process was killed; stress-ng does this). That worker ends; the
    others go on, and ``_main`` restarts them if it was the last."""
    exc = context.get("exception")
    if isinstance(exc, BlockingIOError) and "fuse_session_receive_buf" in str(exc):
        log.info("a FUSE worker ended: a request was withdrawn before it was read")
        return
    if isinstance(exc, asyncio.InvalidStateError) and "set_result" in repr(context.get("handle")):
        # pyfuse3.asyncio.wait_readable registers future.set_result as the
        # /dev/fuse reader and removes it in a done callback; a level-
        # triggered wakeup in between calls it on a done future. Harmless.
        return
    loop.default_exception_handler(context)
