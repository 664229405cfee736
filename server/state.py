"""What one shard holds: its tables, dense variables and waiting requests.

The command handlers (:mod:`xdl.server.kv`, :mod:`xdl.server.table_commands`,
:mod:`xdl.server.dense`, :mod:`xdl.server.admin`) read and change a
:class:`ShardState`; the dispatcher (:mod:`xdl.server.dispatch`) and the
exactly-once filter (:mod:`xdl.server.exactly_once`) sit in front of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdl import protocol as P
from xdl.errors import TableNotFoundError
from xdl.sharding import bucket_ranges

from .exactly_once import ClientRecord, ExactlyOnce
from .stats import CommandStats
from .table import DenseVariable, SparseTable

#: Sends one reply's frames (the routing identity is already bound).
Respond = Callable[[list[Any]], None]

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


@dataclass
class Request:
    """One decoded, identified request as the handlers see it."""

    command: bytes
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    cid: str
    inc: int
    seq: int
    #: answers later (a parked dense pull); handlers that answer at once return instead
    respond: Respond


@dataclass
class SyncState:
    """Gradient aggregation of a dense variable in synchronous mode."""

    workers: int
    grad_sum: np.ndarray
    pushed: set[str] = field(default_factory=set)


@dataclass
class ParkedPull:
    """A ``DENSE_PULL`` waiting for a version, answered by a later push or its deadline."""

    min_version: int
    deadline: float
    answer: Callable[[], None]
    refuse: Callable[[str], None]


class ShardState:
    """State of one shard, independent of the transport.

    :param shard: this shard's index.
    :param num_shards: number of shards in the cluster.
    :param max_request_bytes: largest request accepted; larger ones get ``TOO_LARGE``.
    :param checkpoint_root: the only folder under which ``SAVE`` and ``LOAD`` may
        read or write (``None``: checkpoints are refused).
    :param max_parked: how many ``DENSE_PULL`` requests may wait for a version at once.
    :param park_timeout_s: how long one may wait before it is answered with an error.
    """

    def __init__(self, shard: int = 0, num_shards: int = 1,
                 max_request_bytes: int = P.DEFAULT_MAX_REQUEST_BYTES, *,
                 checkpoint_root: str | None = None, max_parked: int = P.MAX_PARKED,
                 park_timeout_s: float = P.PARK_TIMEOUT_S) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard index {shard} out of range for {num_shards} shards")
        self.shard = shard
        self.num_shards = num_shards
        self.max_request_bytes = max_request_bytes
        self.checkpoint_root = checkpoint_root
        self.max_parked = max_parked
        self.park_timeout_s = park_timeout_s
        self.bucket_range = bucket_ranges(num_shards)[shard]
        self.tables: dict[str, SparseTable] = {}
        self.dense: dict[str, DenseVariable] = {}
        self.sync: dict[str, SyncState] = {}
        self.exactly_once = ExactlyOnce()
        #: dense pulls waiting for a version (sync mode), by variable name
        self.parked: dict[str, list[ParkedPull]] = {}
        #: a checkpoint staged by ``LOAD`` phase one, swapped in by phase two
        self.staged: Any = None
        #: request counts and latencies by command (filled by the dispatcher)
        self.stats: dict[str, CommandStats] = {}
        self.started = time.time()
        self.stopping = False

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """Exactly-once records by client id (part of a checkpoint)."""
        return self.exactly_once.records

    @clients.setter
    def clients(self, records: dict[str, ClientRecord]) -> None:
        self.exactly_once.records = records

    def table(self, name: Any) -> SparseTable:
        """The sparse table ``name`` (any wire value), or ``NO_SUCH_TABLE``."""
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise TableNotFoundError(
                f"no table {name!r} on shard {self.shard}; existing: {sorted(self.tables)}",
                table=name if isinstance(name, str) else None)
        return table

    def dense_var(self, name: Any) -> DenseVariable:
        """The dense variable ``name`` (any wire value), or ``NO_SUCH_TABLE``."""
        var = self.dense.get(name) if isinstance(name, str) else None
        if var is None:
            raise TableNotFoundError(
                f"no dense variable {name!r} on shard {self.shard}; existing: "
                f"{sorted(self.dense)}", table=name if isinstance(name, str) else None)
        return var

    def parked_count(self) -> int:
        """How many dense pulls are waiting."""
        return sum(len(w) for w in self.parked.values())

    def release_parked(self, name: str, version: int) -> None:
        """Answer the pulls of ``name`` waiting for a version <= ``version``."""
        waiting = self.parked.get(name)
        if not waiting:
            return
        ready = [w for w in waiting if w.min_version <= version]
        rest = [w for w in waiting if w.min_version > version]
        if rest:
            self.parked[name] = rest
        else:
            del self.parked[name]
        for w in ready:
            w.answer()

    def refuse_parked(self, why: str, name: str | None = None) -> None:
        """Answer waiting pulls (of ``name``, or all) with an error saying ``why``."""
        names = [name] if name is not None else list(self.parked)
        for n in names:
            for w in self.parked.pop(n, []):
                w.refuse(why)

    def expire_parked(self, now: float) -> None:
        """Answer every pull whose deadline has passed with a ``DEADLINE`` error."""
        for name in list(self.parked):
            waiting = self.parked[name]
            late = [w for w in waiting if w.deadline <= now]
            if not late:
                continue
            rest = [w for w in waiting if w.deadline > now]
            if rest:
                self.parked[name] = rest
            else:
                del self.parked[name]
            for w in late:
                w.refuse("waited past its deadline")
