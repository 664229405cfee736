"""Training throughput of the TensorFlow DIN on MovieLens-100k: through the parameter
server versus locally, measured in the same run, at batch 256 and 1024.

Two pairs, each the same model and the same batches (``examples/din_tf.py``):

* ``wrapper``: the ``@xdl.tf_wrapper`` step (one ``tf.function``; every lookup in one
  host callback with one ``pull_many``, one ``push_many`` sent in the background; the
  next batch announced with ``prefetch`` and its rows pulled right after the push,
  exactly, unless ``--no-prefetch``) versus the same
  model function with local ``tf.Variable`` tables and the same Adagrad, in one
  ``tf.function`` step;
* ``keras`` (``--keras``): the Keras DIN swapped onto the shards and trained with
  ``fit`` (its three ``Embedding`` lookups pulled with one ``pull_many`` per step, one
  ``push_many`` after the optimizer's update; no prefetch: ``fit`` does not show the
  next batch) versus the unswapped model's ``fit``.

To be fair on a shared machine the server and local runs alternate in rounds of
``--batches`` steps and the median round of each is reported, with the ratio
server / local (target: at least 0.9), and the median of the per-round ratios (each
server round against the local round right after it: the two see about the same load).
The shards run on the same machine, so both runs get ``--threads`` TensorFlow threads
(default: half the cores). Beside the rates, the CPU time per step of each run: this
process (all its threads) and, for the server run, the shard processes (from ``/proc``),
which depends much less on what else the machine runs than wall time does; and the load
average when the pair was measured.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import din_tf as din  # noqa: E402

import xdl  # noqa: E402

TARGET_RATIO = 0.9
WARMUP = 5


def children_cpu() -> float:
    """CPU seconds used so far by this process's child processes (the local shards), read
    from ``/proc`` (0.0 where there is none)."""
    me, hz, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields from "state": ppid, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / hz
    return total


class Rounds:
    """Wall and CPU seconds of each round of one run."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []  # this process, every thread
        self.shards: list[float] = []  # the child processes

    def timed(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` as one round."""
        shards, cpu = children_cpu(), time.process_time()
        start = time.perf_counter()
        fn()
        self.wall.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)
        self.shards.append(children_cpu() - shards)


def wrapper_rounds(client: Any, data: Any, batches: list[din.Batch], per_round: int,
                   rounds: int, sync_push: bool = True, use_prefetch: bool = True
                   ) -> tuple[Rounds, Rounds]:
    """Rounds of the server and the local wrapper runner."""
    server = din.server_runner(client, data, name="server", sync_push=sync_push)
    if not use_prefetch:
        server.prefetch = None
    local = din.local_runner(data)

    def run(runner: din.Runner, chunk: list[din.Batch]) -> None:
        it: Any = iter(chunk)
        if runner.prefetch is not None:
            it = din.prefetch_batches(chunk, runner.prefetch)
        for b in it:
            runner.train(b)
        if runner is server:
            runner.close()  # count the time until every push is applied

    run(server, batches[:WARMUP])
    run(local, batches[:WARMUP])
    server_s, local_s = Rounds(), Rounds()
    for r in range(rounds):
        chunk = batches[WARMUP + r * per_round:WARMUP + (r + 1) * per_round]
        server_s.timed(functools.partial(run, server, chunk))
        local_s.timed(functools.partial(run, local, chunk))
    return server_s, local_s


def keras_rounds(client: Any, data: Any, rows: np.ndarray, batch_size: int, per_round: int,
                 rounds: int, sync_push: bool = True) -> tuple[Rounds, Rounds]:
    """Rounds of ``fit`` on the swapped and on the local Keras DIN."""
    keras = din.keras
    local = din.build_keras(data)
    server = xdl.swap(din.build_keras(data), client,
                      optimizer=din.server_optimizer(din.adagrad()),
                      prefix=f"bench{batch_size}.", sync_push=sync_push)
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    for model in (local, server):
        model.compile(optimizer=din.adagrad(), loss=loss)
    inputs, label = din.keras_inputs(data.train), data.train["label"]

    def fit(model: Any, lo: int, steps: int) -> None:
        idx = rows[lo * batch_size:(lo + steps) * batch_size]
        model.fit({k: v[idx] for k, v in inputs.items()}, label[idx], batch_size=batch_size,
                  epochs=1, shuffle=False, verbose=0)

    fit(server, 0, WARMUP)
    fit(local, 0, WARMUP)
    server_s, local_s = Rounds(), Rounds()
    for r in range(rounds):
        lo = WARMUP + r * per_round
        server_s.timed(functools.partial(fit, server, lo, per_round))
        local_s.timed(functools.partial(fit, local, lo, per_round))
    xdl.unswap(server)
    return server_s, local_s


def report(name: str, batch_size: int, per_round: int, server_s: Rounds,
           local_s: Rounds) -> float:
    """Print one pair's rates, CPU per step and load, and return the ratio server / local
    (of the median rounds)."""
    samples = per_round * batch_size
    s_rate = samples / statistics.median(server_s.wall)
    l_rate = samples / statistics.median(local_s.wall)
    ratio = s_rate / l_rate
    paired = statistics.median(lo / se for se, lo in zip(server_s.wall, local_s.wall,
                                                          strict=True))
    print(f"  {name:<8} batch {batch_size:>5}: server {s_rate:9,.0f} samples/s  local "
          f"{l_rate:9,.0f} samples/s  ratio {ratio:.2f} "
          f"({'met' if ratio >= TARGET_RATIO else 'NOT met'}, target >= {TARGET_RATIO}); "
          f"median of the per-round ratios {paired:.2f}; load average "
          f"{os.getloadavg()[0]:.1f}")

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values) / per_round

    print(f"      CPU ms/step: server {ms(server_s.cpu):.2f} (this process) + "
          f"{ms(server_s.shards):.2f} (shards), local {ms(local_s.cpu):.2f}; wall ms/step "
          f"server {ms(server_s.wall):.2f}, local {ms(local_s.wall):.2f}")
    print(f"      rounds server: {', '.join(f'{samples / s:,.0f}' for s in server_s.wall)}")
    print(f"      rounds local:  {', '.join(f'{samples / s:,.0f}' for s in local_s.wall)}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    """Measure and print samples/s of server and local runs and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--batch-sizes", default="256,1024")
    ap.add_argument("--batches", type=int, default=30, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="TensorFlow intra- and inter-op threads of both runs")
    ap.add_argument("--keras", action="store_true", help="also the Keras fit pair")
    ap.add_argument("--async-push", action="store_true",
                    help="server runs with sync_push=False: a pull does not wait for the "
                         "acknowledgement of the table's previous push (a shard applies a "
                         "client's requests in order, so the pull still sees it)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="wrapper: pull each step's rows in the step (on a small, busy "
                         "machine the prefetch threads can cost more than they hide)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--strict", action="store_true",
                    help=f"exit 1 when a ratio is below {TARGET_RATIO}")
    args = ap.parse_args(argv)
    tf = din.tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    data = din.load_data(args.cache_dir)
    n_train = len(data.train["label"])
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    print(f"TensorFlow DIN, MovieLens-100k, {args.rounds} rounds x {args.batches} steps, "
          f"{args.shards} local shards, {args.threads} TF threads, "
          f"{'async' if args.async_push else 'sync'} pushes, prefetch "
          f"{'off' if args.no_prefetch else 'on (exact)'}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratios = []
    with xdl.connect(local_shards=args.shards) as client:
        for batch_size in sizes:
            steps = WARMUP + args.rounds * args.batches
            rng = np.random.default_rng(din.SEED)
            rows = np.concatenate([rng.permutation(n_train)
                                   for _ in range(-(-steps * batch_size // n_train))])
            batches = [din.make_batch(data, data.train,
                                      rows[i * batch_size:(i + 1) * batch_size])
                       for i in range(steps)]
            server_s, local_s = wrapper_rounds(client, data, batches, args.batches,
                                               args.rounds, not args.async_push,
                                               not args.no_prefetch)
            ratios.append(report("wrapper", batch_size, args.batches, server_s, local_s))
            if args.keras:
                server_s, local_s = keras_rounds(client, data, rows, batch_size, args.batches,
                                                 args.rounds, not args.async_push)
                ratios.append(report("keras", batch_size, args.batches, server_s, local_s))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 1 if args.strict and min(ratios) < TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
