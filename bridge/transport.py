"""Client transport: one DEALER socket per shard, request tracking and Lazy Pirate retries.

This is the lowest layer of :class:`xdl.client.Client` and knows nothing about tables.
Every request is stamped with ``(client_id, incarnation, seq)`` and kept until its reply
arrives. Replies are matched to requests by seq, so several requests may be in flight on
one socket. Reliability follows the ZeroMQ guide's Lazy Pirate pattern: poll with a
timeout, and when a shard stays silent close the socket (``LINGER 0``), open a new one,
resend every unanswered request with its original seq (shards apply mutating requests
exactly once, so this is safe) and give up after a bounded number of retries with a
:class:`~xdl.errors.ServerUnavailableError` naming the endpoint.

Asynchronous requests (pushes) are *tracked*: their replies are consumed whenever the
transport next reads the socket, and a refusal is kept and raised by the next call
(:meth:`Transport.raise_failed`) or by :meth:`Transport.wait`.

Socket use is serialized by one re-entrant lock (:attr:`Transport.lock`); callers that
must make several steps atomic (send a push, then log it) hold it around them.
"""

from __future__ import annotations

import itertools
import logging
import queue
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
from .errors import ServerUnavailableError, ShardRestartedError, XdlError, error_from_code
from .security import ClientKeys

log = logging.getLogger("xdl.client")

#: unanswered asynchronous requests per shard before a new one waits for the oldest
MAX_INFLIGHT_PUSHES = 256

