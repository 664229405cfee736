"""Tests written once, run per backend: each case of ``tests/backend_cases`` (one per
framework) gets server-vs-local equivalence, combiners, "swap keeps the model" and
swap → train → unswap on sequential, functional and subclassed models.

To add a framework, add a case module (see tests/backend_cases/__init__.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from backend_cases import BATCH, DIM, KINDS, LENGTH, VOCAB, BackendCase, cases
from fakes import FakeClient

import xdl
from xdl.backends.numpy_backend import NumpyBackend
from xdl.errors import XdlError
from xdl.lookup import RemoteTable, plan_bags, plan_lookup

pytestmark = pytest.mark.timeout(120)
LR, STEPS = 0.3, 8


def _case_params() -> list[Any]:
    return [pytest.param(c, id=c.backend) for c in cases()]


@pytest.fixture(params=_case_params())
def case(request: pytest.FixtureRequest) -> BackendCase:
    c: BackendCase = request.param
    if not c.available():
        pytest.skip(f"{c.framework} is not installed")
    return c


def batches(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int64),
             "label": (rng.random(BATCH) < 0.5).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_swap_keeps_the_model(case: BackendCase, kind: str) -> None:
    model = case.build(kind, seed=1)
    b = batches(1)[0]
    before = case.logits(model, b)
    rows = case.embedding_rows(model)
    client = FakeClient()
    model = xdl.swap(model, client)
    np.testing.assert_array_equal(case.logits(model, b), before)  # step 0: same outputs
    (table,) = client.tables
    np.testing.assert_array_equal(client.pull(table, np.arange(VOCAB)), rows)
    with pytest.raises(XdlError, match="prefix="):  # another model, same paths
        xdl.swap(case.build(kind, seed=2), client)
    other = xdl.swap(case.build(kind, seed=2), client, prefix="other.")
    assert case.logits(other, b).shape == before.shape


@pytest.mark.parametrize("kind", KINDS)
def test_server_training_matches_local_then_unswap(case: BackendCase, kind: str) -> None:
    local = case.build(kind, seed=3)
    remote = xdl.swap(case.build(kind, seed=3), FakeClient(), optimizer=xdl.optim.SGD(lr=LR))
    local_opt, remote_opt = case.optimizer(local, LR), case.optimizer(remote, LR)
    data = batches(STEPS, seed=4)
    local_losses = [case.train_step(local, local_opt, b) for b in data]
    remote_losses = [case.train_step(remote, remote_opt, b) for b in data]
    np.testing.assert_allclose(remote_losses, local_losses, rtol=0, atol=1e-5)
    assert local_losses[-1] != local_losses[0]  # it trained
    served = case.logits(remote, data[0])
    restored = xdl.unswap(remote)
    np.testing.assert_allclose(case.embedding_rows(restored), case.embedding_rows(local),
                               atol=1e-5)
    np.testing.assert_array_equal(case.logits(restored, data[0]), served)
    np.testing.assert_allclose(case.logits(restored, data[0]), case.logits(local, data[0]),
                               atol=1e-5)


CASES = [  # (ids, offsets, padding_idx)
    (np.array([1, 2, 2, 5, 7, 1]), np.array([0, 2, 2, 5]), None),  # an empty bag
    (np.array([[1, 2, 0], [3, 3, 0], [0, 0, 0]]), None, 0),  # padded, an all-pad bag
    (np.array([[4, 9], [9, 9]]), None, None),
]


@pytest.mark.parametrize("combiner", [None, "sum", "mean", "sqrtn"])
@pytest.mark.parametrize("ids, offsets, padding_idx", CASES)
def test_lookups_and_combiners_match_the_numpy_reference(
        case: BackendCase, combiner: str | None, ids: np.ndarray, offsets: Any,
        padding_idx: int | None) -> None:
    if combiner is None and offsets is not None:
        pytest.skip("plain lookups take no offsets")
    client = FakeClient()
    client.create_table("t", DIM, initializer=xdl.init.Normal(stddev=1.0), seed=5)
    remote = RemoteTable(client, "t", DIM, num_rows=VOCAB, padding_idx=padding_idx)
    reference = NumpyBackend()
    if combiner is None:
        plan = plan_lookup(ids, padding_idx)
        expected = reference.place(client.pull("t", plan.unique_ids), plan)
        upstream = np.random.default_rng(0).standard_normal(expected.shape).astype(np.float32)
        grads = reference.embedding_grad(plan, upstream)
        unique = plan.unique_ids
    else:
        bag_plan = plan_bags(ids, offsets, mode=combiner, padding_idx=padding_idx)
        expected = reference.combine(client.pull("t", bag_plan.lookup.unique_ids), bag_plan)
        upstream = np.random.default_rng(0).standard_normal(expected.shape).astype(np.float32)
        grads = reference.embedding_bag_grad(bag_plan, upstream)
        unique = bag_plan.lookup.unique_ids
    backend = xdl.get_backend(case.backend)
    got = case.lookup_grads(backend, remote, ids, offsets, combiner, upstream)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    remote.close()  # flushes the buffer whatever the backend's flush point
    if not unique.size:
        assert client.pushes == []
        return
    (_, pushed_ids, pushed), = client.pushes  # one push for the step
    order = np.argsort(pushed_ids)
    np.testing.assert_array_equal(pushed_ids[order], np.sort(unique))
    np.testing.assert_allclose(pushed[order], grads[np.argsort(unique)], atol=1e-6)
    assert padding_idx not in pushed_ids


def test_unswap_of_an_unswapped_model_changes_nothing(case: BackendCase) -> None:
    model = case.build("sequential", seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xdl.unswap(model) is model
