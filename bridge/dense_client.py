"""The client's dense-variable calls: :class:`DenseVariableCalls`.

A dense variable lives whole on one shard (:func:`xdl.sharding.dense_shard` of its
name); these calls are one request each, over the client's transport.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import optim as xoptim
from . import protocol as P
from .errors import InvalidArgumentError
from .sharding import dense_shard
from .transport import Ticket, Transport


class DenseVariableCalls:
    """Dense-variable calls of :class:`xdl.client.Client` (a mixin over its transport)."""

    _transport: Transport
    _dense_seen: dict[str, int]

    def create_dense(self, name: str, shape: Sequence[int], *,
                     optimizer: xoptim.Optimizer | None = None,
                     initial: np.ndarray | None = None, sync_workers: int = 0) -> None:
        """Create a dense variable held by one shard (idempotent).

        :param shape: the variable's shape.
        :param optimizer: server-side update rule (default ``xdl.optim.SGD(lr=0.01)``).
        :param initial: initial value (default zeros); the first creator's value wins.
        :param sync_workers: 0 applies each push at once (asynchronous); N > 0 applies
            the mean of N workers' gradients once all N pushed for the current step.
        """
        header = {"name": name, "shape": [int(s) for s in shape],
                  "optimizer": (optimizer or xoptim.SGD(lr=0.01)).to_dict(),
                  "sync_workers": int(sync_workers)}
        arrays = {} if initial is None else {"initial": np.asarray(initial, dtype=np.float32)}
        self._transport.call_one(self._dense_shard(name), P.CREATE_DENSE, header, arrays)

    def _dense_shard(self, name: str) -> int:
        return dense_shard(name, self._transport.num_shards)

    def dense_pull(self, name: str, *, min_version: int | None = None) -> np.ndarray:
        """Current value of a dense variable.

        :param min_version: block until the variable has had this many updates (sync mode).
        """
        h, arrays = self._transport.call_one(self._dense_shard(name), P.DENSE_PULL,
                                             {"name": name, "min_version": int(min_version or 0)})
        self._dense_seen[name] = int(h["version"])
        return np.array(arrays["value"])

    def dense_version(self, name: str) -> int:
        """Version of ``name`` seen by this client's last :meth:`dense_pull`."""
        return self._dense_seen.get(name, 0)

    def dense_push(self, name: str, grad: np.ndarray, *, step: int | None = None) -> Ticket:
        """Send the gradient of a dense variable (asynchronous, see :meth:`push`).

        :param step: in sync mode, the version the gradient was computed at
            (default: the version of this client's last :meth:`dense_pull`).
        """
        g = np.array(grad, dtype=np.float32)  # private: it is sent after we return
        if not np.isfinite(g).all():
            raise InvalidArgumentError("grad holds NaN or Inf values; nothing was sent",
                                       table=name)
        k = self._dense_shard(name)
        st = self.dense_version(name) if step is None else int(step)
        t = self._transport
        t.raise_failed()
        return Ticket(((k, t.send_later(k, P.DENSE_PUSH, {"name": name, "step": st},
                                        {"grad": g})),))
