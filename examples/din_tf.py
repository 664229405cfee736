"""Deep Interest Network (DIN) on MovieLens-100k in TensorFlow, with the embedding tables
on the parameter server, two ways:

* ``wrapper``: XDL's script shape. The model is a plain TensorFlow function decorated
  with ``@xdl.tf_wrapper``; its sparse inputs are ``xdl.embedding(...)`` descriptions,
  each call is one training step (rows pulled, gradients pushed, dense weights updated
  by a Keras optimizer), and the next batch's rows are prefetched while a step runs.
* ``keras``: an ordinary Keras model with ``keras.layers.Embedding`` layers, swapped
  with ``xdl.swap`` and trained with its own ``compile`` / ``fit`` / ``predict``.

The model and the data split are those of ``examples/din_movielens.py`` (the PyTorch
DIN): same samples (:func:`xdl.datasets.din_samples`), same initial embedding rows, the
same hyper-parameters and torch's Adagrad formula (initial accumulator 0, a tiny epsilon)
and torch's default initialisation of the dense layers, so the test AUCs are
comparable. ``--local`` also trains the ``wrapper`` model with local tables
(``tf.Variable``) for comparison.

Run ``python examples/din_tf.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import xdl  # noqa: E402
from xdl import datasets, metrics  # noqa: E402
from xdl.adapters.keras import server_optimizer  # noqa: E402
from xdl.wrapper import prefetch_batches  # noqa: E402

EMB_DIM = 16
INIT = xdl.init.TruncatedNormal(stddev=0.05)
"""Initializer of every embedding table (server and local alike)."""
SEED = 2024
TABLE_SEEDS = {"item_emb": SEED, "genre_emb": SEED + 1, "user_emb": SEED + 2}
"""Initializer seed of each table (the torch example's)."""
LR = 0.05
AUC_TOLERANCE = 0.005
TABLES = {"item_emb": "item", "genre_emb": "genre", "user_emb": "user"}
"""Table name → vocabulary it indexes."""


def adagrad(lr: float = LR) -> Any:
    """Keras Adagrad with torch's defaults (accumulator from 0, epsilon 1e-10)."""
    return keras.optimizers.Adagrad(lr, initial_accumulator_value=0.0, epsilon=1e-10)


def dense(units: int, fan_in: int, activation: str | None = None) -> Any:
    """A Dense layer initialised as ``torch.nn.Linear`` (uniform in +-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    init = keras.initializers.RandomUniform(-bound, bound)
    return keras.layers.Dense(units, activation=activation, kernel_initializer=init,
                              bias_initializer=init)


class DinHead(keras.layers.Layer):  # type: ignore[misc]
    """DIN's dense part: the local activation unit (an MLP on ``[h, t, h - t, h * t]``
    scoring each history item against the target; padding masked out; weights not
    softmax-normalised) and the MLP on ``[user, target, pooled history]`` → logit."""

    def __init__(self, dim: int = EMB_DIM, hidden: tuple[int, ...] = (128, 64),
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        item = 2 * dim
        self.attention = [dense(36, 4 * item, "relu"), dense(1, 36)]
        widths = [5 * dim, *hidden]
        self.mlp = [dense(h, w, "relu") for w, h in zip(widths, hidden, strict=False)]
        self.mlp.append(dense(1, widths[-1]))

    def call(self, user: Any, items: Any, inverse: Any, hist_mask: Any) -> Any:
        """:param user: ``[B, d]``; :param items: distinct items ``[U, 2d]``;
        :param inverse: ``[B, 1 + L]`` (slot 0 the target); :param hist_mask: ``[B, L]``.
        :returns: logits ``[B]``."""
        both = tf.gather(items, inverse)
        target, hist = both[:, 0], both[:, 1:]
        t = tf.broadcast_to(target[:, None], tf.shape(hist))
        w = tf.concat([hist, t, hist - t, hist * t], -1)
        for layer in self.attention:
            w = layer(w)
        pooled = tf.einsum("bl,bld->bd", tf.squeeze(w, -1) * hist_mask, hist)
        x = tf.concat([user, target, pooled], -1)
        for layer in self.mlp:
            x = layer(x)
        return tf.squeeze(x, -1)


def item_embeddings(item: Any, genres: Any, genre_ids: Any) -> Any:
    """``[U, 2d]``: item id embedding beside the mean of its (non-padding) genres'."""
    mask = tf.cast(genre_ids > 0, tf.float32)[..., None]
    g = tf.reduce_sum(genres * mask, -2) / tf.maximum(tf.reduce_sum(mask, -2), 1.0)
    return tf.concat([item, g], -1)