#: a decoded reply: ``(header, arrays)``
Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Ticket:
    """Handle of an asynchronous request; pass it to :meth:`xdl.Client.wait`.

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
    #: the shard process's boot id the frames are stamped with (None: not stamped)
    boot: str | None = None


@dataclass
class _Queued:
    shard: int
    seq: int
    pending: _Pending


@dataclass
class ShardConnection:
    """One DEALER socket to one shard, with its unanswered and answered requests."""

    endpoint: str
    socket: zmq.Socket
    pending: dict[int, _Pending] = field(default_factory=dict)
    done: dict[int, Reply] = field(default_factory=dict)
    orphans: set[int] = field(default_factory=set)  # async seqs nobody waits on (yet)
    #: the shard process's boot id, from its replies; a new one means it restarted
    boot: str | None = None
    restarts: int = 0


class Transport:
    """Sockets to every shard, with request tracking and bounded retries.

    :param servers: shard endpoints in shard order (``tcp://host:port``).
    :param timeout: seconds to wait for a shard's reply before reconnecting and resending.
    :param retries: reconnect-and-resend attempts before giving up.
    :param client_id: id stamped on every request (default: random).
    :param keys: CURVE keys for every socket (None: plain TCP), see :mod:`xdl.security`.
    """

    def __init__(self, servers: Sequence[str], *, timeout: float, retries: int,
                 client_id: str | None = None, keys: ClientKeys | None = None) -> None:
        self.servers = list(servers)
        self.num_shards = len(self.servers)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.client_id = client_id or uuid.uuid4().hex
        self.incarnation = time.time_ns()
        #: serializes socket use; re-entrant so callers can hold it around several calls
        self.lock = threading.RLock()
        self.keys = keys
        self.ctx = zmq.Context()
        self._seq = itertools.count(1)
        self.conns = [ShardConnection(ep, self._open(ep)) for ep in self.servers]
        # one poller over every socket, kept (building one per wait costs more than the
        # poll of a small request); a reconnect swaps the socket in it
        self._poller = zmq.Poller()
        for c in self.conns:
            self._poller.register(c.socket, zmq.POLLIN)
        self._failed: list[XdlError] = []
        self.closed = False
        # Requests in seq order not yet on the sockets (see send_later). Taking a seq and
        # queueing the request is one step under _order_lock, and only the holder of
        # `lock` sends from the queue, in order: each socket carries seqs in increasing
        # order, which the shards' exactly-once filter relies on.
        self._outbox: deque[_Queued] = deque()
        self._order_lock = threading.Lock()
        # wakes the sender thread; a SimpleQueue's put never waits for a lock (an Event's
        # set can, and then lets go of the GIL)
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._sender: threading.Thread | None = None
        self._finalizer = weakref.finalize(self, Transport._finalize, self.ctx, self.conns)

    # ------------------------------------------------------------ sockets
    def _open(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.secure(sock)
        sock.connect(endpoint)
        return sock

    def _reconnect(self, conn: ShardConnection) -> None:
        self._poller.unregister(conn.socket)
        conn.socket.close(0)
        conn.socket = self._open(conn.endpoint)
        self._poller.register(conn.socket, zmq.POLLIN)
        for seq in sorted(conn.pending):
            p = conn.pending[seq]
            self._stamp(conn, p)
            p.attempts += 1
            p.sent_at = time.monotonic()
            codec.send_frames(conn.socket, p.frames)

    @staticmethod
    def _finalize(ctx: zmq.Context, conns: list[ShardConnection]) -> None:
        for c in conns:
            c.socket.close(0)
        ctx.term()

    def has_pending(self) -> bool:
        """Whether any request is still unanswered (or not sent yet)."""
        return bool(self._outbox) or any(c.pending for c in self.conns)

    def close(self) -> None:
        """Close every socket (``LINGER 0``) and the context; later sends raise.

        Requests still queued by :meth:`send_later` are dropped: wait for them first.
        """
        with self.lock:
            self.closed = True
        self._wake.put(None)
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(5.0)
        self._finalizer()

    # ------------------------------------------------------------ requests
    def send(self, k: int, command: bytes, header: Mapping[str, Any],
             arrays: Mapping[str, np.ndarray] | None = None) -> int:
        """Send one request to shard ``k`` without waiting for its reply; returns its seq.

        Requests queued earlier by :meth:`send_later` go out first. The arrays travel
        without copies (those under :data:`xdl.codec.COPY_BELOW` bytes are copied) and
        are kept for resends until the reply arrives: they must not be changed by anyone
        meanwhile. Hold :attr:`lock`.
        """
        seq = self._enqueue(k, command, header, arrays, asynchronous=False)
        self._flush()
        return seq

    def send_later(self, k: int, command: bytes, header: Mapping[str, Any],
                   arrays: Mapping[str, np.ndarray] | None = None) -> int:
        """Queue an asynchronous request to shard ``k`` and return its seq at once.

        The calling thread neither takes :attr:`lock` nor touches a socket (a socket send
        lets go of the GIL, and a training thread can wait long to get it back while
        prefetch threads run). The request goes out before any request sent after it, by
        whichever thread sends next, or by this transport's sender thread. Its reply is
        handled like :meth:`track`'s. Same rules for the arrays as :meth:`send`.
        """
        seq = self._enqueue(k, command, header, arrays, asynchronous=True)
        if self._sender is None:
            self._start_sender()
        self._wake.put(None)
        return seq

    def _enqueue(self, k: int, command: bytes, header: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray] | None, *, asynchronous: bool) -> int:
        label = header.get("table") or header.get("name")
        with self._order_lock:
            if self.closed:
                raise XdlError("client is closed")
            seq = next(self._seq)
            h = {"cid": self.client_id, "inc": self.incarnation, "seq": seq, **header}
            boot = self.conns[k].boot  # checked again when sent (see _stamp)
            if boot is not None:
                h["boot"] = boot
            frames = codec.encode(command, h, arrays)
            if asynchronous:  # before it can be sent: its reply may come at once
                self.conns[k].orphans.add(seq)
            self._outbox.append(_Queued(k, seq, _Pending(
                frames, command, label if isinstance(label, str) else None, 0.0, boot=boot)))
        return seq

    def _flush(self) -> None:
        """Put every queued request on its socket, in seq order. Hold :attr:`lock`."""
        while self._outbox:
            q = self._outbox.popleft()
            conn = self.conns[q.shard]
            self._stamp(conn, q.pending)
            q.pending.sent_at = time.monotonic()
            conn.pending[q.seq] = q.pending
            codec.send_frames(conn.socket, q.pending.frames)

    def _start_sender(self) -> None:
        with self._order_lock:
            if self._sender is None:
                self._sender = threading.Thread(
                    target=Transport._send_queued, args=(weakref.ref(self), self._wake),
                    name="xdl-sender", daemon=True)
                self._sender.start()

    @staticmethod
    def _send_queued(ref: weakref.ReferenceType[Transport], wake: queue.SimpleQueue[None]
                     ) -> None:
        # the sender thread: holds the transport only while it sends, so that an
        # unclosed transport can still be collected
        while True:
            try:
                wake.get(timeout=1.0)
                while True:  # one pass sends everything queued so far
                    wake.get_nowait()
            except queue.Empty:
                pass
            t = ref()
            if t is None or t.closed:
                return
            if not t._outbox:  # a thread that waited or sent took the queue along
                del t
                continue
            try:
                with t.lock:
                    if not t.closed:
                        t._flush()
            except Exception:  # a socket error: the waiting thread's retries handle it
                log.exception("sending queued requests failed")
            del t

    def track(self, sent: Iterable[tuple[int, int]]) -> Ticket:
        """Mark sent requests as asynchronous and return their :class:`Ticket`.

        Their replies are consumed later; a refusal is raised by the next call.
        """
        seqs = tuple(sent)
        for k, seq in seqs:
            self.conns[k].orphans.add(seq)
        return Ticket(seqs)

    def _drain(self, conn: ShardConnection) -> None:
        # receive every reply already queued, asking the socket's EVENTS (no poll, no
        # wait) whether another one is there
        while codec.readable(conn.socket):
            self._receive(conn)

    def _receive(self, conn: ShardConnection) -> None:
        frames = codec.recv_frames(conn.socket)
        try:
            _, header, arrays = codec.decode(frames)
        except XdlError as exc:
            log.warning("undecodable reply from %s: %s", conn.endpoint, exc)
            return
        seq = header.get("seq")
        if not isinstance(seq, int):
            log.warning("reply without a seq from %s", conn.endpoint)
            return
        boot = header.get("boot")
        if isinstance(boot, str) and boot != conn.boot:
            known, conn.boot = conn.boot, boot
            if known is not None:
                self._restarted(conn, header)
        if header.get("code") == ShardRestartedError.code:
            # sent before this client knew of the shard's new process: not run there.
            # It was resent, stamped, when the new boot id was seen; if it was stamped
            # with an old one since (a third process), resend it now.
            q = conn.pending.get(seq)
            if q is not None and q.boot != conn.boot:
                self._stamp(conn, q)
                q.sent_at = time.monotonic()
                codec.send_frames(conn.socket, q.frames)
            return
        p = conn.pending.pop(seq, None)
        if p is None:
            return  # a late duplicate of something already answered
        if seq in conn.orphans:
            conn.orphans.discard(seq)
            if not header.get("ok"):
                self._failed.append(self._error(conn, p, header))
            return
        conn.done[seq] = (header, arrays)

    def _restarted(self, conn: ShardConnection, header: dict[str, Any]) -> None:
        """A reply came from a new shard process: resend, in order, what is unanswered.

        Requests in flight when the old process died are lost; later ones, stamped with
        the old boot id, are refused by the new process without being run
        (``RESTARTED``). Resending every unanswered request in seq order, stamped with
        the new id, lets the shard apply them in order: a push its write-ahead log kept
        is answered as a duplicate, none is overtaken and then taken for one.
        """
        conn.restarts += 1
        log.warning("shard %s restarted (boot %s); %s; resending %d unanswered requests",
                    conn.endpoint, header.get("boot"),
                    "its write-ahead log kept every change it acknowledged" if header.get("wal")
                    else "it has no write-ahead log: changes it acknowledged since its last "
                         "checkpoint are lost", len(conn.pending))
        now = time.monotonic()
        for s in sorted(conn.pending):
            q = conn.pending[s]
            self._stamp(conn, q)
            q.sent_at = now
            codec.send_frames(conn.socket, q.frames)

    @staticmethod
    def _stamp(conn: ShardConnection, p: _Pending) -> None:
        """Stamp ``p``'s frames with the boot id of ``conn``'s shard process, if it changed."""
        if conn.boot is None or p.boot == conn.boot:
            return
        header = codec.unpackb(memoryview(p.frames[2]))
        header["boot"] = conn.boot
        p.frames = [p.frames[0], p.frames[1], codec.packb(header), *p.frames[3:]]
        p.boot = conn.boot

    @staticmethod
    def _error(conn: ShardConnection, p: _Pending | None, header: dict[str, Any]) -> XdlError:
        return error_from_code(str(header.get("code")), str(header.get("message")),
                               endpoint=conn.endpoint,
                               table=header.get("table") or (p.table if p else None))

    def _collect(self, wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Reply]:
        """Wait for the replies of ``(shard, seq)`` requests, retrying silent shards."""
        self._flush()
        wanted = list(wanted)
        out: dict[tuple[int, int], Reply] = {}
        while True:
            missing = []
            for k, seq in wanted:
                if (k, seq) in out:
                    continue
                conn = self.conns[k]
                if seq in conn.done:
                    out[(k, seq)] = conn.done.pop(seq)
                elif seq in conn.pending:
                    missing.append((k, seq))
                else:
                    raise XdlError(f"request {seq} to {conn.endpoint} is unknown to this client")
            if not missing:
                return out
            shards = sorted({k for k, _ in missing})
            oldest = min(self.conns[k].pending[s].sent_at for k, s in missing)
            wait_ms = int(max(0.0, (oldest + self.timeout - time.monotonic()) * 1e3)) + 1
            # every socket is polled: replies of other requests (push acks) are taken too
            for sock, _ in self._poller.poll(wait_ms):
                for conn in self.conns:
                    if conn.socket is sock:
                        self._drain(conn)
            self._retry_late(shards, missing)

    def _retry_late(self, shards: list[int], missing: list[tuple[int, int]]) -> None:
        now = time.monotonic()
        for k in shards:
            conn = self.conns[k]
            late = [s for kk, s in missing if kk == k and s in conn.pending
                    and now - conn.pending[s].sent_at >= self.timeout]
            if not late:
                continue
            p = conn.pending[late[0]]
            if p.attempts >= self.retries:
                raise ServerUnavailableError(
                    f"no reply to {p.command.decode()} after {p.attempts + 1} attempts of "
                    f"{self.timeout:g} s; is the shard running? Once it is, "
                    "client.resend_unanswered() sends what is unanswered again with the same "
                    "sequence numbers (pushing again would apply a push twice)",
                    endpoint=conn.endpoint, table=p.table)
            log.warning("shard %s silent for %.1f s; reconnecting (attempt %d of %d)",
                        conn.endpoint, self.timeout, p.attempts + 1, self.retries)
            self._reconnect(conn)

    def resend_unanswered(self) -> int:
        """Send every unanswered request again, with its original sequence number.

        The way to retry after :class:`~xdl.errors.ServerUnavailableError`: a shard
        that applied a request already answers the resend as a duplicate (and a refused
        one stays refused), so nothing is applied twice. The requests get a fresh round
        of retries; their replies are collected by the next :meth:`wait`. Returns how
        many requests were sent again.
        """
        with self.lock:
            count = 0
            for conn in self.conns:
                if not conn.pending:
                    continue
                conn.orphans.update(conn.pending)  # the next wait() collects them
                self._reconnect(conn)
                for p in conn.pending.values():
                    p.attempts = 0
                count += len(conn.pending)
            return count

    def raise_failed(self) -> None:
        """Raise the first refusal of an asynchronous request not raised yet, if any."""
        if self._failed:
            exc = self._failed.pop(0)
            self._failed.clear()
            raise exc

    def results(self, sent: Sequence[tuple[int, int]]) -> list[Reply]:
        """Replies of ``(shard, seq)`` requests, in order; raises the first refusal."""
        replies = self._collect(sent)
        out = []
        for key in sent:
            header, arrays = replies[key]
            if not header.get("ok"):
                raise self._error(self.conns[key[0]], None, header)
            out.append((header, arrays))
        return out

    def call_all(self, command: bytes, header: Mapping[str, Any]) -> list[Reply]:
        """Send one request to every shard at once and return their replies in shard order."""
        with self.lock:
            self.raise_failed()
            sent = [(k, self.send(k, command, header)) for k in range(self.num_shards)]
            return self.results(sent)

    def call_one(self, k: int, command: bytes, header: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray] | None = None) -> Reply:
        """Send one request to shard ``k`` and return its reply."""
        with self.lock:
            self.raise_failed()
            return self.results([(k, self.send(k, command, header, arrays))])[0]

    # ------------------------------------------------------------ asynchronous requests
    def throttle(self) -> None:
        """Bound the memory held by unanswered asynchronous requests: wait for the oldest."""
        for k, conn in enumerate(self.conns):
            if len(conn.orphans) > MAX_INFLIGHT_PUSHES:
                with self.lock:
                    oldest = sorted(conn.orphans)[: len(conn.orphans) - MAX_INFLIGHT_PUSHES // 2]
                    self._settle([(k, s) for s in oldest])

    def _settle(self, keys: Iterable[tuple[int, int]]) -> None:
        self._flush()
        keys = [(k, s) for k, s in keys if s in self.conns[k].pending]
        for k, s in keys:
            self.conns[k].orphans.discard(s)
        self.results(keys)

    def wait(self, ticket: Ticket | None = None) -> None:
        """Block until ``ticket``'s requests (default: every asynchronous one) are answered.

        Raises the shard's error if one of them was refused.
        """
        with self.lock:
            if ticket is None:
                keys = [(k, s) for k, c in enumerate(self.conns) for s in list(c.orphans)]
            else:
                keys = list(ticket.seqs)
            self._settle(keys)
            self.raise_failed()
