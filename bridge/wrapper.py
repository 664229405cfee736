"""The generic decorator behind ``xdl.torch_wrapper`` / ``tf_wrapper`` / ``mxnet_wrapper``.

XDL's script shape: sparse inputs become embeddings before an unmodified model function
sees them. Two ways to say which arguments are looked up, freely mixed:

* ``tables={"item": "item", "hist": xdl.Lookup("item", combiner="mean")}``: the named
  arguments arrive as ids;
* ``xdl.embedding(name, ids, dim, ...)`` passed as an argument (XDL's
  ``xdl.embedding``): a description of the lookup, resolved by the wrapper.

The wrapper creates the tables it is told the ``dim`` of, keeps one
:class:`~xdl.lookup.RemoteTable` per table (ids checked and de-duplicated once,
gradients buffered and pushed once per table per step) and asks the backend for the
differentiable lookup. What the decorated function does with the embeddings (its loss,
its dense optimizer) is its own business; a backend's thin name (``tf_wrapper``) may
add more, e.g. computing and applying gradients.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import InvalidArgumentError
from .lookup import COMBINERS, ID_MODES, RemoteTable

T = TypeVar("T")


@dataclass(frozen=True)
class Lookup:
    """How one argument of a wrapped function is looked up.

    :param table: table name.
    :param combiner: None for a plain lookup (``ids.shape + (dim,)``), or ``sum`` /
        ``mean`` / ``sqrtn`` to combine bags: the argument is then 2-D padded ids, or a
        tuple ``(ids, offsets)``.
    :param padding_idx: id that contributes nothing (zeros; left out of bags).
    :param dim: when given, the table is created on first call (with ``initializer``,
        ``optimizer``, ``seed`` when given); otherwise it must exist.
    :param id_mode: ``"hash"`` (default: raw int64 feature hashes) or ``"index"`` (row
        numbers below ``num_rows``, checked).
    :param num_rows: rows of an index-mode table.
    """

    table: str
    combiner: str | None = None
    padding_idx: int | None = None
    dim: int | None = None
    initializer: Any = None
    optimizer: Any = None
    seed: int | None = None
    id_mode: str = "hash"
    num_rows: int | None = None

    def __post_init__(self) -> None:
        if self.combiner is not None and self.combiner not in COMBINERS:
            raise InvalidArgumentError(
                f"combiner must be None or one of {COMBINERS}, got {self.combiner!r}",
                table=self.table)
        if self.id_mode not in ID_MODES:
            raise InvalidArgumentError(f"id_mode must be one of {ID_MODES}, got "
                                       f"{self.id_mode!r}", table=self.table)


@dataclass(frozen=True)
class EmbeddingInput:
    """A lookup described by :func:`embedding`, resolved by the wrapper it is passed to."""

    spec: Lookup
    ids: Any
    offsets: Any = None


def embedding(name: str, ids: Any, dim: int, *, initializer: Any = None,
              combiner: str | None = None, offsets: Any = None, id_mode: str = "hash",
              num_rows: int | None = None, padding_idx: int | None = None,
              optimizer: Any = None, seed: int | None = None) -> EmbeddingInput:
    """XDL's ``xdl.embedding``: the embedding of ``ids`` in table ``name``, for an argument
    of a wrapped function (``@xdl.torch_wrapper(client)``, ``tf_wrapper``, ...).

    The table is created with ``dim`` (and ``initializer`` / ``optimizer`` / ``seed``
    when given) on first use. With a ``combiner`` (``sum`` / ``mean`` / ``sqrtn``) the ids
    are bags: 2-D padded ids, or 1-D ids with ``offsets``.
    """
    spec = Lookup(name, combiner=combiner, padding_idx=padding_idx, dim=dim,
                  initializer=initializer, optimizer=optimizer, seed=seed, id_mode=id_mode,
                  num_rows=num_rows)
    return EmbeddingInput(spec, ids, offsets)


class Wrapper:
    """What a wrapped function shares across calls: client, backend, tables.

    :ivar remotes: one :class:`~xdl.lookup.RemoteTable` per (table, padding id).
    """

    def __init__(self, client: Any, backend: str | None, sync_push: bool) -> None:
        self.client = client
        self.backend_name = backend
        self.sync_push = sync_push
        self.remotes: dict[tuple[str, int | None], RemoteTable] = {}
        self._created: set[str] = set()
        self._lock = threading.Lock()

    def backend(self, like: Any) -> Any:
        """The backend (by name, else the owner of ``like``)."""
        from .plugins import get_backend

        return get_backend(self.backend_name if self.backend_name is not None else like)

    def remote(self, spec: Lookup) -> RemoteTable:
        """The :class:`~xdl.lookup.RemoteTable` of ``spec`` (the table created if needed)."""
        key = (spec.table, spec.padding_idx)
        with self._lock:
            remote = self.remotes.get(key)
            if remote is not None:
                return remote
            if spec.dim is not None and spec.table not in self._created:
                options = {k: v for k, v in (("initializer", spec.initializer),
                                              ("optimizer", spec.optimizer),
                                              ("seed", spec.seed)) if v is not None}
                self.client.create_table(spec.table, spec.dim, **options)
                self._created.add(spec.table)
            dim = spec.dim
            if dim is None:
                dim = int(self.client.describe_table(spec.table)["dim"])
            remote = self.remotes[key] = RemoteTable(
                self.client, spec.table, dim, id_mode=spec.id_mode, num_rows=spec.num_rows,
                padding_idx=spec.padding_idx, sync_push=self.sync_push,
                name=f"lookup of table {spec.table!r}")
            return remote

    def resolve(self, spec: Lookup, value: Any, offsets: Any = None) -> Any:
        """The differentiable embedding of ``value`` (ids, or ``(ids, offsets)``)."""
        if spec.combiner is not None and offsets is None and isinstance(value, tuple):
            value, offsets = value
        backend = self.backend(value)
        remote = self.remote(spec)
        if spec.combiner is None:
            return backend.lookup(remote, value)
        return backend.lookup_bags(remote, value, offsets, combiner=spec.combiner)

    def wait_pushes(self) -> None:
        """Push what is buffered and wait until every push of these tables is applied."""
        for remote in list(self.remotes.values()):
            remote.wait_pushes()

    def close(self) -> None:
        """Wait for the pushes and stop prefetch threads."""
        for remote in list(self.remotes.values()):
            remote.close()


def wrapper(client: Any, tables: Mapping[str, str | Lookup] | None = None, *,
            backend: str | None = None, sync_push: bool = True
            ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: the function's sparse arguments arrive as ids (or as
    :func:`embedding` descriptions) and it receives their embeddings (differentiable;
    their gradients are pushed once per table per step).

    :param client: an ``xdl.Client``.
    :param tables: argument name → table name (plain lookup) or :class:`Lookup`.
    :param backend: the backend's name (``"torch"``); None: the backend owning the ids.
    :param sync_push: wait for a table's pushes before its next pull.

    The wrapped function gains ``wait_pushes()``, ``close()`` and ``xdl`` (its
    :class:`Wrapper`)::

        @xdl.wrapper(client, tables={"item": "item", "hist": xdl.Lookup("item", "mean")},
                     backend="torch")
        def model_fn(item, hist, dense): ...   # item: [B, dim], hist: [B, dim]

        loss = model_fn(item=item_ids, hist=(hist_ids, hist_offsets), dense=x)
    """
    specs = {arg: Lookup(t) if isinstance(t, str) else t for arg, t in (tables or {}).items()}
    if backend is not None:
        from .plugins import get_backend

        get_backend(backend)  # fail now, naming the extra to install
    state = Wrapper(client, backend, sync_push)

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(fn)
        missing = [arg for arg in specs if arg not in signature.parameters]
        if missing:
            raise InvalidArgumentError(
                f"wrapper: {fn.__qualname__} has no argument(s) {missing}")

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> T:
            bound = signature.bind(*args, **kwargs)
            for arg, value in bound.arguments.items():
                if isinstance(value, EmbeddingInput):
                    bound.arguments[arg] = state.resolve(value.spec, value.ids, value.offsets)
                elif arg in specs:
                    bound.arguments[arg] = state.resolve(specs[arg], value)
                elif isinstance(value, (list, tuple)) and any(
                        isinstance(v, EmbeddingInput) for v in value):
                    bound.arguments[arg] = type(value)(
                        state.resolve(v.spec, v.ids, v.offsets)
                        if isinstance(v, EmbeddingInput) else v for v in value)
            return fn(*bound.args, **bound.kwargs)

        wrapped.wait_pushes = state.wait_pushes  # type: ignore[attr-defined]
        wrapped.close = state.close  # type: ignore[attr-defined]
        wrapped.xdl = state  # type: ignore[attr-defined]
        return wrapped

    return decorate


