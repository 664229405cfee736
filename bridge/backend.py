"""The framework backend base class and the framework-neutral lookup core.

A backend (one per framework, see :mod:`xdl.backends`) implements a handful of tensor
primitives (convert, gather, scale, segment-sum, and the differentiable pull of unique
rows). Everything else, written once here, is plain numpy on the ids:

* de-duplication (``np.unique(return_inverse=True)``): each id is pulled and pushed
  once per step; the inverse index gathers rows back inside the framework, so the
  framework's own autograd sums the gradients of repeated ids;
* padding ids, offsets (as ``nn.EmbeddingBag``) or padded 2-D ids → bag index per id;
* combiner coefficients for ``sum`` / ``mean`` / ``sqrtn``.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from .errors import BackendNotAvailableError, InvalidArgumentError

#: combiners understood by :meth:`Backend.combine`.
COMBINERS = ("sum", "mean", "sqrtn")


class SparseClient(Protocol):
    """What the lookup core needs from a parameter-server client (``xdl.Client``)."""

    def pull(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in table ``name``, float32 ``[len(ids), dim]``."""
        ...

    def push(self, name: str, ids: np.ndarray, grads: np.ndarray) -> Any:
        """Push gradients of unique ``ids``; returns a ticket."""
        ...

    def wait(self, ticket: Any = None) -> Any:
        """Block until ``ticket`` (or every outstanding push) is acknowledged."""
        ...


class PushLog(Protocol):
    """Optional part of a client (``xdl.Client`` has it): which ids were pushed when.

    Exact prefetch uses it to re-pull only the prefetched rows a later push touched; a
    client without it gets every prefetched row pulled again before use.
    """

    def push_mark(self, table: str) -> int:
        """Number of pushes to ``table`` issued so far (all already sent)."""
        ...

    def pushed_since(self, table: str, mark: int) -> np.ndarray | None:
        """Sorted unique ids pushed to ``table`` after ``mark``; None if unknown."""
        ...


