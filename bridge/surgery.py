"""Model surgery written once: ``xdl.swap`` / ``xdl.unswap`` for every framework.

The walk is torchrec's: find the model's framework (``xdl_detect_backend``), take the
adapters registered for it (``xdl_register_adapters``), list the model's layers with
their paths, and replace each layer of a type an adapter handles. What differs per
framework is only what a :class:`LayerAdapter` says: which layer types it handles, how
to list layers with their paths, how to replace one, how its settings translate to a
table (:class:`LayerSpec`) and back, and what its current rows are.

Written here, once: table names (``prefix`` + layer path, or ``per_table[path]["name"]``),
options (``optimizer`` / ``initializer`` / ``seed`` / ``id_mode``, per table
overrides), table creation, the rule that **a swapped model is the same model**
(index-mode tables start from the layer's current rows, uploaded in chunks; hash-mode
tables from the layer's own initializer), the refusal to reuse a table that holds
another model's rows, and the chunked export of :func:`unswap`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .adapter import LayerAdapter, LayerSpec, LeftReference, describe_left
from .errors import (
    InvalidArgumentError,
    PluginError,
    TableNotFoundError,
    UnknownCommandError,
    XdlError,
)
from .lookup import ID_MODES, RemoteTable

#: rows per request when uploading or exporting a table
CHUNK_ROWS = 1 << 18
#: ``existing=`` choices of :func:`swap`
EXISTING = ("error", "keep", "overwrite")
_UNSET: Any = object()


def adapters_for(model: Any) -> list[LayerAdapter]:
    """The adapters registered for the framework that owns ``model``."""
    from .plugins import get_backend, get_plugin_state

    backend = get_backend(model)
    found = get_plugin_state().adapters.for_backend(backend.name)
    if not found:
        raise PluginError(f"no adapter is registered for backend {backend.name!r} (the owner "
                          f"of {type(model).__qualname__}); a plugin registers one through "
                          "xdl_register_adapters")
    return found


def table_name(path: str, prefix: str, per_table: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The table of the layer at ``path``: ``per_table[path]["name"]``, else
    ``prefix + path`` (``prefix`` or ``"embedding"`` for the model itself)."""
    if per_table and "name" in per_table.get(path, {}):
        return str(per_table[path]["name"])
    return prefix + path if path else prefix or "embedding"


