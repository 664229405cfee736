"""Deep Interest Network (DIN) in MXNet Gluon on MovieLens-100k, trained through the
parameter server and, for comparison, locally.

The same model and data as ``examples/din_movielens.py`` (the PyTorch DIN): an item is
its id embedding beside the mean of its genre embeddings, an attention unit scores the
user's time-ordered history against the target, an MLP gives the click logit (label:
rating >= 4); split by time per user. The model is an ordinary hybridized Gluon
``HybridBlock`` with ``gluon.nn.Embedding`` layers, trained with ``gluon.Trainer``
(Adagrad). ``xdl.swap`` moves the three embedding tables onto local server shards
(server-side Adagrad in MXNet's semantics); the Trainer keeps training the dense part.
The local run trains the unswapped model (``sparse_grad=True`` embeddings) with the same
seed and initial rows. Run ``python examples/din_mxnet.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

import xdl
from xdl import datasets, metrics
from xdl.backends.mxnet_backend import import_mxnet

mx = import_mxnet()  # MXNet 1.9.1 needs the numpy.bool shim; the backend applies it
from mxnet import autograd, gluon, nd  # noqa: E402

EMB_DIM = 16
INIT = xdl.init.TruncatedNormal(stddev=0.05)
"""Initial rows of every embedding table (server and local alike)."""
SEED = 2024
TABLE_SEEDS = {"item_emb": SEED, "genre_emb": SEED + 1, "user_emb": SEED + 2}
"""Seed of each table's initial rows, by block attribute (= table name after swap)."""
LR = 0.05
AUC_TOLERANCE = 0.005
FEATURES = ("user", "items", "genres")


def _dense(units: int, fan_in: int, activation: str | None = None) -> gluon.nn.Dense:
    """``Dense`` initialised as torch's ``nn.Linear`` (weights and bias uniform in
    ``±1/sqrt(fan_in)``), so this DIN starts like the PyTorch one."""
    bound = 1.0 / math.sqrt(fan_in)
    return gluon.nn.Dense(units, activation=activation, in_units=fan_in, flatten=False,
                          weight_initializer=mx.init.Uniform(bound),
                          bias_initializer=mx.init.Uniform(bound))


