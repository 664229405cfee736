"""The plugin manager: finds plugins, validates them, and holds their registries.

Loading order: plugins of the ``xdl`` entry-point group first, then the built-in
plugins (:data:`BUILTIN_PLUGINS`), which load through the same ``register`` path as a
third-party plugin. Environment:

``XDL_DISABLE_PLUGIN_AUTOLOAD``
    when set (non-empty, not ``0``), entry-point plugins are not loaded.
``XDL_BLOCKED_PLUGINS``
    comma-separated plugin names (entry-point names, or built-in module names such as
    ``xdl.backends.torch_backend``) that are never registered.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .adapter import LayerAdapter
from .backend import Backend
from .errors import PluginError

#: Built-in plugins, registered after the entry-point plugins, under these names.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "xdl.optim",
    "xdl.backends.numpy_backend",
    "xdl.backends.torch_backend",
    "xdl.adapters.torch_nn",
    "xdl.backends.mxnet_backend", "xdl.adapters.gluon",
    "xdl.backends.tensorflow_backend", "xdl.adapters.keras", "xdl.adapters.tf_nn",
)
#: Entry-point group (and pluggy project name).
ENTRY_POINT_GROUP = "xdl"
HOOK_PREFIX = "xdl_"


class BackendRegistry:
    """Backend classes by name, filled by ``xdl_register_backends(register)``."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend]] = {}

    def add(self, backend_cls: type[Backend]) -> None:
        """Register a :class:`xdl.Backend` subclass under its ``name``.

        The first registration of a name wins (entry points load before built-ins, so a
        third-party plugin can replace a built-in backend).
        """
        if not (isinstance(backend_cls, type) and issubclass(backend_cls, Backend)):
            raise PluginError(
                f"register.add() wants a subclass of xdl.Backend, got {backend_cls!r}")
        if not backend_cls.name:
            raise PluginError(f"backend class {backend_cls.__qualname__} has no 'name'")
        self._classes.setdefault(backend_cls.name, backend_cls)

    def get(self, name: str) -> type[Backend]:
        """The backend class registered as ``name``."""
        try:
            return self._classes[name]
        except KeyError:
            raise PluginError(
                f"no backend named {name!r}; registered: {sorted(self._classes)}") from None

    def names(self) -> list[str]:
        """Registered backend names, sorted."""
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[Backend]]:
        return iter(self._classes.values())


@dataclass(frozen=True)
class Adapter:
    """A model surgery given as a pair of functions (``swap(model, client, **options)``
    and ``unswap``); listed by ``xdl plugins`` but not used by :func:`xdl.swap`, which
    dispatches to :class:`~xdl.adapter.LayerAdapter` objects."""

    name: str
    swap: Callable[..., Any]
    unswap: Callable[..., Any] | None = None


class AdapterRegistry:
    """Adapters by name, filled by ``xdl_register_adapters(register)``."""

    def __init__(self) -> None:
        self._adapters: dict[str, Any] = {}

    def add(self, adapter: Any, swap: Callable[..., Any] | None = None,
            unswap: Callable[..., Any] | None = None) -> None:
        """Register a :class:`~xdl.adapter.LayerAdapter` (an instance, or a subclass
        instantiated here) under its ``name``; first registration of a name wins.

        ``add(name, swap, unswap)`` registers a function pair instead (:class:`Adapter`).
        """
        if isinstance(adapter, type) and issubclass(adapter, LayerAdapter):
            adapter = adapter()
        if isinstance(adapter, LayerAdapter):
            if not adapter.name or not adapter.backend:
                raise PluginError(f"adapter {type(adapter).__qualname__} needs a 'name' and "
                                  "the 'backend' it operates on")
            self._adapters.setdefault(adapter.name, adapter)
            return
        if isinstance(adapter, str) and callable(swap):
            self._adapters.setdefault(adapter, Adapter(adapter, swap, unswap))
            return
        raise PluginError(
            f"register.add() wants an xdl.adapter.LayerAdapter (or a name and a swap "
            f"function), got {adapter!r}")

    def get(self, name: str) -> Any:
        """The adapter registered as ``name``."""
        try:
            return self._adapters[name]
        except KeyError:
            raise PluginError(
                f"no adapter named {name!r}; registered: {sorted(self._adapters)}") from None

    def for_backend(self, backend: str) -> list[Any]:
        """The :class:`~xdl.adapter.LayerAdapter` objects operating on ``backend``'s
        models, in registration order."""
        return [a for a in self._adapters.values() if getattr(a, "backend", None) == backend]

    def names(self) -> list[str]:
        """Registered adapter names, sorted."""
        return sorted(self._adapters)