def _options(path: str, defaults: dict[str, Any],
             per_table: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    options = {k: v for k, v in defaults.items() if v is not None}
    if per_table and path in per_table:
        extra = dict(per_table[path])
        if "mode" in extra:
            warnings.warn("per_table 'mode' is deprecated; use 'id_mode'", DeprecationWarning,
                          stacklevel=4)
            extra.setdefault("id_mode", extra.pop("mode"))
        options.update(extra)
    options.pop("name", None)
    return options


def upload_rows(client: Any, table: str, rows: np.ndarray, *, chunk: int = CHUNK_ROWS) -> None:
    """Write ``rows`` (``[n, dim]``) as rows ``0 .. n-1`` of ``table``, in chunks of
    ``chunk`` rows (``client.set_rows``; no Python loop over ids)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    for lo in range(0, len(rows), chunk):
        hi = min(lo + chunk, len(rows))
        client.set_rows(table, np.arange(lo, hi, dtype=np.int64), rows[lo:hi])
    wait = getattr(client, "wait", None)
    if wait is not None:
        wait()


def export_rows(client: Any, table: str, num_rows: int, *, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """Rows ``0 .. num_rows-1`` of ``table``, float32 ``[num_rows, dim]``, pulled in
    chunks of ``chunk`` rows."""
    parts = [np.asarray(client.pull(table, np.arange(lo, min(lo + chunk, num_rows),
                                                     dtype=np.int64), unique=True))
             for lo in range(0, num_rows, chunk)]
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def _table_rows(client: Any, table: str) -> int | None:
    describe = getattr(client, "describe_table", None)
    if describe is None:
        return None
    try:
        return int(describe(table).get("rows", 0))
    except TableNotFoundError:
        return 0


def _same_rows(client: Any, table: str, rows: np.ndarray) -> bool:
    return bool(np.array_equal(export_rows(client, table, len(rows)), rows))


def _start_rows(client: Any, table: str, path: str, spec: LayerSpec, rows: np.ndarray,
                existing: str) -> None:
    """Make an index-mode table start from the layer's ``rows``."""
    held = _table_rows(client, table)
    if held:
        if existing == "keep" or _same_rows(client, table, rows):
            return
        if existing == "error":
            raise XdlError(
                f"cannot swap {path or 'the model'}: table {table!r} already holds {held} rows "
                "that differ from this layer's weights (another model swapped onto this client "
                "with the same module paths?); pass prefix='<model name>.' to give this model "
                "its own tables, or existing='keep' to train on from the table's rows",
                table=table)
    if not hasattr(client, "set_rows"):
        warnings.warn(
            f"{type(client).__qualname__} cannot write rows (no set_rows): table {table!r} "
            f"starts from its initializer, not from the weights of {path or 'the model'}",
            RuntimeWarning, stacklevel=4)
        return
    try:
        upload_rows(client, table, rows)
    except UnknownCommandError:  # shards older than SET_ROWS
        warnings.warn(
            f"the shards cannot write rows (no SET_ROWS): table {table!r} starts from its "
            f"initializer, not from the weights of {path or 'the model'}",
            RuntimeWarning, stacklevel=4)


def swap(model: Any, client: Any, *, optimizer: Any = None, initializer: Any = None,
         per_table: Mapping[str, Mapping[str, Any]] | None = None, id_mode: str = "index",
         prefix: str = "", seed: int | None = None, sync_push: bool = True,
         existing: str = "error", mode: Any = _UNSET) -> Any:
    """Replace the model's embedding layers by distributed ones; returns the model.

    The model's framework is found through ``xdl_detect_backend`` and its layers are
    replaced by the adapters registered for that framework (PyTorch: ``nn.Embedding``,
    ``nn.EmbeddingBag``). The layer at module path ``p`` looks up table ``prefix + p``
    (created here; every worker may call ``swap``). A layer shared at several paths
    becomes one distributed layer (its first path names the table). When the model
    itself is an embedding layer, the replacement is returned.

    **The swapped model is the same model**: right after ``swap`` it computes what it
    computed before. An index-mode table starts from the layer's current rows
    (uploaded in chunks); a hash-mode table creates rows on first use from
    ``initializer``, else the layer's own initializer, else the framework's default
    (PyTorch's ``nn.Embedding``: ``N(0, 1)``). What else held the replaced weight (an
    optimizer's param group, a regularizer's list) is rewired where possible, otherwise
    named in a warning.

    :param model: a model of a framework with a registered adapter.
    :param client: an ``xdl.Client``.
    :param optimizer: ``xdl.optim`` spec of every table (client default when None); its
        ``weight_decay`` is the server-side counterpart of an embedding L2 penalty.
    :param initializer: ``xdl.init`` spec of new rows (hash-mode tables; rows of an
        index-mode table are the layer's).
    :param per_table: per layer path, overrides: ``optimizer``, ``initializer``,
        ``seed``, ``name`` (table name), ``id_mode``.
    :param id_mode: ``"index"`` (ids are row numbers, checked against the layer's number
        of rows) or ``"hash"`` (ids are raw int64 feature hashes).
    :param prefix: prefix of every table name.
    :param seed: table seed (client default when None).
    :param sync_push: wait for a table's pushes before its next pull (exact equivalence
        with local training); prefetched batches skip the wait (an exact prefetch, the
        default, re-pulls the rows those pushes touched instead).
    :param existing: when an index-mode table already holds rows that differ from the
        layer's: ``"error"`` (default; use ``prefix=``), ``"keep"`` (train on from the
        table's rows: a second worker, a resumed job) or ``"overwrite"``. A hash-mode
        table that already holds rows is an error unless ``"keep"``.
    :param mode: deprecated name of ``id_mode``.
    """
    if mode is not _UNSET:
        warnings.warn("swap(mode=...) is deprecated; use id_mode=", DeprecationWarning,
                      stacklevel=2)
        id_mode = mode
    if existing not in EXISTING:
        raise InvalidArgumentError(f"existing must be one of {EXISTING}, got {existing!r}")
    defaults = {"optimizer": optimizer, "initializer": initializer, "seed": seed,
                "id_mode": id_mode}
    result = model
    for adapter in adapters_for(model):
        targets = [(path, layer) for path, layer in adapter.named_layers(model)
                   if adapter.handles(layer)]
        replaced: dict[int, Any] = {}
        left: list[str | LeftReference] = []
        for path, old in targets:
            new = replaced.get(id(old))
            if new is None:
                new = replaced[id(old)] = _distribute(adapter, client, path, old, defaults,
                                                      per_table, prefix, sync_push, existing)
                left += adapter.rewire(model, old, new, path)
            if not path:
                result = new
            else:
                adapter.replace(model, path, new)
        if left:
            warnings.warn("after xdl.swap these still reference replaced embedding weights, "
                          "which nothing updates any more: " + describe_left(left),
                          RuntimeWarning, stacklevel=2)
        if result is model:
            result = adapter.finish(model)
    return result


def _distribute(adapter: LayerAdapter, client: Any, path: str, old: Any,
                defaults: dict[str, Any], per_table: Mapping[str, Mapping[str, Any]] | None,
                prefix: str, sync_push: bool, existing: str) -> Any:
    spec = adapter.layer_spec(old, path)
    options = _options(path, defaults, per_table)
    table = table_name(path, prefix, per_table)
    mode = options.pop("id_mode", "index")
    if mode not in ID_MODES:
        raise InvalidArgumentError(f"id_mode must be one of {ID_MODES}, got {mode!r}",
                                   table=table)
    if mode == "hash":
        options.setdefault("initializer", spec.initializer or adapter.default_initializer)
        held = _table_rows(client, table)
        client.create_table(table, spec.dim, **options)
        if held and existing != "keep":
            raise XdlError(
                f"cannot swap {path or 'the model'}: hash-mode table {table!r} already holds "
                f"{held} rows (another model swapped onto this client with the same module "
                "paths?); pass prefix='<model name>.' to give this model its own tables, or "
                "existing='keep' to train on from them", table=table)
    else:
        client.create_table(table, spec.dim, **options)
        _start_rows(client, table, path, spec, adapter.layer_rows(old), existing)
    remote = RemoteTable(client, table, spec.dim, id_mode=mode,
                         num_rows=spec.num_rows if mode == "index" else None,
                         padding_idx=spec.padding_idx, sync_push=sync_push,
                         name=f"{path or 'model'} ({type(old).__name__})")
    return adapter.distribute(old, spec, remote)


def unswap(model: Any, client: Any = None) -> Any:
    """Put ordinary embedding layers back, holding the trained rows.

    Flushes and waits for outstanding pushes and stops prefetch threads first. Index-mode
    tables only (rows ``0 .. num_rows-1`` are pulled in chunks); a hash-mode table
    raises. Returns the model (or the replacement, when the model itself was swapped).

    :param client: unused (each distributed layer knows its client); kept for calls
        written as ``unswap(model, client)``.
    """
    result = model
    for adapter in adapters_for(model):
        targets = [(path, layer) for path, layer in adapter.named_layers(model)
                   if isinstance(layer, adapter.distributed_types())]
        restored: dict[int, Any] = {}
        for path, layer in targets:
            new = restored.get(id(layer))
            if new is None:
                new = restored[id(layer)] = _export(adapter, path, layer)
            if not path:
                result = new
            else:
                adapter.replace(model, path, new)
        if result is model:
            result = adapter.finish(model)
    return result


def _export(adapter: LayerAdapter, path: str, layer: Any) -> Any:
    remote = adapter.remote_of(layer)
    remote.close()
    if remote.id_mode != "index" or remote.num_rows is None:
        raise XdlError(
            f"cannot unswap {path or 'the model'}: table {remote.table!r} is in hash mode, so "
            "it has no row range to export; pull the ids you need with client.pull(table, ids)",
            table=remote.table)
    rows = export_rows(remote.client, remote.table, remote.num_rows)
    if remote.padding_idx is not None:
        rows[remote.padding_idx] = 0.0  # as the framework's layer, and the distributed lookup
    return adapter.restore(layer, rows)


__all__ = [
    "CHUNK_ROWS",
    "LayerAdapter",
    "LayerSpec",
    "LeftReference",
    "adapters_for",
    "export_rows",
    "swap",
    "table_name",
    "unswap",
    "upload_rows",
]
