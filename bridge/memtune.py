"""Allocator settings for the large, short-lived arrays of pulls and pushes.

glibc's ``malloc`` serves a request of at least ``M_MMAP_THRESHOLD`` bytes with a fresh
``mmap`` and unmaps it on ``free``. Its dynamic threshold only rises above the size of a
freed block, so arrays of one recurring size (the ids, rows and replies of requests of
one size, e.g. a 65,536 × 16 reply of 4 MiB) can get a fresh mapping on every request,
and every page of it faults when first written. Measured: de-duplicating 65,536 ids
took 0.91 ms with 477 page faults per call, against 0.15 ms without them.

:func:`tune_malloc` fixes the threshold at 32 MiB (glibc's largest) and the trim
threshold at 64 MiB, so freed blocks below 32 MiB are reused from the heap. A shard
process calls it when it creates its first table, :class:`xdl.client.Client` when it
connects. It changes the
process's allocator for everyone in it; set ``XDL_TUNE_MALLOC=0`` to leave ``malloc``
as it is. On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks below this many bytes come from the heap (glibc's upper limit on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap beyond this many bytes is given back to the system
TRIM_THRESHOLD = 64 << 20

_tuned = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring), once per
    process; returns whether they are set. Does nothing (and returns False) when
    ``XDL_TUNE_MALLOC=0``, off Linux, or when the C library has no ``mallopt`` or
    refuses the values."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("XDL_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _tuned = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _tuned


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]
