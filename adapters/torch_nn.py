"""PyTorch adapter: what ``xdl.swap`` needs to know about torch's embedding layers.

:class:`TorchEmbeddingAdapter` (registered through ``xdl_register_adapters``) lets the
core's walk (:func:`xdl.surgery.swap`) replace every ``nn.Embedding`` /
``nn.EmbeddingBag`` (also nested in ``ModuleDict``, ``ModuleList``, ``Sequential``, a
subclassed model or a ``torch.fx`` ``GraphModule``) by a :class:`DistributedEmbedding` /
:class:`DistributedEmbeddingBag` over table ``prefix + <module path>``, and
``xdl.unswap`` put ordinary modules back with the trained rows. Table naming, options,
creation, the upload of the layer's rows and the export are the core's; here is only
what is torch's: the layer types, their settings, their weights, the module tree, and
the optimizer param groups that held a replaced weight. ``prefetch`` learns which batch
entry feeds which distributed module (forward pre-hooks) and prefetches through
:func:`xdl.wrapper.prefetch_batches`. ``swap``, ``unswap``, ``torch_wrapper`` and
``Lookup`` are the core's, re-exported.

This module is a built-in plugin; it does not import torch until a function needs it
(the module classes live in :mod:`xdl.adapters.torch_modules` and are re-exported
lazily).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from xdl import init as xinit
from xdl import surgery
from xdl.hookspecs import hookimpl
from xdl.lookup import LookupPlan, RemoteTable, plan_many, prefetch_many, pull_now
from xdl.surgery import LayerAdapter, LayerSpec, LeftReference
from xdl.wrapper import Lookup, prefetch_batches, torch_wrapper

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
    "TorchEmbeddingAdapter",
    "prefetch",
    "prefetch_batches",
    "swap",
    "torch_wrapper",
    "unswap",
]

_LAZY = {"DistributedEmbedding", "DistributedEmbeddingBag", "ServerDenseOptimizer",
         "iter_distributed"}
T = TypeVar("T")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(_modules(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _modules() -> Any:
    from xdl.plugins import get_backend

    get_backend("torch")  # BackendNotAvailableError naming the extra, if torch is missing
    from . import torch_modules

    return torch_modules


class TorchEmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` / ``nn.EmbeddingBag`` ↔ ``DistributedEmbedding`` /
    ``DistributedEmbeddingBag``, anywhere in an ``nn.Module`` (``ModuleDict``,
    ``ModuleList``, ``Sequential``, subclassed models)."""

    name = "torch_nn"
    backend = "torch"
    #: ``nn.Embedding``'s own initializer (``reset_parameters``: ``normal_``)
    default_initializer = xinit.Normal(mean=0.0, stddev=1.0)

    def layer_types(self) -> tuple[type, ...]:
        """``nn.Embedding``, ``nn.EmbeddingBag``."""
        from torch import nn

        return (nn.Embedding, nn.EmbeddingBag)

    def distributed_types(self) -> tuple[type, ...]:
        """The distributed modules (subclasses of the layer types)."""
        return (_modules()._RemoteRows,)

    def named_layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        """``model.named_modules(remove_duplicate=False)``."""
        return list(model.named_modules(remove_duplicate=False))

    def layer_spec(self, layer: Any, path: str) -> LayerSpec:
        """Rows, dim, padding, combiner (bags); refuses ``max_norm``,
        ``scale_grad_by_freq`` and ``mode="max"``."""
        from torch import nn

        _modules().check_unsupported(layer, path)
        bag = isinstance(layer, nn.EmbeddingBag)
        return LayerSpec(
            num_rows=int(layer.num_embeddings), dim=int(layer.embedding_dim),
            padding_idx=layer.padding_idx, combiner=layer.mode if bag else None,
            settings={"bag": bag, "sparse": bool(layer.sparse), "training": layer.training,
                      "include_last_offset": bool(getattr(layer, "include_last_offset", False))})

    def layer_rows(self, layer: Any) -> np.ndarray:
        """``layer.weight`` as float32 numpy."""
        return np.ascontiguousarray(layer.weight.detach().cpu().numpy(), dtype=np.float32)

    def distribute(self, layer: Any, spec: LayerSpec, remote: RemoteTable) -> Any:
        """A ``DistributedEmbedding(Bag)`` over ``remote``."""
        mods = _modules()
        new: Any
        if spec.settings["bag"]:
            new = mods.DistributedEmbeddingBag(
                spec.num_rows, spec.dim, remote.client, remote.table, mode=spec.combiner,
                padding_idx=spec.padding_idx,
                include_last_offset=spec.settings["include_last_offset"],
                sparse=spec.settings["sparse"], remote=remote)
        else:
            new = mods.DistributedEmbedding(spec.num_rows, spec.dim, remote.client, remote.table,
                                            padding_idx=spec.padding_idx,
                                            sparse=spec.settings["sparse"], remote=remote)
        new.train(spec.settings["training"])
        return new

    def restore(self, layer: Any, rows: np.ndarray) -> Any:
        """``nn.Embedding`` / ``nn.EmbeddingBag`` holding ``rows``; ``nn.EmbeddingBag`` has
        no ``sqrtn``, so such a layer raises."""
        import torch
        from torch import nn

        from xdl.errors import XdlError

        mods = _modules()
        weight = torch.from_numpy(np.array(rows, dtype=np.float32))
        new: nn.Module
        if isinstance(layer, mods.DistributedEmbeddingBag):
            if layer.mode == "sqrtn":
                raise XdlError(f"cannot unswap table {layer.table!r}: nn.EmbeddingBag has no "
                               "mode 'sqrtn'")
            new = nn.EmbeddingBag(layer.num_embeddings, layer.embedding_dim, mode=layer.mode,
                                  sparse=layer.sparse,
                                  include_last_offset=layer.include_last_offset,
                                  padding_idx=layer.padding_idx, _weight=weight)
        else:
            new = nn.Embedding(layer.num_embeddings, layer.embedding_dim,
                               padding_idx=layer.padding_idx, sparse=layer.sparse,
                               _weight=weight)
        new.train(layer.training)
        return new

    def replace(self, model: Any, path: str, new: Any) -> None:
        """``setattr`` on the parent (``ModuleDict`` / ``ModuleList`` / ``Sequential``
        keep string keys)."""
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, new)

    def finish(self, model: Any) -> Any:
        """After ``swap``: batch each step's lookups into one pull (:class:`StepPull`, a
        forward pre-hook on ``model``); after ``unswap``: remove that hook."""
        StepPull.uninstall(model)
        if any(True for _ in _modules().iter_distributed(model)):
            StepPull.install(model)
        return model

    def rewire(self, model: Any, old: Any, new: Any, path: str
               ) -> list[str | LeftReference]:
        """Drop the replaced weight from every ``torch.optim`` optimizer's param groups (and
        state); name other lists or tuples that still hold it (a regularizer's list, such
        as DeepCTR-torch's ``regularization_weight``), by attribute path when the model
        holds them."""
        import torch

        weight = old.weight
        left: list[str | LeftReference] = []
        for holder in gc.get_referrers(weight):
            if not isinstance(holder, (list, tuple)):
                continue
            owner = _optimizer_of(holder, torch)
            if owner is not None and isinstance(holder, list):
                optimizer, group = owner
                holder[:] = [p for p in holder if p is not weight]
                optimizer.state.pop(weight, None)
                if not holder:
                    optimizer.param_groups.remove(group)
                continue
            what = f"a {type(holder).__name__} of {len(holder)} items"
            name = _attribute_path(model, holder)
            left.append(LeftReference(
                f"{name} ({what})" if name else what, path,
                "an embedding regularizer? its penalty now falls on weights nothing trains "
                "(they no longer require grad, so backward skips them); use the server "
                "optimizer's weight_decay instead (an L2 term l2 * sum(w**2) is "
                "weight_decay = 2 * l2)"))
        if left and self._orphaned(model, weight):
            # nothing trains it any more: a penalty on it (DeepCTR-torch's embedding L2
            # over whole tables) would cost a full-table gradient every step for nothing
            weight.requires_grad_(False)
        return left

    def _orphaned(self, model: Any, weight: Any) -> bool:
        """Whether only embedding layers (all swapped) hold ``weight`` in ``model``, no
        other module (a tied output layer)."""
        kinds = self.layer_types()
        return all(isinstance(module, kinds)
                   for module in model.modules()
                   if any(p is weight for p in module.parameters(recurse=False)))


