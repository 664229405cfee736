"""Fused, in-place optimizer updates over the rows of a table (numba kernels).

Each kernel applies ``grads[i]`` to ``values[rows[i]]`` and to the same row of every
slot array, element by element, in one pass. Arithmetic is done in float64 and stored
as float32, in the operation order of the reference implementation (torch's where the
formulas are torch's). The formulas and framework variants are documented on the specs
in :mod:`xdl.optim`. Rows must be unique within one call (the table checks).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from xdl.errors import InvalidArgumentError
from xdl.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer, RMSProp

__all__ = ["apply"]


@njit(cache=True)
def _sgd(values, rows, grads, lr):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(values.shape[1]):
            values[r, j] = values[r, j] - lr * grads[i, j]


@njit(cache=True)
def _momentum(values, vel, rows, grads, lr, mu, nesterov, tf_variant):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(values.shape[1]):
            g = np.float64(grads[i, j])
            if tf_variant:
                v = mu * vel[r, j] - lr * g
                vel[r, j] = v
                v = np.float64(vel[r, j])
                if nesterov:
                    values[r, j] = values[r, j] + (mu * v - lr * g)
                else:
                    values[r, j] = values[r, j] + v
            else:
                vel[r, j] = mu * vel[r, j] + g
                v = np.float64(vel[r, j])
                if nesterov:
                    values[r, j] = values[r, j] - lr * (g + mu * v)
                else:
                    values[r, j] = values[r, j] - lr * v


@njit(cache=True)
def _adagrad(values, acc, rows, grads, lr, eps, eps_inside):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(values.shape[1]):
            g = np.float64(grads[i, j])
            acc[r, j] = acc[r, j] + g * g
            a = np.float64(acc[r, j])
            if eps_inside:
                std = math.sqrt(a + eps)
            else:
                std = math.sqrt(a) + eps
            values[r, j] = values[r, j] + (-lr) * (g / std)


@njit(cache=True)
def _adam(values, m, v, t, rows, grads, lr, b1, b2, eps, eps_hat):  # type: ignore[no-untyped-def]
    for i in range(rows.shape[0]):
        r = rows[i]
        t[r, 0] = t[r, 0] + np.float32(1.0)
        step = np.float64(t[r, 0])
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        lr_t = 0.0
        step_size = 0.0
        bc2_sqrt = 1.0
        if eps_hat:
            lr_t = lr * math.sqrt(bc2) / bc1
        else:
            step_size = lr / bc1
            bc2_sqrt = math.sqrt(bc2)
        for j in range(values.shape[1]):
            g = np.float64(grads[i, j])
            m[r, j] = m[r, j] + (1.0 - b1) * (g - m[r, j])
            v[r, j] = v[r, j] * b2 + (1.0 - b2) * g * g
            mm = np.float64(m[r, j])
            vv = np.float64(v[r, j])
            if eps_hat:
                values[r, j] = values[r, j] - lr_t * mm / (math.sqrt(vv) + eps)
            else:
                denom = math.sqrt(vv) / bc2_sqrt + eps
                values[r, j] = values[r, j] - step_size * (mm / denom)


@njit(cache=True)
def _rmsprop(values, ms, mom, mg, rows, grads, lr, rho, eps, momentum, centered,  # type: ignore[no-untyped-def]
             eps_inside):
    use_mom = momentum > 0.0
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(values.shape[1]):
            g = np.float64(grads[i, j])
            ms[r, j] = ms[r, j] * rho + (1.0 - rho) * g * g
            d = np.float64(ms[r, j])
            if centered:
                mg[r, j] = mg[r, j] + (1.0 - rho) * (g - mg[r, j])
                a = np.float64(mg[r, j])
                d = d - a * a
            if eps_inside:
                den = math.sqrt(d + eps)
            else:
                den = math.sqrt(d) + eps
            if use_mom:
                mom[r, j] = mom[r, j] * momentum + g / den
                values[r, j] = values[r, j] - lr * np.float64(mom[r, j])
            else:
                values[r, j] = values[r, j] - lr * (g / den)


@njit(cache=True)
def _ftrl(values, acc, lin, rows, grads, lr, lr_power, l1, l2, l2_shrinkage):  # type: ignore[no-untyped-def]
    # l2 here already holds l2 + beta / (2 * lr)
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(values.shape[1]):
            g = np.float64(grads[i, j])
            w = np.float64(values[r, j])
            n = np.float64(acc[r, j])
            gs = g + 2.0 * l2_shrinkage * w
            n_new = n + g * g
            if lr_power == -0.5:
                p_new = math.sqrt(n_new)
                p_old = math.sqrt(n)
            else:
                p_new = n_new ** (-lr_power)
                p_old = n ** (-lr_power)
            z = np.float64(lin[r, j]) + gs - (p_new - p_old) / lr * w
            lin[r, j] = z
            z = np.float64(lin[r, j])
            q = p_new / lr + 2.0 * l2
            if abs(z) > l1:
                sign = 1.0 if z > 0 else -1.0
                values[r, j] = (sign * l1 - z) / q
            else:
                values[r, j] = 0.0
            acc[r, j] = n_new


_NONE = np.zeros((1, 1), dtype=np.float32)


def apply(spec: Optimizer, values: np.ndarray, slots: dict[str, np.ndarray], rows: np.ndarray,
          grads: np.ndarray, step: int) -> None:
    """Apply one sparse update in place: ``grads[i]`` to row ``rows[i]`` of ``values``
    and of every slot array in ``slots`` (named as ``spec.slot_names()``).

    :param spec: the optimizer spec (:mod:`xdl.optim`).
    :param values: float32 ``[rows_cap, dim]`` arena, updated in place.
    :param slots: slot name → float32 ``[rows_cap, width]`` arena, updated in place.
    :param rows: unique int64 row numbers ``[n]``.
    :param grads: float32 ``[n, dim]``.
    :param step: the caller's update counter after this update (1 for the first). The
        built-in optimizers keep their own per-row counts (Adam's ``t``) and do not
        read it; it is passed for schedules.
    """
    del step
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    grads = np.ascontiguousarray(grads, dtype=np.float32)
    if isinstance(spec, SGD):
        _sgd(values, rows, grads, spec.lr)
    elif isinstance(spec, Momentum):
        _momentum(values, slots["velocity"], rows, grads, spec.lr, spec.momentum,
                  spec.nesterov, spec.variant == "tf")
    elif isinstance(spec, Adagrad):
        _adagrad(values, slots["accum"], rows, grads, spec.lr, spec.eps, spec.eps_inside_sqrt)
    elif isinstance(spec, Adam):
        _adam(values, slots["m"], slots["v"], slots["t"], rows, grads, spec.lr, spec.beta1,
              spec.beta2, spec.eps, spec.eps_hat)
    elif isinstance(spec, RMSProp):
        _rmsprop(values, slots["ms"], slots.get("mom", _NONE), slots.get("mg", _NONE), rows,
                 grads, spec.lr, spec.rho, spec.eps, spec.momentum, spec.centered,
                 spec.eps_inside_sqrt)
    elif isinstance(spec, FTRL):
        _ftrl(values, slots["accum"], slots["linear"], rows, grads, spec.lr, spec.lr_power,
              spec.l1, spec.l2 + spec.beta / (2.0 * spec.lr), spec.l2_shrinkage)
    else:
        raise InvalidArgumentError(f"no update kernel for optimizer {spec!r}")
