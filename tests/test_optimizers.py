"""Server optimizer kernels against plain numpy formulas and torch.optim."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from xdl import optim
from xdl.errors import InvalidArgumentError
from xdl.server import optimizers

R, DIM, STEPS = 12, 5, 6
Slots = dict[str, np.ndarray]


# --- numpy references (float64, written from the formulas, one step over some rows) ------

def ref_step(spec: optim.Optimizer, w: np.ndarray, s: dict[str, np.ndarray], rows: np.ndarray,
             g: np.ndarray) -> None:
    """Reference update of w[rows] and slots s[...][rows] in place (float64)."""
    x = w[rows]
    if isinstance(spec, optim.SGD):
        x = x - spec.lr * g
    elif isinstance(spec, optim.Momentum):
        mu, lr, v = spec.momentum, spec.lr, s["velocity"][rows]
        if spec.variant == "torch":
            v = mu * v + g
            x = x - lr * (g + mu * v) if spec.nesterov else x - lr * v
        else:
            v = mu * v - lr * g
            x = x + (mu * v - lr * g) if spec.nesterov else x + v
        s["velocity"][rows] = v
    elif isinstance(spec, optim.Adagrad):
        acc = s["accum"][rows] + g**2
        den = np.sqrt(acc + spec.eps) if spec.eps_inside_sqrt else np.sqrt(acc) + spec.eps
        x = x - spec.lr * g / den
        s["accum"][rows] = acc
    elif isinstance(spec, optim.Adam):
        b1, b2 = spec.beta1, spec.beta2
        t = s["t"][rows] + 1
        m = b1 * s["m"][rows] + (1 - b1) * g
        v = b2 * s["v"][rows] + (1 - b2) * g**2
        if spec.eps_hat:
            lr_t = spec.lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            x = x - lr_t * m / (np.sqrt(v) + spec.eps)
        else:
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            x = x - spec.lr * m_hat / (np.sqrt(v_hat) + spec.eps)
        s["t"][rows], s["m"][rows], s["v"][rows] = t, m, v
    elif isinstance(spec, optim.RMSProp):
        rho = spec.rho
        ms = rho * s["ms"][rows] + (1 - rho) * g**2
        d = ms
        if spec.centered:
            mg = rho * s["mg"][rows] + (1 - rho) * g
            s["mg"][rows] = mg
            d = ms - mg**2
        den = np.sqrt(d + spec.eps) if spec.eps_inside_sqrt else np.sqrt(d) + spec.eps
        if spec.momentum > 0:
            mom = spec.momentum * s["mom"][rows] + g / den
            s["mom"][rows] = mom
            x = x - spec.lr * mom
        else:
            x = x - spec.lr * g / den
        s["ms"][rows] = ms
    elif isinstance(spec, optim.FTRL):
        p = -spec.lr_power
        n, z = s["accum"][rows], s["linear"][rows]
        gs = g + 2 * spec.l2_shrinkage * x
        n_new = n + g**2
        z = z + gs - (n_new**p - n**p) / spec.lr * x
        q = n_new**p / spec.lr + 2 * spec.l2 + spec.beta / spec.lr
        x = np.where(np.abs(z) > spec.l1, (np.sign(z) * spec.l1 - z) / q, 0.0)
        s["accum"][rows], s["linear"][rows] = n_new, z
    else:  # pragma: no cover
        raise AssertionError(spec)
    w[rows] = x


def run_both(spec: optim.Optimizer, seed: int = 0, steps: int = STEPS, all_rows: bool = False,
             scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, Slots, Slots]:
    rng = np.random.default_rng(seed)
    w32 = (rng.standard_normal((R, DIM)) * 0.1).astype(np.float32)
    w64 = w32.astype(np.float64)
    s32 = {n: np.full((R, spec.slot_width(n, DIM)), spec.slot_initial(n), dtype=np.float32)
           for n in spec.slot_names()}
    s64 = {n: a.astype(np.float64) for n, a in s32.items()}
    for step in range(1, steps + 1):
        rows = np.arange(R) if all_rows else rng.permutation(R)[: rng.integers(1, R)]
        g = (rng.standard_normal((len(rows), DIM)) * scale).astype(np.float32)
        optimizers.apply(spec, w32, s32, rows, g, step)
        ref_step(spec, w64, s64, rows, g.astype(np.float64))
    return w32, w64, s32, s64


CASES: list[optim.Optimizer] = [
    optim.SGD(0.1),
    optim.SGD.tensorflow(),
    optim.Momentum(0.1, 0.9, variant="torch"),
    optim.Momentum(0.1, 0.8, nesterov=True, variant="torch"),
    optim.Momentum(0.1, 0.9, variant="tf"),
    optim.Momentum(0.1, 0.8, nesterov=True, variant="tf"),
    optim.Momentum.tensorflow(0.05),
    optim.Adagrad(0.1),
    optim.Adagrad.torch(),
    optim.Adagrad.tensorflow(0.1),
    optim.Adagrad.mxnet(0.1),
    optim.Adam(0.01),
    optim.Adam.tensorflow(0.01),
    optim.Adam.mxnet(0.01, beta1=0.5, beta2=0.9),
    optim.RMSProp(0.01),
    optim.RMSProp(0.01, rho=0.9, eps_inside_sqrt=True, initial_accumulator=0.1),
    optim.RMSProp(0.01, momentum=0.5),
    optim.RMSProp(0.01, centered=True),
    optim.RMSProp(0.01, momentum=0.9, centered=True, eps_inside_sqrt=True),
    optim.RMSProp.tensorflow(0.01),
    optim.RMSProp.mxnet(0.01, centered=True),
    optim.FTRL.tensorflow(0.1),
    optim.FTRL(0.1, l1=0.05, l2=0.1, l2_shrinkage=0.02, beta=0.5),
    optim.FTRL(0.1, lr_power=-0.3, l1=0.01, initial_accumulator=0.2),
    optim.FTRL(0.1, lr_power=0.0, l2=0.1),
    optim.FTRL.mxnet(),
]


@pytest.mark.parametrize("spec", CASES, ids=repr)
def test_kernel_matches_numpy_formula(spec: optim.Optimizer) -> None:
    w32, w64, s32, s64 = run_both(spec)
    assert not np.allclose(w32, run_both(optim.SGD(1e-9))[0])  # something happened
    np.testing.assert_allclose(w32, w64, rtol=2e-5, atol=2e-6)
    for n in s32:
        np.testing.assert_allclose(s32[n], s64[n], rtol=2e-5, atol=2e-6, err_msg=n)


EPS_CASES = [
    (optim.Adagrad.mxnet(0.1), optim.Adagrad(0.1, eps=1e-7)),
    (optim.Adagrad.tensorflow(0.1, initial_accumulator=0.0), optim.Adagrad.mxnet(0.1)),
    (optim.Adam.tensorflow(0.01), optim.Adam(0.01, eps=1e-7)),
    (optim.RMSProp.tensorflow(0.01), optim.RMSProp(0.01, rho=0.9, eps=1e-7)),
    (optim.RMSProp.mxnet(0.01, centered=True),
     optim.RMSProp(0.01, rho=0.9, eps=1e-8, momentum=0.9, centered=True)),
]


@pytest.mark.parametrize("spec, other", EPS_CASES, ids=repr)
def test_epsilon_placement_with_tiny_gradients(spec: optim.Optimizer,
                                               other: optim.Optimizer) -> None:
    # with gradients near eps the variants part ways: each must follow its own formula
    w32, w64, s32, s64 = run_both(spec, seed=2, scale=1e-4)
    np.testing.assert_allclose(w32, w64, rtol=2e-5, atol=1e-7)
    w_other = run_both(other, seed=2, scale=1e-4)[0]
    w0 = run_both(optim.SGD(1e-12), seed=2, scale=1e-4)[0]
    assert np.abs((w_other - w0) - (w32 - w0)).max() > 1e-3 * np.abs(w32 - w0).max()


def test_lazy_rows_untouched_and_adam_step_per_row() -> None:
    spec = optim.Adam(0.01)
    w = np.ones((4, 3), dtype=np.float32)
    slots = {n: np.zeros((4, spec.slot_width(n, 3)), dtype=np.float32) for n in spec.slot_names()}
    g = np.ones((2, 3), dtype=np.float32)
    optimizers.apply(spec, w, slots, np.array([0, 2]), g, 1)
    optimizers.apply(spec, w, slots, np.array([0, 3]), g, 2)
    assert slots["t"][:, 0].tolist() == [2, 0, 1, 1]
    np.testing.assert_array_equal(w[1], 1.0)
    # first update of a row is lr * sign(g) whatever the table's step: bias-corrected per row
    np.testing.assert_allclose(w[2], 1.0 - 0.01, rtol=1e-6)
    np.testing.assert_allclose(w[3], 1.0 - 0.01, rtol=1e-6)


def test_momentum_variants_agree_at_constant_lr() -> None:
    for nesterov in (False, True):
        a = run_both(optim.Momentum(0.05, 0.9, nesterov, "torch"), seed=3)[0]
        b = run_both(optim.Momentum(0.05, 0.9, nesterov, "tf"), seed=3)[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tensorflow_rmsprop_momentum_matches_keras_formula() -> None:
    # keras: v = rho v + (1-rho) g^2; m = mu m + lr g / sqrt(v + eps); w -= m
    spec = optim.RMSProp.tensorflow(0.01, momentum=0.5)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((R, DIM))
    w32 = w.astype(np.float32)
    w = w32.astype(np.float64)
    slots = {n: np.zeros((R, DIM), dtype=np.float32) for n in spec.slot_names()}
    v = np.zeros_like(w)
    m = np.zeros_like(w)
    for step in range(1, STEPS + 1):
        g = rng.standard_normal((R, DIM)).astype(np.float32)
        optimizers.apply(spec, w32, slots, np.arange(R), g, step)
        v = 0.9 * v + 0.1 * g.astype(np.float64) ** 2
        m = 0.5 * m + 0.01 * g / np.sqrt(v + 1e-7)
        w = w - m
    np.testing.assert_allclose(w32, w, rtol=1e-5, atol=1e-6)


def test_mxnet_ftrl_matches_mxnet_formula() -> None:
    # mxnet: z += g - (sqrt(n + g^2) - sqrt(n)) * w / lr; n += g^2;
    #        w = (sign(z) * l1 - z) / ((beta + sqrt(n)) / lr) * (|z| > l1)
    spec = optim.FTRL.mxnet(0.1, l1=1.0)
    rng = np.random.default_rng(6)
    w32 = np.zeros((R, DIM), dtype=np.float32)
    w = np.zeros((R, DIM))
    slots = {n: np.zeros((R, DIM), dtype=np.float32) for n in spec.slot_names()}
    z = np.zeros_like(w)
    n = np.zeros_like(w)
    for step in range(1, STEPS + 1):
        g = rng.standard_normal((R, DIM)).astype(np.float32).astype(np.float64)
        optimizers.apply(spec, w32, slots, np.arange(R), g.astype(np.float32), step)
        z += g - (np.sqrt(n + g**2) - np.sqrt(n)) * w / 0.1
        n += g**2
        w = np.where(np.abs(z) > 1.0, (np.sign(z) * 1.0 - z) / ((1.0 + np.sqrt(n)) / 0.1), 0.0)
    np.testing.assert_allclose(w32, w, rtol=1e-5, atol=1e-6)
    assert (w32 == 0).any() and (w32 != 0).any()  # l1 made some weights exactly 0


def test_tensorflow_adagrad_first_step() -> None:
    spec = optim.Adagrad.tensorflow(0.5)
    w = np.zeros((1, 2), dtype=np.float32)
    slots = {"accum": np.full((1, 2), 0.1, dtype=np.float32)}
    optimizers.apply(spec, w, slots, np.array([0]), np.array([[1.0, -2.0]], np.float32), 1)
    np.testing.assert_allclose(w[0], [-0.5 / (np.sqrt(1.1) + 1e-7), 1.0 / (np.sqrt(4.1) + 1e-7)],
                               rtol=1e-6)


# --- torch.optim's own implementation ------------------------------------------------------

TORCH_CASES: list[tuple[optim.Optimizer, str, dict[str, Any]]] = [
    (optim.SGD.torch(0.1), "SGD", {"lr": 0.1}),
    (optim.Momentum.torch(0.1, momentum=0.9), "SGD", {"lr": 0.1, "momentum": 0.9}),
    (optim.Momentum.torch(0.1, momentum=0.8, nesterov=True), "SGD",
     {"lr": 0.1, "momentum": 0.8, "nesterov": True}),
    (optim.Adagrad.torch(0.1), "Adagrad", {"lr": 0.1}),
    (optim.Adagrad.torch(0.1, initial_accumulator=0.3), "Adagrad",
     {"lr": 0.1, "initial_accumulator_value": 0.3}),
    (optim.Adam.torch(0.01), "Adam", {"lr": 0.01}),
    (optim.Adam.torch(0.01, beta1=0.5, beta2=0.9, eps=1e-6), "Adam",
     {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-6}),
    (optim.RMSProp.torch(0.01), "RMSprop", {"lr": 0.01}),
    (optim.RMSProp.torch(0.01, momentum=0.5), "RMSprop", {"lr": 0.01, "momentum": 0.5}),
    (optim.RMSProp.torch(0.01, momentum=0.5, centered=True), "RMSprop",
     {"lr": 0.01, "momentum": 0.5, "centered": True}),
]


@pytest.mark.parametrize("spec, name, kwargs", TORCH_CASES, ids=lambda c: repr(c))
def test_torch_presets_match_torch_optim(spec: optim.Optimizer, name: str,
                                         kwargs: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    w0 = (rng.standard_normal((R, DIM)) * 0.1).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = getattr(torch.optim, name)([param], **kwargs)
    w32 = w0.copy()
    slots = {n: np.full((R, spec.slot_width(n, DIM)), spec.slot_initial(n), dtype=np.float32)
             for n in spec.slot_names()}
    for step in range(1, 11):
        g = rng.standard_normal((R, DIM)).astype(np.float32)
        param.grad = torch.from_numpy(g.copy())
        topt.step()
        optimizers.apply(spec, w32, slots, np.arange(R), g, step)
        if isinstance(spec, (optim.SGD, optim.Momentum)):
            # float32 in torch's operation order, FMAs where torch's kernels fuse: exact
            np.testing.assert_array_equal(w32, param.detach().numpy(), err_msg=f"step {step}")
        else:
            # exact but for torch's CPU sqrt, which is not always correctly rounded (1 ulp)
            np.testing.assert_allclose(w32, param.detach().numpy(), rtol=0, atol=2e-7,
                                       err_msg=f"step {step}")
    assert np.abs(w32 - w0).max() > 1e-3


# --- specs -----------------------------------------------------------------------------------

ALL_CLASSES = [optim.SGD, optim.Momentum, optim.Adagrad, optim.Adam, optim.RMSProp, optim.FTRL]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_presets_round_trip_through_msgpack(cls: type[optim.Optimizer]) -> None:
    for preset in (cls.torch(), cls.tensorflow(), cls.mxnet(), cls.torch(0.3)):
        d = msgpack.unpackb(msgpack.packb(preset.to_dict()))
        assert d["kind"] == preset.kind
        assert optim.from_dict(d) == preset
    assert cls.torch(0.3).lr == 0.3  # type: ignore[attr-defined]


def test_preset_defaults() -> None:
    assert optim.Adagrad.tensorflow(0.1) == optim.Adagrad(0.1, initial_accumulator=0.1, eps=1e-7)
    assert optim.Adagrad.mxnet().eps_inside_sqrt
    assert optim.Adam.tensorflow().eps == 1e-7 and optim.Adam.tensorflow().eps_hat
    assert not optim.Adam.torch().eps_hat
    assert optim.RMSProp.torch().rho == 0.99 and optim.RMSProp.tensorflow().rho == 0.9
    assert optim.Momentum.tensorflow().variant == "tf"
    assert optim.FTRL.tensorflow().initial_accumulator == 0.1
    assert optim.FTRL.mxnet().beta == 1.0


def test_slot_names() -> None:
    assert optim.SGD(0.1).slot_names() == []
    assert optim.Adagrad(0.1).slot_names() == ["accum"]
    assert optim.Adam(0.1).slot_names() == ["m", "v", "t"]
    assert optim.Adam(0.1).slot_width("t", 8) == 1
    assert optim.RMSProp(0.1, momentum=0.9, centered=True).slot_names() == ["ms", "mom", "mg"]
    assert optim.FTRL(0.1).slot_names() == ["accum", "linear"]
    assert optim.Momentum(0.1).slot_names() == ["velocity"]


@pytest.mark.parametrize("make", [
    lambda: optim.SGD(0.0),
    lambda: optim.SGD(-1.0),
    lambda: optim.SGD(float("inf")),
    lambda: optim.SGD("0.1"),  # type: ignore[arg-type]
    lambda: optim.Momentum(0.1, momentum=1.0),
    lambda: optim.Momentum(0.1, variant="keras"),
    lambda: optim.Momentum(0.1, nesterov="yes"),  # type: ignore[arg-type]
    lambda: optim.Adagrad(0.1, eps=-1.0),
    lambda: optim.Adam(0.1, beta2=1.5),
    lambda: optim.RMSProp(0.1, rho=-0.1),
    lambda: optim.FTRL(0.1, lr_power=0.5),
    lambda: optim.FTRL(0.1, l1=-1.0),
    lambda: optim.from_dict({"kind": "lamb", "lr": 0.1}),
    lambda: optim.from_dict({"kind": "adam", "lr": 0.1, "amsgrad": True}),
    lambda: optim.from_dict({"kind": "adam"}),
    lambda: optim.from_dict({"lr": 0.1}),
])
def test_bad_specs_raise_invalid_argument(make: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        make()
