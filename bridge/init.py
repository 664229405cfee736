"""Initializer specs for embedding rows, and the deterministic generator behind them.

A new row's initial value is a pure function of ``(table seed, key, column)``: every
element is drawn from a counter-based generator (SplitMix64 hashing of seed, key,
column and a draw counter), so it does not depend on which shard holds the key, on the
order keys arrive in, or on how they are batched. :func:`generate` is what the shards
call; a user can call it too, to initialise a local model exactly as the server would::

    import numpy as np, xdl
    spec = xdl.init.TruncatedNormal(stddev=0.01)
    rows = xdl.init.generate(spec, seed=7, keys=np.array([3, -1, 2**40]), dim=16)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
from numba import njit

from .errors import InvalidArgumentError
from .sharding import splitmix64
from .specs import build

__all__ = [
    "Initializer",
    "Zeros",
    "Constant",
    "Uniform",
    "Normal",
    "TruncatedNormal",
    "from_dict",
    "generate",
]


def _finite(cls_name: str, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(
            f"{cls_name}.{field} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise InvalidArgumentError(f"{cls_name}.{field} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Initializer:
    """Base class of initializer specs: an immutable, msgpack-able description."""

    kind: ClassVar[str] = ""
    #: the code the generator kernel switches on
    _code: ClassVar[int] = -1

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _finite(type(self).__name__, f.name,
                                                     getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        """This spec as a plain dict with a ``"kind"`` key (msgpack-able)."""
        return {"kind": self.kind, **asdict(self)}

    def _params(self) -> tuple[float, float]:
        return 0.0, 0.0


@dataclass(frozen=True)
class Zeros(Initializer):
    """Every element 0."""

    kind: ClassVar[str] = "zeros"
    _code: ClassVar[int] = 0


@dataclass(frozen=True)
class Constant(Initializer):
    """Every element ``value``."""

    value: float = 0.0
    kind: ClassVar[str] = "constant"
    _code: ClassVar[int] = 1

    def _params(self) -> tuple[float, float]:
        return self.value, 0.0


@dataclass(frozen=True)
class Uniform(Initializer):
    """Uniform on ``[low, high)``."""

    low: float = -0.05
    high: float = 0.05
    kind: ClassVar[str] = "uniform"
    _code: ClassVar[int] = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.low < self.high:
            raise InvalidArgumentError(
                f"Uniform needs low < high, got low={self.low}, high={self.high}")

    def _params(self) -> tuple[float, float]:
        return self.low, self.high


@dataclass(frozen=True)
class Normal(Initializer):
    """Gaussian with ``mean`` and ``stddev`` (Box–Muller over the counter-based uniforms)."""

    mean: float = 0.0
    stddev: float = 0.05
    kind: ClassVar[str] = "normal"
    _code: ClassVar[int] = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stddev > 0:
            raise InvalidArgumentError(f"{type(self).__name__}.stddev must be > 0, "
                                       f"got {self.stddev}")

    def _params(self) -> tuple[float, float]:
        return self.mean, self.stddev


@dataclass(frozen=True)
class TruncatedNormal(Normal):
    """Gaussian whose draws beyond 2 ``stddev`` from the mean are redrawn, as TF's
    ``truncated_normal`` (the redraw uses the next counter, so it stays deterministic)."""

    kind: ClassVar[str] = "truncated_normal"
    _code: ClassVar[int] = 4


_KINDS: dict[str, type[Initializer]] = {
    c.kind: c for c in (Zeros, Constant, Uniform, Normal, TruncatedNormal)
}


def from_dict(d: dict[str, Any]) -> Initializer:
    """Rebuild an initializer spec from :meth:`Initializer.to_dict`'s output.

    :raises InvalidArgumentError: unknown ``kind``, unknown field or a bad value.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise InvalidArgumentError(f"an initializer dict needs a 'kind' key, got {d!r}")
    cls = _KINDS.get(d["kind"])
    if cls is None:
        raise InvalidArgumentError(
            f"unknown initializer kind {d['kind']!r}; known: {sorted(_KINDS)}")
    return build("initializer", cls, d)


# --- the generator kernel ---------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TRUNC_MAX_TRIES = 64  # P(64 misses in a row) = 0.0455**64: never; bounded anyway


@njit(cache=True, inline="always")
def _uniform01(base: np.uint64, column: int, counter: int) -> float:
    """A uniform double in [0, 1) from (row hash, column, draw counter)."""
    c = (np.uint64(column) << np.uint64(32)) ^ np.uint64(counter)
    h = splitmix64(base ^ splitmix64(c + np.uint64(0x9E3779B97F4A7C15)))
    return float(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


# cos(t) = sum_k (-1)^k t^(2k) / (2k)!, k = 0..10: on |t| <= pi the error is below 1e-10,
# far finer than the float32 rows it feeds, and plain arithmetic vectorizes (libm's cos
# does not) and gives the same bits on every machine.
_COS_C = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(11))


