"""Exact prefetch: training with ``prefetch(exact=True)`` equals training without
prefetch (bit for bit) and local training; ``exact=False`` is one step stale; the
client's push log (``push_mark`` / ``pushed_since``) on real shards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import xdl
import xdl.client as xclient
from xdl.adapters import torch_nn

pytestmark = pytest.mark.timeout(120)

VOCAB, DIM, BAG, BATCH, STEPS, SEED, LR = 40, 4, 3, 16, 30, 11, 0.5
INIT = xdl.init.Normal(stddev=0.1)
TOL = 1e-5


class Model(nn.Module):
    """One embedding looked up twice per step (two id tensors) → MLP → logit."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(2 * DIM, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.emb(a).sum(1), self.emb(b).sum(1)], dim=-1)
        return self.mlp(x).squeeze(-1)


Batch = dict[str, torch.Tensor]


def make_model() -> Model:
    torch.manual_seed(SEED)
    model = Model()
    with torch.no_grad():
        keys = np.arange(VOCAB, dtype=np.int64)
        model.emb.weight.copy_(torch.from_numpy(xdl.init.generate(INIT, SEED, keys, DIM)))
    return model


def make_batches() -> list[Batch]:
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(STEPS):  # skewed ids: consecutive batches share most of their ids
        a, b = (np.minimum(rng.geometric(0.15, size=(BATCH, BAG)) - 1, VOCAB - 1)
                for _ in range(2))
        out.append({"a": torch.from_numpy(a), "b": torch.from_numpy(b),
                    "label": torch.from_numpy((rng.random(BATCH) < 0.4).astype(np.float32))})
    return out


def train(model: nn.Module, batches: Any, after_backward: Callable[[], None] | None = None
          ) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model(batch["a"], batch["b"]), batch["label"])
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def client() -> Iterator[xdl.Client]:
    with xdl.connect(local_shards=2) as c:
        yield c


@pytest.fixture(scope="module")
def local_losses() -> list[float]:
    return train(make_model(), make_batches())


def remote(client: Any, name: str, sync_push: bool = False) -> nn.Module:
    return xdl.swap(make_model(), client, optimizer=xdl.optim.SGD(lr=LR), initializer=INIT,
                    seed=SEED, prefix=f"{name}.", sync_push=sync_push)


def forced(model: nn.Module, batches: list[Batch], exact: bool) -> Iterator[Batch]:
    """Prefetch both lookups of the next batch and wait for the background pull, so
    it certainly lands before the current batch's push (deterministic staleness)."""
    emb = model.get_submodule("emb")

    def schedule(b: Batch) -> None:
        for ids in (b["a"], b["b"]):
            emb.prefetch(ids, exact=exact)
            emb.remote._prefetched[-1].future.result()

    return torch_nn.prefetch_batches(batches, schedule)


def test_no_prefetch_matches_local(client: xdl.Client, local_losses: list[float]) -> None:
    model = remote(client, "plain", sync_push=True)
    losses = train(model, make_batches())
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    assert abs(losses[-1] - losses[0]) > 1e-3  # it learned something
    xdl.unswap(model, client)


@pytest.mark.parametrize("sync_push", [False, True])
def test_exact_prefetch_equals_no_prefetch_and_local(client: xdl.Client,
                                                     local_losses: list[float],
                                                     sync_push: bool) -> None:
    plain = remote(client, f"ref{int(sync_push)}", sync_push=True)
    reference = train(plain, make_batches())
    model = remote(client, f"exact{int(sync_push)}", sync_push=sync_push)
    batches = make_batches()
    losses = train(model, torch_nn.prefetch(model, batches))
    assert losses == reference  # bit-identical
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    a = xdl.unswap(plain, client).emb.weight.detach().numpy()
    b = xdl.unswap(model, client).emb.weight.detach().numpy()
    np.testing.assert_array_equal(a, b)


def test_exact_with_forced_early_pulls_and_ids_fn(client: xdl.Client,
                                                  local_losses: list[float]) -> None:
    model = remote(client, "forced")
    losses = train(model, forced(model, make_batches(), exact=True))
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    xdl.unswap(model, client)
    model = remote(client, "idsfn")
    emb = model.get_submodule("emb")
    batches = make_batches()
    losses = train(model, torch_nn.prefetch(model, batches,
                                            ids_fn=lambda b: [(emb, b["a"]), (emb, b["b"])]))
    np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
    xdl.unswap(model, client)


def test_stale_prefetch_differs(client: xdl.Client, local_losses: list[float]) -> None:
    model = remote(client, "stale")
    losses = train(model, forced(model, make_batches(), exact=False))
    assert np.max(np.abs(np.subtract(losses, local_losses))) > 1e-4  # the test can fail
    xdl.unswap(model, client)
    model = remote(client, "stale2")
    emb = model.get_submodule("emb")
    batches = make_batches()
    # the ids_fn path honours exact=False: no re-pull after pushes (pushed_since unused)
    calls: list[int] = []
    original = client.pushed_since
    client.pushed_since = lambda t, m: calls.append(m) or original(t, m)  # type: ignore[method-assign]
    try:
        train(model, torch_nn.prefetch(model, batches, exact=False,
                                       ids_fn=lambda b: [(emb, b["a"]), (emb, b["b"])]))
    finally:
        del client.pushed_since
    assert calls == []
    xdl.unswap(model, client)


