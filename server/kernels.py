"""Numba kernels of a shard: the key → row hash index, row gather/scatter, duplicate checks.

The index is open addressing with linear probing over a power-of-two table. Keys may be
any int64 (negative, 0, ``INT64_MIN``), so slot occupancy lives in a separate ``state``
array (:data:`EMPTY`, :data:`FULL`, :data:`TOMB`) instead of a sentinel key. Deletion
leaves a tombstone; tombstones are counted, reused by inserts and dropped on rehash.
The table is rehashed (doubled when live keys need it) before ``live + tombstones``
would pass :data:`MAX_LOAD` of the capacity.

Rows are allocated from a :class:`RowPool`: freed rows are recycled first (a stack),
then fresh rows are handed out up to the pool's capacity. The kernels stop when the
index or the pool is full and the Python wrappers grow them and resume, so no Python
loop ever runs per key.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit

from xdl.sharding import all_finite, put_rows, splitmix64, take_rows

EMPTY = np.uint8(0)
FULL = np.uint8(1)
TOMB = np.uint8(2)
#: the index rehashes before live keys + tombstones pass this share of its slots
MAX_LOAD = 0.7

__all__ = [
    "EMPTY",
    "FULL",
    "TOMB",
    "MAX_LOAD",
    "HashIndex",
    "RowPool",
    "all_finite",
    "first_duplicate",
    "gather_rows",
    "scatter_rows",
    "touch_rows",
]


@njit(cache=True, inline="always")
def _slot_hash(key: np.int64) -> np.uint64:
    # SplitMix64's finalizer over the key xor a constant, so the low bits used here are
    # unrelated to the high bits that pick the key's shard bucket (xdl.sharding.mix64).
    return splitmix64(np.uint64(key) ^ np.uint64(0x9E3779B97F4A7C15))


@njit(cache=True)
def _lookup(tkeys: np.ndarray, trows: np.ndarray, tstate: np.ndarray,
            keys: np.ndarray) -> np.ndarray:
    mask = np.uint64(tkeys.shape[0] - 1)
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        k = keys[i]
        h = np.int64(_slot_hash(k) & mask)
        row = -1
        while True:
            s = tstate[h]
            if s == 0:
                break
            if s == 1 and tkeys[h] == k:
                row = trows[h]
                break
            h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
        out[i] = row
    return out


@njit(cache=True)
def _lookup_or_insert(tkeys: np.ndarray, trows: np.ndarray, tstate: np.ndarray,
                      keys: np.ndarray, out_rows: np.ndarray, inserted: np.ndarray,
                      start: int, size: int, tombs: int, max_fill: int,
                      free: np.ndarray, n_free: int, next_row: int, row_cap: int
                      ) -> tuple[int, int, int, int, int, int]:
    """Resolve keys[start:]; stop at the first key that needs a full index or pool.

    Returns (stop, size, tombs, n_free, next_row, reason) with reason 0 = done,
    1 = index full, 2 = row pool empty.
    """
    mask = np.uint64(tkeys.shape[0] - 1)
    n = keys.shape[0]
    for i in range(start, n):
        k = keys[i]
        h = np.int64(_slot_hash(k) & mask)
        first_tomb = np.int64(-1)
        found = False
        while True:
            s = tstate[h]
            if s == 0:
                break
            if s == 1:
                if tkeys[h] == k:
                    found = True
                    break
            elif first_tomb < 0:
                first_tomb = h
            h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
        if found:
            out_rows[i] = trows[h]
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
        tkeys[h] = k
        trows[h] = row
        tstate[h] = 1
        size += 1
        out_rows[i] = row
        inserted[i] = True
    return n, size, tombs, n_free, next_row, 0


@njit(cache=True)
def _delete(tkeys: np.ndarray, trows: np.ndarray, tstate: np.ndarray, keys: np.ndarray,
            free: np.ndarray, n_free: int) -> tuple[int, int]:
    """Tombstone each present key and push its row on the free stack.

    Returns (removed, n_free). ``free`` must have room for every live row.
    """
    mask = np.uint64(tkeys.shape[0] - 1)
    removed = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        h = np.int64(_slot_hash(k) & mask)
        while True:
            s = tstate[h]
            if s == 0:
                break
            if s == 1 and tkeys[h] == k:
                tstate[h] = 2
                free[n_free] = trows[h]
                n_free += 1
                removed += 1
                break
            h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
    return removed, n_free


@njit(cache=True)
def _rehash(tkeys: np.ndarray, trows: np.ndarray, tstate: np.ndarray, new_cap: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nkeys = np.zeros(new_cap, dtype=np.int64)
    nrows = np.zeros(new_cap, dtype=np.int64)
    nstate = np.zeros(new_cap, dtype=np.uint8)
    mask = np.uint64(new_cap - 1)
    for j in range(tkeys.shape[0]):
        if tstate[j] != 1:
            continue
        k = tkeys[j]
        h = np.int64(_slot_hash(k) & mask)
        while nstate[h] != 0:
            h = np.int64((np.uint64(h) + np.uint64(1)) & mask)
        nkeys[h] = k
        nrows[h] = trows[j]
        nstate[h] = 1
    return nkeys, nrows, nstate


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


@njit(cache=True)
def _touch(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray, step: int) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        freq[r] += 1
        last_step[r] = step


def touch_rows(freq: np.ndarray, last_step: np.ndarray, rows: np.ndarray, step: int) -> None:
    """``freq[rows] += 1`` and ``last_step[rows] = step`` in one pass (rows unique)."""
    _touch(freq, last_step, np.ascontiguousarray(rows, dtype=np.int64), int(step))


def first_duplicate(keys: np.ndarray) -> int:
    """Index of the first key that already appeared earlier in ``keys``, or -1 (O(n))."""
    return int(_first_duplicate(np.ascontiguousarray(keys, dtype=np.int64)))


def gather_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` as a new contiguous array (rows must be valid)."""
    return take_rows(values, rows)


