"""The remote table: ids checked and de-duplicated once, exact prefetch, pull, row plans.

Framework-neutral (numpy and threads only); every backend and adapter builds on it:

* :func:`check_ids` / :func:`dedup`: ids validated (integer dtype, uint64 < 2**63, range
  in index mode) and de-duplicated **once** per lookup; the client is then told the ids
  are unique (``pull(..., unique=True)``) and does not de-duplicate again;
* :func:`plan_lookup` / :func:`plan_bags`: where each looked-up id finds its row
  (inverse index, padding row, bags and ``sum`` / ``mean`` / ``sqrtn`` coefficients);
* :class:`RemoteTable`: one table as a layer sees it: ``lookup(ids) -> (plan, rows)``
  and ``add_gradients(unique_ids, grads)``, the two numpy-level entry points a host
  callback needs (``tf.numpy_function``, an MXNet custom operator), plus exact
  prefetch of coming batches.

Unique ids come in **first-occurrence order** (see :mod:`xdl.dedup`), not sorted;
nothing here relies on sorted uniques.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numba import njit

from .dedup import unique_inverse
from .errors import InvalidArgumentError
from .gradients import GradientBuffer, default_buffer

#: id modes: ``index`` ids are row numbers ``0 <= id < num_rows`` (checked); ``hash``
#: ids are raw int64 feature hashes.
ID_MODES = ("index", "hash")
#: combiners of bag lookups.
COMBINERS = ("sum", "mean", "sqrtn")
_I64_MAX = np.iinfo(np.int64).max
_MAX_PREFETCH = 8  # prefetched lookups kept unconsumed at most (oldest dropped)
#: a prefetch's state: (push mark the rows are exact at, rows, positions not yet pulled)
_Rows = tuple["int | None", np.ndarray, "np.ndarray | None"]


class SparseClient(Protocol):
    """What the lookup core needs from a parameter-server client (``xdl.Client``)."""

    def pull(self, name: str, ids: np.ndarray, *, unique: bool = False) -> np.ndarray:
        """Rows of ``ids`` in table ``name``, float32 ``[len(ids), dim]``."""
        ...

    def push(self, name: str, ids: np.ndarray, grads: np.ndarray, *,
             unique: bool = False) -> Any:
        """Push gradients of ``ids``; returns a ticket."""
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


# --------------------------------------------------------------------------- ids


def _unique_inverse(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique, inverse)`` of 1-D int64 ids; uniques in first-occurrence order (one
    compiled O(n) pass, :func:`xdl.dedup.unique_inverse`)."""
    return unique_inverse(flat)


def as_ids(ids: Any) -> np.ndarray:
    """Ids as a contiguous int64 numpy array, shape kept.

    Accepts numpy arrays, sequences and framework tensors (anything with ``numpy()``;
    torch tensors through ``detach()``), refuses non-integer dtypes and uint64 ids that
    an int64 cannot hold (>= 2**63).
    """
    if hasattr(ids, "detach"):  # torch tensor; avoids importing torch here
        ids = ids.detach().cpu().numpy()
    elif hasattr(ids, "asnumpy"):  # mxnet NDArray
        ids = ids.asnumpy()
    elif hasattr(ids, "numpy") and not isinstance(ids, np.ndarray):
        ids = ids.numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"ids must be integers, got dtype {arr.dtype}; cast them to int64 (hash string "
            "features to int64 first)")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _I64_MAX:
        raise InvalidArgumentError(
            f"uint64 id {int(arr.max())} does not fit an int64 id (>= 2**63); reinterpret "
            "the ids with .view(np.int64)")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_ids(ids: Any, *, id_mode: str = "hash", num_rows: int | None = None,
              table: str | None = None, what: str = "layer") -> np.ndarray:
    """Validated int64 ids (shape kept): see :func:`as_ids`; in ``index`` mode also
    ``0 <= id < num_rows``.

    :param what: names the layer in the error message.
    """
    arr = as_ids(ids)
    if id_mode == "index" and num_rows is not None and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(
                f"id {bad} out of range for {what} with num_embeddings={num_rows} (index "
                f"mode needs 0 <= id < {num_rows}; use id_mode='hash' for raw feature "
                "hashes)", table=table)
    return arr


@dataclass(frozen=True)
class LookupPlan:
    """De-duplicated ids of one lookup.

    ``rows_ext = rows(unique_ids)`` plus, when ``has_padding``, one zero row appended
    at index ``len(unique_ids)``; ``rows_ext[inverse]`` is the lookup of every id.
    """

    unique_ids: np.ndarray  #: int64 [U], first-occurrence order, without the padding id
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


