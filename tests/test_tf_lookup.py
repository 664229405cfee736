"""The tensorflow backend and the ``tf.nn`` surface: lookups and the gradients they push,
eagerly and inside ``tf.function``, checked against TensorFlow's own ops on a local
variable holding the same rows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from fakes import FakeClient  # noqa: E402

import xdl  # noqa: E402
from xdl.adapters import tf_nn  # noqa: E402
from xdl.lookup import RemoteTable  # noqa: E402

pytestmark = pytest.mark.timeout(120)
DIM, VOCAB, LR = 4, 30, 1.0
INIT = xdl.init.Normal(stddev=0.5)
MODES = ["eager", "graph"]


def rows(seed: int = 3) -> np.ndarray:
    return xdl.init.generate(INIT, seed, np.arange(VOCAB, dtype=np.int64), DIM)


def run(mode: str, fn: Callable[..., Any], *args: Any) -> Any:
    return tf.function(fn)(*args) if mode == "graph" else fn(*args)


def pushed(client: FakeClient, table: str) -> dict[int, np.ndarray]:
    """Pushed gradient per id, summed over the pushes to ``table``."""
    out: dict[int, np.ndarray] = {}
    for name, ids, grads in client.pushes:
        if name == table:
            for i, g in zip(ids.tolist(), grads, strict=True):
                out[i] = out.get(i, 0) + g
    return out


def dense_grad(grad: Any) -> np.ndarray:
    return np.asarray(tf.convert_to_tensor(grad).numpy())


def as_dict(g: np.ndarray) -> dict[int, np.ndarray]:
    return {i: g[i] for i in np.flatnonzero(np.abs(g).sum(1) > 0)}


def assert_same_grads(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_plugin_does_not_import_tensorflow() -> None:
    code = ("import sys, xdl; xdl.get_plugin_manager(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
            "[m for m in ('tensorflow', 'keras') if m in sys.modules]")
    env = {**os.environ, "XDL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_detect_backend() -> None:
    keras = pytest.importorskip("keras")
    for obj in (tf.constant([1]), tf.Variable([1.0]), tf.Module(),
                keras.Sequential([keras.layers.Dense(1)])):
        assert xdl.get_backend(obj).name == "tensorflow", type(obj)
    assert xdl.get_backend(np.zeros(2)).name == "numpy"


@pytest.mark.parametrize("mode", MODES)
def test_lookup_and_pushed_gradient_match_tf(mode: str) -> None:
    """Any shape, int32 ids, a padding id, an id looked up twice by two calls in one
    step: same output as tf.gather and one push of the summed gradient."""
    client = FakeClient()
    client.create_table("t", DIM, initializer=INIT, seed=3, optimizer=xdl.optim.SGD(lr=LR))
    remote = RemoteTable(client, "t", DIM, id_mode="index", num_rows=VOCAB, padding_idx=0)
    anchor = tf.Variable([0.0])
    local = tf.Variable(rows())
    backend = xdl.get_backend("tensorflow")
    ids_a = tf.constant([[5, 0, 7], [7, 7, 2]], tf.int32)
    ids_b = tf.constant([[2], [9]], tf.int32)  # an int32 [N, 1] column, as inside fit
    scale = tf.constant(np.arange(DIM, dtype=np.float32) + 1)

    def step(a: Any, b: Any) -> Any:
        with tf.GradientTape() as tape:
            ea, eb = backend.lookup(remote, a, anchor=anchor), backend.lookup(remote, b,
                                                                              anchor=anchor)
            loss = tf.reduce_sum(ea * scale) + tf.reduce_sum(tf.square(eb))
        return ea, eb, tape.gradient(loss, anchor)

    def local_step(a: Any, b: Any) -> Any:
        mask = tf.cast(a != 0, tf.float32)[..., None]  # padding: zeros, no gradient
        with tf.GradientTape() as tape:
            ea = tf.gather(local, a) * mask
            eb = tf.gather(local, b)
            loss = tf.reduce_sum(ea * scale) + tf.reduce_sum(tf.square(eb))
        return ea, eb, tape.gradient(loss, local)

    ea, eb, g_anchor = run(mode, step, ids_a, ids_b)
    la, lb, g_local = run(mode, local_step, ids_a, ids_b)
    assert ea.shape == (2, 3, DIM) and eb.shape == (2, 1, DIM)
    np.testing.assert_allclose(ea.numpy(), la.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(eb.numpy(), lb.numpy(), rtol=0, atol=1e-7)
    assert g_anchor.numpy().tolist() == [0.0]
    assert client.pushes == []  # buffered until the table's next pull (or wait_pushes)
    remote.wait_pushes()
    assert len(client.pushes) == 1  # two lookups, one push
    assert_same_grads(pushed(client, "t"), as_dict(dense_grad(g_local)))
    # the push was applied: a second step sees the updated rows
    ea2, _, _ = run(mode, step, ids_a, ids_b)
    expect = rows() - LR * dense_grad(g_local)
    np.testing.assert_allclose(ea2.numpy()[0, 0], expect[5], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_embedding_lookup_sparse_matches_tf(mode: str, combiner: str) -> None:
    client = FakeClient()
    table = tf_nn.table(client, f"sp-{combiner}", DIM, initializer=INIT, seed=3,
                        id_mode="index", num_rows=VOCAB)
    local = tf.Variable(rows())
    # bag 2 is empty; bag 0 repeats id 4
    sp_ids = tf.SparseTensor(indices=[[0, 0], [0, 1], [0, 2], [1, 0], [3, 0], [3, 1]],
                             values=tf.constant([4, 4, 11, 6, 11, 20], tf.int64),
                             dense_shape=[4, 3])
    for weights in (None, tf.SparseTensor(sp_ids.indices, [0.5, 2.0, 1.0, 3.0, 1.5, 0.25],
                                          sp_ids.dense_shape)):
        client.pushes.clear()

        def step(sp: Any, w: Any = weights) -> Any:
            with tf.GradientTape() as tape:
                out = tf_nn.embedding_lookup_sparse(table, sp, w, combiner=combiner)
                loss = tf.reduce_sum(out * out)
            return out, tape.gradient(loss, table.trainable_variables)

        def local_step(sp: Any, w: Any = weights) -> Any:
            with tf.GradientTape() as tape:
                out = tf.nn.embedding_lookup_sparse(local, sp, w, combiner=combiner)
                loss = tf.reduce_sum(out * out)
            return out, tape.gradient(loss, local)

        out, _ = run(mode, step, sp_ids)
        expect, g_local = run(mode, local_step, sp_ids)
        assert out.shape == (4, DIM)
        np.testing.assert_allclose(out.numpy()[:len(expect)], expect.numpy(), rtol=1e-6,
                                   atol=1e-6)
        assert not out.numpy()[2].any()  # the empty bag
        table.wait_pushes()
        assert_same_grads(pushed(client, table.remote.table), as_dict(dense_grad(g_local)))
        client.tables[table.remote.table].rows.clear()  # next round from the same rows


@pytest.mark.parametrize("mode", MODES)
def test_embedding_lookup_matches_tf(mode: str) -> None:
    client = FakeClient()
    table = tf_nn.table(client, "plain", DIM, initializer=INIT, seed=3)
    local = tf.Variable(rows())
    ids = tf.constant([[3, 8], [8, 29]], tf.int64)

    def step(i: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(tf_nn.embedding_lookup(table, i)))
        tape.gradient(loss, table.trainable_variables)
        return loss

    def local_step(i: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.sin(tf.nn.embedding_lookup(local, i)))
        return loss, tape.gradient(loss, local)

    loss = run(mode, step, ids)
    expect, g_local = run(mode, local_step, ids)
    assert abs(float(loss) - float(expect)) < 1e-5
    table.wait_pushes()
    assert_same_grads(pushed(client, "plain"), as_dict(dense_grad(g_local)))
    assert [v.name for v in table.trainable_variables] == ["xdl_anchor:0"]


def test_errors_say_what_and_where() -> None:
    client = FakeClient()
    table = tf_nn.table(client, "idx", DIM, id_mode="index", num_rows=10)
    with pytest.raises(Exception, match="out of range.*num_embeddings=10"):
        tf_nn.embedding_lookup(table, tf.constant([3, 10]))
    with pytest.raises(xdl.errors.InvalidArgumentError, match="ids must be integers"):
        tf_nn.embedding_lookup(table, tf.constant([1.0]))
    with pytest.raises(xdl.errors.InvalidArgumentError, match="DistributedTable"):
        tf_nn.embedding_lookup(tf.Variable(rows()), tf.constant([1]))
    with pytest.raises(xdl.errors.InvalidArgumentError, match="max_norm"):
        tf_nn.embedding_lookup(table, tf.constant([1]), max_norm=1.0)


@pytest.mark.parametrize("mode", MODES)
def test_tf_wrapper_dense_variables_on_the_server(mode: str) -> None:
    """``server_optimizer=``: the function's dense variables live on the shards; each step
    pushes their gradients and pulls the new values (here SGD, one worker), which equals
    local SGD on the same variables, while the rows train on the server."""
    client = FakeClient()
    w_remote, w_local = tf.Variable(tf.ones([DIM, 1])), tf.Variable(tf.ones([DIM, 1]))
    local_rows = tf.Variable(rows())

    @xdl.tf_wrapper(client, server_optimizer=xdl.optim.SGD(lr=LR), graph=mode == "graph",
                    dense_prefix=f"w-{mode}.")
    def step(emb: Any, label: Any) -> Any:
        logit = tf.squeeze(emb @ w_remote, -1)
        return tf.reduce_mean(tf.square(logit - label)), logit

    for i in range(3):
        ids = np.array([[1, 2], [2, 5], [7, 7]]) + i
        label = np.array([1.0, 0.0, 2.0], np.float32)
        loss, _ = step(xdl.embedding(f"d-{mode}", ids, DIM, combiner="sum", initializer=INIT,
                                     seed=3, optimizer=xdl.optim.SGD(lr=LR)), label)
        with tf.GradientTape() as tape:
            logit = tf.squeeze(tf.reduce_sum(tf.gather(local_rows, ids), 1) @ w_local, -1)
            local_loss = tf.reduce_mean(tf.square(logit - label))
        g_rows, g_w = tape.gradient(local_loss, [local_rows, w_local])
        local_rows.assign_sub(LR * tf.convert_to_tensor(g_rows))
        w_local.assign_sub(LR * g_w)
        assert abs(float(loss) - float(local_loss)) < 1e-5
    step.close()
    assert [n for n in client.dense] == [f"w-{mode}.0.{w_remote.name.replace(':', '_')}"]
    np.testing.assert_allclose(w_remote.numpy(), w_local.numpy(), atol=1e-5)
    np.testing.assert_allclose(client.dense[f"w-{mode}.0.{w_remote.name.replace(':', '_')}"]
                               ["value"], w_local.numpy(), atol=1e-5)
    np.testing.assert_allclose(client.pull(f"d-{mode}", np.arange(VOCAB)), local_rows.numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_expand_group_rows_to_samples(mode: str) -> None:
    backend = xdl.get_backend("tensorflow")
    groups = tf.Variable(tf.constant([[1.0, 2.0], [3.0, 4.0]]))
    indicator = tf.constant([0, 0, 1, 0], tf.int32)

    def expanded(ind: Any) -> Any:
        with tf.GradientTape() as tape:
            out = backend.expand(groups, ind)
            loss = tf.reduce_sum(out)
        return out, tape.gradient(loss, groups)

    out, grad = run(mode, expanded, indicator)
    np.testing.assert_array_equal(out.numpy(), [[1, 2], [1, 2], [3, 4], [1, 2]])
    np.testing.assert_array_equal(dense_grad(grad), [[3, 3], [1, 1]])  # summed per group


def test_tf_wrapper_tables_argument_and_predict() -> None:
    """Arguments named in ``tables`` arrive as ids (bags as ``(ids, offsets)``); the
    function gets their embeddings; ``predict`` updates nothing."""
    client = FakeClient()
    seen: list[Any] = []

    @xdl.tf_wrapper(client, tables={"bag": xdl.Lookup("named", combiner="mean", dim=DIM,
                                                       initializer=INIT, seed=3),
                                    "one": xdl.Lookup("named", dim=DIM)}, graph=False)
    def fn(bag: Any, one: Any, scale: float) -> Any:
        seen.append((bag, one))
        return tf.reduce_sum(bag) * scale + tf.reduce_sum(one), bag

    ids, offsets = np.array([4, 6, 6, 9]), np.array([0, 1])
    _, bag = fn.predict(bag=(ids, offsets), one=np.array([[4]]), scale=2.0)
    np.testing.assert_allclose(bag.numpy(), [rows()[4], (2 * rows()[6] + rows()[9]) / 3],
                               rtol=1e-6)
    assert seen[-1][1].shape == (1, 1, DIM)
    fn.wait_pushes()
    assert client.pushes == []  # predict trains nothing
    fn(bag=(ids, offsets), one=np.array([[4]]), scale=2.0)
    fn.close()
    ((_, pushed_ids, _),) = client.pushes  # both lookups of the table: one push
    assert sorted(pushed_ids.tolist()) == [4, 6, 9]
