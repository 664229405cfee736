"""Id → bucket → shard routing, shared by the client, the shards and checkpoints.

An id's bucket is ``mix64(id) >> 48`` (65,536 buckets). A cluster of N shards maps
contiguous bucket ranges to shards: shard k owns ``[k*65536//N, (k+1)*65536//N)``.
Everything here is vectorized numpy; no Python loop touches ids.
"""

from __future__ import annotations

import numpy as np

from .protocol import BUCKET_SHIFT, NUM_BUCKETS

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def mix64(ids: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over int64 ids, as uint64 (a bijection that spreads bits)."""
    z = np.asarray(ids).astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z = z ^ (z >> _S31)
    return z


def bucket_of(ids: np.ndarray) -> np.ndarray:
    """Bucket (0..65535) of each id, as int64."""
    return (mix64(ids) >> np.uint64(BUCKET_SHIFT)).astype(np.int64)


def bucket_ranges(num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` bucket range of each of ``num_shards`` shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    bounds = [k * NUM_BUCKETS // num_shards for k in range(num_shards + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(num_shards)]


def shard_of_bucket(num_shards: int) -> np.ndarray:
    """Lookup array: bucket → shard index, for ``num_shards`` shards."""
    table = np.empty(NUM_BUCKETS, dtype=np.int64)
    for k, (lo, hi) in enumerate(bucket_ranges(num_shards)):
        table[lo:hi] = k
    return table


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard index of each id for a cluster of ``num_shards`` shards."""
    return shard_of_bucket(num_shards)[bucket_of(ids)]


def dense_shard(name: str, num_shards: int) -> int:
    """Shard that holds the dense variable ``name`` (a stable hash of the name)."""
    import zlib

    return zlib.crc32(name.encode("utf-8")) % num_shards