def bce(label: Any, logit: Any) -> Any:
    """Mean sigmoid cross-entropy."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=logit))


# ----------------------------------------------------------------------------- data


def load_data(cache_dir: str | None = None) -> datasets.DinData:
    """MovieLens-100k as DIN samples (see :func:`xdl.datasets.din_samples`)."""
    return datasets.din_samples(datasets.load_movielens100k(cache_dir))


Batch = dict[str, np.ndarray]


def make_batch(data: datasets.DinData, arrays: dict[str, np.ndarray], rows: Any) -> Batch:
    """One batch, its distinct items de-duplicated once here (vectorised numpy): ``uniq``
    with their ``genres``, ``inverse`` ``[B, 1 + L]`` into them, ``hist_mask``, ``user``,
    ``label``."""
    item = arrays["item"][rows]
    hist = arrays["hist_items"][rows]
    items = np.concatenate([item[:, None], hist], 1)
    uniq, inverse = np.unique(items, return_inverse=True)
    return {"uniq": uniq.astype(np.int64),
            "genres": data.item_genres[uniq].astype(np.int64),
            "inverse": inverse.reshape(items.shape).astype(np.int64),
            "hist_mask": (hist > 0).astype(np.float32),
            "user": arrays["user"][rows].astype(np.int64),
            "label": arrays["label"][rows].astype(np.float32)}


def batches(data: datasets.DinData, arrays: dict[str, np.ndarray], batch_size: int,
            seed: int | None = None, epoch: int = 0) -> Iterator[Batch]:
    """Batches in order, or shuffled by ``(seed, epoch)``."""
    n = len(arrays["label"])
    order = (np.arange(n) if seed is None
             else np.random.default_rng([seed, epoch]).permutation(n))
    for start in range(0, n, batch_size):
        yield make_batch(data, arrays, order[start:start + batch_size])


def initial_rows(data: datasets.DinData, table: str) -> np.ndarray:
    """The rows the server creates for table ``table`` (same as the torch example's)."""
    keys = np.arange(data.vocab[TABLES[table]], dtype=np.int64)
    return xdl.init.generate(INIT, TABLE_SEEDS[table], keys, EMB_DIM)


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


def scores(data: datasets.DinData, prob: np.ndarray) -> dict[str, float]:
    """Test AUC, group AUC (per user) and log loss of ``prob``."""
    y = data.test["label"]
    return {"auc": metrics.auc(y, prob), "gauc": metrics.group_auc(y, prob, data.test["user"]),
            "logloss": metrics.log_loss(y, prob)}


# ------------------------------------------------------- 1. XDL's script shape


@dataclass
class Runner:
    """One way of training the DIN step function: ``train(batch)`` → loss,
    ``predict(batch)`` → probabilities, ``prefetch(batch)`` (pull a coming batch's rows in
    the background; None when local), ``close()``."""

    name: str
    train: Callable[[Batch], Any]
    predict: Callable[[Batch], Any]
    prefetch: Callable[[Batch], Any] | None
    close: Callable[[], None]


def din_model_fn() -> Callable[..., Any]:
    """The DIN model as a plain TensorFlow function of its embeddings (dense layers
    seeded): ``(item_emb, genre_emb, user_emb, genre_ids, inverse, hist_mask, label)`` →
    ``(loss, prob)``."""
    keras.utils.set_random_seed(SEED)
    head = DinHead()

    def model_fn(item_emb: Any, genre_emb: Any, user_emb: Any, genre_ids: Any,
                 inverse: Any, hist_mask: Any, label: Any) -> Any:
        items = item_embeddings(item_emb, genre_emb, genre_ids)
        logit = head(user_emb, items, inverse, hist_mask)
        return bce(label, logit), tf.sigmoid(logit)

    return model_fn


def server_runner(client: Any, data: datasets.DinData, *, lr: float = LR,
                  sync_push: bool = True, name: str = "wrapper") -> Runner:
    """XDL's script shape: ``@xdl.tf_wrapper`` on the model function, its sparse inputs
    described with ``xdl.embedding``; each call of the decorated function is one step."""
    spec = server_optimizer(adagrad(lr))  # the tables' optimizer, Keras 3 semantics

    din = xdl.tf_wrapper(client, optimizer=adagrad(lr), sync_push=sync_push)(din_model_fn())

    def inputs(b: Batch) -> dict[str, Any]:
        def emb(table: str, ids: np.ndarray) -> Any:
            return xdl.embedding(table, ids, EMB_DIM, initializer=INIT,
                                 seed=TABLE_SEEDS[table], optimizer=spec, id_mode="index",
                                 num_rows=data.vocab[TABLES[table]])

        return {"item_emb": emb("item_emb", b["uniq"]),
                "genre_emb": emb("genre_emb", b["genres"]),
                "user_emb": emb("user_emb", b["user"]), "genre_ids": b["genres"],
                "inverse": b["inverse"], "hist_mask": b["hist_mask"], "label": b["label"]}

    return Runner(name, lambda b: din(**inputs(b))[0], lambda b: din.predict(**inputs(b))[1],
                  lambda b: din.prefetch(**inputs(b)), din.close)


def summed_slices(grad: Any) -> Any:
    """A table's ``IndexedSlices`` gradient with each id once, its occurrences summed:
    the sparse update the server makes (Keras 3's optimizers would apply a repeated id
    once per occurrence)."""
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.size(unique))
    return tf.IndexedSlices(values, unique, grad.dense_shape)


