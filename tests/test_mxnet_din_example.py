"""examples/din_mxnet.py on a small synthetic MovieLens-shaped data set: the Gluon DIN
trained through 2 shards gives what the same DIN trained locally gives."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest
from test_datasets import synthetic_tables

from xdl import datasets

pytestmark = pytest.mark.timeout(180)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def din() -> ModuleType:
    spec = importlib.util.spec_from_file_location("din_mxnet", ROOT / "examples" / "din_mxnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["din_mxnet"] = module
    spec.loader.exec_module(module)
    return module


def test_server_training_equals_local(din: ModuleType) -> None:
    data = datasets.din_samples(synthetic_tables(seed=3, n_users=80, n_movies=60),
                                history_len=10)
    server = din.train_server(data, 1, 64, shards=2)
    local = din.train_local(data, 1, 64)
    assert server.samples == local.samples == len(data.train["label"])
    for key in ("auc", "logloss"):
        assert server.metrics[key] == pytest.approx(local.metrics[key], abs=1e-4), key
