"""A hybridized swapped Gluon net keeps its step boundary on MXNet's engine.

``engine_flag`` sets a flag after the writes to its inputs and before later reads of
its outputs, without blocking the caller, and reports a failed operator. A
swapped hybridized net's forward does not wait for the previous backward, and training
with Python running ahead (no read of the loss between steps, prefetch just before the
forward or one batch ahead, batch sizes that change the Trainer's scale) matches local
training within 1e-5.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import xdl

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, BAG, SEED, LR = 40, 4, 3, 5, 0.1
INIT = xdl.init.Normal(stddev=0.1)
GATE_OP = "xdl_test_gate"
_gates: dict[str, threading.Event] = {}


@pytest.fixture(scope="module")
def mx() -> Any:
    """MXNet, with a test operator whose forward copies its input once the named
    ``threading.Event`` is set (it holds the engine's dependants back until then)."""
    mx = xdl.get_backend("mxnet").framework_module()
    if GATE_OP not in getattr(mx.operator, "_xdl_test_ops", set()):

        class Gate(mx.operator.CustomOp):  # type: ignore[misc]
            def __init__(self, name: str) -> None:
                super().__init__()
                self._name = name

            def forward(self, is_train: bool, req: Any, in_data: Any, out_data: Any,
                        aux: Any) -> None:
                _gates[self._name].wait(30)
                self.assign(out_data[0], req[0], in_data[0])

        @mx.operator.register(GATE_OP)  # type: ignore[misc]
        class GateProp(mx.operator.CustomOpProp):  # type: ignore[misc]
            def __init__(self, gate: str) -> None:
                super().__init__(need_top_grad=False)
                self._name = gate

            def infer_shape(self, in_shape: Any) -> Any:
                return in_shape, [in_shape[0]], []

            def create_operator(self, ctx: Any, shapes: Any, dtypes: Any) -> Any:
                return Gate(self._name)

        mx.operator._xdl_test_ops = {GATE_OP}
    return mx


def gated(mx: Any, x: Any, name: str) -> tuple[Any, threading.Event]:
    """``x`` as computed by an operator that waits for the returned event."""
    _gates[name] = event = threading.Event()
    return mx.nd.Custom(x, op_type=GATE_OP, gate=name), event


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with xdl.connect(local_shards=1) as client:
        yield client


def test_engine_flag_keeps_mxnet_order_without_waiting(mx: Any) -> None:
    backend = xdl.get_backend("mxnet")
    held, gate = gated(mx, mx.nd.ones((1,)), "order")
    target = mx.nd.zeros((1,))
    start = time.perf_counter()
    flag, flag_nd = backend.engine_flag([held], [target])
    assert time.perf_counter() - start < 1.0 and flag[0] == 0.0  # issued, not run
    later = target + 1  # issued now: runs after the flag is set
    time.sleep(0.2)
    assert flag[0] == 0.0  # still waiting for the gated write
    gate.set()
    later.wait_to_read()
    assert flag[0] == 1.0
    assert float(later.asscalar()) == 1.0  # the zero target is left zero


def test_engine_flag_reports_a_failed_operator(mx: Any) -> None:
    backend = xdl.get_backend("mxnet")
    bad = mx.nd.Custom(mx.nd.ones((1,)), op_type=GATE_OP, gate="missing")  # raises
    flag, flag_nd = backend.engine_flag([bad], [mx.nd.zeros((1,))])
    with pytest.raises(mx.base.MXNetError):
        flag_nd.wait_to_read()  # an error, not a hang
    assert flag[0] == 0.0
    mx.nd.waitall()


def make_net(mx: Any, sparse_grad: bool, prefix: str, static_alloc: bool = True) -> Any:
    """Embedding (bags of BAG ids, summed) → Dense(1), hybridized."""
    from mxnet import gluon

    class Net(gluon.HybridBlock):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with self.name_scope():
                self.emb = gluon.nn.Embedding(VOCAB, DIM, sparse_grad=sparse_grad)
                self.out = gluon.nn.Dense(1, in_units=DIM)

        def hybrid_forward(self, F: Any, ids: Any) -> Any:  # noqa: N803
            return F.reshape(self.out(F.sum(self.emb(ids), axis=1)), (-1,))

    mx.random.seed(SEED)
    net = Net(prefix=prefix)
    net.initialize(ctx=mx.cpu())
    net.emb.weight.set_data(mx.nd.array(
        xdl.init.generate(INIT, SEED, np.arange(VOCAB, dtype=np.int64), DIM)))
    net.hybridize(static_alloc=static_alloc)
    return net


def batches(mx: Any) -> list[tuple[Any, Any]]:
    """Batches of 8, 5 and 8 ids (the Trainer's scale changes with the size); skewed
    ids, so ids repeat within a batch."""
    rng = np.random.default_rng(SEED)
    out = []
    for size in [8, 5, 8] * 8:
        ids = np.minimum(rng.geometric(0.15, size=(size, BAG)) - 1, VOCAB - 1)
        out.append((mx.nd.array(ids.astype(np.float32)),
                    mx.nd.array((rng.random(size) < 0.4).astype(np.float32))))
    return out


def train(mx: Any, net: Any, data: list[tuple[Any, Any]], prefetch: str) -> list[Any]:
    """Adagrad steps without reading anything between them; the losses as NDArrays."""
    from mxnet import autograd, gluon

    trainer = gluon.Trainer(net.collect_params(), "adagrad", {"learning_rate": LR})
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    losses = []
    for i, (ids, label) in enumerate(data):
        if prefetch == "just before":
            net.emb.prefetch(ids)
        elif prefetch == "one ahead":
            if i == 0:
                net.emb.prefetch(ids)
            if i + 1 < len(data):
                net.emb.prefetch(data[i + 1][0])
        with autograd.record():
            loss = loss_fn(net(ids), label)
        loss.backward()
        trainer.step(ids.shape[0])
        losses.append(loss.mean())
    return losses


def weights(net: Any) -> dict[str, np.ndarray]:
    return {name[len(net.prefix):]: p.data().asnumpy()
            for name, p in net.collect_params().items() if not name.endswith("anchor")}


@pytest.mark.parametrize("static_alloc", [True, False], ids=["static_alloc", "dynamic"])
@pytest.mark.parametrize("prefetch", ["none", "just before", "one ahead"])
def test_python_running_ahead_trains_as_locally(mx: Any, client: Any, prefetch: str,
                                                static_alloc: bool) -> None:
    data = batches(mx)
    local = make_net(mx, sparse_grad=True, prefix="ahead_local_")
    local_losses = [float(x.asscalar()) for x in train(mx, local, data, "none")]
    tag = f"ahead_{prefetch.replace(' ', '_')}_{int(static_alloc)}_"
    net = xdl.swap(make_net(mx, sparse_grad=False, prefix=tag, static_alloc=static_alloc),
                   client,
                   optimizer=xdl.optim.Adagrad.mxnet(lr=LR), initializer=INIT, seed=SEED,
                   prefix=tag)
    losses = [float(x.asscalar()) for x in train(mx, net, data, prefetch)]
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=1e-5)
    net = xdl.unswap(net)
    got, want = weights(net), weights(local)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=1e-5, err_msg=name)


def test_forward_does_not_wait_for_the_previous_backward(mx: Any, client: Any) -> None:
    """While the first step's lookup is held back on the engine, Python dispatches the
    following steps (a blocking boundary would wait for step 1's backward)."""
    from mxnet import autograd, gluon

    net = xdl.swap(make_net(mx, sparse_grad=False, prefix="nowait_"), client,
                   optimizer=xdl.optim.SGD(lr=LR), initializer=INIT, seed=SEED,
                   prefix="nowait_")
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    data = batches(mx)[:2]
    first, gate = gated(mx, data[0][0], "first-ids")
    start = time.perf_counter()
    for ids, label in [(first, data[0][1]), data[1]]:
        with autograd.record():
            loss = loss_fn(net(ids), label)
        loss.backward()
        trainer.step(ids.shape[0])
    dispatched = time.perf_counter() - start
    assert not gate.is_set()
    gate.set()
    assert np.isfinite(float(loss.mean().asscalar()))
    assert dispatched < 5.0  # blocking would have waited the gate's 30 s out
    net = xdl.unswap(net)