def _attribute_path(model: Any, holder: Any) -> str | None:
    """``Model.attr[i][j]``: where ``model`` (or a submodule) keeps ``holder`` in an
    ordinary attribute, up to two list / tuple levels deep; None if nowhere."""
    root = type(model).__name__
    skip = {"_modules", "_parameters", "_buffers"}
    for mod_path, module in model.named_modules():
        prefix = f"{root}.{mod_path}" if mod_path else root
        for attr, value in vars(module).items():
            if attr in skip or attr.startswith("_forward") or attr.startswith("_backward"):
                continue
            if value is holder:
                return f"{prefix}.{attr}"
            if not isinstance(value, (list, tuple)):
                continue
            for i, item in enumerate(value):
                if item is holder:
                    return f"{prefix}.{attr}[{i}]"
                if isinstance(item, (list, tuple)):
                    for j, sub in enumerate(item):
                        if sub is holder:
                            return f"{prefix}.{attr}[{i}][{j}]"
    return None


def _optimizer_of(params: Any, torch: Any) -> tuple[Any, dict[str, Any]] | None:
    """The optimizer and param group whose ``params`` list is ``params``, if any."""
    for group in gc.get_referrers(params):
        if isinstance(group, dict) and group.get("params") is params:
            for owner in gc.get_referrers(group):
                if isinstance(owner, list):
                    for opt in gc.get_referrers(owner):
                        if isinstance(opt, torch.optim.Optimizer) and opt.param_groups is owner:
                            return opt, group
    return None


