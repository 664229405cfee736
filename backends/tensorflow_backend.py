"""The TensorFlow backend: tensor primitives and the differentiable lookup, eager and in
``tf.function`` (graph mode through host callbacks).

TensorFlow is imported on first use, never when this plugin is imported (the plugin
manager imports every built-in plugin).

Ids may be symbolic (inside ``tf.function``, Keras ``fit``), so :meth:`lookup` and
:meth:`lookup_bags` run their numpy part in host callbacks (``tf.numpy_function``), one
code path in eager and in graph mode. The forward callback asks the core's
:class:`xdl.lookup.RemoteTable` for the rows of the batch's unique ids and the inverse
index (for bags also the bag of each id and the combiner's weights); TensorFlow gathers
and combines them, so its own autograd sums the gradients of repeated ids. In a traced
graph a :meth:`lookup` is two callbacks, one that plans its ids and one that returns its
rows, so that a step's lookups are pulled together, with one ``client.pull_many``
(:class:`_GraphLookups`). The callbacks and the methods that define them are never
converted by AutoGraph (:func:`_unconverted`). A
``tf.custom_gradient`` around the rows hands their gradient to a second callback, which
gives it to the table's gradient buffer (:meth:`xdl.lookup.RemoteTable.add_gradients`;
one push per table per step, before the table's next pull: TensorFlow has no
end-of-backward hook).

TensorFlow's tape only differentiates towards the sources it is asked for, so the rows
hang off an *anchor*: a one-element trainable variable (of a Keras layer, of a table
handle, or the backend's own) whose gradient is always zero, so the user's optimizer
leaves it at zero. The anchor's gradient is the output of the callback that hands the
rows' gradient over, so that callback runs before the optimizer's update.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from xdl.backend import Backend, OnGrad
from xdl.errors import InvalidArgumentError
from xdl.hookspecs import hookimpl
from xdl.step import StepPipeline, push_mark, step_rows

if TYPE_CHECKING:
    from xdl.lookup import RemoteTable


_tf_module: Any = None


def _tf() -> Any:
    # cached: called inside traced functions, where AutoGraph would otherwise try to
    # convert the import machinery
    global _tf_module
    if _tf_module is None:
        _tf_module = TensorFlowBackend.framework_module()
    return _tf_module


def _unconverted(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run as plain Python even when called from code that AutoGraph converts
    (a ``tf.function`` step, a tf-keras layer's ``call``): otherwise the host callbacks
    it defines would be converted too, and each of their Python calls would go through
    AutoGraph's ``converted_call`` at every step (measured: most of a callback's time).
    TensorFlow is imported on the first call, not here."""

    plain: Callable[..., Any] | None = None

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal plain
        if plain is None:
            plain = _tf().autograph.experimental.do_not_convert(method)
        return plain(*args, **kwargs)

    # no functools.wraps: AutoGraph must not find ``method`` through ``__wrapped__``
    run.__name__ = method.__name__
    run.__qualname__ = method.__qualname__
    run.__doc__ = method.__doc__
    return run


#: the anchor's gradient, returned by the gradient callbacks
_ZERO = np.zeros(1, dtype=np.float32)


def _float_rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _hang_off(anchor: Any, rows: Any, give: Any) -> Any:
    """``rows`` as a function of ``anchor``: the gradient of the result goes to
    ``give(grad)`` (a host callback op builder), whose output (a zero) is the gradient
    of ``anchor``. The anchor's gradient is the callback's own output, not a constant
    with a control dependency, so that no graph optimisation can separate the two."""
    tf = _tf()

    @tf.custom_gradient
    def rows_of(a: Any) -> Any:
        def grad(dy: Any) -> Any:
            return tf.reshape(give(tf.convert_to_tensor(dy)), tf.shape(a))

        return tf.identity(rows), grad

    return rows_of(anchor)


def _id_tensor(ids: Any) -> Any:
    tf = _tf()
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise InvalidArgumentError(
            f"ids must be integers, got dtype {ids.dtype.name}; cast them to int64")
    return ids


def _plans(remotes: Sequence[RemoteTable], layout: Sequence[Any], ids: Sequence[Any],
           offsets: Sequence[Any]) -> list[Any]:
    """The checked, de-duplicated plan of each lookup of a step (bag plans for specs
    with a combiner)."""
    plans: list[Any] = []
    for remote, (_, _, spec), raw, offs in zip(remotes, layout, ids, offsets, strict=True):
        if spec.combiner is not None:
            plans.append(remote.plan_bags(np.asarray(raw), offs, combiner=spec.combiner))
        else:
            plans.append(remote.plan(np.asarray(raw)))
    return plans


def _unique_of(plan: Any) -> np.ndarray:
    lookup = getattr(plan, "lookup", plan)  # a BagPlan holds its LookupPlan
    return lookup.unique_ids  # type: ignore[no-any-return]


