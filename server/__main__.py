"""``python -m xdl.server``: run one parameter-server shard (the flags of ``xdl server``)."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
