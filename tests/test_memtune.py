"""xdl.memtune: request-sized arrays are reused from the heap, not page-faulted afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import numpy as np
from xdl.memtune import tune_malloc
from xdl.dedup import unique_inverse
tuned = tune_malloc()
rng = np.random.default_rng(0)
small, large = rng.integers(0, 2**62, 4096), rng.integers(0, 2**62, 65536)
for ids in (small, large):  # compiled, and the allocator's state of a running client
    for _ in range(20):
        unique_inverse(ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # the same request size each time
    unique_inverse(large)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def probe(tune: str) -> dict[str, float]:
    env = {**os.environ, "XDL_TUNE_MALLOC": tune}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION")
                    is None, reason="glibc only")
def test_tuned_allocator_reuses_request_sized_blocks() -> None:
    plain = probe("0")
    tuned = probe("1")
    assert plain["tuned"] is False and tuned["tuned"] is True
    # untuned, the 65,536-id de-duplication's 2 MiB of buffers are mapped (or grown)
    # afresh on every call: measured 477 page faults a call
    assert plain["faults"] > 200
    assert tuned["faults"] < 50
