"""The hash index and row kernels against a Python dict / numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from xdl.server.kernels import (
    FULL,
    MAX_LOAD,
    TOMB,
    HashIndex,
    RowPool,
    first_duplicate,
    gather_rows,
    home_slots,
    scatter_rows,
)

I64 = np.iinfo(np.int64)


class Arena:
    """A RowPool whose growth is recorded, standing in for a table's arenas."""

    def __init__(self, capacity: int = 4):
        self.grows: list[int] = []
        self.pool = RowPool(capacity, self.grow)

    def grow(self, wanted: int) -> int:
        new = max(2 * self.pool.capacity, wanted)
        self.grows.append(new)
        return new


def check_against(idx: HashIndex, ref: dict[int, int]) -> None:
    keys, rows = idx.items()
    assert len(idx) == len(ref) == len(keys)
    assert dict(zip(keys.tolist(), rows.tolist(), strict=True)) == ref
    assert int((idx.state == FULL).sum()) == idx.size
    assert int((idx.state == TOMB).sum()) == idx.tombs
    assert idx.size + idx.tombs <= idx.capacity * MAX_LOAD
    if ref:
        probe = np.fromiter(ref, dtype=np.int64)
        np.testing.assert_array_equal(idx.lookup(probe), [ref[k] for k in ref])


def apply_insert(idx: HashIndex, arena: Arena, ref: dict[int, int], keys: np.ndarray) -> None:
    before = dict(ref)
    rows, inserted = idx.lookup_or_insert(keys, arena.pool)
    seen: set[int] = set()
    for k, r, ins in zip(keys.tolist(), rows.tolist(), inserted.tolist(), strict=True):
        if k in before or k in seen:
            assert not ins
            assert ref[k] == r
        else:
            assert ins
            ref[k] = r
            seen.add(k)
    # every live key has its own row
    assert len(set(ref.values())) == len(ref)
    assert max(ref.values(), default=0) < arena.pool.capacity


def test_growth_through_many_rehashes_matches_dict() -> None:
    rng = np.random.default_rng(1)
    idx = HashIndex(8)
    arena = Arena(4)
    ref: dict[int, int] = {}
    for _ in range(12):
        keys = rng.integers(-5000, 5000, size=rng.integers(1, 3000), dtype=np.int64)
        apply_insert(idx, arena, ref, keys)
        check_against(idx, ref)
    assert idx.rehashes >= 5 and idx.capacity >= len(ref) / MAX_LOAD
    assert len(arena.grows) >= 3
    absent = np.array([5000, 6000, -5001], dtype=np.int64)
    np.testing.assert_array_equal(idx.lookup(absent), [-1, -1, -1])


def test_delete_reinsert_and_row_recycling() -> None:
    rng = np.random.default_rng(2)
    idx = HashIndex(16)
    arena = Arena(16)
    ref: dict[int, int] = {}
    for round_ in range(20):
        keys = rng.integers(-2000, 2000, size=800, dtype=np.int64)
        apply_insert(idx, arena, ref, keys)
        victims = rng.choice(keys, size=300)
        expected = len({int(v) for v in victims} & set(ref))
        freed = {ref[int(v)] for v in set(victims.tolist()) if int(v) in ref}
        n_free_before = arena.pool.n_free
        assert idx.delete(victims, arena.pool) == expected
        for v in set(victims.tolist()):
            ref.pop(int(v), None)
        check_against(idx, ref)
        if idx.tombs:  # not rehashed away: the freed rows sit on the stack
            stack = set(arena.pool.free[n_free_before:arena.pool.n_free].tolist())
            assert stack == freed, round_
    # rows never exceed the peak of live keys by much: freed rows are reused
    assert arena.pool.next_row <= 4000
    # a reinserted key gets a recycled row, not a fresh one
    next_before = arena.pool.next_row
    gone = np.array([k for k in range(-2000, 2000) if k not in ref][:10], dtype=np.int64)
    n_free = arena.pool.n_free
    assert n_free >= 10
    rows, ins = idx.lookup_or_insert(gone, arena.pool)
    assert ins.all() and arena.pool.next_row == next_before
    assert arena.pool.n_free == n_free - 10
    assert idx.delete(gone, arena.pool) == 10
    assert idx.delete(gone, arena.pool) == 0  # already gone


