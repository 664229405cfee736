"""The MXNet backend: NDArray primitives, the differentiable rows op, and a host callback
(an MXNet custom operator) for hybridized Gluon blocks.

MXNet is imported on first use, never when this plugin is imported (the plugin manager
imports every built-in plugin). MXNet 1.9.1 reads ``numpy.bool`` while it is imported,
an alias numpy 1.24 removed; :func:`import_mxnet` restores it (as the builtin ``bool``,
which it was) just before MXNet's first import, and nothing else in xdl touches it.

Two ways into MXNet's backward pass:

* imperative code (NDArrays, a Gluon block that is not hybridized): :meth:`MXNetBackend.rows`
  wraps already pulled rows in an ``mx.autograd.Function`` whose backward hands the rows'
  gradient to a callback; the lookup itself (gather, combiners) is ordinary NDArray code,
  so MXNet sums the gradients of repeated ids;
* symbolic code (a hybridized block's cached graph, which cannot call Python):
  :func:`host_lookup` inserts one custom operator, ``xdl_host_lookup``, whose forward and
  backward call a :class:`HostLookup`'s numpy-level functions.

MXNet runs both backwards asynchronously, on its engine's threads: a backward callback
has run once the gradient of the op's ``anchor`` input is readable (see
:func:`wait_backward`).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from xdl.backend import Backend, OnGrad
from xdl.errors import InvalidArgumentError
from xdl.hookspecs import hookimpl

if TYPE_CHECKING:
    from xdl.lookup import RemoteTable

#: the custom operator's registered name (``F.Custom(..., op_type=HOST_OP)``).
HOST_OP = "xdl_host_lookup"
_shim_lock = threading.Lock()
_rows_function: Any = None
_host_op_registered = False
#: ``on_row_grads(unique_ids, row_grads)``: takes a lookup's unique-row gradients.
RowGrads = Callable[[np.ndarray, np.ndarray], None]


def apply_numpy_bool_shim() -> bool:
    """Restore ``numpy.bool`` (the builtin ``bool``) when numpy lacks it; True if set.

    numpy 1.20 deprecated and 1.24 removed that alias; MXNet 1.9.1 still reads it at
    import. Called only by :func:`import_mxnet`, right before MXNet's first import.
    """
    if "bool" in np.__dict__:
        return False
    np.bool = bool  # type: ignore[attr-defined]
    return True


def import_mxnet() -> Any:
    """The ``mxnet`` module, importing it (after :func:`apply_numpy_bool_shim`) the first
    time. Raises ImportError when MXNet is not installed (see
    :meth:`MXNetBackend.framework_module` for the error that names the extra)."""
    mx = sys.modules.get("mxnet")
    if mx is not None:
        return mx
    with _shim_lock:
        if "mxnet" not in sys.modules:
            if importlib.util.find_spec("mxnet") is None:
                raise ImportError("No module named 'mxnet'")
            apply_numpy_bool_shim()
        return importlib.import_module("mxnet")


def _mx() -> Any:
    return MXNetBackend.framework_module()


def _float_rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def nd_from_numpy(a: np.ndarray, dtype: Any = np.float32) -> Any:
    """An NDArray holding a private copy of ``a`` (as ``dtype``), made without waiting
    for MXNet's engine.

    ``mx.nd.array`` copies into a new NDArray through the engine and so waits behind the
    operator a worker is running (hundreds of milliseconds behind a large one); this
    copies in numpy and hands the copy over through DLPack (``from_numpy(zero_copy=True)``).
    """
    mx = _mx()
    own = np.array(a, dtype=dtype, order="C", copy=True)
    if not own.size:
        return mx.nd.zeros(own.shape, dtype=own.dtype)
    return mx.nd.from_numpy(own, zero_copy=True)


class _ReadView:
    """DLPack producer of a read view of an NDArray (for ``np.from_dlpack``)."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array

    def __dlpack__(self, stream: Any = None) -> Any:
        return _mx().nd.to_dlpack_for_read(self.array)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def read_view(array: Any) -> np.ndarray:
    """A read-only numpy view of a CPU float32 NDArray's memory, without a copy (through
    DLPack; a copy, ``asnumpy``, where that is not possible). Use it while MXNet keeps
    the array unchanged (inside an operator's callback), and copy what you keep."""
    try:
        view = np.from_dlpack(_ReadView(array))
    except (AttributeError, TypeError, ValueError, BufferError, RuntimeError):
        return _float_rows(array.asnumpy())
    if view.dtype != np.float32 or not view.flags.c_contiguous:
        return _float_rows(view)
    return view


