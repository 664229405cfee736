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
from xdl.ckpt_layout import CKPT_NAME, MANIFEST
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
    """The request's ``dir``, resolved, checked to lie under the shard's checkpoint root.

    :raises CheckpointError: the shard has no root, or ``dir`` resolves outside it.
    """
    return under_root(state, str_field(header, "dir"))


def under_root(state: ShardState, path: str) -> str:
    """``path`` (relative to the root, or absolute) resolved, checked to lie under the root.

    :raises CheckpointError: the shard has no root, or ``path`` resolves outside it.
    """
    if not path or "\0" in path or len(path) > 4096:
        raise InvalidArgumentError(f"field 'dir': {path[:80]!r} is not a path")
    root = state.checkpoint_root
    if root is None:
        raise CheckpointError(
            f"shard {state.shard} was started without --checkpoint-root, so it saves and "
            "loads nowhere: restart it with --checkpoint-root DIR (or XDL_CHECKPOINT_ROOT)")
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, path))  # an absolute path replaces base
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise CheckpointError(
            f"{path} is outside shard {state.shard}'s checkpoint root {root}: a shard saves "
            "and loads only under the --checkpoint-root it was started with")
    return full


def save(state: ShardState, req: Request) -> Reply:
    """Write this shard's part of a checkpoint into ``dir``: a ``ckpt-<n>.tmp`` folder
    under the checkpoint root that no committed checkpoint occupies."""
    path = checkpoint_dir(state, req.header)
    name = os.path.basename(path)
    if not (name.endswith(".tmp") and CKPT_NAME.fullmatch(name[:-4])):
        raise CheckpointError(f"{path} is not a checkpoint being written (ckpt-<n>.tmp, made "
                              "by the client's save): a shard writes nowhere else")
    if os.path.exists(os.path.join(path, MANIFEST)):
        raise CheckpointError(f"{path} holds a committed manifest; a shard never writes over "
                              "a checkpoint")
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
