"""The checkpoint layout that shards and clients share: folder names, manifest, ``LATEST``.

Layout of one checkpoint folder (``<root>/ckpt-<n>/``)::

    manifest.json                        written last, by the client: shards, ranges, checksums
    tables/<table>/part-<k>.json         table settings, step, bucket range, row count
    tables/<table>/part-<k>.<field>.npy  keys, values, slot-<name>, freq, last_step, offsets
    dense/<name>.json, dense/<name>.<field>.npy
    clients/part-<k>.json                {client id: [incarnation, highest applied seq]}

Atomicity (the client's side, :func:`begin` / :func:`commit`): shards write into
``<root>/ckpt-<n>.tmp``; the client writes ``manifest.json``, renames the folder to
``ckpt-<n>`` and then replaces ``<root>/LATEST``. A crash at any point leaves the
previous checkpoint and ``LATEST`` intact.

This module is the core's half of checkpointing (the shard's half, reading and
writing a shard's part, is :mod:`xdl.server.checkpoint`); it imports nothing of the
server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any

from .errors import CheckpointError, DiskFullError, InvalidArgumentError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
CKPT_NAME = re.compile(r"ckpt-(\d+)")

#: Table and dense-variable names: they become folder and file names in a checkpoint.
NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def check_name(name: Any, what: str = "table") -> str:
    """Return ``name`` if it matches :data:`NAME_RULE` exactly, else raise.

    The whole string must match (``re.fullmatch``: no trailing newline), so a name
    is always one plain path component and never ``.`` or ``..``.

    :param name: the name to check (any type: wire and manifest input).
    :param what: what the name is, for the message (``"table"``, ``"dense variable"``).
    :raises InvalidArgumentError: when it is not a str or does not match.
    """
    if not isinstance(name, str) or NAME_RULE.fullmatch(name) is None or name in (".", ".."):
        shown = name if isinstance(name, str) else type(name).__name__
        raise InvalidArgumentError(
            f"{what} name {shown!r} is invalid: use 1-128 characters from [A-Za-z0-9_.-], "
            "not starting with '.' or '-'")
    return name


def inside(root: str, rel: str) -> str:
    """``root/rel`` resolved, checked to stay inside ``root`` (symlinks followed).

    :raises CheckpointError: when ``rel`` is absolute or escapes ``root``.
    """
    base = os.path.realpath(root)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.isabs(rel) or (full != base and not full.startswith(base + os.sep)):
        raise CheckpointError(f"path {rel!r} leaves the checkpoint folder {base}")
    return full


def sha256(path: str) -> str:
    """Hex SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def disk_error(exc: OSError, path: str) -> CheckpointError:
    """The xdl error for an ``OSError`` met while writing ``path`` (disk full says so)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device while writing {path}: free space "
                             "or choose another checkpoint root; nothing was published")
    if isinstance(exc, FileExistsError) or exc.errno == errno.EEXIST:
        return CheckpointError(f"{path} exists and is not a checkpoint folder: remove it or "
                               "choose another path")
    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ENOTDIR:
        return CheckpointError(f"a part of {path} is a file, not a folder: choose another path")
    return CheckpointError(f"cannot write {path}: {exc.strerror or exc}")


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise disk_error(exc, path) from None


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def resolve(path: str) -> str:
    """The checkpoint folder named by ``path``: itself if it holds a manifest, else ``LATEST``."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return os.path.abspath(path)
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        if CKPT_NAME.fullmatch(name) is None:
            raise CheckpointError(f"{latest} names {name!r}, which is not a checkpoint folder "
                                  "name (ckpt-<n>)")
        full = os.path.join(path, name)
        if os.path.exists(os.path.join(full, MANIFEST)):
            return os.path.abspath(full)
        raise CheckpointError(f"{latest} names {name!r}, which has no {MANIFEST}")
    raise CheckpointError(f"no checkpoint at {path}: neither {MANIFEST} nor {LATEST} found")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := CKPT_NAME.fullmatch(n))
             and os.path.exists(os.path.join(root, n, MANIFEST))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def begin(root: str) -> str:
    """Create the temporary folder of the next checkpoint under ``root``; return its path.

    :raises CheckpointError: ``root`` is a file, or cannot be created (disk full, rights).
    """
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"checkpoint root {root} is a file, not a folder: choose "
                              "another path")
    try:
        os.makedirs(root, exist_ok=True)
        for n in os.listdir(root):  # leftovers of a crashed save
            if n.endswith(".tmp") and CKPT_NAME.fullmatch(n[:-4]):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        nums = [int(m.group(1)) for n in os.listdir(root) if (m := CKPT_NAME.fullmatch(n))]
        tmp = os.path.join(root, f"ckpt-{max(nums, default=0) + 1:06d}.tmp")
        os.makedirs(tmp)
    except OSError as exc:
        raise disk_error(exc, root) from None
    return tmp


