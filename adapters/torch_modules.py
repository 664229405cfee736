"""The PyTorch modules behind :mod:`xdl.adapters.torch_nn` (this module imports torch).

``DistributedEmbedding`` / ``DistributedEmbeddingBag`` subclass ``nn.Embedding`` /
``nn.EmbeddingBag`` (the user's ``isinstance`` checks keep passing) but hold no weight
tensor: rows live on the parameter server, each forward pulls the batch's unique ids and
each backward pushes their gradient. ``ServerDenseOptimizer`` shares dense parameters
between workers through the server.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.backend import PushTracker, SparseClient, as_ids, plan_bags, plan_lookup
from xdl.errors import InvalidArgumentError, XdlError

#: id modes: ``index`` ids are row numbers ``0 <= id < num_embeddings`` (checked);
#: ``hash`` ids are raw int64 feature hashes.
MODES = ("index", "hash")
_MAX_PREFETCH = 8  # prefetched lookups kept unconsumed at most (oldest dropped)
#: a prefetch's state: (push mark the rows are exact at, rows, positions not yet pulled)
_Rows = tuple[int | None, np.ndarray, np.ndarray | None]


def _member(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Bool mask: which of ``ids`` are in ``sorted_ids`` (sorted; one searchsorted)."""
    if not sorted_ids.size or not ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.searchsorted(sorted_ids, ids)
    np.minimum(pos, sorted_ids.size - 1, out=pos)
    return sorted_ids[pos] == ids


class _Prefetched:
    """One prefetched lookup: its unique ids and the future of ``(mark, rows)``."""

    __slots__ = ("exact", "future", "unique")

    def __init__(self, unique: np.ndarray, future: Future[_Rows], exact: bool) -> None:
        self.unique = unique
        self.future = future
        self.exact = exact


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("torch")


