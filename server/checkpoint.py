"""The shard's half of checkpoints: write this shard's part, read the part it owns.

Tables, with their slots and metadata, dense variables and the exactly-once records
are written per bucket range, so a checkpoint taken on N shards loads onto M shards.
The folder layout, the manifest and ``LATEST`` are shared with the client and live in
the core (:mod:`xdl.ckpt_layout`).

Rows in a part are sorted by bucket; ``offsets[b - lo]`` is where bucket ``b`` starts,
so a shard reads exactly its own buckets' slice of every overlapping part. Arrays are
``.npy`` files written and read with ``allow_pickle=False``. Every name read from a
manifest is checked like a name on the wire and every path stays inside the
checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from xdl import optim as xoptim
from xdl import protocol as P
from xdl.ckpt_layout import (
    FORMAT_VERSION,
    disk_error,
    inside,
    read_manifest,
    resolve,
    sha256,
    write_json,
)
from xdl.errors import CheckpointError, XdlError
from xdl.sharding import bucket_of, dense_shard

from .exactly_once import ClientRecord
from .state import ShardState
from .table import DenseVariable, SparseTable
from .table_commands import MAX_TABLE_DIM as MAX_DIM

__all__ = ["save_shard", "load_shard", "Staged", "stage", "swap_in", "resolve"]

log = logging.getLogger("xdl.server")


def _write_npy(path: str, arr: np.ndarray) -> None:
    try:
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise disk_error(exc, path) from None


def _field_file(field: str) -> str:
    return field.replace(":", "-")


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, path) from None


@dataclass
class Staged:
    """A checkpoint read and verified by one shard, not yet swapped in."""

    path: str
    tables: dict[str, SparseTable]
    dense: dict[str, DenseVariable]
    clients: dict[str, ClientRecord]


def save_shard(state: ShardState, path: str) -> dict[str, dict[str, Any]]:
    """Write this shard's part of a checkpoint into the existing folder ``path``.

    Returns ``{relpath: {"sha256": ..., "bytes": ...}}`` of every file written
    (relpaths use ``/``).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist on shard {state.shard}'s "
                              "host; shards and client must share the file system")
    written: list[str] = []
    k = state.shard
    lo, hi = state.bucket_range
    for name, table in state.tables.items():
        _makedirs(os.path.join(path, "tables", name))
        arrays = table.export()
        buckets = bucket_of(arrays["keys"])
        order = np.argsort(buckets, kind="stable")
        offsets = np.searchsorted(buckets[order], np.arange(lo, hi + 1)).astype(np.int64)
        fields = []
        for field, arr in arrays.items():
            rel = f"tables/{name}/part-{k}.{_field_file(field)}.npy"
            _write_npy(os.path.join(path, rel), arr[order])
            written.append(rel)
            fields.append(field)
        rel = f"tables/{name}/part-{k}.offsets.npy"
        _write_npy(os.path.join(path, rel), offsets)
        written.append(rel)
        rel = f"tables/{name}/part-{k}.json"
        write_json(os.path.join(path, rel), {
            "format": FORMAT_VERSION, "spec": table.spec_dict(), "step": table.step,
            "range": [lo, hi], "rows": len(table), "fields": fields})
        written.append(rel)
        log.info("checkpoint %s: table %s, %d rows written", path, name, len(table))
    for name, var in state.dense.items():
        _makedirs(os.path.join(path, "dense"))
        fields = []
        for field, arr in var.export().items():
            rel = f"dense/{name}.{_field_file(field)}.npy"
            _write_npy(os.path.join(path, rel), arr)
            written.append(rel)
            fields.append(field)
        rel = f"dense/{name}.json"
        write_json(os.path.join(path, rel), {
            "format": FORMAT_VERSION, "describe": var.describe(), "version": var.version,
            "shape": list(var.shape), "fields": fields})
        written.append(rel)
    _makedirs(os.path.join(path, "clients"))
    rel = f"clients/part-{k}.json"
    write_json(os.path.join(path, rel),
               {cid: r.to_json() for cid, r in state.clients.items()})
    written.append(rel)
    return {rel: {"sha256": sha256(os.path.join(path, rel)),
                  "bytes": os.path.getsize(os.path.join(path, rel))} for rel in written}