def local_runner(data: datasets.DinData, *, lr: float = LR) -> Runner:
    """The same model function with local ``tf.Variable`` tables (rows as the server's)
    and the same optimizer, sparse updates of the rows a step touches, in one
    ``tf.function`` step."""
    model_fn = din_model_fn()
    tables = {t: tf.Variable(initial_rows(data, t), name=t) for t in TABLES}
    sparse_opt, dense_opt = adagrad(lr), adagrad(lr)

    def forward(b: dict[str, Any]) -> Any:
        return model_fn(tf.gather(tables["item_emb"], b["uniq"]),
                        tf.gather(tables["genre_emb"], b["genres"]),
                        tf.gather(tables["user_emb"], b["user"]), b["genres"], b["inverse"],
                        b["hist_mask"], b["label"])

    @tf.function(reduce_retracing=True)
    def train(b: dict[str, Any]) -> Any:
        with tf.GradientTape() as tape:
            loss, _ = forward(b)
        sparse = list(tables.values())
        dense = [v for v in tape.watched_variables()
                 if v.trainable and all(v is not t for t in sparse)]
        grads = tape.gradient(loss, sparse + dense)
        sparse_opt.apply_gradients(zip([summed_slices(g) for g in grads[:3]], sparse,
                                       strict=True))
        dense_opt.apply_gradients(zip(grads[3:], dense, strict=True))
        return loss

    predict = tf.function(lambda b: forward(b)[1], reduce_retracing=True)
    return Runner("wrapper local", train, predict, None, lambda: None)


