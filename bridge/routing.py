"""Shard routing for the client: split ids by shard, send, collect, scatter — written once.

Every key-value call (pull, push, delete, and their many-table forms) goes through
:class:`ShardRouter`:

1. :meth:`ShardRouter.split` puts one table's ids in shard order (a compiled stable
   counting sort, see :func:`xdl.sharding.split_by_shard`) and remembers the permutation;
2. :meth:`ShardRouter.send` sends each shard involved one request carrying its slice of
   every part (one part per table), without copies when a request holds one part;
3. :meth:`ShardRouter.call` also collects the replies (one round trip per shard,
   whatever the number of shards or tables);
4. :meth:`ShardRouter.scatter` writes the rows the shards returned back into the
   callers' order.

A request that carries several parts (``many=True``) concatenates each role's slices
into one flat frame and names the per-part id counts in its header field ``counts``;
its reply's rows come back the same way, one flat float32 frame.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .sharding import put_rows, shard_of_bucket, split_by_shard, take_rows
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

    def send(self, command: bytes, header: Mapping[str, Any],
             parts: Sequence[tuple[Routed, Mapping[str, np.ndarray]]], *,
             many: bool = False, later: bool = False) -> list[Sent]:
        """Send each shard that has ids one request with its slice of every part.

        :param parts: ``(routed ids, arrays in shard order)`` per part; each array has one
            leading row per id (``ids`` is added as the role ``"ids"``).
        :param many: concatenate the parts' slices per role into flat frames and add
            the per-part ``counts`` to the header (the many-table request form); with
            False there must be exactly one part, sent as it is.
        :param later: queue asynchronous requests (:meth:`~xdl.transport.Transport.send_later`)
            instead of sending them now; then the transport's lock is not needed.

        Otherwise hold the transport's lock. The arrays travel without copies: they must
        not change until the requests are answered.
        """
        send = self.transport.send_later if later else self.transport.send
        if not many and len(parts) != 1:
            raise ValueError("a single-part request needs exactly one part")
        sent: list[Sent] = []
        for k in range(self.num_shards):
            counts = tuple(r.count(k) for r, _ in parts)
            if not any(counts):
                continue
            if many:
                arrays = self._concat(k, parts)
                h: Mapping[str, Any] = {**header, "counts": list(counts)}
            else:
                routed, extra = parts[0]
                s, e = int(routed.bounds[k]), int(routed.bounds[k + 1])
                arrays = {"ids": routed.ids[s:e], **{role: a[s:e] for role, a in extra.items()}}
                h = header
            sent.append(Sent(k, send(k, command, h, arrays), counts))
        return sent

    @staticmethod
    def _concat(k: int, parts: Sequence[tuple[Routed, Mapping[str, np.ndarray]]]
                ) -> dict[str, np.ndarray]:
        roles = ["ids", *parts[0][1]]
        pieces: dict[str, list[np.ndarray]] = {role: [] for role in roles}
        for routed, extra in parts:
            s, e = int(routed.bounds[k]), int(routed.bounds[k + 1])
            pieces["ids"].append(routed.ids[s:e])
            for role in roles[1:]:
                pieces[role].append(extra[role][s:e].reshape(-1))
        return {role: (p[0] if len(p) == 1 else np.concatenate(p)) for role, p in pieces.items()}

    def call(self, command: bytes, header: Mapping[str, Any],
             parts: Sequence[tuple[Routed, Mapping[str, np.ndarray]]], *,
             many: bool = False) -> list[tuple[Sent, Reply]]:
        """:meth:`send`, then wait for every reply (raising the first refusal)."""
        t = self.transport
        with t.lock:
            t.raise_failed()
            sent = self.send(command, header, parts, many=many)
            replies = t.results([(s.shard, s.seq) for s in sent])
        return list(zip(sent, replies, strict=True))

    def scatter(self, answered: Sequence[tuple[Sent, Reply]], role: str,
                parts: Sequence[Routed], outs: Sequence[np.ndarray],
                tables: Sequence[str]) -> None:
        """Write each reply's ``role`` rows into ``outs`` (one per part, caller order).

        A reply's rows are read as one flat float32 buffer holding every part's rows in
        part order (``count × dim`` values each), which is also how a one-part reply's
        ``[count, dim]`` array lies in memory.
        """
        for sent, (_, arrays) in answered:
            k = sent.shard
            got = arrays.get(role)
            widths = [int(o.shape[1]) for o in outs]
            need = sum(c * w for c, w in zip(sent.counts, widths, strict=True))
            if got is None or got.size != need:
                found = None if got is None else list(got.shape)
                raise InvalidArgumentError(
                    f"shard returned {role} of shape {found}, expected {need} values "
                    f"({list(sent.counts)} rows of widths {widths})",
                    endpoint=self.transport.servers[k],
                    table=tables[0] if len(tables) == 1 else None)
            flat = got.reshape(-1)
            off = 0
            for routed, out, c, w in zip(parts, outs, sent.counts, widths, strict=True):
                if not c:
                    continue
                block = flat[off:off + c * w].reshape(c, w)
                off += c * w
                if routed.order is None:
                    out[...] = block
                else:
                    s = int(routed.bounds[k])
                    put_rows(out, routed.order[s:s + c], block)
