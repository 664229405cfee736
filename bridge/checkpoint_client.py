"""The client's checkpoint orchestration: :class:`CheckpointCalls` (save and load).

The client drives a checkpoint; each shard writes or reads its own part. The layout
the two sides share (a temporary folder, the manifest, ``LATEST``) lives in the core,
:mod:`xdl.ckpt_layout`. A load is all-or-nothing across shards: every shard first
stages and verifies its part (``LOAD`` phase ``stage``); only when all have staged do
they swap it in (phase ``commit``); otherwise every shard drops what it staged
(phase ``abort``) and none changes.
"""

from __future__ import annotations

import os
from typing import Any

from . import ckpt_layout
from . import protocol as P
from .errors import CheckpointError, XdlError
from .pushlog import PushLog
from .sharding import bucket_ranges
from .transport import Transport


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
        t = self._transport
        t.wait()
        tmp = ckpt_layout.begin(os.path.abspath(root))
        replies = [h for h, _ in t.call_all(P.SAVE, {"dir": tmp})]
        return ckpt_layout.commit(tmp, t.num_shards, bucket_ranges(t.num_shards), replies,
                                  keep=keep)

    def load(self, path: str) -> dict[str, Any]:
        """Replace the cluster's state by a checkpoint (``path`` or ``path/LATEST``).

        A checkpoint written by any number of shards loads onto this cluster. All or
        nothing: when a shard cannot read or verify its part, no shard changes.

        :raises CheckpointError: naming the shard and what was wrong with the checkpoint.
        """
        t = self._transport
        t.wait()
        ckpt = ckpt_layout.resolve(os.path.abspath(path))
        try:
            t.call_all(P.LOAD, {"dir": ckpt, "phase": "stage"})
        except XdlError:
            self._abort_load(ckpt)
            raise
        try:
            replies = [h for h, _ in t.call_all(P.LOAD, {"dir": ckpt, "phase": "commit"})]
        except XdlError as exc:
            # Only a shard that lost what it staged (it restarted) refuses a commit.
            raise CheckpointError(
                f"loading {ckpt}: a shard could not swap in the checkpoint it had staged "
                f"({exc}); the cluster may be mixed: load the checkpoint again") from exc
        self._dims.clear()
        self._pushlog.forget()
        return {"path": ckpt, "rows": sum(int(h["rows"]) for h in replies),
                "tables": replies[0]["tables"] if replies else []}

    def _abort_load(self, ckpt: str) -> None:
        """Have every shard drop a staged load (best effort: the load already failed)."""
        try:
            self._transport.call_all(P.LOAD, {"dir": ckpt, "phase": "abort"})
        except XdlError:
            pass  # a shard that cannot be reached holds at most one staged copy
