"""Invariant 1 for TensorFlow: training through the server matches local training.

The same embedding-bag + MLP model is trained 200 steps locally (a ``tf.Variable``
table, rows from ``xdl.init.generate``, Keras ``SGD`` / ``Adagrad`` on every variable)
and through the server (``@xdl.tf_wrapper`` with ``xdl.embedding``, the table's optimizer
from :func:`xdl.adapters.keras.server_optimizer`, so Keras 3's Adagrad with epsilon inside
the square root), eagerly and under ``tf.function``, on 1 and 3 shards (each optimizer
on both cluster sizes and in both modes). Losses and final weights agree within 1e-5.
A swapped Keras model trained with ``fit`` (Adagrad, 3 shards) matches the same model's
local ``fit``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import xdl  # noqa: E402
from xdl.adapters.keras import server_optimizer  # noqa: E402

pytestmark = pytest.mark.timeout(240)
VOCAB, DIM, BAG, BATCH, STEPS, SEED, LR = 50, 8, 3, 16, 200, 7, 0.05
INIT = xdl.init.Normal(stddev=0.1)
TOL = 1e-5
OPTIMIZERS = {"sgd": keras.optimizers.SGD, "adagrad": keras.optimizers.Adagrad}


def data() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    for _ in range(STEPS):
        # a skewed id distribution, so batches repeat ids (their gradients must sum)
        ids = np.minimum(rng.geometric(0.08, size=(BATCH, BAG)) - 1, VOCAB - 1)
        yield ids.astype(np.int64), (rng.random(BATCH) < 0.3).astype(np.float32)


def head() -> Any:
    """The dense part (same seed, same weights)."""
    keras.utils.set_random_seed(SEED)
    mlp = keras.Sequential([keras.Input((DIM,)), keras.layers.Dense(16, "tanh"),
                            keras.layers.Dense(1)])
    return mlp


def bce(label: Any, logit: Any) -> Any:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=label,
                                                                  logits=logit))


@functools.cache
def local_run(opt_name: str, graph: bool) -> tuple[list[float], np.ndarray, list[np.ndarray]]:
    """Local training (once per optimizer and mode): losses, table, dense weights."""
    mlp = head()
    table = tf.Variable(xdl.init.generate(INIT, SEED, np.arange(VOCAB, dtype=np.int64), DIM))
    opt = OPTIMIZERS[opt_name](LR)

    def step(ids: Any, label: Any) -> Any:
        with tf.GradientTape() as tape:
            emb = tf.reduce_sum(tf.gather(table, ids), 1)
            loss = bce(label, tf.squeeze(mlp(emb), -1))
        variables = [table, *mlp.trainable_variables]
        grads = tape.gradient(loss, variables)
        grads[0] = tf.convert_to_tensor(grads[0])  # rows not in the batch: zero gradient
        opt.apply_gradients(zip(grads, variables, strict=True))
        return loss

    run = tf.function(step) if graph else step
    losses = [float(run(ids, label)) for ids, label in data()]
    return losses, table.numpy(), [v.numpy() for v in mlp.trainable_variables]


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, Any]]:
    """Real clusters of 1 and 3 shards (started on first use, always closed)."""

    class Lazy(dict[str, Any]):
        def __missing__(self, key: str) -> Any:
            self[key] = xdl.connect(local_shards=int(key.split("-")[0]))
            return self[key]

    lazy = Lazy()
    yield lazy
    for client in lazy.values():
        client.close()


# every pair of (optimizer, shards, mode) values appears once: a lean matrix for a
# slow framework (the full product adds nothing these four do not already cross)
MATRIX = [("sgd", "1-shard", False), ("sgd", "3-shards", True),
          ("adagrad", "1-shard", True), ("adagrad", "3-shards", False)]


@pytest.mark.parametrize("opt_name, where, graph", MATRIX,
                         ids=[f"{o}-{w}-{'tf.function' if g else 'eager'}" for o, w, g in MATRIX])
def test_tf_wrapper_matches_local(clients: dict[str, Any], where: str, opt_name: str,
                                  graph: bool) -> None:
    local_losses, local_table, local_dense = local_run(opt_name, graph)
    client = clients[where]
    table = f"eq-{opt_name}-{int(graph)}"
    mlp = head()
    keras_opt = OPTIMIZERS[opt_name](LR)

    @xdl.tf_wrapper(client, optimizer=keras_opt, graph=graph)
    def model_fn(emb: Any, label: Any) -> Any:
        logit = tf.squeeze(mlp(emb), -1)
        return bce(label, logit), tf.sigmoid(logit)

    spec = server_optimizer(OPTIMIZERS[opt_name](LR))
    losses = []
    for ids, label in data():
        loss, prob = model_fn(xdl.embedding(table, ids, DIM, combiner="sum", initializer=INIT,
                                            seed=SEED, optimizer=spec), label)
        losses.append(float(loss))
    assert prob.shape == (BATCH,)
    model_fn.close()
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    np.testing.assert_allclose(client.pull(table, np.arange(VOCAB)), local_table, rtol=0,
                               atol=TOL)
    for got, want in zip(mlp.trainable_variables, local_dense, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=TOL)
    assert abs(local_losses[-1] - local_losses[0]) > 1e-3  # it did learn something


def test_keras_fit_with_adagrad_matches_local(clients: dict[str, Any]) -> None:
    """Keras 3 Adagrad (epsilon inside the root) on the server, through ``fit``.

    No id repeats within a batch here: Keras 3's own Adagrad applies an Embedding's
    ``IndexedSlices`` gradient per occurrence (a repeated id accumulates the square of
    each occurrence), where the server, tf-keras and TensorFlow's sparse kernels sum the
    occurrences first (docs/tensorflow.md); the tf.function test above covers repeats.
    """
    rng = np.random.default_rng(SEED)
    ids = np.concatenate([rng.permutation(VOCAB)[:BATCH * BAG].reshape(BATCH, BAG)
                          for _ in range(STEPS)])
    label = (rng.random((STEPS * BATCH, 1)) < 0.3).astype(np.float32)

    def build() -> Any:
        keras.utils.set_random_seed(SEED)
        inp = keras.Input((BAG,), dtype="int64")
        x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCAB, DIM,
                                                                         name="emb")(inp))
        model = keras.Model(inp, keras.layers.Dense(1, "sigmoid")(
            keras.layers.Dense(16, "tanh")(x)))
        return model

    def fit(model: Any) -> list[float]:
        model.compile(keras.optimizers.Adagrad(LR), "binary_crossentropy")
        return model.fit(ids, label, batch_size=BATCH, epochs=1, shuffle=False,
                         verbose=0).history["loss"]

    local = build()
    local_loss = fit(local)
    model = xdl.swap(build(), clients["3-shards"],
                     optimizer=server_optimizer(keras.optimizers.Adagrad(LR)), prefix="fit.")
    np.testing.assert_allclose(fit(model), local_loss, rtol=0, atol=TOL)
    xdl.unswap(model)
    np.testing.assert_allclose(model.get_layer("emb").embeddings.numpy(),
                               local.get_layer("emb").embeddings.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(model.predict(ids[:64], verbose=0),
                               local.predict(ids[:64], verbose=0), rtol=0, atol=TOL)


def test_tf_wrapper_with_prefetch_matches_local(clients: dict[str, Any]) -> None:
    """``model_fn.prefetch`` of the coming batch (pulled right after the running step's
    push, one pull_many for every table): training equals local training, also when an
    announced batch does not come (every 10th step announces a wrong one)."""
    local_losses, local_table, local_dense = local_run("adagrad", True)
    client = clients["3-shards"]
    mlp = head()

    @xdl.tf_wrapper(client, optimizer=keras.optimizers.Adagrad(LR))
    def model_fn(emb: Any, other: Any, label: Any) -> Any:
        logit = tf.squeeze(mlp(emb), -1) + 0.0 * tf.reduce_sum(other)
        return bce(label, logit), tf.sigmoid(logit)

    spec = server_optimizer(keras.optimizers.Adagrad(LR))
    used = 0

    def inputs(batch: tuple[np.ndarray, np.ndarray]) -> tuple[Any, ...]:
        ids, label = batch
        return (xdl.embedding("eq-prefetch", ids, DIM, combiner="sum", initializer=INIT,
                              seed=SEED, optimizer=spec),
                xdl.embedding("eq-prefetch-other", ids[:, 0], 4, optimizer=spec), label)

    def schedule(batch: tuple[np.ndarray, np.ndarray]) -> None:
        nonlocal used
        used += 1
        model_fn.prefetch(*inputs(batch if used % 10 else (batch[0] + 1, batch[1])))

    losses = [float(model_fn(*inputs(b))[0])
              for b in xdl.prefetch_batches(data(), schedule)]
    model_fn.close()
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    np.testing.assert_allclose(client.pull("eq-prefetch", np.arange(VOCAB)), local_table,
                               rtol=0, atol=TOL)
    for got, want in zip(mlp.trainable_variables, local_dense, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=TOL)
