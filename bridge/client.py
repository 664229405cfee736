"""The worker's side of the parameter server: :func:`connect` and :class:`Client`.

A client holds one DEALER socket per shard. Every call de-duplicates ids, routes
them to shards by bucket (see :mod:`xdl.sharding`), sends one request to every
shard involved at once and then collects the replies, so a call costs one round
trip per shard whatever the number of shards. Pushes are asynchronous: they return
a :class:`Ticket` at once and :meth:`Client.wait` blocks until they are applied.

:class:`Client` is assembled from small parts, each in its own module:

- :mod:`xdl.transport`: sockets, request tracking and Lazy Pirate retries (poll with a
  timeout, reconnect with ``LINGER 0``, resend with the original seq, bounded retries,
  then a :class:`~xdl.errors.ServerUnavailableError` naming the endpoint);
- :mod:`xdl.routing`: split ids by shard → send → collect → scatter, once for every call;
- :mod:`xdl.kv_client`: tables, pull, push, delete;
- :mod:`xdl.pushlog`: the ids of the last :data:`PUSH_LOG_LENGTH` pushes per table
  (:meth:`Client.push_mark`, :meth:`Client.pushed_since`): exact prefetch re-pulls only
  the rows pushed after it pulled;
- :mod:`xdl.dense_client`: dense variables;
- :mod:`xdl.checkpoint_client`: save and load;
- :mod:`xdl.local_shards`: shard processes started on this machine.

A client is thread-safe: socket use is serialized by one lock, so a prefetch thread
may pull while the training thread pushes. Requests to one shard travel on one socket
and are applied in order, so a pull sent after a push sees it.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from . import protocol as P
from .checkpoint_client import CheckpointCalls
from .dense_client import DenseVariableCalls
from .errors import InvalidArgumentError, XdlError
from .kv_client import KeyValueCalls
from .local_shards import READY_PREFIX, LocalShards
from .memtune import tune_malloc
from .pushlog import PUSH_LOG_LENGTH, PushLog
from .routing import ShardRouter
from .security import ClientKeys
from .transport import MAX_INFLIGHT_PUSHES, Reply, ShardConnection, Ticket, Transport

__all__ = [
    "Client",
    "connect",
    "Ticket",
    "LocalShards",
    "READY_PREFIX",
    "MAX_INFLIGHT_PUSHES",
    "PUSH_LOG_LENGTH",
]

log = logging.getLogger("xdl.client")


class Client(KeyValueCalls, DenseVariableCalls, CheckpointCalls):
    """Connection to a cluster of shards. Create it with :func:`connect`.

    :param servers: shard endpoints in shard order (``tcp://host:port``).
    :param timeout: seconds to wait for a shard's reply before retrying.
    :param retries: reconnect-and-resend attempts before giving up.
    :param client_id: stable id of this worker (default: random); pushes are applied
        exactly once per ``(client_id, incarnation, seq)``.
    :param local: shard processes this client owns and stops at :meth:`close`.
    :param curve_secret: this client's CURVE key pair file (``XDL_CURVE_CLIENT_SECRET``).
    :param curve_server_key: the shards' CURVE public key file (``XDL_CURVE_SERVER_KEY``).
    """

    def __init__(self, servers: Sequence[str], *, timeout: float = P.DEFAULT_TIMEOUT_S,
                 retries: int = P.DEFAULT_RETRIES, client_id: str | None = None,
                 local: LocalShards | None = None, curve_secret: str | None = None,
                 curve_server_key: str | None = None) -> None:
        if not servers:
            raise InvalidArgumentError("no servers given: pass endpoints, set XDL_SERVERS, or "
                                       "use connect(local_shards=N)")
        tune_malloc()  # request-sized arrays reused, not mapped afresh (xdl.memtune)
        self._transport = Transport(servers, timeout=timeout, retries=retries,
                                    client_id=client_id, keys=ClientKeys.from_options(
                                        curve_secret, curve_server_key))
        t = self._transport
        self.servers = t.servers
        self.num_shards = t.num_shards
        self.timeout = t.timeout
        self.retries = t.retries
        self.client_id = t.client_id
        self.incarnation = t.incarnation
        self._local = local
        self._router = ShardRouter(t)
        # read at construction so that a test may shorten the log through this module
        self._pushlog = PushLog(PUSH_LOG_LENGTH)
        self._dims: dict[str, int] = {}
        self._dense_seen: dict[str, int] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, Client._finalize, t, local)
        self._check_cluster()

    # the transport's pieces, under the names tests and tools have used
    @property
    def _ctx(self) -> zmq.Context:
        return self._transport.ctx

    @property
    def _conns(self) -> list[ShardConnection]:
        return self._transport.conns

    def _call_all(self, command: bytes, header: Mapping[str, Any]) -> list[Reply]:
        return self._transport.call_all(command, header)

    def _check_cluster(self) -> None:
        replies = self._transport.call_all(P.PING, {})
        for k, (h, _) in enumerate(replies):
            if h.get("shard") != k or h.get("num_shards") != self.num_shards:
                raise InvalidArgumentError(
                    f"server {self.servers[k]} is shard {h.get('shard')} of "
                    f"{h.get('num_shards')}, but this client lists it as shard {k} of "
                    f"{self.num_shards}: list the endpoints in shard order")

    @staticmethod
    def _finalize(transport: Transport, local: LocalShards | None) -> None:
        transport.close()
        if local is not None:
            local.stop()

    def close(self) -> None:
        """Wait for outstanding pushes (best effort), close sockets, stop local shards."""
        if self._closed:
            return
        try:
            if self._transport.has_pending():
                self._transport.wait()
        except XdlError as exc:
            log.warning("pushes not confirmed at close: %s", exc)
        finally:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, ticket: Ticket | None = None) -> None:
        """Block until ``ticket``'s requests (default: every outstanding push) are applied.

        Raises the shard's error if one of them was refused.
        """
        self._transport.wait(ticket)

    # ------------------------------------------------------------ operations
    def resend_unanswered(self) -> int:
        """Retry after :class:`~xdl.errors.ServerUnavailableError`, applying nothing twice.

        Sends every request still unanswered again with its original sequence number
        (never call ``push`` again for the same gradients: that would be a new push),
        then waits for the replies like :meth:`wait`, raising a refusal or
        ``ServerUnavailableError`` again if the shard is still away. Returns how many
        requests were sent again.
        """
        count = self._transport.resend_unanswered()
        self._transport.wait()
        return count

    def stats(self) -> list[dict[str, Any]]:
        """Per-shard statistics: rows and bytes per table, request counts and latencies."""
        return [h for h, _ in self._transport.call_all(P.STATS, {})]

    def ping(self) -> list[dict[str, Any]]:
        """Ask every shard for its index, shard count, protocol version and pid."""
        return [h for h, _ in self._transport.call_all(P.PING, {})]

    def shutdown(self) -> None:
        """Ask every shard to stop serving (standalone servers included)."""
        self._transport.call_all(P.SHUTDOWN, {})


def connect(servers: Sequence[str] | str | None = None, *, local_shards: int | None = None,
            timeout: float | None = None, retries: int | None = None,
            client_id: str | None = None, curve_secret: str | None = None,
            curve_server_key: str | None = None) -> Client:
    """Connect to a cluster of shards and return a :class:`Client`.

    :param servers: endpoints in shard order, as a list or a comma-separated string.
        Default: the ``XDL_SERVERS`` variable; if that is unset too, local shards are
        started (``local_shards``, default 1).
    :param local_shards: start this many shard processes on 127.0.0.1 (stopped by
        :meth:`Client.close` and at exit).
    :param timeout: seconds per attempt (``XDL_TIMEOUT``, default 30).
    :param retries: attempts after the first (``XDL_RETRIES``, default 3).
    :param client_id: stable worker id (``XDL_CLIENT_ID``, default random).
    :param curve_secret: this client's CURVE key pair file (``XDL_CURVE_CLIENT_SECRET``);
        with ``curve_server_key`` (``XDL_CURVE_SERVER_KEY``) every socket uses CurveZMQ
        (see the README, "Running a secured cluster").

    Example::

        import numpy as np, xdl
        with xdl.connect(local_shards=2) as client:
            client.create_table("item", dim=8, optimizer=xdl.optim.Adagrad(lr=0.1))
            rows = client.pull("item", np.array([3, 7, 3]))
            client.wait(client.push("item", np.array([3, 7]), np.ones((2, 8), np.float32)))
    """
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    if not servers and local_shards is None:
        env = os.environ.get("XDL_SERVERS", "")
        servers = [s.strip() for s in env.split(",") if s.strip()] or None
    timeout = timeout if timeout is not None else float(os.environ.get("XDL_TIMEOUT",
                                                                       P.DEFAULT_TIMEOUT_S))
    retries = retries if retries is not None else int(os.environ.get("XDL_RETRIES",
                                                                     P.DEFAULT_RETRIES))
    client_id = client_id or os.environ.get("XDL_CLIENT_ID") or None
    local = None
    if not servers:
        local = LocalShards(local_shards or 1)
        servers = local.endpoints
    try:
        return Client(servers, timeout=timeout, retries=retries, client_id=client_id, local=local,
                      curve_secret=curve_secret, curve_server_key=curve_server_key)
    except BaseException:
        if local is not None:
            local.stop()
        raise