class PushTracker:
    """Outstanding push tickets per table, so a later pull can wait for them.

    Pushes are asynchronous. Waiting for a table's pushes before its next pull makes
    training through the server step-for-step identical to local training. A prefetch
    skips the wait and lets the next pull overlap the push; an exact prefetch then
    re-pulls the rows the push touched (see :class:`PushLog`), a stale one is at most
    one step behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, list[Any]] = {}

    def add(self, table: str, ticket: Any) -> None:
        """Remember ``ticket`` as an outstanding push to ``table``."""
        if ticket is None:
            return
        with self._lock:
            self._pending.setdefault(table, []).append(ticket)

    def wait(self, client: SparseClient, table: str | None = None) -> None:
        """Wait for the outstanding pushes to ``table`` (every table when None)."""
        with self._lock:
            if table is None:
                tickets = [t for ts in self._pending.values() for t in ts]
                self._pending.clear()
            else:
                tickets = self._pending.pop(table, [])
        for ticket in tickets:
            client.wait(ticket)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(ts) for ts in self._pending.values())


@dataclass(frozen=True)
class LookupPlan:
    """De-duplicated ids of one lookup.

    ``rows_ext = rows(unique_ids)`` plus, when ``has_padding``, one zero row appended
    at index ``len(unique_ids)``; ``rows_ext[inverse]`` is the lookup of every id.
    """

    unique_ids: np.ndarray  #: int64 [U], sorted, without the padding id
    inverse: np.ndarray  #: int64 [n]: row of each (flattened) id in ``rows_ext``
    shape: tuple[int, ...]  #: the ids' shape
    has_padding: bool  #: whether some id is the padding id (→ zero row)


@dataclass(frozen=True)
class BagPlan:
    """How the ids of a bag lookup combine into ``num_bags`` bags."""

    lookup: LookupPlan  #: plan over the kept ids only (padding ids dropped)
    kept: np.ndarray  #: int64 [k]: position of each kept id in the flattened input
    bag: np.ndarray  #: int64 [k]: bag of each kept id
    coef: np.ndarray | None  #: float32 [k] combiner weight (None: all ones, ``sum``)
    num_bags: int


def as_ids(ids: Any) -> np.ndarray:
    """Ids as a contiguous int64 numpy array (framework tensors via ``numpy()``)."""
    if hasattr(ids, "detach"):  # torch tensor; avoids importing torch here
        ids = ids.detach().cpu().numpy()
    elif hasattr(ids, "numpy") and not isinstance(ids, np.ndarray):
        ids = ids.numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def plan_lookup(ids: np.ndarray, padding_idx: int | None = None) -> LookupPlan:
    """De-duplicate ``ids`` once; ids equal to ``padding_idx`` map to a zero row."""
    flat = ids.reshape(-1)
    unique, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    has_padding = False
    if padding_idx is not None:
        pos = int(np.searchsorted(unique, padding_idx))
        if pos < len(unique) and unique[pos] == padding_idx:
            has_padding = True
            unique = np.delete(unique, pos)
            # ids after the padding id move down one row; the padding id → the zero row
            is_pad = inverse == pos
            inverse = inverse - (inverse > pos)
            inverse[is_pad] = len(unique)
    return LookupPlan(unique.astype(np.int64, copy=False), inverse, tuple(ids.shape), has_padding)


def plan_bags(
    ids: np.ndarray,
    offsets: np.ndarray | None = None,
    *,
    mode: str = "sum",
    padding_idx: int | None = None,
    include_last_offset: bool = False,
) -> BagPlan:
    """Bag layout of ``ids``: 1-D ids with ``offsets`` (``nn.EmbeddingBag`` style) or
    2-D padded ids ``[bags, length]`` (each row one bag; ``padding_idx`` entries dropped).

    ``mean`` divides by the number of kept ids of the bag, ``sqrtn`` by its square root;
    an empty bag is all zeros.
    """
    if mode not in COMBINERS:
        raise InvalidArgumentError(f"combiner must be one of {COMBINERS}, got {mode!r}")
    if ids.ndim == 2:
        if offsets is not None:
            raise InvalidArgumentError("offsets must be None when ids are 2-D (padded bags)")
        num_bags, length = ids.shape
        bag = np.repeat(np.arange(num_bags, dtype=np.int64), length)
    elif ids.ndim == 1:
        if offsets is None:
            raise InvalidArgumentError("1-D ids need offsets (start of each bag)")
        offsets = as_ids(offsets).reshape(-1)
        n = len(ids)
        if include_last_offset:
            if len(offsets) < 1 or offsets[-1] != n:
                raise InvalidArgumentError(
                    f"with include_last_offset the last offset must equal len(ids) = {n}")
            offsets = offsets[:-1]
        if len(offsets) == 0 or offsets[0] != 0:
            raise InvalidArgumentError("offsets must start with 0")
        if np.any(np.diff(offsets) < 0) or offsets[-1] > n:
            raise InvalidArgumentError(
                f"offsets must be non-decreasing and <= len(ids) = {n}")
        num_bags = len(offsets)
        bag = np.searchsorted(offsets, np.arange(n, dtype=np.int64), side="right") - 1
    else:
        raise InvalidArgumentError(f"bag ids must be 1-D or 2-D, got shape {ids.shape}")
    flat = ids.reshape(-1)
    if padding_idx is not None:
        kept = np.flatnonzero(flat != padding_idx)
        flat, bag = flat[kept], bag[kept]
    else:
        kept = np.arange(len(flat), dtype=np.int64)
    coef: np.ndarray | None = None
    if mode != "sum":
        counts = np.bincount(bag, minlength=num_bags).astype(np.float32)
        norm = counts if mode == "mean" else np.sqrt(counts)
        coef = (1.0 / norm[bag]).astype(np.float32)
    return BagPlan(plan_lookup(flat), kept, bag.astype(np.int64), coef, int(num_bags))


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

    def pull_rows(
        self,
        client: SparseClient,
        table: str,
        unique_ids: np.ndarray,
        *,
        rows: np.ndarray | None = None,
        on_push: Callable[[Any], None] | None = None,
    ) -> Any:
        """Differentiable rows of ``unique_ids`` ``[U, dim]``: the forward pass pulls them
        (or uses the already pulled ``rows``), the backward pass pushes their gradient
        and hands the push's ticket to ``on_push``.
        """
        raise NotImplementedError

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

    def embedding(
        self,
        client: SparseClient,
        table: str,
        ids: Any,
        *,
        padding_idx: int | None = None,
        rows: np.ndarray | None = None,
        on_push: Callable[[Any], None] | None = None,
    ) -> Any:
        """Differentiable lookup of ``ids`` (any shape) → ``ids.shape + (dim,)``.

        Ids are de-duplicated once; ids equal to ``padding_idx`` give zeros and no
        gradient. ``rows``, when given, are the already pulled rows of the plan's
        unique ids (prefetch).
        """
        plan = plan_lookup(as_ids(ids), padding_idx)
        return self.embedding_from_plan(client, table, plan, rows=rows, on_push=on_push)

    def embedding_from_plan(
        self,
        client: SparseClient,
        table: str,
        plan: LookupPlan,
        *,
        rows: np.ndarray | None = None,
        on_push: Callable[[Any], None] | None = None,
    ) -> Any:
        """:meth:`embedding` for an already computed :class:`LookupPlan`."""
        unique_rows = self.pull_rows(client, table, plan.unique_ids, rows=rows, on_push=on_push)
        if plan.has_padding:
            unique_rows = self.append_zero_row(unique_rows)
        out = self.gather(unique_rows, plan.inverse)
        return self.reshape(out, (*plan.shape, -1))

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
        on_push: Callable[[Any], None] | None = None,
    ) -> Any:
        """Differentiable bag lookup (``nn.EmbeddingBag`` semantics) → ``[bags, dim]``.

        See :func:`plan_bags` for the layouts; ``per_sample_weights`` (same shape as
        ``ids``) only with ``mode="sum"``.
        """
        plan = plan_bags(as_ids(ids), None if offsets is None else as_ids(offsets), mode=mode,
                         padding_idx=padding_idx, include_last_offset=include_last_offset)
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
        return self.gather(tensor, as_ids(indicator).reshape(-1))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
