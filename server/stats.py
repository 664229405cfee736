"""Request counters and latency summaries of one shard (reported by the STATS command)."""

from __future__ import annotations

import os
from collections import deque

import numpy as np

_WINDOW = 2048


class CommandStats:
    """Count, error count and latency window of one command."""

    __slots__ = ("count", "errors", "total_s", "max_s", "window")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.window: deque[float] = deque(maxlen=_WINDOW)

    def record(self, seconds: float, ok: bool) -> None:
        """Add one request that took ``seconds``."""
        self.count += 1
        self.errors += 0 if ok else 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        self.window.append(seconds)

    def summary(self) -> dict[str, float | int]:
        """Counts and latencies in milliseconds (p50/p99 over the last 2,048 requests)."""
        w = np.fromiter(self.window, dtype=np.float64) if self.window else np.zeros(1)
        return {
            "count": self.count,
            "errors": self.errors,
            "mean_ms": 1e3 * self.total_s / max(self.count, 1),
            "p50_ms": 1e3 * float(np.percentile(w, 50)),
            "p99_ms": 1e3 * float(np.percentile(w, 99)),
            "max_ms": 1e3 * self.max_s,
        }


def resident_bytes() -> int:
    """Resident set size of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
