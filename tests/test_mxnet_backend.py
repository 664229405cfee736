"""The mxnet backend's lookups against the numpy reference: plain lookups with padding,
bags (sum / mean / sqrtn, 2-D padded and offsets, per-sample weights), expand, the
host-callback operator, and ``xdl.mxnet_wrapper``: forward values and the row gradients
that reach the push."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fakes import FakeClient

import xdl
from xdl.backends.numpy_backend import NumpyBackend
from xdl.lookup import RemoteTable, plan_bags, plan_lookup

pytestmark = pytest.mark.timeout(60)

DIM, SEED = 3, 11
INIT = xdl.init.Normal(stddev=1.0)


@pytest.fixture(scope="module")
def backend() -> Any:
    return xdl.get_backend("mxnet")


@pytest.fixture
def client() -> FakeClient:
    client = FakeClient()
    client.create_table("t", DIM, initializer=INIT, optimizer=xdl.optim.SGD(lr=1.0), seed=SEED)
    return client


def rows_of(ids: np.ndarray) -> np.ndarray:
    return xdl.init.generate(INIT, SEED, np.asarray(ids, np.int64), DIM)


def pushed(client: FakeClient, remote: RemoteTable) -> dict[int, np.ndarray]:
    xdl.get_backend("mxnet").wait_backward()  # MXNet runs the backward asynchronously
    remote.wait_pushes()
    return {int(i): g for _, ids, grads in client.pushes for i, g in zip(ids, grads,
                                                                         strict=True)}


def test_lookup_with_padding(backend: Any, client: FakeClient) -> None:
    from mxnet import autograd, nd

    ids = np.array([[3, 0, 3], [7, 5, 0]])
    remote = RemoteTable(client, "t", DIM, id_mode="hash", padding_idx=0)
    weight = np.arange(18, dtype=np.float32).reshape(2, 3, DIM)
    with autograd.record():
        out = backend.lookup(remote, nd.array(ids, dtype="int64"))
        loss = (out * nd.array(weight)).sum()
    loss.backward()
    expected = np.where((ids == 0)[..., None], 0.0, rows_of(ids.reshape(-1)).reshape(2, 3, DIM))
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-6)
    plan = plan_lookup(ids, 0)
    ref = NumpyBackend().embedding_grad(plan, weight.reshape(-1, DIM))
    got = pushed(client, remote)
    assert sorted(got) == sorted(plan.unique_ids.tolist()) and 0 not in got
    for i, row in zip(plan.unique_ids, ref, strict=True):
        np.testing.assert_allclose(got[int(i)], row, rtol=1e-6)


@pytest.mark.parametrize("combiner, layout", [
    (c, layout) for c in ("sum", "mean", "sqrtn") for layout in ("padded", "offsets")
] + [("sum", "weighted")])  # per_sample_weights go with combiner='sum'
def test_bags(backend: Any, client: FakeClient, combiner: str, layout: str) -> None:
    from mxnet import autograd, nd

    remote = RemoteTable(client, "t", DIM, id_mode="hash", padding_idx=0)
    if layout == "padded":
        ids, offsets = np.array([[4, 4, 0], [0, 0, 0], [9, 2, 4]]), None
    else:
        ids, offsets = np.array([4, 4, 9, 2, 4, 0]), np.array([0, 2, 2, 5])
    psw = np.linspace(0.5, 2.0, ids.size).reshape(ids.shape).astype(np.float32)
    w_in = nd.array(psw) if layout == "weighted" else None
    head = np.arange(4 * DIM, dtype=np.float32).reshape(4, DIM)[:len(offsets) if
                                                                 offsets is not None else 3]
    with autograd.record():
        out = backend.lookup_bags(remote, nd.array(ids, dtype="int64"),
                                  None if offsets is None else nd.array(offsets, dtype="int64"),
                                  combiner=combiner, per_sample_weights=w_in)
        (out * nd.array(head)).sum().backward()
    plan = plan_bags(ids, offsets, mode=combiner, padding_idx=0)
    ref = NumpyBackend()
    rows = rows_of(plan.lookup.unique_ids)
    expected = ref.combine(rows, plan, per_sample_weights=psw if w_in is not None else None)
    np.testing.assert_allclose(out.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    grads = ref.embedding_bag_grad(plan, head, psw if w_in is not None else None)
    got = pushed(client, remote)
    for i, row in zip(plan.lookup.unique_ids, grads, strict=True):
        np.testing.assert_allclose(got[int(i)], row, rtol=1e-5, atol=1e-6)


def test_expand(backend: Any) -> None:
    from mxnet import nd

    groups = nd.array(np.arange(6, dtype=np.float32).reshape(3, 2))
    out = backend.expand(groups, np.array([2, 0, 0, 1]))
    np.testing.assert_array_equal(out.asnumpy(), [[4, 5], [0, 1], [0, 1], [2, 3]])


def test_mxnet_wrapper(backend: Any) -> None:
    from mxnet import autograd, nd

    client = FakeClient()

    @xdl.mxnet_wrapper(client, tables={
        "item": xdl.Lookup("item", dim=DIM, initializer=INIT, seed=SEED),
        "hist": xdl.Lookup("item", combiner="mean", dim=DIM, padding_idx=0)})
    def model_fn(item: Any, hist: Any, scale: float) -> Any:
        return ((item + hist) * scale).sum()  # plain MXNet

    item_ids, hist_ids = np.array([5, 6]), np.array([[5, 0], [7, 8]])
    with autograd.record():
        loss = model_fn(nd.array(item_ids, dtype="int64"), nd.array(hist_ids, dtype="int64"),
                        2.0)
    loss.backward()
    hist_rows = rows_of(np.array([5, 7, 8]))
    expected = 2.0 * (rows_of(item_ids).sum() + hist_rows[0].sum()
                      + (hist_rows[1] + hist_rows[2]).sum() / 2)
    assert float(loss.asscalar()) == pytest.approx(expected, rel=1e-5)
    model_fn.wait_pushes()
    got = {int(i): g for _, ids, grads in client.pushes for i, g in zip(ids, grads, strict=True)}
    assert len(client.pushes) == 1  # one push per table per step: both lookups merged
    np.testing.assert_allclose(got[5], np.full(DIM, 2.0 + 2.0), rtol=1e-6)
    np.testing.assert_allclose(got[6], np.full(DIM, 2.0), rtol=1e-6)
    np.testing.assert_allclose(got[7], np.full(DIM, 1.0), rtol=1e-6)
    model_fn.close()


def test_host_callback_operator(backend: Any, client: FakeClient) -> None:
    """The custom operator alone, as a hybridized graph runs it (``nd.Custom``)."""
    from mxnet import autograd, nd

    from xdl.adapters.gluon import place_numpy, unique_grads
    from xdl.backends.mxnet_backend import host_lookup, register_host

    remote = RemoteTable(client, "t", DIM, id_mode="hash")
    taken: list[tuple[np.ndarray, np.ndarray]] = []

    class Host:
        def host_forward(self, ids: np.ndarray) -> tuple[np.ndarray, Any]:
            plan, rows = remote.lookup(ids)
            return place_numpy(rows, plan, DIM), plan

        def host_backward(self, plan: Any, grad: np.ndarray) -> None:
            taken.append((plan.unique_ids, unique_grads(grad, plan, DIM)))

        def host_output_shape(self, shape: tuple[int, ...], extra: Any) -> tuple[int, ...]:
            return (*shape, DIM)

    host = Host()
    key = register_host(host)
    anchor = nd.zeros((1,))
    anchor.attach_grad()
    ids = np.array([[1, 2, 1]], dtype=np.float32)
    with autograd.record():
        out = host_lookup(nd, key, nd.array(ids), anchor)
        (out * 2).sum().backward()
    anchor.grad.wait_to_read()
    np.testing.assert_allclose(out.asnumpy()[0], rows_of(np.array([1, 2, 1])), rtol=1e-6)
    (unique, grads), = taken
    np.testing.assert_array_equal(unique, [1, 2])
    np.testing.assert_allclose(grads, [[4.0] * DIM, [2.0] * DIM])
    assert float(anchor.grad.asscalar()) == 0.0
