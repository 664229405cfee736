"""Logistic regression on hashed Criteo features with the plain numpy client API.

Every feature value of the 39 Criteo fields is hashed (stably, salted by field) to an
int64 id; the model is one weight per id plus a bias id, kept in a ``dim=1`` table on
two local server shards. Each step pulls the batch's unique ids, computes the logistic
loss gradient in numpy, and pushes one gradient per unique id; the shards apply
Adagrad. No deep-learning framework is involved.

Data: ``../shared/data/criteo_kaggle_head`` (relative to the repository root), or
``--data-dir``: the first rows of the Criteo Kaggle training file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import xdl
from xdl import datasets, metrics

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "criteo_kaggle_head"
TABLE = "criteo_lr"
BIAS_ID = np.int64(0x5EED)  # not produced by the field hashes in practice


def with_bias(hashes: np.ndarray) -> np.ndarray:
    """Append the bias id as a 40th column of ``[n, 39]`` feature hashes."""
    return np.concatenate([hashes, np.full((len(hashes), 1), BIAS_ID)], axis=1)


def predict(client: xdl.Client, ids: np.ndarray) -> np.ndarray:
    """Click probabilities of rows of ids ``[n, F]`` (weights pulled from the server)."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    w = client.pull(TABLE, uniq, unique=True)[:, 0]
    logits = w[inverse.reshape(ids.shape)].sum(axis=1)
    return 1.0 / (1.0 + np.exp(-logits))


def train_step(client: xdl.Client, ids: np.ndarray, labels: np.ndarray) -> float:
    """One SGD step on a batch: pull, gradient of the mean log loss, asynchronous push.

    :returns: the batch's log loss before the update.
    """
    uniq, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(ids.shape)
    w = client.pull(TABLE, uniq, unique=True)[:, 0]
    p = 1.0 / (1.0 + np.exp(-w[inverse].sum(axis=1)))
    g = (p - labels) / len(labels)  # d mean-loss / d logit
    grads = np.bincount(inverse.ravel(), weights=np.repeat(g, ids.shape[1]),
                        minlength=len(uniq))
    client.push(TABLE, uniq, grads.astype(np.float32)[:, None], unique=True)
    return metrics.log_loss(labels, p)


def main(argv: list[str] | None = None) -> int:
    """Train on the train file, report train log loss per epoch and the test AUC."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args(argv)

    train = datasets.read_criteo(args.data_dir / "criteo_widresdnn_train.tsv")
    test = datasets.read_criteo(args.data_dir / "criteo_widresdnn_test.tsv")
    x_train, x_test = with_bias(train.hashes), with_bias(test.hashes)
    print(f"Criteo head: {len(train.labels):,} train, {len(test.labels):,} test rows")

    t0 = time.perf_counter()
    with xdl.connect(local_shards=args.shards) as client:
        client.create_table(TABLE, dim=1, initializer=xdl.init.Zeros(),
                            optimizer=xdl.optim.Adagrad.torch(lr=args.lr))
        rng = np.random.default_rng(0)
        for epoch in range(args.epochs):
            perm = rng.permutation(len(train.labels))
            losses = [train_step(client, x_train[b], train.labels[b])
                      for b in np.array_split(perm, max(1, len(perm) // args.batch_size))]
            client.wait()
            print(f"epoch {epoch + 1}: train logloss {np.mean(losses):.4f}")
        p = predict(client, x_test)
        rows = client.describe_table(TABLE)["rows"]
    print(f"test AUC {metrics.auc(test.labels, p):.4f}  logloss "
          f"{metrics.log_loss(test.labels, p):.4f}  ({rows:,} weights, "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