def torch_wrapper(client: Any, tables: Mapping[str, str | Lookup] | None = None, *,
                  sync_push: bool = True) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """:func:`wrapper` for PyTorch functions (``backend="torch"``)::

        @xdl.torch_wrapper(client, tables={"item": "item", "hist": Lookup("item", "mean")})
        def model_fn(item, hist, dense): ...   # item: [B, dim], hist: [B, dim]

        loss = model_fn(item=item_ids, hist=(hist_ids, hist_offsets), dense=x)
    """
    return wrapper(client, tables, backend="torch", sync_push=sync_push)


def tf_wrapper(client: Any, tables: Mapping[str, str | Lookup] | None = None, *,
               sync_push: bool = True, **options: Any) -> Callable[[Callable[..., T]],
                                                                    Callable[..., T]]:
    """:func:`wrapper` for TensorFlow functions (the ``tensorflow`` backend's own
    decorator when it provides one as ``Backend.wrapper``)."""
    return _named_wrapper("tensorflow", client, tables, sync_push, options)


def mxnet_wrapper(client: Any, tables: Mapping[str, str | Lookup] | None = None, *,
                  sync_push: bool = True, **options: Any) -> Callable[[Callable[..., T]],
                                                                       Callable[..., T]]:
    """:func:`wrapper` for MXNet functions (the ``mxnet`` backend's own decorator when it
    provides one as ``Backend.wrapper``)."""
    return _named_wrapper("mxnet", client, tables, sync_push, options)


