"""Shard routing for the client: split ids by shard, send, collect, scatter — written once.

Every key-value call (pull, push, delete, and their many-table forms) goes through
:class:`ShardRouter`:

1. :meth:`ShardRouter.split` puts one table's ids in shard order (a compiled stable
   counting sort, see :func:`xdl.sharding.split_by_shard`) and remembers the permutation;
   :meth:`ShardRouter.split_many` does it for every table of a many-table request in one
   compiled pass over their concatenated ids;
2. :meth:`ShardRouter.send` sends each shard involved one request with its slice of a
   table's ids and arrays, without copies; :meth:`ShardRouter.send_many` sends each
   shard one request carrying its slice of every table;
3. :meth:`ShardRouter.call` / :meth:`ShardRouter.call_many` also collect the replies
   (one round trip per shard, whatever the number of shards or tables);
4. :meth:`ShardRouter.scatter` / :meth:`ShardRouter.scatter_many` write the rows the
   shards returned back into the callers' order.

A many-table request holds each role's values of every table back to back in one flat
frame (table order, and within a table the caller's order) and names the per-table id
counts in its header field ``counts``; its reply's rows come back the same way, one flat
float32 frame. The per-table work is done by compiled kernels over all tables at once
(:func:`xdl.sharding.split_parts_by_shard`, :func:`~xdl.sharding.gather_parts`,
:func:`~xdl.sharding.scatter_parts`), not by a Python loop over the tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dedup import unique_by_shard, unique_inverse
from .errors import InvalidArgumentError
from .sharding import (
    gather_parts,
    put_rows,
    scatter_parts,
    shard_of_bucket,
    split_by_shard,
    split_parts_by_shard,
    take_rows,
)
from .transport import Reply, Transport


@dataclass(frozen=True)
class Routed:
    """One table's ids put in shard order.

    :ivar ids: the ids, grouped by shard (shard 0's first), stable within a shard.
    :ivar order: position in the caller's array of each id of :attr:`ids`; None when
        the order is the caller's own (one shard).
    :ivar bounds: ``int64 [num_shards + 1]``: shard k's ids are ``ids[bounds[k]:bounds[k+1]]``.
    """

    ids: np.ndarray
    order: np.ndarray | None
    bounds: np.ndarray

    def in_shard_order(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` (one per caller id) permuted into shard order; ``rows`` itself for one shard."""
        return rows if self.order is None else take_rows(rows, self.order)

    def count(self, k: int) -> int:
        """Number of ids that go to shard ``k``."""
        return int(self.bounds[k + 1] - self.bounds[k])


@dataclass(frozen=True)
class RoutedMany:
    """Several tables' ids, put in shard order together (one request per shard).

    Table t's ids in the caller's order are ``ids_in_order[starts[t]:starts[t+1]]``; its
    rows, ``dims[t]`` values each, lie at ``[offsets[t]:offsets[t+1]]`` of a flat array
    holding every table's rows back to back (the caller's layout).

    :ivar ids_in_order: every table's ids, back to back (a private array).
    :ivar ids: the same ids grouped by shard (shard 0's first), within a shard by table,
        within a table in the caller's order; :attr:`ids_in_order` itself for one shard.
    :ivar order: position in :attr:`ids_in_order` of each id of :attr:`ids`; None for
        one shard.
    :ivar starts: ``int64 [tables + 1]``.
    :ivar dims: ``int64 [tables]``.
    :ivar offsets: ``int64 [tables + 1]``.
    :ivar counts: ``int64 [num_shards, tables]``: ids of table t that go to shard k.
    :ivar bounds: ``int64 [num_shards + 1]``: shard k's ids are ``ids[bounds[k]:bounds[k+1]]``.
    :ivar value_bounds: ``int64 [num_shards + 1]``: the same for flat row values in
        shard order.
    """

    ids_in_order: np.ndarray
    ids: np.ndarray
    order: np.ndarray | None
    starts: np.ndarray
    dims: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    bounds: np.ndarray
    value_bounds: np.ndarray

    def table_ids(self, t: int) -> np.ndarray:
        """Table ``t``'s ids in the caller's order (a view of :attr:`ids_in_order`)."""
        return self.ids_in_order[int(self.starts[t]):int(self.starts[t + 1])]

    def table_rows(self, flat: np.ndarray, t: int) -> np.ndarray:
        """Table ``t``'s ``[n, dim]`` rows in a flat array of the caller's layout (a view)."""
        n = int(self.starts[t + 1] - self.starts[t])
        return flat[int(self.offsets[t]):int(self.offsets[t + 1])].reshape(n, int(self.dims[t]))

    def in_shard_order(self, flat: np.ndarray) -> np.ndarray:
        """Flat float32 rows of the caller's layout put in shard order (a new array), or
        ``flat`` itself for one shard."""
        if self.order is None:
            return flat
        return gather_parts(flat, self.starts, self.offsets, self.dims, self.order, self.counts)


@dataclass(frozen=True)
class Sent:
    """One request the router sent: shard, seq, and how many ids of each part it carries."""

    shard: int
    seq: int
    counts: tuple[int, ...]


class ShardRouter:
    """Routes key-value requests over a :class:`~xdl.transport.Transport`'s shards."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.num_shards = transport.num_shards
        self._route = shard_of_bucket(self.num_shards)

    def split(self, ids: np.ndarray) -> Routed:
        """Put int64 ``ids`` in shard order (no copy for one shard)."""
        if self.num_shards == 1:
            return Routed(ids, None, np.array([0, ids.size], dtype=np.int64))
        order, sorted_ids, counts = split_by_shard(ids, self._route, self.num_shards)
        bounds = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        return Routed(sorted_ids, order, bounds)

    def split_unique(self, ids: np.ndarray) -> tuple[Routed, np.ndarray | None]:
        """De-duplicate int64 ``ids`` and put the unique ones in shard order.

        Returns the routed unique ids (private arrays; :attr:`Routed.order` holds each
        one's index among the unique ids in order of first occurrence) and each id's
        index among them, or None when no id repeats. The same as :meth:`split` of
        :func:`xdl.dedup.unique_inverse`'s unique ids, in two compiled passes over the
        ids instead of three (:func:`xdl.dedup.unique_by_shard`).
        """
        if self.num_shards == 1:
            uniq, inverse = unique_inverse(ids)
            return (Routed(uniq, None, np.array([0, uniq.size], dtype=np.int64)),
                    None if uniq.size == ids.size else inverse)
        sorted_ids, order, counts, repeats = unique_by_shard(ids, self.num_shards)
        bounds = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        return Routed(sorted_ids, order, bounds), repeats

    def send(self, command: bytes, header: Mapping[str, Any],
             parts: Sequence[tuple[Routed, Mapping[str, np.ndarray]]], *,
             later: bool = False) -> list[Sent]:
        """Send each shard that has ids one request with its slice of one table's arrays.

        :param parts: exactly one ``(routed ids, arrays in shard order)``; each array has
            one leading row per id (``ids`` is added as the role ``"ids"``).
        :param later: queue asynchronous requests (:meth:`~xdl.transport.Transport.send_later`)
            instead of sending them now; then the transport's lock is not needed.

        Otherwise hold the transport's lock. The arrays travel without copies: they must
        not change until the requests are answered.
        """
        send = self.transport.send_later if later else self.transport.send
        if len(parts) != 1:
            raise ValueError("a single-part request needs exactly one part "
                             "(several tables go through send_many)")
        routed, extra = parts[0]
        sent: list[Sent] = []
        for k in range(self.num_shards):
            s, e = int(routed.bounds[k]), int(routed.bounds[k + 1])
            if s == e:
                continue
            arrays = {"ids": routed.ids[s:e], **{role: a[s:e] for role, a in extra.items()}}
            sent.append(Sent(k, send(k, command, header, arrays), (e - s,)))
        return sent

    def split_many(self, ids: Sequence[np.ndarray], dims: Sequence[int]) -> RoutedMany:
        """Put several tables' int64 ``ids`` (rows of width ``dims``) in shard order at
        once: one concatenation and one compiled pass, whatever the number of tables."""
        sizes = np.fromiter((a.size for a in ids), dtype=np.int64, count=len(ids))
        d = np.asarray(dims, dtype=np.int64)
        starts = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes * d, out=offsets[1:])
        flat = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        if self.num_shards == 1:
            n, v = int(starts[-1]), int(offsets[-1])
            return RoutedMany(flat, flat, None, starts, d, offsets, sizes.reshape(1, -1),
                              np.array([0, n], dtype=np.int64),
                              np.array([0, v], dtype=np.int64))
        order, sorted_ids, counts = split_parts_by_shard(flat, starts, self._route,
                                                         self.num_shards)
        bounds = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=1), out=bounds[1:])
        value_bounds = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum(counts @ d, out=value_bounds[1:])
        return RoutedMany(flat, sorted_ids, order, starts, d, offsets, counts, bounds,
                          value_bounds)

    def send_many(self, command: bytes, header: Mapping[str, Any], routed: RoutedMany,
                  values: Mapping[str, np.ndarray] | None = None, *,
                  later: bool = False) -> list[Sent]:
        """Send each shard that has ids one request carrying its ids of every table.

        :param values: role → flat float32 rows of every table in shard order
            (:meth:`RoutedMany.in_shard_order`); shard k's slice travels with its ids.
        :param later: as for :meth:`send`.

        The header gets the shard's per-table id ``counts``. Arrays travel without copies:
        they must not change until the requests are answered.
        """
        send = self.transport.send_later if later else self.transport.send
        counts = routed.counts.tolist()
        bounds = routed.bounds.tolist()
        vb = routed.value_bounds.tolist()
        sent: list[Sent] = []
        for k in range(self.num_shards):
            s, e = bounds[k], bounds[k + 1]
            if s == e:
                continue
            arrays = {"ids": routed.ids[s:e]}
            for role, a in (values or {}).items():
                arrays[role] = a[vb[k]:vb[k + 1]]
            sent.append(Sent(k, send(k, command, {**header, "counts": counts[k]}, arrays),
                             tuple(counts[k])))
        return sent

    def call(self, command: bytes, header: Mapping[str, Any],
             parts: Sequence[tuple[Routed, Mapping[str, np.ndarray]]]
             ) -> list[tuple[Sent, Reply]]:
        """:meth:`send`, then wait for every reply (raising the first refusal)."""
        return self._answered(lambda: self.send(command, header, parts))

    def call_many(self, command: bytes, header: Mapping[str, Any], routed: RoutedMany
                  ) -> list[tuple[Sent, Reply]]:
        """:meth:`send_many` (ids only), then wait for every reply (raising the first
        refusal)."""
        return self._answered(lambda: self.send_many(command, header, routed))

    def _answered(self, send: Callable[[], list[Sent]]) -> list[tuple[Sent, Reply]]:
        # under the transport's lock: raise an earlier refusal, send, wait for the replies
        t = self.transport
        with t.lock:
            t.raise_failed()
            sent = send()
            replies = t.results([(s.shard, s.seq) for s in sent])
        return list(zip(sent, replies, strict=True))

    def scatter(self, answered: Sequence[tuple[Sent, Reply]], role: str, routed: Routed,
                out: np.ndarray, table: str) -> None:
        """Write each reply's ``role`` rows into ``out`` (``[n, dim]``, caller order)."""
        width = int(out.shape[1])
        for sent, (_, arrays) in answered:
            k = sent.shard
            got = self._checked(arrays.get(role), role, sent.counts[0] * width, k,
                                f"{list(sent.counts)} rows of width {width}", table)
            block = got.reshape(-1, width)
            if routed.order is None:
                out[...] = block
            else:
                s = int(routed.bounds[k])
                put_rows(out, routed.order[s:s + sent.counts[0]], block)

    def scatter_many(self, answered: Sequence[tuple[Sent, Reply]], role: str,
                     routed: RoutedMany, out: np.ndarray, tables: Sequence[str]) -> None:
        """Write each reply's ``role`` rows into the flat float32 ``out`` (every table's
        rows back to back in the caller's layout, see :class:`RoutedMany`).

        A reply's rows are one flat float32 buffer holding the shard's rows of every
        table in table order (``count × dim`` values each); one compiled pass per reply
        puts them in place.
        """
        for sent, (_, arrays) in answered:
            k = sent.shard
            s, e = int(routed.value_bounds[k]), int(routed.value_bounds[k + 1])
            got = self._checked(arrays.get(role), role, e - s, k,
                                f"{list(sent.counts)} rows of widths {routed.dims.tolist()}",
                                tables[0] if len(tables) == 1 else None)
            if routed.order is None:
                out[...] = got.reshape(-1)
            else:
                b = int(routed.bounds[k])
                scatter_parts(got, routed.starts, routed.offsets, routed.dims,
                              routed.order[b:int(routed.bounds[k + 1])], routed.counts[k], out)

    def _checked(self, got: np.ndarray | None, role: str, need: int, k: int, what: str,
                 table: str | None) -> np.ndarray:
        if got is None or got.size != need:
            found = None if got is None else list(got.shape)
            raise InvalidArgumentError(
                f"shard returned {role} of shape {found}, expected {need} values ({what})",
                endpoint=self.transport.servers[k], table=table)
        return got
