"""Numba kernels of a shard: the key → row hash index, row arenas, gathers, push marking.

**The index** is open addressing with linear probing. A slot is 12 bytes, key and row
side by side (``uint32[3]``: key low half, key high half, row code), so a probe that
hits costs one cache line. The row code is ``row + 2``: 0 marks an empty slot and 1 a
tombstone, so keys may be any int64 (negative, 0, ``INT64_MIN``) and rows go up to
:data:`MAX_ROWS`. A key's home slot is ``(hash32 * capacity) >> 32`` (multiply-shift
range reduction), so the capacity need not be a power of two and the index grows by
about 1.45 × instead of doubling. Live keys + tombstones stay under :data:`MAX_LOAD`
of the slots; a rehash (which drops tombstones) sizes the index to :data:`REHASH_LOAD`.
That keeps the index at 15–22 bytes per key. Lookups prefetch the home slot of the key
:data:`PREFETCH_AHEAD` positions later, so cache misses of consecutive keys overlap.

**Rows** are allocated from a :class:`RowPool`: freed rows are recycled first (a stack),
then fresh rows up to the pool's capacity. The kernels stop when the index or the pool
is full and the Python wrappers grow them and resume, so no Python loop runs per key.

**Arenas** (:class:`Arena`) are 2-D arrays on anonymous private memory maps. They grow
in place with ``mremap``: no copy, and peak memory does not double while a table grows
(pages are resident only once written). They ask for transparent huge pages.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
from numba import njit

from xdl.errors import InvalidArgumentError
from xdl.memtune import tune_malloc
from xdl.sharding import all_finite, prefetch_row, put_rows, splitmix64, take_rows

EMPTY = np.uint8(0)
FULL = np.uint8(1)
TOMB = np.uint8(2)
#: live keys + tombstones stay at or under this share of the index's slots
MAX_LOAD = 0.8
#: a rehash that has to grow the index sizes it so that live keys fill this share
REHASH_LOAD = 0.55
#: rows per table per shard: row codes are uint32, 0 and 1 are reserved
MAX_ROWS = 2**32 - 3
#: keys ahead whose home slot a lookup prefetches
PREFETCH_AHEAD = 16
_MAX_SLOTS = 2**32 - 1

__all__ = [
    "EMPTY",
    "FULL",
    "TOMB",
    "MAX_LOAD",
    "REHASH_LOAD",
    "MAX_ROWS",
    "Arena",
    "HashIndex",
    "RowPool",
    "all_finite",
    "fill_rows",
    "first_duplicate",
    "gather_rows",
    "home_slots",
    "mark_pushed_rows",
    "prefetch_rows",
    "reset_meta",
    "scatter_rows",
    "touch_rows",
    "tune_allocator",
    "unmark_pushed_rows",
]


@njit(cache=True, inline="always")
def _slot_hash(key: np.int64) -> np.uint64:
    # SplitMix64's finalizer over the key xor a constant, so the bits used here are
    # unrelated to the high bits that pick the key's shard bucket (xdl.sharding.mix64).
    return splitmix64(np.uint64(key) ^ np.uint64(0x9E3779B97F4A7C15))


@njit(cache=True, inline="always")
def _home(key: np.int64, cap: np.uint64) -> np.int64:
    return np.int64(((_slot_hash(key) >> np.uint64(32)) * cap) >> np.uint64(32))


@njit(cache=True, inline="always")
def _probe(t: np.ndarray, key: np.int64, h: int) -> tuple[int, int]:
    """(slot of ``key`` or of the empty slot ending its chain, first tombstone or -1)."""
    cap = t.shape[0]
    u = np.uint64(key)
    lo = np.uint32(u & np.uint64(0xFFFFFFFF))
    hi = np.uint32(u >> np.uint64(32))
    first_tomb = -1
    while True:
        code = t[h, 2]
        if code == 0:
            return h, first_tomb
        if code == 1:
            if first_tomb < 0:
                first_tomb = h
        elif t[h, 0] == lo and t[h, 1] == hi:
            return h, first_tomb
        h += 1
        if h == cap:
            h = 0


@njit(cache=True, inline="always")
def _put(t: np.ndarray, h: np.int64, key: np.int64, row: np.int64) -> None:
    u = np.uint64(key)
    t[h, 0] = np.uint32(u & np.uint64(0xFFFFFFFF))
    t[h, 1] = np.uint32(u >> np.uint64(32))
    t[h, 2] = np.uint32(row + 2)


@njit(cache=True)
def _lookup(t: np.ndarray, keys: np.ndarray, out: np.ndarray) -> int:
    """Row of each key into ``out`` (-1 where absent); returns how many are absent."""
    cap = np.uint64(t.shape[0])
    n = keys.shape[0]
    absent = 0
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            prefetch_row(t, _home(keys[i + PREFETCH_AHEAD], cap))
        k = keys[i]
        h, _ = _probe(t, k, _home(k, cap))
        code = t[h, 2]
        if code == 0:
            out[i] = -1
            absent += 1
        else:
            out[i] = np.int64(code) - 2
    return absent


@njit(cache=True)
def _lookup_gather(t: np.ndarray, keys: np.ndarray, values: np.ndarray, rows: np.ndarray,
                   out: np.ndarray) -> int:
    """Rows of ``keys`` into ``rows`` and their values into ``out``, pipelined: the home
    slot of key i + 2D and the value row of key i + D are requested while row i is
    copied (D = :data:`PREFETCH_AHEAD`). Stops at the first absent key and returns its
    position (rows and ``out`` are then incomplete), else -1."""
    cap = np.uint64(t.shape[0])
    n = keys.shape[0]
    dim = values.shape[1]
    flat = values.reshape(-1)
    d = PREFETCH_AHEAD
    for i in range(min(d, n)):  # fill the pipeline: rows of the first D keys
        prefetch_row(t, _home(keys[i], cap))
    for i in range(min(d, n)):
        h, _ = _probe(t, keys[i], _home(keys[i], cap))
        code = t[h, 2]
        if code == 0:
            return i
        rows[i] = np.int64(code) - 2
        prefetch_row(flat, rows[i] * dim)
    for i in range(n):
        j = i + d
        if j + d < n:
            prefetch_row(t, _home(keys[j + d], cap))
        if j < n:
            h, _ = _probe(t, keys[j], _home(keys[j], cap))
            code = t[h, 2]
            if code == 0:
                return j
            r = np.int64(code) - 2
            rows[j] = r
            for c in range(0, dim, 16):
                prefetch_row(flat, r * dim + c)
        src = values[rows[i]]
        dst = out[i]
        for c in range(dim):
            dst[c] = src[c]
    return -1


@njit(cache=True)
def _lookup_or_insert(t: np.ndarray, keys: np.ndarray, out_rows: np.ndarray,
                      inserted: np.ndarray, start: int, size: int, tombs: int, max_fill: int,
                      free: np.ndarray, n_free: int, next_row: int, row_cap: int
                      ) -> tuple[int, int, int, int, int, int]:
    """Resolve keys[start:]; stop at the first key that needs a larger index or pool.

    Returns (stop, size, tombs, n_free, next_row, reason) with reason 0 = done,
    1 = index full, 2 = row pool empty.
    """
    cap = np.uint64(t.shape[0])
    n = keys.shape[0]
    for i in range(start, n):
        if i + PREFETCH_AHEAD < n:
            prefetch_row(t, _home(keys[i + PREFETCH_AHEAD], cap))
        k = keys[i]
        h, first_tomb = _probe(t, k, _home(k, cap))
        code = t[h, 2]
        if code != 0:
            out_rows[i] = np.int64(code) - 2
            inserted[i] = False
            continue
        if first_tomb < 0 and size + tombs + 1 > max_fill:
            return i, size, tombs, n_free, next_row, 1
        if n_free == 0 and next_row >= row_cap:
            return i, size, tombs, n_free, next_row, 2
        row = np.int64(next_row)
        if n_free > 0:
            n_free -= 1
            row = free[n_free]
        else:
            next_row += 1
        if first_tomb >= 0:
            h = first_tomb
            tombs -= 1
        _put(t, h, k, row)
        size += 1
        out_rows[i] = row
        inserted[i] = True
    return n, size, tombs, n_free, next_row, 0


@njit(cache=True)
def _delete(t: np.ndarray, keys: np.ndarray, free: np.ndarray, n_free: int) -> tuple[int, int]:
    """Tombstone each present key and push its row on the free stack.

    Returns (removed, n_free). ``free`` must have room for every live row.
    """
    cap = np.uint64(t.shape[0])
    removed = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        h, _ = _probe(t, k, _home(k, cap))
        code = t[h, 2]
        if code != 0:
            t[h, 2] = 1
            free[n_free] = np.int64(code) - 2
            n_free += 1
            removed += 1
    return removed, n_free


@njit(cache=True)
def _rehash(t: np.ndarray, new: np.ndarray) -> None:
    cap = new.shape[0]
    ucap = np.uint64(cap)
    for j in range(t.shape[0]):
        if t[j, 2] < 2:
            continue
        k = np.int64(np.uint64(t[j, 0]) | (np.uint64(t[j, 1]) << np.uint64(32)))
        h = _home(k, ucap)
        while new[h, 2] != 0:
            h += 1
            if h == cap:
                h = 0
        new[h, 0] = t[j, 0]
        new[h, 1] = t[j, 1]
        new[h, 2] = t[j, 2]


@njit(cache=True)
def _items(t: np.ndarray, keys: np.ndarray, rows: np.ndarray) -> int:
    n = 0
    for j in range(t.shape[0]):
        if t[j, 2] >= 2:
            keys[n] = np.int64(np.uint64(t[j, 0]) | (np.uint64(t[j, 1]) << np.uint64(32)))
            rows[n] = np.int64(t[j, 2]) - 2
            n += 1
    return n


@njit(cache=True)
def _state(t: np.ndarray, out: np.ndarray) -> None:
    for j in range(t.shape[0]):
        c = t[j, 2]
        out[j] = 0 if c == 0 else (2 if c == 1 else 1)


@njit(cache=True)
def _homes(keys: np.ndarray, cap: int, out: np.ndarray) -> None:
    ucap = np.uint64(cap)
    for i in range(keys.shape[0]):
        out[i] = _home(keys[i], ucap)


@njit(cache=True)
def _first_duplicate(keys: np.ndarray) -> int:
    n = keys.shape[0]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    seen = np.empty(cap, dtype=np.int64)
    used = np.zeros(cap, dtype=np.uint8)
    mask = np.uint64(cap - 1)
    for i in range(n):
        k = keys[i]
        h = np.int64(_slot_hash(k) & mask)
        while used[h]:
            if seen[h] == k:
                return i
            h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
        used[h] = 1
        seen[h] = k
    return -1


_FREQ_MAX = np.uint32(2**32 - 1)


@njit(cache=True)
def _touch(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray, step: int) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        f = freq[r]
        if f < _FREQ_MAX:
            freq[r] = f + 1
        last_step[r] = step


@njit(cache=True)
def _mark_pushed(t: np.ndarray, keys: np.ndarray, rows: np.ndarray, freq: np.ndarray,
                 last_step: np.ndarray, saved: np.ndarray, step: int) -> tuple[int, int]:
    """The lookup pass of a push: find each key's row, check no row is named twice, and
    mark it (``last_step = step``, ``freq += 1``).

    Returns (absent keys, index of the first repeated key or -1). On a repeat, every
    mark is undone before returning, so nothing has changed.
    """
    absent = _lookup(t, keys, rows)
    # rows are known now: prefetching their metadata ahead lets the misses overlap
    n = keys.shape[0]
    for i in range(n):
        if i + PREFETCH_AHEAD < n:
            q = rows[i + PREFETCH_AHEAD]
            if q >= 0:
                prefetch_row(last_step, q)
                prefetch_row(freq, q)
        r = rows[i]
        if r < 0:
            continue
        old = last_step[r]
        if old == step:
            for j in range(i):
                q = rows[j]
                if q >= 0:
                    last_step[q] = saved[j]
                    if freq[q] < _FREQ_MAX:  # saturated counts stay saturated
                        freq[q] -= 1
            return absent, i
        saved[i] = old
        last_step[r] = step
        f = freq[r]
        if f < _FREQ_MAX:
            freq[r] = f + 1
    return absent, -1


@njit(cache=True)
def _unmark(rows: np.ndarray, freq: np.ndarray, last_step: np.ndarray, saved: np.ndarray
            ) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            last_step[r] = saved[i]
            if freq[r] < _FREQ_MAX:
                freq[r] -= 1


def unmark_pushed_rows(rows: np.ndarray, freq: np.ndarray, last_step: np.ndarray,
                       saved: np.ndarray) -> None:
    """Undo :func:`mark_pushed_rows` for the rows ``>= 0`` in ``rows`` (a push that
    failed after its lookup pass)."""
    _unmark(rows, freq, last_step, saved)


@njit(cache=True)
def _prefetch_rows(flat: np.ndarray, width: int, rows: np.ndarray) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            continue
        for j in range(0, width, 16):  # one prefetch per 64-byte line of float32
            prefetch_row(flat, r * width + j)


def prefetch_rows(arrays: tuple[np.ndarray, ...], rows: np.ndarray) -> None:
    """Start loading every cache line of ``rows`` (skipping negatives) of each float32
    C-contiguous 2-D array in ``arrays``.

    A push's optimizer pass does enough arithmetic per row that the CPU overlaps only
    two or three rows' cache misses; issuing a block's loads first in a tight loop lets
    them all overlap (measured: Adagrad over 65,536 random rows of a 1 M-row dim-16
    table takes half the time in blocks behind this)."""
    for a in arrays:
        _prefetch_rows(a.reshape(-1), a.shape[1], rows)


@njit(cache=True)
def _fill_rows(a: np.ndarray, rows: np.ndarray, value: np.float32) -> None:
    w = a.shape[1]
    for i in range(rows.shape[0]):
        r = a[rows[i]]
        for j in range(w):
            r[j] = value


@njit(cache=True)
def _reset_meta(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray) -> None:
    for i in range(rows.shape[0]):
        freq[rows[i]] = 0
        last_step[rows[i]] = 0


def fill_rows(a: np.ndarray, rows: np.ndarray, value: float) -> None:
    """``a[rows] = value`` for a C-contiguous float32 2-D ``a`` (one compiled pass)."""
    _fill_rows(a, np.ascontiguousarray(rows, dtype=np.int64), np.float32(value))


def reset_meta(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray) -> None:
    """``freq[rows] = 0`` and ``last_step[rows] = 0`` in one pass."""
    _reset_meta(freq, last_step, np.ascontiguousarray(rows, dtype=np.int64))


def touch_rows(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray, step: int) -> None:
    """``freq[rows] += 1`` (saturating for uint32 counts) and ``last_step[rows] = step``
    in one pass (rows unique)."""
    _touch(freq, last_step, np.ascontiguousarray(rows, dtype=np.int64), int(step))


def mark_pushed_rows(index: HashIndex, keys: np.ndarray, rows: np.ndarray, freq: np.ndarray,
                     last_step: np.ndarray, saved: np.ndarray, step: int) -> tuple[int, int]:
    """The lookup pass of a push, with the duplicate check and the metadata update fused.

    :param keys: int64 keys of the push.
    :param rows: int64 ``[len(keys)]`` out: each key's row, -1 where absent.
    :param saved: int64 scratch ``[len(keys)]`` (old ``last_step`` values, for undo).
    :param step: the push's step; a row whose ``last_step`` already equals it was
        named twice.
    :returns: ``(absent, first_repeat)``: how many keys are absent, and the position of
        the first key that repeats an earlier present key (-1 if none; then nothing
        was changed).
    """
    absent, dup = _mark_pushed(index.slots, keys, rows, freq, last_step, saved, int(step))
    return int(absent), int(dup)


def first_duplicate(keys: np.ndarray) -> int:
    """Index of the first key that already appeared earlier in ``keys``, or -1 (O(n))."""
    return int(_first_duplicate(np.ascontiguousarray(keys, dtype=np.int64)))


@njit(cache=True)
def _first_duplicate_parts(keys: np.ndarray, counts: np.ndarray) -> int:
    # one open-addressing set reused by every part: a slot counts as used only when it
    # carries the current part's stamp, so nothing is cleared between parts
    largest = 0
    for t in range(counts.shape[0]):
        largest = max(largest, counts[t])
    cap = 16
    while cap < 2 * largest:
        cap *= 2
    seen = np.empty(cap, dtype=np.int64)
    stamp = np.zeros(cap, dtype=np.int64)
    mask = np.uint64(cap - 1)
    off = 0
    for t in range(counts.shape[0]):
        mark = t + 1
        for i in range(off, off + counts[t]):
            k = keys[i]
            h = np.int64(_slot_hash(k) & mask)
            while stamp[h] == mark:
                if seen[h] == k:
                    return i
                h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
            stamp[h] = mark
            seen[h] = k
        off += counts[t]
    return -1


def first_duplicate_parts(keys: np.ndarray, counts: np.ndarray) -> int:
    """:func:`first_duplicate` within each part of ``keys`` (part t: the next
    ``counts[t]`` keys) in one call: index in ``keys`` of the first key that already
    appeared earlier in its own part, or -1."""
    return int(_first_duplicate_parts(np.ascontiguousarray(keys, dtype=np.int64),
                                      np.ascontiguousarray(counts, dtype=np.int64)))


def gather_rows(values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None
                ) -> np.ndarray:
    """``values[rows]`` into ``out`` when given, else as a new contiguous array (rows
    must be valid)."""
    return take_rows(values, rows, out)


def scatter_rows(values: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    """``values[rows] = src`` in place (the last write wins for repeated rows)."""
    put_rows(values, rows, src)


def home_slots(keys: np.ndarray, capacity: int) -> np.ndarray:
    """Home slot of each key in an index of ``capacity`` slots (int64; for tests and
    diagnostics)."""
    k = np.ascontiguousarray(keys, dtype=np.int64)
    out = np.empty(k.shape[0], dtype=np.int64)
    _homes(k, int(capacity), out)
    return out



def tune_allocator() -> bool:
    """Let glibc's malloc reuse freed blocks of up to 32 MiB instead of unmapping them
    (:func:`xdl.memtune.tune_malloc`): a shard's per-request buffers (decoded frames,
    gathered rows, 0.5-16 MiB) would otherwise be page-faulted in afresh on every
    request; measured here, a fresh 4 MiB array costs about 1.7 ms of faults before a
    byte of work. Process-wide and idempotent; a no-op (returns False) off glibc or
    when ``XDL_TUNE_MALLOC=0``.
    """
    return tune_malloc()


def _advise_huge(m: mmap.mmap) -> None:
    # Transparent huge pages where the system leaves it to madvise (numpy does the same
    # for its large arrays): random row access then misses the TLB far less often.
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and len(m) >= 4 << 20:
        try:
            m.madvise(advice)
        except OSError:
            pass


class Arena:
    """A growable C-contiguous ``[rows, width]`` (or ``[rows]``) array on an anonymous
    private mapping.

    :meth:`grow` resizes the mapping in place (``mremap``): rows are not copied and
    new pages cost memory only once written. If a view of :attr:`array` is still held
    elsewhere the mapping cannot move, and the rows are copied to a new mapping instead.

    :param rows: initial row capacity.
    :param width: elements per row; ``None`` for a 1-D array.
    :param dtype: element type.
    """

    def __init__(self, rows: int, width: int | None, dtype: np.dtype | type):
        self.dtype = np.dtype(dtype)
        self._vector = width is None
        self.width = 1 if width is None else int(width)
        self._row_bytes = self.width * self.dtype.itemsize
        self._map = self._new_map(int(rows))
        self.rows = int(rows)
        self.array = self._view()

    def _new_map(self, rows: int) -> mmap.mmap:
        size = max(mmap.PAGESIZE, rows * self._row_bytes)
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise_huge(m)
        return m

    def _view(self) -> np.ndarray:
        flat = np.frombuffer(self._map, dtype=self.dtype,
                             count=self.rows * self.width)
        return flat if self._vector else flat.reshape(self.rows, self.width)

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` rows (>= the current capacity); new rows read as 0."""
        rows = int(rows)
        if rows <= self.rows:
            return
        size = max(mmap.PAGESIZE, rows * self._row_bytes)
        self.array = None  # type: ignore[assignment]
        try:
            self._map.resize(size)
            _advise_huge(self._map)
        except BufferError:  # someone holds a view: copy to a new mapping instead
            old = np.frombuffer(self._map, dtype=self.dtype, count=self.rows * self.width)
            new_map = self._new_map(rows)
            np.frombuffer(new_map, dtype=self.dtype, count=old.size)[:] = old
            self._map = new_map
        self.rows = rows
        self.array = self._view()

    @property
    def nbytes(self) -> int:
        """Bytes the array spans (pages are resident only once written)."""
        return int(self.rows * self._row_bytes)


