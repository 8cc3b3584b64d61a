"""The ``objcache`` command.

The sub-commands and their flags are a contract driven by outside tools
(see docs/ARCHITECTURE.md, "Contract"); keep them stable. Commands whose
subsystem is not built yet exit with status 2 and say so.
"""
from __future__ import annotations

import argparse
import logging
import sys

CONTRACT_NOT_BUILT = {
    "leave": "membership changes of a running cluster (rebalancing)",
    "warmup": "the warmup command",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="objcache",
        description="Elastic caching filesystem over S3-compatible object storage.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("server", help="run a cache node")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--listen", required=True, metavar="HOST:PORT")
    s.add_argument("--join", metavar="HOST:PORT")
    s.add_argument("--bucket", required=True, metavar="s3://BUCKET[/PREFIX]")
    s.add_argument("--endpoint-url")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--cache-size")
    s.add_argument("--metrics-listen", metavar="HOST:PORT")
    s.add_argument("--secret-file")
    s.add_argument("--chunk-size", default="8MiB", help=argparse.SUPPRESS)
    s.add_argument("--writeback-delay", type=float, default=5.0, help=argparse.SUPPRESS)

    m = sub.add_parser("mount", help="mount a bucket with FUSE")
    m.add_argument("bucket", metavar="s3://BUCKET[/PREFIX]")
    m.add_argument("mountpoint")
    m.add_argument("--cluster", metavar="HOST:PORT[,...]")
    m.add_argument("--endpoint-url")
    m.add_argument("--data-dir")
    m.add_argument("--cache-size")
    m.add_argument("-f", "--foreground", action="store_true")
    m.add_argument("-o", dest="options", action="append", default=[],
                   metavar="OPTION[,...]")
    m.add_argument("--secret-file")
    m.add_argument("--readahead-kib", type=int, default=None,
                   help="kernel readahead window for the mount (default 1024; "
                        "0 keeps the kernel's; raising it needs root)")

    st = sub.add_parser("status", help="show the cluster")
    st.add_argument("--cluster", required=True, metavar="HOST:PORT")
    st.add_argument("--json", action="store_true")
    st.add_argument("--secret-file")

    d = sub.add_parser("drain", help="flush every dirty byte to S3")
    d.add_argument("--cluster", required=True, metavar="HOST:PORT")
    d.add_argument("--secret-file")

    lv = sub.add_parser("leave", help="remove a node from the cluster")
    lv.add_argument("--cluster", required=True, metavar="HOST:PORT")
    lv.add_argument("--node", required=True, metavar="NODE_ID")
    lv.add_argument("--secret-file")

    w = sub.add_parser("warmup", help="fetch files into the cluster cache")
    w.add_argument("paths", nargs="+", metavar="PATH")
    w.add_argument("--cluster", metavar="HOST:PORT")
    w.add_argument("--secret-file")

    dm = sub.add_parser("demo", help="run the end-to-end demo on a loopback S3")
    dm.add_argument("--size", default="1GiB",
                    help="total size of the sample model (default 1GiB)")
    dm.add_argument("--keep", action="store_true",
                    help="keep the demo's working directory")
    return p


def main(argv: list[str] | None = None) -> int:
    from objcache.malloc import bound_freed_memory
    bound_freed_memory()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from objcache.demo import run_demo
        return run_demo(size=args.size, keep=args.keep)
    if args.command == "server":
        from objcache.server import run_server
        return run_server(args)
    if args.command == "mount":
        from objcache.fuse.mount import run_mount
        return run_mount(args)
    if args.command in ("status", "drain"):
        from objcache.server import run_admin
        return run_admin(args)
    what = CONTRACT_NOT_BUILT[args.command]
    print(f"objcache {args.command}: not available yet — {what} is not built "
          f"in this version (see docs/ARCHITECTURE.md)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