def _bag_values(rows: Any, inverse: Any, bag: Any, coef: Any, num_bags: Any) -> Any:
    """Unweighted bags: ``segment_sum(rows[inverse] * coef, bag)``."""
    tf = _tf()
    values = tf.gather(rows, inverse) * coef[:, None]
    return tf.math.unsorted_segment_sum(values, bag, num_bags)


def _with_padding(rows: np.ndarray, has_padding: Any) -> np.ndarray:
    """``rows`` with the padding id's zero row appended when the lookup has one."""
    if not has_padding:
        return rows
    return np.concatenate([rows, np.zeros((1, rows.shape[1]), np.float32)])


def _ancestors(op: Any) -> set[Any]:
    """Every op ``op`` depends on in its graph (through inputs and control inputs)."""
    seen: set[Any] = set()
    todo = [op]
    while todo:
        node = todo.pop()
        for parent in [t.op for t in node.inputs] + list(node.control_inputs):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


class _GraphLookups:
    """The :meth:`TensorFlowBackend.lookup` calls of one traced graph (a ``tf.function``;
    Keras' train / test / predict function), pulled together: one ``client.pull_many``
    per step instead of one pull per lookup.

    Each lookup is two host callbacks: ``xdl_plan`` checks and de-duplicates its ids
    (no network) and registers the unique ids here; ``xdl_pull_rows`` returns its rows.
    While tracing, every ``xdl_pull_rows`` of the graph gets a control input from each
    later lookup's ``xdl_plan`` (unless that would make a cycle: the later ids depend on
    the earlier rows, or on a stateful op made after them), so the first pull that runs
    finds the unique ids of the step's other lookups planned and pulls them all with one
    :func:`xdl.lookup.pull_now`; the others take their rows, made exact by
    :meth:`xdl.lookup.RemoteTable.exact_rows` (rows a push touched since are pulled
    again: none, in a plain step). A lookup whose ids were not planned in time, or
    whose table has a prefetch pending, pulls on its own, as before.
    """

    _ATTR = "_xdl_graph_lookups"
    #: every graph's lookups (weakly): :func:`gradients_owed` asks them
    _all: weakref.WeakSet[_GraphLookups] = weakref.WeakSet()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pulls: list[Any] = []  # the graph's xdl_pull_rows ops (while tracing)
        self._remotes: list[RemoteTable] = []  # the table of each lookup (slot)
        self._graded: set[int] = set()  # slots whose gradient callback was traced
        self._owed: set[int] = set()  # slots pulled whose gradient has not come yet
        self._planned: dict[int, tuple[RemoteTable, np.ndarray]] = {}
        self._pulled: dict[int, tuple[np.ndarray, int | None, np.ndarray]] = {}
        _GraphLookups._all.add(self)

    @classmethod
    def of(cls, graph: Any) -> _GraphLookups:
        """The lookups of ``graph`` (kept on the graph: they go with it)."""
        got = getattr(graph, cls._ATTR, None)
        if got is None:
            got = cls()
            setattr(graph, cls._ATTR, got)
        return got  # type: ignore[no-any-return]

    def graded(self, slot: int) -> None:
        """While tracing: lookup ``slot``'s rows get a gradient callback in this graph."""
        with self._lock:
            self._graded.add(slot)

    def given(self, slot: int) -> None:
        """Lookup ``slot``'s row gradients were handed to the gradient buffer."""
        with self._lock:
            self._owed.discard(slot)

    def owes(self, client: Any) -> bool:
        """Whether a lookup on ``client`` pulled in the running step still owes its row
        gradients (so the step's gradients are not complete yet)."""
        with self._lock:
            return any(self._remotes[s].client is client for s in self._owed)

    def add(self, remote: RemoteTable, ids: Any) -> tuple[Any, Any, Any, int]:
        """The ops of one lookup of ``ids``: ``(rows with the padding row, inverse,
        unique ids)`` tensors and the lookup's slot."""
        tf = _tf()
        with self._lock:  # replicas of a distribution strategy may trace at once
            slot = len(self._remotes)
            self._remotes.append(remote)

        def plan(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            p = remote.plan(raw)
            with self._lock:
                self._planned[slot] = (remote, p.unique_ids)
                self._pulled.pop(slot, None)
            return p.inverse, p.unique_ids, np.asarray(p.has_padding, np.int64)

        def pull(unique: np.ndarray, padding: np.ndarray) -> np.ndarray:
            return _with_padding(_float_rows(self._rows(slot, remote, unique)),
                                 bool(padding))

        inverse, unique, padding = tf.numpy_function(
            plan, [ids], [tf.int64, tf.int64, tf.int64], stateful=False, name="xdl_plan")
        rows = tf.numpy_function(pull, [unique, padding], tf.float32, stateful=True,
                                 name="xdl_pull_rows")
        planned = inverse.op
        above = _ancestors(planned)
        # a stateful op the ids depend on, made after a pull, runs after it (automatic
        # control dependencies keep program order): that pull cannot wait for this plan
        latest = max((a._id for a in above if _stateful(a)), default=-1)
        with self._lock:
            earlier = list(self._pulls)
            self._pulls.append(rows.op)
        for op in earlier:
            if op._id > latest and op not in above and op.graph is planned.graph:
                op._add_control_input(planned)
        return rows, inverse, unique, slot

    def _rows(self, slot: int, remote: RemoteTable, unique: np.ndarray) -> np.ndarray:
        """Rows of ``unique`` for lookup ``slot``: pulled by an earlier lookup of the
        step (made exact), else pulled now with every lookup planned and not pulled."""
        with self._lock:
            if slot in self._graded:
                self._owed.add(slot)
            got = self._pulled.pop(slot, None)
            self._planned.pop(slot, None)
            others: list[tuple[int, RemoteTable, np.ndarray]] = []
            if got is None:
                others = [(s, r, u) for s, (r, u) in self._planned.items()
                          if not r.pending_prefetches]
                for s, _, _ in others:
                    del self._planned[s]
        if got is not None:
            was, mark, rows = got
            if np.array_equal(was, unique):
                return remote.exact_rows(unique, mark, rows)
        if remote.pending_prefetches:  # DistributedEmbedding.prefetch
            return remote.rows(unique)
        results = _pull_step([(remote, unique), *[(r, u) for _, r, u in others]])
        with self._lock:
            for (s, _, u), (mark, rows) in zip(others, results[1:], strict=True):
                self._pulled[s] = (u, mark, rows)
        return results[0][1]


def gradients_owed(client: Any) -> bool:
    """Whether a lookup on ``client`` in a running graph step has not handed over its row
    gradients yet (:class:`_GraphLookups`): a push of the step's gradients now would
    leave that lookup's for a second push. The Keras adapter's push after the optimizer's
    update waits for the last one then (or, should none come, the next pull flushes)."""
    return any(lookups.owes(client) for lookups in list(_GraphLookups._all))


def _pull_step(lookups: list[tuple[RemoteTable, np.ndarray]]
               ) -> list[tuple[int | None, np.ndarray]]:
    """``(push mark, rows)`` of each lookup's unique ids, pulled with one
    ``client.pull_many`` per client (:func:`xdl.step.step_rows`; a pending prefetch is
    taken instead). Buffered gradients are pushed first; the pull is sent without
    waiting for the pushes' acknowledgements (a shard applies a client's requests in
    order, so it sees them), and those of ``sync_push`` tables are awaited after it:
    one round trip instead of two."""
    remotes = [r for r, _ in lookups]
    flushed: set[tuple[int, int]] = set()
    for remote in remotes:
        key = (id(remote.buffer), id(remote.client))
        if key not in flushed:
            flushed.add(key)
            remote.buffer.flush(remote.client)
    marks = [push_mark(r) for r in remotes]
    rows = step_rows(remotes, [u for _, u in lookups], wait=False)
    waited: set[tuple[int, str]] = set()
    for remote in remotes:
        if remote.sync_push and (id(remote.client), remote.table) not in waited:
            waited.add((id(remote.client), remote.table))
            remote.buffer.wait(remote.client, remote.table)
    return list(zip(marks, rows, strict=True))


def _stateful(op: Any) -> bool:
    try:
        return bool(op._is_stateful)
    except AttributeError:  # pragma: no cover (every Operation has it)
        return True


class TensorFlowBackend(Backend):
    """Backend for TensorFlow tensors, ``tf.Module`` objects and Keras models."""

    name = "tensorflow"
    framework = "tensorflow"
    extra = "tensorflow"
    host_callbacks = True

    def __init__(self) -> None:
        self._anchor: Any = None
        self._lock = threading.Lock()

    # --- primitives ---------------------------------------------------------------------

    def is_tensor(self, obj: Any) -> bool:
        """Whether ``obj`` is a TensorFlow tensor or variable (TF not imported → False)."""
        tf = sys.modules.get("tensorflow")
        return tf is not None and (tf.is_tensor(obj) or isinstance(obj, tf.Variable))

    def to_numpy(self, t: Any) -> np.ndarray:
        """An eager tensor as numpy (no copy for a CPU tensor)."""
        return np.asarray(t.numpy() if hasattr(t, "numpy") else t)

    def from_numpy(self, a: np.ndarray) -> Any:
        """An eager tensor of ``a``."""
        return _tf().convert_to_tensor(np.asarray(a))

    def anchor(self) -> Any:
        """The backend's own anchor: a trainable ``tf.Variable([0.])`` that lookups
        without one of their own hang off (see the module docstring). A tape reaches
        their rows' gradient only when this variable is among its sources."""
        with self._lock:
            if self._anchor is None:
                tf = _tf()
                with tf.init_scope():
                    self._anchor = tf.Variable([0.0], trainable=True, name="xdl_anchor")
            return self._anchor

    def wrapper(self, client: Any, tables: Any = None, *, sync_push: bool = True,
                optimizer: Any = None, server_optimizer: Any = None, sync_workers: int = 0,
                graph: bool = True, dense_prefix: str | None = None) -> Any:
        """``xdl.tf_wrapper``: XDL's script shape, each call of the decorated function one
        training step (see :class:`TrainStep`).

        :param optimizer: a Keras optimizer (anything with ``apply_gradients``) for the
            function's dense variables.
        :param server_optimizer: instead, an ``xdl.optim`` spec: the dense variables live
            on the shards, shared by the workers.
        :param sync_workers: with ``server_optimizer``: 0 applies each worker's gradient
            as it comes (async); N averages N workers' gradients per step (sync).
        :param graph: run each step as a ``tf.function`` (ids symbolic, lookups through
            host callbacks); False runs eagerly.
        :param dense_prefix: prefix of the dense variables' names on the server (default:
            the function's name and a dot).
        """
        from xdl.wrapper import Lookup, Wrapper

        specs = {arg: Lookup(t) if isinstance(t, str) else t for arg, t in (tables or {}).items()}
        state = Wrapper(client, self.name, sync_push)

        def decorate(fn: Callable[..., Any]) -> TrainStep:
            return TrainStep(fn, self, state, specs, optimizer=optimizer,
                             server_optimizer=server_optimizer, sync_workers=sync_workers,
                             graph=graph, dense_prefix=dense_prefix)

        return decorate

    @_unconverted
    def differentiable_rows(self, rows: np.ndarray, on_grad: OnGrad, *,
                            anchor: Any = None) -> Any:
        """A tensor of ``rows`` whose gradient is handed to ``on_grad`` (as numpy), hung
        off ``anchor`` (default: :meth:`anchor`)."""
        tf = _tf()

        def give(dy: Any) -> Any:
            return tf.numpy_function(lambda g: (on_grad(_float_rows(g)), _ZERO)[1],
                                     [dy], tf.float32, stateful=True, name="xdl_row_grads")

        rows_t = tf.convert_to_tensor(_float_rows(rows))
        return _hang_off(self.anchor() if anchor is None else anchor, rows_t, give)

    def gather(self, t: Any, index: Any) -> Any:
        """``tf.gather(t, index)``."""
        return _tf().gather(t, index)

    def append_zero_row(self, t: Any) -> Any:
        """``t`` with a zero row appended."""
        tf = _tf()
        return tf.concat([t, tf.zeros_like(t[:1])], 0)

    def scale_rows(self, t: Any, weights: Any) -> Any:
        """``t * weights[:, None]``."""
        tf = _tf()
        return t * tf.cast(weights, t.dtype)[:, None]

    def segment_sum(self, t: Any, segments: Any, num_segments: Any) -> Any:
        """``tf.math.unsorted_segment_sum`` (differentiable)."""
        return _tf().math.unsorted_segment_sum(t, segments, num_segments)

    def reshape(self, t: Any, shape: Sequence[int]) -> Any:
        """``tf.reshape(t, shape)``."""
        return _tf().reshape(t, list(shape))

    def gradients_owed(self, client: Any) -> bool:
        """Whether a graph step's lookup on ``client`` has not handed over its row
        gradients yet (see :func:`gradients_owed`)."""
        return gradients_owed(client)

    def expand(self, tensor: Any, indicator: Any) -> Any:
        """Group rows to samples: row ``indicator[i]`` of ``tensor`` for sample ``i``
        (``tf.gather``; eager or symbolic ``indicator``)."""
        tf = _tf()
        return tf.gather(tensor, tf.reshape(tf.cast(indicator, tf.int64), [-1]))

    # --- graph-safe lookups (host callbacks) --------------------------------------------

    def _rows_of(self, remote: RemoteTable, rows: Any, unique: Any, anchor: Any,
                 step: tuple[_GraphLookups, int] | None = None) -> Any:
        tf = _tf()

        def add(ids: np.ndarray, grad: np.ndarray) -> np.ndarray:
            # a padding row, when there is one, is the last row: no id, no gradient
            remote.add_gradients(ids, _float_rows(grad[:ids.size]))
            if step is not None:
                step[0].given(step[1])
            return _ZERO

        def give(dy: Any) -> Any:
            if step is not None:
                step[0].graded(step[1])
            return tf.numpy_function(add, [unique, dy], tf.float32, stateful=True,
                                     name="xdl_row_grads")

        rows.set_shape([None, remote.dim])
        return _hang_off(self.anchor() if anchor is None else anchor, rows, give)

    @_unconverted
    def lookup(self, remote: RemoteTable, ids: Any, *, anchor: Any = None) -> Any:
        """Differentiable lookup of ``ids`` (any shape, int32/int64, eager or symbolic)
        → float32 ``ids.shape + (dim,)``; padding ids give zeros and no gradient.

        :param anchor: the trainable variable the rows' gradient path hangs off
            (default: :meth:`anchor`).
        """
        tf = _tf()
        ids = _id_tensor(ids)
        dim = remote.dim

        if tf.executing_eagerly():
            def forward(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
                plan, rows = remote.lookup(np.asarray(raw))
                return _with_padding(_float_rows(rows), plan.has_padding), plan.inverse, \
                    plan.unique_ids

            rows, inverse, unique = tf.numpy_function(
                forward, [ids], [tf.float32, tf.int64, tf.int64], stateful=True,
                name="xdl_pull_rows")
            step = None
        else:
            lookups = _GraphLookups.of(ids.graph)
            rows, inverse, unique, slot = lookups.add(remote, ids)
            step = (lookups, slot)
        rows = self._rows_of(remote, rows, unique, anchor, step)
        out = tf.reshape(tf.gather(rows, inverse),
                         tf.concat([tf.shape(ids, tf.int64), [dim]], 0))
        out.set_shape(ids.shape.concatenate([dim]))
        return out

    @_unconverted
    def lookup_bags(self, remote: RemoteTable, ids: Any, offsets: Any = None, *,
                    combiner: str = "sum", per_sample_weights: Any = None,
                    include_last_offset: bool = False, anchor: Any = None) -> Any:
        """Differentiable bag lookup → ``[bags, dim]``, combined by ``sum`` / ``mean`` /
        ``sqrtn``; padding ids are left out, an empty bag is zeros. Eager or symbolic.

        :param ids: 2-D padded ids ``[bags, width]`` (each row one bag), or 1-D ids with
            ``offsets`` (start of each bag; with ``include_last_offset`` the last one
            is ``len(ids)``, as a ``tf.RaggedTensor``'s ``row_splits``).
        :param per_sample_weights: optional weight per id (same layout as ``ids``); the
            combiner then divides by the sum of a bag's weights (``mean``) or by the
            root of the sum of their squares (``sqrtn``), as
            ``tf.nn.embedding_lookup_sparse`` does.
        :param anchor: see :meth:`lookup`.
        """
        tf = _tf()
        ids = _id_tensor(ids)
        has_offsets = offsets is not None
        offs = tf.cast(offsets, tf.int64) if has_offsets else tf.zeros([0], tf.int64)
        weighted = per_sample_weights is not None

        def forward(raw: np.ndarray, off: np.ndarray) -> tuple[Any, ...]:
            plan, rows = remote.lookup_bags(
                np.asarray(raw), off if has_offsets else None,
                combiner="sum" if weighted else combiner,
                include_last_offset=include_last_offset)
            coef = plan.coef if plan.coef is not None else np.ones(len(plan.kept), np.float32)
            return (_float_rows(rows), plan.lookup.inverse, plan.lookup.unique_ids,
                    plan.kept, plan.bag, coef, np.int64(plan.num_bags))

        rows, inverse, unique, kept, bag, coef, num_bags = tf.numpy_function(
            forward, [ids, offs],
            [tf.float32, tf.int64, tf.int64, tf.int64, tf.int64, tf.float32, tf.int64],
            stateful=True, name="xdl_pull_bags")
        rows = self._rows_of(remote, rows, unique, anchor)
        values = tf.gather(rows, inverse)
        if not weighted:
            values = values * coef[:, None]
        else:
            w = tf.gather(tf.reshape(tf.cast(per_sample_weights, tf.float32), [-1]), kept)
            values = values * w[:, None]
            if combiner != "sum":
                total = tf.math.unsorted_segment_sum(w if combiner == "mean" else w * w,
                                                     bag, num_bags)
                if combiner == "sqrtn":
                    total = tf.sqrt(total)
                total = tf.where(total > 0, total, tf.ones_like(total))
                values = values / tf.gather(total, bag)[:, None]
        out = tf.math.unsorted_segment_sum(values, bag, num_bags)
        out.set_shape([None if has_offsets else ids.shape[0], remote.dim])
        return out


class TrainStep:
    """A function decorated with ``@xdl.tf_wrapper(client, ...)``: each call is one
    training step (XDL's script shape).

    The function is ordinary TensorFlow code that returns its loss first (then any
    outputs). Its sparse arguments are :func:`xdl.embedding` descriptions (or ids of the
    arguments named in ``tables``); a call looks them all up in one host callback (rows
    of the unique ids of every table pulled with one ``client.pull_many``, or
    prefetched), runs the function under a ``tf.GradientTape``, takes the gradients of
    the loss for the rows and for the dense variables the function read, hands the
    rows' gradients to one push for every table (``client.push_many``, sent by a
    background thread as soon as they are computed: :class:`StepPipeline`) and applies
    the dense ones: with the Keras ``optimizer``, or on the shards
    (``server_optimizer``, async or sync across workers). Returns what the function
    returned.

    :meth:`predict` runs the function forward only. ``wait_pushes()`` / ``close()``
    flush and wait for the pushes (``close`` also stops the background thread); ``xdl`` is
    the core's :class:`xdl.wrapper.Wrapper` (client, tables).
    """

    def __init__(self, fn: Callable[..., Any], backend: TensorFlowBackend, state: Any,
                 specs: dict[str, Any], *, optimizer: Any, server_optimizer: Any,
                 sync_workers: int, graph: bool, dense_prefix: str | None) -> None:
        if optimizer is not None and server_optimizer is not None:
            raise InvalidArgumentError(
                "tf_wrapper: give either optimizer= (a Keras optimizer, local dense "
                "variables) or server_optimizer= (dense variables on the shards), not both")
        self.fn = fn
        self.backend = backend
        self.xdl = state
        self.specs = specs
        self.optimizer = optimizer
        self.server_optimizer = server_optimizer
        self.sync_workers = int(sync_workers)
        self.graph = graph
        self.dense_prefix = (f"{fn.__name__}." if dense_prefix is None else dense_prefix)
        self.signature = inspect.signature(fn)
        missing = [arg for arg in specs if arg not in self.signature.parameters]
        if missing:
            raise InvalidArgumentError(
                f"tf_wrapper: {fn.__qualname__} has no argument(s) {missing}")
        #: the trainable variables the function read, besides the anchors (after a call)
        self.dense_variables: list[Any] = []
        self._steps: dict[Any, Any] = {}
        self._dense_sync: Any = None
        self._pipeline = StepPipeline()
        functools.update_wrapper(self, fn)

    # -- one call ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One training step; returns the function's outputs."""
        if self.server_optimizer is not None and self._dense_sync is None:
            self.predict(*args, **kwargs)  # creates the dense variables, nothing trained
            self._share_dense()
        _, outputs, dense_grads = self._run(True, args, kwargs)[:3]
        if self._dense_sync is not None:
            values = self._dense_sync.step([None if g is None else np.asarray(g)
                                            for g in dense_grads])
            for var, value in zip(self.dense_variables, values, strict=True):
                var.assign(value)
        return outputs

    def prefetch(self, *args: Any, exact: bool = True, **kwargs: Any) -> None:
        """Announce a coming call with these arguments: its rows are pulled in the
        background, with one ``client.pull_many`` for every table, right after the running
        step's push (at once when no step runs), while that step finishes; the call
        takes them when its lookups are these and no push touched the tables since, so
        training with prefetch equals training without it. With
        ``xdl.prefetch_batches``::

            for batch in xdl.prefetch_batches(loader, lambda b: model_fn.prefetch(*inputs(b))):
                loss, prob = model_fn(*inputs(batch))

        :param exact: accepted for symmetry with :meth:`xdl.lookup.RemoteTable.prefetch`;
            the rows are always exact here.
        """
        layout, ids, offsets, _ = self._split(args, kwargs)
        remotes = [self.xdl.remote(spec) for _, _, spec in layout]
        plans = _plans(remotes, layout, [np.asarray(v) for v in ids],
                       [None if o is None else np.asarray(o) for o in offsets])
        self._pipeline.announce(remotes, [_unique_of(p) for p in plans])

    def _flush(self) -> None:
        seen: set[tuple[int, int]] = set()
        for remote in list(self.xdl.remotes.values()):
            key = (id(remote.buffer), id(remote.client))
            if key not in seen:
                seen.add(key)
                remote.buffer.flush(remote.client)  # every table of the client at once

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function forward (lookups included), no gradients, no updates."""
        return self._run(False, args, kwargs)[1]

    def wait_pushes(self) -> None:
        """Push what is buffered and wait until every push of these tables is applied."""
        self._pipeline.wait()
        self.xdl.wait_pushes()

    def close(self) -> None:
        """Wait for the pushes and stop the background threads."""
        try:
            self._pipeline.close()
        finally:
            self.xdl.close()

    # -- internals -----------------------------------------------------------------------

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[Any, list[Any], list[Any], dict[str, Any]]:
        """(static layout, ids, offsets, the other arguments) of one call."""
        from xdl.wrapper import EmbeddingInput

        bound = self.signature.bind(*args, **kwargs)
        layout: list[tuple[str, int | None, Any]] = []  # (argument, item, lookup spec)
        ids: list[Any] = []
        offsets: list[Any] = []
        rest: dict[str, Any] = {}

        def add(arg: str, item: int | None, spec: Any, value: Any, offs: Any) -> None:
            self.xdl.remote(spec)  # the table exists before any graph is traced
            layout.append((arg, item, spec))
            ids.append(value)
            offsets.append(offs)

        for arg, value in bound.arguments.items():
            if isinstance(value, EmbeddingInput):
                add(arg, None, value.spec, value.ids, value.offsets)
            elif arg in self.specs:
                spec = self.specs[arg]
                if spec.combiner is not None and isinstance(value, tuple):
                    add(arg, None, spec, value[0], value[1])
                else:
                    add(arg, None, spec, value, None)
            elif isinstance(value, (list, tuple)) and any(isinstance(v, EmbeddingInput)
                                                          for v in value):
                kept = list(value)
                for i, v in enumerate(value):
                    if isinstance(v, EmbeddingInput):
                        add(arg, i, v.spec, v.ids, v.offsets)
                        kept[i] = None
                rest[arg] = type(value)(kept) if isinstance(value, list) else tuple(kept)
            else:
                rest[arg] = value
        return tuple(layout), ids, offsets, rest

    def _run(self, train: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``(layout, outputs, dense gradients, push marker)`` of one call (the last two
        None when not training)."""
        layout, ids, offsets, rest = self._split(args, kwargs)
        key = (train, layout)
        step = self._steps.get(key)
        if step is None:
            body = functools.partial(self._body, train, layout)
            step = self._steps[key] = (_tf().function(body, reduce_retracing=True)
                                       if self.graph else body)
        if train:
            return (layout, *step(ids, offsets, rest))
        return layout, step(ids, offsets, rest), None, None

    @_unconverted
    def _lookups(self, layout: tuple[Any, ...], ids: list[Any], offsets: list[Any],
                 tape: Any, train: bool) -> tuple[list[Any], list[Any], list[Any]]:
        """Every lookup of the step at once: ``(embeddings, rows, unique ids)``.

        One host callback (``tf.numpy_function``; called directly when eager) checks and
        de-duplicates each lookup's ids and fetches the rows of all of them with one
        ``client.pull_many`` (or from prefetches); TensorFlow gathers and combines. The
        rows are plain tensors watched by ``tape`` (when given), which differentiates
        towards them."""
        tf = _tf()
        remotes = [self.xdl.remote(spec) for _, _, spec in layout]
        bags = [spec.combiner is not None for _, _, spec in layout]
        id_ts = [_id_tensor(v) for v in ids]
        off_ts = [tf.zeros([0], tf.int64) if o is None else tf.cast(o, tf.int64)
                  for o in offsets]
        has_offs = [o is not None for o in offsets]

        def forward(*arrays: np.ndarray) -> list[np.ndarray]:
            n = len(remotes)
            plans = _plans(remotes, layout, arrays[:n],
                           [arrays[n + i] if has_offs[i] else None for i in range(n)])
            uniques = [_unique_of(p) for p in plans]
            got = self._pipeline.take(remotes, uniques) if train else None
            if got is None:
                self._pipeline.wait()
                got = [rows for _, rows in _pull_step(list(zip(remotes, uniques, strict=True)))]
            out: list[np.ndarray] = []
            for i, rows in enumerate(got):
                plan, rows = plans[i], _float_rows(rows)
                if bags[i]:
                    coef = (plan.coef if plan.coef is not None
                            else np.ones(len(plan.kept), np.float32))
                    out += [rows, plan.lookup.inverse, uniques[i], plan.bag, coef,
                            np.asarray(plan.num_bags, np.int64)]
                else:
                    if plan.has_padding:
                        rows = np.concatenate([rows, np.zeros((1, rows.shape[1]), np.float32)])
                    out += [rows, plan.inverse, uniques[i]]
            return out

        types: list[Any] = []
        for is_bag in bags:
            types += ([tf.float32, tf.int64, tf.int64, tf.int64, tf.float32, tf.int64]
                      if is_bag else [tf.float32, tf.int64, tf.int64])
        if tf.executing_eagerly():
            flat = [tf.convert_to_tensor(a) for a in forward(
                *[t.numpy() for t in id_ts], *[t.numpy() for t in off_ts])]
        else:
            flat = tf.numpy_function(forward, id_ts + off_ts, types, stateful=True,
                                     name="xdl_pull_step")
        embs, rows_ts, uniques_ts = [], [], []
        pos = 0
        for remote, is_bag, id_t, has_off in zip(remotes, bags, id_ts, has_offs, strict=True):
            rows = flat[pos]
            rows.set_shape([None, remote.dim])
            if tape is not None:
                tape.watch(rows)
            if is_bag:
                inverse, unique, bag, coef, num_bags = flat[pos + 1:pos + 6]
                pos += 6
                emb = _bag_values(rows, inverse, bag, coef, num_bags)
                emb.set_shape([None if has_off else id_t.shape[0], remote.dim])
            else:
                inverse, unique = flat[pos + 1:pos + 3]
                pos += 3
                emb = tf.reshape(tf.gather(rows, inverse),
                                 tf.concat([tf.shape(id_t, tf.int64), [remote.dim]], 0))
                emb.set_shape(id_t.shape.concatenate([remote.dim]))
            embs.append(emb)
            rows_ts.append(rows)
            uniques_ts.append(unique)
        return embs, rows_ts, uniques_ts

    def _body(self, train: bool, layout: tuple[Any, ...], ids: list[Any], offsets: list[Any],
              rest: dict[str, Any]) -> Any:
        tf = _tf()
        # predict watches too before the dense variables are shared: it finds them
        watch = train or (self.server_optimizer is not None and self._dense_sync is None)
        with tf.GradientTape(watch_accessed_variables=watch) as tape:
            embs, rows, uniques = self._lookups(layout, ids, offsets,
                                                tape if train else None, train)
            arguments = dict(rest)
            for (arg, item, _), emb in zip(layout, embs, strict=True):
                if item is None:
                    arguments[arg] = emb
                else:
                    seq = list(arguments[arg])
                    seq[item] = emb
                    arguments[arg] = type(arguments[arg])(seq) if isinstance(
                        arguments[arg], list) else tuple(seq)
            bound = inspect.BoundArguments(self.signature, arguments)  # type: ignore[arg-type]
            outputs = self.fn(*bound.args, **bound.kwargs)
        dense = [v for v in tape.watched_variables() if v.trainable]
        if watch:
            self.dense_variables = dense
        if not train:
            return outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        grads = tape.gradient(loss, rows + dense)
        dense_grads = grads[len(rows):]
        pushed = self._push(layout, uniques, grads[:len(rows)])
        if self.optimizer is not None:
            pairs = [(g, v) for g, v in zip(dense_grads, dense, strict=True) if g is not None]
            if pairs:
                with tf.control_dependencies(pushed):
                    self.optimizer.apply_gradients(pairs)
        # only the dense gradients the shards need leave the function
        with tf.control_dependencies(pushed):
            dense_grads = ([None if g is None else tf.identity(tf.convert_to_tensor(g))
                            for g in dense_grads] if self.server_optimizer is not None else [])
            return outputs, dense_grads, [tf.identity(p) for p in pushed]

    @_unconverted
    def _push(self, layout: tuple[Any, ...], uniques: list[Any], grads: list[Any]
              ) -> list[Any]:
        """Hand the rows' gradients to the buffer and push them, one push for every table,
        as soon as they are computed, in the background (:class:`StepPipeline`: the
        dense update runs meanwhile). In a graph: one host callback (returns it, the
        dense update depends on it); eagerly: now (returns [])."""
        tf = _tf()
        taken = [i for i, g in enumerate(grads) if g is not None]
        remotes = [self.xdl.remote(layout[i][2]) for i in taken]

        def push(*arrays: np.ndarray) -> np.ndarray:
            parts = []
            for k, remote in enumerate(remotes):  # copies: TensorFlow reuses its buffers
                unique = np.array(arrays[k], dtype=np.int64)
                grad = np.array(arrays[len(remotes) + k][:unique.size], dtype=np.float32)
                parts.append((remote, unique, grad))
            self._pipeline.push(self._flush, parts)
            return _ZERO

        args = [uniques[i] for i in taken] + [tf.convert_to_tensor(grads[i]) for i in taken]
        if not taken:
            return []
        if tf.executing_eagerly():
            push(*[a.numpy() for a in args])
            return []
        return [tf.numpy_function(push, args, tf.float32, stateful=True, name="xdl_push_step")]

    def _share_dense(self) -> None:
        """Put the dense variables on the shards (the first worker's values win) and start
        every worker from the server's values."""
        from xdl.dense import DenseSync

        if not self.dense_variables:
            raise InvalidArgumentError(
                f"tf_wrapper: {self.fn.__qualname__} read no trainable variable to share "
                "through server_optimizer")
        names = [f"{self.dense_prefix}{i}.{_wire_name(v.name)}"
                 for i, v in enumerate(self.dense_variables)]
        self._dense_sync = DenseSync(self.xdl.client, names,
                                     [v.numpy() for v in self.dense_variables],
                                     optimizer=self.server_optimizer,
                                     sync_workers=self.sync_workers)
        for var, value in zip(self.dense_variables, self._dense_sync.pull(), strict=True):
            var.assign(value)


def _wire_name(name: str) -> str:
    """``name`` with every character a server name refuses replaced by ``_``
    (``dense/kernel:0`` → ``dense_kernel_0``)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in name)


def _owns(obj: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    if tf.is_tensor(obj) or isinstance(obj, (tf.Variable, tf.Module)):
        return True
    for name in ("keras", "tf_keras"):  # Keras 3 layers are not tf.Module objects
        layer = getattr(getattr(sys.modules.get(name), "layers", None), "Layer", None)
        if isinstance(layer, type) and isinstance(obj, layer):
            return True
    return False


@hookimpl
def xdl_register_backends(register: Any) -> None:
    """Register :class:`TensorFlowBackend`."""
    register.add(TensorFlowBackend)


@hookimpl
def xdl_detect_backend(obj: Any) -> str | None:
    """The tensorflow backend owns TF tensors, variables, ``tf.Module`` objects and Keras
    layers and models (only once TensorFlow or Keras is imported)."""
    return TensorFlowBackend.name if _owns(obj) else None