def ids_to_numpy(ids: Any) -> np.ndarray:
    """Ids (an NDArray, numpy array or sequence) as int64 numpy, shape kept.

    Gluon feeds ids as float32 by default; float ids must hold whole numbers (float32
    holds every integer up to 2**24 exactly; pass int64 NDArrays for hash ids).
    """
    if hasattr(ids, "asnumpy"):
        ids = ids.asnumpy()
    arr = np.asarray(ids)
    if arr.dtype.kind == "f":
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise InvalidArgumentError(
                f"ids must be whole numbers, got {arr.dtype} values with a fraction; pass "
                "integer ids (int64 NDArrays for feature hashes)")
        return as_int
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


# ------------------------------------------------------------------ imperative rows op


def rows_function() -> Any:
    """The ``mx.autograd.Function`` behind :meth:`MXNetBackend.rows` (built once).

    An instance holds pulled rows and a gradient callback. Forward returns the rows as
    an NDArray (its input, the ``anchor``, only connects it to the recorded graph);
    backward hands the rows' gradient, as float32 numpy ``[U, dim]``, to the callback
    and gives the anchor a zero gradient.
    """
    global _rows_function
    if _rows_function is None:
        mx = _mx()

        class PulledRows(mx.autograd.Function):  # type: ignore[name-defined,misc]
            def __init__(self, rows: np.ndarray, on_grad: Callable[[np.ndarray], None]
                         ) -> None:
                super().__init__()
                self._rows = rows
                self._on_grad = on_grad
                self._anchor_shape: tuple[int, ...] = (1,)

            def forward(self, anchor: Any) -> Any:
                self._anchor_shape = tuple(anchor.shape)
                return nd_from_numpy(self._rows)

            def backward(self, grad: Any) -> Any:
                self._on_grad(_float_rows(grad.asnumpy()))
                return mx.nd.zeros(self._anchor_shape)

        _rows_function = PulledRows
    return _rows_function


# ------------------------------------------------------------------ host callback op


