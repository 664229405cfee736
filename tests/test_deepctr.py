"""DeepCTR-torch models, unmodified, swapped onto the server and trained with their own
``compile`` / ``fit``: swap keeps the model, training equals the same model trained
locally, every table a step looks up goes in one ``pull_many`` (a table looked up
several times pulled once) and its gradients in one ``push_many``, and DeepCTR's
embedding L2 list is named in swap's warning. Skipped when deepctr-torch is not
installed."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
deepctr_inputs = pytest.importorskip("deepctr_torch.inputs")
deepctr_models = pytest.importorskip("deepctr_torch.models")

import xdl  # noqa: E402
from xdl.adapters.torch_nn import StepPull  # noqa: E402

SparseFeat = deepctr_inputs.SparseFeat
DenseFeat = deepctr_inputs.DenseFeat
VarLenSparseFeat = deepctr_inputs.VarLenSparseFeat

N = 384
BATCH = 128
LR = 0.05


class CountingClient:
    """Delegates to a real client and records which tables each pull / push carried."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def pull(self, table: str, ids: Any, **kw: Any) -> Any:
        self.calls.append(("pull", (table,)))
        return self._client.pull(table, ids, **kw)

    def push(self, table: str, ids: Any, grads: Any, **kw: Any) -> Any:
        self.calls.append(("push", (table,)))
        return self._client.push(table, ids, grads, **kw)

    def pull_many(self, requests: Any, **kw: Any) -> Any:
        self.calls.append(("pull_many", tuple(requests)))
        return self._client.pull_many(requests, **kw)

    def push_many(self, requests: Any, **kw: Any) -> Any:
        self.calls.append(("push_many", tuple(requests)))
        return self._client.push_many(requests, **kw)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


@pytest.fixture(scope="module")
def shards() -> Iterator[Any]:
    client = xdl.connect(local_shards=2)
    try:
        yield client
    finally:
        client.close()


