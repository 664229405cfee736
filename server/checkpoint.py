"""Checkpoints: every table with its slots and metadata, dense variables, and the
exactly-once high-water marks, written per bucket range so that a checkpoint taken
on N shards loads onto M shards.

Layout of one checkpoint folder (``<root>/ckpt-<n>/``)::

    manifest.json                        written last, by the client: shards, ranges, checksums
    tables/<table>/part-<k>.json         table settings, step, bucket range, row count
    tables/<table>/part-<k>.<field>.npy  keys, values, slot:<name>, freq, last_step, offsets
    dense/<name>.json, dense/<name>.<field>.npy
    clients/part-<k>.json                {client id: [incarnation, highest applied seq]}

Rows in a part are sorted by bucket; ``offsets[b - lo]`` is where bucket ``b`` starts,
so a shard reads exactly its own buckets' slice of every overlapping part. Arrays are
``.npy`` files written and read with ``allow_pickle=False``.

Atomicity (the client's side, :func:`begin` / :func:`commit`): shards write into
``<root>/ckpt-<n>.tmp``; the client writes ``manifest.json``, renames the folder to
``ckpt-<n>`` and then replaces ``<root>/LATEST``. A crash at any point leaves the
previous checkpoint and ``LATEST`` intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from xdl.errors import CheckpointError
from xdl.sharding import bucket_of, dense_shard

if TYPE_CHECKING:
    from .shard import ClientRecord, Shard
    from .table import DenseVariable, SparseTable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
_CKPT = re.compile(r"^ckpt-(\d+)$")
log = logging.getLogger("xdl.server")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _write_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _field_file(field: str) -> str:
    return field.replace(":", "-")


# ------------------------------------------------------------------- shard side
def save_shard(shard: Shard, path: str) -> dict[str, dict[str, Any]]:
    """Write this shard's part of a checkpoint into ``path``.

    Returns ``{relpath: {"sha256": ..., "bytes": ...}}`` of every file written.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist on shard {shard.shard}'s "
                              "host; shards and client must share the file system")
    written: list[str] = []
    k = shard.shard
    lo, hi = shard.bucket_range
    for name, table in shard.tables.items():
        tdir = os.path.join(path, "tables", name)
        os.makedirs(tdir, exist_ok=True)
        arrays = table.export()
        buckets = bucket_of(arrays["keys"])
        order = np.argsort(buckets, kind="stable")
        offsets = np.searchsorted(buckets[order], np.arange(lo, hi + 1)).astype(np.int64)
        fields = []
        for field, arr in arrays.items():
            rel = os.path.join("tables", name, f"part-{k}.{_field_file(field)}.npy")
            _write_npy(os.path.join(path, rel), arr[order])
            written.append(rel)
            fields.append(field)
        rel = os.path.join("tables", name, f"part-{k}.offsets.npy")
        _write_npy(os.path.join(path, rel), offsets)
        written.append(rel)
        rel = os.path.join("tables", name, f"part-{k}.json")
        _write_json(os.path.join(path, rel), {
            "format": FORMAT_VERSION, "spec": table.spec_dict(), "step": table.step,
            "range": [lo, hi], "rows": len(table), "fields": fields})
        written.append(rel)
        log.info("checkpoint %s: table %s, %d rows written", path, name, len(table))
    for name, var in shard.dense.items():
        ddir = os.path.join(path, "dense")
        os.makedirs(ddir, exist_ok=True)
        fields = []
        for field, arr in var.export().items():
            rel = os.path.join("dense", f"{name}.{_field_file(field)}.npy")
            _write_npy(os.path.join(path, rel), arr)
            written.append(rel)
            fields.append(field)
        rel = os.path.join("dense", f"{name}.json")
        _write_json(os.path.join(path, rel), {
            "format": FORMAT_VERSION, "describe": var.describe(), "version": var.version,
            "shape": list(var.shape), "fields": fields})
        written.append(rel)
    os.makedirs(os.path.join(path, "clients"), exist_ok=True)
    rel = os.path.join("clients", f"part-{k}.json")
    _write_json(os.path.join(path, rel),
                {cid: [r.incarnation, r.hwm] for cid, r in shard.clients.items()})
    written.append(rel)
    return {rel: {"sha256": _sha256(os.path.join(path, rel)),
                  "bytes": os.path.getsize(os.path.join(path, rel))} for rel in written}


class _Verifier:
    """Reads checkpoint files, checking each against the manifest's checksum once."""

    def __init__(self, path: str) -> None:
        self.path = path
        mpath = os.path.join(path, MANIFEST)
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {mpath}: {exc}") from None
        if self.manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{mpath}: format {self.manifest.get('format')!r} not "
                                  f"supported (expected {FORMAT_VERSION})")
        self.files: dict[str, dict[str, Any]] = self.manifest["files"]

    def _check(self, rel: str) -> str:
        full = os.path.join(self.path, rel)
        want = self.files.get(rel)
        if want is None:
            raise CheckpointError(f"{full} is not listed in the manifest")
        if not os.path.exists(full):
            raise CheckpointError(f"{full} is missing")
        got = _sha256(full)
        if got != want["sha256"]:
            raise CheckpointError(f"{full}: checksum {got[:16]}... does not match the "
                                  f"manifest's {want['sha256'][:16]}...; the checkpoint is "
                                  "corrupt")
        return full

    def json(self, rel: str) -> Any:
        with open(self._check(rel)) as f:
            return json.load(f)

    def npy(self, rel: str) -> np.ndarray:
        return np.load(self._check(rel), allow_pickle=False, mmap_mode="r")


