"""What initializer and optimizer specs share: rebuilding a dataclass from its dict."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from .errors import InvalidArgumentError

T = TypeVar("T")


def build(what: str, cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**fields of d)`` with errors naming ``what``, the kind and the bad field.

    :param what: ``"initializer"`` or ``"optimizer"``, for messages.
    :param cls: the dataclass registered for ``d["kind"]``.
    :param d: a ``to_dict()`` output (``kind`` plus fields).
    """
    args = {k: v for k, v in d.items() if k != "kind"}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidArgumentError(
            f"{what} {d['kind']!r} has no field(s) {unknown}; fields: {sorted(known)}")
    try:
        return cls(**args)
    except TypeError as e:  # a required field is missing
        raise InvalidArgumentError(f"{what} {d['kind']!r}: {e}") from None
