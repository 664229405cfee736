"""What the write-ahead log costs: push throughput with and without it, per fsync policy.

One local shard per policy; the baseline (no log) is measured in the same run and every
row prints its ratio against it. Two workloads:

- streamed: asynchronous pushes, up to 256 in flight (how training pushes), for a
  small (64 ids) and a large (4,096 ids) request, dim 16, Adagrad;
- one at a time: push and wait, 64 ids (the latency a caller that waits sees).

Run: ``.venv/bin/python benchmarks/wal_cost.py [--dir DIR] [--seconds S]``. The log
goes to ``--dir`` (default: a folder under ~/.cache/xdl), which must be on a real
disk for ``fsync`` to mean anything (not tmpfs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

import xdl
from xdl.local_shards import LocalShards

POLICIES = [("no log", None), ("fsync none", "none"), ("fsync 5 ms", "5"),
            ("fsync every", "every")]


def streamed(client: xdl.Client, n_ids: int, seconds: float) -> float:
    """Pushes per second, streamed."""
    ids = np.arange(n_ids, dtype=np.int64) * 7919
    grads = np.full((n_ids, 16), 0.01, dtype=np.float32)
    client.wait(client.push("t", ids, grads, unique=True))
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(32):
            client.push("t", ids, grads, unique=True)
        count += 32
    client.wait()
    return count / (time.perf_counter() - t0)


def one_at_a_time(client: xdl.Client, seconds: float) -> float:
    """Pushes per second, waiting for each."""
    ids = np.arange(64, dtype=np.int64)
    grads = np.full((64, 16), 0.01, dtype=np.float32)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        client.wait(client.push("t", ids, grads, unique=True))
        count += 1
    return count / (time.perf_counter() - t0)


def main() -> None:
    """Print the table of figures (medians over interleaved rounds)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/xdl/wal-bench"))
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each measures every policy in turn (noise hits all alike)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    dirs, shards, clients = [], [], {}
    try:
        for label, policy in POLICIES:
            wal_dir = tempfile.mkdtemp(dir=args.dir)
            dirs.append(wal_dir)
            extra = [] if policy is None else ["--wal-dir", wal_dir, "--wal-fsync", policy]
            local = LocalShards(1, extra_args=extra)
            shards.append(local)
            client = xdl.Client(local.endpoints, timeout=60.0)
            client.create_table("t", dim=16, optimizer=xdl.optim.Adagrad(lr=0.01))
            clients[label] = client
        runs: dict[str, list[list[float]]] = {label: [] for label in clients}
        for _ in range(args.rounds):
            for label, client in clients.items():
                runs[label].append([streamed(client, 64, args.seconds),
                                    streamed(client, 4096, args.seconds),
                                    one_at_a_time(client, args.seconds)])
    finally:
        for client in clients.values():
            client.close()
        for local in shards:
            local.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    results = {label: [float(np.median([r[j] for r in rows])) for j in range(3)]
               for label, rows in runs.items()}
    base = results["no log"]
    print(f"{'policy':<13} {'64 ids streamed':>22} {'4096 ids streamed':>24} "
          f"{'64 ids push+wait':>22}")
    for label, row in results.items():
        cells = [f"{v:9.0f}/s ({v / b:4.2f}x)" for v, b in zip(row, base, strict=True)]
        print(f"{label:<13} {cells[0]:>22} {cells[1]:>24} {cells[2]:>22}")
    print(f"(pushes per second, median of {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s; ratio against 'no log' measured in the same run)")


if __name__ == "__main__":
    main()
