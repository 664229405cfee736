"""The MXNet (Gluon) case of the backend-parametrised tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import BATCH, DIM, VOCAB, BackendCase


def _mx() -> Any:
    import xdl

    return xdl.get_backend("mxnet").framework_module()  # the numpy.bool shim first


def _blocks() -> tuple[Any, Any]:
    _mx()
    from mxnet import gluon

    class Subclassed(gluon.HybridBlock):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            with self.name_scope():
                self.emb = gluon.nn.Embedding(VOCAB, DIM)
                self.head = gluon.nn.Dense(1, in_units=DIM)

        def hybrid_forward(self, F: Any, ids: Any) -> Any:  # noqa: N803
            return F.reshape(self.head(F.mean(self.emb(ids), axis=1)), (-1,))

    return gluon, Subclassed


class MXNetCase(BackendCase):
    """``HybridSequential`` (imperative), the same net hybridized (Gluon's graph form:
    a cached symbolic graph, where the lookup is the backend's custom operator) and a
    subclassed ``HybridBlock``; trained with ``gluon.Trainer`` SGD and
    ``Trainer.step(batch_size)``."""

    backend = "mxnet"
    framework = "mxnet"

    def build(self, kind: str, seed: int) -> Any:
        mx = _mx()
        gluon, Subclassed = _blocks()
        mx.random.seed(seed)
        if kind == "subclassed":
            net = Subclassed(prefix=f"sub{seed}_")
        else:
            net = gluon.nn.HybridSequential(prefix=f"{kind}{seed}_")
            with net.name_scope():
                net.add(gluon.nn.Embedding(VOCAB, DIM),
                        gluon.nn.HybridLambda(lambda F, x: F.mean(x, axis=1)),
                        gluon.nn.Dense(1, in_units=DIM),
                        gluon.nn.HybridLambda(lambda F, x: F.reshape(x, (-1,))))
        net.initialize(mx.init.Normal(0.5), ctx=mx.cpu())
        if kind == "functional":
            net.hybridize()
        return net

    def logits(self, model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
        mx = _mx()
        out = model(mx.nd.array(batch["ids"], dtype="int64")).asnumpy()
        return np.array(out, dtype=np.float32)

    def optimizer(self, model: Any, lr: float) -> Any:
        gluon, _ = _blocks()
        return gluon.Trainer(model.collect_params(), "sgd", {"learning_rate": lr})

    def train_step(self, model: Any, optimizer: Any, batch: dict[str, np.ndarray]) -> float:
        mx = _mx()
        gluon, _ = _blocks()
        with mx.autograd.record():
            loss = gluon.loss.SigmoidBinaryCrossEntropyLoss()(
                model(mx.nd.array(batch["ids"], dtype="int64")), mx.nd.array(batch["label"]))
        loss.backward()
        optimizer.step(BATCH)
        return float(loss.mean().asscalar())

    def embedding_rows(self, model: Any) -> np.ndarray:
        gluon, _ = _blocks()
        found = {id(b): b for b in _walk(model) if type(b) is gluon.nn.Embedding}
        (layer,) = found.values()
        return np.array(layer.weight.data().asnumpy(), dtype=np.float32)

    def lookup_grads(self, backend: Any, remote: Any, ids: np.ndarray, offsets: Any,
                     combiner: str | None, upstream: np.ndarray) -> np.ndarray:
        mx = _mx()
        nd_ids = mx.nd.array(ids, dtype="int64")
        with mx.autograd.record():
            if combiner is None:
                out = backend.lookup(remote, nd_ids)
            else:
                out = backend.lookup_bags(
                    remote, nd_ids, None if offsets is None else mx.nd.array(offsets,
                                                                            dtype="int64"),
                    combiner=combiner)
            loss = (out * mx.nd.array(upstream)).sum()
        loss.backward()
        backend.wait_backward()  # MXNet runs the backward asynchronously
        return np.array(out.asnumpy(), dtype=np.float32)


def _walk(block: Any) -> list[Any]:
    out = [block]
    for child in block._children.values():
        out += _walk(child)
    return out


CASE = MXNetCase()
