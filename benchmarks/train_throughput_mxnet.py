"""Training throughput of the MXNet DIN on MovieLens-100k: through the parameter server
versus locally, measured in the same run, at batch 256 and 1024.

The model is ``examples/din_mxnet.py``'s hybridized Gluon DIN. The server run swaps its
three ``gluon.nn.Embedding`` tables onto local shards (``xdl.swap``, server-side
Adagrad); before each forward it names the batch's ids (``block.prefetch``, exact), so
the rows of all three tables are pulled in one ``pull_many`` right behind the previous
step's push, on MXNet's engine, while Python goes on dispatching (docs/mxnet.md). The
baseline is the same net with ``sparse_grad=True`` embeddings. Both train with
``gluon.Trainer`` Adagrad on the same batches, in one process with the same MXNet
settings (engine and thread counts as MXNet's defaults or the environment set them).
To be fair on a shared machine the two alternate in rounds of ``--batches`` steps; the
median round of each is reported with the ratio server / local (target: at least
0.9), next to the load average. The shards run on the same machine as the worker, so
numbers move with the machine's load: run it on a quiet machine and read the ratio,
not the absolute samples/s. ``--profile N`` then profiles one more server round:
cProfile of the Python thread (N functions) and MXNet's profiler (the lookup
operators' Python time, the engine's waits).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import xdl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import din_mxnet as din  # noqa: E402

TARGET_RATIO = 0.9


def run_steps(net: Any, trainer: Any, batches: list[dict[str, Any]],
              prefetch: bool) -> float:
    """Train on ``batches``; returns the wall seconds, the last push included."""
    from mxnet import autograd, gluon, nd

    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    tables = [net.item_emb, net.genre_emb, net.user_emb]

    def schedule(b: dict[str, Any]) -> None:
        for table, key in zip(tables, ("items", "genres", "user"), strict=True):
            table.prefetch(b[key])

    start = time.perf_counter()
    for batch in batches:
        if prefetch:  # sent by MXNet's engine right after the previous step's push
            schedule(batch)
        with autograd.record():
            loss = loss_fn(net(*din.inputs(batch)), batch["label"])
        loss.backward()
        trainer.step(batch["label"].shape[0])
    nd.waitall()
    for table in tables:
        wait = getattr(table, "wait_pushes", None)
        if wait is not None:
            wait()
    return time.perf_counter() - start


def profile_round(net: Any, trainer: Any, batches: list[dict[str, Any]], prefetch: bool,
                  top: int) -> None:
    """Print where one server round spends its time: cProfile of this (the Python)
    thread, then MXNet's aggregate profile of the custom operators and engine waits."""
    from mxnet import profiler

    profiler.set_config(profile_all=True, aggregate_stats=True,
                        filename=os.devnull)
    prof = cProfile.Profile()
    profiler.set_state("run")
    prof.enable()
    seconds = run_steps(net, trainer, batches, prefetch)
    prof.disable()
    profiler.set_state("stop")
    print(f"profiled server round: {len(batches)} steps in {seconds:.2f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    keep = ("Name", "xdl_", "_backward_xdl_", "WaitForVar", "MXNDArraySync",
            "MXNDArrayWaitAll")
    print("\n".join(line for line in profiler.dumps(reset=True).splitlines()
                    if line.lstrip().startswith(keep)))


def measure(data: Any, batch_size: int, batches: int, rounds: int, shards: int,
            prefetch: bool, profile: int = 0) -> tuple[float, float]:
    """Median samples/s of (server, local) over ``rounds`` alternating rounds."""
    n = len(data.train["label"])
    rng = np.random.default_rng(0)
    plan = [din.to_batch(data.train, rng.integers(0, n, batch_size))
            for _ in range(batches * (rounds + (1 if profile else 0)))]
    local = din.build_model(data, sparse_grad=True)
    local_trainer = din.trainer_for(local)
    server = din.build_model(data)
    with xdl.connect(local_shards=shards) as client:
        server = xdl.swap(server, client, optimizer=xdl.optim.Adagrad.mxnet(lr=din.LR),
                          initializer=din.INIT, prefix=f"bench{batch_size}.",
                          per_table={k: {"seed": s} for k, s in din.TABLE_SEEDS.items()})
        server_trainer = din.trainer_for(server)
        warm = plan[:2]  # graph build, kernel compile
        run_steps(local, local_trainer, warm, False)
        run_steps(server, server_trainer, warm, prefetch)
        rates: dict[str, list[float]] = {"server": [], "local": []}
        for r in range(rounds):
            part = plan[r * batches:(r + 1) * batches]
            rates["local"].append(batch_size * len(part)
                                  / run_steps(local, local_trainer, part, False))
            rates["server"].append(batch_size * len(part)
                                   / run_steps(server, server_trainer, part, prefetch))
        if profile:
            profile_round(server, server_trainer, plan[rounds * batches:], prefetch, profile)
        xdl.unswap(server)
    return statistics.median(rates["server"]), statistics.median(rates["local"])


def main(argv: list[str] | None = None) -> int:
    """Measure and print samples/s of both runs and their ratio, per batch size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--no-prefetch", action="store_true",
                    help="pull each batch's rows in its own forward")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, profile one server round (N functions)")
    ap.add_argument("--strict", action="store_true",
                    help=f"exit 1 when a ratio is below {TARGET_RATIO}")
    args = ap.parse_args(argv)
    data = din.load_data(args.cache_dir)
    status = 0
    print(f"MXNet DIN, MovieLens-100k, {args.shards} local shards, "
          f"{'no ' if args.no_prefetch else 'exact '}prefetch; median of {args.rounds} "
          f"alternating rounds of {args.batches} steps")
    for batch_size in args.batch_sizes:
        server, local = measure(data, batch_size, args.batches, args.rounds, args.shards,
                                not args.no_prefetch, args.profile)
        ratio = server / local
        print(f"batch {batch_size:>5}: server {server:>9,.0f} samples/s   local "
              f"{local:>9,.0f} samples/s   ratio {ratio:.3f} (target >= {TARGET_RATIO})"
              f"   load average {os.getloadavg()[0]:.2f}")
        status |= ratio < TARGET_RATIO
    return int(status) if args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
