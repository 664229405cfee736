"""The adapter base class: what :func:`xdl.swap` needs to know about one framework's
embedding layers (see :mod:`xdl.surgery` for the walk that uses it).

Kept apart from :mod:`xdl.surgery` so that the plugin manager can check what
``register.add`` receives without importing the surgery (which imports the plugin
manager).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import init as xinit

if TYPE_CHECKING:
    from .lookup import RemoteTable


@dataclass(frozen=True)
class LayerSpec:
    """A framework layer translated to what its table needs (and back).

    :ivar num_rows: rows of the layer (``num_embeddings`` / ``input_dim``).
    :ivar dim: row width.
    :ivar padding_idx: id whose row is zeros with no gradient (torch), else None.
    :ivar combiner: ``sum`` / ``mean`` / ``sqrtn`` for bag layers, None for plain lookups.
    :ivar initializer: the layer's own initializer as an ``xdl.init`` spec (hash-mode
        tables start from it), None when unknown (then the framework's default,
        :attr:`LayerAdapter.default_initializer`).
    :ivar settings: framework settings the adapter needs to rebuild the layer.
    """

    num_rows: int
    dim: int
    padding_idx: int | None = None
    combiner: str | None = None
    initializer: xinit.Initializer | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LeftReference:
    """Something that still holds a replaced layer's weight after ``swap`` (what
    :meth:`LayerAdapter.rewire` could not rewire). ``swap`` names them in one warning,
    the layers of one holder together.

    :ivar holder: what holds it, named as precisely as known (``DeepFM.regularization_weight[0][0]
        (a list of 26 items)``).
    :ivar path: the replaced layer's path.
    :ivar hint: what to do instead (``use the server optimizer's weight_decay``).
    """

    holder: str
    path: str
    hint: str = ""


def describe_left(left: Iterable[str | LeftReference]) -> str:
    """One sentence per holder: ``<holder> holds the weight(s) of <paths> (<hint>)``;
    plain strings are kept as they are."""
    groups: dict[tuple[str, str], list[str]] = {}
    out: list[str] = []
    for item in left:
        if isinstance(item, LeftReference):
            key = (item.holder, item.hint)
            if key not in groups:
                groups[key] = []
                out.append("")  # placeholder, filled below in first-seen order
            groups[key].append(item.path or "the model")
        else:
            out.append(item)
    filled = iter(groups.items())
    result = []
    for text in out:
        if text:
            result.append(text)
            continue
        (holder, hint), paths = next(filled)
        noun = "weight" if len(paths) == 1 else "weights"
        result.append(f"{holder} holds the {noun} of {', '.join(paths)}"
                      + (f" ({hint})" if hint else ""))
    return "; ".join(result)


class LayerAdapter:
    """One framework's embedding layers, as :func:`swap` / :func:`unswap` need them.

    Register an instance through ``xdl_register_adapters(register)`` with
    ``register.add(MyAdapter())``. Subclasses set :attr:`name` and :attr:`backend` and
    implement the methods raising ``NotImplementedError``; none may import the
    framework at module import time.
    """

    #: adapter name (``torch_nn``, ``keras``, ``gluon``)
    name: ClassVar[str] = ""
    #: name of the backend whose models this adapter operates on
    backend: ClassVar[str] = ""
    #: the framework's default embedding initializer (hash-mode tables of layers whose
    #: initializer is not known start from it)
    default_initializer: ClassVar[xinit.Initializer] = xinit.Normal(stddev=1.0)

    def layer_types(self) -> tuple[type, ...]:
        """The layer types this adapter replaces."""
        raise NotImplementedError

    def distributed_types(self) -> tuple[type, ...]:
        """The types of the distributed layers it puts in their place."""
        raise NotImplementedError

    def named_layers(self, model: Any) -> Iterable[tuple[str, Any]]:
        """Every layer of ``model`` with its path (``""`` for the model itself), a layer
        shared at several paths listed at each."""
        raise NotImplementedError

    def layer_spec(self, layer: Any, path: str) -> LayerSpec:
        """Translate ``layer``'s settings; raise :class:`~xdl.errors.XdlError` naming
        ``path`` for settings the server cannot reproduce."""
        raise NotImplementedError

    def layer_rows(self, layer: Any) -> np.ndarray:
        """The layer's current rows, float32 ``[num_rows, dim]``."""
        raise NotImplementedError

    def distribute(self, layer: Any, spec: LayerSpec, remote: RemoteTable) -> Any:
        """The distributed layer that replaces ``layer``, looking up through ``remote``."""
        raise NotImplementedError

    def remote_of(self, layer: Any) -> RemoteTable:
        """The :class:`~xdl.lookup.RemoteTable` of a distributed layer."""
        return layer.remote  # type: ignore[no-any-return]

    def restore(self, layer: Any, rows: np.ndarray) -> Any:
        """An ordinary layer like the distributed ``layer``, holding ``rows``."""
        raise NotImplementedError

    def replace(self, model: Any, path: str, new: Any) -> None:
        """Put ``new`` at ``path`` (non-empty) inside ``model``."""
        raise NotImplementedError

    def rewire(self, model: Any, old: Any, new: Any, path: str
               ) -> list[str | LeftReference]:
        """Point what else referenced ``old``'s weight at ``new`` where the framework
        allows; return each reference left (a :class:`LeftReference` or a sentence), for
        ``swap``'s warning."""
        return []

    def finish(self, model: Any) -> Any:
        """Called once after the swap or unswap (reset cached graphs); returns the model."""
        return model

    def handles(self, layer: Any) -> bool:
        """Whether ``layer`` is an ordinary layer this adapter replaces."""
        return isinstance(layer, self.layer_types()) and not isinstance(
            layer, self.distributed_types())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} for backend {self.backend!r}>"


__all__ = ["LayerAdapter", "LayerSpec", "LeftReference", "describe_left"]
