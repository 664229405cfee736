"""The framework backend base class: the primitives a framework supplies, and the lookup
written once on top of them.

A backend (one per framework, see :mod:`xdl.backends`) implements primitives only:

* ``is_tensor`` / ``to_numpy`` / ``from_numpy``: tell its tensors apart, convert;
* ``differentiable_rows(rows, on_grad)``: "rows in, row gradients out": a tensor holding
  ``rows`` whose backward pass calls ``on_grad`` with its gradient as numpy;
* ``schedule_flush(callback)``: the point where a step's gradients are complete (torch:
  the end of the backward pass); optional, the core otherwise flushes before the next
  pull of a table;
* ``gather`` / ``append_zero_row`` / ``scale_rows`` / ``segment_sum`` / ``reshape``:
  the differentiable tensor ops the lookup and the combiners are made of;
* optionally, graph mode through host callbacks (:attr:`Backend.host_callbacks`): a
  backend whose ids may be symbolic (``tf.function``, hybridized Gluon) calls
  :meth:`xdl.lookup.RemoteTable.lookup` and :meth:`~xdl.lookup.RemoteTable.add_gradients`
  from inside the graph (``tf.numpy_function``, a custom operator).

Everything else (id checks, de-duplication, the inverse index, padding, bags and
combiner weights, prefetch, the gradient buffer) is numpy in :mod:`xdl.lookup` and
:mod:`xdl.gradients`, written once.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import BackendNotAvailableError, InvalidArgumentError
from .gradients import OnPush, default_buffer
from .lookup import (
    COMBINERS,
    BagPlan,
    LookupPlan,
    PushLog,
    SparseClient,
    as_ids,
    plan_bags,
    plan_lookup,
)

if TYPE_CHECKING:
    from .lookup import RemoteTable

#: ``on_grad(grad)``: receives the gradient of a :meth:`Backend.differentiable_rows`
#: tensor, float32 numpy ``[U, dim]``, during the backward pass.
OnGrad = Callable[[np.ndarray], None]

__all__ = [
    "COMBINERS",
    "Backend",
    "BagPlan",
    "LookupPlan",
    "OnGrad",
    "PushLog",
    "SparseClient",
    "as_ids",
    "plan_bags",
    "plan_lookup",
]


class Backend:
    """A framework backend: tensor primitives plus the lookup core written once here.

    Subclasses set :attr:`name`, :attr:`framework` and :attr:`extra` and implement the
    primitives (the methods raising ``NotImplementedError``). They must not import
    their framework at module import time; :meth:`framework_module` imports it on
    first use and says which extra to install when it is missing.
    """

    #: registry name ("torch", "numpy", ...)
    name: ClassVar[str] = ""
    #: module the backend needs ("torch"); None for none
    framework: ClassVar[str | None] = None
    #: ``pip install 'xdl-bridge[<extra>]'`` installs the framework
    extra: ClassVar[str | None] = None

    # --- availability ------------------------------------------------------------------

    @classmethod
    def framework_module(cls) -> Any:
        """Import and return the framework module, or raise BackendNotAvailableError."""
        if cls.framework is None:
            return None
        try:
            return importlib.import_module(cls.framework)
        except ImportError as exc:
            extra = cls.extra or cls.framework
            raise BackendNotAvailableError(
                f"the {cls.name!r} backend needs {cls.framework}, which is not installed "
                f"({exc}); install it with: pip install 'xdl-bridge[{extra}]'") from exc

    @classmethod
    def is_installed(cls) -> bool:
        """Whether the framework is installed (found without importing it)."""
        return cls.framework is None or importlib.util.find_spec(cls.framework) is not None

    @classmethod
    def is_available(cls) -> bool:
        """Whether the framework can be imported."""
        try:
            cls.framework_module()
        except BackendNotAvailableError:
            return False
        return True

    #: capability: graph mode through host callbacks (``tf.function``, hybridized
    #: Gluon), where ids are symbolic and the lookup runs as a callback into Python
    #: that calls :meth:`xdl.lookup.RemoteTable.lookup` / ``add_gradients``.
    host_callbacks: ClassVar[bool] = False

    # --- primitives each backend implements ---------------------------------------------

    def is_tensor(self, obj: Any) -> bool:
        """Whether ``obj`` is a tensor of this framework."""
        raise NotImplementedError

    def to_numpy(self, t: Any) -> np.ndarray:
        """The tensor as a numpy array (no copy where the framework allows)."""
        raise NotImplementedError

    def from_numpy(self, a: np.ndarray) -> Any:
        """A tensor sharing ``a``'s memory where the framework allows."""
        raise NotImplementedError

    def differentiable_rows(self, rows: np.ndarray, on_grad: OnGrad) -> Any:
        """"Rows in, row gradients out": a tensor holding ``rows`` (``float32 [U, dim]``)
        that takes part in autograd; its backward pass calls ``on_grad(grad)`` with the
        gradient as float32 numpy ``[U, dim]`` and returns no gradient to any input.
        Outside training (no gradient recorded) a plain tensor is fine. A framework
        without autograd returns the rows as a tensor and never calls ``on_grad``.
        """
        raise NotImplementedError

    def schedule_flush(self, callback: Callable[[], None]) -> bool:
        """Arrange for ``callback()`` to run once the running backward pass has ended.

        Called from inside ``on_grad`` (so during a backward pass). Return False when
        the framework has no such point (the default): the core then pushes a step's
        gradients before the next pull of each table and on ``wait_pushes`` / ``close``,
        which is just as exact, only later.
        """
        return False

    def gather(self, t: Any, index: np.ndarray) -> Any:
        """``t[index]`` along the first axis (differentiable)."""
        raise NotImplementedError

    def append_zero_row(self, t: Any) -> Any:
        """``t`` with one row of zeros appended (the padding row)."""
        raise NotImplementedError

    def scale_rows(self, t: Any, weights: Any) -> Any:
        """``t * weights[:, None]``; ``weights`` is numpy or a tensor of this framework."""
        raise NotImplementedError

    def segment_sum(self, t: Any, segments: np.ndarray, num_segments: int) -> Any:
        """Sum of the rows of ``t`` per segment, ``[num_segments, dim]``."""
        raise NotImplementedError

    def reshape(self, t: Any, shape: Sequence[int]) -> Any:
        """``t`` reshaped."""
        raise NotImplementedError

    # --- the core, written once ---------------------------------------------------------

    def ids_to_numpy(self, ids: Any) -> np.ndarray:
        """Ids (a tensor of this framework, an array or a sequence) as numpy."""
        return self.to_numpy(ids) if self.is_tensor(ids) else np.asarray(ids)

    def rows_tensor(self, remote: RemoteTable, unique_ids: np.ndarray, rows: np.ndarray) -> Any:
        """Differentiable rows of ``unique_ids`` whose gradient goes to ``remote``'s
        gradient buffer, flushed at this backend's flush point."""
        client = remote.client

        def on_grad(grad: np.ndarray) -> None:
            remote.add_gradients(unique_ids, grad)
            self.schedule_flush(lambda: remote.buffer.flush(client))

        return self.differentiable_rows(_writable(rows), on_grad)

    def lookup(self, remote: RemoteTable, ids: Any) -> Any:
        """Differentiable lookup of ``ids`` (any shape) in ``remote`` →
        ``ids.shape + (dim,)``; padding ids give zeros and no gradient."""
        plan, rows = remote.lookup(self.ids_to_numpy(ids))
        return self.place(self.rows_tensor(remote, plan.unique_ids, rows), plan)

    def lookup_bags(self, remote: RemoteTable, ids: Any, offsets: Any = None, *,
                    combiner: str = "sum", per_sample_weights: Any = None,
                    include_last_offset: bool = False) -> Any:
        """Differentiable bag lookup in ``remote`` (``nn.EmbeddingBag`` semantics) →
        ``[bags, dim]``; see :func:`xdl.lookup.plan_bags` for the layouts."""
        plan, rows = remote.lookup_bags(
            self.ids_to_numpy(ids), None if offsets is None else self.ids_to_numpy(offsets),
            combiner=combiner, include_last_offset=include_last_offset)
        unique_rows = self.rows_tensor(remote, plan.lookup.unique_ids, rows)
        return self.combine(unique_rows, plan, per_sample_weights=per_sample_weights)

    def place(self, unique_rows: Any, plan: LookupPlan) -> Any:
        """Rows of every looked-up id, ``plan.shape + (dim,)``, from the unique rows."""
        if plan.has_padding:
            unique_rows = self.append_zero_row(unique_rows)
        out = self.gather(unique_rows, plan.inverse)
        return self.reshape(out, (*plan.shape, -1))

    def pull_rows(
        self,
        client: SparseClient,
        table: str,
        unique_ids: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        on_push: OnPush | None = None,
    ) -> Any:
        """Differentiable rows of ``unique_ids`` ``[U, dim]`` without a
        :class:`~xdl.lookup.RemoteTable`: pulled unless given; their gradient goes to the
        process-wide gradient buffer and ``on_push`` gets the push's ticket."""
        if rows is None:
            rows = client.pull(table, unique_ids, unique=True)
        buffer = default_buffer()

        def on_grad(grad: np.ndarray) -> None:
            if len(unique_ids):
                buffer.add(client, table, unique_ids, grad, on_push=on_push)
                self.schedule_flush(lambda: buffer.flush(client))

        return self.differentiable_rows(_writable(rows), on_grad)

    def embedding(
        self,
        client: SparseClient,
        table: str,
        ids: Any,
        *,
        padding_idx: int | None = None,
        rows: np.ndarray | None = None,
        on_push: OnPush | None = None,
    ) -> Any:
        """Differentiable lookup of ``ids`` (any shape) → ``ids.shape + (dim,)``, straight
        on a client and table (no id range check, no prefetch; see :meth:`lookup`).

        Ids are de-duplicated once; ids equal to ``padding_idx`` give zeros and no
        gradient. ``rows``, when given, are the already pulled rows of the plan's
        unique ids.
        """
        plan = plan_lookup(as_ids(self.ids_to_numpy(ids)), padding_idx)
        unique_rows = self.pull_rows(client, table, plan.unique_ids, rows=rows, on_push=on_push)
        return self.place(unique_rows, plan)

    def embedding_bag(
        self,
        client: SparseClient,
        table: str,
        ids: Any,
        offsets: Any = None,
        *,
        mode: str = "sum",
        padding_idx: int | None = None,
        per_sample_weights: Any = None,
        include_last_offset: bool = False,
        rows: np.ndarray | None = None,
        on_push: OnPush | None = None,
    ) -> Any:
        """Differentiable bag lookup (``nn.EmbeddingBag`` semantics) → ``[bags, dim]``,
        straight on a client and table (see :meth:`lookup_bags`).

        ``mode`` is the combiner (torch's name); see :func:`plan_bags` for the layouts;
        ``per_sample_weights`` (same shape as ``ids``) only with ``mode="sum"``.
        """
        plan = plan_bags(as_ids(self.ids_to_numpy(ids)),
                         None if offsets is None else as_ids(self.ids_to_numpy(offsets)),
                         mode=mode, padding_idx=padding_idx,
                         include_last_offset=include_last_offset)
        unique_rows = self.pull_rows(client, table, plan.lookup.unique_ids, rows=rows,
                                     on_push=on_push)
        return self.combine(unique_rows, plan, per_sample_weights=per_sample_weights)

    def combine(self, rows: Any, plan: BagPlan, *, per_sample_weights: Any = None) -> Any:
        """Combine the unique ``rows`` of ``plan.lookup`` into bags (sum / mean / sqrtn).

        :param rows: tensor ``[U, dim]``, the rows of ``plan.lookup.unique_ids``.
        :param plan: from :func:`plan_bags` (inverse index, bag per id, coefficients).
        :param per_sample_weights: optional weight per input id (``mode="sum"`` only).
        """
        values = self.gather(rows, plan.lookup.inverse)
        if per_sample_weights is not None:
            if plan.coef is not None:
                raise InvalidArgumentError("per_sample_weights are only supported with mode='sum'")
            flat_w = self.reshape(per_sample_weights, (-1,))
            values = self.scale_rows(values, self.gather(flat_w, plan.kept))
        elif plan.coef is not None:
            values = self.scale_rows(values, plan.coef)
        return self.segment_sum(values, plan.bag, plan.num_bags)

    def expand(self, tensor: Any, indicator: Any) -> Any:
        """Gather group rows to samples: row ``indicator[i]`` of ``tensor`` for sample i."""
        return self.gather(tensor, as_ids(self.ids_to_numpy(indicator)).reshape(-1))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _writable(rows: np.ndarray) -> np.ndarray:
    # rows decoded from a message may be read-only buffers; frameworks want writable memory
    a = np.asarray(rows, dtype=np.float32)
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, dtype=np.float32)
