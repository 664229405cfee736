"""``python -m xdl.server``: run one parameter-server shard (same flags as ``xdl server``)."""

from __future__ import annotations

import sys

from xdl.cli import main

if __name__ == "__main__":
    sys.exit(main(["server", *sys.argv[1:]]))