def scatter_rows(values: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    """``values[rows] = src`` in place (the last write wins for repeated rows)."""
    put_rows(values, rows, src)


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
    """Open-addressing int64 key → int64 row index (power-of-two capacity, linear probing).

    :param capacity: initial slot count, rounded up to a power of two (at least 8).
    """

    def __init__(self, capacity: int = 1024):
        cap = 8
        while cap < capacity:
            cap *= 2
        self.keys = np.zeros(cap, dtype=np.int64)
        self.rows = np.zeros(cap, dtype=np.int64)
        self.state = np.zeros(cap, dtype=np.uint8)
        self.size = 0
        self.tombs = 0
        self.rehashes = 0

    @property
    def capacity(self) -> int:
        """Number of slots."""
        return int(self.keys.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the slot arrays."""
        return int(self.keys.nbytes + self.rows.nbytes + self.state.nbytes)

    def _max_fill(self) -> int:
        return int(self.capacity * MAX_LOAD)

    def rehash(self, min_live: int = 0) -> None:
        """Rebuild without tombstones, doubling until ``max(size, min_live)`` fits at half
        the load limit."""
        need = max(self.size, min_live)
        cap = self.capacity
        while need > cap * MAX_LOAD / 2:
            cap *= 2
        self.keys, self.rows, self.state = _rehash(self.keys, self.rows, self.state, cap)
        self.tombs = 0
        self.rehashes += 1

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent (int64 ``[n]``)."""
        return _lookup(self.keys, self.rows, self.state,
                       np.ascontiguousarray(keys, dtype=np.int64))

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
                self.keys, self.rows, self.state, k, rows, inserted, start, self.size,
                self.tombs, self._max_fill(), pool.free, pool.n_free, pool.next_row,
                pool.capacity)
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
        removed, pool.n_free = _delete(self.keys, self.rows, self.state,
                                       np.ascontiguousarray(keys, dtype=np.int64),
                                       pool.free, pool.n_free)
        self.size -= removed
        self.tombs += removed
        if self.size + self.tombs > self._max_fill():
            self.rehash()
        return int(removed)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, rows)`` of every live entry, in slot order."""
        live = self.state == FULL
        return self.keys[live], self.rows[live]
