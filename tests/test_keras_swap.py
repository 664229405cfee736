"""Keras models through ``xdl.swap``: Sequential, functional and subclassed; the user's own
compile / fit / evaluate / predict; unswap, then ``model.save`` / ``load_model`` and
``model.export``. Keras 3 here; legacy Keras 2 (tf-keras) in a subprocess, since
``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
from fakes import FakeClient  # noqa: E402

import xdl  # noqa: E402
from xdl.adapters.keras import DistributedEmbedding, server_optimizer  # noqa: E402

pytestmark = pytest.mark.timeout(180)
VOCAB, DIM, WIDTH, N, BATCH, LR = 40, 4, 3, 64, 16, 0.1
TESTS = Path(__file__).resolve().parent


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.minimum(rng.geometric(0.1, size=(N, WIDTH)), VOCAB - 1).astype(np.int32)
    ids[rng.random((N, WIDTH)) < 0.2] = 0  # padding for mask_zero
    return ids, (rng.random((N, 1)) < 0.4).astype(np.float32)


def functional() -> Any:
    """One Embedding (mask_zero) called twice, plus an int32 [N, 1] column."""
    ids = keras.Input((WIDTH,), dtype="int32", name="ids")
    emb = keras.layers.Embedding(VOCAB, DIM, mask_zero=True, name="item")
    pooled = keras.layers.GlobalAveragePooling1D()(emb(ids))  # reads the mask
    first = keras.layers.Flatten()(emb(ids[:, :1]))  # an int32 [N, 1] column
    x = keras.layers.Concatenate()([pooled, first])
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dense(8, "tanh")(x))
    return keras.Model(ids, out)


def sequential() -> Any:
    return keras.Sequential([keras.Input((WIDTH,), dtype="int32"),
                             keras.layers.Embedding(VOCAB, DIM, name="item"),
                             keras.layers.Flatten(), keras.layers.Dense(1, "sigmoid")])


class Subclassed(keras.Model):  # type: ignore[misc,name-defined]
    """Two embeddings as attributes, one in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.item = keras.layers.Embedding(VOCAB, DIM)
        self.towers = [keras.layers.Embedding(VOCAB, DIM)]
        self.head = keras.layers.Dense(1, activation="sigmoid")

    def call(self, ids: Any) -> Any:
        x = tf.reduce_sum(self.item(ids), 1) + tf.reduce_mean(self.towers[0](ids), 1)
        return self.head(x)


BUILDERS: dict[str, Callable[[], Any]] = {"functional": functional, "sequential": sequential,
                                          "subclassed": Subclassed}


def build(kind: str) -> Any:
    keras.utils.set_random_seed(7)
    model = BUILDERS[kind]()
    model(data()[0][:2])  # built: the local rows exist
    return model


def fit(model: Any, epochs: int = 2) -> list[float]:
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="binary_crossentropy")
    ids, label = data()
    return model.fit(ids, label, batch_size=BATCH, epochs=epochs, shuffle=False,
                     verbose=0).history["loss"]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_swap_trains_like_local_and_unswaps_for_saving(kind: str, tmp_path: Path) -> None:
    ids, _ = data()
    local = build(kind)
    local_losses = fit(local)
    expect = local.predict(ids, verbose=0)

    model = build(kind)
    before = model.predict(ids, verbose=0)
    client = FakeClient()
    assert xdl.swap(model, client, optimizer=xdl.optim.SGD(lr=LR), prefix=f"{kind}.") is model
    embeddings = [layer for layer in model._flatten_layers()
                  if isinstance(layer, keras.layers.Embedding)]
    assert embeddings and all(isinstance(e, DistributedEmbedding) for e in embeddings)
    names = [v.path for v in model.trainable_variables]
    assert not any(n.endswith("embeddings") for n in names)
    assert sum(n.endswith("xdl_anchor") for n in names) == len(embeddings)
    np.testing.assert_array_equal(model.predict(ids, verbose=0), before)  # the same model
    if kind == "subclassed":
        assert sorted(client.tables) == ["subclassed.item", "subclassed.towers.0"]
    else:
        assert sorted(client.tables) == [f"{kind}.item"]

    losses = fit(model)
    steps = 2 * N // BATCH
    # one push per table per step, sent within the step (after the optimizer's update)
    assert len(client.pushes) == steps * len(embeddings)
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=1e-5)
    trained = model.predict(ids, verbose=0)
    np.testing.assert_allclose(trained, expect, rtol=0, atol=1e-5)
    with pytest.raises(AttributeError, match="rows live on the parameter server"):
        _ = embeddings[0].embeddings

    xdl.unswap(model)
    assert all(type(e) is keras.layers.Embedding for e in embeddings)
    np.testing.assert_allclose(model.predict(ids, verbose=0), trained, rtol=0, atol=1e-6)
    np.testing.assert_allclose(embeddings[0].embeddings.numpy(),
                               local.get_layer(index=None, name=embeddings[0].name)
                               .embeddings.numpy() if kind != "subclassed"
                               else local.item.embeddings.numpy(), rtol=0, atol=1e-5)
    if kind != "subclassed":  # a subclassed model needs its class registered to load
        model.save(tmp_path / "m.keras")
        loaded = keras.models.load_model(tmp_path / "m.keras")
        np.testing.assert_allclose(loaded.predict(ids, verbose=0), trained, rtol=0, atol=1e-6)
    if kind == "functional":
        model.export(tmp_path / "saved", verbose=False)
        restored = tf.saved_model.load(str(tmp_path / "saved"))  # keep it: it owns the variables
        np.testing.assert_allclose(restored.serve(ids).numpy(), trained, rtol=0, atol=1e-6)