def test_delete_then_reinsert_same_key_finds_one_entry() -> None:
    idx = HashIndex(8)
    arena = Arena(8)
    keys = np.array([7, 15, 23], dtype=np.int64)
    idx.lookup_or_insert(keys, arena.pool)
    assert idx.delete(np.array([15], dtype=np.int64), arena.pool) == 1
    rows, ins = idx.lookup_or_insert(np.array([23, 15, 15], dtype=np.int64), arena.pool)
    assert ins.tolist() == [False, True, False]
    assert rows[1] == rows[2]
    assert len(idx) == 3
    assert sorted(idx.items()[0].tolist()) == [7, 15, 23]


def _colliding_keys(cap: int, n: int) -> np.ndarray:
    """Keys whose home slot is the same in a table of ``cap`` slots."""
    cand = np.arange(-200_000, 200_000, dtype=np.int64)
    homes = home_slots(cand, cap)
    assert ((homes >= 0) & (homes < cap)).all()
    picked = cand[homes == 3][:n]
    assert len(picked) == n
    return picked


def test_long_probe_chains_with_tombstones() -> None:
    idx = HashIndex(1024)
    arena = Arena(64)
    keys = _colliding_keys(1024, 40)
    ref: dict[int, int] = {}
    apply_insert(idx, arena, ref, keys)
    check_against(idx, ref)
    assert idx.capacity == 1024  # the chain was built without a rehash
    # delete every other key in the middle of the chain, then look up the rest
    idx.delete(keys[1::2], arena.pool)
    for k in keys[1::2].tolist():
        del ref[k]
    check_against(idx, ref)
    np.testing.assert_array_equal(idx.lookup(keys[1::2]), -1)
    # reinsertion reuses tombstones, chain lookups still find the survivors
    apply_insert(idx, arena, ref, keys[1::2][::-1].copy())
    check_against(idx, ref)
    assert idx.tombs == 0


def test_negative_and_extreme_keys() -> None:
    idx = HashIndex(8)
    arena = Arena(2)
    keys = np.array([0, -1, 1, I64.min, I64.max, I64.min + 1, I64.max - 1, -(2**40), 2**40],
                    dtype=np.int64)
    ref: dict[int, int] = {}
    apply_insert(idx, arena, ref, keys)
    check_against(idx, ref)
    assert idx.delete(np.array([I64.min, 0], dtype=np.int64), arena.pool) == 2
    del ref[int(I64.min)], ref[0]
    check_against(idx, ref)
    np.testing.assert_array_equal(idx.lookup(np.array([I64.min, 0])), [-1, -1])


def test_tombstones_cleaned_by_rehash() -> None:
    idx = HashIndex(64)
    arena = Arena(64)
    ref: dict[int, int] = {}
    for i in range(30):  # churn: the live set stays small, tombstones pile up
        keys = np.arange(i * 20, i * 20 + 20, dtype=np.int64)
        apply_insert(idx, arena, ref, keys)
        idx.delete(keys, arena.pool)
        for k in keys.tolist():
            del ref[k]
        check_against(idx, ref)
    assert idx.capacity == 64  # never needed to double for 20 live keys
    assert idx.rehashes >= 1
    assert arena.pool.next_row <= 20  # rows recycled


def test_first_duplicate() -> None:
    rng = np.random.default_rng(3)
    keys = rng.permutation(np.arange(-50_000, 50_000, dtype=np.int64))
    assert first_duplicate(keys) == -1
    assert first_duplicate(np.array([], dtype=np.int64)) == -1
    dup = np.concatenate([keys[:1000], keys[500:501], keys[1000:]])
    assert first_duplicate(dup) == 1000
    assert first_duplicate(np.array([I64.min, 0, I64.min], dtype=np.int64)) == 2


