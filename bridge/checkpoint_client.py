"""The client's checkpoint orchestration: :class:`CheckpointCalls` (save and load).

The client drives a checkpoint; each shard writes or reads its own part. The layout
the two sides share (a temporary folder, per-shard manifests, ``LATEST``) is imported
here and only here, so moving it is a one-line change.
"""

from __future__ import annotations

import os
from typing import Any

from . import protocol as P
from .pushlog import PushLog
from .sharding import bucket_ranges
from .transport import Transport


def _layout() -> Any:
    # the checkpoint layout shared with the shards (the one import of it in the client)
    from xdl.server import checkpoint

    return checkpoint


class CheckpointCalls:
    """Checkpoint calls of :class:`xdl.client.Client` (a mixin over its transport)."""

    _transport: Transport
    _pushlog: PushLog
    _dims: dict[str, int]

    def save(self, root: str, *, keep: int | None = None) -> str:
        """Write a checkpoint under ``root`` and return its folder.

        Waits for outstanding pushes first. The shards and this client must share the
        file system. The checkpoint becomes visible (``root/LATEST``) only once complete.

        :param keep: delete all but the ``keep`` newest checkpoints afterwards.
        """
        checkpoint = _layout()
        t = self._transport
        t.wait()
        tmp = checkpoint.begin(os.path.abspath(root))
        replies = [h for h, _ in t.call_all(P.SAVE, {"dir": tmp})]
        return str(checkpoint.commit(tmp, t.num_shards, bucket_ranges(t.num_shards), replies,
                                     keep=keep))

    def load(self, path: str) -> dict[str, Any]:
        """Replace the cluster's state by a checkpoint (``path`` or ``path/LATEST``).

        A checkpoint written by any number of shards loads onto this cluster.
        """
        checkpoint = _layout()
        t = self._transport
        t.wait()
        ckpt = checkpoint.resolve(os.path.abspath(path))
        replies = [h for h, _ in t.call_all(P.LOAD, {"dir": ckpt})]
        self._dims.clear()
        self._pushlog.forget()
        return {"path": ckpt, "rows": sum(int(h["rows"]) for h in replies),
                "tables": replies[0]["tables"] if replies else []}
