"""Parameter-server throughput: pull and push (Adagrad) rows/s against a ceiling.

For 4,096 and 65,536 unique int64 keys per call, dim 16 and 64, and 1 and 2 shards
over tcp loopback, it measures:

* ``pull``: :meth:`xdl.Client.pull` of keys that exist (hash lookup + gather + reply);
* ``push``: :meth:`xdl.Client.push` with Adagrad, waited for (lookup + fused update);

and beside each, the **ceiling** measured in the same run: the same number of echo
processes (one per shard) that receive the same request bytes, do a numpy gather of
the same number of rows from an array of the same size, and send back the same reply
bytes. Targets: pull >= 0.5 x ceiling, push >= 0.3 x ceiling.

Then a 10 M-key x dim-16 Adagrad table is filled on one shard and the shard's
resident bytes per row are printed, and the time from starting a shard process to its
ready line (kernels loaded from numba's on-disk cache) beside the time to start a bare
Python interpreter that imports numpy, measured in the same run.

Run: ``python benchmarks/ps_throughput.py`` (``--quick`` for a short run,
``--big-rows N`` to size the memory test).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import zmq

import xdl
from xdl.client import LocalShards
from xdl.sharding import shard_of


def echo_server(n_rows: int, dim: int) -> None:
    """Echo process: for each request, gather rows like a shard would and reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    table = np.random.default_rng(0).random((n_rows, dim), dtype=np.float32)
    while True:
        ident, kind, ids, *_ = sock.recv_multipart(copy=False)
        idx = np.frombuffer(ids.buffer, dtype=np.int64) % n_rows
        rows = table[idx]
        if kind.bytes == b"quit":
            break
        reply = rows if kind.bytes == b"pull" else b"ok"
        sock.send_multipart([ident, reply], copy=False)
    sock.close(0)
    ctx.term()


