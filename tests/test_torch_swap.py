"""Model surgery (swap / unswap), the functional decorator, prefetch and dense sharing."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fakes import FakeClient
from torch import nn

import xdl
from xdl.adapters import torch_nn
from xdl.errors import InvalidArgumentError, XdlError

pytestmark = pytest.mark.timeout(60)
INIT = xdl.init.Normal(stddev=0.1)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("xdl-prefetch")]


class DeepCtrLike(nn.Module):
    """DeepCTR-torch style: embeddings in a ModuleDict, a bag in a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding_dict = nn.ModuleDict({"user": nn.Embedding(30, 4),
                                             "item": nn.Embedding(40, 4, padding_idx=0)})
        self.bags = nn.ModuleList([nn.EmbeddingBag(40, 4, mode="mean")])
        self.head = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, user: torch.Tensor, item: torch.Tensor, hist: torch.Tensor
                ) -> torch.Tensor:
        x = torch.cat([self.embedding_dict["user"](user), self.embedding_dict["item"](item),
                       self.bags[0](hist)], dim=-1)
        return self.head(x).squeeze(-1)


def batch(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {"user": torch.from_numpy(rng.integers(0, 30, 8)),
            "item": torch.from_numpy(rng.integers(0, 40, 8)),
            "hist": torch.from_numpy(rng.integers(0, 40, (8, 5))),
            "label": torch.from_numpy((rng.random(8) < 0.5).astype(np.float32))}


def step(model: nn.Module, opt: torch.optim.Optimizer, b: dict[str, torch.Tensor]) -> float:
    opt.zero_grad()
    loss = nn.functional.binary_cross_entropy_with_logits(
        model(b["user"], b["item"], b["hist"]), b["label"])
    loss.backward()
    opt.step()
    return loss.item()


def test_swap_nested_containers_and_isinstance() -> None:
    client = FakeClient()
    model = xdl.swap(DeepCtrLike(), client, initializer=INIT, prefix="ctr.")
    assert isinstance(model.embedding_dict["user"], nn.Embedding)
    assert isinstance(model.embedding_dict["user"], xdl.DistributedEmbedding)
    assert isinstance(model.bags[0], nn.EmbeddingBag)
    assert isinstance(model.bags[0], xdl.DistributedEmbeddingBag)
    assert sorted(client.tables) == ["ctr.bags.0", "ctr.embedding_dict.item",
                                     "ctr.embedding_dict.user"]
    assert client.tables["ctr.bags.0"].dim == 4
    assert model.embedding_dict["item"].padding_idx == 0
    # memory: no embedding weight is left in the model
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in model.head.parameters())
    with pytest.raises(AttributeError, match="holds no weight tensor.*unswap"):
        _ = model.embedding_dict["user"].weight
    assert "table='ctr.embedding_dict.user'" in repr(model)
    assert xdl.swap(model, client) is model  # already swapped: nothing changes


def test_swap_train_unswap_round_trip() -> None:
    client = FakeClient()
    model = DeepCtrLike()
    initial = model.embedding_dict["user"].weight.detach().numpy().copy()
    model = xdl.swap(model, client, optimizer=xdl.optim.Adagrad.torch(lr=0.1),
                     initializer=INIT, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = [step(model, opt, batch(i % 4)) for i in range(30)]
    assert losses[-1] < losses[0]
    b = batch(0)
    with torch.no_grad():
        before = model(b["user"], b["item"], b["hist"])
    restored = xdl.unswap(model, client)
    user = restored.embedding_dict["user"]
    assert type(user) is nn.Embedding and type(restored.bags[0]) is nn.EmbeddingBag
    np.testing.assert_array_equal(user.weight.detach().numpy(),
                                  client.pull("embedding_dict.user", np.arange(30)))
    untouched = np.setdiff1d(np.arange(30), np.concatenate([batch(i)["user"] for i in range(4)]))
    np.testing.assert_array_equal(  # rows never trained keep the layer's value at swap
        user.weight.detach().numpy()[untouched], initial[untouched])
    assert restored.embedding_dict["item"].weight[0].abs().sum() == 0  # padding row
    with torch.no_grad():
        after = restored(b["user"], b["item"], b["hist"])
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert prefetch_threads() == []


def test_sequential_subclassed_tied_and_bare() -> None:
    client = FakeClient()
    seq = xdl.swap(nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 1)), client)
    assert isinstance(seq[0], xdl.DistributedEmbedding) and "0" in client.tables
    assert seq(torch.tensor([[1, 4]])).shape == (1, 1)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Embedding(7, 2)
            self.b = self.a

    tied = xdl.swap(Tied(), client, prefix="tied.")
    assert tied.a is tied.b and "tied.a" in client.tables and "tied.b" not in client.tables
    bare = xdl.swap(nn.Embedding(3, 2), client, prefix="bare")
    assert isinstance(bare, xdl.DistributedEmbedding) and bare.table == "bare"
    back = xdl.unswap(tied, client)
    assert type(back.a) is nn.Embedding and back.a is back.b