class _RemoteRows:
    """What both distributed modules share: client, table, id checks, push tracking,
    prefetch."""

    client: SparseClient
    table: str
    id_mode: str
    sync_push: bool
    num_embeddings: int
    padding_idx: int | None

    def _init_layer(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None,
                    sparse: bool) -> None:
        # the attributes torch's own layer sets, without allocating its weight
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _padding(padding_idx, num_embeddings)
        self.max_norm = None
        self.norm_type = 2.0
        self.scale_grad_by_freq = False
        self.sparse = sparse

    def reset_parameters(self) -> None:
        """No-op: initial rows come from the table's server-side initializer."""

    def _init_remote(self, client: SparseClient, table: str, id_mode: str,
                     sync_push: bool) -> None:
        if id_mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {MODES}, got {id_mode!r}")
        self.client = client
        self.table = table
        self.id_mode = id_mode
        self.sync_push = sync_push
        self._tracker = PushTracker()
        self._prefetched: deque[_Prefetched] = deque()
        self._prefetch_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    # -- ids -----------------------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray) -> None:
        if self.id_mode != "index" or ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_embeddings:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(
                f"id {bad} out of range for {type(self).__name__} with num_embeddings="
                f"{self.num_embeddings} (index mode needs 0 <= id < {self.num_embeddings}; "
                f"swap with mode='hash' for raw feature hashes)", table=self.table)

    def _unique(self, ids: np.ndarray) -> np.ndarray:
        if self.padding_idx is not None:
            ids = ids[ids != self.padding_idx]
        return np.unique(ids)

    def _on_push(self, ticket: Any) -> None:
        self._tracker.add(self.table, ticket)
        self._refresh_prefetched()

    # -- prefetch ------------------------------------------------------------------------

    def prefetch(self, ids: Any, *, exact: bool = True) -> None:
        """Pull the rows of ``ids`` (a coming batch) in a background thread.

        The next forward whose unique ids equal these uses the prefetched rows instead
        of pulling (a module called several times per step takes one prefetch per
        call).

        :param exact: (default) the rows are exactly what a pull in the forward would
            give, so training with prefetch equals training without it. The pull
            records the table's push mark (``client.push_mark``) and leaves out the ids
            of this module's other pending prefetches (the batch computing now will
            push them). Every later push of this module's table then pulls, in the
            background right after the push is sent, the rows left out and the
            prefetched rows that push touched (``client.pushed_since``); the forward
            checks once more and pulls what is still missing or stale (everything when
            the client's push log no longer reaches back). Requests to one shard are
            applied in order, so a pull sent after a push sees it. With
            ``exact=False`` every row is pulled at once and never again: the
            background pull waits for the pushes already issued, so prefetched rows
            miss at most the pushes made after ``prefetch`` was called (prefetching
            batch t+1 while batch t computes makes batch t+1 at most one step stale).
        """
        flat = as_ids(ids).reshape(-1)
        self._check_ids(flat)
        unique = self._unique(flat)
        with self._prefetch_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"xdl-prefetch-{self.table}")
            pending = [e.unique for e in self._prefetched] if exact else []
            future = self._executor.submit(self._pull_after_pushes, unique, exact, pending)
            self._prefetched.append(_Prefetched(unique, future, exact))
            while len(self._prefetched) > _MAX_PREFETCH:
                self._prefetched.popleft()

    def _push_mark(self) -> int | None:
        mark = getattr(self.client, "push_mark", None)
        return None if mark is None else int(mark(self.table))

    def _pull_after_pushes(self, unique: np.ndarray, exact: bool,
                           pending: list[np.ndarray]) -> _Rows:
        self._tracker.wait(self.client, self.table)
        if not exact:
            return None, self.client.pull(self.table, unique), None
        mark = self._push_mark()
        if mark is not None and pending and unique.size:
            # ids the pending lookups share will be pushed before this one is used:
            # pull them after that push (in _patch), not twice
            later = _member(unique, np.unique(np.concatenate(pending)))
            if later.any():
                rows = np.empty((unique.size, self.embedding_dim), dtype=np.float32)
                now = np.flatnonzero(~later)
                if now.size:
                    rows[now] = self.client.pull(self.table, unique[now])
                return mark, rows, np.flatnonzero(later)
        return mark, self.client.pull(self.table, unique), None

    def _refresh_prefetched(self) -> None:
        """After a push of this table: pull, in the background, the rows of the exact
        prefetches that the push touched or that were left out, so that the next
        forward rarely waits."""
        with self._prefetch_lock:
            if self._executor is None:
                return
            for entry in self._prefetched:
                if entry.exact:
                    entry.future = self._executor.submit(self._refreshed, entry.unique,
                                                         entry.future)

    def _refreshed(self, unique: np.ndarray, previous: Future[_Rows]) -> _Rows:
        return self._patch(unique, *previous.result())  # done: one thread, tasks in order

    def _patch(self, unique: np.ndarray, mark: int | None, rows: np.ndarray,
               missing: np.ndarray | None) -> _Rows:
        """Pull the rows of ``unique`` pushed since ``mark`` and the ``missing`` ones
        (row positions); returns the new mark, the rows, and None (nothing missing)."""
        now = self._push_mark()  # pushes up to here are on the sockets before the pull
        pushed_since = getattr(self.client, "pushed_since", None)
        since = None if mark is None or pushed_since is None else pushed_since(self.table, mark)
        if since is None:  # unknown: the client keeps no log, or it was truncated
            return now, self.client.pull(self.table, unique), None
        need = np.flatnonzero(_member(unique, since))
        if missing is not None and missing.size:
            need = np.union1d(need, missing)
        if need.size:
            if not rows.flags.writeable:
                rows = rows.copy()
            rows[need] = self.client.pull(self.table, unique[need])
        return now, rows, None

    def _rows_for(self, unique: np.ndarray) -> np.ndarray | None:
        """Prefetched rows for ``unique``, else None after waiting for earlier pushes."""
        entry = None
        with self._prefetch_lock:
            for i, candidate in enumerate(self._prefetched):
                if np.array_equal(candidate.unique, unique):
                    entry = candidate
                    del self._prefetched[i]
                    break
        if entry is not None:
            mark, rows, missing = entry.future.result()
            if entry.exact:  # pushes since the last refresh (a shared table, a truncated log)
                _, rows, _ = self._patch(unique, mark, rows, missing)
            return rows
        if self.sync_push:
            self._tracker.wait(self.client, self.table)
        return None

    def wait_pushes(self) -> None:
        """Block until every push this module issued is acknowledged."""
        self._tracker.wait(self.client, self.table)

    def close(self) -> None:
        """Wait for outstanding pushes and stop the prefetch thread."""
        with self._prefetch_lock:
            executor, self._executor = self._executor, None
            self._prefetched.clear()
        if executor is not None:
            executor.shutdown(wait=True)
        self.wait_pushes()

    def _output(self, out: torch.Tensor, like: Any) -> torch.Tensor:
        device = getattr(like, "device", None)
        return out if device is None or device == out.device else out.to(device)

    def __getattr__(self, name: str) -> Any:
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} for table {self.table!r} holds no weight tensor; the "
                "rows live on the parameter server: use client.pull(table, ids), or "
                "xdl.unswap(model, client) to get ordinary modules with the trained rows")
        return super().__getattr__(name)  # type: ignore[misc]


