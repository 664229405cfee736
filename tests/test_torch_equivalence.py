"""Invariant 1 for torch: training through the server matches local training.

The same embedding + MLP model is trained 200 steps locally (``nn.Embedding(sparse=True)``
with ``torch.optim.SGD`` / ``torch.optim.Adagrad``, rows initialised with
``xdl.init.generate``) and through the server (``xdl.swap`` with ``xdl.optim.SGD`` /
``xdl.optim.Adagrad.torch``), on the in-memory fake and on 1 and 3 real shards. Losses
and final weights agree within 1e-5.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeClient
from torch import nn

import xdl

pytestmark = pytest.mark.timeout(60)

VOCAB, DIM, BAG, BATCH, STEPS, SEED, LR = 50, 8, 3, 16, 200, 7, 0.05
INIT = xdl.init.Normal(stddev=0.1)
TOL = 1e-5


class Model(nn.Module):
    """Embedding (bags of BAG ids, summed) → MLP → logit."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids).sum(1)).squeeze(-1)


def make_model() -> Model:
    torch.manual_seed(SEED)
    model = Model()
    with torch.no_grad():
        keys = np.arange(VOCAB, dtype=np.int64)
        model.emb.weight.copy_(torch.from_numpy(xdl.init.generate(INIT, SEED, keys, DIM)))
    return model


def data() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(SEED)
    for _ in range(STEPS):
        # a skewed id distribution, so batches repeat ids (their gradients must sum)
        ids = np.minimum(rng.geometric(0.08, size=(BATCH, BAG)) - 1, VOCAB - 1)
        yield torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(
            (rng.random(BATCH) < 0.3).astype(np.float32))


def train(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for ids, label in data():
        opt.zero_grad()
        loss = loss_fn(model(ids), label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], Any]] = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=LR), xdl.optim.SGD(lr=LR)),
    "adagrad": (lambda params: torch.optim.Adagrad(params, lr=LR),
                xdl.optim.Adagrad.torch(lr=LR)),
}


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, Any]]:
    """The fake, and real clusters of 1 and 3 shards (started lazily, always closed)."""
    started: dict[str, Any] = {"fake": FakeClient()}

    class Lazy(dict[str, Any]):
        def __missing__(self, key: str) -> Any:
            self[key] = xdl.connect(local_shards=int(key.split("-")[0]))
            return self[key]

    lazy = Lazy(started)
    yield lazy
    for client in lazy.values():
        client.close()


@functools.cache
def local_run(opt_name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Local training (once per optimizer): losses and final state."""
    local = make_model()
    losses = train(local, OPTIMIZERS[opt_name][0](local.parameters()))
    return losses, local.state_dict()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("where", ["fake", "1-shard", "3-shards"])
def test_server_training_matches_local(clients: dict[str, Any], where: str,
                                       opt_name: str) -> None:
    local_opt, server_opt = OPTIMIZERS[opt_name]
    local_losses, local_state = local_run(opt_name)

    client = clients[where]
    remote = xdl.swap(make_model(), client, optimizer=server_opt, initializer=INIT, seed=SEED,
                      prefix=f"eq-{opt_name}-")
    assert isinstance(remote.emb, xdl.DistributedEmbedding)
    assert not any(p.numel() == VOCAB * DIM for p in remote.parameters())  # no full table
    remote_losses = train(remote, local_opt(remote.parameters()))
    np.testing.assert_allclose(remote_losses, local_losses, rtol=0, atol=TOL)

    restored = xdl.unswap(remote, client)
    assert type(restored.emb) is nn.Embedding
    for (name, a), (_, b) in zip(local_state.items(), restored.state_dict().items(),
                                 strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=TOL, err_msg=name)
    assert abs(local_losses[-1] - local_losses[0]) > 1e-3  # it did learn something