def plan_lookup(ids: np.ndarray, padding_idx: int | None = None) -> LookupPlan:
    """De-duplicate int64 ``ids`` once; ids equal to ``padding_idx`` map to a zero row."""
    flat = ids.reshape(-1)
    unique, inverse = _unique_inverse(flat)
    inverse = inverse.reshape(-1)
    has_padding = False
    if padding_idx is not None and unique.size:
        hit = np.flatnonzero(unique == padding_idx)
        if hit.size:
            pos = int(hit[0])
            has_padding = True
            unique = np.delete(unique, pos)
            # ids after the padding id move down one row; the padding id → the zero row
            is_pad = inverse == pos
            inverse = inverse - (inverse > pos)
            inverse[is_pad] = len(unique)
    return LookupPlan(unique.astype(np.int64, copy=False), inverse.astype(np.int64, copy=False),
                      tuple(ids.shape), has_padding)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing, as xdl.dedup


@njit(cache=True)
def _plan_parts(flat: np.ndarray, starts: np.ndarray, pad: np.ndarray, use_pad: np.ndarray,
                uniq: np.ndarray, inverse: np.ndarray, counts: np.ndarray,
                lo: np.ndarray, hi: np.ndarray, padded_out: np.ndarray
                ) -> None:  # pragma: no cover (compiled)
    """De-duplicate each part ``flat[starts[p]:starts[p + 1]]`` on its own, in one pass.

    Part p's uniques (first-occurrence order, its padding id left out) go to
    ``uniq[starts[p]:starts[p] + counts[p]]``; each id's ``inverse`` is its position
    among them (a padding id: ``counts[p]``, the zero row); ``lo`` / ``hi`` get the
    part's smallest / largest id (padding included, as :func:`check_ids` sees them);
    ``padded_out[p]`` whether the padding id occurred.
    One hash table serves every part: a slot belongs to part p only while its stamp is
    p + 1, so nothing is cleared between parts.
    """
    parts = starts.shape[0] - 1
    longest = 1
    for p in range(parts):
        longest = max(longest, starts[p + 1] - starts[p])
    bits = 4
    while (1 << bits) < 4 * longest:
        bits += 1
    slots = np.empty(1 << bits, dtype=np.int32)
    stamp = np.zeros(1 << bits, dtype=np.int32)
    for p in range(parts):
        s, e = starts[p], starts[p + 1]
        pbits = 4
        while (1 << pbits) < 4 * (e - s):
            pbits += 1
        shift = np.uint64(64 - pbits)
        mask = np.uint64((1 << pbits) - 1)
        gen = p + 1
        nu = 0
        padded = use_pad[p]
        padding = pad[p]
        hit = False
        smallest = flat[s] if e > s else 0
        largest = smallest
        for i in range(s, e):
            k = flat[i]
            smallest = min(smallest, k)
            largest = max(largest, k)
            if padded and k == padding:
                inverse[i] = -1
                hit = True
                continue
            h = (np.uint64(k) * _GOLDEN) >> shift
            while True:
                if stamp[h] != gen:
                    stamp[h] = gen
                    slots[h] = nu
                    uniq[s + nu] = k
                    inverse[i] = nu
                    nu += 1
                    break
                q = slots[h]
                if uniq[s + q] == k:
                    inverse[i] = q
                    break
                h = (h + np.uint64(1)) & mask
        if hit:
            for i in range(s, e):
                if inverse[i] < 0:
                    inverse[i] = nu
        counts[p] = nu
        padded_out[p] = hit
        lo[p] = smallest
        hi[p] = largest