def test_per_table_overrides_and_hash_mode() -> None:
    client = FakeClient()
    model = xdl.swap(DeepCtrLike(), client, optimizer=xdl.optim.SGD(lr=1.0), per_table={
        "embedding_dict.user": {"name": "users", "optimizer": xdl.optim.Adagrad.torch(lr=0.5),
                                "id_mode": "hash"}})
    assert client.tables["users"].optimizer.kind == "adagrad"
    assert client.tables["bags.0"].optimizer.kind == "sgd"
    user = model.embedding_dict["user"]
    assert user.id_mode == "hash"
    assert user(torch.tensor([2**40, -5])).shape == (2, 4)  # raw hashes accepted
    with pytest.raises(XdlError, match="hash mode"):
        xdl.unswap(model, client)


def test_old_mode_argument_still_works_with_a_deprecation_warning() -> None:
    client = FakeClient()
    with pytest.warns(DeprecationWarning, match="id_mode"):
        emb = xdl.swap(nn.Embedding(4, 2), client, mode="hash", prefix="old")
    assert emb.id_mode == "hash"
    with pytest.warns(DeprecationWarning, match="id_mode"):
        xdl.swap(DeepCtrLike(), client, prefix="old2.",
                 per_table={"embedding_dict.user": {"mode": "hash"}})
    assert xdl.swap(nn.EmbeddingBag(4, 2, mode="sum"), client, prefix="bag").mode == "sum"


def test_index_mode_bounds_error() -> None:
    model = xdl.swap(DeepCtrLike(), FakeClient())
    with pytest.raises(InvalidArgumentError, match=r"id 30 out of range.*num_embeddings=30"):
        model.embedding_dict["user"](torch.tensor([3, 30]))
    with pytest.raises(InvalidArgumentError, match="id -1 out of range"):
        model.bags[0](torch.tensor([[1, -1]]))


