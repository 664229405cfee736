"""The main example (examples/din_movielens.py, what `make demo` runs) on a small
synthetic MovieLens-shaped data set: through 2 shards, without prefetch or with exact
prefetch, it trains exactly what local training trains; with one-step-stale prefetch it
trains and evaluates."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
from types import ModuleType

import pytest
from test_datasets import synthetic_tables

from xdl import datasets

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def din() -> ModuleType:
    spec = importlib.util.spec_from_file_location("din_movielens",
                                                  ROOT / "examples" / "din_movielens.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["din_movielens"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data() -> datasets.DinData:
    return datasets.din_samples(synthetic_tables(seed=3, n_users=80, n_movies=60),
                                history_len=10)


def test_server_training_equals_local_without_prefetch(din: ModuleType,
                                                       data: datasets.DinData) -> None:
    server = din.train_server(data, 1, 64, shards=2, progress=False, use_prefetch=False)
    local = din.train_local(data, 1, 64, progress=False)
    assert server.metrics["auc"] == pytest.approx(local.metrics["auc"], abs=1e-4)
    assert server.metrics["logloss"] == pytest.approx(local.metrics["logloss"], abs=1e-4)


def test_server_training_equals_local_with_exact_prefetch(din: ModuleType,
                                                         data: datasets.DinData) -> None:
    server = din.train_server(data, 1, 64, shards=2, progress=False, use_prefetch=True)
    local = din.train_local(data, 1, 64, progress=False)
    assert server.metrics["auc"] == pytest.approx(local.metrics["auc"], abs=1e-4)
    assert server.metrics["logloss"] == pytest.approx(local.metrics["logloss"], abs=1e-4)


def test_server_training_with_stale_prefetch_runs(din: ModuleType,
                                                  data: datasets.DinData) -> None:
    result = din.train_server(data, 1, 64, shards=2, progress=False, use_prefetch=True,
                              exact_prefetch=False)
    assert 0.0 <= result.metrics["auc"] <= 1.0 and math.isfinite(result.metrics["logloss"])
    assert result.samples == len(data.train["label"])