def swap(model: nn.Module, client: Any, **options: Any) -> nn.Module:
    """:func:`xdl.swap` (see :func:`xdl.surgery.swap`) for a PyTorch model."""
    return surgery.swap(model, client, **options)  # type: ignore[no-any-return]


def unswap(model: nn.Module, client: Any = None) -> nn.Module:
    """:func:`xdl.unswap` (see :func:`xdl.surgery.unswap`) for a PyTorch model."""
    return surgery.unswap(model, client)  # type: ignore[no-any-return]


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

    Exactness: with ``exact=True`` (default) batch t+1's rows are pulled right behind
    batch t's push, in the background, with one ``pull_many`` for every table (a shard
    applies the push first; see :func:`xdl.lookup.prefetch_many`), while batch t's
    optimizer step and the loop run; a single-table prefetch is pulled at once and
    the rows batch t's push touched are re-pulled after it (see
    :meth:`DistributedEmbedding.prefetch`). Either way training with prefetch equals
    training without it, which matches local training step for step. With
    ``exact=False`` rows are pulled at once and never again: a prefetched step is at
    most one step stale for the ids it shares with the previous batch (others are
    exact).
    """
    mods = _modules()
    if ids_fn is not None:
        fn = ids_fn
        return prefetch_batches(
            batches, lambda b: prefetch_many([(m.remote, ids) for m, ids in fn(b)], exact=exact))
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
        lambda b: prefetch_many([(module.remote, _leaf(b, path)) for module, path in routes],
                                exact=exact))


# ------------------------------------------------------------- one pull per step


def _tensor_leaves(args: Any, kwargs: Mapping[str, Any], torch: Any
                   ) -> list[tuple[tuple[Any, ...], Any]]:
    leaves = list(_leaves((tuple(args), dict(kwargs))))
    return [(path, leaf) for path, leaf in leaves if isinstance(leaf, torch.Tensor)]


def _route(ids: Any, leaves: list[tuple[tuple[Any, ...], Any]], torch: Any
           ) -> tuple[tuple[Any, ...], str, Any] | None:
    """How ``ids`` (what a distributed module received) derives from the model's input:
    ``(leaf path, "same" | "view" | "cols", detail)``, or None."""
    for path, leaf in leaves:
        if leaf is ids:
            return path, "same", None
    for path, leaf in leaves:  # a view of an input (a column slice, a reshape)
        try:
            same = (leaf.device == ids.device and leaf.dtype == ids.dtype and ids.numel() > 0
                    and leaf.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            same = False
        if same:
            return path, "view", (tuple(leaf.shape), tuple(ids.size()), tuple(ids.stride()),
                                  ids.storage_offset() - leaf.storage_offset())
    if ids.dim() not in (1, 2) or ids.numel() == 0 or ids.is_floating_point():
        return None
    width = 1 if ids.dim() == 1 else ids.shape[1]
    for path, leaf in leaves:  # columns of a 2-D input, cast (DeepCTR: X[:, a:b].long())
        if leaf.dim() != 2 or leaf.shape[0] != ids.shape[0] or leaf.shape[1] < width:
            continue
        as_long = leaf.detach().to(torch.int64)
        cols = ids.reshape(ids.shape[0], width).to(as_long.device)
        first = (as_long[:, :leaf.shape[1] - width + 1] == cols[:, :1]).all(0)
        for start in first.nonzero().flatten().tolist():
            if torch.equal(as_long[:, start:start + width], cols):
                return path, "cols", (start, width, ids.dim() == 1)
    return None


def _ids_of(leaf: Any, kind: str, detail: Any, torch: Any) -> Any:
    if kind == "same":
        return leaf
    if kind == "view":
        shape, size, stride, offset = detail
        if tuple(leaf.shape) != shape:  # a smaller last batch: the view is not known
            return None
        return leaf.as_strided(size, stride, leaf.storage_offset() + offset)
    start, width, flat = detail
    ids = leaf[:, start:start + width]
    ids = ids if not ids.is_floating_point() else ids.to(torch.int64)
    return ids.reshape(-1) if flat else ids


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("torch")


def _grads_to(remotes: list[RemoteTable], plans: list[LookupPlan]) -> Callable[..., None]:
    """``on_grads`` of one step's lookups: each lookup's row gradients to its table's
    gradient buffer, then one flush per client when the backward pass ends."""

    def on_grads(parts: list[tuple[int, np.ndarray]]) -> None:
        groups: dict[tuple[int, int], list[int]] = {}  # (buffer, client) → lookups
        for i, _ in parts:
            if plans[i].unique_ids.size:
                remote = remotes[i]
                groups.setdefault((id(remote.buffer), id(remote.client)), []).append(i)
        grads = dict(parts)
        backend = _backend()
        for where in groups.values():
            first = remotes[where[0]]
            first.buffer.add_many(
                first.client, [(remotes[i].table, plans[i].unique_ids, grads[i]) for i in where],
                on_push=[remotes[i].push_callback for i in where])
            backend.schedule_flush(functools.partial(first.buffer.flush, first.client))

    return on_grads


class StepPull:
    """One pull per step for a swapped model: every table the forward will look up is
    pulled at its start with one ``client.pull_many`` (one request per shard for every
    table; a table looked up several times pulled once), instead of one round trip per
    lookup.

    ``xdl.swap`` installs it on the model (a forward pre-hook); nothing in the model or
    its training loop changes. On the first forward it learns how each distributed
    module's ids derive from the model's inputs: the input itself, a view of it, or
    columns of a 2-D input cast to integers (DeepCTR-torch's ``X[:, a:b].long()``). From
    then on it takes those ids from each forward's inputs, checks and de-duplicates them
    all in one compiled pass (:func:`xdl.lookup.plan_many`) and pulls them at once, in
    the calling thread (:func:`xdl.lookup.pull_now`), sent right behind the previous
    step's pushes on the same sockets: a shard applies one client's requests in order,
    so the rows are exact without waiting for those pushes' acknowledgements. Every
    pulled lookup's output comes from **one** autograd node
    (``TorchBackend.differentiable_lookups``), whose backward hands the row gradients
    of all tables to the gradient buffer at once (one push per step). Each lookup whose
    ids equal a pulled set takes its output, unless a push of its table came since the
    pull (it then pulls again). A lookup whose ids it could not derive, or that turn out
    different, pulls as before; a prefetch no lookup consumed is dropped at the next
    forward. It stands aside while the user's own prefetch (:func:`prefetch`) feeds the
    tables.
    """

    _ATTR = "_xdl_step_pull"

    def __init__(self, model: Any) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.routes: list[tuple[Any, tuple[Any, ...], str, Any]] | None = None
        self._seen: list[tuple[Any, Any]] = []
        self._recorders: list[Any] = []
        self._planned: list[Any] = []
        self._depth = 0
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    @classmethod
    def install(cls, model: Any) -> StepPull:
        """Install on ``model`` (replacing an earlier one)."""
        cls.uninstall(model)
        step = cls(model)
        object.__setattr__(model, cls._ATTR, step)
        return step

    @classmethod
    def uninstall(cls, model: Any) -> None:
        """Remove it from ``model`` (no-op when absent)."""
        step = model.__dict__.pop(cls._ATTR, None)
        if step is not None:
            step.remove()

    @classmethod
    def of(cls, model: Any) -> StepPull | None:
        """The one installed on ``model``, if any."""
        return model.__dict__.get(cls._ATTR)  # type: ignore[no-any-return]

    def remove(self) -> None:
        """Remove the hooks and drop what was prefetched and not consumed."""
        for handle in self._handles + self._recorders:
            handle.remove()
        self._handles, self._recorders = [], []
        self._drop_unused()

    @property
    def routed(self) -> int:
        """Number of lookups per forward pulled together (after the first forward)."""
        return 0 if self.routes is None else len(self.routes)

    def _drop_unused(self) -> None:
        planned, self._planned = self._planned, []
        for module in planned:
            module.__dict__.get("_step_plans", []).clear()

    def _before(self, model: Any, args: Any, kwargs: Any) -> None:
        self._depth += 1
        if self._depth > 1:  # the model calling itself
            return
        self._drop_unused()
        if self.routes is None:
            self._learn_start()
            return
        if not self.routes:
            return
        torch = self._torch
        leaves = dict(_tensor_leaves(args, kwargs, torch))
        longs: dict[tuple[Any, ...], Any] = {}  # a float input cast to int64 once
        modules: list[Any] = []
        remotes: list[RemoteTable] = []
        tensors: list[Any] = []
        for module, path, kind, detail in self.routes:
            leaf = leaves.get(path)
            if leaf is None:
                continue
            remote = module.remote
            if remote.pending_prefetches:  # the user's prefetch feeds this table
                return
            if kind == "cols" and leaf.is_floating_point():
                cast = longs.get(path)
                if cast is None:
                    cast = longs[path] = leaf.detach().to(torch.int64)
                leaf = cast
            try:
                ids = _ids_of(leaf, kind, detail, torch)
            except (RuntimeError, IndexError):
                continue  # not this module's ids after all: it pulls in its own forward
            if ids is None or ids.is_floating_point() or ids.device.type != "cpu":
                continue
            modules.append(module)
            remotes.append(remote)
            tensors.append(ids)
        if not modules:
            return
        # checked and de-duplicated once, for the lookups too, in one compiled pass
        plans = plan_many(remotes, [t.detach().numpy() for t in tensors])
        kept = [i for i, plan in enumerate(plans) if plan is not None]
        if len(kept) < len(plans):  # bad ids: that lookup raises in its own forward
            modules, remotes, tensors = ([x[i] for i in kept] for x in (modules, remotes,
                                                                        tensors))
            plans = [plans[i] for i in kept]
        if not modules:
            return
        ok_plans: list[LookupPlan] = [p for p in plans if p is not None]
        pulled = pull_now([(r, p.unique_ids) for r, p in zip(remotes, ok_plans, strict=True)],
                          wait=False)
        outputs = _backend().differentiable_lookups(
            [rows for _, rows in pulled], ok_plans, _grads_to(remotes, ok_plans))
        for module, ids, plan, (mark, _), out in zip(modules, tensors, ok_plans, pulled,
                                                     outputs, strict=True):
            module.__dict__.setdefault("_step_plans", []).append((ids, plan, mark, out))
            self._planned.append(module)

    def _after(self, model: Any, args: Any, kwargs: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth or self.routes is not None:
            return
        for handle in self._recorders:
            handle.remove()
        self._recorders = []
        leaves = _tensor_leaves(args, kwargs, self._torch)
        routes = []
        for module, ids in self._seen:
            if isinstance(ids, self._torch.Tensor):
                found = _route(ids, leaves, self._torch)
                if found is not None:
                    routes.append((module, *found))
        self._seen = []
        self.routes = routes if len(routes) > 1 else []  # one lookup: nothing to batch

    def _learn_start(self) -> None:
        modules = {id(m): m for _, m in _modules().iter_distributed(self.model)}
        seen = self._seen = []

        def record(module: Any, args: Any) -> None:
            if args:
                seen.append((module, args[0]))

        self._recorders = [m.register_forward_pre_hook(record) for m in modules.values()]


@hookimpl
def xdl_register_adapters(register: Any) -> None:
    """Register :class:`TorchEmbeddingAdapter` (``torch_nn``)."""
    register.add(TorchEmbeddingAdapter())
