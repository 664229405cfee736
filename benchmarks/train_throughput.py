"""Training throughput of DIN on MovieLens-100k: through the parameter server versus
locally, measured in the same run.

The server model is ``examples/din_movielens.py``'s DIN after ``xdl.swap`` onto local
shards, trained with the adapter's ``prefetch`` (the next batch's rows are pulled while
the current batch computes; exact by default, ``--stale-prefetch`` for
``exact=False``) and asynchronous pushes (``sync_push=False``); the baseline
is the same model with ``nn.Embedding(sparse=True)`` and ``torch.optim.Adagrad``.
Both see the same batches. To be fair on a shared machine, the two alternate in rounds
of ``--batches`` steps and the median round of each is reported, with the ratio
server / local (target: at least 0.9). The shards run on the same machine, so both
runs use ``--threads`` torch threads (default: half the cores), leaving cores to the
shard processes. Each batch size of ``--batch-size`` (default 256 and 1024) is measured
in turn.

When deepctr-torch is installed, DeepCTR-torch's own DIN (``deepctr_torch.models.DIN``,
its defaults, 16-dim embeddings, ``torch.optim.Adagrad``, trained by its own ``fit``)
takes part in the same rounds on the same samples and batch size: user, target item and
its genres (a mean-pooled sequence feature), and the 50-item history sharing the item
table (DeepCTR has no per-history-item genres). Target: ours through the server at least
3 times its samples/s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import xdl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import din_movielens as din  # noqa: E402

TARGET_RATIO = 0.9
DEEPCTR_TARGET = 3.0


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer,
              batches: list[din.Batch], prefetch: Any = None,
              cpu: list[float] | None = None) -> float:
    """Train on ``batches``; returns the wall seconds, pushes included. The CPU seconds
    of the calling thread are appended to ``cpu`` when given (less sensitive to load
    than wall time: the training thread's own work, without shards or waiting)."""
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    start_cpu = time.thread_time()
    it: Any = iter(batches)
    if prefetch is not None:
        it = prefetch(model, batches, ids_fn=din.model_prefetch_ids(model))
    for batch in it:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(*din.model_inputs(batch)), batch["label"]).backward()
        optimizer.step()
    if prefetch is not None:  # count the time until every push is applied
        for module in model.modules():
            wait = getattr(module, "wait_pushes", None)
            if wait is not None:
                wait()
    if cpu is not None:
        cpu.append(time.thread_time() - start_cpu)
    return time.perf_counter() - start


