"""The shard's command line: ``python -m xdl.server`` (also run by ``xdl server``).

Examples::

    python -m xdl.server --bind tcp://127.0.0.1:7000 --shard 0 --num-shards 2 \\
        --checkpoint-root /data/ckpt
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def parse_size(text: str) -> int:
    """``"256m"`` → bytes (suffixes k, m, g, optionally followed by ``i``/``b``)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def parser(prog: str = "xdl server") -> argparse.ArgumentParser:
    """The argument parser of one shard."""
    p = argparse.ArgumentParser(prog=prog, description="run one parameter-server shard")
    p.add_argument("--bind", default=os.environ.get("XDL_BIND", "tcp://127.0.0.1:7000"),
                   help="ZeroMQ endpoint to bind (port 0: any free port); default "
                        "tcp://127.0.0.1:7000 (XDL_BIND)")
    p.add_argument("--shard", type=int, default=0, help="this shard's index (0-based)")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards in the cluster")
    p.add_argument("--max-request-bytes", type=parse_size, default="1g",
                   help="largest request accepted, e.g. 256m (default 1g)")
    p.add_argument("--checkpoint-root", default=os.environ.get("XDL_CHECKPOINT_ROOT"),
                   help="the only folder under which SAVE and LOAD may write and read "
                        "(XDL_CHECKPOINT_ROOT)")
    p.add_argument("--load", metavar="CKPT", help="restore this checkpoint before serving "
                   "(under --checkpoint-root when one is given)")
    p.add_argument("--wal-dir", default=os.environ.get("XDL_WAL_DIR"),
                   help="keep a write-ahead log here: every acknowledged change survives a "
                        "crash, and a restart recovers from it (XDL_WAL_DIR)")
    p.add_argument("--wal-fsync", default=os.environ.get("XDL_WAL_FSYNC", "every"),
                   help="when the log is synced: 'every' (default; each reply waits for "
                        "a sync, shared by the requests that arrive meanwhile), a number of "
                        "milliseconds between syncs, or 'none' (survives a killed process, "
                        "not a power cut) (XDL_WAL_FSYNC)")
    p.add_argument("--curve-secret", metavar="FILE",
                   help="this shard's CURVE key pair (from `xdl keys generate`); with "
                        "--curve-clients, only those clients may connect "
                        "(XDL_CURVE_SERVER_SECRET)")
    p.add_argument("--curve-clients", metavar="PATH",
                   help="folder of allowed client public keys (*.key) or a comma-separated "
                        "list of key files (XDL_CURVE_CLIENTS)")
    p.add_argument("--curve-admins", metavar="PATH",
                   help="public keys allowed to send SHUTDOWN, SAVE and LOAD (default: every "
                        "allowed client) (XDL_CURVE_ADMINS)")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default=os.environ.get("XDL_LOG_LEVEL", "INFO"))
    return p


def main(argv: Sequence[str] | None = None, prog: str = "xdl server") -> int:
    """Parse ``argv`` and run one shard until it is stopped; returns the exit status."""
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 0 <= args.shard < args.num_shards:
        print(f"{prog}: --shard {args.shard} out of range for --num-shards {args.num_shards}",
              file=sys.stderr)
        return 2
    from xdl.errors import XdlError
    from xdl.security import ServerSecurity

    from .service import serve
    from .wal import parse_fsync

    try:
        parse_fsync(args.wal_fsync)
        security = ServerSecurity.from_options(args.curve_secret, args.curve_clients,
                                               args.curve_admins)
    except XdlError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return serve(args.bind, args.shard, args.num_shards,
                 max_request_bytes=args.max_request_bytes, parent_pid=args.parent_pid,
                 load=args.load, checkpoint_root=args.checkpoint_root, wal_dir=args.wal_dir,
                 wal_fsync=args.wal_fsync, security=security)