class RowPool:
    """Row numbers of an arena: a stack of freed rows, then fresh rows up to ``capacity``.

    :param capacity: rows the arena has now.
    :param grow: called with the number of rows wanted when the pool runs dry; it must
        enlarge the arena and return the new capacity (> the old one).
    """

    def __init__(self, capacity: int, grow: Callable[[int], int]):
        self.capacity = int(capacity)
        self.next_row = 0
        self.free = np.empty(self.capacity, dtype=np.int64)
        self.n_free = 0
        self._grow = grow

    def _enlarge(self, wanted: int) -> None:
        if wanted > MAX_ROWS:
            raise InvalidArgumentError(
                f"a table holds at most {MAX_ROWS} rows per shard, {wanted} wanted; "
                f"add shards or delete keys")
        new_cap = int(self._grow(wanted))
        if new_cap <= self.capacity:
            raise RuntimeError(f"row pool grow callback returned {new_cap} <= {self.capacity}")
        free = np.empty(new_cap, dtype=np.int64)
        free[: self.n_free] = self.free[: self.n_free]
        self.free = free
        self.capacity = new_cap

    @property
    def nbytes(self) -> int:
        """Bytes held by the free stack."""
        return int(self.free.nbytes)


class HashIndex:
    """Open-addressing int64 key → row index: 12-byte slots, linear probing.

    :param capacity: initial slot count (at least 8).
    """

    def __init__(self, capacity: int = 1024):
        cap = max(8, int(capacity))
        #: ``uint32 [capacity, 3]``: key low half, key high half, row + 2 (0 empty, 1 tombstone)
        self.slots = np.zeros((cap, 3), dtype=np.uint32)
        self.size = 0
        self.tombs = 0
        self.rehashes = 0

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return int(self.slots.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the slot array."""
        return int(self.slots.nbytes)

    @property
    def state(self) -> np.ndarray:
        """Occupancy of each slot (:data:`EMPTY`, :data:`FULL`, :data:`TOMB`), as a new
        uint8 array (for tests and diagnostics)."""
        out = np.empty(self.capacity, dtype=np.uint8)
        _state(self.slots, out)
        return out

    def _max_fill(self) -> int:
        return int(self.capacity * MAX_LOAD)

    def rehash(self, min_live: int = 0) -> None:
        """Rebuild without tombstones; grow (never shrink) so that ``max(size,
        min_live)`` keys fill :data:`REHASH_LOAD` of the slots when they would fill more
        than half of the current ones."""
        need = max(self.size, int(min_live))
        cap = self.capacity
        if need > cap * 0.5:
            cap = max(cap, int(need / REHASH_LOAD) + 1)
        if cap > _MAX_SLOTS:
            raise InvalidArgumentError(f"a table's index holds at most {_MAX_SLOTS} slots "
                                       f"per shard; add shards")
        new = np.zeros((cap, 3), dtype=np.uint32)
        _rehash(self.slots, new)
        self.slots = new
        self.tombs = 0
        self.rehashes += 1

    def lookup(self, keys: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Row of each key, -1 where absent (int64 ``[n]``, into ``out`` when given)."""
        k = np.ascontiguousarray(keys, dtype=np.int64)
        if out is None:
            out = np.empty(k.shape[0], dtype=np.int64)
        _lookup(self.slots, k, out)
        return out

    def lookup_gather(self, keys: np.ndarray, values: np.ndarray, rows: np.ndarray,
                      out: np.ndarray) -> int:
        """Rows of int64 ``keys`` into ``rows`` and ``values[rows]`` into ``out`` in one
        pipelined pass. Returns -1, or the position of the first absent key (then
        ``rows`` and ``out`` are incomplete)."""
        return int(_lookup_gather(self.slots, keys, values, rows, out))

    def find(self, keys: np.ndarray, out: np.ndarray) -> int:
        """Rows of int64 ``keys`` into ``out`` (-1 where absent); returns how many are
        absent."""
        return int(_lookup(self.slots, keys, out))

    def lookup_or_insert(self, keys: np.ndarray, pool: RowPool) -> tuple[np.ndarray, np.ndarray]:
        """Row of each key, inserting absent keys with rows taken from ``pool``.

        A key repeated in ``keys`` is inserted once; later copies find it.
        Returns ``(rows int64 [n], inserted bool [n])``.
        """
        k = np.ascontiguousarray(keys, dtype=np.int64)
        n = k.shape[0]
        rows = np.empty(n, dtype=np.int64)
        inserted = np.zeros(n, dtype=np.bool_)
        start = 0
        while True:
            stop, self.size, self.tombs, pool.n_free, pool.next_row, reason = _lookup_or_insert(
                self.slots, k, rows, inserted, start, self.size, self.tombs, self._max_fill(),
                pool.free, pool.n_free, pool.next_row, pool.capacity)
            if reason == 0:
                return rows, inserted
            if reason == 1:
                self.rehash(self.size + 1)
            else:
                pool._enlarge(pool.next_row + (n - stop))
            start = stop

    def delete(self, keys: np.ndarray, pool: RowPool) -> int:
        """Remove the keys present (absent ones are ignored), recycling their rows into
        ``pool``. Returns how many were removed."""
        removed, pool.n_free = _delete(self.slots, np.ascontiguousarray(keys, dtype=np.int64),
                                       pool.free, pool.n_free)
        self.size -= removed
        self.tombs += removed
        if self.size + self.tombs > self._max_fill():
            self.rehash()
        return int(removed)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, rows)`` of every live entry, in slot order."""
        keys = np.empty(self.size, dtype=np.int64)
        rows = np.empty(self.size, dtype=np.int64)
        _items(self.slots, keys, rows)
        return keys, rows
