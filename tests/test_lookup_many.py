"""A step's lookups handled together: ``xdl.lookup.plan_many`` (one compiled pass for
every lookup's checks and de-duplication) and the torch backend's
``differentiable_lookups`` (one autograd node for every lookup of a step)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeClient
from torch import nn

import xdl
from xdl.adapters.torch_nn import StepPull
from xdl.lookup import RemoteTable, plan_many

pytestmark = pytest.mark.timeout(60)


def _remotes_and_ids(seed: int) -> tuple[list[RemoteTable], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    remotes, ids = [], []
    shapes = [(64, 1), (64,), (7, 3), (0,), (1,), (5, 2, 2)]
    for i in range(30):
        mode = "index" if i % 2 else "hash"
        pad = [None, 0, 3][i % 3]
        remotes.append(RemoteTable(FakeClient(), f"t{i}", 4, id_mode=mode, num_rows=20,
                                   padding_idx=pad))
        ids.append(rng.integers(0, 20, shapes[i % len(shapes)]))
    return remotes, ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_many_equals_one_plan_per_lookup(seed: int) -> None:
    remotes, ids = _remotes_and_ids(seed)
    plans = plan_many(remotes, ids)
    for remote, a, got in zip(remotes, ids, plans, strict=True):
        want = remote.plan(a)
        assert got is not None
        np.testing.assert_array_equal(got.unique_ids, want.unique_ids)
        np.testing.assert_array_equal(got.inverse.reshape(-1), want.inverse.reshape(-1))
        assert got.shape == want.shape and got.has_padding == want.has_padding


def test_plan_many_leaves_bad_ids_to_their_own_lookup() -> None:
    remotes, ids = _remotes_and_ids(0)
    ids[1] = np.array([20])  # index mode, out of range
    ids[3] = np.array([-1])  # index mode, negative
    ids[2] = np.array([1.5])  # not integers
    ids[0] = np.array([-5, 2**62])  # hash mode: any int64
    plans = plan_many(remotes, ids)
    assert [p is None for p in plans[:5]] == [False, True, True, True, False]
    with pytest.raises(xdl.errors.InvalidArgumentError, match="out of range"):
        remotes[1].plan(ids[1])


def test_one_node_gives_the_gradients_of_one_lookup_each() -> None:
    backend = xdl.get_backend("torch")
    rng = np.random.default_rng(4)
    remotes, ids = _remotes_and_ids(5)
    plans = [p for p in plan_many(remotes, ids) if p is not None]
    rows = [rng.standard_normal((p.unique_ids.size, 4)).astype(np.float32) for p in plans]
    got: list[tuple[int, np.ndarray]] = []
    outs = backend.differentiable_lookups(rows, plans, got.extend)
    weights = [torch.from_numpy(rng.standard_normal(o.shape).astype(np.float32)) for o in outs]
    # a lookup left out of the loss gets no gradient (as a dropped local lookup)
    sum((o * w).sum() for i, (o, w) in enumerate(zip(outs, weights, strict=True))
        if i != 2).backward()
    assert sorted(i for i, _ in got) == [i for i in range(len(plans)) if i != 2]
    for i, grad in got:  # the same as a separate leaf per lookup, placed by index_select
        if not plans[i].inverse.size:
            assert grad.shape == (0, 4)
            continue
        leaf = torch.from_numpy(rows[i]).requires_grad_()
        placed = backend.place(leaf, plans[i])
        np.testing.assert_array_equal(placed.detach().numpy(), outs[i].detach().numpy())
        (placed * weights[i]).sum().backward()
        np.testing.assert_allclose(grad, leaf.grad.numpy(), rtol=1e-6, atol=1e-6)


class ManyTables(nn.Module):
    """Columns of one float input cast to ids (DeepCTR-torch style), one table each;
    the last table is looked up and its result dropped."""

    def __init__(self, tables: int) -> None:
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(10, 3, padding_idx=0 if i == 1 else None)
                                  for i in range(tables))
        self.out = nn.Linear(3 * (tables - 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        looked = [emb(x[:, i:i + 1].long()) for i, emb in enumerate(self.embs)]
        return self.out(torch.cat(looked[:-1], -1).flatten(1)).squeeze(-1)


def test_step_pull_trains_many_tables_like_local_with_one_push_per_step() -> None:
    rng = np.random.default_rng(7)
    torch.manual_seed(0)
    local = ManyTables(6)
    torch.manual_seed(0)
    client = FakeClient()
    model: Any = xdl.swap(ManyTables(6), client, optimizer=xdl.optim.Adagrad.torch(lr=0.1))
    opts = [torch.optim.Adagrad(m.parameters(), lr=0.1) for m in (local, model)]
    for m in local.embs:
        m.sparse = True
    for _ in range(5):
        x = torch.from_numpy(rng.integers(0, 10, (16, 6)).astype(np.float32))
        losses = []
        for m, opt in zip((local, model), opts, strict=True):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    step = StepPull.of(model)
    assert step is not None and step.routed == 6
    for m in model.embs:
        m.wait_pushes()
    pushed = {name for name, _, _ in client.pushes}
    assert "embs.5" not in pushed  # the dropped lookup: nothing pushed, as locally
    for i, emb in enumerate(local.embs[:-1]):
        np.testing.assert_allclose(client.pull(f"embs.{i}", np.arange(10)),
                                   emb.weight.detach().numpy(), rtol=0, atol=1e-6)
