"""Training throughput of DeepCTR-torch's DeepFM, unmodified, swapped onto the parameter
server, versus the same model trained locally, in the same run.

Data: the Criteo Kaggle head in ``../shared/data/criteo_kaggle_head`` (7,200 training
rows; ``--fields`` of its 26 categorical fields, label-encoded per field, and its 13
integer fields as ``log1p`` dense features). The model is ``deepctr_torch.models.DeepFM``
with its defaults (embedding L2 ``1e-5`` over the whole tables, dense embeddings), compiled
and trained with its own ``compile`` / ``fit`` and ``torch.optim.Adagrad``. The server copy
is the same model after ``xdl.swap`` onto ``--shards`` local shards: 2 tables per field
(FM/DNN embedding and linear weight), server-side Adagrad with ``weight_decay = 2 * l2``
(the server's counterpart of the L2 term). Every step's lookups go to each shard in one
``pull_many`` and its gradients in one ``push_many`` (printed below).

The two alternate, one epoch each per round, and the median round of each is reported
with the ratio server / local (target: at least 0.8). The machine is shared: read the
figures as medians under that load. Skips with a message when deepctr-torch is not
installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

TARGET_RATIO = 0.8
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "criteo_kaggle_head"
L2 = 1e-5  # DeepFM's default l2_reg_embedding and l2_reg_linear
LR = 0.01


def load_criteo(path: Path, fields: int) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                   dict[str, int]]:
    """Features (``C1..C<fields>`` label-encoded, ``I1..I13`` as ``log1p``), labels, and
    the vocabulary size of each categorical field."""
    lines = [line.rstrip("\n").split("\t") for line in path.open()]
    label = np.array([float(c[0]) for c in lines], dtype=np.float32)
    x: dict[str, np.ndarray] = {}
    for i in range(13):
        raw = np.array([float(c[1 + i]) if c[1 + i] else 0.0 for c in lines], dtype=np.float32)
        x[f"I{i + 1}"] = np.log1p(np.maximum(raw, 0.0)).astype(np.float32)
    vocab: dict[str, int] = {}
    for j in range(fields):
        _, codes = np.unique([c[14 + j] for c in lines], return_inverse=True)
        x[f"C{j + 1}"] = codes.astype(np.int64)
        vocab[f"C{j + 1}"] = int(codes.max()) + 1
    return x, label, vocab


class CountingClient:
    """A client whose ``pull`` / ``pull_many`` / ``push`` / ``push_many`` calls are counted."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.counts = {"pull": 0, "pull_many": 0, "push": 0, "push_many": 0}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in self.counts:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self.counts[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