class Attention(gluon.HybridBlock):
    """DIN's local activation unit: an MLP on ``[h, t, h - t, h * t]`` scores each history
    item; padding slots are masked out and the weighted history is sum-pooled."""

    def __init__(self, dim: int, hidden: int = 36, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.hidden = _dense(hidden, 4 * dim, "relu")
            self.out = _dense(1, hidden)

    def hybrid_forward(self, F: Any, hist: Any, target: Any, mask: Any) -> Any:  # noqa: N803
        """:param hist: ``[B, L, D]``; :param target: ``[B, D]``; :param mask: ``[B, L]``."""
        t = F.broadcast_like(F.expand_dims(target, axis=1), hist)
        w = self.out(self.hidden(F.concat(hist, t, hist - t, hist * t, dim=-1)))
        w = F.squeeze(w, axis=-1) * mask
        return F.squeeze(F.batch_dot(F.expand_dims(w, axis=1), hist), axis=1)


class DIN(gluon.HybridBlock):
    """DIN for one target item and a history. Inputs: ``user [B]``, ``items [B, 1 + L]``
    (the target in slot 0, then the history, 0 = padding) and their ``genres
    [B, 1 + L, G]``. Output: click logits ``[B]``."""

    def __init__(self, n_items: int, n_genres: int, n_users: int, dim: int = EMB_DIM,
                 hidden: tuple[int, ...] = (128, 64), sparse_grad: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            self.item_emb = gluon.nn.Embedding(n_items, dim, sparse_grad=sparse_grad)
            self.genre_emb = gluon.nn.Embedding(n_genres, dim, sparse_grad=sparse_grad)
            self.user_emb = gluon.nn.Embedding(n_users, dim, sparse_grad=sparse_grad)
            self.attention = Attention(2 * dim)
            self.mlp = gluon.nn.HybridSequential()
            width = 5 * dim
            for h in hidden:
                self.mlp.add(_dense(h, width, "relu"))
                width = h
            self.mlp.add(_dense(1, width))

    def hybrid_forward(self, F: Any, user: Any, items: Any, genres: Any) -> Any:  # noqa: N803
        """Click logits ``[B]``."""
        g = self.genre_emb(genres)  # [B, 1+L, G, D]
        gmask = F.expand_dims(genres > 0, axis=-1)
        g = F.broadcast_div(F.sum(F.broadcast_mul(g, gmask), axis=-2),
                            F.maximum(F.sum(gmask, axis=-2), 1.0))
        both = F.concat(self.item_emb(items), g, dim=-1)  # [B, 1+L, 2D]
        target = F.squeeze(F.slice_axis(both, axis=1, begin=0, end=1), axis=1)
        hist = F.slice_axis(both, axis=1, begin=1, end=None)
        mask = F.slice_axis(items > 0, axis=1, begin=1, end=None)
        pooled = self.attention(hist, target, mask)
        x = F.concat(self.user_emb(user), target, pooled, dim=-1)
        return F.squeeze(self.mlp(x), axis=-1)


# ----------------------------------------------------------------------------- data


def load_data(cache_dir: str | None = None) -> datasets.DinData:
    """MovieLens-100k as DIN samples (the split of ``examples/din_movielens.py``)."""
    return datasets.din_samples(datasets.load_movielens100k(cache_dir))


def model_arrays(arrays: dict[str, np.ndarray], rows: np.ndarray | slice
                 ) -> dict[str, np.ndarray]:
    """The model's inputs for ``rows``: ``user``, ``items`` (target then history),
    ``genres`` and ``label`` (float32 ids, as Gluon feeds them)."""
    items = np.concatenate([arrays["item"][rows][:, None], arrays["hist_items"][rows]], 1)
    genres = np.concatenate([arrays["item_genres"][rows][:, None],
                             arrays["hist_genres"][rows]], 1)
    return {"user": arrays["user"][rows].astype(np.float32),
            "items": items.astype(np.float32), "genres": genres.astype(np.float32),
            "label": arrays["label"][rows].astype(np.float32)}


def to_batch(arrays: dict[str, np.ndarray], rows: np.ndarray | slice) -> dict[str, Any]:
    """:func:`model_arrays` as NDArrays."""
    return {k: nd.array(v, dtype=np.float32) for k, v in model_arrays(arrays, rows).items()}


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int
            ) -> Iterator[dict[str, Any]]:
    """Shuffled training batches; the order depends only on ``(seed, epoch)`` (the same
    order as the PyTorch example)."""
    n = len(arrays["label"])
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        yield to_batch(arrays, perm[start:start + batch_size])


# ---------------------------------------------------------------------------- model


def build_model(data: datasets.DinData, sparse_grad: bool = False) -> DIN:
    """A hybridized DIN for ``data``'s vocabularies: dense weights from ``mx.random``
    seeded with :data:`SEED`, each table's rows ``xdl.init.generate(INIT, seed, keys)``."""
    mx.random.seed(SEED)
    net = DIN(data.vocab["item"], data.vocab["genre"], data.vocab["user"],
              sparse_grad=sparse_grad, prefix="din_")
    net.initialize(ctx=mx.cpu())
    for name, seed in TABLE_SEEDS.items():
        emb = getattr(net, name)
        n = emb.weight.shape[0]
        rows = xdl.init.generate(INIT, seed, np.arange(n, dtype=np.int64), EMB_DIM)
        emb.weight.set_data(nd.array(rows))
    net.hybridize(static_alloc=True)
    return net


def trainer_for(net: gluon.Block, lr: float = LR) -> gluon.Trainer:
    """``gluon.Trainer`` with Adagrad on every parameter the net exposes."""
    return gluon.Trainer(net.collect_params(), "adagrad", {"learning_rate": lr})


def inputs(batch: dict[str, Any]) -> tuple[Any, ...]:
    """The model's positional inputs."""
    return tuple(batch[k] for k in FEATURES)


def evaluate(net: gluon.Block, arrays: dict[str, np.ndarray], batch_size: int = 4096
             ) -> dict[str, float]:
    """Test AUC, group AUC (per user) and log loss."""
    probs = []
    for start in range(0, len(arrays["label"]), batch_size):
        b = to_batch(arrays, slice(start, start + batch_size))
        probs.append(nd.sigmoid(net(*inputs(b))).asnumpy())
    p = np.concatenate(probs)
    y = arrays["label"]
    return {"auc": metrics.auc(y, p), "gauc": metrics.group_auc(y, p, arrays["user"]),
            "logloss": metrics.log_loss(y, p)}


@dataclass
class Result:
    """Outcome of one training run."""

    name: str
    metrics: dict[str, float]
    seconds: float
    samples: int

    @property
    def samples_per_s(self) -> float:
        """Training throughput."""
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def train_loop(net: gluon.Block, trainer: gluon.Trainer, data: datasets.DinData,
               epochs: int, batch_size: int) -> float:
    """Train ``net`` for ``epochs``; returns the seconds spent."""
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(epochs):
        for batch in batches(data.train, batch_size, SEED, epoch):
            with autograd.record():
                loss = loss_fn(net(*inputs(batch)), batch["label"])
            loss.backward()
            trainer.step(batch["label"].shape[0])
    nd.waitall()
    return time.perf_counter() - start


def train_local(data: datasets.DinData, epochs: int, batch_size: int, lr: float = LR
                ) -> Result:
    """Train DIN locally (``sparse_grad=True`` embeddings, ``gluon.Trainer`` Adagrad)."""
    net = build_model(data, sparse_grad=True)
    seconds = train_loop(net, trainer_for(net, lr), data, epochs, batch_size)
    return Result("local", evaluate(net, data.test), seconds,
                  epochs * len(data.train["label"]))


def train_server(data: datasets.DinData, epochs: int, batch_size: int, shards: int = 2,
                 lr: float = LR) -> Result:
    """Train DIN with its tables on ``shards`` local shards (``xdl.swap``, server-side
    Adagrad in MXNet's semantics) and the dense part with ``gluon.Trainer``."""
    net = build_model(data)
    with xdl.connect(local_shards=shards) as client:
        # the tables start from the layers' rows; initializer and seeds say the same
        net = xdl.swap(net, client, optimizer=xdl.optim.Adagrad.mxnet(lr=lr),
                       initializer=INIT,
                       per_table={k: {"seed": s} for k, s in TABLE_SEEDS.items()})
        seconds = train_loop(net, trainer_for(net, lr), data, epochs, batch_size)
        result = Result(f"server x{shards}", evaluate(net, data.test), seconds,
                        epochs * len(data.train["label"]))
        xdl.unswap(net, client)
    return result


def _report(r: Result) -> None:
    m = r.metrics
    print(f"{r.name:>10}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  "
          f"logloss {m['logloss']:.4f}  train {r.seconds:.1f}s "
          f"({r.samples_per_s:,.0f} samples/s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--cache-dir", default=None, help="MovieLens-100k cache folder")
    p.add_argument("--no-local", action="store_true", help="skip the local run")
    p.add_argument("--no-server", action="store_true", help="skip the server run")
    p.add_argument("--torch-auc", type=float, default=None,
                   help="the PyTorch DIN's test AUC (examples/din_movielens.py): exit 1 "
                        f"when the server run's AUC is not within {AUC_TOLERANCE} of it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train through the server and locally and print both; exit 1 when the server
    AUC is more than :data:`AUC_TOLERANCE` from local (or from ``--torch-auc``)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = load_data(args.cache_dir)
    except datasets.DatasetUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MovieLens-100k DIN samples: {len(data.train['label']):,} train, "
          f"{len(data.test['label']):,} test")
    server = local = None
    if not args.no_server:
        server = train_server(data, args.epochs, args.batch_size, args.shards, args.lr)
        _report(server)
    if not args.no_local:
        local = train_local(data, args.epochs, args.batch_size, args.lr)
        _report(local)
    status = 0
    if server is not None and local is not None:
        gap = server.metrics["auc"] - local.metrics["auc"]
        print(f"difference (server - local): AUC {gap:+.5f} (tolerance {AUC_TOLERANCE})")
        status |= abs(gap) > AUC_TOLERANCE
    ran = server or local
    if args.torch_auc is not None and ran is not None:
        gap = ran.metrics["auc"] - args.torch_auc
        print(f"difference (mxnet - torch): AUC {gap:+.5f} (tolerance {AUC_TOLERANCE})")
        status |= not abs(gap) <= AUC_TOLERANCE
    print(f"total {time.perf_counter() - t0:.1f}s")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
