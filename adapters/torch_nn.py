"""PyTorch adapter: swap a model's embedding layers for distributed ones, and back.

``swap(model, client)`` replaces every ``nn.Embedding`` / ``nn.EmbeddingBag`` (also
nested in ``ModuleDict``, ``ModuleList``, ``Sequential`` or a subclassed model) by a
:class:`DistributedEmbedding` / :class:`DistributedEmbeddingBag` reading table
``prefix + <module path>``; ``unswap(model, client)`` puts ordinary modules back with
the trained rows. ``torch_wrapper`` is the decorator for functional code, and
``prefetch_batches`` overlaps the pull of batch t+1 with the compute of batch t.

This module is a built-in plugin; it does not import torch until a function needs it
(the module classes live in :mod:`xdl.adapters.torch_modules` and are re-exported
lazily).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from xdl.backend import PushTracker
from xdl.errors import InvalidArgumentError, XdlError
from xdl.hookspecs import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from .torch_modules import (
        DistributedEmbedding,
        DistributedEmbeddingBag,
        ServerDenseOptimizer,
    )

__all__ = [
    "DistributedEmbedding",
    "DistributedEmbeddingBag",
    "Lookup",
    "ServerDenseOptimizer",
    "prefetch",
    "prefetch_batches",
    "swap",
    "torch_wrapper",
    "unswap",
]

_LAZY = {"DistributedEmbedding", "DistributedEmbeddingBag", "ServerDenseOptimizer",
         "iter_distributed"}
T = TypeVar("T")
_UNSWAP_CHUNK = 1 << 20


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from xdl.plugins import get_backend

        get_backend("torch")  # BackendNotAvailableError naming the extra, if torch is missing
        from . import torch_modules

        return getattr(torch_modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _modules() -> Any:
    from xdl.plugins import get_backend

    get_backend("torch")
    from . import torch_modules

    return torch_modules


def _table_options(path: str, defaults: dict[str, Any],
                   per_table: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    options = {k: v for k, v in defaults.items() if v is not None}
    if per_table and path in per_table:
        options.update(per_table[path])
    return options


def swap(model: nn.Module, client: Any, *, optimizer: Any = None, initializer: Any = None,
         per_table: Mapping[str, Mapping[str, Any]] | None = None, mode: str = "index",
         prefix: str = "", seed: int | None = None, sync_push: bool = True) -> nn.Module:
    """Replace the model's embedding layers by distributed ones; returns the model.

    Each ``nn.Embedding`` / ``nn.EmbeddingBag`` at module path ``p`` becomes a
    :class:`DistributedEmbedding` / :class:`DistributedEmbeddingBag` over table
    ``prefix + p`` (created here with ``client.create_table``; idempotent, so every
    worker may call ``swap``). The original weights are dropped: initial rows come from
    the table's server-side initializer (use ``xdl.init.generate`` to reproduce them
    locally). A layer shared at several paths becomes one distributed module (first
    path names the table). The model itself may be an embedding layer; then the
    replacement is returned.

    :param model: any ``nn.Module``.
    :param client: an ``xdl.Client`` (or anything with the same ``create_table`` /
        ``pull`` / ``push`` / ``wait``).
    :param optimizer: ``xdl.optim`` spec of every table (client default when None).
    :param initializer: ``xdl.init`` spec of every table (client default when None).
    :param per_table: per module path, overrides: ``optimizer``, ``initializer``,
        ``seed``, ``name`` (table name), ``mode``.
    :param mode: ``"index"`` (ids are row numbers, checked against num_embeddings) or
        ``"hash"`` (ids are raw int64 feature hashes).
    :param prefix: prefix of every table name.
    :param seed: table seed (client default when None).
    :param sync_push: wait for a table's pushes before its next pull (exact equivalence
        with local training); prefetched batches skip the wait (an exact prefetch, the
        default, re-pulls the rows those pushes touched instead).
    """
    mods = _modules()
    from torch import nn

    defaults = {"optimizer": optimizer, "initializer": initializer, "seed": seed}
    replaced: dict[int, nn.Module] = {}
    targets = [(path, m) for path, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
               and not isinstance(m, mods._RemoteRows)]
    for path, old in targets:
        new = replaced.get(id(old))
        if new is None:
            mods.check_unsupported(old, path)
            options = _table_options(path, defaults, per_table)
            table = options.pop("name", prefix + path if path else prefix or "embedding")
            id_mode = options.pop("mode", mode)
            client.create_table(table, old.embedding_dim, **options)
            if isinstance(old, nn.EmbeddingBag):
                new = mods.DistributedEmbeddingBag(
                    old.num_embeddings, old.embedding_dim, client, table, mode=old.mode,
                    padding_idx=old.padding_idx, include_last_offset=old.include_last_offset,
                    id_mode=id_mode, sparse=old.sparse, sync_push=sync_push)
            else:
                new = mods.DistributedEmbedding(
                    old.num_embeddings, old.embedding_dim, client, table,
                    padding_idx=old.padding_idx, mode=id_mode, sparse=old.sparse,
                    sync_push=sync_push)
            new.train(old.training)
            replaced[id(old)] = new
        if not path:
            return new
        _set_submodule(model, path, new)
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)  # ModuleDict / ModuleList / Sequential keep string keys


def _export(module: Any, client: Any) -> nn.Module:
    import torch
    from torch import nn

    module.close()
    if module.id_mode != "index":
        raise XdlError(
            f"cannot unswap table {module.table!r}: it is in hash mode, so it has no row "
            "range to export; pull the ids you need with client.pull(table, ids)")
    chunks = [np.asarray(client.pull(module.table, np.arange(lo, min(lo + _UNSWAP_CHUNK,
                                                                       module.num_embeddings),
                                                               dtype=np.int64)))
              for lo in range(0, module.num_embeddings, _UNSWAP_CHUNK)]
    weight = torch.from_numpy(np.concatenate(chunks).astype(np.float32))
    if module.padding_idx is not None:
        weight[module.padding_idx] = 0.0  # as nn.Embedding, and as the distributed forward
    new: nn.Module
    if isinstance(module, nn.EmbeddingBag):
        new = nn.EmbeddingBag(module.num_embeddings, module.embedding_dim, mode=module.mode,
                              sparse=module.sparse, include_last_offset=module.include_last_offset,
                              padding_idx=module.padding_idx, _weight=weight)
    else:
        new = nn.Embedding(module.num_embeddings, module.embedding_dim,
                           padding_idx=module.padding_idx, sparse=module.sparse, _weight=weight)
    new.train(module.training)
    return new


def unswap(model: nn.Module, client: Any) -> nn.Module:
    """Put ordinary ``nn.Embedding`` / ``nn.EmbeddingBag`` back, with the trained rows.

    Waits for outstanding pushes and stops prefetch threads first. Index-mode tables
    only (rows ``0 .. num_embeddings-1`` are pulled); a hash-mode table raises.
    ``nn.EmbeddingBag(mode="sqrtn")`` does not exist in torch, so such a layer raises.
    Returns the model (or the replacement, when the model itself was swapped).
    """
    mods = _modules()
    restored: dict[int, nn.Module] = {}
    targets = [(path, m) for path, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, mods._RemoteRows)]
    for path, module in targets:
        if getattr(module, "mode", None) == "sqrtn" and isinstance(module,
                                                                   mods.DistributedEmbeddingBag):
            raise XdlError(f"cannot unswap {path or 'model'}: nn.EmbeddingBag has no 'sqrtn'")
        new = restored.get(id(module))
        if new is None:
            new = restored[id(module)] = _export(module, client)
        if not path:
            return new
        _set_submodule(model, path, new)
    return model


@dataclass(frozen=True)
class Lookup:
    """One embedding argument of a :func:`torch_wrapper` function.

    :param table: table name.
    :param combiner: None for a plain lookup (``ids.shape + (dim,)``), or ``sum`` /
        ``mean`` / ``sqrtn`` to combine bags: the argument is then 2-D padded ids, or a
        tuple ``(ids, offsets)``.
    :param padding_idx: id that contributes nothing (zeros; left out of bags).
    :param dim: when given, the table is created on first call (with ``initializer``,
        ``optimizer``, ``seed`` when given); otherwise it must exist.
    """

    table: str
    combiner: str | None = None
    padding_idx: int | None = None
    dim: int | None = None
    initializer: Any = None
    optimizer: Any = None
    seed: int | None = None


def torch_wrapper(client: Any, tables: Mapping[str, str | Lookup], *,
                  sync_push: bool = True) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator for functional models: named arguments arrive as ids, the function
    receives their embeddings (differentiable; backward pushes).

    ``tables`` maps an argument name to a table name (plain lookup) or a
    :class:`Lookup`. The ids are int64 tensors or arrays of raw ids (hash mode)::

        @xdl.torch_wrapper(client, tables={"item": "item", "hist": Lookup("item", "mean")})
        def model_fn(item, hist, dense): ...   # item: [B, dim], hist: [B, dim]

        loss = model_fn(item=item_ids, hist=(hist_ids, hist_offsets), dense=x)
    """
    specs = {arg: Lookup(t) if isinstance(t, str) else t for arg, t in tables.items()}
    tracker = PushTracker()
    created: set[str] = set()

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        signature = inspect.signature(fn)
        missing = [arg for arg in specs if arg not in signature.parameters]
        if missing:
            raise InvalidArgumentError(
                f"torch_wrapper: {fn.__qualname__} has no argument(s) {missing}")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            from xdl.plugins import get_backend

            backend = get_backend("torch")
            bound = signature.bind(*args, **kwargs)
            for arg, spec in specs.items():
                if arg not in bound.arguments:
                    continue
                if spec.dim is not None and spec.table not in created:
                    options = {k: v for k, v in (("initializer", spec.initializer),
                                                  ("optimizer", spec.optimizer),
                                                  ("seed", spec.seed)) if v is not None}
                    client.create_table(spec.table, spec.dim, **options)
                    created.add(spec.table)
                if sync_push:
                    tracker.wait(client, spec.table)
                value = bound.arguments[arg]
                on_push = functools.partial(tracker.add, spec.table)
                if spec.combiner is None:
                    bound.arguments[arg] = backend.embedding(
                        client, spec.table, value, padding_idx=spec.padding_idx, on_push=on_push)
                else:
                    ids, offsets = value if isinstance(value, tuple) else (value, None)
                    bound.arguments[arg] = backend.embedding_bag(
                        client, spec.table, ids, offsets, mode=spec.combiner,
                        padding_idx=spec.padding_idx, on_push=on_push)
            return fn(*bound.args, **bound.kwargs)

        wrapper.wait_pushes = lambda: tracker.wait(client)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def prefetch_batches(batches: Iterable[T], schedule: Callable[[T], Any]) -> Iterator[T]:
    """Yield ``batches`` unchanged, calling ``schedule(next_batch)`` before each yield.

    ``schedule`` starts the pulls of a batch, typically with
    :meth:`DistributedEmbedding.prefetch` of each embedding module::

        for batch in prefetch_batches(loader, lambda b: model.item_emb.prefetch(b["item"])):
            loss = model(batch); loss.backward(); ...

    The pull of batch t+1 then runs while batch t computes. ``layer.prefetch`` is
    exact by default (the rows batch t's push touched are re-pulled after it); pass
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


def _leaves(batch: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(batch, (list, tuple)):
        for i, value in enumerate(batch):
            yield from _leaves(value, (*path, i))
    else:
        yield path, batch


def _leaf(batch: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        batch = batch[key]
    return batch


def prefetch(model: nn.Module, batches: Iterable[T],
             ids_fn: Callable[[T], Iterable[tuple[Any, Any]]] | None = None, *,
             exact: bool = True) -> Iterator[T]:
    """Yield ``batches`` unchanged while the next batch's rows are pulled in background.

    A training loop wraps its batch iterator: ``for batch in prefetch(model, loader):``.
    Which batch entry feeds which distributed module is learned on the first batch:
    the ids each module receives are matched (by identity) with the batch's tensors
    (a dict, list or tuple of them, nested). A module fed something computed from the
    batch is not prefetched (it pulls as usual); ``ids_fn(batch)`` may instead return
    ``(module, ids)`` pairs explicitly.

    Exactness: rows for batch t+1 are pulled while batch t computes, usually before
    batch t's push. With ``exact=True`` (default) the rows batch t's push touched are
    re-pulled right after that push, in the background (only the ids both batches
    share; see :meth:`DistributedEmbedding.prefetch`), so training with prefetch
    equals training without it, which matches local training step for step. With
    ``exact=False`` nothing is re-pulled: a prefetched step is at most one step stale
    for the ids it shares with the previous batch (others are exact), for a little
    more speed.
    """
    mods = _modules()
    if ids_fn is not None:
        fn = ids_fn
        return prefetch_batches(
            batches, lambda b: [m.prefetch(ids, exact=exact) for m, ids in fn(b)])
    return _learned_prefetch(model, batches, mods, exact)


def _learned_prefetch(model: nn.Module, batches: Iterable[T], mods: Any,
                      exact: bool) -> Iterator[T]:
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        return
    seen: list[tuple[Any, Any]] = []
    modules = {id(m): m for _, m in mods.iter_distributed(model)}
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
               for m in modules.values()]
    try:
        yield first
    finally:
        for handle in handles:
            handle.remove()
    by_identity = {id(leaf): path for path, leaf in _leaves(first)}
    unique_routes = {(id(module), by_identity[id(ids)]): (module, by_identity[id(ids)])
                     for module, ids in seen if id(ids) in by_identity}
    routes = list(unique_routes.values())
    yield from prefetch_batches(
        iterator,
        lambda b: [module.prefetch(_leaf(b, path), exact=exact) for module, path in routes])


@hookimpl
def xdl_register_adapters(register: Any) -> None:
    """Register the ``torch_nn`` adapter (:func:`swap` / :func:`unswap`)."""
    register.add("torch_nn", swap, unswap)
