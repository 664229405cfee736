"""Evaluation metrics in pure numpy: AUC, group AUC and log loss.

Inputs may be numpy arrays, lists or anything ``numpy.asarray`` accepts (including CPU
torch tensors). Everything is vectorized; ties in scores count one half, as in the
Mann-Whitney U statistic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["auc", "group_auc", "log_loss"]


def _flat(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _average_ranks(keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """1-based ranks of the sorted ``keys[order]``, ties replaced by their mean rank.

    :returns: ranks aligned with ``order`` (``ranks[i]`` is the rank of ``order[i]``).
    """
    sk = keys[order]
    n = len(sk)
    new = np.ones(n, dtype=bool)
    new[1:] = sk[1:] != sk[:-1]
    run_id = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], n) - 1
    return ((first + last) / 2.0 + 1.0)[run_id]


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, from ranks (ties in ``scores`` count one half).

    :param labels: 0/1 (or boolean) labels; anything > 0.5 is positive.
    :param scores: predicted scores or probabilities, same length.
    :returns: the AUC, or ``nan`` when only one class is present.
    """
    y = _flat(labels) > 0.5
    s = _flat(scores)
    if len(y) != len(s):
        raise ValueError(f"auc: {len(y)} labels but {len(s)} scores")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = _average_ranks(s, order)
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_auc(labels: Any, scores: Any, groups: Any, *, weighted: bool = True) -> float:
    """Group AUC (GAUC): the AUC of each group (user), averaged over groups that have
    both classes, weighted by group size (XDL's definition) or unweighted.

    :param labels: 0/1 labels.
    :param scores: predicted scores.
    :param groups: integer group key of each sample (e.g. user id).
    :param weighted: weight each group's AUC by its number of samples.
    :returns: the group AUC, or ``nan`` when no group has both classes.
    """
    y = _flat(labels) > 0.5
    s = _flat(scores)
    g = _flat(groups, np.int64)
    if not len(y) == len(s) == len(g):
        raise ValueError(f"group_auc: lengths differ ({len(y)}, {len(s)}, {len(g)})")
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((s, g))
    gs, ss, ys = g[order], s[order], y[order]
    n = len(gs)
    new_g = np.ones(n, dtype=bool)
    new_g[1:] = gs[1:] != gs[:-1]
    gid = np.cumsum(new_g) - 1
    gstart = np.flatnonzero(new_g)
    # tie runs within a group: (group, score) changes
    new_r = new_g.copy()
    new_r[1:] |= ss[1:] != ss[:-1]
    rid = np.cumsum(new_r) - 1
    rfirst = np.flatnonzero(new_r)
    rlast = np.append(rfirst[1:], n) - 1
    ranks = ((rfirst + rlast) / 2.0 + 1.0)[rid] - gstart[gid]
    n_groups = len(gstart)
    size = np.bincount(gid, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(gid, weights=ys.astype(np.float64), minlength=n_groups)
    n_neg = size - n_pos
    rank_sum = np.bincount(gid, weights=np.where(ys, ranks, 0.0), minlength=n_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    aucs = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    w = size[ok] if weighted else np.ones(int(ok.sum()))
    return float((aucs * w).sum() / w.sum())


def log_loss(labels: Any, probs: Any, *, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` against 0/1 ``labels``.

    :param labels: 0/1 labels (soft labels in [0, 1] are allowed).
    :param probs: predicted probabilities of the positive class, clipped to
        ``[eps, 1 - eps]``.
    :param eps: clipping bound.
    :returns: the mean log loss (natural log).
    """
    y = _flat(labels)
    p = np.clip(_flat(probs), eps, 1.0 - eps)
    if len(y) != len(p):
        raise ValueError(f"log_loss: {len(y)} labels but {len(p)} probabilities")
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