class OptimizerRegistry:
    """Optimizer factories by name, filled by ``xdl_register_optimizers(register)``."""

    def __init__(self) -> None:
        self._factories: dict[str, Callable[..., Any]] = {}

    def add(self, name: str, factory: Callable[..., Any]) -> None:
        """Register an optimizer spec factory ``name`` (first registration wins)."""
        self._factories.setdefault(name, factory)

    def get(self, name: str) -> Callable[..., Any]:
        """The optimizer factory registered as ``name``."""
        try:
            return self._factories[name]
        except KeyError:
            raise PluginError(
                f"no optimizer named {name!r}; registered: {sorted(self._factories)}") from None

    def names(self) -> list[str]:
        """Registered optimizer names, sorted."""
        return sorted(self._factories)


@dataclass
class PluginState:
    """A validated plugin manager and the registries its plugins filled."""

    pm: pluggy.PluginManager
    backends: BackendRegistry
    adapters: AdapterRegistry
    optimizers: OptimizerRegistry
    _instances: dict[str, Backend] = field(default_factory=dict)


_lock = threading.RLock()
_state: PluginState | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _blocked_from_env() -> set[str]:
    raw = os.environ.get("XDL_BLOCKED_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def check_pending(pm: pluggy.PluginManager) -> None:
    """Fail loudly on an ``xdl_*`` function of a plugin that matches no hook.

    pluggy's own ``check_pending`` only sees functions marked ``@hookimpl``; this also
    catches unmarked ``xdl_*`` functions (a forgotten marker, or a misspelling).
    """
    known = {name for name in dir(hookspecs) if name.startswith(HOOK_PREFIX)}
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        for attr in dir(plugin):
            if not attr.startswith(HOOK_PREFIX) or not callable(getattr(plugin, attr, None)):
                continue
            if attr not in known:
                raise PluginError(
                    f"plugin {name!r} defines {attr!r}, which is not an xdl hook "
                    f"(misspelled?); known hooks: {sorted(known)}")
            if pm.parse_hookimpl_opts(plugin, attr) is None:
                raise PluginError(
                    f"plugin {name!r} defines hook {attr!r} without the @xdl.hookimpl marker")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _validation_error(pm, exc, None) from exc


def _validation_error(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError,
                      name: str | None) -> PluginError:
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return PluginError(f"plugin {name or _plugin_name(pm, exc.plugin)!r}: {text}")


def _plugin_name(pm: pluggy.PluginManager, plugin: Any) -> str:
    return pm.get_name(plugin) or repr(plugin)


def create_plugin_manager(
    *,
    autoload: bool | None = None,
    blocked: set[str] | None = None,
    builtins: tuple[str, ...] = BUILTIN_PLUGINS,
    extra_plugins: tuple[tuple[str, Any], ...] = (),
) -> PluginState:
    """Build a plugin manager, load and validate plugins, and fill the registries.

    :param autoload: load entry-point plugins (default: unless
        ``XDL_DISABLE_PLUGIN_AUTOLOAD`` is set).
    :param blocked: plugin names never to register (default: ``XDL_BLOCKED_PLUGINS``).
    :param builtins: module names of the built-in plugins.
    :param extra_plugins: ``(name, plugin)`` pairs registered after the built-ins (tests).
    """
    if autoload is None:
        autoload = not _env_flag("XDL_DISABLE_PLUGIN_AUTOLOAD")
    if blocked is None:
        blocked = _blocked_from_env()
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    plugins: list[tuple[str, Any]] = []
    try:
        if autoload:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for module_name in builtins:
            if module_name not in blocked:
                plugins.append((module_name, importlib.import_module(module_name)))
        plugins.extend(extra_plugins)
    except pluggy.PluginValidationError as exc:
        raise _validation_error(pm, exc, None) from exc
    for name, plugin in plugins:
        if pm.get_plugin(name) is not None:
            continue
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise _validation_error(pm, exc, name) from exc
    check_pending(pm)
    state = PluginState(pm, BackendRegistry(), AdapterRegistry(), OptimizerRegistry())
    pm.hook.xdl_register_backends(register=state.backends)
    pm.hook.xdl_register_adapters(register=state.adapters)
    pm.hook.xdl_register_optimizers(register=state.optimizers)
    return state


def get_plugin_state() -> PluginState:
    """The process-wide :class:`PluginState`, created on first use."""
    global _state
    with _lock:
        if _state is None:
            _state = create_plugin_manager()
        return _state


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide pluggy plugin manager (plugins loaded and validated)."""
    return get_plugin_state().pm


def reset_plugin_manager() -> None:
    """Forget the process-wide plugin manager; the next use reloads plugins (tests)."""
    global _state
    with _lock:
        _state = None


def load_plugin(plugin: Any, name: str | None = None) -> None:
    """Register ``plugin`` (a module or object with ``@xdl.hookimpl`` functions) on the
    process-wide plugin manager, validate it, and add what it registers.

    For trying a plugin without packaging it; installed plugins load through the
    ``xdl`` entry-point group instead.
    """
    state = get_plugin_state()
    pm = state.pm
    with _lock:
        others = [p for p in pm.get_plugins() if p is not plugin]
        try:
            registered = pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise _validation_error(pm, exc, name) from exc
        if registered is None:
            return  # blocked
        try:
            check_pending(pm)
        except PluginError:
            pm.unregister(plugin)
            raise
        pm.subset_hook_caller("xdl_register_backends", others)(register=state.backends)
        pm.subset_hook_caller("xdl_register_adapters", others)(register=state.adapters)
        pm.subset_hook_caller("xdl_register_optimizers", others)(register=state.optimizers)


def get_backend(name_or_obj: Any) -> Backend:
    """A backend by name (``"torch"``), or the backend owning a tensor, model or function.

    Raises :class:`~xdl.errors.BackendNotAvailableError` when the backend's framework is
    not installed, :class:`~xdl.errors.PluginError` when no backend matches.
    """
    state = get_plugin_state()
    if isinstance(name_or_obj, str):
        with _lock:
            backend = state._instances.get(name_or_obj)
            if backend is None:
                cls = state.backends.get(name_or_obj)
                cls.framework_module()  # raises with the extra to install
                backend = state._instances[name_or_obj] = cls()
        return backend
    found = state.pm.hook.xdl_detect_backend(obj=name_or_obj)
    if found is None:
        raise PluginError(
            f"no backend owns an object of type {type(name_or_obj).__qualname__}; "
            f"registered backends: {state.backends.names()}")
    if isinstance(found, str):
        return get_backend(found)
    return found


def _plugin_version(pm: pluggy.PluginManager, plugin: Any) -> str:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return str(dist.version)
    if isinstance(plugin, ModuleType) and plugin.__name__.startswith("xdl."):
        from . import __version__

        return __version__
    return str(getattr(plugin, "__version__", "unknown"))


def list_plugins() -> list[dict[str, Any]]:
    """Registered plugins, in load order: ``{"name", "version", "hooks"}`` each."""
    pm = get_plugin_manager()
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "version": _plugin_version(pm, plugin), "hooks": hooks})
    return out


def format_plugins() -> str:
    """Text of ``xdl plugins``: one line per plugin (name, version, hooks), then the
    backends and the adapters (with the backend each operates on)."""
    rows = list_plugins()
    width = max([len(r["name"]) for r in rows] + [len("plugin")])
    lines = [f"{'plugin':<{width}}  {'version':<8}  hooks"]
    lines += [f"{r['name']:<{width}}  {r['version']:<8}  {', '.join(r['hooks'])}" for r in rows]
    state = get_plugin_state()
    lines.append("")
    lines.append("backends: " + ", ".join(
        f"{cls.name}{'' if cls.is_installed() else ' (not installed)'}"
        for cls in sorted(state.backends, key=lambda c: c.name)))
    lines.append("adapters: " + ", ".join(
        f"{name} ({getattr(state.adapters.get(name), 'backend', '') or 'functions'})"
        for name in state.adapters.names()))
    return "\n".join(lines)