def fit_seconds(model: Any, x: dict[str, np.ndarray], y: np.ndarray, batch_size: int,
                cpu: list[float] | None = None) -> float:
    """One epoch of the model's own ``fit`` (its prints swallowed); wall seconds. The
    CPU seconds of the calling thread are appended to ``cpu`` when given (less
    sensitive to the machine's load than wall time: what the training thread itself
    spends, without the shard processes and without waiting)."""
    start = time.perf_counter()
    start_cpu = time.thread_time()
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit({k: v.copy() for k, v in x.items()}, y, batch_size=batch_size, epochs=1,
                  verbose=0, shuffle=False)
    if cpu is not None:
        cpu.append(time.thread_time() - start_cpu)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Measure and print samples/s of both, and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data", default=str(DATA / "criteo_widresdnn_train.tsv"))
    ap.add_argument("--fields", type=int, default=26, help="categorical fields (max 26)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="epochs of each, alternating")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the rounds, profile one server epoch (cProfile) and print "
                         "its N most expensive functions by cumulative time")
    ap.add_argument("--strict", action="store_true",
                    help=f"exit 1 when the ratio is below {TARGET_RATIO}")
    args = ap.parse_args(argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from deepctr_torch.inputs import DenseFeat, SparseFeat
            from deepctr_torch.models import DeepFM
    except ImportError as exc:
        print(f"skipped: deepctr-torch is not installed ({exc}); "
              "pip install -c constraints.txt --no-deps deepctr-torch scikit-learn")
        return 0
    import torch

    import xdl

    if not Path(args.data).exists():
        print(f"skipped: {args.data} not found (see ../shared/data/README.md)")
        return 0
    torch.set_num_threads(args.threads)
    x, y, vocab = load_criteo(Path(args.data), args.fields)
    cols: list[Any] = [SparseFeat(n, v, embedding_dim=8) for n, v in vocab.items()]
    cols += [DenseFeat(f"I{i}", 1) for i in range(1, 14)]

    def build() -> Any:
        return DeepFM(cols, cols, task="binary", seed=1024)  # DeepCTR's defaults

    local = build()
    local.compile(torch.optim.Adagrad(local.parameters(), lr=LR), "binary_crossentropy")
    client = xdl.connect(local_shards=args.shards)
    counting = CountingClient(client)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the L2 list, named by swap
            server = xdl.swap(build(), counting,
                              optimizer=xdl.optim.Adagrad.torch(lr=LR, weight_decay=2 * L2))
        tables = sum(1 for m in server.modules() if hasattr(m, "remote"))
        server.compile(torch.optim.Adagrad([p for p in server.parameters() if p.requires_grad],
                                           lr=LR), "binary_crossentropy")
        fit_seconds(server, x, y, args.batch_size)  # warm-up: kernels, routes, threads
        fit_seconds(local, x, y, args.batch_size)
        counting.counts = dict.fromkeys(counting.counts, 0)
        server_s: list[float] = []
        local_s: list[float] = []
        server_cpu: list[float] = []
        local_cpu: list[float] = []
        loads = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            server_s.append(fit_seconds(server, x, y, args.batch_size, server_cpu))
            local_s.append(fit_seconds(local, x, y, args.batch_size, local_cpu))
        loads.append(os.getloadavg()[0])
        counts = dict(counting.counts)
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            fit_seconds(server, x, y, args.batch_size)
            prof.disable()
            pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(
                args.profile)
        for module in server.modules():
            if hasattr(module, "remote"):
                module.close()
    finally:
        client.close()

    n = len(y)
    steps = args.rounds * -(-n // args.batch_size)
    s_rate = n / statistics.median(server_s)
    l_rate = n / statistics.median(local_s)
    ratio = s_rate / l_rate
    print(f"DeepCTR-torch DeepFM, Criteo head ({n:,} rows, {args.fields} categorical fields, "
          f"{tables} tables), batch {args.batch_size}, {args.rounds} rounds of one epoch, "
          f"{args.threads} torch threads (both); load average {loads[0]:.1f} at the start, "
          f"{loads[1]:.1f} at the end")
    print(f"  server ({args.shards} shards): {s_rate:10,.0f} samples/s  "
          f"(rounds: {', '.join(f'{n / s:,.0f}' for s in server_s)})")
    print(f"  local (DeepCTR fit):   {l_rate:10,.0f} samples/s  "
          f"(rounds: {', '.join(f'{n / s:,.0f}' for s in local_s)})")
    steps_per_round = -(-n // args.batch_size)
    print(f"  training thread CPU per step (median): server "
          f"{statistics.median(server_cpu) / steps_per_round * 1e3:.2f} ms, local "
          f"{statistics.median(local_cpu) / steps_per_round * 1e3:.2f} ms")
    print(f"  requests per step: pull_many {counts['pull_many'] / steps:.2f}, "
          f"push_many {counts['push_many'] / steps:.2f}, single-table pull "
          f"{counts['pull'] / steps:.2f}, push {counts['push'] / steps:.2f}")
    met = ratio >= TARGET_RATIO
    print(f"  ratio server/local: {ratio:.2f} (target >= {TARGET_RATIO}: "
          f"{'met' if met else 'NOT met'})")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