@pytest.mark.parametrize("layer, message", [
    (nn.Embedding(4, 2, max_norm=1.0), "max_norm"),
    (nn.Embedding(4, 2, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (nn.EmbeddingBag(4, 2, mode="max"), "mode 'max'"),
])
def test_unsupported_options_are_refused(layer: nn.Module, message: str) -> None:
    with pytest.raises(XdlError, match=message):
        xdl.swap(nn.Sequential(layer), FakeClient())


def test_functional_decorator() -> None:
    client = FakeClient()
    lookups = {"item": torch_nn.Lookup("item", dim=3, initializer=INIT),
               "hist": torch_nn.Lookup("item", combiner="mean", padding_idx=0, dim=3)}

    @xdl.torch_wrapper(client, tables=lookups)
    def model_fn(item: torch.Tensor, hist: torch.Tensor, scale: float) -> torch.Tensor:
        return (item * hist).sum() * scale

    loss = model_fn(torch.tensor([5, 7]), hist=(torch.tensor([7, 9, 0]), torch.tensor([0, 2])),
                    scale=2.0)
    rows = client.pull("item", np.array([5, 7, 9]))
    expected = 2.0 * (rows[0] @ (rows[1] + rows[2]) / 2)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    (_, ids, grads), = client.pushes
    order = np.argsort(ids)  # a push's ids come in no particular order
    ids, grads = ids[order], grads[order]
    assert ids.tolist() == [5, 7, 9]
    np.testing.assert_allclose(grads[0], (rows[1] + rows[2]), rtol=1e-5)  # 2 * mean
    np.testing.assert_allclose(grads[1], rows[0], rtol=1e-5)
    np.testing.assert_allclose(grads[2], rows[0], rtol=1e-5)
    model_fn.wait_pushes()  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgumentError, match="no argument"):
        xdl.torch_wrapper(client, tables={"nope": "item"})(model_fn.__wrapped__)


def test_prefetch_uses_background_rows_and_stops_threads() -> None:
    client = FakeClient()
    model = xdl.swap(DeepCtrLike(), client, initializer=INIT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [batch(i) for i in range(6)]
    pulls_seen: list[int] = []
    for b in torch_nn.prefetch(model, batches):
        pulls_seen.append(len(client.pulls))
        step(model, opt, b)
    # every batch after the first two is prefetched: no pull happens on the main thread
    user = model.embedding_dict["user"]
    assert user.remote.pending_prefetches <= 1  # at most the batch after the last
    names = [t.name for t in prefetch_threads()]
    assert names and all("embedding_dict" in n or "bags" in n for n in names)
    restored = xdl.unswap(model, client)
    assert prefetch_threads() == []
    assert isinstance(restored.bags[0], nn.EmbeddingBag)
    assert len(pulls_seen) == 6


@pytest.mark.parametrize("exact", [False, True])
def test_prefetched_rows_are_at_most_one_step_stale(exact: bool) -> None:
    client = FakeClient()  # no push log: an exact prefetch pulls again before use
    zeros = nn.Embedding(10, 2, _weight=torch.zeros(10, 2))
    emb = xdl.swap(zeros, client, optimizer=xdl.optim.SGD(lr=1.0), prefix="s")
    ids = torch.tensor([1, 2])
    out = []
    for b in torch_nn.prefetch_batches([ids] * 5, functools.partial(emb.prefetch, exact=exact)):
        y = emb(b)
        out.append(float(y[0, 0].detach()))
        y.sum().backward()  # gradient 1 per row; SGD lr 1 → each row drops by 1 per step
    # batch t+1 is pulled while batch t computes: it sees batch t-1's push, maybe t's
    lag = [-out[t] - t for t in range(5)]  # rows start at 0 and drop by 1 per applied step
    assert all(lag_t in (0.0, -1.0) for lag_t in lag), out
    if exact:
        assert lag == [0.0] * 5, out
    emb.close()
    np.testing.assert_allclose(client.pull("s", [1, 2]), -5.0)
    assert prefetch_threads() == []


def test_a_table_looked_up_twice_per_step_gets_one_push() -> None:
    class Twice(nn.Module):
        def __init__(self, emb: nn.Module) -> None:
            super().__init__()
            self.emb = emb

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (self.emb(a).sum(1) * self.emb(b).sum(1)).sum()

    keys = np.arange(12)
    local_emb = nn.Embedding(12, 3, sparse=True, _weight=torch.from_numpy(
        xdl.init.generate(INIT, 0, keys, 3)))
    local = Twice(local_emb)
    client = FakeClient()
    remote = xdl.swap(Twice(nn.Embedding(12, 3, _weight=local_emb.weight.detach().clone())),
                      client, optimizer=xdl.optim.Adagrad.torch(lr=0.3))
    opt = torch.optim.Adagrad(local.parameters(), lr=0.3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = (torch.from_numpy(rng.integers(0, 12, (4, 3))) for _ in range(2))
        opt.zero_grad()
        local(a, b).backward()
        opt.step()
        remote(a, b).backward()
    assert len(client.pushes) == 5
    np.testing.assert_allclose(client.pull("emb", keys), local_emb.weight.detach().numpy(),
                               atol=1e-6)


def test_sync_push_without_prefetch_sees_every_update() -> None:
    client = FakeClient()
    emb = xdl.swap(nn.Embedding(10, 2), client, optimizer=xdl.optim.SGD(lr=1.0), prefix="s")
    first = emb(torch.tensor([3])).detach().numpy().copy()
    for k in range(3):
        y = emb(torch.tensor([3]))
        np.testing.assert_allclose(y.detach().numpy(), first - k)
        y.sum().backward()


def test_explicit_prefetch_routes() -> None:
    client = FakeClient()
    model = xdl.swap(DeepCtrLike(), client)
    user = model.embedding_dict["user"]
    batches = [batch(i) for i in range(3)]
    out = list(torch_nn.prefetch(model, batches, ids_fn=lambda b: [(user, b["user"])]))
    assert out == batches
    assert user.remote.pending_prefetches == 3  # not consumed: no forward ran
    user.close()


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)
        self.out = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x))).squeeze(-1)


def _dense_data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(4, 3, generator=g), torch.randn(4, generator=g)


