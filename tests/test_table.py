"""SparseTable and DenseVariable: validation, updates, export/import, delete and reuse."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from xdl import init, optim
from xdl.errors import InvalidArgumentError
from xdl.server.table import DenseVariable, SparseTable

DIM = 4


def make(opt: optim.Optimizer | None = None, capacity: int = 4, seed: int = 3) -> SparseTable:
    return SparseTable("emb", DIM, init.Normal(0.0, 0.1), opt or optim.Adagrad.tensorflow(0.1),
                       seed=seed, capacity=capacity)


def snapshot(t: SparseTable) -> dict[str, Any]:
    e = t.export()
    order = np.argsort(e["keys"])
    return {"step": t.step, "rows": len(t), **{k: v[order].copy() for k, v in e.items()}}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pull_inserts_initial_values_and_is_stable() -> None:
    t = make()
    keys = np.array([5, -7, 2**60, 5], dtype=np.int64)
    rows = t.pull(keys)
    assert rows.dtype == np.float32 and rows.shape == (4, DIM)
    np.testing.assert_array_equal(rows[0], rows[3])
    assert len(t) == 3
    expect = init.generate(init.Normal(0.0, 0.1), 3, keys, DIM)
    np.testing.assert_array_equal(rows, expect)
    np.testing.assert_array_equal(t.pull(keys[::-1]), rows[::-1])
    # slots start at the optimizer's initial value
    np.testing.assert_array_equal(t.export()["slot:accum"], 0.1)


def test_push_applies_optimizer_and_metadata() -> None:
    t = make(optim.SGD(0.5))
    keys = np.array([1, 2, 3], dtype=np.int64)
    before = t.pull(keys)
    g = np.arange(12, dtype=np.float32).reshape(3, DIM)
    t.push(keys, g)
    np.testing.assert_allclose(t.pull(keys), before - 0.5 * g, rtol=1e-6)
    # a missing key is inserted with its initial value, then updated
    t.push(np.array([3, 9], dtype=np.int64), np.ones((2, DIM), np.float32))
    assert t.step == 2
    np.testing.assert_allclose(t.pull(np.array([9]))[0],
                               init.generate(t.initializer, 3, np.array([9]), DIM)[0] - 0.5,
                               rtol=1e-6)
    s = snapshot(t)
    assert dict(zip(s["keys"].tolist(), s["freq"].tolist(), strict=True)) == {
        1: 1, 2: 1, 3: 2, 9: 1}
    assert dict(zip(s["keys"].tolist(), s["last_step"].tolist(), strict=True)) == {
        1: 1, 2: 1, 3: 2, 9: 2}


def test_table_matches_local_update_through_growth() -> None:
    # many pushes across arena growth equal the same updates on a plain numpy model
    spec = optim.Adam.torch(0.01)
    t = make(spec, capacity=2)
    rng = np.random.default_rng(0)
    universe = rng.integers(-(2**62), 2**62, 3000)
    local = init.generate(t.initializer, 3, universe, DIM)
    m = np.zeros_like(local, dtype=np.float64)
    v = np.zeros_like(m)
    tt = np.zeros(len(universe))
    for _ in range(5):
        idx = rng.permutation(len(universe))[:1500]
        g = rng.standard_normal((1500, DIM)).astype(np.float32)
        t.push(universe[idx], g)
        tt[idx] += 1
        m[idx] = 0.9 * m[idx] + 0.1 * g
        v[idx] = 0.999 * v[idx] + 0.001 * g.astype(np.float64) ** 2
        bc1 = 1 - 0.9 ** tt[idx, None]
        bc2 = 1 - 0.999 ** tt[idx, None]
        local[idx] -= (0.01 * (m[idx] / bc1) / (np.sqrt(v[idx] / bc2) + 1e-8)).astype(np.float32)
    assert len(t) == int((tt > 0).sum()) < len(universe)
    np.testing.assert_allclose(t.pull(universe), local, rtol=1e-4, atol=1e-5)
    assert len(t) == len(universe)


BAD_PUSHES = [
    ("keys float", np.array([1.0, 2.0]), np.zeros((2, DIM), np.float32), "int64"),
    ("keys 2-D", np.array([[1, 2]]), np.zeros((2, DIM), np.float32), "1-D"),
    ("grads float64", np.array([1, 2]), np.zeros((2, DIM), np.float64), "float32"),
    ("grads rows", np.array([1, 2]), np.zeros((3, DIM), np.float32), "[2, 4]"),
    ("grads dim", np.array([1, 2]), np.zeros((2, DIM + 1), np.float32), "[2, 4]"),
    ("grads 1-D", np.array([1]), np.zeros(DIM, np.float32), "[1, 4]"),
    ("duplicate", np.array([1, 77, 1]), np.zeros((3, DIM), np.float32), "key 1"),
    # found by the lookup pass after earlier rows were marked: the marks are undone
    ("duplicate late", np.array([3, 2, 77, 1, 2]), np.zeros((5, DIM), np.float32),
     "key 2 appears more than once (second time at position 4)"),
    ("duplicate new", np.array([1, 77, 2, 77]), np.zeros((4, DIM), np.float32),
     "key 77 appears more than once (second time at position 3)"),
    ("nan", np.array([1, 77]), np.array([[0, 0, 0, np.nan], [0] * 4], np.float32), "NaN"),
    ("inf", np.array([1, 77]), np.array([[0] * 4, [0, -np.inf, 0, 0]], np.float32), "Inf"),
]


@pytest.mark.parametrize("what, keys, grads, needle", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES])
def test_bad_push_raises_and_changes_nothing(what: str, keys: np.ndarray, grads: np.ndarray,
                                             needle: str) -> None:
    t = make(optim.Adam.tensorflow(0.1))
    t.push(np.array([1, 2, 3], dtype=np.int64), np.ones((3, DIM), np.float32))
    before = snapshot(t)
    nbytes = t.nbytes
    with pytest.raises(InvalidArgumentError) as ei:
        t.push(keys, grads)
    assert needle in str(ei.value)
    assert ei.value.table == "emb"
    assert_same(snapshot(t), before)
    assert t.nbytes == nbytes
    assert 77 not in t  # a new key of a failed push was not inserted


def test_delete_and_row_reuse() -> None:
    t = make(optim.Adagrad(0.1, initial_accumulator=0.2), capacity=8)
    keys = np.arange(8, dtype=np.int64)
    t.push(keys, np.ones((8, DIM), np.float32))
    nbytes = t.nbytes
    assert t.delete(np.array([1, 3, 3, 100], dtype=np.int64)) == 2
    assert len(t) == 6 and 1 not in t and 3 not in t and 2 in t
    assert t.delete(np.array([1], dtype=np.int64)) == 0
    # re-added keys get recycled rows (no growth), fresh initial values and slots
    t.pull(np.array([1, 50], dtype=np.int64))
    assert t.nbytes == nbytes
    assert t.pool.next_row == 8
    s = snapshot(t)
    pos = {k: i for i, k in enumerate(s["keys"].tolist())}
    np.testing.assert_array_equal(
        s["values"][pos[1]], init.generate(t.initializer, 3, np.array([1]), DIM)[0])
    np.testing.assert_allclose(s["slot:accum"][pos[1]], 0.2)
    np.testing.assert_allclose(s["slot:accum"][pos[2]], 1.2)
    assert s["freq"][pos[1]] == 0 and s["last_step"][pos[50]] == 0
    assert s["freq"][pos[2]] == 1


def test_export_import_round_trip() -> None:
    spec = optim.RMSProp(0.01, momentum=0.5, centered=True)
    t = make(spec, capacity=2)
    rng = np.random.default_rng(1)
    keys = rng.integers(-1000, 1000, 300)
    keys = np.unique(keys)
    for _ in range(3):
        sub = rng.permutation(keys)[:100]
        t.push(sub, rng.standard_normal((100, DIM)).astype(np.float32))
    t.delete(keys[:10])
    exported = t.export()
    assert set(exported) == {"keys", "values", "slot:ms", "slot:mom", "slot:mg", "freq",
                             "last_step"}
    assert all(len(a) == len(t) for a in exported.values())
    u = SparseTable.from_spec_dict(msgpack.unpackb(msgpack.packb(t.describe())))
    assert u.spec_dict() == t.spec_dict() and len(u) == 0
    # import in two shuffled halves
    perm = rng.permutation(len(t))
    for half in np.array_split(perm, 2):
        u.import_rows({k: v[half] for k, v in exported.items()})
    u.step = t.step
    assert_same(snapshot(u), snapshot(t))
    # both tables then evolve identically
    g = rng.standard_normal((len(keys), DIM)).astype(np.float32)
    t.push(keys, g)
    u.push(keys, g)
    assert_same(snapshot(u), snapshot(t))


def test_import_overwrites_and_defaults_missing_fields() -> None:
    t = make(optim.Adagrad(0.1, initial_accumulator=0.3))
    t.pull(np.array([1, 2], dtype=np.int64))
    vals = np.full((2, DIM), 7.0, np.float32)
    t.import_rows({"keys": np.array([2, 5]), "values": vals})
    s = snapshot(t)
    assert s["keys"].tolist() == [1, 2, 5]
    np.testing.assert_array_equal(s["values"][1:], 7.0)
    np.testing.assert_allclose(s["slot:accum"], 0.3)


@pytest.mark.parametrize("bad", [
    {"keys": np.array([1, 2])},
    {"keys": np.array([1, 2]), "values": np.zeros((2, DIM + 1), np.float32)},
    {"keys": np.array([1, 1]), "values": np.zeros((2, DIM), np.float32)},
    {"keys": np.array([1, 2]), "values": np.zeros((2, DIM), np.float32),
     "slot:accum": np.zeros((3, DIM), np.float32)},
    {"keys": np.array([1, 2]), "values": np.zeros((2, DIM), np.float32),
     "slot:m": np.zeros((2, DIM), np.float32)},
    {"keys": np.array([1, 2]), "values": np.zeros((2, DIM), np.float32),
     "freq": np.zeros(2, np.float32)},
    {"keys": np.array([1, 2]), "values": np.array([[np.nan] * DIM] * 2, np.float32)},
])
def test_bad_import_raises_and_changes_nothing(bad: dict[str, np.ndarray]) -> None:
    t = make()
    t.push(np.array([1, 3], dtype=np.int64), np.ones((2, DIM), np.float32))
    before = snapshot(t)
    with pytest.raises(InvalidArgumentError):
        t.import_rows(bad)
    assert_same(snapshot(t), before)


def test_nbytes_and_describe() -> None:
    t = make(optim.Adam(0.01), capacity=16)
    arrays = [t.values, *t.slots.values(), t.freq, t.last_step, t.index.slots, t.pool.free]
    assert t.nbytes == sum(a.nbytes for a in arrays)
    small = t.nbytes
    t.pull(np.arange(1000))
    assert t.nbytes >= 1000 * DIM * 4 * 3 > small  # values, m, v at least
    d = t.describe()
    assert msgpack.unpackb(msgpack.packb(d)) == d
    assert d["rows"] == 1000 and d["nbytes"] == t.nbytes and d["step"] == 0
    assert d["optimizer"] == optim.Adam(0.01).to_dict()
    assert d["initializer"] == {"kind": "normal", "mean": 0.0, "stddev": 0.1}
    assert d["dim"] == DIM and d["seed"] == 3 and d["name"] == "emb"


def test_from_spec_dict_rejects_bad_settings() -> None:
    with pytest.raises(InvalidArgumentError):
        SparseTable.from_spec_dict({"name": "x", "dim": 4})
    with pytest.raises(InvalidArgumentError):
        SparseTable.from_spec_dict({"name": "x", "dim": 0, "initializer": {"kind": "zeros"},
                                    "optimizer": {"kind": "sgd", "lr": 0.1}})
    with pytest.raises(InvalidArgumentError):
        SparseTable.from_spec_dict({"name": "x", "dim": 4, "initializer": {"kind": "zeros"},
                                    "optimizer": {"kind": "sgd", "lr": -0.1}})


# --- DenseVariable ---------------------------------------------------------------------------

def test_dense_variable_updates_like_a_table_row() -> None:
    spec = optim.Adam.torch(0.1)
    initial = np.arange(6, dtype=np.float32).reshape(2, 3)
    var = DenseVariable("w", (2, 3), spec, initial)
    row = SparseTable("ref", 6, init.Zeros(), spec)
    row.import_rows({"keys": np.array([0]), "values": initial.reshape(1, 6)})
    rng = np.random.default_rng(2)
    for _ in range(4):
        g = rng.standard_normal((2, 3)).astype(np.float32)
        var.apply(g)
        row.push(np.array([0]), g.reshape(1, 6))
    assert var.version == 4
    np.testing.assert_array_equal(var.pull(), row.pull(np.array([0])).reshape(2, 3))
    out = var.pull()
    out[...] = 0  # pull returns a copy
    assert var.pull().any()


def test_dense_variable_validation_and_round_trip() -> None:
    var = DenseVariable("w", (3,), optim.Momentum(0.1), None, seed=5)
    np.testing.assert_array_equal(var.pull(), np.zeros(3))
    var.apply(np.ones(3, np.float32))
    before = var.export()
    for bad in (np.ones(4, np.float32), np.ones(3, np.float64),
                np.array([1, np.inf, 0], np.float32)):
        with pytest.raises(InvalidArgumentError):
            var.apply(bad)
    assert var.version == 1
    for k, a in var.export().items():
        np.testing.assert_array_equal(a, before[k])
    other = DenseVariable("w", (3,), optim.Momentum(0.1), None)
    other.import_arrays(before)
    var.apply(np.ones(3, np.float32))
    other.apply(np.ones(3, np.float32))
    np.testing.assert_array_equal(var.pull(), other.pull())
    with pytest.raises(InvalidArgumentError):
        other.import_arrays({"values": np.ones(4, np.float32)})
    with pytest.raises(InvalidArgumentError):
        other.import_arrays({"values": np.ones(3, np.float32), "slot:zz": np.ones(3)})
    d = var.describe()
    assert msgpack.unpackb(msgpack.packb(d)) == d
    assert d["shape"] == [3] and d["version"] == 2 and d["seed"] == 5
    assert var.nbytes == 3 * 4 * 2
    with pytest.raises(InvalidArgumentError):
        DenseVariable("w", (2,), optim.SGD(0.1), np.ones(3, np.float32))


def test_large_push_in_prefetched_blocks_matches_one_pass() -> None:
    # more rows than one prefetch block: the blocked update equals one optimizer pass
    from xdl.server import optimizers

    spec = optim.Adam.torch(0.01)
    t = make(spec, capacity=16)
    keys = np.random.default_rng(7).permutation(20_000).astype(np.int64) * 7919
    t.pull(keys)
    e0 = t.export()
    order = np.argsort(e0["keys"])
    values = e0["values"][order].copy()
    slots = {s: e0[f"slot:{s}"][order].copy() for s in t.slots}
    g = np.random.default_rng(8).standard_normal((keys.size, DIM)).astype(np.float32)
    t.push(keys, g)
    pos = np.searchsorted(e0["keys"][order], keys)
    optimizers.apply(spec, values, slots, pos, g, 1)
    s = snapshot(t)
    np.testing.assert_array_equal(s["values"], values)
    for name in slots:
        np.testing.assert_array_equal(s[f"slot:{name}"], slots[name])
    assert (s["freq"] == 1).all() and (s["last_step"] == 1).all()


def test_pull_into_a_given_buffer() -> None:
    t = make()
    keys = np.array([4, 9, 4], dtype=np.int64)
    reply = np.full(3 * DIM + 2, -1.0, np.float32)  # rows of several tables, back to back
    got = t.pull(keys, out=reply[1:1 + 3 * DIM].reshape(3, DIM))
    np.testing.assert_array_equal(got, t.pull(keys))
    np.testing.assert_array_equal(reply[1:1 + 3 * DIM].reshape(3, DIM), t.pull(keys))
    assert reply[0] == reply[-1] == -1.0
    with pytest.raises(InvalidArgumentError, match="out"):
        t.pull(keys, out=np.empty((3, DIM), np.float64))
