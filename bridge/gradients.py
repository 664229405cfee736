"""The gradient buffer: a step's row gradients, merged once, one push per table.

A table looked up several times in one step (DIN's item table: target and history)
must get **one** push of the summed gradient, as a local optimizer sees one gradient;
two pushes would apply Adagrad or Adam twice. So lookups do not push: their backward
hands ``(unique ids, row gradients)`` to :meth:`GradientBuffer.add`, and
:meth:`GradientBuffer.flush` merges each table's parts (sum per id) and pushes them,
all tables of one client in one call (``client.push_many`` when the client has it).

When does a step's flush happen?

* at the **flush point** the backend names (:meth:`xdl.Backend.schedule_flush`):
  torch queues it to run when the backward pass ends;
* at the latest **before the next pull of the table** (:meth:`xdl.lookup.RemoteTable.rows`
  flushes first), and on ``wait_pushes`` / ``close``: a framework without an
  end-of-backward hook stays exact, since a step's gradients are all in before the next
  step pulls.

The buffer also tracks the tickets of the pushes it made, per table, so that a pull can
wait for them (``sync_push``). It is thread-safe and process-wide by default
(:func:`default_buffer`): backward passes and host callbacks may run on other threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .dedup import unique_inverse
from .sharding import add_rows

#: ``on_push(ticket)``: told the ticket of the push that carried a lookup's gradients.
OnPush = Callable[[Any], None]
#: push tickets kept per table for :meth:`GradientBuffer.wait` (older ones are dropped
#: unwaited: the client raises their errors on its next call, and bounds its own
#: in-flight pushes)
MAX_TRACKED = 64


def merge_rows(ids: list[np.ndarray], grads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate row gradients and sum those of the same id: ``(unique ids, grads)``."""
    if len(ids) == 1:
        return ids[0], grads[0]
    all_ids = np.concatenate(ids)
    unique, inverse = unique_inverse(all_ids)
    if unique.size == all_ids.size:
        return all_ids, np.concatenate(grads)
    summed = np.zeros((len(unique), grads[0].shape[1]), dtype=np.float32)
    add_rows(summed, inverse, np.concatenate(grads))
    return unique, summed


class _Parts:
    __slots__ = ("client", "grads", "ids", "on_push")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.ids: list[np.ndarray] = []
        self.grads: list[np.ndarray] = []
        self.on_push: dict[int, OnPush] = {}


class GradientBuffer:
    """Row gradients of the running step per ``(client, table)``; pushed by :meth:`flush`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._parts: dict[tuple[int, str], _Parts] = {}
        self._tickets: dict[tuple[int, str], list[tuple[Any, Any]]] = {}

    def add(self, client: Any, table: str, unique_ids: np.ndarray, grads: np.ndarray, *,
            on_push: OnPush | None = None) -> None:
        """Collect one lookup's gradients ``float32 [U, dim]`` of ``unique_ids``.

        :param on_push: called with the ticket of the push that carries them.
        """
        grads = np.ascontiguousarray(grads, dtype=np.float32)
        with self._lock:
            parts = self._parts.get((id(client), table))
            if parts is None:
                parts = self._parts[(id(client), table)] = _Parts(client)
            parts.ids.append(np.asarray(unique_ids, dtype=np.int64))
            parts.grads.append(grads)
            if on_push is not None:
                parts.on_push[id(on_push)] = on_push

    def add_many(self, client: Any, parts: list[tuple[str, np.ndarray, np.ndarray]], *,
                 on_push: list[OnPush | None] | None = None) -> None:
        """:meth:`add` of several lookups' gradients at once (one lock): ``parts`` are
        ``(table, unique ids, grads)`` of ``client``; ``on_push[i]`` (when given) is told
        the ticket of the push that carries part i."""
        with self._lock:
            for i, (table, unique_ids, grads) in enumerate(parts):
                key = (id(client), table)
                entry = self._parts.get(key)
                if entry is None:
                    entry = self._parts[key] = _Parts(client)
                entry.ids.append(np.asarray(unique_ids, dtype=np.int64))
                entry.grads.append(np.ascontiguousarray(grads, dtype=np.float32))
                callback = None if on_push is None else on_push[i]
                if callback is not None:
                    entry.on_push[id(callback)] = callback

    def pending(self, client: Any = None, table: str | None = None) -> bool:
        """Whether gradients wait to be pushed (for ``client`` / ``table`` when given)."""
        with self._lock:
            return any(self._selected(client, table))

    def _selected(self, client: Any, table: str | None) -> list[tuple[int, str]]:
        return [key for key in self._parts
                if (client is None or key[0] == id(client)) and (table is None or key[1] == table)]

    def flush(self, client: Any = None, table: str | None = None) -> None:
        """Merge and push the buffered gradients (of ``client`` / ``table`` when given).

        One push per table; the tables of one client go in one ``client.push_many``
        call when the client has it. Idempotent: nothing buffered, nothing sent.
        """
        with self._lock:
            keys = self._selected(client, table)
            if not keys:
                return
            taken = [(key, self._parts.pop(key)) for key in keys]
            by_client: dict[int, list[tuple[str, _Parts]]] = {}
            for (cid, name), parts in taken:
                by_client.setdefault(cid, []).append((name, parts))
            for groups in by_client.values():
                self._push(groups)

    def _push(self, groups: list[tuple[str, _Parts]]) -> None:
        client = groups[0][1].client
        merged = {name: merge_rows(parts.ids, parts.grads) for name, parts in groups}
        push_many = getattr(client, "push_many", None)
        tickets: dict[str, Any]
        if push_many is not None and len(merged) > 1:
            result = push_many(merged, unique=True)
            tickets = (dict(result) if isinstance(result, dict)
                       else dict.fromkeys(merged, result))
        else:
            tickets = {name: client.push(name, ids, grads, unique=True)
                       for name, (ids, grads) in merged.items()}
        for name, parts in groups:
            ticket = tickets[name]
            if ticket is not None:
                kept = self._tickets.setdefault((id(client), name), [])
                kept.append((client, ticket))
                if len(kept) > MAX_TRACKED:  # nobody waits (sync_push=False, no prefetch)
                    del kept[:-MAX_TRACKED]
            for callback in parts.on_push.values():
                callback(ticket)

    def wait(self, client: Any, table: str | None = None) -> None:
        """Wait until the pushes made to ``table`` (every table when None) of ``client``
        are applied. Buffered gradients are not flushed: call :meth:`flush` first."""
        with self._lock:
            keys = [key for key in self._tickets
                    if key[0] == id(client) and (table is None or key[1] == table)]
            tickets = [t for key in keys for t in self._tickets.pop(key)]
        seen: set[int] = set()
        for owner, ticket in tickets:
            if id(ticket) not in seen:  # a push_many ticket may cover several tables
                seen.add(id(ticket))
                owner.wait(ticket)

    def outstanding(self, client: Any = None) -> int:
        """Number of pushes not waited for yet (of ``client`` when given)."""
        with self._lock:
            return sum(len(v) for k, v in self._tickets.items()
                       if client is None or k[0] == id(client))


_default = GradientBuffer()


def default_buffer() -> GradientBuffer:
    """The process-wide gradient buffer every :class:`~xdl.lookup.RemoteTable` uses by
    default."""
    return _default


__all__ = ["GradientBuffer", "OnPush", "default_buffer", "merge_rows"]