def test_server_dense_optimizer_matches_local_sgd() -> None:
    local, remote = TwoLayer(), TwoLayer()
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    client = FakeClient()
    server_opt = xdl.ServerDenseOptimizer(remote.named_parameters(), client,
                                          optimizer=xdl.optim.SGD(lr=0.1))
    assert isinstance(server_opt, torch.optim.Optimizer)
    assert sorted(client.dense) == ["dense.fc.bias", "dense.fc.weight", "dense.out.bias",
                                    "dense.out.weight"]
    for i in range(20):
        x, y = _dense_data(i)
        for model, opt in ((local, local_opt), (remote, server_opt)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(local.parameters(), remote.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.fixture(params=["fake", "real"])
def two_clients(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Two workers' clients: one shared fake, or two real clients of one shard."""
    if request.param == "fake":
        fake = FakeClient()
        yield [fake, fake]
        return
    first = xdl.connect(local_shards=1)
    second = xdl.connect(first.servers)
    try:
        yield [first, second]
    finally:
        second.close()
        first.close()


def test_server_dense_optimizer_sync_workers_average(two_clients: list[Any]) -> None:
    workers = [TwoLayer() for _ in range(2)]
    with torch.no_grad():
        workers[1].fc.weight.add_(1.0)  # a different start: the first creator's value wins
    opts = [xdl.ServerDenseOptimizer(w.parameters(), c, optimizer=xdl.optim.SGD(lr=0.1),
                                     sync_workers=2)
            for w, c in zip(workers, two_clients, strict=True)]
    reference = TwoLayer()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            for i in range(5):
                x, y = _dense_data(10 * i + k)
                opts[k].zero_grad()
                nn.functional.mse_loss(workers[k](x), y).backward()
                opts[k].step()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    for i in range(5):  # the same steps, locally, on the mean gradient of both workers
        ref_opt.zero_grad()
        for k in range(2):
            x, y = _dense_data(10 * i + k)
            (nn.functional.mse_loss(reference(x), y) / 2).backward()
        ref_opt.step()
    for w in workers:
        for a, b in zip(reference.parameters(), w.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_docstring_names_one_step_staleness() -> None:
    doc: Any = torch_nn.prefetch.__doc__
    assert "one step stale" in doc


def test_hash_mode_starts_from_torch_default_initializer() -> None:
    client = FakeClient()
    xdl.swap(nn.Embedding(10, 3), client, id_mode="hash", prefix="h")
    assert client.tables["h"].initializer == xdl.init.Normal(mean=0.0, stddev=1.0)
    xdl.swap(nn.Embedding(10, 3), client, id_mode="hash", prefix="h2", initializer=INIT)
    assert client.tables["h2"].initializer == INIT


def test_references_to_replaced_weights_are_rewired_or_named() -> None:
    model = DeepCtrLike()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    user_weight = model.embedding_dict["user"].weight
    regularized = [user_weight]  # DeepCTR keeps such a list for its embedding L2
    with pytest.warns(RuntimeWarning, match=r"list of 1 items holds the weight of "
                                            r"embedding_dict\.user.*weight_decay"):
        model = xdl.swap(model, FakeClient())
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert id(user_weight) not in held  # dropped from the optimizer's param group
    assert held == {id(p) for p in model.parameters()}
    assert regularized[0] is user_weight


@pytest.mark.parametrize("spec, local", [
    (xdl.optim.SGD(lr=0.1, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    (xdl.optim.Adagrad.torch(lr=0.1, weight_decay=0.01),
     lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01)),
])
def test_server_weight_decay_is_torchs(spec: Any, local: Any) -> None:
    from xdl.server.table import SparseTable

    table = SparseTable("t", 3, xdl.init.Normal(stddev=1.0), spec, seed=1)
    ids = np.array([1, 5])
    param = nn.Parameter(torch.from_numpy(table.pull(ids).copy()))
    opt = local([param])
    for k in range(3):
        grad = np.random.default_rng(k).standard_normal((2, 3)).astype(np.float32)
        table.push(ids, grad)
        param.grad = torch.from_numpy(grad)
        opt.step()
    np.testing.assert_allclose(table.pull(ids), param.detach().numpy(), rtol=0, atol=1e-7)
    assert xdl.optim.from_dict({"kind": "sgd", "lr": 1.0}).weight_decay == 0.0
    with pytest.raises(InvalidArgumentError, match="weight_decay"):
        xdl.optim.SGD(lr=0.1, weight_decay=-1.0)


def test_without_a_flush_point_gradients_are_pushed_before_the_next_pull(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend whose framework has no end-of-backward hook (schedule_flush → False)
    stays exact: the step's gradients, merged, go out before the table's next pull."""
    backend = xdl.get_backend("torch")
    monkeypatch.setattr(type(backend), "schedule_flush", lambda self, callback: False)
    weight = torch.from_numpy(xdl.init.generate(INIT, 0, np.arange(12), 3))
    local_emb = nn.Embedding(12, 3, sparse=True, _weight=weight.clone())
    client = FakeClient()
    remote = xdl.swap(nn.Embedding(12, 3, _weight=weight.clone()), client,
                      optimizer=xdl.optim.Adagrad.torch(lr=0.3))
    opt = torch.optim.Adagrad(local_emb.parameters(), lr=0.3)
    rng = np.random.default_rng(1)
    for step_no in range(4):
        a, b = (torch.from_numpy(rng.integers(0, 12, (4, 2))) for _ in range(2))
        opt.zero_grad()
        (local_emb(a).sum() * local_emb(b).sum()).backward()
        opt.step()
        (remote(a).sum() * remote(b).sum()).backward()
        assert len(client.pushes) == step_no  # this step's gradients wait in the buffer
    remote.wait_pushes()
    assert len(client.pushes) == 4  # one merged push per step
    np.testing.assert_allclose(client.pull("embedding", np.arange(12)),
                               local_emb.weight.detach().numpy(), atol=1e-6)


class ColumnViews(nn.Module):
    """Two tables fed views of one id input: ``x[:, 0]`` and ``x[:, 1:3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(20, 4)
        self.b = nn.Embedding(30, 4)
        self.out = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([self.a(x[:, 0]), self.b(x[:, 1:3]).flatten(1)], 1)
        return self.out(both).squeeze(-1)


def test_step_pull_takes_views_of_inputs_and_skips_a_smaller_last_batch() -> None:
    rng = np.random.default_rng(3)
    sizes = [16, 16, 16, 5]
    xs = [torch.from_numpy(np.stack([rng.integers(0, 20, n), rng.integers(0, 30, n),
                                     rng.integers(0, 30, n)], 1)) for n in sizes]
    ys = [torch.from_numpy((rng.random(n) < 0.5).astype(np.float32)) for n in sizes]
    torch.manual_seed(0)
    local = ColumnViews()
    torch.manual_seed(0)
    model = ColumnViews()
    client = xdl.connect(local_shards=2)
    try:
        model = xdl.swap(model, client, optimizer=xdl.optim.SGD(lr=0.1), prefix="views.")
        calls: list[list[str]] = []
        original = client.pull_many
        client.pull_many = lambda r, **kw: calls.append(sorted(r)) or original(r, **kw)  # type: ignore[method-assign]
        local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = nn.BCEWithLogitsLoss()
        for x, y in zip(xs, ys, strict=True):
            for m, o in ((local, local_opt), (model, opt)):
                o.zero_grad()
                loss = loss_fn(m(x), y)
                loss.backward()
                o.step()
                if m is local:
                    expected = loss.item()
            assert loss.item() == pytest.approx(expected, abs=1e-6)
        # the first forward learns the routes; the last, smaller batch's views are not
        # known (each layer pulls in its own forward); the two between: one pull_many
        assert calls == [["views.a", "views.b"]] * 2
        for name in ("a", "b"):
            np.testing.assert_allclose(client.pull(f"views.{name}", np.arange(20)),
                                       getattr(local, name).weight.detach().numpy()[:20],
                                       rtol=0, atol=1e-6)
        xdl.unswap(model, client)
    finally:
        client.close()


def test_an_orphaned_weight_stops_requiring_grad_unless_another_layer_holds_it() -> None:
    model = DeepCtrLike()
    user_weight = model.embedding_dict["user"].weight
    item_weight = model.embedding_dict["item"].weight
    tied_out = nn.Linear(4, 40, bias=False)
    tied_out.weight = item_weight  # an output layer tied to the item embedding
    model.add_module("tied_out", tied_out)
    regularized = [user_weight, item_weight]  # DeepCTR's embedding L2 list
    with pytest.warns(RuntimeWarning, match="no longer require grad"):
        model = xdl.swap(model, FakeClient())
    assert not user_weight.requires_grad  # nothing trains it: no gradient computed
    assert item_weight.requires_grad  # the tied Linear still trains it
    penalty = sum((w ** 2).sum() for w in regularized)
    assert isinstance(penalty, torch.Tensor) and penalty.requires_grad