def _deepfm_data() -> tuple[list[Any], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = [7, 11, 5, 13, 9]
    names = [f"C{i}" for i in range(len(vocab))]
    cols: list[Any] = [SparseFeat(n, v, embedding_dim=4) for n, v in zip(names, vocab, strict=True)]
    cols += [DenseFeat("I0", 1), DenseFeat("I1", 1)]
    x = {n: rng.integers(0, v, N) for n, v in zip(names, vocab, strict=True)}
    x.update({f"I{i}": rng.random(N).astype(np.float32) for i in range(2)})
    y = (rng.random(N) < 0.4).astype(np.float32)
    return cols, x, y


def _deepfm(cols: list[Any], l2: float = 0.0) -> Any:
    return deepctr_models.DeepFM(cols, cols, dnn_hidden_units=(16, 8), seed=1024,
                                 l2_reg_embedding=l2, l2_reg_linear=l2)


def _predict(model: Any, x: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(model.predict({k: v.copy() for k, v in x.items()}, batch_size=N))


def _fit(model: Any, x: dict[str, np.ndarray], y: np.ndarray) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    model.compile(torch.optim.Adagrad(params, lr=LR), "binary_crossentropy")
    model.fit({k: v.copy() for k, v in x.items()}, y, batch_size=BATCH, epochs=1, verbose=0,
              shuffle=False)


def test_deepfm_swapped_keeps_the_model_and_trains_like_local(shards: Any) -> None:
    cols, x, y = _deepfm_data()
    local = _deepfm(cols)
    client = CountingClient(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # l2 = 0 lists, named elsewhere
        model = xdl.swap(_deepfm(cols), client, optimizer=xdl.optim.Adagrad.torch(lr=LR),
                         prefix="fm.")
    tables = {m.table for m in model.modules() if hasattr(m, "remote")}
    assert len(tables) == 10  # 5 fields x (FM/DNN embedding + linear weight)
    np.testing.assert_array_equal(_predict(model, x), _predict(local, x))  # step 0

    client.calls.clear()
    _fit(local, x, y)
    _fit(model, x, y)
    np.testing.assert_allclose(_predict(model, x), _predict(local, x), rtol=0, atol=2e-6)

    steps = N // BATCH
    fit_calls = client.calls
    assert client.count("push") == 0
    assert client.count("push_many") >= steps  # one push per step, every table in it
    assert all(set(t) == tables for k, t in fit_calls if k == "push_many")
    # the first forward (predict above) learned the routes: every later forward is one
    # pull_many of every table, nothing pulled one table at a time
    assert client.count("pull") == 0
    assert all(set(t) == tables for k, t in fit_calls if k == "pull_many")
    step = StepPull.of(model)
    assert step is not None and step.routed == 10


def test_deepctr_embedding_l2_is_named_in_the_warning(shards: Any) -> None:
    cols, _, _ = _deepfm_data()
    model = _deepfm(cols, l2=1e-4)
    with pytest.warns(RuntimeWarning) as record:
        xdl.swap(model, shards, prefix="fm_l2.")
    text = " ".join(str(w.message) for w in record)
    assert "DeepFM.regularization_weight[0][0] (a list of 5 items) holds the weights of " \
           "embedding_dict.C0, embedding_dict.C1" in text
    assert "DeepFM.regularization_weight[1][0]" in text  # the linear part's list
    assert "weight_decay = 2 * l2" in text


def _din_data() -> tuple[list[Any], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(1)
    n_items, n_cates, maxlen = 30, 6, 5
    cols: list[Any] = [
        SparseFeat("user", 12, embedding_dim=4),
        SparseFeat("item_id", n_items, embedding_dim=4),
        SparseFeat("cate_id", n_cates, embedding_dim=4),
        VarLenSparseFeat(SparseFeat("hist_item_id", n_items, embedding_dim=4,
                                    embedding_name="item_id"), maxlen=maxlen,
                         length_name="seq_length"),
        VarLenSparseFeat(SparseFeat("hist_cate_id", n_cates, embedding_dim=4,
                                    embedding_name="cate_id"), maxlen=maxlen,
                         length_name="seq_length"),
    ]
    length = rng.integers(1, maxlen + 1, N)
    mask = np.arange(maxlen)[None, :] < length[:, None]
    x = {"user": rng.integers(0, 12, N), "item_id": rng.integers(1, n_items, N),
         "cate_id": rng.integers(1, n_cates, N),
         "hist_item_id": rng.integers(1, n_items, (N, maxlen)) * mask,
         "hist_cate_id": rng.integers(1, n_cates, (N, maxlen)) * mask,
         "seq_length": length}
    y = (rng.random(N) < 0.5).astype(np.float32)
    return cols, x, y


def test_din_table_looked_up_several_times_is_pulled_once(shards: Any) -> None:
    cols, x, y = _din_data()

    def din() -> Any:
        return deepctr_models.DIN(cols, ["item_id", "cate_id"], dnn_hidden_units=(16, 8),
                                  att_hidden_size=(8, 4), seed=1024, l2_reg_embedding=0.0)

    local = din()
    client = CountingClient(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = xdl.swap(din(), client, optimizer=xdl.optim.Adagrad.torch(lr=LR),
                         prefix="din.")
    np.testing.assert_array_equal(_predict(model, x), _predict(local, x))
    client.calls.clear()
    _fit(local, x, y)
    _fit(model, x, y)
    np.testing.assert_allclose(_predict(model, x), _predict(local, x), rtol=0, atol=2e-6)
    # item_id is looked up four times a forward (DeepCTR drops one result), hist and
    # target ids included: one pull_many per forward, each table named once in it
    pulls = [t for k, t in client.calls if k == "pull_many"]
    assert client.count("pull") == 0
    assert len(pulls) == N // BATCH + 1  # fit's steps and the predict
    assert all(sorted(t) == ["din.embedding_dict.cate_id", "din.embedding_dict.item_id",
                             "din.embedding_dict.user"] for t in pulls)
