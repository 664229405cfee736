"""Optimizer specs for server-side tables and dense variables.

A spec is an immutable, msgpack-able description; the shard applies it with a fused
kernel (:mod:`xdl.server.optimizers`). Each framework's own variant of a formula
(epsilon placement, initial accumulator, momentum convention) is a field, and the
classmethods ``.torch()``, ``.tensorflow()`` and ``.mxnet()`` set the defaults of that
framework's optimizer, so a table reproduces what the framework would have done locally::

    import xdl
    opt = xdl.optim.Adagrad.tensorflow(lr=0.05)   # initial_accumulator=0.1, eps=1e-7
    xdl.optim.from_dict(opt.to_dict()) == opt     # True

Updates are sparse and lazy: only the rows a push names are touched, and per-row
state (Adam's step count ``t``) advances only when the row is pushed, as TF's
LazyAdam and torch's SparseAdam do. Below, ``g`` is a row's gradient, ``w`` its value.

Every optimizer takes ``weight_decay`` (default 0): an L2 penalty ``wd/2 * |w|^2`` on
the rows a push touches, applied as ``g + wd * w`` before the update (torch's coupled
``weight_decay``). It is the server's counterpart of an embedding regularizer; unlike a
local L2 term over the whole table, rows a step does not look up are not decayed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

from .errors import InvalidArgumentError, PluginError
from .hookspecs import hookimpl
from .specs import build

__all__ = [
    "Optimizer",
    "SGD",
    "Momentum",
    "Adagrad",
    "Adam",
    "RMSProp",
    "FTRL",
    "from_dict",
]

_O = TypeVar("_O", bound="Optimizer")


@dataclass(frozen=True)
class Optimizer:
    """Base class of optimizer specs.

    Subclasses list their hyper-parameters as fields; all are validated on construction.
    """

    kind: ClassVar[str] = ""
    #: fields that are not floats (validated by the subclass)
    _non_float: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in fields(self):
            if f.name in self._non_float:
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidArgumentError(
                    f"{name}.{f.name} must be a number, got {type(v).__name__} {v!r}")
            if not math.isfinite(v):
                raise InvalidArgumentError(f"{name}.{f.name} must be finite, got {v!r}")
            object.__setattr__(self, f.name, float(v))
        for f in fields(self):
            if f.name in self._non_float and not isinstance(getattr(self, f.name), (bool, str)):
                raise InvalidArgumentError(f"{name}.{f.name} has the wrong type: "
                                           f"{getattr(self, f.name)!r}")
        lr = getattr(self, "lr", 1.0)
        if not lr > 0:
            raise InvalidArgumentError(f"{name}.lr must be > 0, got {lr}")
        decay = getattr(self, "weight_decay", 0.0)
        if decay < 0:
            raise InvalidArgumentError(f"{name}.weight_decay must be >= 0, got {decay}")
        self._validate()

    def _validate(self) -> None:
        """Subclass checks beyond 'finite number'."""

    def _check(self, ok: bool, field: str, rule: str) -> None:
        if not ok:
            raise InvalidArgumentError(
                f"{type(self).__name__}.{field} must be {rule}, got {getattr(self, field)!r}")

    def to_dict(self) -> dict[str, Any]:
        """This spec as a plain dict with a ``"kind"`` key (msgpack-able)."""
        return {"kind": self.kind, **asdict(self)}

    def slot_names(self) -> list[str]:
        """Names of the per-row state arrays this optimizer keeps beside the values."""
        return []

    def slot_width(self, name: str, dim: int) -> int:
        """Columns of slot ``name`` for rows of width ``dim`` (``dim`` unless a scalar per row)."""
        return dim

    def slot_initial(self, name: str) -> float:
        """Value a new row's slot ``name`` starts at."""
        return 0.0

    def update(self, values: Any, slots: dict[str, Any], rows: Any, grads: Any,
               step: int) -> None:
        """Apply one sparse update in place (optimizers added by plugins implement this).

        The built-in optimizers run fused numba kernels instead (see
        :func:`xdl.server.optimizers.apply`). An implementation must be vectorized over
        ``rows`` (numpy or numba, no Python loop over ids).

        :param values: float32 ``[rows_cap, dim]`` arena; rows ``rows`` are updated.
        :param slots: slot name → float32 ``[rows_cap, slot_width]`` arena.
        :param rows: unique int64 row numbers ``[n]``.
        :param grads: float32 ``[n, dim]``, finite.
        :param step: the table's push counter after this update (1 for the first).
        """
        raise NotImplementedError(
            f"optimizer {type(self).__name__} (kind {self.kind!r}) does not implement "
            "update(values, slots, rows, grads, step)")

    @classmethod
    def torch(cls: type[_O], lr: float | None = None, **kwargs: Any) -> _O:
        """This optimizer with ``torch.optim``'s defaults (``lr`` and overrides as given)."""
        return cls._preset("torch", lr, kwargs)

    @classmethod
    def tensorflow(cls: type[_O], lr: float | None = None, **kwargs: Any) -> _O:
        """This optimizer with ``tf.keras.optimizers``' defaults (``lr`` and overrides as given)."""
        return cls._preset("tensorflow", lr, kwargs)

    @classmethod
    def mxnet(cls: type[_O], lr: float | None = None, **kwargs: Any) -> _O:
        """This optimizer with ``mxnet.optimizer``'s defaults (``lr`` and overrides as given)."""
        return cls._preset("mxnet", lr, kwargs)

    #: framework → default field values (lr included)
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def _preset(cls: type[_O], framework: str, lr: float | None, kwargs: dict[str, Any]) -> _O:
        args = dict(cls._PRESETS[framework])
        if lr is not None:
            args["lr"] = lr
        args.update(kwargs)
        return cls(**args)


