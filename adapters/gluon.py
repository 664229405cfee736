"""Gluon adapter: ``xdl.swap(net, client)`` replaces ``gluon.nn.Embedding`` blocks by
distributed ones, ``xdl.unswap(net)`` puts ordinary blocks back with the trained rows.

The walk, table naming, table creation and export are the core's (:mod:`xdl.surgery`);
this module says how to list a Gluon net's blocks with their paths, replace one, and
translate an ``Embedding`` to a table and back. The distributed block,
:class:`DistributedEmbedding`, is a ``gluon.nn.Embedding`` subclass (``isinstance``
checks keep passing) holding no weight: each forward looks up the batch's unique ids
through the core's :class:`~xdl.lookup.RemoteTable`.

How it meets Gluon (see docs/mxnet.md):

* **Imperative and hybridized.** Not hybridized, the lookup is NDArray code around the
  backend's autograd op. In a hybridized graph (which cannot call Python) it is the
  backend's custom operator, a host callback into the same table. Swap and unswap
  clear the cached graph of every block of the net, so the next call rebuilds it.
* **The user's Trainer.** The block exposes one Parameter, ``anchor``: float32 ``[1]``,
  zero, whose gradient is always zero, so every MXNet optimizer leaves it at zero (a
  hybridized graph runs an operator's backward only when one of its inputs needs a
  gradient). No row of the table is a Parameter, so the Trainer never updates rows.
  A Trainer created before the swap keeps the replaced weight in its list: swap sets
  that weight's ``grad_req`` to ``'null'``, which the Trainer skips.
* **Gradient scale.** ``Trainer.step(batch_size)`` scales gradients by
  ``rescale_grad = scale / batch_size`` before its update. Row gradients therefore wait
  in the block until the step is done and are pushed scaled by the same factor: the
  block hands them to the table's gradient buffer before the next forward of the net
  (a forward pre-hook), or on ``wait_pushes`` / ``close`` / ``unswap``, multiplied by
  the ``rescale_grad`` of the Trainer that holds the net's parameters (found through
  the anchor, the replaced weight or the net's other parameters), 1 when there is
  none. Set
  ``block.grad_scale`` to a number to fix the factor instead.
* **No wait in a hybridized net.** There the hook does not block Python until the
  backward is done: it queues the boundary in MXNet's engine order (:class:`EngineStep`)
  and the next step's first lookup operator hands over and pushes.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import numpy as np

from xdl import init as xinit
from xdl.errors import XdlError
from xdl.hookspecs import hookimpl
from xdl.lookup import LookupPlan, RemoteTable, pull_now
from xdl.sharding import add_rows
from xdl.surgery import LayerAdapter, LayerSpec

_block_class: Any = None
_MAX_READY = 8  # rows pulled for coming lookups kept unconsumed at most (oldest dropped)


def _mx() -> Any:
    from xdl.plugins import get_backend

    return get_backend("mxnet").framework_module()


def _backend() -> Any:
    from xdl.plugins import get_backend

    return get_backend("mxnet")


def place_numpy(rows: np.ndarray, plan: LookupPlan, dim: int) -> np.ndarray:
    """The lookup's output in numpy: ``rows`` (of ``plan.unique_ids``) placed at every id,
    zeros for padding ids, shape ``plan.shape + (dim,)``."""
    rows = np.asarray(rows, dtype=np.float32)
    if plan.has_padding:
        rows = np.concatenate([rows, np.zeros((1, dim), np.float32)])
    return rows[plan.inverse].reshape(*plan.shape, dim)


def unique_grads(grad: np.ndarray, plan: LookupPlan, dim: int) -> np.ndarray:
    """The gradient of the unique rows ``[U, dim]`` from the output's gradient (repeated
    ids summed, padding ids dropped), in one compiled pass."""
    num_unique = len(plan.unique_ids)
    out = np.zeros((num_unique + 1, dim), dtype=np.float32)
    add_rows(out, np.minimum(plan.inverse, num_unique), grad.reshape(-1, dim))
    return out[:num_unique]


class HeldGradients:
    """Row gradients of a step held until the Trainer has scaled the dense ones.

    ``add`` runs on MXNet's engine threads (backward callbacks); :meth:`hand_over`,
    once the step is done, gives them to the table's gradient buffer multiplied by
    ``scale()``.
    """

    def __init__(self, remote: RemoteTable) -> None:
        self.remote = remote
        self._lock = threading.Lock()
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, unique_ids: np.ndarray, grads: np.ndarray) -> None:
        """Hold one lookup's unique-row gradients."""
        if len(unique_ids):
            with self._lock:
                self._parts.append((unique_ids, grads))

    def hand_over(self, scale: float) -> None:
        """Give the held gradients, times ``scale``, to the table's gradient buffer."""
        with self._lock:
            parts, self._parts = self._parts, []
        for ids, grads in parts:
            self.remote.add_gradients(ids, grads if scale == 1.0 else grads * np.float32(scale))

    def __len__(self) -> int:
        with self._lock:
            return len(self._parts)


