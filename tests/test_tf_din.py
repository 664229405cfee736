"""examples/din_tf.py on a small synthetic MovieLens-shaped data set: through 2 shards the
``@xdl.tf_wrapper`` DIN (with exact prefetch) trains what the same function trains with
local tables; the swapped Keras DIN trains with ``fit``, evaluates, and unswaps."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
from test_datasets import synthetic_tables  # noqa: E402

import xdl  # noqa: E402
from xdl import datasets  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def din() -> ModuleType:
    spec = importlib.util.spec_from_file_location("din_tf", ROOT / "examples" / "din_tf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["din_tf"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data() -> datasets.DinData:
    return datasets.din_samples(synthetic_tables(seed=3, n_users=80, n_movies=60),
                                history_len=10)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with xdl.connect(local_shards=2) as c:
        yield c


def test_wrapper_through_the_server_trains_like_local(din: ModuleType, data: datasets.DinData,
                                                      client: Any) -> None:
    server = din.train_runner(din.server_runner(client, data), data, 2, 64, progress=False)
    local = din.train_runner(din.local_runner(data), data, 2, 64, progress=False)
    assert server.metrics["auc"] == pytest.approx(local.metrics["auc"], abs=1e-4)
    assert server.metrics["logloss"] == pytest.approx(local.metrics["logloss"], abs=1e-4)
    assert server.samples == 2 * len(data.train["label"])


def test_keras_model_swapped_and_fit(din: ModuleType, data: datasets.DinData,
                                     client: Any) -> None:
    result = din.train_keras(data, 1, 64, client=client)
    assert 0.0 <= result.metrics["auc"] <= 1.0 and math.isfinite(result.metrics["logloss"])
    assert {t for t in client.list_tables()["tables"] if t.startswith("keras.")} == {
        "keras.item_emb", "keras.genre_emb", "keras.user_emb"}