@dataclass(frozen=True)
class SGD(Optimizer):
    """Plain gradient descent: ``w -= lr * g``. No slots.

    Presets: torch ``lr=1e-3``, tensorflow ``lr=0.01``, mxnet ``lr=0.01``.
    """

    lr: float
    weight_decay: float = 0.0
    kind: ClassVar[str] = "sgd"
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 1e-3}, "tensorflow": {"lr": 0.01}, "mxnet": {"lr": 0.01}}


@dataclass(frozen=True)
class Momentum(Optimizer):
    """SGD with momentum; slot ``velocity``.

    ``variant="torch"`` (``torch.optim.SGD(momentum=mu)``)::

        v = mu * v + g
        w -= lr * v                      # nesterov: w -= lr * (g + mu * v)

    ``variant="tf"`` (keras ``SGD(momentum=mu)``, MXNet ``sgd``/``nag``)::

        v = mu * v - lr * g
        w += v                           # nesterov: w += mu * v - lr * g

    With a constant ``lr`` the two give the same weights (``v_tf = -lr * v_torch``);
    they differ once ``lr`` changes between steps.
    Presets: torch ``lr=1e-3``; tensorflow ``lr=0.01``; mxnet ``lr=0.01``; momentum 0.9.
    """

    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    variant: str = "torch"
    weight_decay: float = 0.0
    kind: ClassVar[str] = "momentum"
    _non_float: ClassVar[tuple[str, ...]] = ("nesterov", "variant")
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 1e-3, "variant": "torch"},
        "tensorflow": {"lr": 0.01, "variant": "tf"},
        "mxnet": {"lr": 0.01, "variant": "tf"},
    }

    def _validate(self) -> None:
        self._check(0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)")
        self._check(isinstance(self.nesterov, bool), "nesterov", "a bool")
        self._check(self.variant in ("torch", "tf"), "variant", "'torch' or 'tf'")

    def slot_names(self) -> list[str]:
        """``["velocity"]``."""
        return ["velocity"]