def train_runner(runner: Runner, data: datasets.DinData, epochs: int, batch_size: int,
                 *, use_prefetch: bool = True, progress: bool = True) -> Result:
    """Train ``runner`` for ``epochs`` over ``data.train`` (shuffled per epoch, the next
    batch's rows prefetched when the runner can); returns the test metrics."""
    bar = _progress(epochs * -(-len(data.train["label"]) // batch_size), runner.name,
                    progress)
    start = time.perf_counter()
    for epoch in range(epochs):
        it: Iterator[Batch] = batches(data, data.train, batch_size, SEED, epoch)
        if use_prefetch and runner.prefetch is not None:
            it = prefetch_batches(it, runner.prefetch)
        for b in it:
            runner.train(b)
            bar.update(1)
    seconds = time.perf_counter() - start
    bar.close()
    probs = [np.asarray(runner.predict(b)) for b in batches(data, data.test, 4096)]
    runner.close()
    return Result(runner.name, scores(data, np.concatenate(probs)), seconds,
                  epochs * len(data.train["label"]))


# ------------------------------------------------------------ 2. a Keras model


class DinModel(keras.Model):  # type: ignore[misc]
    """DIN as a Keras model with three ``keras.layers.Embedding`` layers, fed the raw
    features: ``user [B]``, ``item [B]``, ``hist_items [B, L]`` (int64; 0 is padding).
    The distinct items of a batch are found inside (``tf.unique``) and embedded once."""

    def __init__(self, data: datasets.DinData, dim: int = EMB_DIM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.item_emb = keras.layers.Embedding(data.vocab["item"], dim, name="item_emb")
        self.genre_emb = keras.layers.Embedding(data.vocab["genre"], dim, name="genre_emb")
        self.user_emb = keras.layers.Embedding(data.vocab["user"], dim, name="user_emb")
        self.head = DinHead(dim)
        self.item_genres = tf.constant(data.item_genres.astype(np.int64))

    def call(self, inputs: dict[str, Any]) -> Any:
        """Logits ``[B]``."""
        item = tf.cast(inputs["item"], tf.int64)
        hist = tf.cast(inputs["hist_items"], tf.int64)
        items = tf.concat([item[:, None], hist], 1)
        uniq, inverse = tf.unique(tf.reshape(items, [-1]), out_idx=tf.int64)
        genre_ids = tf.gather(self.item_genres, uniq)
        embedded = item_embeddings(self.item_emb(uniq), self.genre_emb(genre_ids), genre_ids)
        mask = tf.cast(hist > 0, tf.float32)
        return self.head(self.user_emb(inputs["user"]), embedded,
                         tf.reshape(inverse, tf.shape(items)), mask)


def keras_inputs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's inputs from a split."""
    return {k: arrays[k].astype(np.int64) for k in ("user", "item", "hist_items")}


def build_keras(data: datasets.DinData) -> DinModel:
    """A built :class:`DinModel`, dense weights seeded, embedding rows set to the rows
    the server creates (:func:`initial_rows`)."""
    keras.utils.set_random_seed(SEED)
    model = DinModel(data)
    model(keras_inputs({k: v[:2] for k, v in data.train.items()}))
    for table in TABLES:
        getattr(model, table).embeddings.assign(initial_rows(data, table))
    return model


def train_keras(data: datasets.DinData, epochs: int, batch_size: int, *, shards: int = 2,
                lr: float = LR, verbose: int = 0, client: Any = None) -> Result:
    """Swap the Keras DIN's embeddings onto ``shards`` local shards and train it with its
    own ``compile`` / ``fit``; test metrics from ``predict``.

    Each epoch is one ``fit`` call on the training set permuted as the torch example
    permutes it (``shuffle=False``), so both see the same batches: with two epochs the
    test AUC depends on the order by a few thousandths."""
    own = client is None
    if own:
        client = xdl.connect(local_shards=shards)
    try:
        model = build_keras(data)
        model = xdl.swap(model, client, optimizer=server_optimizer(adagrad(lr)),
                         prefix="keras.")
        model.compile(optimizer=adagrad(lr),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))
        inputs, label = keras_inputs(data.train), data.train["label"]
        start = time.perf_counter()
        for epoch in range(epochs):
            order = np.random.default_rng([SEED, epoch]).permutation(len(label))
            model.fit({k: v[order] for k, v in inputs.items()}, label[order],
                      batch_size=batch_size, epochs=1, shuffle=False, verbose=verbose)
        seconds = time.perf_counter() - start
        logits = model.predict(keras_inputs(data.test), batch_size=4096, verbose=0)
        result = Result(f"keras x{shards}", scores(data, 1.0 / (1.0 + np.exp(-logits))),
                        seconds, epochs * len(data.train["label"]))
        xdl.unswap(model)  # ordinary layers with the trained rows: model.save(...) works
        return result
    finally:
        if own:
            client.close()


# ------------------------------------------------------------------------ main


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False,
                file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--variant", choices=("wrapper", "keras", "both"), default="both")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--cache-dir", default=None, help="MovieLens-100k cache folder")
    p.add_argument("--local", action="store_true",
                   help="also train the wrapper model with local tables")
    p.add_argument("--no-prefetch", action="store_true",
                   help="wrapper: pull each batch's rows in its own step")
    p.add_argument("--torch-auc", type=float, default=None,
                   help="test AUC of examples/din_movielens.py to compare with (exit 1 "
                        f"when a run differs by more than {AUC_TOLERANCE})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _report(r: Result) -> None:
    m = r.metrics
    print(f"{r.name:>14}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  "
          f"logloss {m['logloss']:.4f}  train {r.seconds:.1f}s "
          f"({r.samples_per_s:,.0f} samples/s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Train the chosen variants, print their test metrics; with ``--torch-auc``,
    return 1 if one differs from it by more than :data:`AUC_TOLERANCE`."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = load_data(args.cache_dir)
    except datasets.DatasetUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MovieLens-100k DIN samples: {len(data.train['label']):,} train, "
          f"{len(data.test['label']):,} test")
    results = []
    with xdl.connect(local_shards=args.shards) as client:
        if args.variant in ("wrapper", "both"):
            runner = server_runner(client, data, lr=args.lr, name=f"wrapper x{args.shards}")
            results.append(train_runner(runner, data, args.epochs, args.batch_size,
                                        use_prefetch=not args.no_prefetch,
                                        progress=not args.no_progress))
            _report(results[-1])
        if args.variant in ("keras", "both"):
            results.append(train_keras(data, args.epochs, args.batch_size, shards=args.shards,
                                       lr=args.lr, client=client))
            _report(results[-1])
    if args.local:
        results.append(train_runner(local_runner(data, lr=args.lr), data, args.epochs,
                                    args.batch_size, progress=not args.no_progress))
        _report(results[-1])
    status = 0
    if args.torch_auc is not None:
        for r in results:
            gap = r.metrics["auc"] - args.torch_auc
            ok = abs(gap) <= AUC_TOLERANCE
            print(f"{r.name} - torch DIN: AUC {gap:+.5f} ({'ok' if ok else 'FAIL'}, "
                  f"tolerance {AUC_TOLERANCE})")
            status |= 0 if ok else 1
    print(f"total {time.perf_counter() - t0:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
