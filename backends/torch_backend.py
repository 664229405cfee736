"""The PyTorch backend: tensor primitives, the differentiable "rows in, row gradients
out" op, and the end of the backward pass as the flush point of a step's gradients.

torch is imported on first use, never when this plugin is imported (the plugin manager
imports every built-in plugin).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xdl.backend import Backend, OnGrad
from xdl.hookspecs import hookimpl
from xdl.lookup import LookupPlan
from xdl.sharding import add_rows

_rows_function: Any = None
_lookups_function: Any = None
#: ``on_grads(parts)``: the row gradients of one step's lookups, ``[(i, grad)]`` with
#: ``grad`` float32 ``[U_i, dim_i]`` for the unique ids of lookup i (only the lookups
#: whose output took part in the loss).
OnGrads = Callable[[list[tuple[int, np.ndarray]]], None]


def _torch() -> Any:
    return TorchBackend.framework_module()


def rows_function() -> Any:
    """The ``torch.autograd.Function`` behind :meth:`TorchBackend.differentiable_rows`
    (built once): forward returns the rows, backward hands their gradient (torch has
    already summed the gradients of repeated ids through the inverse-index gather) to
    ``on_grad`` and returns no gradient for its inputs."""
    global _rows_function
    if _rows_function is None:
        torch = _torch()

        class Rows(torch.autograd.Function):  # type: ignore[name-defined,misc]
            @staticmethod
            def forward(ctx: Any, anchor: Any, rows: np.ndarray, on_grad: OnGrad) -> Any:
                ctx.on_grad = on_grad
                return torch.from_numpy(rows)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> tuple[None, ...]:
                ctx.on_grad(np.ascontiguousarray(grad.detach().cpu().numpy(),
                                                 dtype=np.float32))
                return (None,) * 3

        _rows_function = Rows
    return _rows_function


def _placed(rows: np.ndarray, plan: LookupPlan) -> np.ndarray:
    """``rows_ext[plan.inverse]`` shaped ``plan.shape + (dim,)`` (a fresh array)."""
    dim = rows.shape[1]
    if plan.has_padding:
        rows = np.concatenate([rows, np.zeros((1, dim), dtype=np.float32)])
    return np.take(rows, plan.inverse.reshape(-1), axis=0).reshape(*plan.shape, dim)


def _row_grads(grads: Sequence[Any], plans: Sequence[LookupPlan], dims: Sequence[int]
               ) -> list[tuple[int, np.ndarray]]:
    """Per lookup with a gradient, the gradient of its unique rows: the looked-up
    positions' gradients summed per row, one compiled pass per row width for every
    lookup of that width (padding positions dropped)."""
    by_dim: dict[int, list[int]] = {}
    for i, grad in enumerate(grads):
        if grad is not None:
            by_dim.setdefault(dims[i], []).append(i)
    out: list[tuple[int, np.ndarray]] = []
    for dim, used in by_dim.items():
        torch = _torch()
        flat = [grads[i].reshape(-1, dim) for i in used]
        g = (flat[0] if len(flat) == 1 else torch.cat(flat)).detach().cpu()
        g = np.ascontiguousarray(g.numpy(), dtype=np.float32)
        offsets = [0]
        for i in used:  # each lookup's rows (and padding row) side by side
            offsets.append(offsets[-1] + plans[i].unique_ids.size + plans[i].has_padding)
        index = (plans[used[0]].inverse.reshape(-1) if len(used) == 1 else np.concatenate(
            [plans[i].inverse.reshape(-1) + off for i, off in zip(used, offsets, strict=False)]))
        summed = np.zeros((offsets[-1], dim), dtype=np.float32)
        add_rows(summed, index, g)
        for i, off in zip(used, offsets, strict=False):
            out.append((i, summed[off:off + plans[i].unique_ids.size]))
    return out


def lookups_function() -> Any:
    """The ``torch.autograd.Function`` behind :func:`differentiable_lookups` (built
    once): one node for every lookup of a step; its backward hands all their row
    gradients to ``on_grads`` in one call."""
    global _lookups_function
    if _lookups_function is None:
        torch = _torch()

        class Lookups(torch.autograd.Function):  # type: ignore[name-defined,misc]
            @staticmethod
            def forward(ctx: Any, anchor: Any, rows: Sequence[np.ndarray],
                        plans: Sequence[LookupPlan], on_grads: OnGrads) -> Any:
                ctx.set_materialize_grads(False)  # a lookup left out of the loss: None
                ctx.plans = plans
                ctx.dims = [r.shape[1] for r in rows]
                ctx.on_grads = on_grads
                return tuple(torch.from_numpy(_placed(r, p)) for r, p in zip(rows, plans,
                                                                             strict=True))

            @staticmethod
            def backward(ctx: Any, *grads: Any) -> tuple[None, ...]:
                parts = _row_grads(grads, ctx.plans, ctx.dims)
                if parts:
                    ctx.on_grads(parts)
                return (None,) * 4

        _lookups_function = Lookups
    return _lookups_function


def differentiable_lookups(rows: Sequence[np.ndarray], plans: Sequence[LookupPlan],
                           on_grads: OnGrads) -> list[Any]:
    """The outputs of several lookups of one step, ``plans[i].shape + (dim_i,)`` from the
    rows ``rows[i]`` of ``plans[i].unique_ids`` (padding ids give zeros), as **one**
    autograd node: its backward sums each lookup's gradients per unique id and calls
    ``on_grads`` once with all of them (instead of one node, one backward call and one
    gather per lookup). Without grad recording the outputs are plain tensors."""
    torch = _torch()
    if not rows:
        return []
    if not torch.is_grad_enabled():
        return [torch.from_numpy(_placed(r, p)) for r, p in zip(rows, plans, strict=True)]
    anchor = torch.empty(0, requires_grad=True)  # makes autograd call backward
    out = lookups_function().apply(anchor, list(rows), list(plans), on_grads)
    return list(out)


class TorchBackend(Backend):
    """Backend for PyTorch tensors and ``nn.Module`` models."""

    name = "torch"
    framework = "torch"
    extra = "torch"

    def is_tensor(self, obj: Any) -> bool:
        """Whether ``obj`` is a ``torch.Tensor`` (torch not imported → False)."""
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(obj, torch.Tensor)

    def to_numpy(self, t: Any) -> np.ndarray:
        """``t`` as numpy, sharing memory for a CPU tensor."""
        return np.asarray(t.detach().cpu().numpy())

    def from_numpy(self, a: np.ndarray) -> Any:
        """A CPU tensor sharing ``a``'s memory (copied only if ``a`` is read-only)."""
        a = np.asarray(a)
        if not a.flags.writeable:
            a = a.copy()
        return _torch().from_numpy(a)

    def differentiable_rows(self, rows: np.ndarray, on_grad: OnGrad) -> Any:
        """A CPU tensor of ``rows``; when grad is enabled, backward calls ``on_grad``."""
        torch = _torch()
        if not torch.is_grad_enabled():
            return torch.from_numpy(rows)
        anchor = torch.empty(0, requires_grad=True)  # makes autograd call backward
        return rows_function().apply(anchor, rows, on_grad)

    def differentiable_lookups(self, rows: Sequence[np.ndarray],
                               plans: Sequence[LookupPlan], on_grads: OnGrads) -> list[Any]:
        """Several lookups of one step as one autograd node: see
        :func:`differentiable_lookups`."""
        return differentiable_lookups(rows, plans, on_grads)

    def schedule_flush(self, callback: Callable[[], None]) -> bool:
        """Queue ``callback`` on torch's autograd engine: it runs when backward ends."""
        _torch().autograd.Variable._execution_engine.queue_callback(callback)
        return True

    def _index(self, index: np.ndarray) -> Any:
        return _torch().from_numpy(np.ascontiguousarray(index, dtype=np.int64))

    def gather(self, t: Any, index: np.ndarray) -> Any:
        """``t.index_select(0, index)``."""
        return t.index_select(0, self._index(index).to(t.device))

    def append_zero_row(self, t: Any) -> Any:
        """``t`` with a zero row appended."""
        return _torch().cat([t, t.new_zeros((1, *t.shape[1:]))])

    def scale_rows(self, t: Any, weights: Any) -> Any:
        """``t * weights[:, None]`` (numpy weights are converted)."""
        if isinstance(weights, np.ndarray):
            weights = _torch().from_numpy(weights).to(t.device)
        return t * weights.to(device=t.device, dtype=t.dtype).unsqueeze(1)

    def segment_sum(self, t: Any, segments: np.ndarray, num_segments: int) -> Any:
        """Row sums per segment (``index_add``, differentiable)."""
        out = t.new_zeros((num_segments, *t.shape[1:]))
        return out.index_add(0, self._index(segments).to(t.device), t)

    def reshape(self, t: Any, shape: Sequence[int]) -> Any:
        """``t.reshape(shape)``."""
        return t.reshape(tuple(shape))


@hookimpl
def xdl_register_backends(register: Any) -> None:
    """Register :class:`TorchBackend`."""
    register.add(TorchBackend)


@hookimpl
def xdl_detect_backend(obj: Any) -> str | None:
    """The torch backend owns torch tensors and modules (only once torch is imported)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return TorchBackend.name
    return None