@dataclass(frozen=True)
class Adagrad(Optimizer):
    """Adagrad; slot ``accum`` (starts at ``initial_accumulator``)::

        acc += g**2
        w -= lr * g / (sqrt(acc) + eps)          # eps_inside_sqrt: / sqrt(acc + eps)

    torch ``Adagrad``: ``lr=0.01``, initial 0, ``eps=1e-10`` (outside; torch computes
    ``std = sqrt(acc) + eps; w += -lr * (g / std)``, which this follows).
    tensorflow (keras) ``Adagrad``: ``lr=1e-3``, initial 0.1, ``eps=1e-7`` (outside).
    mxnet ``AdaGrad``: ``lr=0.01``, initial 0, ``eps=1e-7`` inside the square root.
    """

    lr: float
    initial_accumulator: float = 0.0
    eps: float = 1e-10
    eps_inside_sqrt: bool = False
    weight_decay: float = 0.0
    kind: ClassVar[str] = "adagrad"
    _non_float: ClassVar[tuple[str, ...]] = ("eps_inside_sqrt",)
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 0.01, "initial_accumulator": 0.0, "eps": 1e-10},
        "tensorflow": {"lr": 1e-3, "initial_accumulator": 0.1, "eps": 1e-7},
        "mxnet": {"lr": 0.01, "initial_accumulator": 0.0, "eps": 1e-7,
                  "eps_inside_sqrt": True},
    }

    def _validate(self) -> None:
        self._check(self.initial_accumulator >= 0, "initial_accumulator", ">= 0")
        self._check(self.eps >= 0, "eps", ">= 0")
        self._check(isinstance(self.eps_inside_sqrt, bool), "eps_inside_sqrt", "a bool")

    def slot_names(self) -> list[str]:
        """``["accum"]``."""
        return ["accum"]

    def slot_initial(self, name: str) -> float:
        """``initial_accumulator`` for ``accum``."""
        return self.initial_accumulator


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with a per-row step count (lazy Adam); slots ``m``, ``v``, ``t`` (one column).

    Each pushed row: ``t += 1; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g**2``, then

    * ``eps_hat=False`` (torch ``Adam``/``SparseAdam``)::

        w -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    * ``eps_hat=True`` (TF/keras ``Adam``, TF ``LazyAdam``, MXNet ``adam``)::

        lr_t = lr * sqrt(1 - b2**t) / (1 - b1**t)
        w -= lr_t * m / (sqrt(v) + eps)

    Presets: torch ``lr=1e-3, eps=1e-8``; tensorflow ``lr=1e-3, eps=1e-7, eps_hat``;
    mxnet ``lr=1e-3, eps=1e-8, eps_hat``. ``t`` is kept as float32 like torch's step
    tensor; it stops counting at 2**24, where both bias corrections are already 1.
    """

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    eps_hat: bool = False
    weight_decay: float = 0.0
    kind: ClassVar[str] = "adam"
    _non_float: ClassVar[tuple[str, ...]] = ("eps_hat",)
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 1e-3, "eps": 1e-8, "eps_hat": False},
        "tensorflow": {"lr": 1e-3, "eps": 1e-7, "eps_hat": True},
        "mxnet": {"lr": 1e-3, "eps": 1e-8, "eps_hat": True},
    }

    def _validate(self) -> None:
        self._check(0.0 <= self.beta1 < 1.0, "beta1", "in [0, 1)")
        self._check(0.0 <= self.beta2 < 1.0, "beta2", "in [0, 1)")
        self._check(self.eps >= 0, "eps", ">= 0")
        self._check(isinstance(self.eps_hat, bool), "eps_hat", "a bool")

    def slot_names(self) -> list[str]:
        """``["m", "v", "t"]``."""
        return ["m", "v", "t"]

    def slot_width(self, name: str, dim: int) -> int:
        """``t`` is one column; ``m`` and ``v`` are ``dim`` wide."""
        return 1 if name == "t" else dim


@dataclass(frozen=True)
class RMSProp(Optimizer):
    """RMSProp; slots ``ms`` (starts at ``initial_accumulator``), ``mom`` when
    ``momentum > 0``, ``mg`` when ``centered``::

        ms = rho * ms + (1 - rho) * g**2
        mg = rho * mg + (1 - rho) * g                # centered only
        d  = ms - mg**2  (centered)  or  ms
        den = sqrt(d) + eps          # eps_inside_sqrt: sqrt(d + eps)
        momentum > 0:  mom = momentum * mom + g / den;  w -= lr * mom
        else:          w -= lr * g / den

    torch ``RMSprop``: ``lr=0.01, rho(alpha)=0.99, eps=1e-8`` outside the root.
    tensorflow (keras) ``RMSprop``: ``lr=1e-3, rho=0.9, eps=1e-7`` inside the root (keras
    keeps ``lr`` inside its momentum buffer; equal weights for a constant ``lr``).
    mxnet ``RMSProp``: ``lr=1e-3, rho(gamma1)=0.9, eps=1e-8`` inside the root; centered
    runs use ``momentum(gamma2)=0.9``.
    """

    lr: float
    rho: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    eps_inside_sqrt: bool = False
    initial_accumulator: float = 0.0
    weight_decay: float = 0.0
    kind: ClassVar[str] = "rmsprop"
    _non_float: ClassVar[tuple[str, ...]] = ("centered", "eps_inside_sqrt")
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 0.01, "rho": 0.99, "eps": 1e-8},
        "tensorflow": {"lr": 1e-3, "rho": 0.9, "eps": 1e-7, "eps_inside_sqrt": True},
        "mxnet": {"lr": 1e-3, "rho": 0.9, "eps": 1e-8, "eps_inside_sqrt": True},
    }

    @classmethod
    def mxnet(cls, lr: float | None = None, **kwargs: Any) -> RMSProp:
        """MXNet ``RMSProp``'s defaults; a centered run also gets ``momentum=0.9`` (gamma2)."""
        if kwargs.get("centered"):
            kwargs.setdefault("momentum", 0.9)
        return cls._preset("mxnet", lr, kwargs)

    def _validate(self) -> None:
        self._check(0.0 <= self.rho < 1.0, "rho", "in [0, 1)")
        self._check(self.eps >= 0, "eps", ">= 0")
        self._check(0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)")
        self._check(self.initial_accumulator >= 0, "initial_accumulator", ">= 0")
        self._check(isinstance(self.centered, bool), "centered", "a bool")
        self._check(isinstance(self.eps_inside_sqrt, bool), "eps_inside_sqrt", "a bool")

    def slot_names(self) -> list[str]:
        """``["ms"]``, plus ``"mom"`` with momentum and ``"mg"`` when centered."""
        names = ["ms"]
        if self.momentum > 0:
            names.append("mom")
        if self.centered:
            names.append("mg")
        return names

    def slot_initial(self, name: str) -> float:
        """``initial_accumulator`` for ``ms``, else 0."""
        return self.initial_accumulator if name == "ms" else 0.0