def _trainer_scale(params: Iterable[Any]) -> float | None:
    """``rescale_grad`` of the first Trainer holding one of ``params`` (None if none)."""
    for param in params:
        trainer = getattr(param, "_trainer", None)
        optimizer = getattr(trainer, "_optimizer", None)
        if optimizer is not None:
            return float(optimizer.rescale_grad)
    return None


def block_class() -> Any:
    """:class:`DistributedEmbedding`, built on first use (it subclasses a Gluon class)."""
    global _block_class
    if _block_class is None:
        mx = _mx()
        from mxnet import gluon

        class DistributedEmbedding(gluon.nn.Embedding):  # type: ignore[misc]
            """``gluon.nn.Embedding`` whose rows live in a parameter-server table.

            Same forward (ids of any shape, float or integer → ``ids.shape +
            (output_dim,)``), imperative or hybridized. Holds no ``weight``; its only
            Parameter is the zero ``anchor`` (see :mod:`xdl.adapters.gluon`).

            :ivar remote: the :class:`~xdl.lookup.RemoteTable`.
            :ivar grad_scale: None (follow the Trainer's ``rescale_grad``) or a number
                the pushed row gradients are multiplied by.
            """

            def __init__(self, remote: RemoteTable, spec: LayerSpec, prefix: str,
                         replaced: Any = None) -> None:
                gluon.HybridBlock.__init__(self, prefix=prefix)
                self._kwargs = {"input_dim": spec.num_rows, "output_dim": spec.dim,
                                "dtype": spec.settings.get("dtype", "float32"),
                                "sparse_grad": spec.settings.get("sparse_grad", False)}
                self._input_dim = spec.num_rows
                self._output_dim = spec.dim
                self.settings = dict(spec.settings)
                self.remote = remote
                self.grad_scale: float | None = None
                self.held = HeldGradients(remote)
                # the replaced weight (a tuple: Gluon registers a Parameter attribute): a
                # Trainer made before the swap is found through it
                self._replaced = (replaced,) if replaced is not None else ()
                self._net: Any = None  # weakref to the swapped net (a Trainer over its
                # dense parameters only is found through them)
                self.anchor = self.params.get("anchor", shape=(1,), dtype="float32",
                                              init=mx.init.Zero(), allow_deferred_init=False)
                self.anchor.initialize(ctx=mx.cpu())
                self._key = _backend().register_host(self)
                # rows of coming lookups, pulled by the first that needs them:
                # (ids, plan, the step's DeferredPull, position in it)
                self._ready: list[tuple[np.ndarray, LookupPlan, DeferredPull, int]] = []
                self._ready_lock = threading.Lock()
                self.register_forward_pre_hook(lambda block, args: block.before_step())

            @property
            def weight(self) -> Any:
                """No weight: the rows live on the parameter server."""
                raise AttributeError(
                    f"DistributedEmbedding for table {self.remote.table!r} holds no weight; "
                    "the rows live on the parameter server: use client.pull(table, ids), "
                    "or xdl.unswap(net) to get ordinary blocks with the trained rows")

            # -- the step boundary ----------------------------------------------------

            def scale(self) -> float:
                """The factor pushed row gradients are multiplied by."""
                if self.grad_scale is not None:
                    return float(self.grad_scale)
                own = _trainer_scale([self.anchor, *self._replaced])
                if own is not None:
                    return own
                net = self._net() if self._net is not None else None
                found = None if net is None else _trainer_scale(net.collect_params().values())
                return 1.0 if found is None else found

            def before_step(self) -> None:
                """Wait for the previous backward (MXNet runs it asynchronously) and
                settle the net's queued step boundaries (:class:`EngineStep`), then hand
                the row gradients still held, scaled, to the table's gradient buffer."""
                if self.anchor.grad_req != "null":
                    for grad in self.anchor.list_grad():
                        grad.wait_to_read()
                _backend().wait_backward()
                step = self._step()
                if step is not None:
                    step.settle(wait=True)
                if len(self.held):
                    self.held.hand_over(self.scale())

            def wait_pushes(self) -> None:
                """Push what this block holds and wait until its table's pushes are
                applied."""
                self.before_step()
                self.remote.wait_pushes()

            def close(self) -> None:
                """:meth:`wait_pushes`, then stop the table's prefetch thread."""
                self.before_step()
                self.remote.close()

            def prefetch(self, ids: Any, *, exact: bool = True) -> None:
                """Pull the rows of a coming batch's ``ids`` in the background
                (:meth:`xdl.lookup.RemoteTable.prefetch`).

                In a hybridized swapped net an exact prefetch is pulled right behind
                the push that precedes the net's next forward, in one ``pull_many``
                with the other tables', by the first lookup operator that runs (see
                :class:`EngineStep`): call it just before that forward and its rows
                need no re-pull.
                """
                ids = _backend().ids_to_numpy(ids)
                net = self._net() if self._net is not None else None
                step = self._step()
                if exact and step is not None and getattr(net, "_active", False):
                    step.defer(self, ids, self.remote.plan(ids))
                else:
                    self.remote.prefetch(ids, exact=exact)

            def _step(self) -> EngineStep | None:
                """The step boundary of the net this block was swapped in (if any)."""
                net = self._net() if self._net is not None else None
                return None if net is None else _hooks_step.get(net)

            def ready(self, ids: np.ndarray, plan: LookupPlan, source: DeferredPull,
                      pos: int) -> None:
                """Take the rows of a coming lookup of ``ids`` from ``source`` (its
                lookup ``pos``) when it runs."""
                with self._ready_lock:
                    self._ready.append((ids, plan, source, pos))
                    del self._ready[:-_MAX_READY]

            def _take_ready(self, ids: np.ndarray) -> tuple[LookupPlan, np.ndarray] | None:
                """The plan and exact rows kept for ``ids`` (see :meth:`ready`), or None."""
                with self._ready_lock:
                    found = next((i for i, entry in enumerate(self._ready)
                                  if entry[0].shape == ids.shape
                                  and np.array_equal(entry[0], ids)), None)
                    if found is None:
                        return None
                    _, plan, source, pos = self._ready.pop(found)
                mark, rows = source.rows(pos)
                return plan, self.remote.exact_rows(plan.unique_ids, mark, rows)

            # -- forward ---------------------------------------------------------------

            def hybrid_forward(self, F: Any, x: Any, anchor: Any) -> Any:  # noqa: N803
                """Rows of ids ``x``: NDArray code imperatively, the host-callback
                operator in a symbolic graph."""
                if F is mx.nd:
                    return _backend().lookup(self.remote, x, anchor=anchor,
                                             on_row_grads=self.held.add)
                return _backend().host_lookup(F, self._key, x, anchor)

            # numpy-level entry points of the custom operator (xdl_host_lookup)
            def host_forward(self, ids: np.ndarray) -> tuple[np.ndarray, LookupPlan]:
                """Output and plan of the lookup of ``ids`` (rows the engine pulled for
                them when there are, see :meth:`prefetch`)."""
                step = self._step()
                if step is not None:
                    step.settle()
                found = self._take_ready(ids)
                plan, rows = found if found is not None else self.remote.lookup(ids)
                return place_numpy(rows, plan, self._output_dim), plan

            def host_forward_rows(self, ids: np.ndarray
                                  ) -> tuple[np.ndarray, np.ndarray, LookupPlan]:
                """Distinct rows of the lookup of ``ids`` (a zero row appended for
                padding ids), the index of each id's row, and the plan: the operator
                gathers the output in MXNet."""
                step = self._step()
                if step is not None:  # the boundary queued before this step's forward
                    step.settle()
                found = self._take_ready(ids)
                plan, rows = found if found is not None else self.remote.lookup(ids)
                if plan.has_padding:
                    rows = np.concatenate([rows, np.zeros((1, self._output_dim), np.float32)])
                return rows, plan.inverse.reshape(plan.shape), plan

            def host_backward(self, plan: LookupPlan, grad: np.ndarray) -> None:
                """Hold the unique rows' gradient of the lookup that made ``plan``."""
                self.held.add(plan.unique_ids, unique_grads(grad, plan, self._output_dim))

            def host_output_shape(self, ids_shape: tuple[int, ...],
                                  extra_shapes: Any) -> tuple[int, ...]:
                """``ids_shape + (output_dim,)``."""
                return (*ids_shape, self._output_dim)

            def __repr__(self) -> str:
                return (f"{type(self).__name__}({self._input_dim} -> {self._output_dim}, "
                        f"table={self.remote.table!r}, id_mode={self.remote.id_mode!r})")

        DistributedEmbedding.__qualname__ = "DistributedEmbedding"
        _block_class = DistributedEmbedding
    return _block_class


