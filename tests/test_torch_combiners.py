"""Bag combiners and the differentiable op against ``nn.EmbeddingBag`` / ``nn.Embedding``,
and the numpy reference backend against the torch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import FakeClient
from torch import nn

import xdl
from xdl.backend import plan_bags, plan_lookup
from xdl.backends.numpy_backend import NumpyBackend
from xdl.errors import InvalidArgumentError

VOCAB, DIM = 20, 4


@pytest.fixture
def client() -> FakeClient:
    c = FakeClient()
    c.create_table("t", DIM, initializer=xdl.init.Normal(stddev=1.0), seed=3)
    return c


def reference(client: FakeClient, cls: type[nn.Module], **kwargs: object) -> nn.Module:
    weight = torch.from_numpy(client.pull("t", np.arange(VOCAB)))
    return cls(VOCAB, DIM, _weight=weight.clone(), **kwargs)


def pushed_grad(client: FakeClient) -> np.ndarray:
    """The pushed unique-row gradients scattered into a [VOCAB, DIM] array."""
    dense = np.zeros((VOCAB, DIM), np.float32)
    for _, ids, grads in client.pushes:
        dense[ids] += grads
    return dense


def dense_grad(module: nn.Module) -> np.ndarray:
    g = module.weight.grad
    return (g.to_dense() if g.is_sparse else g).numpy()


CASES = [  # (ids, offsets, kwargs)
    ([1, 2, 2, 5, 7, 1], [0, 2, 2, 5], {}),  # an empty bag
    ([1, 2, 2, 5, 7, 1], [0, 3, 6], {"include_last_offset": True}),
    ([[1, 2, 0], [3, 3, 0], [0, 0, 0]], None, {"padding_idx": 0}),  # padded, an all-pad bag
    ([[4, 9], [9, 9]], None, {}),
    ([1, 0, 3, 0], [0, 1], {"padding_idx": 0}),
]


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("ids, offsets, kwargs", CASES)
def test_bags_match_embedding_bag(client: FakeClient, mode: str, ids: list, offsets: list | None,
                                  kwargs: dict) -> None:
    ref = reference(client, nn.EmbeddingBag, mode=mode, **kwargs)
    ours = xdl.swap(nn.EmbeddingBag(VOCAB, DIM, mode=mode, **kwargs), client,
                    per_table={"": {"name": "t"}}, existing="keep")
    assert isinstance(ours, nn.EmbeddingBag)
    t_ids = torch.tensor(ids)
    t_off = None if offsets is None else torch.tensor(offsets)
    expected, got = ref(t_ids, t_off), ours(t_ids, t_off)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    np.testing.assert_allclose(pushed_grad(client), dense_grad(ref), atol=1e-6)
    pushed_ids = np.concatenate([p[1] for p in client.pushes])
    assert len(np.unique(pushed_ids)) == len(pushed_ids)  # each row pushed once
    assert kwargs.get("padding_idx") not in pushed_ids


def test_per_sample_weights(client: FakeClient) -> None:
    ids, offsets = torch.tensor([3, 3, 8, 1]), torch.tensor([0, 2])
    w_ref = torch.tensor([0.5, 2.0, -1.0, 3.0], requires_grad=True)
    w_ours = w_ref.detach().clone().requires_grad_(True)
    ref = reference(client, nn.EmbeddingBag, mode="sum")
    ours = xdl.swap(nn.EmbeddingBag(VOCAB, DIM, mode="sum"), client,
                    per_table={"": {"name": "t"}}, existing="keep")
    expected = ref(ids, offsets, per_sample_weights=w_ref)
    got = ours(ids, offsets, per_sample_weights=w_ours)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(w_ours.grad, w_ref.grad)
    np.testing.assert_allclose(pushed_grad(client), dense_grad(ref), atol=1e-6)


def test_sqrtn(client: FakeClient) -> None:
    rows = client.pull("t", np.arange(VOCAB))
    backend = xdl.get_backend("torch")
    ids, offsets = np.array([1, 2, 2, 5, 0]), np.array([0, 4, 5])
    out = backend.embedding_bag(client, "t", ids, offsets, mode="sqrtn", padding_idx=0)
    expected = np.stack([rows[[1, 2, 2, 5]].sum(0) / 2.0, np.zeros(DIM), np.zeros(DIM)])
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_embedding_matches_nn_embedding(client: FakeClient, padding_idx: int | None) -> None:
    ids = torch.tensor([[0, 4, 4], [19, 0, 7]])
    ref = reference(client, nn.Embedding, padding_idx=padding_idx)
    with torch.no_grad():
        if ref.padding_idx is not None:
            ref.weight[ref.padding_idx] = 0  # what nn.Embedding does at construction
    ours = xdl.swap(nn.Embedding(VOCAB, DIM, padding_idx=padding_idx), client,
                    per_table={"": {"name": "t"}}, existing="keep")
    expected, got = ref(ids), ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    np.testing.assert_allclose(pushed_grad(client), dense_grad(ref), atol=1e-6)


def test_expand_gathers_group_rows_to_samples() -> None:
    backend = xdl.get_backend("torch")
    groups = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    out = backend.expand(groups, np.array([0, 0, 2, 1, 2]))
    assert out.tolist() == [[0, 1], [0, 1], [4, 5], [2, 3], [4, 5]]
    out.sum().backward()
    assert groups.grad.tolist() == [[2, 2], [1, 1], [2, 2]]
    np.testing.assert_array_equal(NumpyBackend().expand(groups.detach().numpy(), [2, 0]),
                                  [[4, 5], [0, 1]])


def test_numpy_reference_matches_torch(client: FakeClient) -> None:
    ids, offsets = np.array([5, 1, 5, 9, 1, 1]), np.array([0, 3, 3])
    upstream = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    np_backend, torch_backend = NumpyBackend(), xdl.get_backend("torch")
    ref = np_backend.embedding_bag(client, "t", ids, offsets, mode="mean")
    out = torch_backend.embedding_bag(client, "t", ids, offsets, mode="mean")
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-6)
    (out * torch.from_numpy(upstream)).sum().backward()
    plan = plan_bags(ids, offsets, mode="mean")
    np.testing.assert_allclose(client.pushes[-1][2], np_backend.embedding_bag_grad(plan, upstream),
                               atol=1e-6)
    lookup = plan_lookup(ids.reshape(2, 3), padding_idx=9)
    grad = np.ones((6, DIM), np.float32)
    per_id = dict(zip(lookup.unique_ids.tolist(),
                      np_backend.embedding_grad(lookup, grad)[:, 0].tolist(), strict=True))
    assert per_id == {1: 3.0, 5: 2.0}  # uniques come in first-occurrence order


def test_bad_bag_layouts_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="start with 0"):
        plan_bags(np.array([1, 2]), np.array([1]))
    with pytest.raises(InvalidArgumentError, match="non-decreasing"):
        plan_bags(np.array([1, 2]), np.array([0, 2, 1]))
    with pytest.raises(InvalidArgumentError, match="need offsets"):
        plan_bags(np.array([1, 2]))
    with pytest.raises(InvalidArgumentError, match="combiner"):
        plan_bags(np.array([[1]]), mode="max")
    with pytest.raises(InvalidArgumentError, match="integers"):
        plan_lookup(xdl.backend.as_ids(np.array([1.5])))
