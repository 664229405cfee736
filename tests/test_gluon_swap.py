"""The Gluon adapter and the mxnet backend: the numpy.bool shim only at MXNet's first
import, backend detection, swap keeping the model (sparse_grad on/off, imperative and
hybridized), the user's Trainer (made before or after the swap, its 1/batch_size scale),
nested and shared blocks, id checks, and unswap → export → ``SymbolBlock.imports``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeClient

import xdl
from xdl.errors import InvalidArgumentError

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, SEED, LR = 30, 4, 3, 0.1
INIT = xdl.init.Normal(stddev=0.1)


@pytest.fixture(scope="module")
def mx() -> Any:
    from xdl.plugins import get_backend

    return get_backend("mxnet").framework_module()


def make_net(mx: Any, *, sparse_grad: bool = False, hybridize: bool = False,
             prefix: str = "net_") -> Any:
    from mxnet import gluon

    class Net(gluon.HybridBlock):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with self.name_scope():
                self.emb = gluon.nn.Embedding(VOCAB, DIM, sparse_grad=sparse_grad)
                self.out = gluon.nn.Dense(1, in_units=DIM)

        def hybrid_forward(self, F: Any, ids: Any) -> Any:  # noqa: N803
            return F.reshape(self.out(F.mean(self.emb(ids), axis=1)), (-1,))

    mx.random.seed(SEED)
    net = Net(prefix=prefix)
    net.initialize(mx.init.Normal(0.5), ctx=mx.cpu())
    if hybridize:
        net.hybridize()
    return net


def ids_batch(mx: Any, step: int = 0) -> Any:
    rng = np.random.default_rng(step)
    return mx.nd.array(rng.integers(0, VOCAB, size=(6, 3)).astype(np.float32))


def train(mx: Any, net: Any, trainer: Any, steps: int = 5) -> list[float]:
    from mxnet import autograd

    losses = []
    for step in range(steps):
        with autograd.record():
            loss = (net(ids_batch(mx, step)) - 1.0) ** 2
        loss.backward()
        trainer.step(6)
        losses.append(float(loss.mean().asscalar()))
    return losses


def test_plugin_loading_does_not_import_mxnet_nor_set_numpy_bool() -> None:
    code = textwrap.dedent("""
        import sys
        import numpy as np
        import xdl
        from xdl import plugins
        plugins.format_plugins()
        assert "mxnet" in plugins.get_plugin_state().backends
        assert "gluon" in plugins.get_plugin_state().adapters.names()
        assert xdl.get_backend(np.zeros(2)).name == "numpy"
        assert "mxnet" not in sys.modules, "plugin loading imported mxnet"
        assert "bool" not in np.__dict__, "numpy.bool set without importing mxnet"
        backend = xdl.get_backend("mxnet")
        assert "mxnet" in sys.modules and np.__dict__["bool"] is bool
        import mxnet as mx
        assert xdl.get_backend(mx.nd.zeros(1)) is backend
        assert xdl.get_backend(mx.gluon.nn.Dense(1)) is backend
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense", "sparse_grad"])
def test_swap_keeps_the_model(mx: Any, sparse_grad: bool, hybridize: bool) -> None:
    from mxnet import gluon

    from xdl.adapters.gluon import block_class

    net = make_net(mx, sparse_grad=sparse_grad, hybridize=hybridize)
    x = ids_batch(mx)
    before = net(x).asnumpy()
    client = FakeClient()
    net = xdl.swap(net, client, optimizer=xdl.optim.SGD(lr=LR))
    assert isinstance(net.emb, block_class()) and isinstance(net.emb, gluon.nn.Embedding)
    assert sorted(net.collect_params()) == ["net_dense0_bias", "net_dense0_weight",
                                            "net_embedding0_anchor"]
    with pytest.raises(AttributeError, match="holds no weight"):
        net.emb.weight  # noqa: B018
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=0, atol=1e-6)
    if hybridize:
        assert net._cached_op is not None  # rebuilt after the swap, with the custom op


def _local_and_swapped(mx: Any, trainer_before_swap: bool) -> tuple[Any, Any, Any]:
    from mxnet import gluon

    local = make_net(mx, prefix="local_")
    train(mx, local, gluon.Trainer(local.collect_params(), "sgd", {"learning_rate": LR}))
    net = make_net(mx, prefix="swapped_")
    trainer = None
    if trainer_before_swap:
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    client = FakeClient()
    net = xdl.swap(net, client, optimizer=xdl.optim.SGD(lr=LR))
    if trainer is None:
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    return local, net, trainer


