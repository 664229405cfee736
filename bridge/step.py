"""One training step's network work, for backends whose step sees all its lookups at once.

Framework-neutral (numpy and threads only). :func:`step_rows` pulls the rows of every
lookup of a step with one ``client.pull_many`` per client; :class:`StepPipeline` sends a
step's push from a background thread and then pulls the announced coming step's rows,
which the coming step takes only while they are exact. The TensorFlow wrapper step
(``xdl.tf_wrapper``) is built on them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .dedup import unique_inverse
from .lookup import RemoteTable

__all__ = ["StepPipeline", "push_mark", "step_rows"]


def step_rows(remotes: Sequence[RemoteTable], uniques: Sequence[np.ndarray], *,
               wait: bool = True) -> list[np.ndarray]:
    """Rows ``float32 [U_i, dim_i]`` of several lookups of one step (``uniques[i]`` of
    ``remotes[i]``), as :meth:`xdl.lookup.RemoteTable.rows` gives them, with one round
    trip: buffered gradients are pushed first; a lookup whose table has a prefetch
    pending takes it (``rows``); the others are pulled together, with one
    ``client.pull_many`` per client (after waiting for the tables' pushes when
    ``sync_push`` and ``wait``; a table looked up twice is pulled once).

    ``wait=False`` is for a prefetch sent right after a push: requests to one shard are
    applied in order, so the pull sees the push (as the core's exact prefetch relies
    on)."""
    out: list[np.ndarray | None] = [None] * len(remotes)
    flushed: set[tuple[int, int]] = set()
    groups: dict[int, dict[str, list[int]]] = {}  # client → table → positions
    for i, remote in enumerate(remotes):
        key = (id(remote.buffer), id(remote.client))
        if key not in flushed:
            flushed.add(key)
            remote.buffer.flush(remote.client)
        if remote.pending_prefetches or not hasattr(remote.client, "pull_many"):
            out[i] = remote.rows(uniques[i])
        else:
            groups.setdefault(id(remote.client), {}).setdefault(remote.table, []).append(i)
    for tables in groups.values():
        first = remotes[next(iter(tables.values()))[0]]
        client: Any = first.client  # has pull_many (checked above)
        request: dict[str, np.ndarray] = {}
        splits: dict[str, tuple[np.ndarray, list[int]]] = {}
        for table, where in tables.items():
            if wait and remotes[where[0]].sync_push:
                remotes[where[0]].buffer.wait(client, table)
            if len(where) == 1:
                request[table] = uniques[where[0]]
            else:  # the union once
                request[table], inverse = unique_inverse(
                    np.concatenate([uniques[i] for i in where]))
                splits[table] = (inverse, [uniques[i].size for i in where])
        wanted = {t: ids for t, ids in request.items() if ids.size}
        got = client.pull_many(wanted, unique=True) if wanted else {}
        for table, where in tables.items():
            rows = got.get(table)
            if rows is None:
                rows = np.zeros((0, remotes[where[0]].dim), dtype=np.float32)
            if table not in splits:
                out[where[0]] = rows
                continue
            inverse, sizes = splits[table]
            start = 0
            for i, size in zip(where, sizes, strict=True):
                out[i] = rows[inverse[start:start + size]]
                start += size
    return out  # type: ignore[return-value]


class StepPipeline:
    """A training loop's network work off its critical path (numpy and threads only).

    A step's push is sent by a background thread (the step goes on with its dense
    update meanwhile), which then, when the rows of the coming step were announced
    (:meth:`announce`, e.g. by the TensorFlow wrapper step's ``prefetch``), pulls those
    rows with one ``client.pull_many``, sent right after the push (a shard applies a
    client's requests in order, so the pull sees the push, as the core's exact prefetch
    relies on). The coming step takes them (:meth:`take`) only if its lookups are the
    announced ones and no push to their tables was issued since the pull (push marks):
    exact, as a pull in the step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._job: Future[Any] | None = None  # the last push (and the coming pull)
        self._coming: deque[tuple[list[RemoteTable], list[np.ndarray]]] = deque(maxlen=4)
        self._ready: Future[Any] | None = None  # (remotes, uniques, marks, rows)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="xdl-step")
            return self._executor.submit(fn, *args)

    def announce(self, remotes: list[RemoteTable], uniques: list[np.ndarray]) -> None:
        """The lookups of a coming step; pulled now when no step is in flight, else
        right after the running step's push."""
        with self._lock:
            self._coming.append((remotes, uniques))
            idle = self._job is None and self._ready is None
        if idle:
            future = self._submit(self._pull_coming)
            with self._lock:
                self._ready = future

    def push(self, flush: Callable[[], None], parts: list[tuple[RemoteTable, np.ndarray,
                                                                 np.ndarray]]) -> None:
        """Hand a step's row gradients ``(remote, unique ids, grads)`` (owned: not
        reused by the caller) to the buffer and push them in the background; then pull
        the announced coming step's rows."""
        self.wait()

        def job() -> Any:
            for remote, unique, grad in parts:
                remote.add_gradients(unique, grad)
            flush()
            return self._pull_coming()

        future = self._submit(job)
        with self._lock:
            self._job = self._ready = future

    def _pull_coming(self) -> Any:
        with self._lock:
            if not self._coming:
                return None
            remotes, uniques = self._coming.popleft()
        marks = [push_mark(r) for r in remotes]
        if any(m is None for m in marks) or any(r.pending_prefetches for r in remotes):
            return None
        # sent after the push: a shard applies a client's requests in order
        rows = step_rows(remotes, uniques, wait=False)
        return remotes, uniques, marks, rows

    def take(self, remotes: list[RemoteTable], uniques: list[np.ndarray]
             ) -> list[np.ndarray] | None:
        """The pulled rows when they are these lookups' and still exact, else None
        (after the running step's push is done: the caller then pulls)."""
        with self._lock:
            ready, self._ready = self._ready, None
        self.wait()
        if ready is None:
            return None
        got = ready.result()
        if got is None:
            return None
        was_remotes, was_uniques, marks, rows = got
        if (len(was_remotes) != len(remotes)
                or any(a is not b for a, b in zip(was_remotes, remotes, strict=True))
                or any(not np.array_equal(a, b) for a, b in zip(was_uniques, uniques,
                                                                 strict=True))
                or any(push_mark(r) != m for r, m in zip(remotes, marks, strict=True))):
            with self._lock:  # announced lookups that did not come: forgotten
                self._coming.clear()
            return None
        return rows  # type: ignore[no-any-return]

    def wait(self) -> None:
        """Wait for the running step's push (raises its error)."""
        with self._lock:
            job, self._job = self._job, None
        if job is not None:
            job.result()

    def close(self) -> None:
        """Wait for the push, forget announced lookups, stop the thread."""
        try:
            self.wait()
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
                self._coming.clear()
                self._ready = None
            if executor is not None:
                executor.shutdown(wait=True)


def push_mark(remote: RemoteTable) -> int | None:
    """``remote``'s table's push mark on its client (None: the client keeps no push log)."""
    mark = getattr(remote.client, "push_mark", None)
    return None if mark is None else int(mark(remote.table))