class _Verifier:
    """Reads checkpoint files, checking each against the manifest's checksum once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        self.files: dict[str, dict[str, Any]] = self.manifest["files"]

    def _check(self, rel: str) -> str:
        full = inside(self.path, rel)
        want = self.files.get(rel)
        if want is None:
            raise CheckpointError(f"{full} is not listed in the manifest")
        if not os.path.isfile(full):
            raise CheckpointError(f"{full} is missing")
        got = sha256(full)
        if got != want["sha256"]:
            raise CheckpointError(f"{full}: checksum {got[:16]}... does not match the "
                                  f"manifest's {want['sha256'][:16]}...; the checkpoint is "
                                  "corrupt")
        return full

    def json(self, rel: str) -> Any:
        full = self._check(rel)
        try:
            with open(full, "rb") as f:
                return json.loads(f.read())
        except ValueError as exc:
            raise CheckpointError(f"{full} is not valid JSON: {exc}") from None

    def npy(self, rel: str) -> np.ndarray:
        full = self._check(rel)
        try:
            return np.load(full, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{full} is not a readable .npy array: {exc}") from None


def load_shard(state: ShardState, path: str) -> tuple[
        dict[str, SparseTable], dict[str, DenseVariable], dict[str, ClientRecord]]:
    """Read the part of checkpoint ``path`` that belongs to ``state``'s shard.

    Works for a checkpoint of any source shard count. Returns new tables, dense
    variables and client records; the shard's current state is untouched, so a failed
    load changes nothing.

    :raises CheckpointError: a file is missing, corrupt or inconsistent with the manifest.
    """
    try:
        return _load(state, path)
    except XdlError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({type(exc).__name__}: {exc}); "
                              "it was damaged or not written by xdl") from None


def _load(state: ShardState, path: str) -> tuple[
        dict[str, SparseTable], dict[str, DenseVariable], dict[str, ClientRecord]]:
    v = _Verifier(path)
    lo, hi = state.bucket_range
    tables: dict[str, SparseTable] = {}
    for name, parts in v.manifest["tables"].items():
        table: SparseTable | None = None
        for part in parts:
            k, (plo, phi) = part["shard"], part["range"]
            a, b = max(lo, plo), min(hi, phi)
            meta = v.json(f"tables/{name}/part-{k}.json")
            if table is None:
                dim = meta["spec"]["dim"]
                if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_DIM:
                    raise CheckpointError(f"{path}: table {name!r} has dim {dim!r}; at most "
                                          f"{MAX_DIM}")
                table = SparseTable.from_spec_dict(meta["spec"])
                if table.name != name:
                    raise CheckpointError(f"{path}: part {k} of table {name!r} names table "
                                          f"{table.name!r}")
            table.step = max(table.step, int(meta["step"]))
            if a >= b:
                continue
            offsets = v.npy(f"tables/{name}/part-{k}.offsets.npy")
            if offsets.shape != (phi - plo + 1,):
                raise CheckpointError(f"{path}: offsets of table {name!r} part {k} have shape "
                                      f"{list(offsets.shape)}, expected [{phi - plo + 1}]")
            s, e = int(offsets[a - plo]), int(offsets[b - plo])
            if e <= s:
                continue
            rows = {f: np.array(v.npy(f"tables/{name}/part-{k}.{_field_file(f)}.npy")[s:e])
                    for f in meta["fields"]}
            table.import_rows(rows)
        if table is not None:
            tables[name] = table
            log.info("checkpoint %s: table %s, %d rows read", path, name, len(table))
    dense: dict[str, DenseVariable] = {}
    for name in v.manifest["dense"]:
        if dense_shard(name, state.num_shards) != state.shard:
            continue
        meta = v.json(f"dense/{name}.json")
        shape = meta["shape"]
        if (not isinstance(shape, list) or not 0 < len(shape) <= P.MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= P.MAX_DIM
                           for d in shape)
                or math.prod(shape) * 4 > state.max_request_bytes):
            raise CheckpointError(f"{path}: dense variable {name!r} has shape {shape!r:.80}, "
                                  "which this shard cannot hold")
        var = DenseVariable(name, tuple(meta["shape"]),
                            xoptim.from_dict(meta["describe"]["optimizer"]), None)
        var.import_arrays({f: np.array(v.npy(f"dense/{name}.{_field_file(f)}.npy"))
                           for f in meta["fields"]})
        var.version = int(meta["version"])
        dense[name] = var
    clients: dict[str, ClientRecord] = {}
    for k in range(v.manifest["num_shards"]):
        records = v.json(f"clients/part-{k}.json")
        if not isinstance(records, dict):
            raise CheckpointError(f"{path}: clients/part-{k}.json is not a map")
        for cid, data in records.items():
            rec = ClientRecord.from_json(data)
            old = clients.get(cid)
            if old is None or rec.newer(old):
                clients[cid] = rec
    return tables, dense, clients


def stage(state: ShardState, path: str) -> Staged:
    """Read and verify this shard's part of ``path`` without touching live state."""
    tables, dense, clients = load_shard(state, path)
    return Staged(path, tables, dense, clients)


def swap_in(state: ShardState, staged: Staged) -> None:
    """Replace ``state``'s tables, dense variables and client records by ``staged``."""
    state.refuse_parked("was cut short by a checkpoint load")
    state.tables, state.dense, state.clients = staged.tables, staged.dense, staged.clients
    state.sync = {}
