"""Handlers of the administrative commands: ``PING``, ``STATS``, ``SAVE``, ``LOAD``, ``SHUTDOWN``.

``LOAD`` runs in two phases so that a load across shards is all-or-nothing: with
``phase: "stage"`` a shard reads and verifies its part of the checkpoint and keeps it
aside; with ``phase: "commit"`` it swaps the staged state in; ``phase: "abort"`` drops
what was staged. The client commits only when every shard has staged. A ``LOAD``
without ``phase`` stages and commits at once (one shard, or the ``--load`` start).
"""

from __future__ import annotations

import os
import time
from typing import Any

from xdl import protocol as P
from xdl.ckpt_layout import inside
from xdl.errors import CheckpointError, InvalidArgumentError

from . import checkpoint
from .fields import str_field
from .state import Reply, Request, ShardState
from .stats import resident_bytes

#: ``LOAD`` phases (absent: stage and commit at once).
LOAD_PHASES = ("stage", "commit", "abort")


def ping(state: ShardState, req: Request) -> Reply:
    """Shard index, shard count, protocol version and process id."""
    return {"shard": state.shard, "num_shards": state.num_shards,
            "version": P.VERSION, "pid": os.getpid()}, {}


def stats(state: ShardState, req: Request) -> Reply:
    """Rows, bytes and steps per table, dense versions, request counts and latencies."""
    tables = {n: {"rows": len(t), "bytes": t.nbytes, "dim": t.dim, "step": t.step}
              for n, t in state.tables.items()}
    dense = {n: {"bytes": v.nbytes, "version": v.version} for n, v in state.dense.items()}
    return {
        "shard": state.shard, "num_shards": state.num_shards, "pid": os.getpid(),
        "uptime_s": time.time() - state.started, "resident_bytes": resident_bytes(),
        "tables": tables, "dense": dense, "clients": len(state.clients),
        "parked": state.parked_count(),
        "requests": {k: v.summary() for k, v in state.stats.items()},
    }, {}


def checkpoint_dir(state: ShardState, header: dict[str, Any]) -> str:
    """The request's ``dir``, resolved, checked to lie under the shard's checkpoint root."""
    path = str_field(header, "dir")
    if "\0" in path or not path:
        raise InvalidArgumentError(f"field 'dir': {path!r} is not a path")
    root = state.checkpoint_root
    if root is None:
        return os.path.abspath(path)
    rel = os.path.relpath(os.path.abspath(path), os.path.realpath(root)) \
        if os.path.isabs(path) else path
    try:
        return inside(root, rel)
    except CheckpointError:
        raise CheckpointError(
            f"{path} is outside shard {state.shard}'s checkpoint root {root}: a shard saves "
            "and loads only under the --checkpoint-root it was started with") from None


def save(state: ShardState, req: Request) -> Reply:
    """Write this shard's part of a checkpoint into ``dir`` (under the checkpoint root)."""
    path = checkpoint_dir(state, req.header)
    return {"files": checkpoint.save_shard(state, path)}, {}


def load(state: ShardState, req: Request) -> Reply:
    """Stage, commit or abort a checkpoint load (see the module docs)."""
    phase = req.header.get("phase")
    if phase is not None and phase not in LOAD_PHASES:
        raise InvalidArgumentError(f"field 'phase': expected one of {list(LOAD_PHASES)} or "
                                   f"none, got {phase!r:.40}")
    if phase == "abort":
        dropped = state.staged is not None
        state.staged = None
        return {"aborted": dropped}, {}
    if phase == "commit":
        staged = state.staged
        path = checkpoint_dir(state, req.header)
        if staged is None or staged.path != path:
            raise CheckpointError(
                f"nothing staged for {path} on shard {state.shard}: send LOAD with phase "
                "'stage' first (a shard keeps one staged checkpoint)")
        state.staged = None
        checkpoint.swap_in(state, staged)
        return _loaded(staged), {}
    path = checkpoint_dir(state, req.header)
    state.staged = None
    staged = checkpoint.stage(state, path)
    if phase == "stage":
        state.staged = staged
    else:
        checkpoint.swap_in(state, staged)
    return _loaded(staged), {}


def _loaded(staged: checkpoint.Staged) -> dict[str, Any]:
    return {"tables": sorted(staged.tables), "dense": sorted(staged.dense),
            "rows": sum(len(t) for t in staged.tables.values())}


def shutdown(state: ShardState, req: Request) -> Reply:
    """Stop serving after this reply."""
    state.stopping = True
    return {"stopping": True}, {}


HANDLERS = {P.PING: ping, P.STATS: stats, P.SAVE: save, P.LOAD: load, P.SHUTDOWN: shutdown}
