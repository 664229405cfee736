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

_rows_function: Any = None


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
