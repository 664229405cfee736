"""The client's key-value API: sparse tables, pull, push, delete and the push log.

:class:`KeyValueCalls` is one part of :class:`xdl.client.Client`; it turns table calls
into routed requests (:mod:`xdl.routing`) over the client's transport
(:mod:`xdl.transport`) and records every push in the push log (:mod:`xdl.pushlog`).
Ids are checked and de-duplicated here, once; a caller that already holds unique ids
says so with ``unique=True`` and nothing is sorted, de-duplicated or checked again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import init as xinit
from . import optim as xoptim
from . import protocol as P
from .dedup import unique_inverse
from .errors import InvalidArgumentError
from .pushlog import PushLog
from .routing import Routed, ShardRouter
from .sharding import add_rows, all_finite, copy_finite, take_rows
from .transport import Ticket, Transport


def as_ids(ids: Any, table: str) -> np.ndarray:
    """``ids`` flattened to int64 (no copy when already int64); refuses non-integers and
    uint64 ids >= 2**63, which would silently alias negative int64 ids."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}", table=table)
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError(
            f"uint64 id {int(arr.max())} does not fit an int64 id (>= 2**63); ids are int64 "
            "feature hashes: reinterpret them with ids.view(np.int64) if that is meant",
            table=table)
    return arr.reshape(-1).astype(np.int64, copy=False)