@njit(cache=True, inline="always")
def _cos_2pi(u: float) -> float:
    """cos(2 pi u) for u in [0, 1), as a polynomial in t = 2 pi (u - 1/2) (cos(2 pi u) = -cos t)."""
    t = 2.0 * math.pi * (u - 0.5)
    t2 = t * t
    c = _COS_C[10]
    c = c * t2 + _COS_C[9]
    c = c * t2 + _COS_C[8]
    c = c * t2 + _COS_C[7]
    c = c * t2 + _COS_C[6]
    c = c * t2 + _COS_C[5]
    c = c * t2 + _COS_C[4]
    c = c * t2 + _COS_C[3]
    c = c * t2 + _COS_C[2]
    c = c * t2 + _COS_C[1]
    c = c * t2 + _COS_C[0]
    return -c


@njit(cache=True, inline="always")
def _std_normal(base: np.uint64, column: int, draw: int) -> float:
    u1 = _uniform01(base, column, 2 * draw)
    u2 = _uniform01(base, column, 2 * draw + 1)
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * _cos_2pi(u2)


@njit(cache=True, inline="always")
def _column_hash(column: int, counter: int) -> np.uint64:
    """The key-independent half of a draw's hash: mixes (column, draw counter)."""
    c = (np.uint64(column) << np.uint64(32)) ^ np.uint64(counter)
    return splitmix64(c + np.uint64(0x9E3779B97F4A7C15))


@njit(cache=True, inline="always")
def _to01(h: np.uint64) -> float:
    return float(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, error_model="numpy")
def _generate_kernel(code: int, a: float, b: float, seed: int, keys: np.ndarray,
                     dim: int) -> np.ndarray:
    # Same values as _uniform01/_std_normal element by element, but the key-independent
    # column hashes are computed once per call (not once per element) and the common
    # case runs as straight-line inner loops; TruncatedNormal's redraws (about 4.6% of
    # elements) are a second, scalar pass.
    n = keys.shape[0]
    out = np.empty((n, dim), dtype=np.float32)
    if code == 0 or code == 1:
        v = np.float32(0.0) if code == 0 else np.float32(a)
        for i in range(n):
            row = out[i]
            for j in range(dim):
                row[j] = v
        return out
    s = splitmix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    c0 = np.empty(dim, dtype=np.uint64)
    c1 = np.empty(dim, dtype=np.uint64)
    for j in range(dim):
        c0[j] = _column_hash(j, 0)
        c1[j] = _column_hash(j, 1)
    z = np.empty(dim, dtype=np.float64)
    r = np.empty(dim, dtype=np.float64)
    for i in range(n):
        base = splitmix64(s ^ splitmix64(np.uint64(keys[i])))
        row = out[i]
        if code == 2:
            for j in range(dim):
                v = a + (b - a) * _to01(splitmix64(base ^ c0[j]))
                row[j] = a if v >= b else v  # float rounding could reach the open bound
            continue
        for j in range(dim):  # hashes and cosines: vectorizes
            z[j] = _cos_2pi(_to01(splitmix64(base ^ c1[j])))
            r[j] = 1.0 - _to01(splitmix64(base ^ c0[j]))
        for j in range(dim):
            z[j] *= math.sqrt(-2.0 * math.log(r[j]))
        if code == 4:
            for j in range(dim):
                if abs(z[j]) > 2.0:
                    zz = z[j]
                    for t in range(1, _TRUNC_MAX_TRIES):
                        zz = _std_normal(base, j, t)
                        if abs(zz) <= 2.0:
                            break
                    z[j] = zz if abs(zz) <= 2.0 else 0.0
        for j in range(dim):
            row[j] = a + b * z[j]
    return out


def generate(spec: Initializer, seed: int, keys: np.ndarray, dim: int) -> np.ndarray:
    """Initial rows for ``keys``: float32 ``[len(keys), dim]``.

    Row ``i`` depends only on ``(seed, keys[i])`` and the spec, never on the other keys,
    their order or the batch size.

    :param spec: the initializer spec.
    :param seed: the table seed (any int; taken modulo 2**64).
    :param keys: 1-D integer ids (int64; other integer dtypes are converted).
    :param dim: row width (>= 1).
    """
    if not isinstance(spec, Initializer):
        raise InvalidArgumentError(f"spec must be an xdl.init initializer, got {spec!r}")
    k = np.asarray(keys)
    if k.ndim != 1 or k.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"keys must be a 1-D int64 array, got dtype {k.dtype} shape {k.shape}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InvalidArgumentError(f"dim must be a positive int, got {dim!r}")
    a, b = spec._params()
    seed64 = int(seed) & 0xFFFFFFFFFFFFFFFF
    seed_signed = seed64 - (1 << 64) if seed64 >= (1 << 63) else seed64
    return _generate_kernel(spec._code, a, b, np.int64(seed_signed),
                            np.ascontiguousarray(k.astype(np.int64, copy=False)), int(dim))