def load_shard(shard: Shard, path: str) -> tuple[
        dict[str, SparseTable], dict[str, DenseVariable], dict[str, ClientRecord]]:
    """Read the part of checkpoint ``path`` that belongs to ``shard`` (any source shard count).

    Returns new tables, dense variables and client records; the shard's current state
    is untouched, so a failed load changes nothing.
    """
    from .shard import ClientRecord
    from .table import DenseVariable, SparseTable

    v = _Verifier(path)
    lo, hi = shard.bucket_range
    tables: dict[str, SparseTable] = {}
    for name, parts in v.manifest["tables"].items():
        table: SparseTable | None = None
        for part in parts:
            k, (plo, phi) = part["shard"], part["range"]
            a, b = max(lo, plo), min(hi, phi)
            meta = v.json(os.path.join("tables", name, f"part-{k}.json"))
            if table is None:
                table = SparseTable.from_spec_dict(meta["spec"])
                table.step = max(table.step, int(meta["step"]))
            table.step = max(table.step, int(meta["step"]))
            if a >= b:
                continue
            offsets = v.npy(os.path.join("tables", name, f"part-{k}.offsets.npy"))
            s, e = int(offsets[a - plo]), int(offsets[b - plo])
            if e <= s:
                continue
            rows = {f: np.array(v.npy(os.path.join("tables", name,
                                                   f"part-{k}.{_field_file(f)}.npy"))[s:e])
                    for f in meta["fields"]}
            table.import_rows(rows)
        if table is not None:
            tables[name] = table
            log.info("checkpoint %s: table %s, %d rows read", path, name, len(table))
    dense: dict[str, DenseVariable] = {}
    for name in v.manifest.get("dense", []):
        if dense_shard(name, shard.num_shards) != shard.shard:
            continue
        meta = v.json(os.path.join("dense", f"{name}.json"))
        from xdl import optim as xoptim

        var = DenseVariable(name, tuple(meta["shape"]),
                            xoptim.from_dict(meta["describe"]["optimizer"]), None)
        var.import_arrays({f: np.array(v.npy(os.path.join("dense", f"{name}.{_field_file(f)}.npy")))
                           for f in meta["fields"]})
        var.version = int(meta["version"])
        dense[name] = var
    clients: dict[str, ClientRecord] = {}
    for k in range(v.manifest["num_shards"]):
        for cid, (inc, hwm) in v.json(os.path.join("clients", f"part-{k}.json")).items():
            rec = clients.get(cid)
            if rec is None or (inc, hwm) > (rec.incarnation, rec.hwm):
                clients[cid] = ClientRecord(incarnation=inc, hwm=hwm)
    return tables, dense, clients


# ------------------------------------------------------------------- client side
def resolve(path: str) -> str:
    """The checkpoint folder named by ``path``: itself if it holds a manifest, else ``LATEST``."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return os.path.abspath(path)
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        full = os.path.join(path, name)
        if os.path.exists(os.path.join(full, MANIFEST)):
            return os.path.abspath(full)
        raise CheckpointError(f"{latest} names {name!r}, which has no {MANIFEST}")
    raise CheckpointError(f"no checkpoint at {path}: neither {MANIFEST} nor {LATEST} found")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _CKPT.match(n))
             and os.path.exists(os.path.join(root, n, MANIFEST))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def begin(root: str) -> str:
    """Create the temporary folder of the next checkpoint under ``root``; return its path."""
    os.makedirs(root, exist_ok=True)
    for n in os.listdir(root):  # leftovers of a crashed save
        if n.endswith(".tmp") and _CKPT.match(n[:-4]):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    nums = [int(m.group(1)) for n in os.listdir(root) if (m := _CKPT.match(n))]
    tmp = os.path.join(root, f"ckpt-{max(nums, default=0) + 1:06d}.tmp")
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, num_shards: int, ranges: list[tuple[int, int]],
           replies: list[dict[str, Any]], keep: int | None = None) -> str:
    """Write the manifest, publish ``tmp`` as a checkpoint and point ``LATEST`` at it."""
    files: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    dense: list[str] = []
    for k, reply in enumerate(replies):
        for rel, info in reply["files"].items():
            files[rel] = {**info, "shard": k}
            parts = rel.split(os.sep)
            if parts[0] == "tables" and parts[2] == f"part-{k}.json":
                tables.setdefault(parts[1], []).append({"shard": k, "range": list(ranges[k])})
            elif parts[0] == "dense" and parts[1].endswith(".json"):
                dense.append(parts[1][:-5])
    _write_json(os.path.join(tmp, MANIFEST), {
        "format": FORMAT_VERSION, "created": time.time(), "num_shards": num_shards,
        "ranges": [list(r) for r in ranges], "tables": tables, "dense": sorted(dense),
        "files": files})
    final = tmp[:-4]
    os.replace(tmp, final)
    root = os.path.dirname(final)
    _write_bytes(os.path.join(root, LATEST), os.path.basename(final).encode())
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final
