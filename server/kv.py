"""Handlers of the key-value commands on sparse tables: ``PULL``, ``PUSH``, ``DELETE``.

These are the hot path: each validates its request in a few vectorized checks (ids
are a 1-D int64 array owned by this shard; the table checks gradients) and hands the
arrays to the table's numba kernels.
"""

from __future__ import annotations

import numpy as np

from xdl import protocol as P
from xdl.errors import InvalidArgumentError
from xdl.sharding import all_finite, first_outside

from .fields import array
from .state import Reply, Request, ShardState


def ids_array(state: ShardState, req: Request, table: str) -> np.ndarray:
    """The request's ``ids``: int64 of rank 1, every id in this shard's buckets."""
    ids = array(req, "ids", table, np.dtype("<i8"), 1)
    if state.num_shards == 1 or ids.size == 0:
        return ids
    lo, hi = state.bucket_range
    first, count = first_outside(ids, lo, hi)
    if count:
        raise InvalidArgumentError(
            f"{count} ids belong to other shards (e.g. id {int(ids[first])}); "
            f"shard {state.shard} of {state.num_shards} owns buckets [{lo}, {hi}): the "
            "client's server list must be in shard order", table=table)
    return ids


def pull(state: ShardState, req: Request) -> Reply:
    """Rows of ``ids`` (absent ids are inserted with their initial value)."""
    table = state.table(req.header.get("table"))
    ids = ids_array(state, req, table.name)
    return {}, {"rows": table.pull(ids)}


def push(state: ShardState, req: Request) -> Reply:
    """Apply the table's optimizer to the rows of ``ids`` with ``grads``."""
    table = state.table(req.header.get("table"))
    ids = ids_array(state, req, table.name)
    grads = array(req, "grads", table.name)
    table.push(ids, grads)
    return {"step": table.step}, {}


def delete(state: ShardState, req: Request) -> Reply:
    """Remove ``ids`` from the table; answers how many were present."""
    table = state.table(req.header.get("table"))
    ids = array(req, "ids", table.name, np.dtype("<i8"), 1)
    return {"deleted": table.delete(ids)}, {}


def set_rows(state: ShardState, req: Request) -> Reply:
    """Assign the values of rows ``ids`` (absent ids are inserted with fresh slots;
    present rows keep their slots). ``xdl.swap`` starts an index-mode table from the
    layer's weights with it. Checked before anything changes: unique ids, finite
    float32 ``rows`` of shape ``[len(ids), dim]``."""
    table = state.table(req.header.get("table"))
    ids = ids_array(state, req, table.name)
    values = array(req, "rows", table.name, np.dtype("<f4"), 2)
    if values.shape != (ids.size, table.dim):
        raise InvalidArgumentError(f"array 'rows': expected shape {[ids.size, table.dim]}, "
                                   f"got {list(values.shape)}", table=table.name)
    if not all_finite(values):
        raise InvalidArgumentError("array 'rows' holds NaN or Inf values; nothing applied",
                                   table=table.name)
    if np.unique(ids).size != ids.size:
        raise InvalidArgumentError("ids of SET_ROWS must be unique; nothing applied",
                                   table=table.name)
    table.pull(ids)  # inserts the absent rows
    table.values[table.index.lookup(ids)] = values
    return {}, {}


HANDLERS = {P.PULL: pull, P.PUSH: push, P.DELETE: delete, P.SET_ROWS: set_rows}
