"""Hook specifications of xdl's plugin interface.

A plugin is a module (or object) with functions marked ``@xdl.hookimpl`` and named after
the hooks below. An implementation may accept a subset of a hook's arguments, so hooks
grow by adding arguments, never by renaming them. Plugins are found through the
``xdl`` entry-point group, then the built-in plugins load through the same path
(see :mod:`xdl.plugins`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from .backend import Backend


# What each registration hook receives, stated here so that this module imports nothing
# of xdl.plugins (which implements them: BackendRegistry, AdapterRegistry,
# OptimizerRegistry) and the two stay free of an import cycle.
class BackendRegister(Protocol):
    """The ``register`` argument of :func:`xdl_register_backends`."""

    def add(self, backend_cls: type[Backend]) -> None:
        """Register a backend class under its ``name``."""


class AdapterRegister(Protocol):
    """The ``register`` argument of :func:`xdl_register_adapters`."""

    def add(self, adapter: Any, swap: Callable[..., Any] | None = None,
            unswap: Callable[..., Any] | None = None) -> None:
        """Register an adapter under its ``name``."""


class OptimizerRegister(Protocol):
    """The ``register`` argument of :func:`xdl_register_optimizers`."""

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        """Register an optimizer spec factory under ``name``."""


#: Marks a hook specification; private to xdl.
hookspec = pluggy.HookspecMarker("xdl")

#: Marks a hook implementation; plugin authors import it as ``xdl.hookimpl``.
hookimpl = pluggy.HookimplMarker("xdl")


@hookspec
def xdl_register_backends(register: BackendRegister) -> None:
    """Register framework backends (subclasses of :class:`xdl.Backend`).

    :param register: the backend registry (:class:`xdl.plugins.BackendRegistry`); call
        ``register.add(MyBackend)``.
    """


@hookspec(firstresult=True)
def xdl_detect_backend(obj: Any) -> Backend | str | None:
    """Return the backend (or its registered name) that owns ``obj``, or None.

    ``obj`` is a tensor, a model or a function of some framework.

    Stops at first non-None result.

    :param obj: the object whose framework is asked for.
    """


@hookspec
def xdl_register_adapters(register: AdapterRegister) -> None:
    """Register adapters: what :func:`xdl.swap` needs to know about a framework's layers.

    An adapter is an :class:`xdl.adapter.LayerAdapter`: the backend it operates on, the
    layer types it replaces, how to list layers with their paths, replace one, and
    translate its settings to a table spec and back.

    :param register: the adapter registry (:class:`xdl.plugins.AdapterRegistry`); call
        ``register.add(MyAdapter())``.
    """


@hookspec
def xdl_register_optimizers(register: OptimizerRegister) -> None:
    """Register optimizer specifications that tables and dense variables can use.

    :param register: the optimizer registry (:class:`xdl.plugins.OptimizerRegistry`);
        call ``register.add(name, factory)``.
    """
