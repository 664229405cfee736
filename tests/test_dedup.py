"""xdl.dedup.unique_inverse against np.unique's semantics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xdl.dedup import unique_inverse
from xdl.errors import InvalidArgumentError

I64 = np.iinfo(np.int64)


def check(ids: np.ndarray) -> None:
    """unique_inverse agrees with np.unique up to order, and the order is first occurrence."""
    unique, inverse = unique_inverse(ids)
    assert unique.dtype == np.int64 and inverse.dtype == np.int64
    assert inverse.shape == ids.shape
    flat = ids.reshape(-1).astype(np.int64)
    np.testing.assert_array_equal(unique[inverse].reshape(-1), flat)
    ref = np.unique(flat)
    np.testing.assert_array_equal(np.sort(unique), ref)
    # first-occurrence order: np.unique's first indices, sorted, give the same sequence
    _, first = np.unique(flat, return_index=True)
    np.testing.assert_array_equal(unique, flat[np.sort(first)])


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.int64, st.integers(0, 300),
                  elements=st.one_of(st.integers(-4, 4),
                                     st.integers(int(I64.min), int(I64.max)))))
def test_matches_np_unique(ids: np.ndarray) -> None:
    check(ids)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64])
def test_any_int_dtype(dtype: type) -> None:
    info = np.iinfo(dtype)
    top = min(int(info.max), int(I64.max))  # uint64 ids must fit an int64
    ids = np.array([top, info.min, 3, top, 5, 3, info.min], dtype=dtype)
    check(ids)
    unique, inverse = unique_inverse(ids)
    assert unique.tolist() == [top, int(info.min), 3, 5]
    assert inverse.tolist() == [0, 1, 2, 0, 3, 2, 1]


def test_empty_and_shapes() -> None:
    unique, inverse = unique_inverse(np.zeros(0, dtype=np.int64))
    assert unique.shape == (0,) and inverse.shape == (0,)
    assert unique.dtype == np.int64 and inverse.dtype == np.int64
    bags = np.array([[5, 7, 5], [7, 9, 9]], dtype=np.int32)
    unique, inverse = unique_inverse(bags)
    assert unique.tolist() == [5, 7, 9]
    assert inverse.tolist() == [[0, 1, 0], [1, 2, 2]]
    check(np.zeros((0, 3), dtype=np.int64))


def test_extremes_and_colliding_keys() -> None:
    # keys that differ only in high bits, sequential keys, INT64_MIN/MAX, 0 and -1
    ids = np.concatenate([np.arange(2000, dtype=np.int64) << 44,
                          np.arange(-1000, 1000, dtype=np.int64),
                          np.array([I64.min, I64.max, 0, -1, I64.min], dtype=np.int64)])
    check(np.random.default_rng(1).permutation(np.concatenate([ids, ids[::3]])))


def test_large_random_batch() -> None:
    rng = np.random.default_rng(0)
    pool = rng.integers(I64.min, I64.max, size=10_000, dtype=np.int64)
    check(pool[rng.integers(0, pool.size, size=65_536)])


def test_refuses_non_int64_values() -> None:
    with pytest.raises(InvalidArgumentError, match="2\\*\\*63"):
        unique_inverse(np.array([1, 2**63], dtype=np.uint64))
    check(np.array([1, 2**63 - 1], dtype=np.uint64))
    with pytest.raises(InvalidArgumentError, match="integer"):
        unique_inverse(np.array([1.0, 2.0]))
    with pytest.raises(InvalidArgumentError, match="integer"):
        unique_inverse(np.array([True, False]))


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_unique_by_shard_is_unique_then_split_by_shard(num_shards: int) -> None:
    from xdl.dedup import unique_by_shard
    from xdl.sharding import shard_of_bucket, split_by_shard

    rng = np.random.default_rng(num_shards)
    cases = [np.empty(0, np.int64), np.array([5], np.int64),
             rng.integers(0, 40, 300),  # many repeats
             rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64),  # none
             np.array([np.iinfo(np.int64).min, 0, -1, np.iinfo(np.int64).max, 0, -1])]
    for ids in cases:
        uniq, inverse = unique_inverse(ids)
        order, sorted_ids, counts = split_by_shard(uniq, shard_of_bucket(num_shards),
                                                   num_shards)
        got_ids, got_order, got_counts, got_inverse = unique_by_shard(ids, num_shards)
        np.testing.assert_array_equal(got_ids, sorted_ids)
        np.testing.assert_array_equal(got_order, order)
        np.testing.assert_array_equal(got_counts, counts)
        if uniq.size == ids.size:
            assert got_inverse is None
        else:
            assert got_inverse is not None
            np.testing.assert_array_equal(got_inverse, inverse)