def three_tables() -> Any:
    """Three Embedding layers: two on the input, one on ids computed from the first's
    rows (so its pull cannot join the others')."""
    keras.utils.set_random_seed(11)
    ids = keras.Input((WIDTH,), dtype="int32", name="ids")
    first = keras.layers.Embedding(VOCAB, DIM, name="t1")(ids)
    second = keras.layers.Embedding(VOCAB, DIM, name="t2")(ids[:, ::-1])
    derived = keras.ops.cast(keras.ops.argmax(first, -1), "int32")  # in [0, DIM)
    third = keras.layers.Embedding(VOCAB, DIM, name="t3")(derived)
    x = keras.layers.Concatenate()([keras.layers.Flatten()(t) for t in (first, second, third)])
    return keras.Model(ids, keras.layers.Dense(1, activation="sigmoid")(x))


class _Counted:
    """Counts a client method's calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_fit_pulls_a_steps_lookups_together_and_pushes_once_exactly() -> None:
    """In a traced step the lookups whose ids are known early share one pull_many (the
    derived one pulls alone), the step makes one push_many for its three tables, and
    training equals local training; two updates in one tf.function (the second
    forward's rows pulled before the first update's push) stay exact too."""
    ids, label = data(3)
    local = three_tables()
    local(ids[:2])
    local.compile(optimizer=keras.optimizers.SGD(LR), loss="binary_crossentropy")
    local_losses = local.fit(ids, label, batch_size=BATCH, epochs=1, shuffle=False,
                             verbose=0).history["loss"]
    with xdl.connect(local_shards=1) as client:
        model = three_tables()
        model(ids[:2])
        xdl.swap(model, client, optimizer=xdl.optim.SGD(lr=LR), prefix="three.")
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="binary_crossentropy")
        client.pull_many = pulls = _Counted(client.pull_many)  # type: ignore[method-assign]
        client.push_many = pushes = _Counted(client.push_many)  # type: ignore[method-assign]
        losses = model.fit(ids, label, batch_size=BATCH, epochs=1, shuffle=False,
                           verbose=0).history["loss"]
        steps = N // BATCH
        assert (pulls.calls, pushes.calls) == (2 * steps, steps)
        np.testing.assert_allclose(losses, local_losses, rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.predict(ids, verbose=0), local.predict(ids, verbose=0),
                                   rtol=0, atol=1e-5)

        def two_updates(net: Any, opt: Any) -> Callable[..., Any]:
            @tf.function
            def run(a: Any, b: Any, ya: Any, yb: Any) -> Any:
                out = []
                for x, y in ((a, ya), (b, yb)):
                    with tf.GradientTape() as tape:
                        loss = tf.reduce_mean(keras.losses.binary_crossentropy(y, net(x)))
                    grads = tape.gradient(loss, net.trainable_variables)
                    opt.apply_gradients(zip(grads, net.trainable_variables, strict=True))
                    out.append(loss)
                return tf.stack(out)
            return run

        ours = two_updates(model, keras.optimizers.SGD(LR))
        theirs = two_updates(local, keras.optimizers.SGD(LR))
        for k in range(0, N, 2 * BATCH):  # the two halves share ids: the push matters
            a, b = ids[k:k + BATCH], ids[k + BATCH:k + 2 * BATCH]
            ya, yb = label[k:k + BATCH], label[k + BATCH:k + 2 * BATCH]
            np.testing.assert_allclose(ours(a, b, ya, yb).numpy(), theirs(a, b, ya, yb).numpy(),
                                       rtol=0, atol=1e-5)
        np.testing.assert_allclose(model.predict(ids, verbose=0), local.predict(ids, verbose=0),
                                   rtol=0, atol=1e-5)
        xdl.unswap(model)


def test_mask_zero_same_mask_and_hash_mode() -> None:
    ids, label = data()
    model = build("functional")
    layer = model.get_layer("item")
    mask = layer.compute_mask(tf.constant(ids))
    client = FakeClient()
    xdl.swap(model, client, id_mode="hash", prefix="hash.")
    assert client.tables["hash.item"].initializer == xdl.init.Uniform(low=-0.05, high=0.05)
    np.testing.assert_array_equal(layer.compute_mask(tf.constant(ids)).numpy(), mask.numpy())
    out = layer(tf.constant([[2**40, 0]], tf.int64))  # raw hashes are not range-checked
    assert out.shape == (1, 2, DIM)
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    model.fit(ids, label, batch_size=BATCH, epochs=1, verbose=0)
    model.evaluate(ids, label, verbose=0)
    assert client.pushes
    with pytest.raises(xdl.errors.XdlError, match="hash mode"):
        xdl.unswap(model)


def test_server_optimizer_follows_the_keras_in_use() -> None:
    spec = server_optimizer(keras.optimizers.Adagrad(0.05))
    assert spec == xdl.optim.Adagrad(lr=0.05, initial_accumulator=0.1, eps=1e-7,
                                     eps_inside_sqrt=True)  # Keras 3: inside the root
    assert server_optimizer(keras.optimizers.SGD(0.2)) == xdl.optim.SGD(lr=0.2)
    assert server_optimizer(keras.optimizers.SGD(0.2, momentum=0.5)).variant == "tf"
    assert server_optimizer(keras.optimizers.Adam(1e-3)).eps_hat
    with pytest.raises(xdl.errors.InvalidArgumentError, match="schedule"):
        server_optimizer(keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(
            0.1, 10, 0.9)))


LEGACY = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    sys.path.insert(0, {tests!r})
    import numpy as np
    import tensorflow as tf
    keras = tf.keras
    assert keras.__name__.startswith("tf_keras"), keras.__name__
    import xdl
    from fakes import FakeClient
    from xdl.adapters.keras import DistributedEmbedding, server_optimizer

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (64, 3)).astype(np.int32)
    label = (rng.random((64, 1)) < 0.4).astype(np.float32)

    def build():
        tf.keras.utils.set_random_seed(3)
        inp = keras.Input((3,), dtype="int32")
        emb = keras.layers.Embedding(30, 4, mask_zero=True, name="item")
        x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling1D()(emb(inp)),
                                        keras.layers.Flatten()(emb(inp[:, :1]))])
        return keras.Model(inp, keras.layers.Dense(1, "sigmoid")(x))

    def fit(model):
        model.compile(keras.optimizers.Adagrad(0.05), "binary_crossentropy")
        return model.fit(ids, label, batch_size=16, epochs=3, shuffle=False,
                         verbose=0).history["loss"]

    local = build()
    local_losses = fit(local)
    model = build()
    before = model.predict(ids, verbose=0)
    spec = server_optimizer(keras.optimizers.Adagrad(0.05))
    assert spec.eps_inside_sqrt is False, spec  # tf-keras: epsilon outside the root
    client = FakeClient()  # its Adagrad divides by sqrt(accum) + eps, as tf-keras
    xdl.swap(model, client, optimizer=spec)
    layer = model.get_layer("item")
    assert isinstance(layer, DistributedEmbedding) and isinstance(layer, keras.layers.Embedding)
    assert [w.name for w in model.trainable_weights][0].endswith("xdl_anchor:0")
    np.testing.assert_array_equal(model.predict(ids, verbose=0), before)
    np.testing.assert_allclose(fit(model), local_losses, rtol=0, atol=1e-5)
    trained = model.predict(ids, verbose=0)
    np.testing.assert_allclose(trained, local.predict(ids, verbose=0), rtol=0, atol=1e-5)
    xdl.unswap(model)
    assert type(layer) is keras.layers.Embedding
    np.testing.assert_allclose(model.predict(ids, verbose=0), trained, rtol=0, atol=1e-6)
    model.save({out!r} + "/m.keras")
    loaded = keras.models.load_model({out!r} + "/m.keras")
    np.testing.assert_allclose(loaded.predict(ids, verbose=0), trained, rtol=0, atol=1e-6)
    tf.saved_model.save(model, {out!r} + "/saved")
    print("legacy ok")
""")


