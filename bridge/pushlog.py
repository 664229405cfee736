"""The client's push log: which ids each recent push touched, per table.

Exact prefetch (:mod:`xdl.adapters.torch_modules`, the lookup core) pulls rows ahead of
time and must re-pull exactly those a later push changed. It takes a mark
(:meth:`PushLog.mark`) when it pulls and asks later which ids were pushed since
(:meth:`PushLog.since`). The log keeps the last ``length`` pushes per table; asked
about older ones it answers None ("treat every id as pushed").

Recording never sorts: a push made with ``unique=True`` logs its (private, read-only)
ids as they are, and :meth:`PushLog.since` sorts only when someone asks.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

#: pushes remembered per table
PUSH_LOG_LENGTH = 64


class PushLog:
    """Per-table log of the ids of the last ``length`` pushes.

    The log has its own lock, apart from the transport's: a mark or a look-up never
    waits for a request in flight (a prefetch thread's pull, say). A push is recorded
    after it is on the sockets, so a mark that counts it was taken after it was sent.

    :param length: pushes remembered per table.
    """

    def __init__(self, length: int = PUSH_LOG_LENGTH) -> None:
        self.length = int(length)
        self.lock = threading.Lock()
        self._count: dict[str, int] = {}
        self._log: dict[str, deque[tuple[int, np.ndarray, bool]]] = {}

    def record(self, table: str, ids: np.ndarray, is_sorted: bool) -> None:
        """Log a push of ``ids`` to ``table``; call it once the push is on the sockets.

        :param ids: int64 ids the push touched, unique; the log keeps (and freezes) them,
            so they must not be the caller's.
        :param is_sorted: whether ``ids`` is sorted (saves a sort in :meth:`since`).
        """
        ids.flags.writeable = False
        with self.lock:
            count = self._count.get(table, 0) + 1
            self._count[table] = count
            entries = self._log.get(table)
            if entries is None:
                entries = self._log[table] = deque(maxlen=self.length)
            entries.append((count, ids, is_sorted))

    def forget(self, table: str | None = None) -> None:
        """Void every mark of ``table`` (default: of every table): rows changed otherwise."""
        with self.lock:
            for name in [table] if table is not None else list(self._count):
                if name in self._count:
                    self._count[name] += 1
                    self._log[name].clear()

    def mark(self, table: str) -> int:
        """Number of pushes to ``table`` recorded so far."""
        with self.lock:
            return self._count.get(table, 0)

    def since(self, table: str, mark: int) -> np.ndarray | None:
        """Sorted unique ids pushed to ``table`` after :meth:`mark` returned ``mark``.

        An empty int64 array when nothing was pushed since; None when the log no longer
        reaches back to ``mark``. The array may be read-only.
        """
        with self.lock:
            count = self._count.get(table, 0)
            if count <= mark:
                return np.empty(0, dtype=np.int64)
            entries = self._log[table]
            if not entries or entries[0][0] > mark + 1:
                return None
            parts = [(ids, ok) for seq, ids, ok in entries if seq > mark]
        if len(parts) == 1 and parts[0][1]:
            return parts[0][0]
        return np.unique(np.concatenate([ids for ids, _ in parts]))