@dataclass(frozen=True)
class FTRL(Optimizer):
    """FTRL-proximal as TF's ``ApplyFtrlV2``; slots ``accum`` (n, starts at
    ``initial_accumulator``) and ``linear`` (z)::

        gs = g + 2 * l2_shrinkage * w
        n_new = n + g**2
        z += gs - (n_new**(-lr_power) - n**(-lr_power)) / lr * w
        q = n_new**(-lr_power) / lr + 2 * (l2 + beta / (2 * lr))
        w = (sign(z) * l1 - z) / q  if |z| > l1  else 0
        n = n_new

    tensorflow (keras) ``Ftrl``: ``lr=1e-3, lr_power=-0.5, initial_accumulator=0.1``,
    no regularisation. mxnet ``Ftrl``: ``lr=0.1, l1(lamda1)=0.01, beta=1``, n from 0
    (MXNet's ``(beta + sqrt(n)) / lr`` is this ``q`` with ``l2=0``). torch has no FTRL:
    ``FTRL.torch()`` gives the tensorflow defaults.
    """

    lr: float
    lr_power: float = -0.5
    l1: float = 0.0
    l2: float = 0.0
    l2_shrinkage: float = 0.0
    beta: float = 0.0
    initial_accumulator: float = 0.1
    weight_decay: float = 0.0
    kind: ClassVar[str] = "ftrl"
    _PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "torch": {"lr": 1e-3, "initial_accumulator": 0.1},
        "tensorflow": {"lr": 1e-3, "initial_accumulator": 0.1},
        "mxnet": {"lr": 0.1, "l1": 0.01, "beta": 1.0, "initial_accumulator": 0.0},
    }

    def _validate(self) -> None:
        self._check(self.lr_power <= 0, "lr_power", "<= 0")
        for name in ("l1", "l2", "l2_shrinkage", "beta", "initial_accumulator"):
            self._check(getattr(self, name) >= 0, name, ">= 0")

    def slot_names(self) -> list[str]:
        """``["accum", "linear"]``."""
        return ["accum", "linear"]

    def slot_initial(self, name: str) -> float:
        """``initial_accumulator`` for ``accum``, 0 for ``linear``."""
        return self.initial_accumulator if name == "accum" else 0.0


_KINDS: dict[str, type[Optimizer]] = {
    c.kind: c for c in (SGD, Momentum, Adagrad, Adam, RMSProp, FTRL)
}


def _lookup_kind(kind: str) -> type[Optimizer]:
    cls = _KINDS.get(kind)
    if cls is not None:
        return cls
    from .plugins import get_plugin_state

    registry = get_plugin_state().optimizers
    try:
        found = registry.get(kind)
    except PluginError:
        raise InvalidArgumentError(
            f"unknown optimizer kind {kind!r}; known: {registry.names()} (plugins add "
            "more through the xdl_register_optimizers hook)") from None
    if not (isinstance(found, type) and issubclass(found, Optimizer)):
        raise InvalidArgumentError(f"optimizer {kind!r} was registered as {found!r}, which is "
                                   "not a subclass of xdl.optim.Optimizer")
    return found


def from_dict(d: dict[str, Any]) -> Optimizer:
    """Rebuild an optimizer spec from :meth:`Optimizer.to_dict`'s output.

    Kinds other than the built-ins are looked up among the optimizers registered by
    plugins (hook ``xdl_register_optimizers``).

    :raises InvalidArgumentError: unknown ``kind``, unknown field or a bad value.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise InvalidArgumentError(f"an optimizer dict needs a 'kind' key, got {d!r}")
    cls = _lookup_kind(str(d["kind"]))
    return build("optimizer", cls, d)


@hookimpl
def xdl_register_optimizers(register: Any) -> None:
    """Register the built-in optimizers under their kinds (``sgd``, ``adagrad``, ...)."""
    for cls in _KINDS.values():
        register.add(cls.kind, cls)
