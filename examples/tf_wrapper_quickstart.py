"""XDL's script shape in TensorFlow 2: define the sparse inputs with ``xdl.embedding``,
decorate an unmodified TensorFlow model function with ``@xdl.tf_wrapper``, loop.

A small click model on hashed Criteo features (``../shared/data/criteo_kaggle_head``, or
``--data-dir``): the 26 categorical fields are looked up in one hash-mode table (one
row per field value, created on first sight by the server's initializer), the 13
bucketed integer fields in another, mean-combined per sample; the dense part is plain
Keras layers trained by a Keras optimizer. Each call of the decorated function is one
training step: rows pulled, forward, gradients of the rows pushed to the shards
(server-side Adagrad), the dense gradients applied locally.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import xdl  # noqa: E402
from xdl import datasets, metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "criteo_kaggle_head"
DIM = 8


def main(argv: list[str] | None = None) -> int:
    """Train, print the loss per epoch and the test AUC; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)
    train = datasets.read_criteo(args.data_dir / "criteo_widresdnn_train.tsv")
    test = datasets.read_criteo(args.data_dir / "criteo_widresdnn_test.tsv")
    keras.utils.set_random_seed(0)

    client = xdl.connect(local_shards=args.shards)

    # the dense part: ordinary Keras layers (any TensorFlow code would do)
    hidden = keras.layers.Dense(64, activation="relu")
    out = keras.layers.Dense(1)

    @xdl.tf_wrapper(client, optimizer=keras.optimizers.Adam(1e-3))
    def model(categorical: tf.Tensor, buckets: tf.Tensor,
              label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.concat([tf.reshape(categorical, [-1, 26 * DIM]), buckets], axis=1)
        logit = tf.squeeze(out(hidden(x)), -1)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label,
                                                                      logits=logit))
        return loss, tf.sigmoid(logit)

    def inputs(data: datasets.CriteoData, rows: np.ndarray | slice) -> tuple[object, ...]:
        hashes = data.hashes[rows]
        return (xdl.embedding("categorical", hashes[:, 13:], DIM,
                              initializer=xdl.init.TruncatedNormal(stddev=0.01),
                              optimizer=xdl.optim.Adagrad.tensorflow(lr=0.05)),
                xdl.embedding("buckets", hashes[:, :13], DIM, combiner="mean",
                              initializer=xdl.init.TruncatedNormal(stddev=0.01),
                              optimizer=xdl.optim.Adagrad.tensorflow(lr=0.05)),
                data.labels[rows])

    n = len(train.labels)
    try:
        for epoch in range(args.epochs):
            order = np.random.default_rng([0, epoch]).permutation(n)
            losses = []
            for start in range(0, n, args.batch_size):
                loss, _ = model(*inputs(train, order[start:start + args.batch_size]))
                losses.append(float(loss))
            print(f"epoch {epoch}: train loss {np.mean(losses):.4f}", flush=True)
        _, prob = model.predict(*inputs(test, slice(None)))
        print(f"test AUC {metrics.auc(test.labels, np.asarray(prob)):.4f} "
              f"({len(test.labels)} rows)")
        stats = client.describe_table("categorical")
        print(f"table 'categorical': {stats['rows']} rows on {len(stats['rows_per_shard'])} "
              "shards")
    finally:
        model.close()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
