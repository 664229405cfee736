"""xdl.init: specs round-trip, and generate() is deterministic per (seed, key)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from xdl import init
from xdl.errors import InvalidArgumentError

SPECS = [
    init.Zeros(),
    init.Constant(0.25),
    init.Uniform(-0.1, 0.3),
    init.Normal(0.5, 2.0),
    init.TruncatedNormal(0.0, 0.01),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_to_dict_round_trip_is_msgpackable(spec: init.Initializer) -> None:
    d = spec.to_dict()
    assert d["kind"] == spec.kind
    assert init.from_dict(msgpack.unpackb(msgpack.packb(d))) == spec


@pytest.mark.parametrize("bad", [
    {"kind": "xavier"},
    {"kind": "uniform", "low": 0.0, "high": 1.0, "scale": 2.0},
    {"kind": "uniform", "low": 1.0, "high": 0.0},
    {"kind": "normal", "stddev": 0.0},
    {"kind": "normal", "stddev": float("nan")},
    {"kind": "constant", "value": "one"},
    {"value": 1.0},
])
def test_from_dict_rejects_bad_input(bad: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        init.from_dict(bad)


@pytest.mark.parametrize("spec", SPECS[2:], ids=lambda s: s.kind)
def test_row_depends_only_on_seed_and_key(spec: init.Initializer) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2000, dtype=np.int64)
    full = init.generate(spec, 42, keys, 8)
    assert full.dtype == np.float32 and full.shape == (2000, 8)
    perm = rng.permutation(2000)
    np.testing.assert_array_equal(init.generate(spec, 42, keys[perm], 8), full[perm])
    # batching: any split gives the same rows
    parts = [init.generate(spec, 42, chunk, 8) for chunk in np.array_split(keys, 7)]
    np.testing.assert_array_equal(np.concatenate(parts), full)
    # a key alone gives its row
    np.testing.assert_array_equal(init.generate(spec, 42, keys[5:6], 8)[0], full[5])
    # a wider row keeps the first columns (column is an input of the generator)
    np.testing.assert_array_equal(init.generate(spec, 42, keys, 12)[:, :8], full)
    # other seeds give other rows; rows of different keys differ
    other = init.generate(spec, 43, keys, 8)
    assert (other != full).mean() > 0.99
    assert len(np.unique(full[:, 0])) > 1990
    # repeated keys in one call give identical rows
    twice = init.generate(spec, 42, np.array([keys[0], keys[0]]), 8)
    np.testing.assert_array_equal(twice[0], twice[1])


def test_fixed_values_pin_the_generator() -> None:
    # if the generator changed, checkpoints and local models would silently diverge
    keys = np.array([0, -1, 2**62])
    np.testing.assert_allclose(init.generate(init.Uniform(0.0, 1.0), 7, keys, 2), [
        [0.18469773, 0.9552054], [0.10416918, 0.71568805], [0.66693354, 0.72000915]],
        rtol=1e-6)
    np.testing.assert_allclose(init.generate(init.TruncatedNormal(0.0, 1.0), 7, keys, 2), [
        [-0.27972567, 1.4649584], [-0.16300301, -1.1063519], [1.2480817, -0.19378963]],
        rtol=1e-5)


def test_negative_seed_and_int32_keys() -> None:
    k64 = np.arange(-10, 10, dtype=np.int64)
    a = init.generate(init.Normal(), -3, k64, 4)
    np.testing.assert_array_equal(init.generate(init.Normal(), -3, k64.astype(np.int32), 4), a)
    np.testing.assert_array_equal(init.generate(init.Normal(), 2**64 - 3, k64, 4), a)


def test_constant_and_zeros() -> None:
    keys = np.arange(5)
    np.testing.assert_array_equal(init.generate(init.Zeros(), 1, keys, 3), np.zeros((5, 3)))
    np.testing.assert_array_equal(init.generate(init.Constant(-2.5), 1, keys, 3),
                                  np.full((5, 3), -2.5))


N = 200_000


def test_uniform_moments() -> None:
    x = init.generate(init.Uniform(-1.0, 3.0), 1, np.arange(N // 4), 4).ravel().astype(np.float64)
    assert x.min() >= -1.0 and x.max() < 3.0
    assert abs(x.mean() - 1.0) < 0.02
    assert abs(x.var() - 16 / 12) < 0.02
    hist, _ = np.histogram(x, bins=10, range=(-1, 3))
    assert np.all(np.abs(hist / len(x) - 0.1) < 0.005)


def test_normal_moments() -> None:
    x = init.generate(init.Normal(0.5, 2.0), 2, np.arange(N // 4), 4).ravel().astype(np.float64)
    assert abs(x.mean() - 0.5) < 0.03
    assert abs(x.std() - 2.0) < 0.03
    z = (x - 0.5) / 2.0
    assert abs(np.mean(np.abs(z) > 2) - 0.0455) < 0.003
    assert abs(np.mean(z**3)) < 0.05 and abs(np.mean(z**4) - 3.0) < 0.1


def test_truncated_normal_bound_and_moments() -> None:
    x = init.generate(init.TruncatedNormal(1.0, 0.5), 3, np.arange(N // 4), 4)
    x = x.ravel().astype(np.float64)
    assert x.min() >= 1.0 - 2 * 0.5 - 1e-6 and x.max() <= 1.0 + 2 * 0.5 + 1e-6
    assert abs(x.mean() - 1.0) < 0.01
    # the std of a standard normal truncated at +-2 is 0.8796
    assert abs(x.std() - 0.5 * 0.8796) < 0.01
    # redrawn, not clipped: no pile-up at the bounds
    assert np.mean(np.abs(x - 1.0) > 0.99) < 0.005


@pytest.mark.parametrize("keys, dim", [
    (np.zeros((2, 2), dtype=np.int64), 4),
    (np.array([0.5, 1.5]), 4),
    (np.arange(3), 0),
])
def test_generate_rejects_bad_arguments(keys: np.ndarray, dim: int) -> None:
    with pytest.raises(InvalidArgumentError):
        init.generate(init.Normal(), 0, keys, dim)
