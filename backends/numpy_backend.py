"""The numpy backend: the reference implementation of the lookup core.

Forward only (numpy has no autograd); :func:`unique_row_grad` and
:meth:`NumpyBackend.embedding_bag_grad` compute, explicitly, the gradient a push would
carry, so the other backends can be checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from xdl.backend import Backend, BagPlan, LookupPlan, OnGrad
from xdl.hookspecs import hookimpl


def unique_row_grad(grad: np.ndarray, inverse: np.ndarray, num_unique: int) -> np.ndarray:
    """Sum the gradient of every looked-up id into its unique row: ``[num_unique, dim]``.

    :param grad: gradient of the lookup output, ``[n, dim]`` (flattened ids).
    :param inverse: row of each id (from a :class:`~xdl.backend.LookupPlan`); rows
        ``>= num_unique`` (the padding row) are dropped.
    :param num_unique: number of unique ids.
    """
    grad = np.asarray(grad, dtype=np.float32).reshape(len(inverse), -1)
    out = np.zeros((num_unique + 1, grad.shape[1]), dtype=np.float32)
    np.add.at(out, np.minimum(inverse, num_unique), grad)
    return out[:num_unique]


class NumpyBackend(Backend):
    """Reference backend over numpy arrays (forward only)."""

    name = "numpy"
    framework = None
    extra = None

    def is_tensor(self, obj: Any) -> bool:
        """Whether ``obj`` is a numpy array."""
        return isinstance(obj, np.ndarray)

    def to_numpy(self, t: Any) -> np.ndarray:
        """``t`` itself (as an ndarray)."""
        return np.asarray(t)

    def from_numpy(self, a: np.ndarray) -> np.ndarray:
        """``a`` itself."""
        return a

    def differentiable_rows(self, rows: np.ndarray, on_grad: OnGrad) -> np.ndarray:
        """``rows`` themselves: numpy has no backward pass, ``on_grad`` is never called."""
        return rows

    def gather(self, t: Any, index: np.ndarray) -> np.ndarray:
        """``t[index]``."""
        return np.asarray(t)[index]

    def append_zero_row(self, t: Any) -> np.ndarray:
        """``t`` with a zero row appended."""
        t = np.asarray(t)
        return np.concatenate([t, np.zeros((1, *t.shape[1:]), dtype=t.dtype)])

    def scale_rows(self, t: Any, weights: Any) -> np.ndarray:
        """``t * weights[:, None]``."""
        return np.asarray(t) * np.asarray(weights, dtype=np.float32)[:, None]

    def segment_sum(self, t: Any, segments: np.ndarray, num_segments: int) -> np.ndarray:
        """Row sums per segment."""
        t = np.asarray(t)
        out = np.zeros((num_segments, *t.shape[1:]), dtype=t.dtype)
        np.add.at(out, segments, t)
        return out

    def reshape(self, t: Any, shape: Sequence[int]) -> np.ndarray:
        """``t.reshape(shape)``."""
        return np.asarray(t).reshape(tuple(shape))

    def embedding_grad(self, plan: LookupPlan, grad_out: np.ndarray) -> np.ndarray:
        """The unique-row gradient a push carries for an :meth:`embedding` lookup."""
        return unique_row_grad(grad_out, plan.inverse, len(plan.unique_ids))

    def embedding_bag_grad(self, plan: BagPlan, grad_out: np.ndarray,
                           per_sample_weights: np.ndarray | None = None) -> np.ndarray:
        """The unique-row gradient a push carries for an :meth:`embedding_bag` lookup."""
        grad = np.asarray(grad_out, dtype=np.float32)[plan.bag]
        if per_sample_weights is not None:
            grad = grad * np.asarray(per_sample_weights, np.float32).reshape(-1)[plan.kept, None]
        elif plan.coef is not None:
            grad = grad * plan.coef[:, None]
        return unique_row_grad(grad, plan.lookup.inverse, len(plan.lookup.unique_ids))


@hookimpl
def xdl_register_backends(register: Any) -> None:
    """Register :class:`NumpyBackend`."""
    register.add(NumpyBackend)


@hookimpl
def xdl_detect_backend(obj: Any) -> str | None:
    """The numpy backend owns numpy arrays."""
    return NumpyBackend.name if isinstance(obj, np.ndarray) else None