def _merge_repeats(flat: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids of ``flat`` (a new array, first-occurrence order) and their summed
    gradient rows (``g`` itself when nothing repeats: not a private copy)."""
    uniq, inverse = unique_ids(flat)
    if inverse is None:
        return uniq, g
    summed = np.zeros((uniq.size, g.shape[1]), dtype=np.float32)
    add_rows(summed, inverse, g)
    return uniq, summed


def unique_ids(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Unique ids of int64 ``flat`` in first-occurrence order, and the inverse index.

    One O(n) compiled pass (:func:`xdl.dedup.unique_inverse`). The inverse is None when
    ``flat`` has no repeats: then the unique ids are a private copy of ``flat``, in order.
    """
    uniq, inverse = unique_inverse(flat)
    return uniq, (None if uniq.size == flat.size else inverse)


def _not_finite(table: str) -> InvalidArgumentError:
    return InvalidArgumentError("grads hold NaN or Inf values; nothing was sent", table=table)


class KeyValueCalls:
    """Sparse-table calls of :class:`xdl.client.Client` (a mixin over its transport)."""

    _transport: Transport
    _router: ShardRouter
    _pushlog: PushLog
    _dims: dict[str, int]

    # ------------------------------------------------------------ tables
    def create_table(self, name: str, dim: int, *,
                     initializer: xinit.Initializer | None = None,
                     optimizer: xoptim.Optimizer | None = None, seed: int = 0) -> None:
        """Create a sparse table on every shard (idempotent with the same settings).

        :param name: table name, 1-128 characters from ``[A-Za-z0-9_.-]``.
        :param dim: row width.
        :param initializer: value of a new row (default :class:`xdl.init.Zeros`); it
            depends only on ``seed`` and the key (see :func:`xdl.init.generate`).
        :param optimizer: server-side update rule (default ``xdl.optim.SGD(lr=0.01)``).
        :param seed: the table's initializer seed.
        """
        init_d = (initializer or xinit.Zeros()).to_dict()
        opt_d = (optimizer or xoptim.SGD(lr=0.01)).to_dict()
        self._transport.call_all(P.CREATE_TABLE, {"table": name, "dim": int(dim),
                                                  "seed": int(seed), "initializer": init_d,
                                                  "optimizer": opt_d})
        self._dims[name] = int(dim)

    def describe_table(self, name: str) -> dict[str, Any]:
        """Settings of a table, with ``rows`` and ``bytes`` summed over shards."""
        replies = self._transport.call_all(P.DESCRIBE_TABLE, {"table": name})
        desc = dict(replies[0][0]["table"])
        desc["rows"] = sum(int(h["table"]["rows"]) for h, _ in replies)
        desc["nbytes"] = sum(int(h["table"]["nbytes"]) for h, _ in replies)
        desc["rows_per_shard"] = [int(h["table"]["rows"]) for h, _ in replies]
        return desc

    def list_tables(self) -> dict[str, list[str]]:
        """Names of the sparse tables and dense variables on the cluster."""
        h, _ = self._transport.call_one(0, P.LIST_TABLES, {})
        return {"tables": list(h["tables"]), "dense": list(h["dense"])}

    def drop_table(self, name: str) -> None:
        """Delete a table (or dense variable) and all its rows on every shard."""
        self._transport.call_all(P.DROP_TABLE, {"table": name})
        self._dims.pop(name, None)
        self._pushlog.forget(name)

    def _dim(self, table: str) -> int:
        dim = self._dims.get(table)
        if dim is None:
            dim = int(self.describe_table(table)["dim"])
            self._dims[table] = dim
        return dim

    # ------------------------------------------------------------ rows
    def pull(self, table: str, ids: Any, *, unique: bool = False) -> np.ndarray:
        """Rows of ``ids`` as ``float32 [len(ids), dim]``; missing rows are created.

        :param table: table name.
        :param ids: integer ids of any shape (flattened); repeats are fetched once.
        :param unique: promise that ``ids`` has no repeats, skipping de-duplication.
        """
        flat = as_ids(ids, table)
        dim = self._dim(table)
        if unique:
            routed, inverse = self._router.split(flat), None
        else:
            routed, inverse = self._router.split_unique(flat)
        answered = self._router.call(P.PULL, {"table": table}, [(routed, {})])
        nu = routed.ids.size
        if len(answered) == 1 and routed.order is None:
            # one shard answered every id in our order: the rows of its reply frame are
            # the result (a writable array over the received message, referenced by
            # nobody else: no copy), or are expanded from it directly
            got = answered[0][1][1].get("rows")
            if (got is not None and got.shape == (nu, dim) and got.flags.writeable
                    and got.flags.aligned):
                return got if inverse is None else take_rows(got, inverse)
        rows = np.empty((nu, dim), dtype=np.float32)
        self._router.scatter(answered, "rows", routed, rows, table)
        return rows if inverse is None else take_rows(rows, inverse)

    def push(self, table: str, ids: Any, grads: Any, *, unique: bool = False) -> Ticket:
        """Send gradients of rows; the shards apply the table's optimizer exactly once.

        Returns at once with a :class:`Ticket`; :meth:`wait` blocks until applied. An
        error of an un-waited push is raised by the next call of this client.

        :param ids: integer ids, one per gradient row; gradients of repeated ids are summed.
        :param grads: ``float32 [len(ids), dim]``, finite.
        :param unique: promise that ``ids`` has no repeats, skipping de-duplication.
        """
        flat = as_ids(ids, table)
        # finiteness is checked where the gradients are copied for the request
        g = self._checked_grads(table, flat.size, grads, finite=False)
        routed, sorted_g = self._route_push(flat, g, unique, table)
        t = self._transport
        t.raise_failed()
        t.throttle()
        # queued, not sent by this thread (see Transport.send_later); any request sent
        # after it, by any thread, goes out after it
        sent = self._router.send(P.PUSH, {"table": table}, [(routed, {"grads": sorted_g})],
                                 later=True)
        # the log keeps the request's (private, unsorted) ids; pushed_since sorts
        # them only if someone asks, keeping a sort off the push path
        self._pushlog.record(table, routed.ids, False)
        return Ticket(tuple((s.shard, s.seq) for s in sent))

    def _checked_grads(self, table: str, n: int, grads: Any, *, finite: bool = True
                       ) -> np.ndarray:
        """``grads`` as float32 ``[n, dim]``; checked finite unless ``finite=False``."""
        g = np.asarray(grads)
        dim = self._dim(table)
        if g.dtype != np.float32:
            if g.dtype.kind != "f":
                raise InvalidArgumentError(f"grads must be floating point, got {g.dtype}",
                                           table=table)
            g = g.astype(np.float32)
        if g.shape != (n, dim):
            raise InvalidArgumentError(
                f"grads: expected shape {[n, dim]} (len(ids), dim), got {list(g.shape)}",
                table=table)
        if finite and not all_finite(g):
            raise _not_finite(table)
        return g

    def _route_push(self, flat: np.ndarray, g: np.ndarray, unique: bool,
                    check_table: str | None = None) -> tuple[Routed, np.ndarray]:
        """Unique ids and their gradients in shard order, both private to the request.

        The request is sent without copies, asynchronously, and kept for resends: it
        must not share memory with arrays the caller may change after we return.

        :param check_table: check that ``g`` is finite (in the pass that copies it),
            naming this table in the error; None: no check.
        """
        ids_private = g_private = False
        if unique:
            routed = self._router.split(flat)
        else:
            # private ids; the order refers to the unique ids' first-occurrence order
            routed, inverse = self._router.split_unique(flat)
            ids_private = True
            if inverse is not None:
                if check_table is not None and not all_finite(g):
                    raise _not_finite(check_table)
                summed = np.zeros((routed.ids.size, g.shape[1]), dtype=np.float32)
                add_rows(summed, inverse, g)
                g, g_private, check_table = summed, True, None
        if routed.order is not None:
            if check_table is not None and not all_finite(g):
                raise _not_finite(check_table)
            return routed, routed.in_shard_order(g)  # both fresh arrays
        if not ids_private:
            routed = Routed(routed.ids.copy(), None, routed.bounds)
        if g_private:
            return routed, g
        # the caller's gradients: copied (and checked in the same pass)
        copied, finite = copy_finite(g)
        if check_table is not None and not finite:
            raise _not_finite(check_table)
        return routed, copied

    # ------------------------------------------------------------ many tables at once
    def pull_many(self, requests: Mapping[str, Any], *, unique: bool = False
                  ) -> dict[str, np.ndarray]:
        """Rows of several tables in one round trip: ``{table: ids}`` → ``{table: rows}``.

        Each shard gets **one** request carrying every table's ids for it, instead of one
        request per table. Same rules per table as :meth:`pull`.

        :param requests: table name → integer ids (any shape, flattened).
        :param unique: promise that every table's ids have no repeats.
        """
        if len(requests) == 1:
            ((name, ids),) = requests.items()
            return {name: self.pull(name, ids, unique=unique)}
        names = list(requests)
        if not names:
            return {}
        flats: list[np.ndarray] = []
        inverses: list[np.ndarray | None] = []
        dims: list[int] = []
        for name in names:
            flat = as_ids(requests[name], name)
            uniq, inverse = (flat, None) if unique else unique_ids(flat)
            flats.append(uniq)
            inverses.append(inverse)
            dims.append(self._dim(name))
        routed = self._router.split_many(flats, dims)
        answered = self._router.call_many(P.PULL_MANY, {"tables": names}, routed)
        out = np.empty(int(routed.offsets[-1]), dtype=np.float32)
        self._router.scatter_many(answered, "rows", routed, out, names)
        result: dict[str, np.ndarray] = {}
        for t, (name, inv) in enumerate(zip(names, inverses, strict=True)):
            rows = routed.table_rows(out, t)  # a view of one buffer for every table
            result[name] = rows if inv is None else take_rows(rows, inv)
        return result

    def push_many(self, requests: Mapping[str, tuple[Any, Any]], *, unique: bool = False
                  ) -> Ticket:
        """Gradients of several tables in one push: ``{table: (ids, grads)}``.

        Each shard gets **one** request carrying every table's rows for it, and applies
        it exactly once as a unit: all of its tables, or (if anything in it is refused)
        none of them. As with :meth:`push`, shards decide independently: a refusal by
        one shard does not undo what another applied. Same rules per table as
        :meth:`push`; one :class:`Ticket` for everything.

        :param requests: table name → ``(ids, grads)``, grads ``float32 [len(ids), dim]``.
        :param unique: promise that every table's ids have no repeats.
        """
        if len(requests) == 1:
            ((name, (ids, grads)),) = requests.items()
            return self.push(name, ids, grads, unique=unique)
        names = list(requests)
        flats: list[np.ndarray] = []
        gs: list[np.ndarray] = []
        for name in names:
            ids, grads = requests[name]
            try:
                flat = as_ids(ids, name)
                # with unique ids the gradients travel as given: one finiteness check
                # over all tables below instead of one per table
                g = self._checked_grads(name, flat.size, grads, finite=not unique)
            except Exception:
                self._check_finite(names, gs)  # an earlier table's error comes first
                raise
            if not unique:
                flat, g = _merge_repeats(flat, g)
            flats.append(flat)
            gs.append(g)
        routed = self._router.split_many(flats, [g.shape[1] for g in gs])
        # a fresh array: the request is private without another copy
        flat_g = np.concatenate([g.reshape(-1) for g in gs])
        if unique and not all_finite(flat_g):
            self._check_finite(names, gs)
        sorted_g = routed.in_shard_order(flat_g)
        t = self._transport
        t.raise_failed()
        t.throttle()
        sent = self._router.send_many(P.PUSH_MANY, {"tables": names}, routed,
                                      {"grads": sorted_g}, later=True)
        for i, name in enumerate(names):  # private views of the concatenated ids
            self._pushlog.record(name, routed.table_ids(i), False)
        return Ticket(tuple((s.shard, s.seq) for s in sent))

    @staticmethod
    def _check_finite(names: list[str], gs: list[np.ndarray]) -> None:
        """Raise the error of the first of ``gs`` (named by ``names``) holding NaN or Inf."""
        for name, g in zip(names, gs, strict=False):
            if not all_finite(g):
                raise _not_finite(name)

    def set_rows(self, table: str, ids: Any, rows: Any) -> None:
        """Write the values of rows ``ids`` (created when absent; optimizer slots of
        existing rows are kept) and wait until every shard applied them.

        ``xdl.swap`` starts an index-mode table from the layer's weights with it. Rows
        changed this way void the push log's marks (as :meth:`drop_table` does).

        :param ids: unique integer ids.
        :param rows: ``float32 [len(ids), dim]``, finite.
        """
        flat = as_ids(ids, table)
        values = np.asarray(rows)
        dim = self._dim(table)
        if values.shape != (flat.size, dim) or values.dtype.kind != "f":
            raise InvalidArgumentError(
                f"rows: expected floats of shape {[flat.size, dim]} (len(ids), dim), got "
                f"{values.dtype} of shape {list(values.shape)}", table=table)
        routed, sorted_rows = self._route_push(flat, values.astype(np.float32, copy=False),
                                               True)
        self._router.call(P.SET_ROWS, {"table": table}, [(routed, {"rows": sorted_rows})])
        self._pushlog.forget(table)

    def delete(self, table: str, ids: Any) -> int:
        """Remove rows; returns how many existed. Their memory is reused by new rows."""
        routed = self._router.split(unique_ids(as_ids(ids, table))[0])
        answered = self._router.call(P.DELETE, {"table": table}, [(routed, {})])
        return sum(int(h["deleted"]) for _, (h, _) in answered)

    # ------------------------------------------------------------ push log
    def push_mark(self, table: str) -> int:
        """Number of pushes to ``table`` this client has issued so far.

        A push counted here is already on its way to the shards: a pull issued after
        this call sees it (requests to one shard travel on one socket and are applied
        in order). Pass the mark to :meth:`pushed_since` later to learn which ids were
        pushed in between.
        """
        return self._pushlog.mark(table)

    def pushed_since(self, table: str, mark: int) -> np.ndarray | None:
        """Sorted unique ids pushed to ``table`` after :meth:`push_mark` returned ``mark``.

        Returns an empty int64 array when nothing was pushed since, and None when more
        than :data:`xdl.pushlog.PUSH_LOG_LENGTH` pushes were made since ``mark`` (the log
        no longer reaches back that far: treat every id as pushed). The array may be
        read-only. Prefetch uses it to re-pull exactly the prefetched rows that went stale.
        """
        return self._pushlog.since(table, mark)