@pytest.mark.parametrize("before", [False, True], ids=["trainer-after", "trainer-before"])
def test_trainer_scale_applies_to_pushed_rows(mx: Any, before: bool) -> None:
    local, net, trainer = _local_and_swapped(mx, before)
    train(mx, net, trainer)  # Trainer.step(6): dense and pushed row gradients / 6
    net = xdl.unswap(net)
    np.testing.assert_allclose(net.emb.weight.data().asnumpy(),
                               local.emb.weight.data().asnumpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(net.out.weight.data().asnumpy(),
                               local.out.weight.data().asnumpy(), rtol=0, atol=1e-6)


def test_fixed_grad_scale(mx: Any) -> None:
    from mxnet import autograd

    net = make_net(mx)
    client = FakeClient()
    net = xdl.swap(net, client, optimizer=xdl.optim.SGD(lr=LR))
    net.emb.grad_scale = 0.25
    with autograd.record():
        loss = net(ids_batch(mx)).sum()
    loss.backward()
    net.emb.wait_pushes()  # no Trainer: the fixed factor applies
    name, ids, pushed = client.pushes[-1]
    unscaled = FakeClient()
    plain = xdl.swap(make_net(mx, prefix="plain_"), unscaled, optimizer=xdl.optim.SGD(lr=LR))
    with autograd.record():
        loss = plain(ids_batch(mx)).sum()
    loss.backward()
    plain.emb.wait_pushes()
    _, ids2, pushed2 = unscaled.pushes[-1]
    order, order2 = np.argsort(ids), np.argsort(ids2)
    np.testing.assert_array_equal(ids[order], ids2[order2])
    np.testing.assert_allclose(pushed[order], 0.25 * pushed2[order2], rtol=1e-6, atol=1e-7)


def test_nested_and_shared_embeddings(mx: Any) -> None:
    from mxnet import gluon

    from xdl.adapters.gluon import block_class

    shared = gluon.nn.Embedding(VOCAB, DIM, prefix="shared_")
    seq = gluon.nn.HybridSequential(prefix="seq_")
    seq.add(shared, gluon.nn.Dense(2, flatten=False))
    outer = gluon.nn.HybridSequential(prefix="outer_")
    outer.add(seq)
    outer.initialize(ctx=mx.cpu())
    outer.hybridize()
    x = ids_batch(mx)
    before = outer(x).asnumpy()
    client = FakeClient()
    outer = xdl.swap(outer, client)
    assert isinstance(outer[0][0], block_class())
    assert sorted(client.tables) == ["0.0"]
    np.testing.assert_allclose(outer(x).asnumpy(), before, rtol=0, atol=1e-6)


def test_bad_ids_are_refused(mx: Any) -> None:
    net = xdl.swap(make_net(mx), FakeClient())
    with pytest.raises(InvalidArgumentError, match="whole numbers"):
        net(mx.nd.array([[0.5, 1, 2]]))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        net(mx.nd.array([[1, 2, VOCAB]]))


def test_unswap_then_export_loads_with_symbolblock(mx: Any, tmp_path: Path) -> None:
    from mxnet import gluon

    net = make_net(mx, hybridize=True, prefix="exp_")
    with xdl.connect(local_shards=1) as client:
        net = xdl.swap(net, client, optimizer=xdl.optim.Adagrad.mxnet(lr=LR))
        train(mx, net, gluon.Trainer(net.collect_params(), "adagrad", {"learning_rate": LR}))
        net.emb.wait_pushes()  # the last step's rows wait for the next step otherwise
        trained = client.pull("emb", np.arange(VOCAB, dtype=np.int64))
        net = xdl.unswap(net, client)
    assert type(net.emb) is gluon.nn.Embedding
    np.testing.assert_array_equal(net.emb.weight.data().asnumpy(), trained)
    x = ids_batch(mx, 9)
    expected = net(x).asnumpy()
    net.export(str(tmp_path / "model"))
    loaded = gluon.SymbolBlock.imports(str(tmp_path / "model-symbol.json"), ["data"],
                                       str(tmp_path / "model-0000.params"), ctx=mx.cpu())
    np.testing.assert_allclose(loaded(x).asnumpy(), expected, rtol=0, atol=1e-6)


def test_recorded_forward_without_backward_changes_nothing(mx: Any) -> None:
    """Hybridized: a forward under ``autograd.record()`` that is never back-propagated
    (a validation batch, say) does not mix into the next step's row gradients."""
    from mxnet import autograd, gluon

    local = make_net(mx, hybridize=True, prefix="loc_")
    net = xdl.swap(make_net(mx, hybridize=True, prefix="rem_"), FakeClient(),
                   optimizer=xdl.optim.SGD(lr=LR))
    for model in (local, net):
        with autograd.record():
            model(ids_batch(mx, 42))  # recorded, never back-propagated
        train(mx, model, gluon.Trainer(model.collect_params(), "sgd", {"learning_rate": LR}))
    net = xdl.unswap(net)
    np.testing.assert_allclose(net.emb.weight.data().asnumpy(),
                               local.emb.weight.data().asnumpy(), rtol=0, atol=1e-6)


def test_trainer_over_dense_parameters_only_gives_the_scale(mx: Any) -> None:
    from mxnet import gluon

    local = make_net(mx, prefix="dl_")
    train(mx, local, gluon.Trainer(local.collect_params(), "sgd", {"learning_rate": LR}))
    net = xdl.swap(make_net(mx, prefix="dr_"), FakeClient(), optimizer=xdl.optim.SGD(lr=LR))
    train(mx, net, gluon.Trainer(net.out.collect_params(), "sgd", {"learning_rate": LR}))
    net = xdl.unswap(net)
    np.testing.assert_allclose(net.emb.weight.data().asnumpy(),
                               local.emb.weight.data().asnumpy(), rtol=0, atol=1e-6)