def test_legacy_tf_keras_in_a_subprocess(tmp_path: Path) -> None:
    pytest.importorskip("tf_keras")
    code = LEGACY.format(tests=str(TESTS), out=str(tmp_path))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=150, env=env)
    assert proc.returncode == 0 and "legacy ok" in proc.stdout, proc.stderr[-4000:]


LEGACY_TOGETHER = textwrap.dedent("""
    import os
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow as tf
    keras = tf.keras
    assert keras.__name__.startswith("tf_keras"), keras.__name__
    import xdl

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30, (64, 3)).astype(np.int32)
    label = (rng.random((64, 1)) < 0.4).astype(np.float32)

    def build():
        tf.keras.utils.set_random_seed(5)
        inp = keras.Input((3,), dtype="int32")
        first = keras.layers.Embedding(30, 4, name="t1")(inp)
        second = keras.layers.Embedding(30, 4, name="t2")(inp[:, ::-1])
        third = keras.layers.Embedding(30, 4, name="t3")(
            tf.cast(tf.argmax(first, -1), tf.int32))
        x = keras.layers.Concatenate()([keras.layers.Flatten()(t)
                                        for t in (first, second, third)])
        return keras.Model(inp, keras.layers.Dense(1, "sigmoid")(x))

    def fit(model):
        model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
        return model.fit(ids, label, batch_size=16, epochs=1, shuffle=False,
                         verbose=0).history["loss"]

    calls = {{"pull_many": 0, "push_many": 0}}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    local_losses = fit(build())
    with xdl.connect(local_shards=1) as client:
        model = xdl.swap(build(), client, optimizer=xdl.optim.SGD(lr=0.1), prefix="legacy.")
        client.pull_many = counted("pull_many", client.pull_many)
        client.push_many = counted("push_many", client.push_many)
        np.testing.assert_allclose(fit(model), local_losses, rtol=0, atol=1e-5)
        assert calls == {{"pull_many": 8, "push_many": 4}}, calls  # 4 steps
        xdl.unswap(model)
    print("legacy together ok")
""")


def test_legacy_tf_keras_pulls_a_steps_lookups_together() -> None:
    """tf-keras (whose layer calls AutoGraph converts) gets the same one pull_many for the
    lookups whose ids are known early, one push_many per step, and local training."""
    pytest.importorskip("tf_keras")
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", LEGACY_TOGETHER.format()],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0 and "legacy together ok" in proc.stdout, proc.stderr[-4000:]


def test_regularizer_is_named_and_constraint_refused() -> None:
    client = FakeClient()
    model = keras.Sequential([keras.Input((2,), dtype="int32"),
                              keras.layers.Embedding(10, 2, embeddings_regularizer="l2",
                                                     name="reg")])
    with pytest.warns(RuntimeWarning, match="embeddings_regularizer of Embedding reg"):
        xdl.swap(model, client, prefix="reg.")
    constrained = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(
        10, 2, embeddings_constraint=keras.constraints.NonNeg(), name="nonneg")])
    with pytest.raises(xdl.errors.XdlError, match="nonneg: embeddings_constraint"):
        xdl.swap(constrained, client, prefix="nonneg.")
