"""Checks of a request's header fields and arrays, shared by the command handlers.

Every check runs before a handler changes anything, accepts any wire value (msgpack
can carry maps, lists, floats, bytes, huge ints where an int is expected) and raises
:class:`~xdl.errors.InvalidArgumentError` naming the field, what was expected and
what came.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xdl.ckpt_layout import check_name
from xdl.errors import InvalidArgumentError

from .state import Request

_REQUIRED: Any = object()


def int_field(header: dict[str, Any], key: str, lo: int, hi: int, default: Any = _REQUIRED,
              table: str | None = None) -> int:
    """``header[key]`` as an int in ``[lo, hi]`` (bools are not ints here)."""
    value = header.get(key, default)
    if value is _REQUIRED or isinstance(value, bool) or not isinstance(value, int) \
            or not lo <= value <= hi:
        got = "nothing" if value is _REQUIRED else _show(value)
        raise InvalidArgumentError(
            f"field {key!r}: expected an int in [{lo}, {hi}], got {got}", table=table)
    return value


def str_field(header: dict[str, Any], key: str, table: str | None = None) -> str:
    """``header[key]`` as a str."""
    value = header.get(key)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"field {key!r}: expected a string, got {_show(value)}",
                                   table=table)
    return value


def name_field(header: dict[str, Any], key: str, what: str) -> str:
    """``header[key]`` as a table or dense-variable name (:func:`xdl.ckpt_layout.check_name`)."""
    return check_name(header.get(key), what)


def spec_field(header: dict[str, Any], key: str, default: dict[str, Any],
               table: str | None = None) -> dict[str, Any]:
    """``header[key]`` as an initializer or optimizer dict (``default`` when absent)."""
    value = header.get(key)
    if value is None:
        return default
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        raise InvalidArgumentError(
            f"field {key!r}: expected a map with a string 'kind', got {_show(value)}",
            table=table)
    return value


def array(req: Request, role: str, table: str | None, dtype: Any = None,
          ndim: int | None = None) -> np.ndarray:
    """The request's array ``role``, of ``dtype`` and rank ``ndim`` when given."""
    arr = req.arrays.get(role)
    if arr is None:
        raise InvalidArgumentError(f"request lacks the array {role!r}; got {sorted(req.arrays)}",
                                   table=table)
    if (dtype is not None and arr.dtype != dtype) or (ndim is not None and arr.ndim != ndim):
        want = f"{np.dtype(dtype) if dtype is not None else 'any dtype'}" + (
            f" of rank {ndim}" if ndim is not None else "")
        raise InvalidArgumentError(f"field {role!r}: expected {want}, got {arr.dtype} of shape "
                                   f"{list(arr.shape)}", table=table)
    return arr


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