@pytest.mark.parametrize("width", [1, 7])
def test_gather_scatter(width: int) -> None:
    rng = np.random.default_rng(4)
    values = rng.standard_normal((50, width)).astype(np.float32)
    rows = rng.permutation(50)[:20]
    np.testing.assert_array_equal(gather_rows(values, rows), values[rows])
    src = rng.standard_normal((20, width)).astype(np.float32)
    ref = values.copy()
    ref[rows] = src
    scatter_rows(values, rows, src)
    np.testing.assert_array_equal(values, ref)


def test_all_finite_and_touch_rows() -> None:
    from xdl.server.kernels import all_finite, touch_rows

    a = np.ones((7, 3), dtype=np.float32)
    assert all_finite(a) and all_finite(a[:, 1]) and all_finite(np.zeros((0, 4), np.float32))
    a[0, 0] = np.float32(3.4e38)  # largest finite values are finite
    assert all_finite(a)
    for bad in (np.inf, -np.inf, np.nan):
        b = a.copy()
        b[6, 2] = bad
        assert not all_finite(b)
    freq = np.zeros(6, dtype=np.int64)
    last = np.zeros(6, dtype=np.int64)
    touch_rows(freq, last, np.array([4, 1]), 3)
    touch_rows(freq, last, np.array([1]), 5)
    assert freq.tolist() == [0, 2, 0, 0, 1, 0] and last.tolist() == [0, 5, 0, 0, 3, 0]


def test_copy_finite_copies_bit_for_bit_and_checks_in_one_pass() -> None:
    from xdl.sharding import copy_finite

    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 5)).astype(np.float32)
    a[0, 0] = np.float32(3.4e38)
    a[1, 1] = np.float32(-0.0)
    a[2, 2] = np.float32(1e-45)  # subnormal
    out, finite = copy_finite(a)
    assert finite and out.shape == a.shape and not np.shares_memory(out, a)
    assert out.view(np.uint32).tolist() == a.view(np.uint32).tolist()
    out, finite = copy_finite(a[:, 1])  # not contiguous
    assert finite and out.tolist() == a[:, 1].tolist()
    for bad in (np.inf, -np.inf, np.nan):
        b = a.copy()
        b[299, 4] = bad
        assert not copy_finite(b)[1]
    assert copy_finite(np.zeros((0, 4), np.float32))[1]


