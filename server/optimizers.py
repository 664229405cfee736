"""Fused, in-place optimizer updates over the rows of a table (numba kernels).

Each kernel applies ``grads[i]`` to ``values[rows[i]]`` and to the same row of every
slot array, element by element, in one pass over contiguous row slices (so the inner
loops vectorize). Arithmetic is float32 throughout: hyper-parameters are cast to
float32 once, and the torch variants follow torch's own CPU kernels operation by
operation, including where torch fuses a multiply and an add into one FMA
(``add_(x, alpha=a)`` is ``fma(a, x, self)``, ``addcmul_(t1, t2, value=v)`` is
``fma(v * t1, t2, self)``, ``lerp_`` is torch's two-branch FMA form, and
``addcdiv_(t1, t2, value=v)`` is ``self + (v * t1) / t2``). SGD and momentum are
therefore bit-identical to ``torch.optim``; the optimizers with a square root match
it to about one float32 ulp, because torch's CPU ``sqrt`` (MKL/SLEEF vector code) is
not always correctly rounded while this one is. The TF/MXNet variants follow their
formulas in float32. The formulas and framework variants are documented on the specs
in :mod:`xdl.optim`. Rows must be unique within one call (the table checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from xdl.errors import InvalidArgumentError
from xdl.optim import FTRL, SGD, Adagrad, Adam, Momentum, Optimizer, RMSProp

__all__ = ["apply", "kernel_for", "KERNELS"]

_F32 = np.float32
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` with one rounding (``llvm.fma.f32``), as torch's vector kernels."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3),
                                            "llvm.fma.f32")
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, inline="always")
def _lerp(a, b, w, w1):  # type: ignore[no-untyped-def]
    # torch's lerp: w1 = w - 1, both float32
    if abs(w) < _HALF:
        return _fma(w, b - a, a)
    return _fma(b - a, w1, b)


@njit(cache=True, error_model="numpy")
def _sgd(values, rows, grads, neg_lr):  # type: ignore[no-untyped-def]
    # torch: param.add_(g, alpha=-lr)
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        w = values[rows[i]]
        g = grads[i]
        for j in range(dim):
            w[j] = _fma(neg_lr, g[j], w[j])


@njit(cache=True, error_model="numpy")
def _momentum(values, vel, rows, grads, lr, neg_lr, mu, nesterov, tf_variant):  # type: ignore[no-untyped-def]
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        w = values[r]
        v = vel[r]
        g = grads[i]
        if tf_variant:
            # v = mu v - lr g; w += v (nesterov: w += mu v - lr g)
            if nesterov:
                for j in range(dim):
                    vj = mu * v[j] - lr * g[j]
                    v[j] = vj
                    w[j] = w[j] + (mu * vj - lr * g[j])
            else:
                for j in range(dim):
                    vj = mu * v[j] - lr * g[j]
                    v[j] = vj
                    w[j] = w[j] + vj
        elif nesterov:
            # torch: buf.mul_(mu).add_(g); g2 = g.add(buf, alpha=mu); w.add_(g2, alpha=-lr)
            for j in range(dim):
                vj = v[j] * mu + g[j]
                v[j] = vj
                w[j] = _fma(neg_lr, _fma(mu, vj, g[j]), w[j])
        else:
            # torch: buf.mul_(mu).add_(g); w.add_(buf, alpha=-lr)
            for j in range(dim):
                vj = v[j] * mu + g[j]
                v[j] = vj
                w[j] = _fma(neg_lr, vj, w[j])


@njit(cache=True, error_model="numpy")
def _adagrad(values, acc, rows, grads, neg_lr, eps, eps_inside):  # type: ignore[no-untyped-def]
    # torch: acc.addcmul_(g, g, value=1); std = acc.sqrt().add_(eps); w.addcdiv_(g, std, value=-lr)
    dim = values.shape[1]
    if eps_inside:
        for i in range(rows.shape[0]):
            r = rows[i]
            w = values[r]
            a = acc[r]
            g = grads[i]
            for j in range(dim):
                gj = g[j]
                aj = _fma(gj, gj, a[j])
                a[j] = aj
                w[j] = w[j] + (neg_lr * gj) / math.sqrt(aj + eps)
    else:
        for i in range(rows.shape[0]):
            r = rows[i]
            w = values[r]
            a = acc[r]
            g = grads[i]
            for j in range(dim):
                gj = g[j]
                aj = _fma(gj, gj, a[j])
                a[j] = aj
                w[j] = w[j] + (neg_lr * gj) / (math.sqrt(aj) + eps)


@njit(cache=True, error_model="numpy")
def _adam(values, m, v, t, rows, grads, lr, b1, b2, eps, eps_hat):  # type: ignore[no-untyped-def]
    # lr, b1, b2 are float64 (per-row bias corrections are computed in float64 as torch's
    # Python scalars are, then cast to float32 once per row); eps is float32.
    dim = values.shape[1]
    w1 = _F32(1.0 - b1)
    w1m1 = w1 - _ONE
    b2f = _F32(b2)
    c2 = _F32(1.0 - b2)
    for i in range(rows.shape[0]):
        r = rows[i]
        t[r, 0] = t[r, 0] + _ONE
        step = np.float64(t[r, 0])
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        w = values[r]
        mr = m[r]
        vr = v[r]
        g = grads[i]
        if eps_hat:
            # TF/MXNet: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t m / (sqrt(v) + eps)
            lr_t = _F32(lr * math.sqrt(bc2) / bc1)
            for j in range(dim):
                gj = g[j]
                mj = mr[j] + w1 * (gj - mr[j])
                vj = vr[j] * b2f + c2 * gj * gj
                mr[j] = mj
                vr[j] = vj
                w[j] = w[j] - lr_t * mj / (math.sqrt(vj) + eps)
        else:
            # torch: m.lerp_(g, 1 - b1); v.mul_(b2).addcmul_(g, g, value=1 - b2);
            # denom = (v.sqrt() / sqrt(bc2)).add_(eps); w.addcdiv_(m, denom, value=-lr / bc1)
            neg_step = _F32(-(lr / bc1))
            bc2_sqrt = _F32(math.sqrt(bc2))
            for j in range(dim):
                gj = g[j]
                mj = _lerp(mr[j], gj, w1, w1m1)
                vj = _fma(c2 * gj, gj, vr[j] * b2f)
                mr[j] = mj
                vr[j] = vj
                w[j] = w[j] + (neg_step * mj) / (math.sqrt(vj) / bc2_sqrt + eps)


@njit(cache=True, error_model="numpy")
def _rmsprop(values, ms, mom, mg, rows, grads, neg_lr, rho, c, c1, eps, momentum,  # type: ignore[no-untyped-def]
             use_mom, centered, eps_inside):
    # torch: ms.mul_(rho).addcmul_(g, g, value=1 - rho); centered: mg.lerp_(g, 1 - rho),
    # d = ms.addcmul(mg, mg, value=-1); avg = d.sqrt().add_(eps);
    # momentum: mom.mul_(mu).addcdiv_(g, avg); w.add_(mom, alpha=-lr)
    # else w.addcdiv_(g, avg, value=-lr).   (c = 1 - rho, c1 = c - 1)
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        w = values[r]
        s = ms[r]
        g = grads[i]
        for j in range(dim):
            gj = g[j]
            sj = _fma(c * gj, gj, s[j] * rho)
            s[j] = sj
            d = sj
            if centered:
                aj = _lerp(mg[r, j], gj, c, c1)
                mg[r, j] = aj
                d = _fma(-aj, aj, sj)
            if eps_inside:
                den = math.sqrt(d + eps)
            else:
                den = math.sqrt(d) + eps
            if use_mom:
                bj = mom[r, j] * momentum + gj / den
                mom[r, j] = bj
                w[j] = _fma(neg_lr, bj, w[j])
            else:
                w[j] = w[j] + (neg_lr * gj) / den


@njit(cache=True, error_model="numpy")
def _ftrl(values, acc, lin, rows, grads, lr, lr_power, l1, l2, l2_shrinkage, sqrt_power):  # type: ignore[no-untyped-def]
    # TF's ApplyFtrl(V2), in float32; l2 here already holds l2 + beta / (2 * lr)
    neg_p = -lr_power
    two_l2 = _TWO * l2
    two_shr = _TWO * l2_shrinkage
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        wr = values[r]
        ar = acc[r]
        zr = lin[r]
        g = grads[i]
        for j in range(dim):
            gj = g[j]
            w = wr[j]
            n = ar[j]
            gs = gj + two_shr * w
            n_new = n + gj * gj
            if sqrt_power:
                p_new = math.sqrt(n_new)
                p_old = math.sqrt(n)
            else:
                p_new = n_new ** neg_p
                p_old = n ** neg_p
            z = zr[j] + gs - (p_new - p_old) / lr * w
            zr[j] = z
            q = p_new / lr + two_l2
            if abs(z) > l1:
                sign = _ONE if z > _ZERO else -_ONE
                wr[j] = (sign * l1 - z) / q
            else:
                wr[j] = _ZERO
            ar[j] = n_new


_NONE = np.zeros((1, 1), dtype=np.float32)


#: Applies one update of a spec to rows of an arena; see :func:`apply` for the arguments.
Kernel = Callable[[Any, np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray, int], None]


def _sgd_kernel(spec: SGD, values: np.ndarray, slots: dict[str, np.ndarray], rows: np.ndarray,
                grads: np.ndarray, step: int) -> None:
    _sgd(values, rows, grads, _F32(-spec.lr))


def _momentum_kernel(spec: Momentum, values: np.ndarray, slots: dict[str, np.ndarray],
                     rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    _momentum(values, slots["velocity"], rows, grads, _F32(spec.lr), _F32(-spec.lr),
              _F32(spec.momentum), spec.nesterov, spec.variant == "tf")


def _adagrad_kernel(spec: Adagrad, values: np.ndarray, slots: dict[str, np.ndarray],
                    rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    _adagrad(values, slots["accum"], rows, grads, _F32(-spec.lr), _F32(spec.eps),
             spec.eps_inside_sqrt)


def _adam_kernel(spec: Adam, values: np.ndarray, slots: dict[str, np.ndarray],
                 rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    _adam(values, slots["m"], slots["v"], slots["t"], rows, grads, float(spec.lr),
          float(spec.beta1), float(spec.beta2), _F32(spec.eps), spec.eps_hat)


def _rmsprop_kernel(spec: RMSProp, values: np.ndarray, slots: dict[str, np.ndarray],
                    rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    c = _F32(1.0 - spec.rho)
    _rmsprop(values, slots["ms"], slots.get("mom", _NONE), slots.get("mg", _NONE), rows,
             grads, _F32(-spec.lr), _F32(spec.rho), c, c - _ONE, _F32(spec.eps),
             _F32(spec.momentum), spec.momentum > 0.0, spec.centered, spec.eps_inside_sqrt)


def _ftrl_kernel(spec: FTRL, values: np.ndarray, slots: dict[str, np.ndarray],
                 rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    _ftrl(values, slots["accum"], slots["linear"], rows, grads, _F32(spec.lr),
          _F32(spec.lr_power), _F32(spec.l1), _F32(spec.l2 + spec.beta / (2.0 * spec.lr)),
          _F32(spec.l2_shrinkage), spec.lr_power == -0.5)


def _plugin_kernel(spec: Optimizer, values: np.ndarray, slots: dict[str, np.ndarray],
                   rows: np.ndarray, grads: np.ndarray, step: int) -> None:
    try:
        spec.update(values, slots, rows, grads, step)
    except NotImplementedError as exc:
        raise InvalidArgumentError(str(exc)) from None


#: optimizer kind → kernel. The built-ins run fused numba kernels; an optimizer added by
#: a plugin gets its entry (its own ``update``) the first time one of its specs is used.
KERNELS: dict[str, Kernel] = {
    SGD.kind: _sgd_kernel,
    Momentum.kind: _momentum_kernel,
    Adagrad.kind: _adagrad_kernel,
    Adam.kind: _adam_kernel,
    RMSProp.kind: _rmsprop_kernel,
    FTRL.kind: _ftrl_kernel,
}


def kernel_for(spec: Optimizer) -> Kernel:
    """The kernel of ``spec``'s kind; a plugin's kind is entered on first use.

    A subclass of a built-in spec that overrides ``update`` runs its own ``update``.
    """
    kernel = KERNELS.get(spec.kind)
    if kernel is None:
        kernel = KERNELS.setdefault(spec.kind, _plugin_kernel)
    elif type(spec).update is not Optimizer.update:
        return _plugin_kernel
    return kernel


def apply(spec: Optimizer, values: np.ndarray, slots: dict[str, np.ndarray], rows: np.ndarray,
          grads: np.ndarray, step: int) -> None:
    """Apply one sparse update in place: ``grads[i]`` to row ``rows[i]`` of ``values``
    and of every slot array in ``slots`` (named as ``spec.slot_names()``).

    :param spec: the optimizer spec (:mod:`xdl.optim`); its ``kind`` selects the kernel
        in :data:`KERNELS`.
    :param values: float32 ``[rows_cap, dim]`` C-contiguous arena, updated in place.
    :param slots: slot name → float32 ``[rows_cap, width]`` C-contiguous arena, updated
        in place.
    :param rows: unique int64 row numbers ``[n]``.
    :param grads: float32 ``[n, dim]``.
    :param step: the caller's update counter after this update (1 for the first). The
        built-in optimizers keep their own per-row counts (Adam's ``t``) and do not
        read it; it is passed for schedules.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    grads = np.ascontiguousarray(grads, dtype=np.float32)
    decay = float(getattr(spec, "weight_decay", 0.0))
    if decay:  # L2 on the touched rows, as torch's coupled weight_decay: g + wd * w
        grads = grads + np.float32(decay) * values[rows]
    kernel_for(spec)(spec, values, slots, rows, grads, step)
