"""The PyTorch backend: tensor primitives and the differentiable pull of embedding rows.

torch is imported on first use, never when this plugin is imported (the plugin manager
imports every built-in plugin).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from xdl.backend import Backend, SparseClient
from xdl.hookspecs import hookimpl
from xdl.sharding import add_rows

_pull_function: Any = None


def _torch() -> Any:
    return TorchBackend.framework_module()


def _writable(a: np.ndarray) -> np.ndarray:
    # rows decoded from a message may be read-only buffers; torch wants writable memory
    a = np.asarray(a, dtype=np.float32)
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, dtype=np.float32)


class _PendingGrads(threading.local):
    """Row gradients of the running backward pass, per (client, table)."""

    def __init__(self) -> None:
        self.by_table: dict[tuple[int, str], list[tuple[Any, np.ndarray, np.ndarray,
                                                        Callable[[Any], None] | None]]] = {}


_pending = _PendingGrads()


def _defer_push(client: SparseClient, table: str, ids: np.ndarray, grads: np.ndarray,
                on_push: Callable[[Any], None] | None) -> None:
    """Collect a lookup's row gradients; one push per table when the backward pass ends.

    A table looked up several times in one step (DIN's item table: target and history)
    must get one push of the summed gradient, as a local optimizer sees one gradient;
    two pushes would apply Adagrad or Adam twice.
    """
    # flushing is idempotent; queueing per lookup also recovers from an interrupted pass
    _torch().autograd.Variable._execution_engine.queue_callback(flush_pushes)
    _pending.by_table.setdefault((id(client), table), []).append((client, ids, grads, on_push))


def merge_rows(ids: list[np.ndarray], grads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate row gradients and sum those of the same id: ``(unique ids, grads)``."""
    if len(ids) == 1:
        return ids[0], grads[0]
    all_ids = np.concatenate(ids)
    unique, inverse = np.unique(all_ids, return_inverse=True)
    summed = np.zeros((len(unique), grads[0].shape[1]), dtype=np.float32)
    add_rows(summed, inverse, np.concatenate(grads))
    return unique, summed


def flush_pushes() -> None:
    """Push the gradients collected during the backward pass that just ended."""
    by_table, _pending.by_table = _pending.by_table, {}
    for (_, table), parts in by_table.items():
        client = parts[0][0]
        ids, grads = merge_rows([p[1] for p in parts], [p[2] for p in parts])
        ticket = client.push(table, ids, grads)
        for callback in {id(p[3]): p[3] for p in parts if p[3] is not None}.values():
            callback(ticket)


def pull_function() -> Any:
    """The ``torch.autograd.Function`` behind :meth:`TorchBackend.pull_rows` (built once).

    Forward returns the pulled rows of the unique ids; backward hands their gradient
    (torch has already summed the gradients of repeated ids through the inverse-index
    gather) to one push per table at the end of the backward pass, and returns no
    gradient for its inputs.
    """
    global _pull_function
    if _pull_function is None:
        torch = _torch()

        class PullRows(torch.autograd.Function):  # type: ignore[name-defined,misc]
            @staticmethod
            def forward(ctx: Any, anchor: Any, client: SparseClient, table: str,
                        unique_ids: np.ndarray, rows: np.ndarray,
                        on_push: Callable[[Any], None] | None) -> Any:
                ctx.client, ctx.table, ctx.unique_ids, ctx.on_push = (
                    client, table, unique_ids, on_push)
                return torch.from_numpy(rows)

            @staticmethod
            def backward(ctx: Any, grad: Any) -> tuple[None, ...]:
                grads = np.ascontiguousarray(grad.detach().cpu().numpy(), dtype=np.float32)
                if len(ctx.unique_ids):
                    _defer_push(ctx.client, ctx.table, ctx.unique_ids, grads, ctx.on_push)
                return (None,) * 6

        _pull_function = PullRows
    return _pull_function


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

    def pull_rows(
        self,
        client: SparseClient,
        table: str,
        unique_ids: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        on_push: Callable[[Any], None] | None = None,
    ) -> Any:
        """Rows ``[U, dim]`` of ``unique_ids``; when grad is enabled, backward pushes."""
        torch = _torch()
        if rows is None:
            rows = client.pull(table, unique_ids)
        rows = _writable(rows)
        if not torch.is_grad_enabled():
            return torch.from_numpy(rows)
        anchor = torch.empty(0, requires_grad=True)  # makes autograd call backward
        return pull_function().apply(anchor, client, table, unique_ids, rows, on_push)

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