def deepctr_din(data: Any) -> tuple[Any, Any] | None:
    """DeepCTR-torch's DIN for ``data`` and a ``fit(rows) -> seconds`` function, or None
    when deepctr-torch is not installed."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its import prints a version note
            from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
            from deepctr_torch.models import DIN as DeepCtrDIN
    except ImportError:
        return None
    dim = din.EMB_DIM
    genres = data.train["item_genres"].shape[1]
    hist = data.train["hist_items"].shape[1]
    cols = [SparseFeat("user", data.vocab["user"], embedding_dim=dim),
            SparseFeat("item_id", data.vocab["item"], embedding_dim=dim),
            VarLenSparseFeat(SparseFeat("item_genres", data.vocab["genre"], embedding_dim=dim),
                             maxlen=genres, combiner="mean"),
            VarLenSparseFeat(SparseFeat("hist_item_id", data.vocab["item"], embedding_dim=dim,
                                        embedding_name="item_id"), maxlen=hist,
                             length_name="seq_length")]
    model = DeepCtrDIN(cols, ["item_id"], seed=din.SEED)
    model.compile(torch.optim.Adagrad(model.parameters(), lr=din.LR), "binary_crossentropy")
    train = data.train
    inputs = {"user": train["user"], "item_id": train["item"],
              "item_genres": train["item_genres"].astype(np.int64),
              "hist_item_id": train["hist_items"], "seq_length": train["hist_len"]}

    def fit(rows: np.ndarray, batch_size: int, cpu: list[float] | None = None) -> float:
        x = {k: v[rows] for k, v in inputs.items()}
        start = time.perf_counter()
        start_cpu = time.thread_time()
        with contextlib.redirect_stdout(io.StringIO()):
            model.fit(x, train["label"][rows], batch_size=batch_size, epochs=1, verbose=0,
                      shuffle=False)
        if cpu is not None:
            cpu.append(time.thread_time() - start_cpu)
        return time.perf_counter() - start

    return model, fit


def measure(data: Any, args: argparse.Namespace, batch_size: int) -> bool:
    """One batch size: interleaved rounds, medians and ratios printed; whether the
    targets were met."""
    n_train = len(data.train["label"])
    rng = np.random.default_rng(din.SEED)
    steps = args.rounds * args.batches + 5  # 5 warm-up steps
    rows = np.concatenate([rng.permutation(n_train)
                           for _ in range(-(-steps * batch_size // n_train))])
    all_batches = [din.to_batch(data.train, rows[i * batch_size:(i + 1) * batch_size])
                   for i in range(steps)]
    warmup, rest = all_batches[:5], all_batches[5:]

    local = din.build_model(data, sparse=True)
    local_opt = torch.optim.Adagrad(local.parameters(), lr=din.LR)
    prefetch = functools.partial(din.torch_nn.prefetch, exact=not args.stale_prefetch)
    deepctr = None if args.no_deepctr else deepctr_din(data)
    client = xdl.connect(local_shards=args.shards)
    server: nn.Module | None = None
    server_s: list[float] = []
    local_s: list[float] = []
    deepctr_s: list[float] = []
    server_cpu: list[float] = []
    local_cpu: list[float] = []
    deepctr_cpu: list[float] = []
    loads = [os.getloadavg()[0]]
    try:
        server = xdl.swap(din.build_model(data), client,
                          optimizer=xdl.optim.Adagrad.torch(lr=din.LR), initializer=din.INIT,
                          per_table={k: {"seed": s} for k, s in din.TABLE_SEEDS.items()},
                          sync_push=False)
        server_opt = torch.optim.Adagrad(
            [p for p in server.parameters() if p.requires_grad], lr=din.LR)
        run_steps(server, server_opt, warmup, prefetch)  # kernels, caches, threads
        run_steps(local, local_opt, warmup)
        if deepctr is not None:
            deepctr[1](rows[:5 * batch_size], batch_size)
        for r in range(args.rounds):
            chunk = rest[r * args.batches:(r + 1) * args.batches]
            server_s.append(run_steps(server, server_opt, chunk, prefetch, server_cpu))
            local_s.append(run_steps(local, local_opt, chunk, cpu=local_cpu))
            if deepctr is not None:
                lo = (5 + r * args.batches) * batch_size
                deepctr_s.append(deepctr[1](rows[lo:lo + args.batches * batch_size],
                                            batch_size, deepctr_cpu))
    finally:
        if server is not None:
            din.close_distributed(server)
        client.close()

    loads.append(os.getloadavg()[0])
    samples = args.batches * batch_size
    s_rate = samples / statistics.median(server_s)
    l_rate = samples / statistics.median(local_s)
    ratio = s_rate / l_rate
    print(f"DIN MovieLens-100k, batch {batch_size}, {args.rounds} rounds x "
          f"{args.batches} steps, {args.threads} torch threads (every run), "
          f"prefetch on ({'one step stale' if args.stale_prefetch else 'exact'}); "
          f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end")
    print(f"  server ({args.shards} shards): {s_rate:10,.0f} samples/s  "
          f"(rounds: {', '.join(f'{samples / s:,.0f}' for s in server_s)})")
    print(f"  local (sparse Adagrad):  {l_rate:10,.0f} samples/s  "
          f"(rounds: {', '.join(f'{samples / s:,.0f}' for s in local_s)})")
    print(f"  training thread CPU per step (median): server "
          f"{statistics.median(server_cpu) / args.batches * 1e3:.2f} ms, local "
          f"{statistics.median(local_cpu) / args.batches * 1e3:.2f} ms")
    met = ratio >= TARGET_RATIO
    print(f"  ratio server/local: {ratio:.2f} (target >= {TARGET_RATIO}: "
          f"{'met' if met else 'NOT met'})")
    if deepctr_s:
        d_rate = samples / statistics.median(deepctr_s)
        d_ratio = s_rate / d_rate
        print(f"  DeepCTR-torch DIN (local, its fit): {d_rate:10,.0f} samples/s  "
              f"(rounds: {', '.join(f'{samples / s:,.0f}' for s in deepctr_s)}); "
              f"training thread CPU per step "
              f"{statistics.median(deepctr_cpu) / args.batches * 1e3:.2f} ms")
        d_met = d_ratio >= DEEPCTR_TARGET
        print(f"  ratio server/DeepCTR-torch: {d_ratio:.2f} (target >= {DEEPCTR_TARGET}: "
              f"{'met' if d_met else 'NOT met'})")
        met = met and d_met
    elif not args.no_deepctr:
        print("  DeepCTR-torch DIN: skipped (deepctr-torch is not installed)")
    return met


def main(argv: list[str] | None = None) -> int:
    """Measure and print samples/s and ratios for each batch size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, default=40, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch intra-op threads of every run (default: half the cores, "
                         "leaving the rest to the local shard processes and the prefetch "
                         "thread)")
    ap.add_argument("--stale-prefetch", action="store_true",
                    help="prefetch(exact=False): skip the re-pull of the rows the previous "
                         "batch's push touched (one step stale)")
    ap.add_argument("--no-deepctr", action="store_true",
                    help="leave DeepCTR-torch's DIN out even when it is installed")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a target is not met")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.set_num_threads(args.threads)
    data = din.load_data(args.cache_dir)
    met = [measure(data, args, bs) for bs in args.batch_size]
    return 1 if args.strict and not all(met) else 0


if __name__ == "__main__":
    sys.exit(main())