def _named_wrapper(name: str, client: Any, tables: Mapping[str, str | Lookup] | None,
                   sync_push: bool, options: dict[str, Any]
                   ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    from .plugins import get_backend

    backend = get_backend(name)  # BackendNotAvailableError until the plugin is there
    custom = getattr(backend, "wrapper", None)
    if custom is not None:
        return custom(client, tables, sync_push=sync_push, **options)  # type: ignore[no-any-return]
    if options:
        raise InvalidArgumentError(f"{name} wrapper takes no options {sorted(options)}")
    return wrapper(client, tables, backend=name, sync_push=sync_push)


def prefetch_batches(batches: Iterable[T], schedule: Callable[[T], Any]) -> Iterator[T]:
    """Yield ``batches`` unchanged, calling ``schedule(next_batch)`` before each yield.

    ``schedule`` starts the pulls of a batch, typically with the ``prefetch`` of each
    distributed layer (:meth:`xdl.lookup.RemoteTable.prefetch`)::

        for batch in prefetch_batches(loader, lambda b: model.item_emb.prefetch(b["item"])):
            loss = model(batch); loss.backward(); ...

    The pull of batch t+1 then runs while batch t computes. ``prefetch`` is exact by
    default (the rows batch t's push touched are re-pulled after it); pass
    ``functools.partial(layer.prefetch, exact=False)`` for rows at most one step stale.
    """
    iterator = iter(batches)
    try:
        current = next(iterator)
    except StopIteration:
        return
    schedule(current)
    for following in iterator:
        schedule(following)
        yield current
        current = following
    yield current


__all__ = [
    "EmbeddingInput",
    "Lookup",
    "Wrapper",
    "embedding",
    "mxnet_wrapper",
    "prefetch_batches",
    "tf_wrapper",
    "torch_wrapper",
    "wrapper",
]


class _CallableModule(types.ModuleType):
    """``xdl.wrapper`` names both this module and its :func:`wrapper`: importing the
    submodule sets the package's attribute to the module, so the module forwards calls
    to the function and ``xdl.wrapper(client, ...)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return wrapper(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
