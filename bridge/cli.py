"""The ``xdl`` command line: run a shard, inspect a cluster, list plugins.

Examples::

    xdl server --bind tcp://127.0.0.1:7000 --shard 0 --num-shards 2
    xdl ping --servers tcp://127.0.0.1:7000,tcp://127.0.0.1:7001
    xdl stats --servers ...          # rows, bytes, request counts and latencies
    xdl save --servers ... ckpt/     # checkpoint; `xdl load` restores one
    xdl plugins                      # every plugin with its version and hooks
    xdl keys generate keys/ server alice   # CURVE key pairs for a secured cluster
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence

#: The module that runs one shard (the server package's entry), started as a program.
SERVER_MODULE = "xdl.server"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdl", description="xdl-bridge parameter server tools")
    sub = p.add_subparsers(dest="command", required=True)

    # `xdl server` runs the server package's own entry (python -m xdl.server), which
    # parses these flags; the core does not import the server.
    s = sub.add_parser("server", help="run one parameter-server shard (python -m xdl.server; "
                                      "see `xdl server --help`)", add_help=False)
    s.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

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
    k = sub.add_parser("keys", help="CURVE keys for a secured cluster")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    g = ksub.add_parser("generate", help="write NAME.key (public) and NAME.key_secret "
                                         "(owner-only) into DIR for each NAME")
    g.add_argument("dir")
    g.add_argument("names", nargs="*", help="one key pair per name (default: server client)")
    sub.add_parser("version", help="print the version")
    return p


def run_server(argv: Sequence[str]) -> int:
    """Replace this process by ``python -m xdl.server ARGV`` (same pid, signals, output).

    Returns only where ``exec`` is not available, after the server process ends.
    """
    cmd = [sys.executable, "-m", SERVER_MODULE, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "execv"):
        os.execv(sys.executable, cmd)
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xdl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "server":
        return run_server(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "version":
        import xdl

        print(xdl.__version__)
        return 0
    if args.command == "plugins":
        from xdl.plugins import format_plugins

        print(format_plugins())
        return 0
    if args.command == "keys":
        from xdl.errors import XdlError
        from xdl.security import generate_keys

        try:
            for public, secret in generate_keys(args.dir, args.names or ["server", "client"]):
                print(f"{public}\n{secret}")
        except XdlError as exc:
            print(f"xdl keys: {exc}", file=sys.stderr)
            return 1
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
