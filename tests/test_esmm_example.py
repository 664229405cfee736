"""examples/esmm_movielens.py: the Ali-CCP parser on the format samples in
../shared/data/tiny_format_samples (values checked against a plain reading of the raw
lines), the MovieLens proxy impressions, and ESMM trained through 2 shards equal to
ESMM trained locally (a small synthetic MovieLens-shaped data set)."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest
from test_datasets import SHARED_DATA, synthetic_tables

from xdl import datasets

pytestmark = pytest.mark.timeout(180)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = SHARED_DATA / "tiny_format_samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no {SAMPLES}")


@pytest.fixture(scope="module")
def esmm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("esmm_movielens",
                                                  ROOT / "examples" / "esmm_movielens.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["esmm_movielens"] = module
    spec.loader.exec_module(module)
    return module


@needs_samples
@pytest.mark.parametrize("name", ["esmm_aliccp_train_small.txt", "esmm_aliccp_test_small.txt"])
def test_aliccp_slot_text(esmm: ModuleType, name: str) -> None:
    path = SAMPLES / "paddlerec" / name
    lines = path.read_text().strip().split("\n")
    d = esmm.read_aliccp(path)
    assert len(d) == len(lines) == 10
    for i, line in enumerate(lines):  # the test reads the raw text its own way
        tokens = line.split(",")
        assert d.click[i] == float(tokens[1]) and d.conversion[i] == float(tokens[2])
        for field in esmm.ALICCP_FIELDS:
            ids, offsets = d.bags[field]
            want = [int(t.split(":")[1]) for t in tokens[3:] if t.split(":")[0] == field]
            got = ids[offsets[i]:offsets[i + 1]]
            np.testing.assert_array_equal(got, datasets.hash_ints(np.array(want, np.int64),
                                                                  field))
    assert set(np.unique(d.click)) <= {0.0, 1.0}
    assert np.all(d.conversion <= d.click)  # a purchase implies a click
    # the multi-valued user field really is multi-valued
    assert np.diff(d.bags["150_14"][1]).max() > 1


@needs_samples
def test_aliccp_csv(esmm: ModuleType) -> None:
    path = SAMPLES / "torch-rechub" / "ali-ccp__ali_ccp_train_sample.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    d = esmm.read_aliccp(path)
    assert len(d) == len(rows) == 100
    np.testing.assert_array_equal(d.click, [float(r["click"]) for r in rows])
    np.testing.assert_array_equal(d.conversion, [float(r["purchase"]) for r in rows])
    np.testing.assert_array_equal(
        d.bags["205"][0], datasets.hash_ints(np.array([int(r["205"]) for r in rows]), "205"))
    assert d.dense_names == tuple(k for k in rows[0] if k.startswith("D"))
    np.testing.assert_allclose(d.dense[:, 0], [float(r["D109_14"]) for r in rows], rtol=1e-6)


def test_aliccp_rejects_other_text(esmm: ModuleType, tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1,0,0,210-5\n")
    with pytest.raises(Exception, match="field:feature"):
        esmm.read_aliccp(bad)


@pytest.fixture(scope="module")
def data(esmm: ModuleType) -> object:
    din = datasets.din_samples(synthetic_tables(seed=5, n_users=60, n_movies=50),
                               history_len=5)
    return esmm.esmm_samples(din, negatives=2, seed=1)


def test_proxy_impressions(esmm: ModuleType, data: object) -> None:
    din = datasets.din_samples(synthetic_tables(seed=5, n_users=60, n_movies=50),
                               history_len=5)
    for split, src in ((data.train, din.train), (data.test, din.test)):  # type: ignore[attr-defined]
        n = len(src["user"])
        assert len(split["click"]) == 3 * n  # each rating + 2 sampled unrated movies
        np.testing.assert_array_equal(split["click"], np.r_[np.ones(n), np.zeros(2 * n)])
        np.testing.assert_array_equal(split["conversion"][:n], src["label"])
        assert not split["conversion"][n:].any()
        np.testing.assert_array_equal(split["user"][n:], np.repeat(src["user"], 2))
    rated = {(u, i) for s in (din.train, din.test) for u, i in zip(s["user"], s["item"],
                                                                   strict=True)}
    for split in (data.train, data.test):  # type: ignore[attr-defined]
        clicked = split["click"] > 0
        pairs = set(zip(split["user"][~clicked], split["item"][~clicked], strict=True))
        assert not pairs & rated  # sampled movies were never rated by that user
        assert split["item"][~clicked].min() >= 1
    np.testing.assert_array_equal(data.train["genres"],  # type: ignore[attr-defined]
                                  din.item_genres[data.train["item"]])  # type: ignore[attr-defined]


@pytest.mark.parametrize("prefetch", [False, True], ids=["pull", "exact-prefetch"])
def test_esmm_through_the_server_equals_local(esmm: ModuleType, data: object,
                                              prefetch: bool) -> None:
    server = esmm.train_server(data, 1, 64, shards=2, prefetch=prefetch)
    local = esmm.train_local(data, 1, 64)
    for key in ("ctr_auc", "cvr_auc", "ctcvr_auc"):
        assert 0.0 <= server.metrics[key] <= 1.0
        assert server.metrics[key] == pytest.approx(local.metrics[key], abs=1e-4), key
