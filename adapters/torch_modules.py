"""The PyTorch modules behind :mod:`xdl.adapters.torch_nn` (this module imports torch).

``DistributedEmbedding`` / ``DistributedEmbeddingBag`` subclass ``nn.Embedding`` /
``nn.EmbeddingBag`` (the user's ``isinstance`` checks keep passing) but hold no weight
tensor: rows live on the parameter server, each forward pulls the batch's unique ids and
each backward pushes their gradient. ``ServerDenseOptimizer`` shares dense parameters
between workers through the server.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from xdl.dense import DenseSync
from xdl.errors import InvalidArgumentError, XdlError
from xdl.lookup import ID_MODES, LookupPlan, RemoteTable, SparseClient

#: id modes (see :data:`xdl.lookup.ID_MODES`)
MODES = ID_MODES


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("torch")


class _RemoteRows:
    """What both distributed modules share: torch's layer attributes without the weight,
    and a :class:`~xdl.lookup.RemoteTable` (``self.remote``) doing the rest."""

    remote: RemoteTable

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
        """No-op: the rows live on the server."""

    def _init_remote(self, client: SparseClient, table: str, id_mode: str, sync_push: bool,
                     remote: RemoteTable | None) -> None:
        if remote is None:
            remote = RemoteTable(client, table, self.embedding_dim, id_mode=id_mode,
                                 num_rows=self.num_embeddings, padding_idx=self.padding_idx,
                                 sync_push=sync_push, name=type(self).__name__)
        self.remote = remote

    @property
    def client(self) -> SparseClient:
        """The parameter-server client."""
        return self.remote.client

    @property
    def table(self) -> str:
        """The table's name."""
        return self.remote.table

    @property
    def id_mode(self) -> str:
        """``"index"`` or ``"hash"``."""
        return self.remote.id_mode

    @property
    def sync_push(self) -> bool:
        """Whether a pull waits for this table's pushes."""
        return self.remote.sync_push

    def prefetch(self, ids: Any, *, exact: bool = True) -> None:
        """Pull the rows of ``ids`` (a coming batch) in a background thread; see
        :meth:`xdl.lookup.RemoteTable.prefetch` (exact by default: training with prefetch
        equals training without it; ``exact=False`` rows are at most one step stale)."""
        self.remote.prefetch(ids, exact=exact)

    def wait_pushes(self) -> None:
        """Block until every push of this table is acknowledged."""
        self.remote.wait_pushes()

    def close(self) -> None:
        """Wait for outstanding pushes and stop the prefetch thread."""
        self.remote.close()

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

    :param id_mode: ``"index"`` (ids checked against ``num_embeddings``) or ``"hash"``.
    :param sync_push: wait for this table's previous pushes before each pull, so that
        training matches local training step for step (prefetched rows skip the wait;
        exact prefetch, the default of :meth:`prefetch`, re-pulls the rows those pushes
        touched instead).
    :param remote: the :class:`~xdl.lookup.RemoteTable` to look up through (``xdl.swap``
        passes it; then ``client``, ``table``, ``id_mode`` and ``sync_push`` are its own).
    :param mode: deprecated name of ``id_mode``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, client: SparseClient,
                 table: str, *, padding_idx: int | None = None, id_mode: str = "index",
                 sparse: bool = False, sync_push: bool = True,
                 remote: RemoteTable | None = None, mode: str | None = None) -> None:
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate the weight
        if mode is not None:
            warnings.warn("DistributedEmbedding(mode=...) is deprecated; use id_mode=",
                          DeprecationWarning, stacklevel=2)
            id_mode = mode
        self._init_layer(num_embeddings, embedding_dim, padding_idx, sparse)
        self._init_remote(client, table, id_mode, sync_push, remote)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        """Embeddings of ``input`` (any shape) → ``input.shape + (embedding_dim,)``."""
        found = self._planned(input)
        if found is not None:  # the step's pull already checked, de-duplicated and pulled
            plan, mark, out = found
            remote = self.remote
            remote.buffer.flush(remote.client, remote.table)
            if mark is not None and remote._push_mark() == mark:
                return self._output(out, input)  # exact: nothing pushed since the pull
            # pushed since (another thread, a shared table): re-pull what went stale
            backend = _backend()
            rows = remote.rows(plan.unique_ids)
            tensor = backend.rows_tensor(remote, plan.unique_ids, rows)
            return self._output(backend.place(tensor, plan), input)
        return self._output(_backend().lookup(self.remote, input), input)

    def _planned(self, input: torch.Tensor  # noqa: A002
                 ) -> tuple[LookupPlan, int | None, torch.Tensor] | None:
        """``(plan, push mark, output)`` that :class:`~xdl.adapters.torch_nn.StepPull`
        looked up for exactly these ids this step, if any."""
        plans = self.__dict__.get("_step_plans")
        if not plans:
            return None
        for i, (ids, plan, mark, out) in enumerate(plans):
            if (ids.dtype == input.dtype and ids.shape == input.shape
                    and ids.device == input.device and torch.equal(ids, input)):
                del plans[i]
                return plan, mark, out
        return None

    def extra_repr(self) -> str:
        """``nn.Embedding``'s repr plus table and id mode."""
        return f"{super().extra_repr()}, table={self.table!r}, id_mode={self.id_mode!r}"