def _padding(padding_idx: int | None, num_embeddings: int) -> int | None:
    if padding_idx is not None and padding_idx < 0:
        padding_idx += num_embeddings
    return padding_idx


class DistributedEmbedding(_RemoteRows, nn.Embedding):  # type: ignore[misc]
    """``nn.Embedding`` whose rows live in table ``table`` of the parameter server.

    Same forward as ``nn.Embedding`` (``padding_idx`` rows are zeros with no gradient).
    ``max_norm`` and ``scale_grad_by_freq`` are not supported.

    :param sync_push: wait for this table's previous pushes before each pull, so that
        training matches local training step for step (prefetched rows skip the wait;
        exact prefetch, the default of :meth:`prefetch`, re-pulls the rows those pushes
        touched instead).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, client: SparseClient,
                 table: str, *, padding_idx: int | None = None, mode: str = "index",
                 sparse: bool = False, sync_push: bool = True) -> None:
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate the weight
        self._init_layer(num_embeddings, embedding_dim, padding_idx, sparse)
        self._init_remote(client, table, mode, sync_push)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        """Embeddings of ``input`` (any shape) → ``input.shape + (embedding_dim,)``."""
        ids = as_ids(input)
        self._check_ids(ids)
        plan = plan_lookup(ids, self.padding_idx)
        rows = self._rows_for(plan.unique_ids)
        out = _backend().embedding_from_plan(self.client, self.table, plan, rows=rows,
                                             on_push=self._on_push)
        return self._output(out, input)

    def extra_repr(self) -> str:
        """``nn.Embedding``'s repr plus table and id mode."""
        return f"{super().extra_repr()}, table={self.table!r}, mode={self.id_mode!r}"


class DistributedEmbeddingBag(_RemoteRows, nn.EmbeddingBag):  # type: ignore[misc]
    """``nn.EmbeddingBag`` whose rows live in table ``table`` of the parameter server.

    Same forward as ``nn.EmbeddingBag`` (1-D ids with ``offsets``, or 2-D ids;
    ``padding_idx`` entries are left out of their bag; ``per_sample_weights`` with
    ``mode="sum"``). Modes ``sum``, ``mean`` and ``sqrtn`` (``max`` is not supported).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, client: SparseClient,
                 table: str, *, mode: str = "mean", padding_idx: int | None = None,
                 include_last_offset: bool = False, id_mode: str = "index",
                 sparse: bool = False, sync_push: bool = True) -> None:
        nn.Module.__init__(self)
        if mode not in ("sum", "mean", "sqrtn"):
            raise InvalidArgumentError(
                f"DistributedEmbeddingBag supports mode 'sum', 'mean' or 'sqrtn', got {mode!r}",
                table=table)
        self._init_layer(num_embeddings, embedding_dim, padding_idx, sparse)
        self.mode = mode
        self.include_last_offset = include_last_offset
        self._init_remote(client, table, id_mode, sync_push)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,  # noqa: A002
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bag embeddings ``[bags, embedding_dim]``, as ``nn.EmbeddingBag.forward``."""
        ids = as_ids(input)
        self._check_ids(ids)
        plan = plan_bags(ids, None if offsets is None else as_ids(offsets), mode=self.mode,
                         padding_idx=self.padding_idx,
                         include_last_offset=self.include_last_offset)
        rows = self._rows_for(plan.lookup.unique_ids)
        backend = _backend()
        unique_rows = backend.pull_rows(self.client, self.table, plan.lookup.unique_ids,
                                        rows=rows, on_push=self._on_push)
        out = backend.combine(unique_rows, plan, per_sample_weights=per_sample_weights)
        return self._output(out, input)

    def extra_repr(self) -> str:
        """``nn.EmbeddingBag``'s repr plus table and id mode."""
        return f"{super().extra_repr()}, table={self.table!r}, id_mode={self.id_mode!r}"