def plan_many(remotes: Sequence[RemoteTable], ids: Sequence[np.ndarray]
              ) -> list[LookupPlan | None]:
    """:meth:`RemoteTable.plan` of several lookups at once (``ids[i]`` in
    ``remotes[i]``, int64 numpy of any shape), de-duplicated in one compiled pass.

    Same plans as one :meth:`RemoteTable.plan` each; a lookup whose ids fail the check
    (out of range in index mode) gets None, and its own :meth:`RemoteTable.plan` raises
    the error that names it.
    """
    count = len(ids)
    if not count:
        return []
    arrays: list[np.ndarray | None] = []
    for given in ids:
        a: np.ndarray | None = np.asarray(given)
        if a is not None and a.dtype != np.int64:
            try:
                a = as_ids(a)
            except InvalidArgumentError:
                a = None  # not ids: the lookup's own plan raises the error
        arrays.append(a)
    sizes = np.fromiter((0 if a is None else a.size for a in arrays), dtype=np.int64,
                        count=count)
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays if a is not None] or
                          [np.zeros(0, dtype=np.int64)])
    pads = [r.padding_idx for r in remotes]
    use_pad = np.fromiter((p is not None for p in pads), dtype=np.bool_, count=count)
    pad = np.fromiter((0 if p is None else p for p in pads), dtype=np.int64, count=count)
    uniq = np.empty(flat.size, dtype=np.int64)
    inverse = np.empty(flat.size, dtype=np.int64)
    counts = np.empty(count, dtype=np.int64)
    lo = np.empty(count, dtype=np.int64)
    hi = np.empty(count, dtype=np.int64)
    padded = np.empty(count, dtype=np.bool_)
    _plan_parts(flat, starts, pad, use_pad, uniq, inverse, counts, lo, hi, padded)
    index_mode = np.fromiter((r.id_mode == "index" and r.num_rows is not None
                              for r in remotes), dtype=np.bool_, count=count)
    limit = np.fromiter((r.num_rows if r.num_rows is not None else 0 for r in remotes),
                        dtype=np.int64, count=count)
    bad = index_mode & (sizes > 0) & ((lo < 0) | (hi >= limit))
    plans: list[LookupPlan | None] = []
    for i, part in enumerate(arrays):
        if part is None or bad[i]:
            plans.append(None)
            continue
        s, e, u = int(starts[i]), int(starts[i + 1]), int(counts[i])
        plans.append(LookupPlan(uniq[s:s + u], inverse[s:e], tuple(part.shape),
                                bool(padded[i])))
    return plans


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

    ``mode`` is the combiner: ``mean`` divides by the number of kept ids of the bag,
    ``sqrtn`` by its square root; an empty bag is all zeros.
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