class DistributedEmbeddingBag(_RemoteRows, nn.EmbeddingBag):  # type: ignore[misc]
    """``nn.EmbeddingBag`` whose rows live in table ``table`` of the parameter server.

    Same forward as ``nn.EmbeddingBag`` (1-D ids with ``offsets``, or 2-D ids;
    ``padding_idx`` entries are left out of their bag; ``per_sample_weights`` with
    ``mode="sum"``). ``mode`` is torch's combiner: ``sum``, ``mean`` or ``sqrtn``
    (``max`` is not supported).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, client: SparseClient,
                 table: str, *, mode: str = "mean", padding_idx: int | None = None,
                 include_last_offset: bool = False, id_mode: str = "index",
                 sparse: bool = False, sync_push: bool = True,
                 remote: RemoteTable | None = None) -> None:
        nn.Module.__init__(self)
        if mode not in ("sum", "mean", "sqrtn"):
            raise InvalidArgumentError(
                f"DistributedEmbeddingBag supports mode 'sum', 'mean' or 'sqrtn', got {mode!r}",
                table=table)
        self._init_layer(num_embeddings, embedding_dim, padding_idx, sparse)
        self.mode = mode
        self.include_last_offset = include_last_offset
        self._init_remote(client, table, id_mode, sync_push, remote)

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,  # noqa: A002
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Bag embeddings ``[bags, embedding_dim]``, as ``nn.EmbeddingBag.forward``."""
        out = _backend().lookup_bags(self.remote, input, offsets, combiner=self.mode,
                                     per_sample_weights=per_sample_weights,
                                     include_last_offset=self.include_last_offset)
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
    pull holds the client while it waits). The version logic is
    :class:`xdl.dense.DenseSync`'s; this class converts tensors.

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
        self.sync = DenseSync(client, self.names,
                              [p.detach().cpu().numpy().astype(np.float32) for p in self._params],
                              optimizer=optimizer, sync_workers=self.sync_workers)
        self._assign(self.sync.pull())

    @property
    def versions(self) -> list[int]:
        """Per variable, the version its current value was pulled at."""
        return self.sync.versions

    def _assign(self, values: list[np.ndarray]) -> None:
        with torch.no_grad():
            for p, value in zip(self._params, values, strict=True):
                p.copy_(torch.from_numpy(value).view_as(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Push every parameter's gradient, then pull the updated values."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: list[np.ndarray | None] = []
        for p in self._params:
            grad = p.grad
            if grad is None:
                grads.append(None)
                continue
            grad = grad.detach()
            grads.append((grad.to_dense() if grad.is_sparse else grad).cpu().numpy())
        self._assign(self.sync.step(grads))
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
