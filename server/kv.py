"""Handlers of the key-value commands on sparse tables: ``PULL``, ``PUSH``, ``DELETE``,
``SET_ROWS``, and ``PULL_MANY`` / ``PUSH_MANY`` (several tables in one request).

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
from .kernels import first_duplicate_parts
from .state import Reply, Request, ShardState
from .table import SparseTable


def ids_array(state: ShardState, req: Request, table: str | None) -> np.ndarray:
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


def many_parts(state: ShardState, req: Request) -> list[tuple[SparseTable, np.ndarray]]:
    """The ``(table, ids)`` parts of a ``PULL_MANY`` / ``PUSH_MANY`` request.

    Checked before anything changes: ``tables`` is a list of distinct existing table
    names, ``counts`` as many non-negative ints summing to the length of ``ids``, and
    every id belongs to this shard.
    """
    names, counts = req.header.get("tables"), req.header.get("counts")
    if not isinstance(names, list) or not names or len(set(map(str, names))) != len(names):
        raise InvalidArgumentError(f"field 'tables': expected a list of distinct table "
                                   f"names, got {str(names)[:80]}")
    if not isinstance(counts, list) or len(counts) != len(names) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise InvalidArgumentError(f"field 'counts': expected {len(names)} non-negative ints "
                                   f"(ids per table), got {str(counts)[:80]}")
    tables = [state.table(name) for name in names]
    ids = ids_array(state, req, None)
    if sum(counts) != ids.size:
        raise InvalidArgumentError(f"field 'counts' sums to {sum(counts)}, but the request "
                                   f"has {ids.size} ids")
    ids = np.ascontiguousarray(ids)
    parts, off = [], 0
    for t, c in zip(tables, counts, strict=True):
        parts.append((t, ids[off:off + c]))
        off += c
    return parts


def pull_many(state: ShardState, req: Request) -> Reply:
    """Rows of several tables' ids, back to back in one flat float32 array."""
    parts = many_parts(state, req)
    rows = np.empty(sum(ids.size * table.dim for table, ids in parts), dtype=np.float32)
    off = 0
    for table, ids in parts:  # each table writes its rows into its slice of the reply
        n = ids.size * table.dim
        table.pull(ids, out=rows[off:off + n].reshape(ids.size, table.dim))
        off += n
    return {}, {"rows": rows}


def push_many(state: ShardState, req: Request) -> Reply:
    """Apply several tables' gradients as one unit: every table, or none.

    Everything a table's push could refuse (shape, NaN or Inf, repeated ids) is checked
    for every table before the first one changes; the tables' pushes then skip those
    checks (``SparseTable.push(checked=True)``).
    """
    parts = many_parts(state, req)
    grads = np.ascontiguousarray(array(req, "grads", None, np.dtype("<f4"), 1))
    need = sum(ids.size * table.dim for table, ids in parts)
    if grads.size != need:
        raise InvalidArgumentError(f"array 'grads': expected {need} float32 values "
                                   f"(len(ids) x dim per table), got {grads.size}")
    if not all_finite(grads):
        raise InvalidArgumentError("array 'grads' holds NaN or Inf values; nothing applied")
    ids = req.arrays["ids"]  # every table's ids back to back (checked by many_parts)
    counts = np.array(req.header["counts"], dtype=np.int64)
    dup = first_duplicate_parts(ids, counts)  # every table in one pass
    if dup >= 0:
        table = parts[int(np.searchsorted(np.cumsum(counts), dup, side="right"))][0]
        raise InvalidArgumentError(f"ids must be unique per table, but id {int(ids[dup])} "
                                   "appears more than once; nothing applied",
                                   table=table.name)
    steps, off = [], 0
    for table, ids in parts:
        n = ids.size * table.dim
        if n:  # a table with no ids here is not pushed (its step stays, as with PUSH)
            table.push(ids, grads[off:off + n].reshape(ids.size, table.dim), checked=True)
        off += n
        steps.append(table.step)
    return {"steps": steps}, {}


HANDLERS = {P.PULL: pull, P.PUSH: push, P.DELETE: delete, P.SET_ROWS: set_rows,
            P.PULL_MANY: pull_many, P.PUSH_MANY: push_many}