class HostLookup(Protocol):
    """A numpy-level lookup that the ``xdl_host_lookup`` custom operator calls.

    A host may also have ``host_forward_rows(ids, *extra) -> (rows, index, state)``:
    float32 ``rows [R, dim]`` and an integer ``index`` of the ids' shape; the output is
    then ``rows[index]``, gathered by MXNet's ``take`` on its engine instead of being
    built in numpy and copied (the forward used when present).
    """

    def host_forward(self, ids: np.ndarray, *extra: np.ndarray) -> tuple[np.ndarray, Any]:
        """Output (float32) of the lookup of ``ids`` and a state for the backward."""
        ...

    def host_backward(self, state: Any, grad: np.ndarray) -> None:
        """Take the output's gradient (float32 numpy) for the lookup that made ``state``;
        ``grad`` is a read-only view, valid during the call only (copy what you keep)."""
        ...

    def host_output_shape(self, ids_shape: tuple[int, ...],
                          extra_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """Output shape for ids (and extra inputs) of these shapes."""
        ...


_hosts: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_host_keys = itertools.count()


def register_host(host: HostLookup) -> str:
    """Register ``host`` (kept by weak reference); returns the key the operator names."""
    key = f"h{next(_host_keys)}"
    _hosts[key] = host
    return key


def _host(key: str) -> Any:
    host = _hosts.get(key)
    if host is None:
        raise InvalidArgumentError(
            f"the xdl lookup {key!r} of this graph no longer exists (its block was unswapped "
            "or garbage-collected); rebuild the graph (net.hybridize() again)")
    return host


def ensure_host_op() -> None:
    """Register the ``xdl_host_lookup`` custom operator with MXNet (once).

    Inputs: ``ids``, then ``extra`` further inputs (``num_extra``), then ``anchor``
    (float32 ``[1]``, a zero parameter: a hybridized graph runs an operator's backward
    only when some input needs a gradient). Output: float32 of the host's shape.
    """
    global _host_op_registered
    if _host_op_registered:
        return
    mx = _mx()

    class HostLookupOp(mx.operator.CustomOp):  # type: ignore[name-defined,misc]
        def __init__(self, key: str, num_extra: int) -> None:
            super().__init__()
            self._key = key
            self._num_extra = num_extra
            # (ids, state) of forwards whose backward has not run yet
            self._states: list[tuple[np.ndarray, Any]] = []

        def forward(self, is_train: bool, req: Any, in_data: Any, out_data: Any,
                    aux: Any) -> None:
            host = _host(self._key)
            ids = ids_to_numpy(in_data[0])
            extra = [in_data[1 + i].asnumpy() for i in range(self._num_extra)]
            forward_rows = getattr(host, "host_forward_rows", None)
            if forward_rows is not None:
                rows, index, state = forward_rows(ids, *extra)
                # only the distinct rows and the index are copied; MXNet gathers
                out = mx.nd.take(nd_from_numpy(rows), nd_from_numpy(index, np.int32), axis=0,
                                 out=out_data[0] if req[0] in ("write", "inplace") else None)
            else:
                out, state = host.host_forward(ids, *extra)
                out = nd_from_numpy(out)
            if is_train:  # a backward finds its forward's state by the ids
                self._states = [*self._states[-7:], (ids, state)]
            if out is not out_data[0]:
                self.assign(out_data[0], req[0], out)

        def backward(self, req: Any, out_grad: Any, in_data: Any, out_data: Any,
                     in_grad: Any, aux: Any) -> None:
            ids = ids_to_numpy(in_data[0])
            # usually one state; a forward never back-propagated leaves an older one
            for i in range(len(self._states) - 1, -1, -1):
                if np.array_equal(self._states[i][0], ids):
                    state = self._states.pop(i)[1]
                    _host(self._key).host_backward(state, read_view(out_grad[0]))
                    break
            for i, grad in enumerate(in_grad):
                self.assign(grad, req[i], 0)

    @mx.operator.register(HOST_OP)  # type: ignore[misc]
    class HostLookupProp(mx.operator.CustomOpProp):  # type: ignore[name-defined,misc]
        def __init__(self, key: str, num_extra: str = "0") -> None:
            super().__init__(need_top_grad=True)
            self._key = key
            self._num_extra = int(num_extra)

        def list_arguments(self) -> list[str]:
            return ["ids", *(f"extra{i}" for i in range(self._num_extra)), "anchor"]

        def list_outputs(self) -> list[str]:
            return ["output"]

        def infer_shape(self, in_shape: Any) -> Any:
            ids_shape = tuple(in_shape[0])
            extra = [tuple(s) for s in in_shape[1:1 + self._num_extra]]
            out = _host(self._key).host_output_shape(ids_shape, extra)
            return [*in_shape[:-1], [1]], [list(out)], []

        def infer_type(self, in_type: Any) -> Any:
            return [*in_type[:-1], np.float32], [np.float32], []

        def declare_backward_dependency(self, out_grad: Any, in_data: Any,
                                        out_data: Any) -> Any:
            return [*out_grad, in_data[0]]  # the ids: a backward matches its forward

        def create_operator(self, ctx: Any, shapes: Any, dtypes: Any) -> Any:
            return HostLookupOp(self._key, self._num_extra)

    del HostLookupProp
    _host_op_registered = True


def host_lookup(F: Any, key: str, ids: Any, anchor: Any, *extra: Any) -> Any:  # noqa: N803
    """``F.Custom`` call of the host lookup ``key`` (``F`` is ``mx.sym`` or ``mx.nd``)."""
    ensure_host_op()
    return F.Custom(ids, *extra, anchor, op_type=HOST_OP, key=key, num_extra=str(len(extra)))


# ------------------------------------------------------------- engine-ordered flag


def engine_flag(reads: Sequence[Any], writes: Sequence[Any]) -> tuple[np.ndarray, Any]:
    """A flag set in MXNet's engine order, without blocking the caller and without
    running Python on the engine: returns ``(flag, flag_nd)``, a float32 numpy ``[1]``
    array and an NDArray sharing its memory.

    Operators issued here set ``flag[0]`` to 1 once every write to ``reads`` issued so
    far is done, and then zero ``writes``; an operator issued later that reads one of
    ``writes`` therefore runs after the flag is set, and can read ``flag`` directly (no
    wait, from any thread). ``flag_nd.wait_to_read()`` waits for the flag, and raises
    the error of a failed operator it waited for.

    This is how a hybridized net's step boundary stays in MXNet's order: ``reads`` are
    the anchor gradients (written by the backward), ``writes`` the anchors (read by the
    next step's lookup operators, which then find the flag set).

    :param reads: float32 ``[1]`` NDArrays (gradients) to wait for; not changed.
    :param writes: float32 ``[1]`` NDArrays that are zero (anchors), written as zero.
    """
    mx = _mx()
    flag = np.zeros(1, dtype=np.float32)
    flag_nd = mx.nd.from_numpy(flag, zero_copy=True)
    with mx.autograd.pause():  # writes may be Parameters with gradients attached
        if reads:
            after = reads[0] if len(reads) == 1 else mx.nd.add_n(*reads)
            mx.nd.ones_like(after, out=flag_nd)
        else:
            mx.nd.ones((1,), out=flag_nd)
        for array in writes:
            mx.nd.zeros_like(flag_nd, out=array)
    return flag, flag_nd


def wait_backward(anchor_grads: Sequence[Any]) -> None:
    """Block until the backward callbacks that write these anchor gradients have run."""
    for grad in anchor_grads:
        if grad is not None:
            grad.wait_to_read()


# -------------------------------------------------------------------------- backend


class MXNetBackend(Backend):
    """Backend for MXNet NDArrays and Gluon blocks (MXNet 1.9, CPU context)."""

    name = "mxnet"
    framework = "mxnet"
    extra = "mxnet"

    @classmethod
    def framework_module(cls) -> Any:
        """``mxnet``, imported after the ``numpy.bool`` shim on first use."""
        if "mxnet" not in sys.modules:
            try:
                import_mxnet()
            except ImportError:
                pass  # the base class raises the error naming the extra
        return super().framework_module()

    def is_tensor(self, obj: Any) -> bool:
        """Whether ``obj`` is an ``mx.nd.NDArray`` (MXNet not imported → False)."""
        mx = sys.modules.get("mxnet")
        return mx is not None and isinstance(obj, mx.nd.NDArray)

    def to_numpy(self, t: Any) -> np.ndarray:
        """``t.asnumpy()`` (MXNet always copies to numpy)."""
        return np.asarray(t.asnumpy()) if hasattr(t, "asnumpy") else np.asarray(t)

    def from_numpy(self, a: np.ndarray) -> Any:
        """An NDArray with ``a``'s values and dtype (MXNet copies)."""
        a = np.asarray(a)
        return _mx().nd.array(a, dtype=a.dtype)

    host_callbacks = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Any] = []  # anchor gradients written by pending backwards

    def ids_to_numpy(self, ids: Any) -> np.ndarray:
        """Ids as int64 numpy; float ids (Gluon's default dtype) must be whole numbers."""
        return ids_to_numpy(ids)

    def differentiable_rows(self, rows: np.ndarray, on_grad: OnGrad, *,
                            anchor: Any = None) -> Any:
        """NDArray of pulled ``rows`` ``[U, dim]``: when autograd is recording, the
        backward pass calls ``on_grad(row_grads)`` (float32 numpy), on an engine thread.

        :param anchor: an NDArray with an attached gradient that links the op to the
            recorded graph (a Gluon block passes its zero anchor parameter); a fresh
            one is made when None. Its gradient is zero, and readable once ``on_grad``
            has run (:meth:`wait_backward` waits for that).
        """
        mx = _mx()
        rows = _float_rows(rows)
        if not mx.autograd.is_recording():
            return mx.nd.array(rows, dtype=np.float32)
        if anchor is None:
            anchor = mx.nd.zeros((1,))
            anchor.attach_grad()
        with self._lock:
            self._pending.append(anchor.grad)
        return rows_function()(rows, on_grad)(anchor)

    def wait_backward(self) -> None:
        """Block until the backward callbacks of the rows made so far have run (MXNet
        runs them asynchronously); a lookup calls it before it pulls, so that a step's
        gradients are buffered (and flushed by the pull) before the next step reads."""
        with self._lock:
            pending, self._pending = self._pending, []
        wait_backward(pending)

    def engine_flag(self, reads: Sequence[Any], writes: Sequence[Any]
                    ) -> tuple[np.ndarray, Any]:
        """:func:`engine_flag`: a flag MXNet's engine sets after ``reads`` are written,
        before ``writes`` are read."""
        return engine_flag(reads, writes)

    def register_host(self, host: HostLookup) -> str:
        """:func:`register_host`: the key an ``xdl_host_lookup`` operator names ``host`` by."""
        return register_host(host)

    def host_lookup(self, F: Any, key: str, ids: Any, anchor: Any, *extra: Any) -> Any:  # noqa: N803
        """:func:`host_lookup`: the custom operator calling host ``key`` (graph mode)."""
        return host_lookup(F, key, ids, anchor, *extra)

    def wrapper(self, client: Any, tables: Any = None, *, sync_push: bool = True) -> Any:
        """``xdl.mxnet_wrapper``: the core's :func:`xdl.wrapper.wrapper` for MXNet, whose
        ``wait_pushes`` / ``close`` first wait for MXNet's asynchronous backward.

        The pushed row gradients are d(loss)/d(rows) of the loss ``backward`` ran on; with
        a ``gluon.Trainer`` for the dense part, back-propagate the mean loss and call
        ``trainer.step(1)`` so both parts see the same scale (docs/mxnet.md).
        """
        from xdl.wrapper import wrapper

        decorate = wrapper(client, tables, backend=self.name, sync_push=sync_push)

        def mx_decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            wrapped = decorate(fn)
            state = wrapped.xdl  # type: ignore[attr-defined]

            def wait_pushes() -> None:
                self.wait_backward()
                state.wait_pushes()

            def close() -> None:
                self.wait_backward()
                state.close()

            wrapped.wait_pushes = wait_pushes  # type: ignore[attr-defined]
            wrapped.close = close  # type: ignore[attr-defined]
            return wrapped

        return mx_decorate

    def _rows_of(self, remote: RemoteTable, unique_ids: np.ndarray, rows: np.ndarray,
                 anchor: Any, on_row_grads: RowGrads | None) -> Any:
        take = remote.add_gradients if on_row_grads is None else on_row_grads

        def on_grad(grad: np.ndarray) -> None:
            take(unique_ids, grad)

        return self.differentiable_rows(rows, on_grad, anchor=anchor)

    def lookup(self, remote: RemoteTable, ids: Any, *, anchor: Any = None,
               on_row_grads: RowGrads | None = None) -> Any:
        """Differentiable lookup of ``ids`` (any shape) → ``ids.shape + (dim,)``
        (NDArrays, imperative); padding ids give zeros and no gradient.

        :param anchor: see :meth:`differentiable_rows`.
        :param on_row_grads: receives ``(unique_ids, row_grads)`` instead of
            ``remote.add_gradients`` (a Gluon block holds them until the Trainer's step).
        """
        self.wait_backward()
        plan, rows = remote.lookup(self.ids_to_numpy(ids))
        unique_rows = self._rows_of(remote, plan.unique_ids, rows, anchor, on_row_grads)
        return self.place(unique_rows, plan)

    def lookup_bags(self, remote: RemoteTable, ids: Any, offsets: Any = None, *,
                    combiner: str = "sum", per_sample_weights: Any = None,
                    include_last_offset: bool = False, anchor: Any = None,
                    on_row_grads: RowGrads | None = None) -> Any:
        """Differentiable bag lookup → ``[bags, dim]`` (see :func:`xdl.lookup.plan_bags`
        for the layouts); ``anchor`` and ``on_row_grads`` as in :meth:`lookup`."""
        self.wait_backward()
        plan, rows = remote.lookup_bags(
            self.ids_to_numpy(ids), None if offsets is None else self.ids_to_numpy(offsets),
            combiner=combiner, include_last_offset=include_last_offset)
        unique_rows = self._rows_of(remote, plan.lookup.unique_ids, rows, anchor, on_row_grads)
        return self.combine(unique_rows, plan, per_sample_weights=per_sample_weights)

    def _index(self, index: np.ndarray) -> Any:
        return _mx().nd.array(np.asarray(index, dtype=np.int64), dtype=np.int64)

    def gather(self, t: Any, index: np.ndarray) -> Any:
        """``t[index]`` along axis 0 (``nd.take``; gradients of repeated rows add up)."""
        return _mx().nd.take(t, self._index(index), axis=0)

    def append_zero_row(self, t: Any) -> Any:
        """``t`` with a zero row appended."""
        mx = _mx()
        return mx.nd.concat(t, mx.nd.zeros((1, *t.shape[1:]), dtype=t.dtype), dim=0)

    def scale_rows(self, t: Any, weights: Any) -> Any:
        """``t * weights[:, None]``; numpy weights are converted."""
        mx = _mx()
        if isinstance(weights, np.ndarray):
            weights = mx.nd.array(weights, dtype=t.dtype)
        return mx.nd.broadcast_mul(t, weights.astype(t.dtype).reshape((-1, 1)))

    def segment_sum(self, t: Any, segments: np.ndarray, num_segments: int) -> Any:
        """Row sums per segment: rows are gathered into a padded ``[segments, longest,
        dim]`` block (empty slots read an appended zero row) and summed over axis 1;
        differentiable through ``nd.take``."""
        segments = np.asarray(segments, dtype=np.int64)
        layout = padded_segments(segments, num_segments)
        out = self.gather(self.append_zero_row(t), layout.reshape(-1))
        return out.reshape((num_segments, layout.shape[1], -1)).sum(axis=1)

    def reshape(self, t: Any, shape: Sequence[int]) -> Any:
        """``t.reshape(shape)``."""
        return t.reshape(tuple(shape))


def padded_segments(segments: np.ndarray, num_segments: int) -> np.ndarray:
    """``[num_segments, longest]`` positions of each segment's rows (in order), padded
    with ``len(segments)`` (the index of an appended zero row)."""
    n = len(segments)
    counts = np.bincount(segments, minlength=num_segments)
    width = max(1, int(counts.max()) if n else 1)
    order = np.argsort(segments, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    seg_sorted = segments[order]
    slot = np.arange(n, dtype=np.int64) - starts[seg_sorted]
    layout = np.full((num_segments, width), n, dtype=np.int64)
    layout[seg_sorted, slot] = order
    return layout


@hookimpl
def xdl_register_backends(register: Any) -> None:
    """Register :class:`MXNetBackend`."""
    register.add(MXNetBackend)


@hookimpl
def xdl_detect_backend(obj: Any) -> str | None:
    """The mxnet backend owns NDArrays, symbols and Gluon blocks (only once MXNet has
    been imported: an object of MXNet cannot exist before)."""
    mx = sys.modules.get("mxnet")
    if mx is not None and isinstance(obj, (mx.nd.NDArray, mx.sym.Symbol, mx.gluon.Block)):
        return MXNetBackend.name
    return None