def _named(params: Iterable[Any]) -> list[tuple[str, nn.Parameter]]:
    out = []
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            name, p = item
        elif isinstance(item, dict):
            raise InvalidArgumentError(
                "ServerDenseOptimizer takes parameters or (name, parameter) pairs, not groups")
        else:
            name, p = f"param{i}", item
        out.append((str(name), p))
    return out


class ServerDenseOptimizer(torch.optim.Optimizer):
    """Dense parameters shared by several workers through the parameter server.

    Each parameter becomes a dense variable ``prefix + name`` on the shards (created
    with the parameter's current value; the first worker's value wins, every worker
    starts from the server's). ``step()`` pushes every gradient and replaces each
    parameter by the server's fresh value. With ``sync_workers=N`` the server averages
    N workers' gradients per step and ``step()`` waits for that step's update (each push
    carries the version its gradient was computed at); with 0 it applies each push as
    it comes (asynchronous). In sync mode each worker needs its own client (a blocking
    pull holds the client while it waits).

    One worker does not need this: keep the model's own ``torch.optim`` optimizer.

    :param params: ``model.parameters()`` or ``model.named_parameters()`` (names make
        the variable names stable across code changes; otherwise ``param<i>``).
    :param client: an ``xdl.Client``.
    :param optimizer: an ``xdl.optim`` spec applied on the server.
    :param sync_workers: number of workers to aggregate per step, or 0 for async.
    :param prefix: prefix of the dense variable names.
    """

    def __init__(self, params: Iterable[Any], client: Any, *, optimizer: Any,
                 sync_workers: int = 0, prefix: str = "dense.") -> None:
        named = _named(params)
        if not named:
            raise InvalidArgumentError("ServerDenseOptimizer got no parameters")
        super().__init__([p for _, p in named], defaults={})
        self.client = client
        self.sync_workers = int(sync_workers)
        self.names = [prefix + name for name, _ in named]
        self._params = [p for _, p in named]
        #: per variable, the version its current value was pulled at
        self.versions = [0] * len(named)
        for name, p in zip(self.names, self._params, strict=True):
            initial = p.detach().cpu().numpy().astype(np.float32)
            client.create_dense(name, tuple(p.shape), optimizer=optimizer, initial=initial,
                                sync_workers=self.sync_workers)
        self._pull(None)

    def _pull(self, min_versions: list[int] | None) -> None:
        seen = getattr(self.client, "dense_version", None)
        with torch.no_grad():
            for i, (name, p) in enumerate(zip(self.names, self._params, strict=True)):
                wanted = None if min_versions is None else min_versions[i]
                value = np.asarray(self.client.dense_pull(name, min_version=wanted))
                p.copy_(torch.from_numpy(np.array(value, dtype=np.float32)).view_as(p))
                # the client reports the version it read; else assume the one asked for
                self.versions[i] = int(seen(name)) if seen is not None else (wanted or 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Push every parameter's gradient, then pull the updated values."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tickets = []
        for name, p, version in zip(self.names, self._params, self.versions, strict=True):
            grad = (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            if grad.is_sparse:
                grad = grad.to_dense()
            g = np.ascontiguousarray(grad.cpu().numpy(), dtype=np.float32)
            tickets.append(self.client.dense_push(name, g, step=version))
        for ticket in tickets:
            self.client.wait(ticket)
        self._pull([v + 1 for v in self.versions] if self.sync_workers else None)
        return loss


def iter_distributed(model: nn.Module) -> Iterator[tuple[str, _RemoteRows]]:
    """``(path, module)`` of every distributed embedding module in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, _RemoteRows):
            yield path, module


def check_unsupported(module: nn.Module, path: str) -> None:
    """Raise a clear error for ``nn.Embedding`` options the server cannot reproduce."""
    if getattr(module, "max_norm", None) is not None:
        raise XdlError(f"cannot swap {path or 'model'}: max_norm is not supported")
    if getattr(module, "scale_grad_by_freq", False):
        raise XdlError(f"cannot swap {path or 'model'}: scale_grad_by_freq is not supported")
    if isinstance(module, nn.EmbeddingBag) and module.mode == "max":
        raise XdlError(f"cannot swap {path or 'model'}: EmbeddingBag mode 'max' is not supported")
