"""Invariant 1 for MXNet: training a Gluon net through the server matches local training.

The same Embedding + MLP net is trained 200 steps locally (``gluon.nn.Embedding`` with
``gluon.Trainer`` SGD / Adagrad, ``Trainer.step(batch_size)``) and through the server
(``xdl.swap`` with ``xdl.optim.SGD`` / ``xdl.optim.Adagrad.mxnet``, the same Trainer
for the dense part), imperative and hybridized, on 1 and 3 shards. Losses and final
weights (dense parameters, and the table's rows after ``xdl.unswap``) agree within 1e-5.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import xdl

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, BAG, BATCH, STEPS, SEED, LR = 50, 8, 3, 16, 200, 7, 0.05
INIT = xdl.init.Normal(stddev=0.1)
TOL = 1e-5
SERVER_OPTIMIZERS = {"sgd": xdl.optim.SGD(lr=LR), "adagrad": xdl.optim.Adagrad.mxnet(lr=LR)}


@pytest.fixture(scope="module")
def mx() -> Any:
    from xdl.plugins import get_backend

    return get_backend("mxnet").framework_module()


def make_net(mx: Any, sparse_grad: bool, hybridize: bool, prefix: str) -> Any:
    """Embedding (bags of BAG ids, summed) → Dense(16, tanh) → Dense(1)."""
    from mxnet import gluon

    class Net(gluon.HybridBlock):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with self.name_scope():
                self.emb = gluon.nn.Embedding(VOCAB, DIM, sparse_grad=sparse_grad)
                self.hidden = gluon.nn.Dense(16, activation="tanh", in_units=DIM)
                self.out = gluon.nn.Dense(1, in_units=16)

        def hybrid_forward(self, F: Any, ids: Any) -> Any:  # noqa: N803
            return F.reshape(self.out(self.hidden(F.sum(self.emb(ids), axis=1))), (-1,))

    mx.random.seed(SEED)
    net = Net(prefix=prefix)
    net.initialize(ctx=mx.cpu())
    net.emb.weight.set_data(mx.nd.array(
        xdl.init.generate(INIT, SEED, np.arange(VOCAB, dtype=np.int64), DIM)))
    if hybridize:
        net.hybridize()
    return net


def data() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    for _ in range(STEPS):
        # a skewed id distribution, so batches repeat ids (their gradients must sum)
        ids = np.minimum(rng.geometric(0.08, size=(BATCH, BAG)) - 1, VOCAB - 1)
        yield ids.astype(np.float32), (rng.random(BATCH) < 0.3).astype(np.float32)


def train(mx: Any, net: Any, opt_name: str) -> list[float]:
    from mxnet import autograd, gluon

    trainer = gluon.Trainer(net.collect_params(), opt_name, {"learning_rate": LR})
    loss_fn = gluon.loss.SigmoidBinaryCrossEntropyLoss()
    losses = []
    for ids, label in data():
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(ids)), mx.nd.array(label))
        loss.backward()
        trainer.step(BATCH)
        losses.append(float(loss.mean().asscalar()))
    return losses


def weights(net: Any) -> dict[str, np.ndarray]:
    """Parameter values by name, without the net's prefix."""
    return {name[len(net.prefix):]: p.data().asnumpy()
            for name, p in net.collect_params().items()}


@functools.cache
def local_run(opt_name: str) -> tuple[list[float], dict[str, np.ndarray]]:
    from xdl.plugins import get_backend

    mx = get_backend("mxnet").framework_module()
    net = make_net(mx, sparse_grad=True, hybridize=False, prefix=f"local_{opt_name}_")
    return train(mx, net, opt_name), weights(net)


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[int, Any]]:
    """Clusters of 1 and 3 shards (started lazily, always closed)."""

    class Lazy(dict[int, Any]):
        def __missing__(self, key: int) -> Any:
            self[key] = xdl.connect(local_shards=key)
            return self[key]

    lazy = Lazy()
    yield lazy
    for client in lazy.values():
        client.close()


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("opt_name", sorted(SERVER_OPTIMIZERS))
@pytest.mark.parametrize("shards", [1, 3])
def test_server_training_matches_local(mx: Any, clients: dict[int, Any], shards: int,
                                       opt_name: str, hybridize: bool) -> None:
    local_losses, local_weights = local_run(opt_name)
    tag = f"eq{shards}_{opt_name}_{int(hybridize)}_"
    net = make_net(mx, sparse_grad=False, hybridize=hybridize, prefix=tag)
    net = xdl.swap(net, clients[shards], optimizer=SERVER_OPTIMIZERS[opt_name],
                   initializer=INIT, seed=SEED, prefix=tag)
    from xdl.adapters.gluon import block_class

    assert isinstance(net.emb, block_class())
    assert not any(p.shape == (VOCAB, DIM) for p in net.collect_params().values())
    losses = train(mx, net, opt_name)
    if hybridize:
        assert net._cached_op is not None  # the cached graph ran, through the custom op
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)

    net = xdl.unswap(net)
    assert type(net.emb).__name__ == "Embedding"
    got = weights(net)
    got.pop("embedding0_anchor", None)
    assert sorted(got) == sorted(local_weights)
    for name, value in local_weights.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=TOL, err_msg=name)
    assert abs(local_losses[-1] - local_losses[0]) > 1e-3  # it did learn something