def test_sharding_kernels_match_numpy() -> None:
    from xdl import sharding
    from xdl.sharding import mix64

    rng = np.random.default_rng(3)
    ids = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 20000, dtype=np.int64)
    ids[:3] = [0, -1, np.iinfo(np.int64).min]
    z = ids.view(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    np.testing.assert_array_equal(mix64(ids), z)
    buckets = (z >> np.uint64(48)).astype(np.int64)
    np.testing.assert_array_equal(sharding.bucket_of(ids), buckets)
    assert sharding.bucket_of(ids.reshape(100, 200)).shape == (100, 200)
    for n in (1, 2, 3, 7):
        route = sharding.shard_of_bucket(n)
        shards = route[buckets]
        np.testing.assert_array_equal(sharding.shard_of(ids, n), shards)
        order, sorted_ids, counts = sharding.split_by_shard(ids, route, n)
        np.testing.assert_array_equal(order, np.argsort(shards, kind="stable"))
        np.testing.assert_array_equal(sorted_ids, ids[order])
        np.testing.assert_array_equal(counts, np.bincount(shards, minlength=n))
        lo, hi = sharding.bucket_ranges(n)[0]
        outside = (buckets < lo) | (buckets >= hi)
        first, count = sharding.first_outside(ids, lo, hi)
        assert count == int(outside.sum())
        assert first == (int(np.argmax(outside)) if count else -1)
    a = rng.random((50, 5), dtype=np.float32)
    idx = rng.permutation(50)[:20]
    np.testing.assert_array_equal(sharding.take_rows(a, idx), a[idx])
    out = np.zeros_like(a)
    sharding.put_rows(out, idx, a[:20])
    expect = np.zeros_like(a)
    expect[idx] = a[:20]
    np.testing.assert_array_equal(out, expect)


def test_add_rows_accumulates_repeated_indices_like_add_at() -> None:
    from xdl.sharding import add_rows

    rng = np.random.default_rng(5)
    idx = rng.integers(0, 40, 3000)  # many repeats
    src = rng.normal(size=(3000, 5)).astype(np.float32)
    got = np.ones((40, 5), np.float32)
    add_rows(got, idx, src)
    want = np.ones((40, 5), np.float32)
    np.add.at(want, idx, src)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_arena_grows_in_place_or_copies_when_a_view_is_held() -> None:
    from xdl.server.kernels import Arena

    a = Arena(3, 2, np.float32)
    a.array[:] = [[1, 2], [3, 4], [5, 6]]
    a.grow(1000)
    assert a.array.shape == (1000, 2) and a.nbytes == 8000
    np.testing.assert_array_equal(a.array[:3], [[1, 2], [3, 4], [5, 6]])
    assert not a.array[3:].any()  # new rows read as zero
    held = a.array  # a view held elsewhere: the mapping cannot move, rows are copied
    a.grow(5000)
    np.testing.assert_array_equal(a.array[:3], held[:3])
    held[0, 0] = 99  # the old view stays valid and is no longer the arena
    assert a.array[0, 0] == 1 and a.array.shape == (5000, 2)
    v = Arena(2, None, np.int64)
    v.array[:] = [7, -8]
    v.grow(3)
    assert v.array.tolist() == [7, -8, 0]


def test_mark_pushed_rows_marks_and_undoes() -> None:
    from xdl.server.kernels import mark_pushed_rows, unmark_pushed_rows

    idx = HashIndex(64)
    arena = Arena(8)
    idx.lookup_or_insert(np.array([10, 20, 30], dtype=np.int64), arena.pool)
    freq = np.array([0, 4, 2**32 - 1], dtype=np.uint32)
    last = np.array([5, 6, 7], dtype=np.int64)
    rows = np.empty(4, np.int64)
    saved = np.empty(4, np.int64)
    absent, dup = mark_pushed_rows(idx, np.array([30, 99, 10, 20]), rows, freq, last, saved, 9)
    assert (absent, dup) == (1, -1) and rows.tolist() == [2, -1, 0, 1]
    assert freq.tolist() == [1, 5, 2**32 - 1] and last.tolist() == [9, 9, 9]  # saturated
    unmark_pushed_rows(rows, freq, last, saved)
    assert freq.tolist() == [0, 4, 2**32 - 1] and last.tolist() == [5, 6, 7]
    absent, dup = mark_pushed_rows(idx, np.array([20, 10, 20, 30]), rows, freq, last, saved, 9)
    assert dup == 2  # and nothing changed
    assert freq.tolist() == [0, 4, 2**32 - 1] and last.tolist() == [5, 6, 7]


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 33, 500])
def test_lookup_gather_matches_lookup_then_take(n: int) -> None:
    rng = np.random.default_rng(n)
    idx = HashIndex(16)
    arena = Arena(16)
    keys = rng.integers(I64.min, I64.max, size=600, dtype=np.int64)
    rows, _ = idx.lookup_or_insert(keys, arena.pool)
    values = rng.standard_normal((arena.pool.capacity, 24)).astype(np.float32)
    ask = rng.permutation(keys)[:n]
    got_rows = np.empty(n, np.int64)
    out = np.empty((n, 24), np.float32)
    assert idx.lookup_gather(ask, values, got_rows, out) == -1
    np.testing.assert_array_equal(got_rows, idx.lookup(ask))
    np.testing.assert_array_equal(out, values[idx.lookup(ask)])
    if n:  # an absent key: its position is reported
        miss = ask.copy()
        miss[n // 2] = 12345 if 12345 not in keys else 54321
        assert idx.lookup_gather(miss, values, got_rows, out) == n // 2
