"""The worker's side of the parameter server: :func:`connect` and :class:`Client`.

A client holds one DEALER socket per shard. Every call de-duplicates ids, routes
them to shards by bucket (see :mod:`xdl.sharding`), sends one request to every
shard involved at once and then collects the replies, so a call costs one round
trip per shard whatever the number of shards. Pushes are asynchronous: they return
a :class:`Ticket` at once and :meth:`Client.wait` blocks until they are applied.

Reliability follows the ZeroMQ guide's Lazy Pirate pattern: poll with a timeout,
and when a shard stays silent close the socket (``LINGER 0``), open a new one,
resend every unanswered request with its original seq (pushes are applied exactly
once by the shard, so this is safe) and give up after a bounded number of retries
with a :class:`~xdl.errors.ServerUnavailableError` naming the endpoint.

A client is thread-safe: socket use is serialized by one lock, so a prefetch thread
may pull while the training thread pushes. Requests to one shard travel on one socket
and are applied in order, so a pull sent after a push sees it. The client remembers
the ids of the last :data:`PUSH_LOG_LENGTH` pushes per table (:meth:`Client.push_mark`,
:meth:`Client.pushed_since`): exact prefetch re-pulls only the rows pushed after it
pulled.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from . import codec
from . import init as xinit
from . import optim as xoptim
from . import protocol as P
from .errors import (
    InvalidArgumentError,
    ServerUnavailableError,
    XdlError,
    error_from_code,
)
from .sharding import (
    add_rows,
    all_finite,
    bucket_ranges,
    dense_shard,
    put_rows,
    shard_of_bucket,
    split_by_shard,
    take_rows,
)

log = logging.getLogger("xdl.client")

READY_PREFIX = "XDL-READY "
MAX_INFLIGHT_PUSHES = 256
#: pushes remembered per table by :meth:`Client.pushed_since`
PUSH_LOG_LENGTH = 64


@dataclass(frozen=True)
class Ticket:
    """Handle of an asynchronous request; pass it to :meth:`Client.wait`.

    :ivar seqs: ``(shard, seq)`` of every request the call sent.
    """

    seqs: tuple[tuple[int, int], ...]


@dataclass
class _Pending:
    frames: list[Any]
    command: bytes
    table: str | None
    sent_at: float
    attempts: int = 0


@dataclass
class _Conn:
    """One DEALER socket to one shard, with its unanswered requests."""

    endpoint: str
    socket: zmq.Socket
    pending: dict[int, _Pending] = field(default_factory=dict)
    done: dict[int, tuple[dict[str, Any], dict[str, np.ndarray]]] = field(default_factory=dict)
    orphans: set[int] = field(default_factory=set)  # async seqs nobody waits on (yet)


class LocalShards:
    """Shard processes started on this machine by :func:`connect` (``local_shards=N``).

    They are stopped by :meth:`stop`, by :meth:`Client.close` and at interpreter exit;
    each shard also exits by itself when this process dies.
    """

    def __init__(self, num_shards: int, *, host: str = "127.0.0.1", startup_timeout: float = 180.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.endpoints: list[str] = []
        try:
            for k in range(num_shards):
                cmd = [sys.executable, "-m", "xdl.server", "--bind", f"tcp://{host}:0",
                       "--shard", str(k), "--num-shards", str(num_shards),
                       "--parent-pid", str(os.getpid()), *extra_args]
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                                   stdin=subprocess.DEVNULL))
            for k, proc in enumerate(self.procs):
                self.endpoints.append(self._await_ready(k, proc, startup_timeout))
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    @staticmethod
    def _await_ready(k: int, proc: subprocess.Popen[str], timeout: float) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.5):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith(READY_PREFIX):
                    return line[len(READY_PREFIX):].strip()
        finally:
            sel.close()
        code = proc.poll()
        raise ServerUnavailableError(
            f"local shard {k} did not report ready within {timeout:.0f} s "
            f"(exit code {code}); run `python -m xdl.server --shard {k}` to see its output")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate every shard process and reap it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []
        atexit.unregister(self.stop)


class Client:
    """Connection to a cluster of shards. Create it with :func:`connect`.

    :param servers: shard endpoints in shard order (``tcp://host:port``).
    :param timeout: seconds to wait for a shard's reply before retrying.
    :param retries: reconnect-and-resend attempts before giving up.
    :param client_id: stable id of this worker (default: random); pushes are applied
        exactly once per ``(client_id, incarnation, seq)``.
    """

    def __init__(self, servers: Sequence[str], *, timeout: float = P.DEFAULT_TIMEOUT_S,
                 retries: int = P.DEFAULT_RETRIES, client_id: str | None = None,
                 local: LocalShards | None = None) -> None:
        if not servers:
            raise InvalidArgumentError("no servers given: pass endpoints, set XDL_SERVERS, or "
                                       "use connect(local_shards=N)")
        self.servers = list(servers)
        self.num_shards = len(self.servers)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.client_id = client_id or uuid.uuid4().hex
        self.incarnation = time.time_ns()
        self._local = local
        self._ctx = zmq.Context()
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._conns = [_Conn(ep, self._open(ep)) for ep in self.servers]
        self._route = shard_of_bucket(self.num_shards)
        self._ranges = bucket_ranges(self.num_shards)
        self._dims: dict[str, int] = {}
        self._failed: list[XdlError] = []
        self._dense_seen: dict[str, int] = {}
        # per table: pushes issued so far, and the last PUSH_LOG_LENGTH (seq, unique ids)
        self._push_count: dict[str, int] = {}
        self._push_log: dict[str, deque[tuple[int, np.ndarray, bool]]] = {}
        self._closed = False
        self._finalizer = weakref.finalize(self, Client._finalize, self._ctx, self._conns, local)
        self._check_cluster()

    # ------------------------------------------------------------ connection
    def _open(self, endpoint: str) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def _reconnect(self, conn: _Conn) -> None:
        conn.socket.close(0)
        conn.socket = self._open(conn.endpoint)
        for seq in sorted(conn.pending):
            p = conn.pending[seq]
            p.attempts += 1
            p.sent_at = time.monotonic()
            conn.socket.send_multipart(p.frames, copy=False)

    def _check_cluster(self) -> None:
        replies = self._call_all(P.PING, {})
        for k, (h, _) in enumerate(replies):
            if h.get("shard") != k or h.get("num_shards") != self.num_shards:
                raise InvalidArgumentError(
                    f"server {self.servers[k]} is shard {h.get('shard')} of "
                    f"{h.get('num_shards')}, but this client lists it as shard {k} of "
                    f"{self.num_shards}: list the endpoints in shard order")

    @staticmethod
    def _finalize(ctx: zmq.Context, conns: list[_Conn], local: LocalShards | None) -> None:
        for c in conns:
            c.socket.close(0)
        ctx.term()
        if local is not None:
            local.stop()

    def close(self) -> None:
        """Wait for outstanding pushes (best effort), close sockets, stop local shards."""
        if self._closed:
            return
        try:
            if any(c.pending for c in self._conns):
                self.wait()
        except XdlError as exc:
            log.warning("pushes not confirmed at close: %s", exc)
        finally:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ transport
    def _send(self, k: int, command: bytes, header: Mapping[str, Any],
              arrays: Mapping[str, np.ndarray] | None = None) -> int:
        if self._closed:
            raise XdlError("client is closed")
        seq = next(self._seq)
        h = {"cid": self.client_id, "inc": self.incarnation, "seq": seq, **header}
        frames = codec.encode(command, h, arrays)
        conn = self._conns[k]
        conn.pending[seq] = _Pending(frames, command, header.get("table") or header.get("name"),
                                     time.monotonic())
        conn.socket.send_multipart(frames, copy=False)
        return seq

    def _receive(self, conn: _Conn) -> None:
        frames = conn.socket.recv_multipart(copy=False)
        try:
            command, header, arrays = codec.decode(frames)
        except XdlError as exc:
            log.warning("undecodable reply from %s: %s", conn.endpoint, exc)
            return
        seq = header.get("seq")
        p = conn.pending.pop(seq, None)  # type: ignore[arg-type]
        if p is None:
            return  # a late duplicate of something already answered
        if seq in conn.orphans:
            conn.orphans.discard(seq)  # type: ignore[arg-type]
            if not header.get("ok"):
                self._failed.append(self._error(conn, p, header))
            return
        conn.done[seq] = (header, arrays)  # type: ignore[index]

    def _error(self, conn: _Conn, p: _Pending, header: dict[str, Any]) -> XdlError:
        return error_from_code(str(header.get("code")), str(header.get("message")),
                               endpoint=conn.endpoint, table=header.get("table") or p.table)

    def _collect(self, wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], tuple[
            dict[str, Any], dict[str, np.ndarray]]]:
        """Wait for the replies of ``(shard, seq)`` requests, retrying silent shards."""
        wanted = list(wanted)
        out: dict[tuple[int, int], tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
        poller = zmq.Poller()
        while True:
            missing = []
            for k, seq in wanted:
                if (k, seq) in out:
                    continue
                conn = self._conns[k]
                if seq in conn.done:
                    out[(k, seq)] = conn.done.pop(seq)
                elif seq in conn.pending:
                    missing.append((k, seq))
                else:
                    raise XdlError(f"request {seq} to {conn.endpoint} is unknown to this client")
            if not missing:
                break
            shards = sorted({k for k, _ in missing})
            oldest = min(self._conns[k].pending[s].sent_at for k, s in missing)
            wait_ms = int(max(0.0, (oldest + self.timeout - time.monotonic()) * 1e3)) + 1
            if len(shards) == 1:  # one socket: poll it directly, no Poller
                conn = self._conns[shards[0]]
                if conn.socket.poll(wait_ms, zmq.POLLIN):
                    self._receive(conn)
                    while conn.socket.poll(0, zmq.POLLIN):
                        self._receive(conn)
            else:
                for k in shards:
                    poller.register(self._conns[k].socket, zmq.POLLIN)
                events = dict(poller.poll(wait_ms))
                for k in shards:
                    conn = self._conns[k]
                    if conn.socket in events:
                        while conn.socket.poll(0, zmq.POLLIN):
                            self._receive(conn)
                    poller.unregister(conn.socket)
            now = time.monotonic()
            for k in shards:
                conn = self._conns[k]
                late = [s for kk, s in missing if kk == k and s in conn.pending
                        and now - conn.pending[s].sent_at >= self.timeout]
                if not late:
                    continue
                p = conn.pending[late[0]]
                if p.attempts >= self.retries:
                    raise ServerUnavailableError(
                        f"no reply to {p.command.decode()} after {p.attempts + 1} attempts of "
                        f"{self.timeout:g} s; is the shard running?", endpoint=conn.endpoint,
                        table=p.table)
                log.warning("shard %s silent for %.1f s; reconnecting (attempt %d of %d)",
                            conn.endpoint, self.timeout, p.attempts + 1, self.retries)
                self._reconnect(conn)
        return out

    def _raise_failed(self) -> None:
        if self._failed:
            exc = self._failed.pop(0)
            self._failed.clear()
            raise exc

    def _results(self, sent: Sequence[tuple[int, int]]) -> list[tuple[dict[str, Any],
                                                                       dict[str, np.ndarray]]]:
        replies = self._collect(sent)
        out = []
        for key in sent:
            header, arrays = replies[key]
            if not header.get("ok"):
                conn = self._conns[key[0]]
                raise error_from_code(str(header.get("code")), str(header.get("message")),
                                      endpoint=conn.endpoint, table=header.get("table"))
            out.append((header, arrays))
        return out

    def _call_all(self, command: bytes, header: Mapping[str, Any]) -> list[tuple[
            dict[str, Any], dict[str, np.ndarray]]]:
        with self._lock:
            self._raise_failed()
            sent = [(k, self._send(k, command, header)) for k in range(self.num_shards)]
            return self._results(sent)

    def _call_one(self, k: int, command: bytes, header: Mapping[str, Any],
                  arrays: Mapping[str, np.ndarray] | None = None) -> tuple[
                      dict[str, Any], dict[str, np.ndarray]]:
        with self._lock:
            self._raise_failed()
            return self._results([(k, self._send(k, command, header, arrays))])[0]

    # ------------------------------------------------------------ routing
    def _split(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Order ids by shard: returns the permutation and ``(shard, start, stop)`` runs."""
        if self.num_shards == 1:
            return np.arange(ids.size), [(0, 0, ids.size)]
        order, _, counts = split_by_shard(ids, self._route, self.num_shards)
        return order, self._runs(counts)

    def _runs(self, counts: np.ndarray) -> list[tuple[int, int, int]]:
        ends = np.cumsum(counts)
        return [(k, int(ends[k] - counts[k]), int(ends[k]))
                for k in range(self.num_shards) if counts[k]]

    @staticmethod
    def _as_ids(ids: Any, table: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}", table=table)
        return arr.reshape(-1).astype(np.int64, copy=False)

    def _dim(self, table: str) -> int:
        dim = self._dims.get(table)
        if dim is None:
            dim = int(self.describe_table(table)["dim"])
            self._dims[table] = dim
        return dim

    # ------------------------------------------------------------ tables
    def create_table(self, name: str, dim: int, *,
                     initializer: xinit.Initializer | None = None,
                     optimizer: xoptim.Optimizer | None = None, seed: int = 0) -> None:
        """Create a sparse table on every shard (idempotent with the same settings).

        :param name: table name, 1-128 characters from ``[A-Za-z0-9_.-]``.
        :param dim: row width.
        :param initializer: value of a new row (default :class:`xdl.init.Zeros`); it
            depends only on ``seed`` and the key (see :func:`xdl.init.generate`).
        :param optimizer: server-side update rule (default ``xdl.optim.SGD(lr=0.01)``).
        :param seed: the table's initializer seed.
        """
        init_d = (initializer or xinit.Zeros()).to_dict()
        opt_d = (optimizer or xoptim.SGD(lr=0.01)).to_dict()
        self._call_all(P.CREATE_TABLE, {"table": name, "dim": int(dim), "seed": int(seed),
                                        "initializer": init_d, "optimizer": opt_d})
        self._dims[name] = int(dim)

    def describe_table(self, name: str) -> dict[str, Any]:
        """Settings of a table, with ``rows`` and ``bytes`` summed over shards."""
        replies = self._call_all(P.DESCRIBE_TABLE, {"table": name})
        desc = dict(replies[0][0]["table"])
        desc["rows"] = sum(int(h["table"]["rows"]) for h, _ in replies)
        desc["nbytes"] = sum(int(h["table"]["nbytes"]) for h, _ in replies)
        desc["rows_per_shard"] = [int(h["table"]["rows"]) for h, _ in replies]
        return desc

    def list_tables(self) -> dict[str, list[str]]:
        """Names of the sparse tables and dense variables on the cluster."""
        h, _ = self._call_one(0, P.LIST_TABLES, {})
        return {"tables": list(h["tables"]), "dense": list(h["dense"])}

    def drop_table(self, name: str) -> None:
        """Delete a table (or dense variable) and all its rows on every shard."""
        self._call_all(P.DROP_TABLE, {"table": name})
        self._dims.pop(name, None)
        self._forget_pushes(name)

    def pull(self, table: str, ids: Any, *, unique: bool = False) -> np.ndarray:
        """Rows of ``ids`` as ``float32 [len(ids), dim]``; missing rows are created.

        :param table: table name.
        :param ids: integer ids of any shape (flattened); repeats are fetched once.
        :param unique: promise that ``ids`` has no repeats, skipping de-duplication.
        """
        flat = self._as_ids(ids, table)
        if unique:
            uniq, inverse = flat, None
        else:
            uniq, inverse = np.unique(flat, return_inverse=True)
        dim = self._dim(table)
        if self.num_shards == 1:  # no routing, no permutation
            order, sorted_ids, runs = None, uniq, [(0, 0, uniq.size)]
        else:
            order, sorted_ids, counts = split_by_shard(uniq, self._route, self.num_shards)
            runs = self._runs(counts)
        with self._lock:
            self._raise_failed()
            sent = [(k, self._send(k, P.PULL, {"table": table}, {"ids": sorted_ids[s:e]}))
                    for k, s, e in runs]
            replies = self._results(sent)
        rows = np.empty((uniq.size, dim), dtype=np.float32)
        for (k, s, e), (_, arrays) in zip(runs, replies, strict=False):
            got = arrays.get("rows")
            if got is None or got.shape != (e - s, dim):
                raise InvalidArgumentError(
                    f"shard returned rows of shape {None if got is None else list(got.shape)}, "
                    f"expected {[e - s, dim]}", endpoint=self.servers[k], table=table)
            if order is None:
                rows[...] = got
            else:
                put_rows(rows, order[s:e], got)
        return rows if inverse is None else rows[inverse]

    def push(self, table: str, ids: Any, grads: Any, *, unique: bool = False) -> Ticket:
        """Send gradients of rows; the shards apply the table's optimizer exactly once.

        Returns at once with a :class:`Ticket`; :meth:`wait` blocks until applied. An
        error of an un-waited push is raised by the next call of this client.

        :param ids: integer ids, one per gradient row; gradients of repeated ids are summed.
        :param grads: ``float32 [len(ids), dim]``, finite.
        :param unique: promise that ``ids`` has no repeats, skipping de-duplication.
        """
        flat = self._as_ids(ids, table)
        g = np.asarray(grads)
        owned = False  # whether flat and g are arrays this call made
        dim = self._dim(table)
        if g.dtype != np.float32:
            if g.dtype.kind != "f":
                raise InvalidArgumentError(f"grads must be floating point, got {g.dtype}",
                                           table=table)
            g = g.astype(np.float32)
        if g.shape != (flat.size, dim):
            raise InvalidArgumentError(
                f"grads: expected shape {[flat.size, dim]} (len(ids), dim), got {list(g.shape)}",
                table=table)
        if not all_finite(g):
            raise InvalidArgumentError("grads hold NaN or Inf values; nothing was sent",
                                       table=table)
        logged: np.ndarray | None = None  # sorted unique ids for the push log, if at hand
        if not unique:
            uniq, inverse = np.unique(flat, return_inverse=True)
            logged = uniq
            if uniq.size != flat.size:  # sum the gradients of repeated ids
                summed = np.zeros((uniq.size, dim), dtype=np.float32)
                add_rows(summed, inverse, g)
                flat, g, owned = uniq, summed, True
        if self.num_shards == 1:  # no routing, no permutation
            # The request is sent without copies, asynchronously, and kept for resends:
            # it must not share memory with arrays the caller may change after we return.
            sorted_ids = flat if owned else flat.copy()
            sorted_g = g if owned else np.array(g, dtype=np.float32, order="C")
            runs = [(0, 0, flat.size)]
        else:
            order, sorted_ids, counts = split_by_shard(flat, self._route, self.num_shards)
            sorted_g = take_rows(g, order)
            runs = self._runs(counts)
        with self._lock:
            self._raise_failed()
            self._throttle()
            sent = tuple((k, self._send(k, P.PUSH, {"table": table},
                                        {"ids": sorted_ids[s:e], "grads": sorted_g[s:e]}))
                         for k, s, e in runs)
            for k, seq in sent:
                self._conns[k].orphans.add(seq)
            # unique=True: log the (private, unsorted) request ids; pushed_since sorts
            # them only if someone asks, keeping a sort off the push path
            self._log_push(table, sorted_ids if logged is None else logged, logged is not None)
        return Ticket(sent)

    def _forget_pushes(self, table: str | None = None) -> None:
        # rows changed by other means (load, drop): every mark taken before is void
        with self._lock:
            for name in [table] if table is not None else list(self._push_count):
                if name in self._push_count:
                    self._push_count[name] += 1
                    self._push_log[name].clear()

    def _log_push(self, table: str, ids: np.ndarray, is_sorted: bool) -> None:
        # called under the lock, once the push is on the sockets; ids are private to us
        ids.flags.writeable = False
        count = self._push_count.get(table, 0) + 1
        self._push_count[table] = count
        log_ = self._push_log.get(table)
        if log_ is None:
            log_ = self._push_log[table] = deque(maxlen=PUSH_LOG_LENGTH)
        log_.append((count, ids, is_sorted))

    def push_mark(self, table: str) -> int:
        """Number of pushes to ``table`` this client has issued so far.

        A push counted here is already on its way to the shards: a pull issued after
        this call sees it (requests to one shard travel on one socket and are applied
        in order). Pass the mark to :meth:`pushed_since` later to learn which ids were
        pushed in between.
        """
        with self._lock:
            return self._push_count.get(table, 0)

    def pushed_since(self, table: str, mark: int) -> np.ndarray | None:
        """Sorted unique ids pushed to ``table`` after :meth:`push_mark` returned ``mark``.

        Returns an empty int64 array when nothing was pushed since, and None when more
        than :data:`PUSH_LOG_LENGTH` pushes were made since ``mark`` (the log no longer
        reaches back that far: treat every id as pushed). The array may be read-only.
        Prefetch uses it to re-pull exactly the prefetched rows that went stale.
        """
        with self._lock:
            count = self._push_count.get(table, 0)
            if count <= mark:
                return np.empty(0, dtype=np.int64)
            log_ = self._push_log[table]
            if not log_ or log_[0][0] > mark + 1:
                return None
            parts = [(ids, ok) for seq, ids, ok in log_ if seq > mark]
        if len(parts) == 1 and parts[0][1]:
            return parts[0][0]  # sorted, unique and read-only (see push)
        return np.unique(np.concatenate([ids for ids, _ in parts]))

    def _throttle(self) -> None:
        # Bound the memory held by unanswered pushes: wait for the oldest ones.
        for k, conn in enumerate(self._conns):
            if len(conn.orphans) > MAX_INFLIGHT_PUSHES:
                oldest = sorted(conn.orphans)[: len(conn.orphans) - MAX_INFLIGHT_PUSHES // 2]
                self._settle([(k, s) for s in oldest])

    def _settle(self, keys: Iterable[tuple[int, int]]) -> None:
        """Wait for asynchronous requests; raise the first refusal among them."""
        keys = [(k, s) for k, s in keys if s in self._conns[k].pending]
        for k, s in keys:
            self._conns[k].orphans.discard(s)
        self._results(keys)

    def wait(self, ticket: Ticket | None = None) -> None:
        """Block until ``ticket``'s requests (default: every outstanding push) are applied.

        Raises the shard's error if one of them was refused.
        """
        with self._lock:
            if ticket is None:
                keys = [(k, s) for k, c in enumerate(self._conns) for s in list(c.orphans)]
            else:
                keys = list(ticket.seqs)
            self._settle(keys)
            self._raise_failed()

    def delete(self, table: str, ids: Any) -> int:
        """Remove rows; returns how many existed. Their memory is reused by new rows."""
        flat = np.unique(self._as_ids(ids, table))
        order, runs = self._split(flat)
        with self._lock:
            self._raise_failed()
            sent = [(k, self._send(k, P.DELETE, {"table": table}, {"ids": flat[order[s:e]]}))
                    for k, s, e in runs]
            return sum(int(h["deleted"]) for h, _ in self._results(sent))

    # ------------------------------------------------------------ dense variables
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
        self._call_one(dense_shard(name, self.num_shards), P.CREATE_DENSE, header, arrays)

    def dense_pull(self, name: str, *, min_version: int | None = None) -> np.ndarray:
        """Current value of a dense variable.

        :param min_version: block until the variable has had this many updates (sync mode).
        """
        h, arrays = self._call_one(dense_shard(name, self.num_shards), P.DENSE_PULL,
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
        g = np.asarray(grad, dtype=np.float32)
        if not np.isfinite(g).all():
            raise InvalidArgumentError("grad holds NaN or Inf values; nothing was sent",
                                       table=name)
        k = dense_shard(name, self.num_shards)
        st = self.dense_version(name) if step is None else int(step)
        with self._lock:
            self._raise_failed()
            seq = self._send(k, P.DENSE_PUSH, {"name": name, "step": st}, {"grad": g})
            self._conns[k].orphans.add(seq)
        return Ticket(((k, seq),))

    # ------------------------------------------------------------ operations
    def stats(self) -> list[dict[str, Any]]:
        """Per-shard statistics: rows and bytes per table, request counts and latencies."""
        return [h for h, _ in self._call_all(P.STATS, {})]

    def ping(self) -> list[dict[str, Any]]:
        """Ask every shard for its index, shard count, protocol version and pid."""
        return [h for h, _ in self._call_all(P.PING, {})]

    def save(self, root: str, *, keep: int | None = None) -> str:
        """Write a checkpoint under ``root`` and return its folder.

        Waits for outstanding pushes first. The shards and this client must share the
        file system. The checkpoint becomes visible (``root/LATEST``) only once complete.

        :param keep: delete all but the ``keep`` newest checkpoints afterwards.
        """
        from xdl.server import checkpoint

        self.wait()
        tmp = checkpoint.begin(os.path.abspath(root))
        replies = [h for h, _ in self._call_all(P.SAVE, {"dir": tmp})]
        return checkpoint.commit(tmp, self.num_shards, self._ranges, replies, keep=keep)

    def load(self, path: str) -> dict[str, Any]:
        """Replace the cluster's state by a checkpoint (``path`` or ``path/LATEST``).

        A checkpoint written by any number of shards loads onto this cluster.
        """
        from xdl.server import checkpoint

        self.wait()
        ckpt = checkpoint.resolve(os.path.abspath(path))
        replies = [h for h, _ in self._call_all(P.LOAD, {"dir": ckpt})]
        self._dims.clear()
        self._forget_pushes()
        return {"path": ckpt, "rows": sum(int(h["rows"]) for h in replies),
                "tables": replies[0]["tables"] if replies else []}

    def shutdown(self) -> None:
        """Ask every shard to stop serving (standalone servers included)."""
        self._call_all(P.SHUTDOWN, {})


def connect(servers: Sequence[str] | str | None = None, *, local_shards: int | None = None,
            timeout: float | None = None, retries: int | None = None,
            client_id: str | None = None) -> Client:
    """Connect to a cluster of shards and return a :class:`Client`.

    :param servers: endpoints in shard order, as a list or a comma-separated string.
        Default: the ``XDL_SERVERS`` variable; if that is unset too, local shards are
        started (``local_shards``, default 1).
    :param local_shards: start this many shard processes on 127.0.0.1 (stopped by
        :meth:`Client.close` and at exit).
    :param timeout: seconds per attempt (``XDL_TIMEOUT``, default 30).
    :param retries: attempts after the first (``XDL_RETRIES``, default 3).
    :param client_id: stable worker id (``XDL_CLIENT_ID``, default random).

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
        return Client(servers, timeout=timeout, retries=retries, client_id=client_id, local=local)
    except BaseException:
        if local is not None:
            local.stop()
        raise