def test_truncated_push_log_still_exact(monkeypatch: pytest.MonkeyPatch,
                                        local_losses: list[float]) -> None:
    monkeypatch.setattr(xclient, "PUSH_LOG_LENGTH", 2)
    with xdl.connect(local_shards=2) as c:
        model = remote(c, "trunc")
        truncated: list[bool] = []
        original = c.pushed_since

        def spy(table: str, mark: int) -> np.ndarray | None:
            since = original(table, mark)
            truncated.append(since is None)
            return since

        c.pushed_since = spy  # type: ignore[method-assign]
        zeros = np.zeros((3, DIM), dtype=np.float32)

        def extra_pushes() -> None:  # more pushes than the log holds; they change nothing
            for _ in range(3):
                c.push("trunc.emb", np.array([0, 1, 2]), zeros)

        losses = train(model, torch_nn.prefetch(model, make_batches()), extra_pushes)
        assert any(truncated)
        np.testing.assert_allclose(losses, local_losses, rtol=0, atol=TOL)
        xdl.unswap(model, c)


def test_push_mark_and_pushed_since(client: xdl.Client) -> None:
    client.create_table("log.a", 2)
    client.create_table("log.b", 2)
    assert client.push_mark("log.a") == 0
    assert client.pushed_since("log.a", 0).tolist() == []
    g = np.ones((4, 2), dtype=np.float32)
    client.push("log.a", np.array([9, 3, 3, 7]), g)
    assert client.push_mark("log.a") == 1
    assert client.push_mark("log.b") == 0
    assert client.pushed_since("log.a", 0).tolist() == [3, 7, 9]
    assert client.pushed_since("log.a", 1).tolist() == []
    client.push("log.a", np.array([100, 5, 1]), g[:3], unique=True)
    client.push("log.b", np.array([4]), g[:1])
    since = client.pushed_since("log.a", 0)
    assert since is not None and since.dtype == np.int64
    assert since.tolist() == [1, 3, 5, 7, 9, 100]
    assert client.pushed_since("log.a", 1).tolist() == [1, 5, 100]
    assert client.pushed_since("log.b", 0).tolist() == [4]
    mark = client.push_mark("log.a")
    for i in range(xclient.PUSH_LOG_LENGTH):
        client.push("log.a", np.array([i]), g[:1])
    assert client.pushed_since("log.a", mark).tolist() == list(range(xclient.PUSH_LOG_LENGTH))
    assert client.pushed_since("log.a", mark - 1) is None  # the log no longer reaches back
    client.wait()
    mark = client.push_mark("log.b")
    client.drop_table("log.b")
    assert client.pushed_since("log.b", mark) is None  # rows changed without a push


def test_threads_stop(client: xdl.Client) -> None:
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("xdl-prefetch")]


class TwoTables(nn.Module):
    """Two tables, the first looked up twice per step."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_model()
        self.other = nn.Embedding(VOCAB, DIM, sparse=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.inner(a, b) + self.other(a).sum((1, 2))


def test_prefetch_pulls_every_table_of_a_batch_in_one_call(
        client: xdl.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(SEED)
    local = TwoTables()
    torch.manual_seed(SEED)
    model = xdl.swap(TwoTables(), client, optimizer=xdl.optim.SGD(lr=LR), prefix="many.")
    calls: list[list[str]] = []
    original = client.pull_many
    monkeypatch.setattr(client, "pull_many",
                        lambda requests, **kw: calls.append(sorted(requests)) or original(
                            requests, **kw))
    batches = make_batches()[:8]
    expected = train(local, batches)
    losses = train(model, torch_nn.prefetch(model, batches))
    np.testing.assert_allclose(losses, expected, rtol=0, atol=TOL)  # still exact
    # one pull_many per batch after the first (on which the routes are learned)
    assert len(calls) == len(batches) - 1
    assert all(c == ["many.inner.emb", "many.other"] for c in calls)
    xdl.unswap(model, client)


def test_exact_prefetch_is_pulled_behind_the_push_not_re_pulled(
        client: xdl.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(SEED)
    local = TwoTables()
    torch.manual_seed(SEED)
    model = xdl.swap(TwoTables(), client, optimizer=xdl.optim.SGD(lr=LR), prefix="behind.")
    singles: list[str] = []
    original = client.pull
    monkeypatch.setattr(client, "pull",
                        lambda table, ids, **kw: singles.append(table) or original(
                            table, ids, **kw))
    batches = make_batches()[:8]
    expected = train(local, batches)
    losses = train(model, torch_nn.prefetch(model, batches))
    np.testing.assert_allclose(losses, expected, rtol=0, atol=TOL)  # exact
    # only the first batch's three lookups pull one table at a time (the routes are
    # learned on it); every later batch's rows come with one pull_many sent right
    # behind the previous push, so no row that push touched is pulled again
    assert len(singles) <= 3
    xdl.unswap(model, client)


def test_prefetch_without_pushes_pulls_at_the_lookup_and_keeps_nothing(
        client: xdl.Client) -> None:
    torch.manual_seed(SEED)
    model = xdl.swap(TwoTables(), client, optimizer=xdl.optim.SGD(lr=LR), prefix="eval.")
    batches = make_batches()[:6]
    with torch.no_grad():  # no backward, no push: each coming batch's pull waits in vain
        plain = [model(b["a"], b["b"]) for b in batches]
        fetched = [model(b["a"], b["b"]) for b in torch_nn.prefetch(model, batches)]
    for a, b in zip(plain, fetched, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for module in model.modules():
        remote = getattr(module, "remote", None)
        if remote is not None:
            assert remote._deferred == []  # fired at the lookup, not left waiting
    xdl.unswap(model, client)
