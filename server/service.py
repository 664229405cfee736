"""The ZeroMQ service loop of one shard: bind, report ready, serve until told to stop."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import numpy as np
import zmq

from xdl import codec
from xdl import init as xinit
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.security import ServerSecurity, warn_if_exposed
from xdl.sharding import first_outside

from . import checkpoint
from .admin import under_root
from .durability import Durability
from .shard import Shard
from .table import SparseTable

log = logging.getLogger("xdl.server")


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel before reporting ready."""
    for spec in (xoptim.SGD(lr=0.1), xoptim.Momentum(lr=0.1), xoptim.Adagrad(lr=0.1),
                 xoptim.Adam(lr=0.1), xoptim.RMSProp(lr=0.1), xoptim.FTRL(lr=0.1)):
        t = SparseTable("warmup", 2, xinit.TruncatedNormal(), spec, seed=1, capacity=4)
        keys = np.arange(8, dtype=np.int64)
        t.pull(keys)
        t.push(keys, np.ones((8, 2), dtype=np.float32))
        t.delete(keys[:2])
        t.pull(keys)
    for init_spec in (xinit.Zeros(), xinit.Constant(1.0), xinit.Uniform(), xinit.Normal()):
        xinit.generate(init_spec, 0, np.arange(2, dtype=np.int64), 2)
    first_outside(np.arange(2, dtype=np.int64), 0, 1)


def _release_memory() -> None:
    """Hand freed heap pages back to the system after a large request (glibc only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def serve(bind: str, shard: int = 0, num_shards: int = 1, *,
          max_request_bytes: int = P.DEFAULT_MAX_REQUEST_BYTES,
          parent_pid: int | None = None, load: str | None = None,
          checkpoint_root: str | None = None, wal_dir: str | None = None,
          wal_fsync: str = "every", security: ServerSecurity | None = None) -> int:
    """Run one shard until SHUTDOWN, SIGTERM or SIGINT (or the parent process dies).

    Prints ``XDL-READY <endpoint>`` on stdout once the kernels are compiled, the socket
    is bound (``tcp://127.0.0.1:0`` binds a free port and prints it) and the state is
    recovered from the write-ahead log in ``wal_dir`` (see :mod:`xdl.server.durability`).
    With ``security``, the socket speaks CurveZMQ (see :mod:`xdl.security`).
    """
    state = Shard(shard, num_shards, max_request_bytes, checkpoint_root=checkpoint_root)
    warm_up()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    # ZeroMQ's own limit applies per frame: no frame may exceed the request cap (the
    # connection is dropped), and the dispatcher answers TOO_LARGE when the frames of
    # one message add up to more.
    sock.setsockopt(zmq.MAXMSGSIZE, max_request_bytes + P.MAX_HEADER_BYTES)
    if security is not None:
        security.secure(ctx, sock)
    try:
        if bind.endswith(":0"):
            port = sock.bind_to_random_port(bind[: bind.rindex(":")])
            endpoint = f"{bind[: bind.rindex(':')]}:{port}"
        else:
            sock.bind(bind)
            endpoint = bind
    except zmq.ZMQError as exc:
        print(f"xdl server: cannot bind {bind}: {exc}", file=sys.stderr)
        _close(sock, ctx, security)
        return 2
    warn_if_exposed(endpoint, security)
    try:
        durability = Durability.open(state, wal_dir, wal_fsync) if wal_dir else Durability(state)
    except Exception as exc:
        print(f"xdl server: cannot recover from the write-ahead log in {wal_dir}: {exc}",
              file=sys.stderr)
        _close(sock, ctx, security)
        return 2
    if load and durability.recovered:
        log.info("--load %s not used: the write-ahead log in %s holds newer state", load,
                 wal_dir)
    elif load:
        try:
            # With a root, --load too reads only under it (without one, the operator's
            # own flag is the only way a checkpoint is read).
            path = checkpoint.resolve(under_root(state, load) if checkpoint_root else load)
            checkpoint.swap_in(state, checkpoint.stage(state, path))
            durability.loaded(path)
        except Exception as exc:
            print(f"xdl server: cannot load {load}: {exc}", file=sys.stderr)
            durability.close()
            _close(sock, ctx, security)
            return 2
    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"{P.READY_PREFIX}{endpoint}", flush=True)
    log.info("shard %d/%d serving on %s", shard, num_shards, endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    if durability.wake_fd is not None:  # a background group commit ended
        poller.register(durability.wake_fd, zmq.POLLIN)
    try:
        while not stop["flag"] and not state.stopping:
            ready = poller.poll(durability.timeout_ms(200))
            durability.tick()
            if state.parked:
                state.expire_parked(time.monotonic())
            if not ready:
                if parent_pid is not None and not _alive(parent_pid):
                    log.warning("parent process %d is gone; shard %d stops", parent_pid, shard)
                    break
                continue
            # Drain what is queued before polling again; the socket's EVENTS says whether
            # another message is there (cheaper than a receive failing with zmq.Again).
            for _ in range(64):
                try:
                    msg = codec.recv_frames(sock, zmq.NOBLOCK)
                except zmq.Again:
                    break
                size = _serve_one(state, sock, msg, durability, security)
                del msg  # the request's buffers go now, not when the next one arrives
                if size > _TRIM_ABOVE:
                    _release_memory()
                if state.stopping or not codec.readable(sock):
                    break
            durability.tick()  # group commit: one sync for what this turn drained
    finally:
        state.refuse_parked("was cut short: the shard stops")
        try:
            durability.close()
        finally:
            _close(sock, ctx, security)
        log.info("shard %d stopped", shard)
    return 0


def _close(sock: zmq.Socket, ctx: zmq.Context, security: ServerSecurity | None) -> None:
    sock.close(0)
    if security is not None:
        security.stop()
    ctx.term()


def _serve_one(state: Shard, sock: zmq.Socket, msg: list[Any], durability: Durability,
               security: ServerSecurity | None = None) -> int:
    """Hand one message to the shard; nothing that happens here stops the loop.

    Returns the message's size in bytes.
    """
    identity, body = msg[0], msg[1:]
    size = sum(len(f) for f in body)

    def send(frames: list[Any], _id: Any = identity) -> None:
        try:
            codec.send_frames(sock, [_id, *frames])
        except zmq.ZMQError as exc:  # the peer is gone or its queue is full
            log.warning("shard %d: reply not sent: %s", state.shard, exc)

    def respond(frames: list[Any]) -> None:
        durability.send(send, frames)

    try:
        refusal = security.refusal(body) if security is not None else None
        if refusal is None:  # not an admin command from a key that is not an admin's
            refusal = durability.refusal(body)  # nor sent to this shard's predecessor
        if refusal is not None:
            respond(refusal)
        else:
            state.handle(body, respond)
    except Exception:  # handle() answers every failure itself; this is the last line
        log.error("shard %d: request not served:\n%s", state.shard, traceback.format_exc())
    return size


#: Requests larger than this are followed by handing freed memory back to the system.
_TRIM_ABOVE = 64 << 20


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