def _member(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Bool mask: which of ``ids`` (any order) are in ``sorted_ids`` (sorted)."""
    if not sorted_ids.size or not ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.searchsorted(sorted_ids, ids)
    np.minimum(pos, sorted_ids.size - 1, out=pos)
    return sorted_ids[pos] == ids


class _Prefetched:
    """One prefetched lookup: its unique ids and the future of ``(mark, rows)``; when
    its pull waits for the coming push, the :class:`_Deferred` group that sends it."""

    __slots__ = ("deferred", "exact", "future", "unique")

    def __init__(self, unique: np.ndarray, future: Future[_Rows], exact: bool) -> None:
        self.unique = unique
        self.future = future
        self.exact = exact
        self.deferred: _Deferred | None = None


class _Deferred:
    """A :func:`prefetch_many` group whose pull waits for the coming push of its tables.

    Exact prefetch of batch t+1, asked for while batch t's lookups are still to come,
    would pull rows that batch t's push then makes stale (and pull them again after
    it). Instead the group's one ``pull_many`` is sent right after that push (when the
    last table it waits for is pushed: :meth:`pushed`), on the same sockets, so a shard
    applies it after the push: exact, one request per shard per step. A lookup that
    comes first sends it itself (:meth:`fire` ``now``).
    """

    def __init__(self, remotes: list[RemoteTable], uniques: list[np.ndarray],
                 futures: list[Future[_Rows]], exact: bool, waiting: set[str]) -> None:
        self.remotes = remotes
        self.uniques = uniques
        self.futures = futures
        self.exact = exact
        self.waiting = waiting
        self.fired = False
        self._lock = threading.Lock()
        # without a push log the pull cannot rely on request order: wait for the pushes
        self.wait = getattr(remotes[0].client, "push_mark", None) is None

    def pushed(self, table: str) -> None:
        """``table`` was pushed: send the pull once every awaited table was."""
        with self._lock:
            self.waiting.discard(table)
            ready = not self.waiting
        if ready:
            self.fire()

    def fire(self, *, now: bool = False) -> None:
        """Send the pull (once): in the prefetch thread, or ``now`` in this thread."""
        with self._lock:
            if self.fired:
                return
            self.fired = True
        for remote in {id(r): r for r in self.remotes}.values():  # no push will fire it now
            with remote._prefetch_lock:
                if self in remote._deferred:
                    remote._deferred.remove(self)
        if now:
            _pull_group(self.remotes, self.uniques, self.futures, self.exact, wait=self.wait)
            return
        try:
            self.remotes[0]._prefetch_executor().submit(
                _pull_group, self.remotes, self.uniques, self.futures, self.exact,
                wait=self.wait)
        except RuntimeError as exc:  # the table was closed meanwhile
            for future in self.futures:
                if not future.done():
                    future.set_exception(exc)


# ----------------------------------------------------------------------- the table


class RemoteTable:
    """One parameter-server table as a layer sees it.

    Holds the client, the table name, how ids are checked (``id_mode``, ``num_rows``),
    the padding id, and the prefetch state. Every lookup goes: ids checked and
    de-duplicated once (:meth:`plan` / :meth:`plan_bags`) → rows of the unique ids,
    prefetched or pulled (:meth:`rows`) → the backend gathers / combines them. A
    lookup's row gradients go to :meth:`add_gradients` (the step's
    :class:`~xdl.gradients.GradientBuffer`), merged with the step's other lookups of the
    same table and pushed once, when the backend's flush point fires or, at the
    latest, before this table's next pull.

    No framework is imported: a host callback (``tf.numpy_function``, an MXNet custom
    operator) calls :meth:`lookup` and :meth:`add_gradients` with numpy arrays.

    :param client: an ``xdl.Client`` (or any :class:`SparseClient`).
    :param table: table name (the table must exist).
    :param dim: row width.
    :param id_mode: ``"index"`` (ids are row numbers, checked against ``num_rows``) or
        ``"hash"`` (raw int64 feature hashes).
    :param num_rows: rows of an index-mode table (``num_embeddings``).
    :param padding_idx: id whose lookup is a zero row with no gradient (negative counts
        from ``num_rows``).
    :param sync_push: before a pull, wait for this table's outstanding pushes (training
        then matches local training step for step); prefetched rows skip the wait
        (exact prefetch re-pulls the rows those pushes touched instead).
    :param buffer: the gradient buffer (default: the process-wide one).
    :param name: names the layer in error messages.
    """

    def __init__(self, client: SparseClient, table: str, dim: int, *, id_mode: str = "index",
                 num_rows: int | None = None, padding_idx: int | None = None,
                 sync_push: bool = True, buffer: GradientBuffer | None = None,
                 name: str = "layer") -> None:
        if id_mode not in ID_MODES:
            raise InvalidArgumentError(f"id_mode must be one of {ID_MODES}, got {id_mode!r}",
                                       table=table)
        if id_mode == "index" and num_rows is None:
            raise InvalidArgumentError("an index-mode table needs num_rows", table=table)
        if padding_idx is not None and padding_idx < 0:
            if num_rows is None:
                raise InvalidArgumentError("a negative padding_idx needs num_rows", table=table)
            padding_idx += num_rows
        self.client = client
        self.table = table
        self.dim = int(dim)
        self.id_mode = id_mode
        self.num_rows = num_rows
        self.padding_idx = padding_idx
        self.sync_push = sync_push
        self.buffer = buffer if buffer is not None else default_buffer()
        self.name = name
        self._prefetched: deque[_Prefetched] = deque()
        self._deferred: list[_Deferred] = []  # groups waiting for this table's next push
        self._prefetch_lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return (f"RemoteTable({self.table!r}, dim={self.dim}, id_mode={self.id_mode!r}"
                f"{'' if self.num_rows is None else f', num_rows={self.num_rows}'})")

    # -- ids -----------------------------------------------------------------------------

    def check_ids(self, ids: Any) -> np.ndarray:
        """``ids`` as validated int64 numpy (shape kept); see :func:`check_ids`."""
        return check_ids(ids, id_mode=self.id_mode, num_rows=self.num_rows, table=self.table,
                         what=self.name)

    def plan(self, ids: Any) -> LookupPlan:
        """Check and de-duplicate ``ids`` (any shape) once: a :class:`LookupPlan`."""
        return plan_lookup(self.check_ids(ids), self.padding_idx)

    def plan_bags(self, ids: Any, offsets: Any = None, *, combiner: str = "sum",
                  include_last_offset: bool = False) -> BagPlan:
        """Check ``ids`` and lay them out in bags (see :func:`plan_bags`)."""
        return plan_bags(self.check_ids(ids), None if offsets is None else as_ids(offsets),
                         mode=combiner, padding_idx=self.padding_idx,
                         include_last_offset=include_last_offset)

    def _unique(self, ids: Any) -> np.ndarray:
        return self.plan(ids).unique_ids

    # -- rows ----------------------------------------------------------------------------

    def rows(self, unique_ids: np.ndarray) -> np.ndarray:
        """Rows ``float32 [U, dim]`` of ``unique_ids``: prefetched ones when a prefetch of
        exactly these ids is pending, else pulled (after flushing this table's buffered
        gradients and, with ``sync_push``, waiting for its pushes)."""
        self.buffer.flush(self.client, self.table)
        rows = self._prefetched_rows(unique_ids)
        if rows is None:
            if self.sync_push:
                self.buffer.wait(self.client, self.table)
            rows = self._pull(unique_ids)
        return rows

    def lookup(self, ids: Any) -> tuple[LookupPlan, np.ndarray]:
        """Numpy-level lookup: ``(plan, rows of plan.unique_ids)``.

        The output of the lookup is ``rows_ext[plan.inverse].reshape(*plan.shape, dim)``
        with ``rows_ext`` the rows plus a zero row when ``plan.has_padding``.
        """
        plan = self.plan(ids)
        return plan, self.rows(plan.unique_ids)

    def lookup_bags(self, ids: Any, offsets: Any = None, *, combiner: str = "sum",
                    include_last_offset: bool = False) -> tuple[BagPlan, np.ndarray]:
        """Numpy-level bag lookup: ``(bag plan, rows of plan.lookup.unique_ids)``."""
        plan = self.plan_bags(ids, offsets, combiner=combiner,
                              include_last_offset=include_last_offset)
        return plan, self.rows(plan.lookup.unique_ids)

    def exact_rows(self, unique_ids: np.ndarray, mark: int | None, rows: np.ndarray
                   ) -> np.ndarray:
        """``rows`` of ``unique_ids`` pulled at push mark ``mark`` (:func:`pull_now`),
        made exact for a lookup now: this table's buffered gradients are pushed first, and
        the rows pushes since ``mark`` touched are pulled again (none, usually)."""
        self.buffer.flush(self.client, self.table)
        if mark is not None and self._push_mark() == mark:
            return rows
        return self._patch(unique_ids, mark, rows, None)[1]

    def add_gradients(self, unique_ids: np.ndarray, grads: np.ndarray) -> None:
        """Hand a lookup's row gradients ``[U, dim]`` (of ``unique_ids``) to the step's
        gradient buffer; pushed, summed with the step's other lookups of this table, at
        the backend's flush point or before this table's next pull."""
        if len(unique_ids):
            self.buffer.add(self.client, self.table, unique_ids, grads,
                            on_push=self._on_push)

    def flush(self) -> None:
        """Push every buffered gradient of this table's client now (one push per table)."""
        self.buffer.flush(self.client)

    def _pull(self, unique_ids: np.ndarray) -> np.ndarray:
        return _pull_unique(self.client, self.table, unique_ids, self.dim)

    def _on_push(self, ticket: Any) -> None:
        self._refresh_prefetched()
        with self._prefetch_lock:
            deferred, self._deferred = self._deferred, []
        for group in deferred:  # their pulls go out after this push
            group.pushed(self.table)

    @property
    def push_callback(self) -> Any:
        """``on_push`` for :meth:`GradientBuffer.add` of this table's gradients: the
        same object every time (so that the buffer keeps one per table)."""
        callback = self.__dict__.get("_push_callback")
        if callback is None:
            callback = self._push_callback = self._on_push
        return callback

    # -- prefetch ------------------------------------------------------------------------

    def prefetch(self, ids: Any, *, exact: bool = True) -> object:
        """Pull the rows of ``ids`` (a coming batch) in a background thread; returns a
        handle for :meth:`discard_prefetches`.

        The next lookup whose unique ids equal these uses the prefetched rows instead
        of pulling (a layer called several times per step takes one prefetch per call).

        :param exact: (default) the rows are exactly what a pull in the forward would
            give, so training with prefetch equals training without it. The pull
            records the table's push mark (``client.push_mark``) and leaves out the ids
            of this table's other pending prefetches (the batch computing now will push
            them). Every later push of this table then pulls, in the background right
            after the push is sent, the rows left out and the prefetched rows that push
            touched (``client.pushed_since``); the lookup checks once more and pulls
            what is still missing or stale (everything when the client's push log no
            longer reaches back). Requests to one shard are applied in order, so a pull
            sent after a push sees it. With ``exact=False`` every row is pulled at once
            and never again: the background pull waits for the pushes already issued,
            so prefetched rows miss at most the pushes made after ``prefetch`` was
            called (prefetching batch t+1 while batch t computes makes batch t+1 at most
            one step stale).
        """
        unique = self._unique(ids)
        with self._prefetch_lock:
            pending = [e.unique for e in self._prefetched] if exact else []
            future = self._prefetch_executor().submit(self._pull_after_pushes, unique, exact,
                                                      pending)
            entry = _Prefetched(unique, future, exact)
            self._add_prefetched(entry)
        return entry

    def discard_prefetches(self, handles: Sequence[object]) -> int:
        """Forget the prefetches of ``handles`` (from :meth:`prefetch` or
        :func:`prefetch_many`) that no lookup has consumed; returns how many were dropped.
        An unconsumed exact prefetch is re-pulled after every push of the table, so a
        caller that prefetched for a lookup that did not happen drops it here."""
        wanted = {id(h) for h in handles}
        with self._prefetch_lock:
            kept = [e for e in self._prefetched if id(e) not in wanted]
            dropped = len(self._prefetched) - len(kept)
            if dropped:
                self._prefetched = deque(kept)
        return dropped

    def _prefetch_executor(self) -> ThreadPoolExecutor:
        with self._prefetch_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"xdl-prefetch-{self.table}")
            return self._executor

    def _add_prefetched(self, entry: _Prefetched) -> None:
        with self._prefetch_lock:
            self._prefetch_executor()  # so that pushes refresh the entry
            self._prefetched.append(entry)
            while len(self._prefetched) > _MAX_PREFETCH:
                self._prefetched.popleft()

    def _push_mark(self) -> int | None:
        mark = getattr(self.client, "push_mark", None)
        return None if mark is None else int(mark(self.table))

    def _pull_after_pushes(self, unique: np.ndarray, exact: bool,
                           pending: list[np.ndarray]) -> _Rows:
        self.buffer.wait(self.client, self.table)
        if not exact:
            return None, self._pull(unique), None
        mark = self._push_mark()
        if mark is not None and pending and unique.size:
            # ids the pending lookups share will be pushed before this one is used:
            # pull them after that push (in _patch), not twice
            later = _member(unique, np.unique(np.concatenate(pending)))
            if later.any():
                rows = np.empty((unique.size, self.dim), dtype=np.float32)
                now = np.flatnonzero(~later)
                if now.size:
                    rows[now] = self._pull(unique[now])
                return mark, rows, np.flatnonzero(later)
        return mark, self._pull(unique), None

    def _refresh_prefetched(self) -> None:
        """After a push of this table: pull, in the background, the rows of the exact
        prefetches that the push touched or that were left out, so that the next
        lookup rarely waits."""
        with self._prefetch_lock:
            if self._executor is None:
                return
            for entry in self._prefetched:
                # a group still waiting for this push pulls after it: nothing to refresh
                if entry.exact and (entry.deferred is None or entry.deferred.fired):
                    entry.future = self._executor.submit(self._refreshed, entry.unique,
                                                         entry.future)

    def _refreshed(self, unique: np.ndarray, previous: Future[_Rows]) -> _Rows:
        return self._patch(unique, *previous.result())  # done: one thread, tasks in order

    def _patch(self, unique: np.ndarray, mark: int | None, rows: np.ndarray,
               missing: np.ndarray | None) -> _Rows:
        """Pull the rows of ``unique`` pushed since ``mark`` and the ``missing`` ones
        (row positions); returns the new mark, the rows, and None (nothing missing)."""
        now = self._push_mark()  # pushes up to here are on the sockets before the pull
        pushed_since = getattr(self.client, "pushed_since", None)
        since = None if mark is None or pushed_since is None else pushed_since(self.table, mark)
        if since is None:  # unknown: the client keeps no log, or it was truncated
            return now, self._pull(unique), None
        need = np.flatnonzero(_member(unique, since))
        if missing is not None and missing.size:
            need = np.union1d(need, missing)
        if need.size:
            if not rows.flags.writeable:
                rows = rows.copy()
            rows[need] = self._pull(unique[need])
        return now, rows, None

    def _prefetched_rows(self, unique: np.ndarray) -> np.ndarray | None:
        """Prefetched rows for ``unique``, or None."""
        entry = None
        with self._prefetch_lock:
            for i, candidate in enumerate(self._prefetched):
                if np.array_equal(candidate.unique, unique):
                    entry = candidate
                    del self._prefetched[i]
                    break
        if entry is None:
            return None
        if entry.deferred is not None:
            entry.deferred.fire(now=True)  # the awaited push did not come (yet)
        mark, rows, missing = entry.future.result()
        if entry.exact:  # pushes since the last refresh (a shared table, a truncated log)
            _, rows, _ = self._patch(unique, mark, rows, missing)
        return rows

    @property
    def pending_prefetches(self) -> int:
        """Number of prefetched lookups not consumed yet."""
        with self._prefetch_lock:
            return len(self._prefetched)

    def wait_pushes(self) -> None:
        """Push what is buffered for this table and wait until its pushes are applied."""
        self.buffer.flush(self.client, self.table)
        self.buffer.wait(self.client, self.table)

    def close(self) -> None:
        """Flush and wait for this table's pushes and stop the prefetch thread."""
        with self._prefetch_lock:
            executor, self._executor = self._executor, None
            self._prefetched.clear()
            self._deferred.clear()
        if executor is not None:
            executor.shutdown(wait=True)
        self.wait_pushes()


