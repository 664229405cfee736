"""Hook specifications of xdl's plugin interface.

A plugin is a module (or object) with functions marked ``@xdl.hookimpl`` and named after
the hooks below. An implementation may accept a subset of a hook's arguments, so hooks
grow by adding arguments, never by renaming them. Plugins are found through the
``xdl`` entry-point group, then the built-in plugins load through the same path
(see :mod:`xdl.plugins`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .backend import Backend
    from .plugins import AdapterRegistry, BackendRegistry, OptimizerRegistry

#: Marks a hook specification; private to xdl.
hookspec = pluggy.HookspecMarker("xdl")

#: Marks a hook implementation; plugin authors import it as ``xdl.hookimpl``.
hookimpl = pluggy.HookimplMarker("xdl")


@hookspec
def xdl_register_backends(register: BackendRegistry) -> None:
    """Register framework backends (subclasses of :class:`xdl.Backend`).

    :param register: the backend registry; call ``register.add(MyBackend)``.
    """


@hookspec(firstresult=True)
def xdl_detect_backend(obj: Any) -> Backend | str | None:
    """Return the backend (or its registered name) that owns ``obj``, or None.

    ``obj`` is a tensor, a model or a function of some framework.

    Stops at first non-None result.

    :param obj: the object whose framework is asked for.
    """


@hookspec
def xdl_register_adapters(register: AdapterRegistry) -> None:
    """Register adapters: what :func:`xdl.swap` needs to know about a framework's layers.

    An adapter is an :class:`xdl.surgery.LayerAdapter`: the backend it operates on, the
    layer types it replaces, how to list layers with their paths, replace one, and
    translate its settings to a table spec and back.

    :param register: the adapter registry; call ``register.add(MyAdapter())``.
    """


@hookspec
def xdl_register_optimizers(register: OptimizerRegistry) -> None:
    """Register optimizer specifications that tables and dense variables can use.

    :param register: the optimizer registry; call ``register.add(name, factory)``.
    """
