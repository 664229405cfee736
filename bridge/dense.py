"""Dense variables shared by several workers through the parameter server.

:class:`DenseSync` is the framework-neutral part of a "server dense optimizer": it
creates one dense variable per parameter, pushes a step's gradients (numpy) and pulls
the fresh values, keeping track of the version each value was read at. In sync mode
(``sync_workers=N``) the server averages N workers' gradients per step; each push
carries the version its gradient was computed at, and the pull waits for the next
version. A framework's optimizer (``xdl.ServerDenseOptimizer`` for torch) only converts
its parameters to and from numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgumentError


class DenseSync:
    """Dense variables ``names`` on the shards, with their versions.

    :param client: an ``xdl.Client``.
    :param names: one variable name per parameter.
    :param initial: each parameter's current value (the first worker's value wins; every
        worker starts from the server's, see :meth:`pull`).
    :param optimizer: an ``xdl.optim`` spec applied on the server.
    :param sync_workers: number of workers whose gradients are averaged per step, or 0
        to apply each push as it comes (asynchronous). In sync mode each worker needs its
        own client (a blocking pull holds the client while it waits).
    """

    def __init__(self, client: Any, names: Sequence[str], initial: Sequence[np.ndarray], *,
                 optimizer: Any, sync_workers: int = 0) -> None:
        if not names:
            raise InvalidArgumentError("no dense variables to share")
        if len(names) != len(initial):
            raise InvalidArgumentError(
                f"{len(names)} names for {len(initial)} initial values")
        self.client = client
        self.names = list(names)
        self.sync_workers = int(sync_workers)
        self.shapes = [tuple(np.shape(v)) for v in initial]
        #: per variable, the version its current value was pulled at
        self.versions = [0] * len(self.names)
        for name, value in zip(self.names, initial, strict=True):
            client.create_dense(name, tuple(np.shape(value)), optimizer=optimizer,
                                initial=np.asarray(value, dtype=np.float32),
                                sync_workers=self.sync_workers)

    def pull(self, min_versions: Sequence[int] | None = None) -> list[np.ndarray]:
        """The variables' current values (float32, writable), waiting in sync mode for
        ``min_versions`` when given; records the versions read."""
        seen = getattr(self.client, "dense_version", None)
        values = []
        for i, name in enumerate(self.names):
            wanted = None if min_versions is None else int(min_versions[i])
            value = np.array(self.client.dense_pull(name, min_version=wanted), dtype=np.float32)
            values.append(value.reshape(self.shapes[i]))
            # the client reports the version it read; else assume the one asked for
            self.versions[i] = int(seen(name)) if seen is not None else (wanted or 0)
        return values

    def step(self, grads: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """Push one step's gradients (None: zeros), wait for them, pull the new values."""
        tickets = []
        for i, (name, grad, version) in enumerate(zip(self.names, grads, self.versions,
                                                      strict=True)):
            g = (np.zeros(self.shapes[i], np.float32) if grad is None
                 else np.ascontiguousarray(grad, dtype=np.float32))
            tickets.append(self.client.dense_push(name, g, step=version))
        for ticket in tickets:
            self.client.wait(ticket)
        return self.pull([v + 1 for v in self.versions] if self.sync_workers else None)


__all__ = ["DenseSync"]