def prefetch_many(requests: Sequence[tuple[RemoteTable, Any]], *, exact: bool = True,
                  plans: Sequence[LookupPlan] | None = None,
                  background: bool = True) -> list[object]:
    """Prefetch several lookups at once: ``[(remote table, ids), ...]`` of a coming batch.

    Lookups on one client are pulled together, in the background, with one
    ``client.pull_many`` call (one request per shard for every table; a table named
    twice is pulled once), instead of one round trip per table; each lookup then finds
    its rows as after :meth:`RemoteTable.prefetch`. With ``exact=True`` (default) the
    rows are exact as there: each table's push mark is taken before the pull, and every
    later push of the table re-pulls the prefetched rows it touched. When some of the
    tables have prefetched lookups still to come (a training loop prefetching batch t+1
    before batch t runs), the pull waits for the push of those tables and is sent right
    behind it instead (a shard applies it after the push), so nothing is re-pulled; a
    lookup that comes before that push sends the pull itself. A client without
    ``pull_many``, or a single lookup, goes through :meth:`RemoteTable.prefetch`.

    :param plans: the requests' ids already checked and de-duplicated
        (:meth:`RemoteTable.plan`), one per request; their ``unique_ids`` are pulled.
    :param background: False: pull now, in the calling thread (for lookups about to
        run, as :class:`~xdl.adapters.torch_nn.StepPull` does: no thread is started).

    Returns one handle per request, in order (for :meth:`RemoteTable.discard_prefetches`).
    """
    handles: dict[int, object] = {}  # position in requests → handle
    groups: dict[int, list[tuple[int, RemoteTable, Any]]] = {}
    for pos, (remote, ids) in enumerate(requests):
        groups.setdefault(id(remote.client), []).append((pos, remote, ids))
    for group in groups.values():
        client = group[0][1].client
        if (len(group) == 1 and background) or not hasattr(client, "pull_many"):
            for pos, remote, ids in group:
                handles[pos] = remote.prefetch(ids if plans is None else plans[pos].unique_ids,
                                               exact=exact)
            continue
        uniques = [remote._unique(ids) if plans is None else plans[pos].unique_ids
                   for pos, remote, ids in group]
        remotes = [r for _, r, _ in group]
        # exact, with lookups of these tables still to come (the running step's): its
        # push will make rows stale, so the pull waits for that push (see _Deferred)
        waiting = ({r.table for r in remotes if r.pending_prefetches}
                   if exact and background else set())
        futures: list[Future[_Rows]] = []
        entries: list[_Prefetched] = []
        for (pos, remote, _), unique in zip(group, uniques, strict=True):
            future: Future[_Rows] = Future()
            entry = _Prefetched(unique, future, exact)
            remote._add_prefetched(entry)
            handles[pos] = entry
            futures.append(future)
            entries.append(entry)
        if waiting:
            deferred = _Deferred(remotes, uniques, futures, exact, waiting)
            for entry in entries:
                entry.deferred = deferred
            for remote in {id(r): r for r in remotes if r.table in waiting}.values():
                with remote._prefetch_lock:
                    remote._deferred.append(deferred)
        elif background:
            remotes[0]._prefetch_executor().submit(_pull_group, remotes, uniques, futures,
                                                   exact)
        else:
            _pull_group(remotes, uniques, futures, exact)
    return [handles[pos] for pos in range(len(requests))]


