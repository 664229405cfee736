"""Tests of xdl.metrics: AUC against a brute-force pairwise count (ties count one half),
group AUC against per-group AUCs, and log loss against its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xdl import metrics


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2."""
    pos, neg = s[y > 0.5], s[y <= 0.5]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n).astype(np.float32)
    s = rng.integers(0, 12, n).astype(np.float64)  # many ties
    s += 0.3 * y  # some signal
    assert metrics.auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)


def test_auc_extremes_and_all_ties() -> None:
    y = np.array([0, 0, 1, 1])
    assert metrics.auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert metrics.auc(y, [0.5] * 4) == 0.5
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError):
        metrics.auc([0, 1], [0.5])


def test_auc_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    s = torch.tensor([0.1, 0.9, 0.8, 0.7])
    assert metrics.auc(y, s) == pytest.approx(brute_auc(y.numpy(), s.numpy()))


def test_group_auc_is_weighted_mean_of_group_aucs() -> None:
    rng = np.random.default_rng(7)
    n = 500
    g = rng.integers(0, 20, n)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 6, n) + 0.5 * y
    g[g == 3] = 3
    y[g == 5] = 1  # a group with one class only: skipped
    want_num = want_den = 0.0
    plain = []
    for k in np.unique(g):
        m = g == k
        if y[m].min() == y[m].max():
            continue
        a = brute_auc(y[m], s[m])
        want_num += a * m.sum()
        want_den += m.sum()
        plain.append(a)
    assert metrics.group_auc(y, s, g) == pytest.approx(want_num / want_den, abs=1e-12)
    assert metrics.group_auc(y, s, g, weighted=False) == pytest.approx(np.mean(plain))
    assert math.isnan(metrics.group_auc([1, 0], [0.1, 0.2], [1, 2]))


def test_log_loss() -> None:
    y = np.array([1, 0, 1, 0], dtype=np.float32)
    p = np.array([0.9, 0.2, 0.6, 0.5])
    want = -np.mean([math.log(0.9), math.log(0.8), math.log(0.6), math.log(0.5)])
    assert metrics.log_loss(y, p) == pytest.approx(want)
    # clipping keeps it finite
    assert math.isfinite(metrics.log_loss([1, 0], [0.0, 1.0]))
    with pytest.raises(ValueError):
        metrics.log_loss([1], [0.5, 0.5])