class Echo:
    """Client side of the ceiling: one DEALER per echo process, same fan-out as the client."""

    def __init__(self, shards: int, n_rows: int, dim: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, __file__, "--echo-server",
                                        str(n_rows), str(dim)], stdout=subprocess.PIPE,
                                       text=True) for _ in range(shards)]
        self.ctx = zmq.Context()
        self.socks = []
        for p in self.procs:
            assert p.stdout is not None
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(p.stdout.readline().strip())
            self.socks.append(s)

    def call(self, kind: bytes, parts: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        for s, (ids, grads) in zip(self.socks, parts, strict=True):
            frames = [kind, ids] + ([grads] if grads is not None else [])
            s.send_multipart(frames, copy=False)
        for s in self.socks:
            s.recv_multipart(copy=False)

    def close(self) -> None:
        for s in self.socks:
            s.send_multipart([b"quit", np.zeros(1, np.int64)])
            s.close(0)
        for p in self.procs:
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.ctx.term()


def rate(fn, rows: int, min_time: float) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_time and n >= 3:
            return rows * n / el


def bench_throughput(shards: int, n_keys: int, dim: int, min_time: float) -> list[str]:
    universe = 4 * n_keys
    rng = np.random.default_rng(1)
    keys_pool = rng.integers(-(2**63), 2**63 - 1, size=universe, dtype=np.int64)
    batches = [rng.choice(keys_pool, n_keys, replace=False) for _ in range(4)]
    grads = rng.normal(size=(n_keys, dim)).astype(np.float32)
    it = {"i": 0}

    def next_batch() -> np.ndarray:
        it["i"] += 1
        return batches[it["i"] % len(batches)]

    local = LocalShards(shards)
    client = xdl.Client(local.endpoints, local=local)
    client.create_table("bench", dim, optimizer=xdl.optim.Adagrad(lr=0.01))
    for i in range(0, universe, 65536):
        client.pull("bench", keys_pool[i:i + 65536], unique=True)
    pull = rate(lambda: client.pull("bench", next_batch(), unique=True), n_keys, min_time)
    push = rate(lambda: client.wait(client.push("bench", next_batch(), grads, unique=True)),
                n_keys, min_time)
    client.close()

    echo = Echo(shards, universe // shards, dim)

    def split(ids: np.ndarray, g: np.ndarray | None) -> list[tuple[np.ndarray,
                                                                   np.ndarray | None]]:
        owner = shard_of(ids, shards)
        return [(ids[owner == k], None if g is None else g[owner == k]) for k in range(shards)]

    pull_parts = [split(b, None) for b in batches]
    push_parts = [split(b, grads) for b in batches]
    c_pull = rate(lambda: echo.call(b"pull", pull_parts[it["i"] % 4]) or it.update(
        i=it["i"] + 1), n_keys, min_time)
    c_push = rate(lambda: echo.call(b"push", push_parts[it["i"] % 4]) or it.update(
        i=it["i"] + 1), n_keys, min_time)
    echo.close()
    head = f"{shards} shard{'s' if shards > 1 else ' '} {n_keys:>6} keys dim {dim:>2}"
    return [
        f"{head}  pull {pull / 1e6:7.2f} M rows/s  ceiling {c_pull / 1e6:7.2f}  "
        f"ratio {pull / c_pull:4.2f} (target >= 0.5) {'ok' if pull >= 0.5 * c_pull else 'MISS'}",
        f"{head}  push {push / 1e6:7.2f} M rows/s  ceiling {c_push / 1e6:7.2f}  "
        f"ratio {push / c_push:4.2f} (target >= 0.3) {'ok' if push >= 0.3 * c_push else 'MISS'}",
    ]


def bench_memory(rows: int) -> str:
    with xdl.connect(local_shards=1) as client:
        base = client.stats()[0]["resident_bytes"]
        client.create_table("big", 16, optimizer=xdl.optim.Adagrad(lr=0.01))
        step = 1 << 20
        t0 = time.perf_counter()
        for i in range(0, rows, step):
            ids = np.arange(i, min(i + step, rows), dtype=np.int64) * 2654435761
            client.push("big", ids, np.ones((ids.size, 16), np.float32), unique=True)
            client.wait()
            print(f"  filled {min(i + step, rows):>10,} rows", end="\r", flush=True)
        st = client.stats()[0]
        grown = st["resident_bytes"] - base
        table_bytes = st["tables"]["big"]["bytes"]
        n = st["tables"]["big"]["rows"]
    return (f"{n:,} rows x dim 16 Adagrad on 1 shard (filled in {time.perf_counter() - t0:.1f} s):"
            f" resident {grown / n:.1f} bytes/row (tables' own arrays {table_bytes / n:.1f} "
            f"bytes/row; values+accumulator alone are 128)")


def bench_startup(runs: int = 3) -> str:
    """Median seconds to a shard's ready line vs a bare ``python -c 'import numpy'``."""
    import statistics

    shard, bare = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        local = LocalShards(1)
        shard.append(time.perf_counter() - t0)
        local.stop()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import numpy"], check=True)
        bare.append(time.perf_counter() - t0)
    s, b = statistics.median(shard), statistics.median(bare)
    return (f"shard start to ready: {s:.2f} s (median of {runs}; kernels from numba's cache); "
            f"bare python + numpy start: {b:.2f} s; ratio {s / b:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--big-rows", type=int, default=10_000_000)
    ap.add_argument("--echo-server", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        echo_server(*args.echo_server)
        return
    min_time = 0.5 if args.quick else 2.0
    print("xdl-bridge parameter-server throughput (tcp loopback); ceiling = ZeroMQ echo of "
          "the same bytes + numpy gather of the same rows, same run")
    for shards in (1, 2):
        for n_keys in (4096, 65536):
            for dim in (16, 64):
                for line in bench_throughput(shards, n_keys, dim, min_time):
                    print(line, flush=True)
    print(bench_startup())
    print(bench_memory(args.big_rows))


if __name__ == "__main__":
    main()