def pull_now(lookups: Sequence[tuple[RemoteTable, np.ndarray]], *, wait: bool = True
             ) -> list[tuple[int | None, np.ndarray]]:
    """Rows of several lookups' unique ids, pulled now with one ``client.pull_many`` per
    client (one request per shard for every table; a table named twice pulled once),
    after the tables' buffered gradients are pushed and their pushes applied. Returns,
    per lookup, ``(push mark, rows)`` for :meth:`RemoteTable.exact_rows`.

    :param wait: wait for the tables' pushes to be acknowledged before pulling. False
        sends the pull right behind them instead, on a client with a push log
        (:class:`PushLog`, as ``xdl.Client``): a shard applies one client's requests in
        the order they were sent, so the pull sees every push issued before it (exact,
        one round trip less); a client without a push log is always waited for."""
    out: dict[int, tuple[int | None, np.ndarray]] = {}
    groups: dict[int, list[int]] = {}
    for pos, (remote, _) in enumerate(lookups):
        groups.setdefault(id(remote.client), []).append(pos)
    for where in groups.values():
        remotes = [lookups[i][0] for i in where]
        uniques = [lookups[i][1] for i in where]
        client = remotes[0].client
        if not hasattr(client, "pull_many"):
            for i, remote, unique in zip(where, remotes, uniques, strict=True):
                remote.wait_pushes()
                out[i] = (remote._push_mark(), remote._pull(unique))
            continue
        for buffer in {id(r.buffer): r.buffer for r in remotes}.values():
            buffer.flush(client)
        futures: list[Future[_Rows]] = [Future() for _ in where]
        _pull_group(remotes, uniques, futures, True,
                    wait=wait or getattr(client, "push_mark", None) is None)
        for i, future in zip(where, futures, strict=True):
            mark, rows, _ = future.result()
            out[i] = (mark, rows)
    return [out[pos] for pos in range(len(lookups))]