def __getattr__(name: str) -> Any:
    if name == "DistributedEmbedding":
        return block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _children(block: Any) -> Iterator[tuple[str, Any]]:
    for name, child in block._children.items():
        yield name, child() if isinstance(child, weakref.ref) else child


def _walk(block: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, block
    for name, child in _children(block):
        yield from _walk(child, f"{path}.{name}" if path else name)


def _initializer_spec(init: Any) -> xinit.Initializer | None:
    """An ``mx.init`` initializer as an ``xdl.init`` spec (Uniform, Normal, Zero,
    Constant), else None."""
    mx = _mx()
    if isinstance(init, str):
        try:
            init = mx.init.create(init)
        except Exception:  # noqa: BLE001 - an unknown name is "not known" here
            return None
    if isinstance(init, mx.init.Uniform):
        return xinit.Uniform(-float(init.scale), float(init.scale))
    if isinstance(init, mx.init.Normal):
        return xinit.Normal(stddev=float(init.sigma))
    if isinstance(init, mx.init.Zero):
        return xinit.Zeros()
    if isinstance(init, mx.init.Constant) and isinstance(init.value, (int, float)):
        return xinit.Constant(float(init.value))
    return None


class GluonAdapter(LayerAdapter):
    """Swaps ``gluon.nn.Embedding`` blocks (``sparse_grad`` on or off, hybridized or not)."""

    name = "gluon"
    backend = "mxnet"
    #: Gluon's default initializer (``net.initialize()`` without one): ``Uniform(0.07)``
    default_initializer: ClassVar[xinit.Initializer] = xinit.Uniform(-0.07, 0.07)

    def layer_types(self) -> tuple[type, ...]:
        """``gluon.nn.Embedding``."""
        _mx()
        from mxnet import gluon

        return (gluon.nn.Embedding,)

    def distributed_types(self) -> tuple[type, ...]:
        """:class:`DistributedEmbedding`."""
        return (block_class(),)

    def named_layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        """Every block of the net with its dotted path (child names)."""
        return list(_walk(model))

    def layer_spec(self, layer: Any, path: str) -> LayerSpec:
        """``input_dim`` rows of ``output_dim``; dtype and ``sparse_grad`` kept."""
        kwargs = dict(getattr(layer, "_kwargs", {}))
        dtype = np.dtype(kwargs.get("dtype", "float32")).name
        if dtype != "float32":
            raise XdlError(f"cannot swap {path or 'the net'}: Embedding dtype {dtype} "
                           "(tables hold float32 rows)")
        weight = layer.weight
        return LayerSpec(
            num_rows=int(kwargs["input_dim"]), dim=int(kwargs["output_dim"]),
            initializer=_initializer_spec(weight.init),
            settings={"dtype": "float32", "sparse_grad": weight._grad_stype == "row_sparse",
                      "prefix": layer.prefix})

    def layer_rows(self, layer: Any) -> np.ndarray:
        """The weight's rows (initialised first, with its own initializer, when the net
        was not initialised yet)."""
        mx = _mx()
        weight = layer.weight
        if weight._data is None and weight._deferred_init == ():
            weight.initialize(ctx=mx.cpu())
        return np.asarray(weight.data().asnumpy(), dtype=np.float32)

    def distribute(self, layer: Any, spec: LayerSpec, remote: RemoteTable) -> Any:
        """A :class:`DistributedEmbedding` with the layer's prefix."""
        return block_class()(remote, spec, layer.prefix, replaced=layer.weight)

    def rewire(self, model: Any, old: Any, new: Any, path: str) -> list[str]:
        """A Trainer made before the swap holds the old weight: ``grad_req='null'``
        makes it skip that weight (nothing computes its gradient any more)."""
        old.weight.grad_req = "null"
        return []

    def restore(self, layer: Any, rows: np.ndarray) -> Any:
        """``gluon.nn.Embedding`` with the same prefix (so the same parameter names) and
        settings, holding ``rows``."""
        mx = _mx()
        from mxnet import gluon

        layer.before_step()
        layer.anchor.grad_req = "null"  # a Trainer that held it skips it from now on
        new = gluon.nn.Embedding(layer._input_dim, layer._output_dim, dtype="float32",
                                 sparse_grad=bool(layer.settings.get("sparse_grad")),
                                 prefix=layer.prefix)
        new.initialize(ctx=mx.cpu())
        new.weight.set_data(mx.nd.array(rows, dtype=np.float32))
        return new

    def remote_of(self, layer: Any) -> RemoteTable:
        """The layer's table, after its held gradients are handed over."""
        layer.before_step()
        return layer.remote  # type: ignore[no-any-return]

    def replace(self, model: Any, path: str, new: Any) -> None:
        """Put ``new`` at ``path``: the parent's child entry and, when the child is also
        an attribute of that name, the attribute (Gluon refuses a plain ``setattr``
        that changes a child's type)."""
        parent_path, _, leaf = path.rpartition(".")
        parent = dict(_walk(model))[parent_path]
        parent._children[leaf] = new
        if parent.__dict__.get(leaf) is not None:
            object.__setattr__(parent, leaf, new)

    def finish(self, model: Any) -> Any:
        """Clear every block's cached graph (rebuilt on the next call) and hook the
        net's forward: before it runs, the previous step's row gradients are handed
        over (see the module docstring)."""
        _mx()
        from mxnet import gluon

        distributed = [b for _, b in _walk(model) if isinstance(b, block_class())]
        for _, block in _walk(model):
            if isinstance(block, gluon.HybridBlock):
                block._clear_cached_op()
        _install_hook(model, distributed)
        return model


_hooks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_hooks_step: weakref.WeakKeyDictionary[Any, EngineStep] = weakref.WeakKeyDictionary()


def _flush(layers: list[Any]) -> None:
    """One push for all tables of a client (``push_many``), not one per table's pull."""
    for remote in {id(layer.remote.client): layer.remote for layer in layers}.values():
        remote.buffer.flush(remote.client)


class DeferredPull:
    """The rows of a step's deferred lookups ``(layer, ids, plan)``: pulled together,
    once, by the first of those lookups that runs, with one ``pull_many`` per client
    (:func:`xdl.lookup.pull_now`, sent right behind the pushes already sent: a shard
    applies a client's requests in order)."""

    def __init__(self, deferred: list[tuple[Any, np.ndarray, LookupPlan]]) -> None:
        self._lookups = [(layer.remote, plan.unique_ids) for layer, _, plan in deferred]
        self._lock = threading.Lock()
        self._rows: list[tuple[int | None, np.ndarray]] | None = None
        self.pulled = threading.Event()
        for pos, (layer, ids, plan) in enumerate(deferred):
            layer.ready(ids, plan, self, pos)

    def rows(self, pos: int) -> tuple[int | None, np.ndarray]:
        """``(push mark, rows)`` of lookup ``pos``, pulling them all the first time."""
        with self._lock:
            if self._rows is None:
                try:
                    self._rows = pull_now(self._lookups, wait=False)
                finally:
                    self.pulled.set()
            return self._rows[pos]


def pull_ready(deferred: list[tuple[Any, np.ndarray, LookupPlan]]) -> DeferredPull | None:
    """Hand the deferred lookups ``(layer, ids, plan)`` their rows, to be pulled together
    by the first of them that runs (:class:`DeferredPull`)."""
    return DeferredPull(deferred) if deferred else None


class _Boundary:
    """One queued step boundary: what to hand over, with which scales, what to pull."""

    __slots__ = ("deferred", "flag", "flag_nd", "layers", "pull", "scales", "settled")

    def __init__(self, layers: list[Any], scales: list[float],
                 deferred: list[tuple[Any, np.ndarray, LookupPlan]], flag: np.ndarray,
                 flag_nd: Any) -> None:
        self.layers = layers
        self.scales = scales
        self.deferred = deferred
        self.flag = flag
        self.flag_nd = flag_nd
        self.settled = threading.Event()
        self.pull: DeferredPull | None = None

    @property
    def reached(self) -> bool:
        """Whether the backward it waits for is done (the engine set the flag)."""
        return bool(self.flag[0] == 1.0)


class EngineStep:
    """A hybridized net's step boundary, kept in MXNet's engine order.

    Before each forward of the net, the previous step's row gradients must be handed
    over (scaled by the Trainer's ``rescale_grad``) and pushed before the lookups pull.
    A hybridized net's lookups are custom operators that MXNet runs on its own threads,
    so the wait for the backward need not block Python. :meth:`queue` (the net's
    forward pre-hook) records a boundary (the scales read now, the prefetches deferred
    so far) and issues a few MXNet operators (:func:`~xdl.backends.mxnet_backend.
    engine_flag`) that set the boundary's flag after every anchor gradient is written
    (after the backward) and then write the anchors, which the next step's lookup
    operators read: they run after the flag is set. The first of them settles the
    boundary (:meth:`settle`): hands over the held gradients with the boundary's
    scales, pushes them in one ``push_many``, and leaves the deferred prefetches to be
    pulled in one ``pull_many`` right behind that push (:class:`DeferredPull`). No
    Python runs on the engine's worker, and Python goes on dispatching the next step
    while the engine computes this one, as it does in local training.

    :ivar lead: boundaries whose backward is not done that may be queued; :meth:`queue`
        waits for older ones (this bounds how far Python runs ahead), and then, up to
        :attr:`pull_wait` seconds, for their deferred pull: Python's dispatch then
        overlaps the engine's dense compute rather than the pull, whose shards need
        the CPU.
    """

    lead = 2
    pull_wait = 0.02

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: deque[_Boundary] = deque()
        self._deferred: list[tuple[Any, np.ndarray, LookupPlan]] = []

    def defer(self, layer: Any, ids: np.ndarray, plan: LookupPlan) -> None:
        """Have the next boundary pull the rows of ``layer``'s coming lookup of ``ids``
        (``plan``: their plan), right after its push."""
        with self._lock:
            self._deferred.append((layer, ids, plan))

    def take_deferred(self) -> list[tuple[Any, np.ndarray, LookupPlan]]:
        """The deferred prefetches, forgotten here."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
        return deferred

    def queue(self, layers: list[Any]) -> None:
        """Queue the boundary before a forward of the net; waits while more than
        :attr:`lead` earlier boundaries wait for their backward."""
        deferred = self.take_deferred()
        scales = [layer.scale() for layer in layers]
        grads = [g for layer in layers if layer.anchor.grad_req != "null"
                 for g in layer.anchor.list_grad()]
        anchors = [a for layer in layers for a in layer.anchor.list_data()]
        flag, flag_nd = _backend().engine_flag(grads, anchors)
        with self._lock:
            self._pending.append(_Boundary(layers, scales, deferred, flag, flag_nd))
            waiting = [b for b in self._pending if not b.reached]
        for boundary in waiting[:max(0, len(waiting) - self.lead)]:
            boundary.flag_nd.wait_to_read()  # raises what a failed operator raised
            if self.pull_wait > 0 and boundary.deferred:
                # settled by the next lookup operator, which then pulls
                if boundary.settled.wait(self.pull_wait) and boundary.pull is not None:
                    boundary.pull.pulled.wait(self.pull_wait)

    def settle(self, wait: bool = False) -> None:
        """Hand over and push for the queued boundaries whose backward is done, oldest
        first (a lookup operator calls it); ``wait``: for all of them, waiting."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                boundary = self._pending[0]
                if boundary.reached:
                    self._pending.popleft()
                    for layer, scale in zip(boundary.layers, boundary.scales, strict=True):
                        layer.held.hand_over(scale)
                    _flush(boundary.layers)
                    boundary.pull = pull_ready(boundary.deferred)
                    boundary.settled.set()
                    continue
            if not wait:
                return
            boundary.flag_nd.wait_to_read()  # not holding the lock: lookups settle too


def _install_hook(model: Any, distributed: list[Any]) -> None:
    handle = _hooks.pop(model, None)
    _hooks_step.pop(model, None)
    if handle is not None:
        handle.detach()
    if not distributed or isinstance(model, block_class()):
        return
    blocks = weakref.WeakSet(distributed)
    for layer in distributed:
        object.__setattr__(layer, "_net", weakref.ref(model))
    step = EngineStep()
    _hooks_step[model] = step

    def before_forward(block: Any, args: Any) -> None:
        layers = list(blocks)
        if getattr(block, "_active", False):  # the cached graph runs the lookups
            step.queue(layers)
            return
        for layer in layers:
            layer.before_step()  # settles the queued boundaries first
        _flush(layers)
        pull_ready(step.take_deferred())

    _hooks[model] = model.register_forward_pre_hook(before_forward)


def iter_distributed(net: Any) -> Iterator[tuple[str, Any]]:
    """``(path, block)`` of every :class:`DistributedEmbedding` of ``net``."""
    cls = block_class()
    seen: set[int] = set()
    for path, block in _walk(net):
        if isinstance(block, cls) and id(block) not in seen:
            seen.add(id(block))
            yield path, block


@hookimpl
def xdl_register_adapters(register: Any) -> None:
    """Register :class:`GluonAdapter` (``gluon``)."""
    register.add(GluonAdapter())
