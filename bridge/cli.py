"""The ``xdl`` command line: run a shard, inspect a cluster, list plugins.

Examples::

    xdl server --bind tcp://127.0.0.1:7000 --shard 0 --num-shards 2
    xdl ping --servers tcp://127.0.0.1:7000,tcp://127.0.0.1:7001
    xdl stats --servers ...          # rows, bytes, request counts and latencies
    xdl save --servers ... ckpt/     # checkpoint; `xdl load` restores one
    xdl plugins                      # every plugin with its version and hooks
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdl", description="xdl-bridge parameter server tools")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("server", help="run one parameter-server shard")
    s.add_argument("--bind", default=os.environ.get("XDL_BIND", "tcp://127.0.0.1:7000"),
                   help="ZeroMQ endpoint to bind (port 0: any free port); default "
                        "tcp://127.0.0.1:7000 (XDL_BIND)")
    s.add_argument("--shard", type=int, default=0, help="this shard's index (0-based)")
    s.add_argument("--num-shards", type=int, default=1, help="number of shards in the cluster")
    s.add_argument("--max-request-bytes", type=_size, default="1g",
                   help="largest request accepted, e.g. 256m (default 1g)")
    s.add_argument("--load", metavar="CKPT", help="restore this checkpoint before serving")
    s.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default=os.environ.get("XDL_LOG_LEVEL", "INFO"))

    for name, text in (("ping", "check that every shard answers"),
                       ("stats", "print per-shard statistics as JSON"),
                       ("shutdown", "stop every shard of a cluster")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--servers", default=os.environ.get("XDL_SERVERS"),
                       help="comma-separated endpoints in shard order (XDL_SERVERS)")
    for name, text in (("save", "write a checkpoint under DIR"),
                       ("load", "restore the checkpoint at DIR (or DIR/LATEST)")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--servers", default=os.environ.get("XDL_SERVERS"),
                       help="comma-separated endpoints in shard order (XDL_SERVERS)")
        c.add_argument("dir")
        if name == "save":
            c.add_argument("--keep", type=int, default=None,
                           help="delete all but the KEEP newest checkpoints afterwards")
    sub.add_parser("plugins", help="list plugins with their versions and hooks")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xdl`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "server":
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        from xdl.server.shard import serve

        return serve(args.bind, args.shard, args.num_shards,
                     max_request_bytes=args.max_request_bytes, parent_pid=args.parent_pid,
                     load=args.load)
    if args.command == "version":
        import xdl

        print(xdl.__version__)
        return 0
    if args.command == "plugins":
        from xdl.plugins import format_plugins

        print(format_plugins())
        return 0
    if not args.servers:
        print(f"xdl {args.command}: no servers: pass --servers or set XDL_SERVERS",
              file=sys.stderr)
        return 2
    from xdl.client import connect
    from xdl.errors import XdlError

    try:
        timeout = float(os.environ.get("XDL_TIMEOUT", "10"))
        with connect(args.servers, timeout=timeout, retries=1) as client:
            if args.command == "ping":
                for h in client.ping():
                    print(f"shard {h['shard']}/{h['num_shards']} pid {h['pid']} ok")
            elif args.command == "stats":
                print(json.dumps(client.stats(), indent=1, sort_keys=True))
            elif args.command == "save":
                print(client.save(args.dir, keep=args.keep))
            elif args.command == "load":
                print(json.dumps(client.load(args.dir)))
            elif args.command == "shutdown":
                client.shutdown()
    except XdlError as exc:
        print(f"xdl {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