def _pull_group(remotes: list[RemoteTable], uniques: list[np.ndarray],
                futures: list[Future[_Rows]], exact: bool, *, wait: bool = True) -> None:
    """The background half of :func:`prefetch_many`: one ``pull_many``, results split
    (``wait=False``: the tables' pushes are not waited for, see :func:`pull_now`)."""
    try:
        client = remotes[0].client
        tables: dict[str, list[int]] = {}  # table → positions in remotes
        for i, remote in enumerate(remotes):
            tables.setdefault(remote.table, []).append(i)
        marks: dict[str, int | None] = {}
        for table, where in tables.items():
            if wait:
                remotes[where[0]].buffer.wait(client, table)  # as RemoteTable.prefetch does
            marks[table] = remotes[where[0]]._push_mark() if exact else None
        request: dict[str, np.ndarray] = {}
        splits: dict[str, tuple[np.ndarray, list[int]]] = {}
        for table, where in tables.items():
            if len(where) == 1:
                request[table] = uniques[where[0]]
            else:  # the same table looked up twice: pull the union once
                request[table], inverse = _unique_inverse(
                    np.concatenate([uniques[i] for i in where]))
                splits[table] = (inverse, [uniques[i].size for i in where])
        wanted = {t: ids for t, ids in request.items() if ids.size}
        rows = client.pull_many(wanted, unique=True) if wanted else {}  # type: ignore[attr-defined]
        for table, where in tables.items():
            dim = remotes[where[0]].dim
            got = rows.get(table, np.zeros((0, dim), dtype=np.float32))
            if table not in splits:
                futures[where[0]].set_result((marks[table], got, None))
                continue
            inverse, sizes = splits[table]
            start = 0
            for i, size in zip(where, sizes, strict=True):
                part = got[inverse[start:start + size]]
                futures[i].set_result((marks[table], part, None))
                start += size
    except BaseException as exc:  # the lookups raise it when they take their rows
        for future in futures:
            if not future.done():
                future.set_exception(exc)


def _pull_unique(client: SparseClient, table: str, unique_ids: np.ndarray,
                 dim: int) -> np.ndarray:
    """``client.pull`` of ids known to be unique (the client skips its own dedup)."""
    if not unique_ids.size:
        return np.zeros((0, dim), dtype=np.float32)
    return client.pull(table, unique_ids, unique=True)


__all__ = [
    "COMBINERS",
    "ID_MODES",
    "BagPlan",
    "LookupPlan",
    "PushLog",
    "RemoteTable",
    "SparseClient",
    "as_ids",
    "check_ids",
    "plan_bags",
    "plan_lookup",
    "plan_many",
    "prefetch_many",
    "pull_now",
]
