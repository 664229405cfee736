"""An in-memory stand-in for ``xdl.Client`` (sparse tables and dense variables).

Same methods as the real client, numpy SGD / Adagrad (torch semantics) updates, rows in
a dict. Initial rows come from ``xdl.init.generate`` (the rows the server would create).
Pushes apply at once; tickets are plain counters.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

import xdl


class FakeTable:
    """One sparse table: rows and Adagrad accumulators by id."""

    def __init__(self, dim: int, initializer: Any, optimizer: Any, seed: int) -> None:
        self.dim, self.initializer, self.optimizer, self.seed = dim, initializer, optimizer, seed
        self.rows: dict[int, np.ndarray] = {}
        self.accum: dict[int, np.ndarray] = {}

    def get(self, ids: np.ndarray) -> np.ndarray:
        missing = [int(i) for i in ids if int(i) not in self.rows]
        if missing:
            init = xdl.init.generate(self.initializer, self.seed,
                                     np.asarray(missing, dtype=np.int64), self.dim)
            for key, row in zip(missing, init, strict=True):
                self.rows[key] = row.astype(np.float32)
        return np.stack([self.rows[int(i)] for i in ids]) if len(ids) else np.zeros(
            (0, self.dim), np.float32)


def apply_update(optimizer: Any, value: np.ndarray, grad: np.ndarray,
                 accum: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One SGD or Adagrad (torch semantics) step on float32 arrays."""
    if optimizer.kind == "sgd":
        return (value - np.float32(optimizer.lr) * grad).astype(np.float32), accum
    if optimizer.kind == "adagrad":
        acc = (np.full_like(value, optimizer.initial_accumulator) if accum is None else accum)
        acc = (acc + grad * grad).astype(np.float32)
        std = np.sqrt(acc) + np.float32(optimizer.eps)
        return (value - np.float32(optimizer.lr) * (grad / std)).astype(np.float32), acc
    raise NotImplementedError(f"FakeClient has no optimizer {optimizer.kind!r}")


class FakeClient:
    """In-memory ``xdl.Client`` look-alike; thread-safe (one lock, as the real one)."""

    def __init__(self) -> None:
        self.tables: dict[str, FakeTable] = {}
        self.dense: dict[str, dict[str, Any]] = {}
        self.pulls: list[tuple[str, np.ndarray]] = []
        self.pushes: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._tickets = 0
        self._dense_seen: dict[str, int] = {}

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release."""

    def create_table(self, name: str, dim: int, *, initializer: Any = None,
                     optimizer: Any = None, seed: int = 0) -> None:
        with self._lock:
            if name not in self.tables:
                self.tables[name] = FakeTable(dim, initializer or xdl.init.Zeros(),
                                              optimizer or xdl.optim.SGD(lr=0.01), seed)

    def describe_table(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.tables:
                raise xdl.errors.TableNotFoundError(f"no table {name!r}", table=name)
            table = self.tables[name]
            return {"dim": table.dim, "rows": len(table.rows), "seed": table.seed}

    def set_rows(self, name: str, ids: Any, rows: Any) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        rows = np.asarray(rows, dtype=np.float32)
        with self._lock:
            table = self.tables[name]
            assert rows.shape == (len(ids), table.dim), rows.shape
            table.rows.update(zip(ids.tolist(), rows.copy(), strict=True))
            for key in ids.tolist():
                table.accum.pop(key, None)
            self._tickets += 1
            return self._tickets

    def pull(self, name: str, ids: Any, *, unique: bool = False) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if unique:
            assert len(np.unique(ids)) == len(ids), "pull(unique=True) ids must be unique"
        with self._lock:
            self.pulls.append((name, ids.copy()))
            keys, inverse = np.unique(ids, return_inverse=True)
            return self.tables[name].get(keys)[inverse.reshape(-1)]

    def push(self, name: str, ids: Any, grads: Any, *, unique: bool = False) -> int:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        assert len(np.unique(ids)) == len(ids), "push ids must be unique"
        assert grads.shape == (len(ids), self.tables[name].dim), grads.shape
        with self._lock:
            self.pushes.append((name, ids.copy(), grads.copy()))
            table = self.tables[name]
            table.get(ids)
            for key, g in zip(ids.tolist(), grads, strict=True):
                table.rows[key], acc = apply_update(table.optimizer, table.rows[key], g,
                                                    table.accum.get(key))
                if acc is not None:
                    table.accum[key] = acc
            self._tickets += 1
            return self._tickets

    def wait(self, ticket: Any = None) -> None:
        """Pushes apply at once; nothing to wait for."""

    def create_dense(self, name: str, shape: Sequence[int], *, optimizer: Any = None,
                     initial: np.ndarray | None = None, sync_workers: int = 0) -> None:
        with self._lock:
            if name not in self.dense:
                value = (np.zeros(shape, np.float32) if initial is None
                         else np.array(initial, np.float32).reshape(shape))
                self.dense[name] = {"value": value, "accum": None, "version": 0,
                                    "optimizer": optimizer or xdl.optim.SGD(lr=0.01),
                                    "sync": sync_workers, "pending": []}

    def dense_pull(self, name: str, *, min_version: int | None = None) -> np.ndarray:
        with self._changed:
            var = self.dense[name]
            if not self._changed.wait_for(lambda: var["version"] >= (min_version or 0), 10):
                raise TimeoutError(f"dense {name} never reached version {min_version}")
            self._dense_seen[name] = var["version"]
            return var["value"].copy()

    def dense_version(self, name: str) -> int:
        return self._dense_seen.get(name, 0)

    def dense_push(self, name: str, grad: Any, *, step: int | None = None) -> int:
        with self._changed:
            var = self.dense[name]
            var["pending"].append(np.asarray(grad, np.float32))
            if len(var["pending"]) >= max(var["sync"], 1):
                g = np.mean(var["pending"], axis=0).astype(np.float32)
                var["pending"] = []
                var["value"], var["accum"] = apply_update(var["optimizer"], var["value"], g,
                                                          var["accum"])
                var["version"] += 1
                self._changed.notify_all()
            self._tickets += 1
            return self._tickets