def manifest(num_shards: int, ranges: list[tuple[int, int]],
             replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a checkpoint from every shard's ``SAVE`` reply (in shard order)."""
    files: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[dict[str, Any]]] = {}
    dense: list[str] = []
    for k, reply in enumerate(replies):
        for rel, info in reply["files"].items():
            files[rel] = {**info, "shard": k}
            parts = rel.split("/")
            if parts[0] == "tables" and len(parts) == 3 and parts[2] == f"part-{k}.json":
                tables.setdefault(parts[1], []).append({"shard": k, "range": list(ranges[k])})
            elif parts[0] == "dense" and len(parts) == 2 and parts[1].endswith(".json"):
                dense.append(parts[1][:-5])
    return {"format": FORMAT_VERSION, "created": time.time(), "num_shards": num_shards,
            "ranges": [list(r) for r in ranges], "tables": tables, "dense": sorted(dense),
            "files": files}


def commit(tmp: str, num_shards: int, ranges: list[tuple[int, int]],
           replies: list[dict[str, Any]], keep: int | None = None) -> str:
    """Write the manifest, publish ``tmp`` as a checkpoint and point ``LATEST`` at it."""
    write_json(os.path.join(tmp, MANIFEST), manifest(num_shards, ranges, replies))
    final = tmp[:-4]
    try:
        os.replace(tmp, final)
    except OSError as exc:
        raise disk_error(exc, final) from None
    root = os.path.dirname(final)
    write_bytes(os.path.join(root, LATEST), os.path.basename(final).encode())
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if keep is not None and keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: str) -> dict[str, Any]:
    """Read and check the manifest of checkpoint folder ``path``.

    Every table and dense name is checked with :func:`check_name`, every listed file
    must stay inside ``path``, and the fields a load reads must be there with the
    right types.

    :raises CheckpointError: naming the file and what is wrong with it.
    """
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            m = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {mpath}: {exc}") from None

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{mpath}: {what}; the manifest is damaged or was not written "
                               "by xdl")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: format {m.get('format')!r} not supported (expected "
                              f"{FORMAT_VERSION})")
    for key, typ in (("files", dict), ("tables", dict), ("dense", list), ("num_shards", int),
                     ("ranges", list)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise bad(f"field {key!r} is missing or not a {typ.__name__}")
    if not 1 <= m["num_shards"] <= 1 << 16:
        raise bad(f"num_shards {m['num_shards']!r} out of range")
    try:
        for name, parts in m["tables"].items():
            check_name(name, "table")
            if not isinstance(parts, list):
                raise bad(f"table {name!r}: parts must be a list")
            for part in parts:
                k, rng = part["shard"], part["range"]
                if (not isinstance(k, int) or not 0 <= k < m["num_shards"]
                        or not isinstance(rng, list) or len(rng) != 2
                        or not all(isinstance(x, int) for x in rng)
                        or not 0 <= rng[0] <= rng[1] <= 1 << 16):
                    raise bad(f"table {name!r}: bad part {part!r}")
        for name in m["dense"]:
            check_name(name, "dense variable")
    except InvalidArgumentError as exc:
        raise bad(exc.message) from None
    except (TypeError, KeyError):
        raise bad("a table part lacks 'shard' or 'range'") from None
    for rel, info in m["files"].items():
        inside(path, rel)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise bad(f"file entry {rel!r} lacks its sha256")
    return m
