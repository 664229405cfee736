"""ESMM (Entire Space Multi-task Model) in MXNet Gluon, trained through the parameter
server and, for comparison, locally.

ESMM (Ma et al., SIGIR 2018; XDL ran it on MXNet) learns the conversion rate over the
entire impression space: shared embeddings feed a CTR tower and a CVR tower,
``pCTCVR = pCTR × pCVR``, and the two losses are on *click* and on *click and convert*,
both over all impressions, so the CVR tower is never trained on the clicked sample
only (no sample-selection bias).

**Data.** The model's home data set is Ali-CCP (Alibaba click and conversion
prediction); :func:`read_aliccp` parses its format (the PaddleRec slot text
``sample_id,click,conversion,field:feature,...`` and the CSV variant with a header), and
the tests check it on ../shared/data/tiny_format_samples. Ali-CCP itself is not on this
machine, so the real run uses **MovieLens-100k with proxy labels** (said plainly, they
are not real clicks or purchases): the impressions of a user are the movies the user
rated plus as many sampled movies the user never rated; *click* = the user rated the
movie; *conversion* = the rating is >= 4 (so conversion implies click, as in ESMM).
The split is by time, as in the DIN example: a user's last 20% ratings are test
samples; each sampled unrated movie takes the timestamp, and so the side of the split,
of one of that user's ratings. Features: user id, gender, age bucket, occupation, movie
id and genres (a bag, mean-pooled).

Run ``python examples/esmm_movielens.py --help`` for the flags; it prints CTR, CVR (on
clicked test impressions) and CTCVR test AUC of the server run and of the same model
trained locally.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import xdl
from xdl import datasets, metrics
from xdl.backends.mxnet_backend import import_mxnet
from xdl.wrapper import prefetch_batches

mx = import_mxnet()  # MXNet 1.9.1 needs the numpy.bool shim; the backend applies it
from mxnet import autograd, gluon, nd  # noqa: E402

EMB_DIM = 16
INIT = xdl.init.TruncatedNormal(stddev=0.05)
SEED = 2024
LR = 0.05
TABLES = ("user_emb", "item_emb", "genre_emb", "gender_emb", "age_emb", "occupation_emb")
SPARSE = ("user", "item", "gender", "age", "occupation")
"""Single-id features; ``genres`` is the bag feature."""

# ------------------------------------------------------------------------- Ali-CCP

ALICCP_FIELDS: tuple[str, ...] = (
    "101", "109_14", "110_14", "127_14", "150_14", "121", "122", "124", "125", "126",
    "127", "128", "129", "205", "206", "207", "210", "216", "508", "509", "702", "853",
    "301",
)
"""The 23 Ali-CCP feature fields (user, item, combination and context fields)."""


@dataclass
class AliccpData:
    """Parsed Ali-CCP samples.

    :ivar click: float32 ``[n]``; :ivar conversion: float32 ``[n]`` (purchase).
    :ivar bags: field → ``(ids, offsets)``: field-salted int64 feature hashes of every
        sample, sample ``i`` owning ``ids[offsets[i]:offsets[i + 1]]`` (``offsets``
        ``[n + 1]``; a field may be empty or hold several features).
    :ivar dense: float32 ``[n, k]`` dense features (the CSV variant's ``D*`` columns).
    :ivar dense_names: names of the dense columns.
    """

    click: np.ndarray
    conversion: np.ndarray
    bags: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    dense_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.click)


def _offsets(rows: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)


def read_aliccp(path: str | os.PathLike[str], *, seed: int = 0) -> AliccpData:
    """Parse an Ali-CCP file.

    Two layouts are recognised by their first line:

    * PaddleRec's slot text (the ESMM reference reader's input): one sample a line,
      ``sample_id,click,conversion,field:feature,field:feature,...``; a field may
      repeat (multi-valued) or be absent;
    * the CSV variant with a header ``click,purchase,<field columns>,<D* dense
      columns>``: one integer feature per field column.

    Features are hashed per field (:func:`xdl.datasets.hash_ints`, salted by the field
    name), so equal feature numbers of different fields differ. Vectorised: numpy
    string operations over all tokens, a loop over the fields only.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    if first.startswith("click,"):
        return _read_aliccp_csv(path, seed)
    text = path.read_text(encoding="utf-8").strip()
    lines = text.split("\n") if text else []
    n = len(lines)
    counts = np.char.count(np.asarray(lines, dtype=str), ",") + 1 if n else np.zeros(0, int)
    tokens = np.asarray(text.replace("\n", ",").split(",") if n else [], dtype=str)
    row = np.repeat(np.arange(n, dtype=np.int64), counts)
    pos = np.arange(len(tokens), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    click = tokens[pos == 1].astype(np.float32)
    conversion = tokens[pos == 2].astype(np.float32)
    feat = pos >= 3
    parts = np.char.partition(tokens[feat], ":")
    field_of, values, frow = parts[:, 0], parts[:, 2], row[feat]
    if np.any(parts[:, 1] != ":"):
        bad = tokens[feat][parts[:, 1] != ":"][0]
        raise xdl.errors.InvalidArgumentError(
            f"{path}: feature {bad!r} is not 'field:feature' (Ali-CCP slot text expected)")
    bags = {}
    for name in ALICCP_FIELDS:  # 23 fields, each vectorised
        mask = field_of == name
        ids = datasets.hash_ints(values[mask].astype(np.int64), name, seed)
        bags[name] = (ids, _offsets(frow[mask], n))
    return AliccpData(click, conversion, bags)


def _read_aliccp_csv(path: Path, seed: int) -> AliccpData:
    import pyarrow.csv as pcsv

    table = pcsv.read_csv(path)
    names = table.column_names
    n = table.num_rows
    click = table.column("click").to_numpy().astype(np.float32)
    conversion = table.column("purchase").to_numpy().astype(np.float32)
    sparse = [c for c in names if c not in ("click", "purchase") and not c.startswith("D")]
    dense_names = tuple(c for c in names if c.startswith("D"))
    offsets = np.arange(n + 1, dtype=np.int64)
    bags = {c: (datasets.hash_ints(table.column(c).to_numpy().astype(np.int64), c, seed),
                offsets) for c in sparse}
    dense = (np.stack([table.column(c).to_numpy().astype(np.float32) for c in dense_names], 1)
             if dense_names else np.zeros((n, 0), np.float32))
    return AliccpData(click, conversion, bags, dense, dense_names)


# ------------------------------------------------------------ MovieLens proxy samples


@dataclass
class EsmmData:
    """ESMM impressions split by time: ``train`` / ``test`` map ``user``, ``gender``,
    ``age``, ``occupation``, ``item`` (int64 ``[n]``), ``genres`` (int64 ``[n, G]``,
    0-padded), ``click`` and ``conversion`` (float32 ``[n]``) to arrays; ``vocab``
    gives each id space's size (0 is padding)."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    vocab: dict[str, int]


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def esmm_samples(din: datasets.DinData, *, negatives: int = 1, seed: int = SEED) -> EsmmData:
    """ESMM impressions from MovieLens DIN samples (see the module docstring).

    Every rating is a clicked impression (conversion: its DIN label, rating >= 4); for
    each rating, ``negatives`` movies the user never rated are drawn uniformly, each an
    impression without click, on the rating's side of the time split. Drawing is
    vectorised: all draws at once, redrawn in rounds where they hit a rated movie.
    """
    rng = np.random.default_rng(seed)
    n_items = din.vocab["item"]
    every_user = np.concatenate([din.train["user"], din.test["user"]])
    every_item = np.concatenate([din.train["item"], din.test["item"]])
    rated = np.unique(every_user * n_items + every_item)
    genres_of = din.item_genres.astype(np.int64)

    def impressions(split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(split["user"])
        src = np.repeat(np.arange(n), negatives)
        user = split["user"][src]
        item = rng.integers(1, n_items, size=len(src))
        for _ in range(100):  # rounds over all draws; a user rates < half the movies
            bad = _member(user * n_items + item, rated)
            if not bad.any():
                break
            item[bad] = rng.integers(1, n_items, size=int(bad.sum()))
        out = {}
        for key in ("user", "gender", "age", "occupation"):
            out[key] = np.concatenate([split[key], split[key][src]]).astype(np.int64)
        out["item"] = np.concatenate([split["item"], item]).astype(np.int64)
        out["genres"] = genres_of[out["item"]]
        out["click"] = np.concatenate([np.ones(n), np.zeros(len(src))]).astype(np.float32)
        out["conversion"] = np.concatenate([split["label"],
                                            np.zeros(len(src))]).astype(np.float32)
        return out

    vocab = {k: din.vocab[k] for k in ("user", "item", "genre", "gender", "age", "occupation")}
    return EsmmData(impressions(din.train), impressions(din.test), vocab)


def load_data(cache_dir: str | None = None, negatives: int = 1) -> EsmmData:
    """MovieLens-100k as ESMM impressions with proxy labels."""
    return esmm_samples(datasets.din_samples(datasets.load_movielens100k(cache_dir)),
                        negatives=negatives)


# ---------------------------------------------------------------------------- model


def _tower(prefix: str, hidden: tuple[int, ...]) -> gluon.nn.HybridSequential:
    tower = gluon.nn.HybridSequential(prefix=prefix)
    with tower.name_scope():
        for h in hidden:
            tower.add(gluon.nn.Dense(h, activation="relu"))
        tower.add(gluon.nn.Dense(1))
    return tower


class ESMM(gluon.HybridBlock):
    """Shared embeddings, a CTR and a CVR tower. Inputs (float32 ids, 0 = padding):
    ``user, item, gender, age, occupation`` ``[B]`` and ``genres`` ``[B, G]`` (mean of
    the non-padding genres). Output: ``(ctr_logit, cvr_logit)``, each ``[B]``."""

    def __init__(self, vocab: dict[str, int], dim: int = EMB_DIM,
                 hidden: tuple[int, ...] = (64, 32), sparse_grad: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        with self.name_scope():
            for name, key in zip(TABLES, ("user", "item", "genre", "gender", "age",
                                          "occupation"), strict=True):
                setattr(self, name, gluon.nn.Embedding(vocab[key], dim,
                                                       sparse_grad=sparse_grad))
            self.ctr = _tower("ctr_", hidden)
            self.cvr = _tower("cvr_", hidden)

    def hybrid_forward(self, F: Any, user: Any, item: Any, genres: Any, gender: Any,  # noqa: N803
                       age: Any, occupation: Any) -> tuple[Any, Any]:
        """``(ctr_logit, cvr_logit)``."""
        g = self.genre_emb(genres)
        gmask = F.expand_dims(genres > 0, axis=-1)
        g = F.broadcast_div(F.sum(F.broadcast_mul(g, gmask), axis=1),
                            F.maximum(F.sum(gmask, axis=1), 1.0))
        x = F.concat(self.user_emb(user), self.item_emb(item), g, self.gender_emb(gender),
                     self.age_emb(age), self.occupation_emb(occupation), dim=-1)
        return (F.reshape(self.ctr(x), (-1,)), F.reshape(self.cvr(x), (-1,)))


FEATURES = ("user", "item", "genres", "gender", "age", "occupation")


def to_batch(arrays: dict[str, np.ndarray], rows: np.ndarray | slice) -> dict[str, Any]:
    """Rows of every feature and label as float32 NDArrays."""
    return {k: nd.array(arrays[k][rows], dtype=np.float32)
            for k in (*FEATURES, "click", "conversion")}


def build_model(data: EsmmData, sparse_grad: bool = False) -> ESMM:
    """A hybridized ESMM: dense weights from ``mx.random`` seeded with :data:`SEED`,
    table ``i``'s rows ``xdl.init.generate(INIT, SEED + i, keys)``."""
    mx.random.seed(SEED)
    net = ESMM(data.vocab, sparse_grad=sparse_grad, prefix="esmm_")
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    for i, name in enumerate(TABLES):
        emb = getattr(net, name)
        n = emb.weight.shape[0]
        emb.weight.set_data(nd.array(
            xdl.init.generate(INIT, SEED + i, np.arange(n, dtype=np.int64), EMB_DIM)))
    net.hybridize(static_alloc=True)
    return net


def esmm_loss(ctr_logit: Any, cvr_logit: Any, click: Any, conversion: Any) -> Any:
    """Per impression: log loss of pCTR on click plus log loss of pCTCVR = pCTR × pCVR on
    click-and-convert (both over all impressions)."""
    ctr_loss = gluon.loss.SigmoidBinaryCrossEntropyLoss()(ctr_logit, click)
    pctcvr = nd.sigmoid(ctr_logit) * nd.sigmoid(cvr_logit)
    y = click * conversion
    eps = 1e-7
    ctcvr_loss = -(y * nd.log(pctcvr + eps) + (1 - y) * nd.log(1 - pctcvr + eps))
    return ctr_loss + ctcvr_loss


def _batches(data: EsmmData, epoch: int, batch_size: int) -> Any:
    n = len(data.train["click"])
    perm = np.random.default_rng([SEED, epoch]).permutation(n)
    for lo in range(0, n, batch_size):
        yield to_batch(data.train, perm[lo:lo + batch_size])


def train_loop(net: gluon.Block, trainer: gluon.Trainer, data: EsmmData, epochs: int,
               batch_size: int, prefetch: bool = False) -> float:
    """Train ``epochs`` over ``data.train`` (order depends only on the seed).

    :param prefetch: pull the next batch's rows while the current batch computes
        (distributed blocks only; exact, so the training is the same).
    """
    inputs = dict(zip(TABLES, ("user", "item", "genres", "gender", "age", "occupation"),
                      strict=True))

    def schedule(b: dict[str, Any]) -> None:
        for table, key in inputs.items():
            getattr(net, table).prefetch(b[key])

    start = time.perf_counter()
    for epoch in range(epochs):
        batches = _batches(data, epoch, batch_size)
        for b in prefetch_batches(batches, schedule) if prefetch else batches:
            with autograd.record():
                ctr, cvr = net(*(b[k] for k in FEATURES))
                loss = esmm_loss(ctr, cvr, b["click"], b["conversion"])
            loss.backward()
            trainer.step(b["click"].shape[0])
    nd.waitall()
    return time.perf_counter() - start


def evaluate(net: gluon.Block, arrays: dict[str, np.ndarray], batch_size: int = 8192
             ) -> dict[str, float]:
    """CTR AUC (all impressions), CVR AUC (clicked impressions: pCVR vs conversion) and
    CTCVR AUC (all impressions: pCTR × pCVR vs click-and-convert)."""
    pctr, pcvr = [], []
    for lo in range(0, len(arrays["click"]), batch_size):
        b = to_batch(arrays, slice(lo, lo + batch_size))
        ctr, cvr = net(*(b[k] for k in FEATURES))
        pctr.append(nd.sigmoid(ctr).asnumpy())
        pcvr.append(nd.sigmoid(cvr).asnumpy())
    p_ctr, p_cvr = np.concatenate(pctr), np.concatenate(pcvr)
    click, conv = arrays["click"], arrays["conversion"]
    clicked = click > 0
    return {"ctr_auc": metrics.auc(click, p_ctr),
            "cvr_auc": metrics.auc(conv[clicked], p_cvr[clicked]),
            "ctcvr_auc": metrics.auc(click * conv, p_ctr * p_cvr)}


def trainer_for(net: gluon.Block, lr: float = LR) -> gluon.Trainer:
    """Adagrad over every parameter the net exposes."""
    return gluon.Trainer(net.collect_params(), "adagrad", {"learning_rate": lr})


@dataclass
class Result:
    """Outcome of one run."""

    name: str
    metrics: dict[str, float]
    seconds: float


def train_local(data: EsmmData, epochs: int, batch_size: int, lr: float = LR) -> Result:
    """ESMM with ordinary ``sparse_grad`` embeddings and ``gluon.Trainer`` Adagrad."""
    net = build_model(data, sparse_grad=True)
    seconds = train_loop(net, trainer_for(net, lr), data, epochs, batch_size)
    return Result("local", evaluate(net, data.test), seconds)


def train_server(data: EsmmData, epochs: int, batch_size: int, shards: int = 2,
                 lr: float = LR, prefetch: bool = False) -> Result:
    """ESMM with its six tables on ``shards`` local shards (``xdl.swap``, server-side
    Adagrad in MXNet's semantics; ``prefetch``: the next batch's rows pulled while the
    current batch computes, exactly); the dense towers train with ``gluon.Trainer``."""
    net = build_model(data)
    with xdl.connect(local_shards=shards) as client:
        # the tables start from the layers' rows; initializer and seeds say the same
        net = xdl.swap(net, client, optimizer=xdl.optim.Adagrad.mxnet(lr=lr),
                       initializer=INIT,
                       per_table={name: {"seed": SEED + i} for i, name in enumerate(TABLES)})
        seconds = train_loop(net, trainer_for(net, lr), data, epochs, batch_size,
                             prefetch=prefetch)
        result = Result(f"server x{shards}", evaluate(net, data.test), seconds)
        xdl.unswap(net, client)
    return result


def _report(r: Result) -> None:
    m = r.metrics
    print(f"{r.name:>10}: test AUC  CTR {m['ctr_auc']:.4f}  CVR {m['cvr_auc']:.4f}  "
          f"CTCVR {m['ctcvr_auc']:.4f}  (train {r.seconds:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    """Train through the server and locally; print both runs' AUCs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--negatives", type=int, default=1,
                   help="sampled unrated movies per rating (impressions without click)")
    p.add_argument("--cache-dir", default=None, help="MovieLens-100k cache folder")
    p.add_argument("--no-local", action="store_true", help="skip the local run")
    p.add_argument("--prefetch", action="store_true",
                   help="server run: pull the next batch's rows while the current computes")
    args = p.parse_args(argv)
    try:
        data = load_data(args.cache_dir, args.negatives)
    except datasets.DatasetUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tr, te = data.train, data.test
    print("MovieLens-100k with PROXY labels (click = rated, conversion = rating >= 4; "
          "not real clicks or purchases)")
    print(f"impressions: {len(tr['click']):,} train, {len(te['click']):,} test; train CTR "
          f"{tr['click'].mean():.3f}, CVR among clicks "
          f"{tr['conversion'][tr['click'] > 0].mean():.3f}")
    _report(train_server(data, args.epochs, args.batch_size, args.shards, args.lr,
                         args.prefetch))
    if not args.no_local:
        _report(train_local(data, args.epochs, args.batch_size, args.lr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
