"""One parameter-server shard: the ZeroMQ service loop and its command handlers.

A shard binds one ROUTER socket and serves requests one at a time (the numba
kernels do the heavy work), so every command sees a consistent state and a
checkpoint is a snapshot. Mutating commands are applied exactly once per
``(client id, incarnation, seq)``: the shard remembers, per client, the highest
applied seq and its reply, and answers a duplicate with that reply.

Run it with ``xdl server --bind tcp://127.0.0.1:7000 --shard 0 --num-shards 2``
or ``python -m xdl.server ...``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from xdl import codec
from xdl import init as xinit
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.errors import (
    InternalError,
    InvalidArgumentError,
    ProtocolError,
    RequestTooLargeError,
    StaleClientError,
    TableExistsError,
    TableNotFoundError,
    UnknownCommandError,
    XdlError,
)
from xdl.sharding import bucket_ranges, first_outside

from . import checkpoint
from .stats import CommandStats, resident_bytes
from .table import DenseVariable, SparseTable

log = logging.getLogger("xdl.server")

READY_PREFIX = "XDL-READY "
TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")

Reply = tuple[dict[str, Any], dict[str, np.ndarray]]


def check_table_name(name: Any) -> str:
    """Return ``name`` if it is a valid table name (it becomes a checkpoint folder name)."""
    if not isinstance(name, str) or not TABLE_NAME.match(name):
        raise InvalidArgumentError(
            f"table name {name!r} is invalid: use 1-128 characters from [A-Za-z0-9_.-], "
            "not starting with '.' or '-'")
    return name


@dataclass
class ClientRecord:
    """Exactly-once state of one client: incarnation, highest applied seq, its reply."""

    incarnation: int
    hwm: int = -1
    reply: list[bytes] = field(default_factory=list)


@dataclass
class SyncState:
    """Gradient aggregation of a dense variable in synchronous mode."""

    workers: int
    grad_sum: np.ndarray
    pushed: set[str] = field(default_factory=set)


class Shard:
    """State and command handlers of one shard, independent of the transport.

    :param shard: this shard's index.
    :param num_shards: number of shards in the cluster.
    :param max_request_bytes: largest request accepted; larger ones get ``TOO_LARGE``.
    """

    def __init__(self, shard: int = 0, num_shards: int = 1,
                 max_request_bytes: int = P.DEFAULT_MAX_REQUEST_BYTES) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard index {shard} out of range for {num_shards} shards")
        self.shard = shard
        self.num_shards = num_shards
        self.max_request_bytes = max_request_bytes
        self.bucket_range = bucket_ranges(num_shards)[shard]
        self.tables: dict[str, SparseTable] = {}
        self.dense: dict[str, DenseVariable] = {}
        self.sync: dict[str, SyncState] = {}
        self.clients: dict[str, ClientRecord] = {}
        self.stats: dict[str, CommandStats] = {}
        self.started = time.time()
        self.stopping = False
        # dense pulls waiting for a version (sync mode): name -> [(min_version, respond)]
        self.parked: dict[str, list[tuple[int, Callable[[], None]]]] = {}
        self._handlers: dict[bytes, Callable[[dict[str, Any], dict[str, np.ndarray]], Reply]] = {
            P.PING: self._ping,
            P.CREATE_TABLE: self._create_table,
            P.DESCRIBE_TABLE: self._describe_table,
            P.LIST_TABLES: self._list_tables,
            P.DROP_TABLE: self._drop_table,
            P.PULL: self._pull,
            P.PUSH: self._push,
            P.DELETE: self._delete,
            P.CREATE_DENSE: self._create_dense,
            P.DENSE_PUSH: self._dense_push,
            P.STATS: self._stats,
            P.SAVE: self._save,
            P.LOAD: self._load,
            P.SHUTDOWN: self._shutdown,
        }

    # ---------------------------------------------------------------- dispatch
    def handle(self, frames: list[Any], respond: Callable[[list[Any]], None]) -> None:
        """Serve one request (its frames without the routing identity).

        ``respond`` sends reply frames; it may be kept and called later (a parked
        synchronous dense pull). Never raises: every failure becomes an error reply.
        """
        t0 = time.perf_counter()
        command = b"?"
        seq = -1
        ok = True
        try:
            size = sum(len(getattr(f, "buffer", f)) for f in frames)
            command, header, arrays = codec.decode(frames)
            seq = header.get("seq", -1) if isinstance(header.get("seq", -1), int) else -1
            if size > self.max_request_bytes:
                raise RequestTooLargeError(
                    f"request of {size} bytes exceeds this shard's limit of "
                    f"{self.max_request_bytes} bytes; split it into smaller calls")
            if command not in self._handlers and command != P.DENSE_PULL:
                raise UnknownCommandError(
                    f"unknown command {command[:32]!r}; known: "
                    f"{sorted(c.decode() for c in P.COMMANDS)}")
            cid, inc = self._identify(header)
            if command == P.DENSE_PULL:
                self._dense_pull(header, respond, seq)
                return
            if command in P.MUTATING:
                rec = self._client_record(cid, inc)
                if seq <= rec.hwm:
                    respond(self._duplicate_reply(rec, seq, command))
                    return
                reply, ok = self._run(command, header, arrays, seq)
                rec.hwm = seq
                rec.reply = reply
                respond(reply)
            else:
                reply, ok = self._run(command, header, arrays, seq)
                respond(reply)
        except XdlError as exc:
            ok = False
            respond(self._error_reply(command, seq, exc))
        finally:
            name = command.decode("ascii", "replace")[:32] if command in P.COMMANDS else "?"
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = CommandStats()
            st.record(time.perf_counter() - t0, ok)

    def _run(self, command: bytes, header: dict[str, Any], arrays: dict[str, np.ndarray],
             seq: int) -> tuple[list[Any], bool]:
        try:
            rh, ra = self._handlers[command](header, arrays)
        except XdlError as exc:
            return self._error_reply(command, seq, exc), False
        except Exception as exc:  # a bug must not take the shard down
            log.error("internal error in %s: %s", command.decode(), traceback.format_exc())
            return self._error_reply(command, seq, InternalError(
                f"{type(exc).__name__}: {exc} (shard {self.shard}; see the shard's log)")), False
        rh = {"ok": True, "seq": seq, **rh}
        return codec.encode(command, rh, ra), True

    def _error_reply(self, command: bytes, seq: int, exc: XdlError) -> list[Any]:
        return codec.encode(command if command in P.COMMANDS else b"ERROR", {
            "ok": False, "seq": seq, "code": exc.code, "message": str(exc),
            "table": exc.table})

    def _identify(self, header: dict[str, Any]) -> tuple[str, int]:
        cid, inc, seq = header.get("cid"), header.get("inc"), header.get("seq")
        if not isinstance(cid, str) or not isinstance(inc, int) or not isinstance(seq, int):
            raise ProtocolError("header must carry 'cid' (str), 'inc' (int) and 'seq' (int)")
        return cid, inc

    def _client_record(self, cid: str, inc: int) -> ClientRecord:
        rec = self.clients.get(cid)
        if rec is None or inc > rec.incarnation:
            rec = ClientRecord(incarnation=inc)
            self.clients[cid] = rec
        elif inc < rec.incarnation:
            raise StaleClientError(
                f"client {cid} incarnation {inc} is older than {rec.incarnation}, which this "
                "shard has already served; a restarted client must use a new incarnation")
        return rec

    def _duplicate_reply(self, rec: ClientRecord, seq: int, command: bytes) -> list[Any]:
        if seq == rec.hwm and rec.reply:
            _, h, arrays = codec.decode(rec.reply)
            h.pop("arrays", None)
            h["dup"] = True
            return codec.encode(command, h, arrays)
        # An older seq than the last applied one was applied (or refused) before.
        return codec.encode(command, {"ok": True, "seq": seq, "dup": True})

    # ---------------------------------------------------------------- helpers
    def _table(self, header: dict[str, Any]) -> SparseTable:
        name = header.get("table")
        table = self.tables.get(name) if isinstance(name, str) else None
        if table is None:
            raise TableNotFoundError(
                f"no table {name!r} on shard {self.shard}; existing: {sorted(self.tables)}",
                table=name if isinstance(name, str) else None)
        return table

    def _dense_var(self, header: dict[str, Any]) -> DenseVariable:
        name = header.get("name")
        var = self.dense.get(name) if isinstance(name, str) else None
        if var is None:
            raise TableNotFoundError(
                f"no dense variable {name!r} on shard {self.shard}; existing: "
                f"{sorted(self.dense)}", table=name if isinstance(name, str) else None)
        return var

    @staticmethod
    def _array(arrays: dict[str, np.ndarray], role: str, table: str | None) -> np.ndarray:
        if role not in arrays:
            raise InvalidArgumentError(f"request lacks the array {role!r}; got {sorted(arrays)}",
                                       table=table)
        return arrays[role]

    def _ids(self, arrays: dict[str, np.ndarray], table: str) -> np.ndarray:
        ids = self._array(arrays, "ids", table)
        if ids.dtype != np.int64 or ids.ndim != 1:
            raise InvalidArgumentError(
                f"field 'ids': expected int64 of rank 1, got {ids.dtype} of shape "
                f"{list(ids.shape)}", table=table)
        return ids

    def _check_owned(self, ids: np.ndarray, table: str) -> None:
        if self.num_shards == 1 or ids.size == 0:
            return
        lo, hi = self.bucket_range
        first, count = first_outside(ids, lo, hi)
        if count:
            raise InvalidArgumentError(
                f"{count} ids belong to other shards (e.g. id {int(ids[first])}); "
                f"shard {self.shard} of {self.num_shards} owns buckets [{lo}, {hi}): the "
                "client's server list must be in shard order", table=table)

    # ---------------------------------------------------------------- commands
    def _ping(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        return {"shard": self.shard, "num_shards": self.num_shards,
                "version": P.VERSION, "pid": os.getpid()}, {}

    def _create_table(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        name = check_table_name(header.get("table"))
        dim = header.get("dim")
        if not isinstance(dim, int) or not 1 <= dim <= 65536:
            raise InvalidArgumentError(f"field 'dim': expected an int in [1, 65536], got {dim!r}",
                                       table=name)
        seed = header.get("seed", 0)
        if not isinstance(seed, int):
            raise InvalidArgumentError(f"field 'seed': expected int, got {seed!r}", table=name)
        initializer = xinit.from_dict(header.get("initializer") or {"kind": "zeros"})
        optimizer = xoptim.from_dict(header.get("optimizer") or {"kind": "sgd", "lr": 0.01})
        existing = self.tables.get(name)
        if existing is not None:
            want = SparseTable(name, dim, initializer, optimizer, seed=seed, capacity=1)
            if existing.spec_dict() != want.spec_dict():
                raise TableExistsError(
                    f"table exists with other settings: existing {existing.spec_dict()}, "
                    f"requested {want.spec_dict()}", table=name)
            return {"created": False}, {}
        self.tables[name] = SparseTable(name, dim, initializer, optimizer, seed=seed)
        return {"created": True}, {}

    def _describe_table(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        return {"table": self._table(header).describe()}, {}

    def _list_tables(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        return {"tables": sorted(self.tables), "dense": sorted(self.dense)}, {}

    def _drop_table(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        name = header.get("table")
        if isinstance(name, str) and name in self.dense:
            del self.dense[name]
            self.sync.pop(name, None)
            return {"dropped": True}, {}
        self._table(header)
        del self.tables[name]  # type: ignore[arg-type]
        return {"dropped": True}, {}

    def _pull(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        table = self._table(header)
        ids = self._ids(arrays, table.name)
        self._check_owned(ids, table.name)
        return {}, {"rows": table.pull(ids)}

    def _push(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        table = self._table(header)
        ids = self._ids(arrays, table.name)
        grads = self._array(arrays, "grads", table.name)
        self._check_owned(ids, table.name)
        table.push(ids, grads)
        return {"step": table.step}, {}

    def _delete(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        table = self._table(header)
        ids = self._ids(arrays, table.name)
        return {"deleted": table.delete(ids)}, {}

    def _create_dense(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        name = check_table_name(header.get("name"))
        shape = header.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise InvalidArgumentError(f"field 'shape': expected a list of positive ints, got "
                                       f"{shape!r}", table=name)
        workers = header.get("sync_workers", 0)
        if not isinstance(workers, int) or workers < 0:
            raise InvalidArgumentError(f"field 'sync_workers': expected an int >= 0, got "
                                       f"{workers!r}", table=name)
        optimizer = xoptim.from_dict(header.get("optimizer") or {"kind": "sgd", "lr": 0.01})
        initial = arrays.get("initial")
        if initial is not None and list(initial.shape) != shape:
            raise InvalidArgumentError(f"array 'initial': expected shape {shape}, got "
                                       f"{list(initial.shape)}", table=name)
        if name in self.dense:
            var = self.dense[name]
            if list(var.shape) != shape:
                raise TableExistsError(f"dense variable exists with shape {list(var.shape)}, "
                                       f"requested {shape}", table=name)
            return {"created": False, "version": var.version}, {}
        var = DenseVariable(name, tuple(shape), optimizer,
                            None if initial is None else np.array(initial, dtype=np.float32))
        self.dense[name] = var
        if workers:
            self.sync[name] = SyncState(workers, np.zeros(var.shape, dtype=np.float32))
        return {"created": True, "version": var.version}, {}

    def _dense_pull(self, header: dict[str, Any], respond: Callable[[list[Any]], None],
                    seq: int) -> None:
        var = self._dense_var(header)
        min_version = header.get("min_version") or 0

        def answer() -> None:
            respond(codec.encode(P.DENSE_PULL, {"ok": True, "seq": seq, "version": var.version},
                                 {"value": var.pull()}))

        if var.version >= min_version:
            answer()
        else:
            self.parked.setdefault(var.name, []).append((int(min_version), answer))

    def _dense_push(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        var = self._dense_var(header)
        grad = self._array(arrays, "grad", var.name)
        if tuple(grad.shape) != tuple(var.shape) or grad.dtype != np.float32:
            raise InvalidArgumentError(
                f"field 'grad': expected float32 of shape {list(var.shape)}, got {grad.dtype} "
                f"of shape {list(grad.shape)}", table=var.name)
        if not np.isfinite(grad).all():
            raise InvalidArgumentError("field 'grad' holds NaN or Inf values; nothing applied",
                                       table=var.name)
        sync = self.sync.get(var.name)
        if sync is None:
            var.apply(grad)
        else:
            step = header.get("step")
            if step != var.version:
                raise InvalidArgumentError(
                    f"synchronous push for step {step!r}, but the variable is at step "
                    f"{var.version}: pull the current value before pushing", table=var.name)
            worker = header["cid"]
            if worker in sync.pushed:
                raise InvalidArgumentError(f"worker {worker} already pushed step {step}",
                                           table=var.name)
            sync.grad_sum += grad
            sync.pushed.add(worker)
            if len(sync.pushed) >= sync.workers:
                var.apply(sync.grad_sum / np.float32(sync.workers))
                sync.grad_sum[...] = 0
                sync.pushed.clear()
        self._release_parked(var)
        return {"version": var.version}, {}

    def _release_parked(self, var: DenseVariable) -> None:
        waiting = self.parked.get(var.name)
        if not waiting:
            return
        ready = [w for w in waiting if w[0] <= var.version]
        self.parked[var.name] = [w for w in waiting if w[0] > var.version]
        for _, answer in ready:
            answer()

    def _stats(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        tables = {n: {"rows": len(t), "bytes": t.nbytes, "dim": t.dim, "step": t.step}
                  for n, t in self.tables.items()}
        dense = {n: {"bytes": v.nbytes, "version": v.version} for n, v in self.dense.items()}
        return {
            "shard": self.shard, "num_shards": self.num_shards, "pid": os.getpid(),
            "uptime_s": time.time() - self.started, "resident_bytes": resident_bytes(),
            "tables": tables, "dense": dense, "clients": len(self.clients),
            "requests": {k: v.summary() for k, v in self.stats.items()},
        }, {}

    def _save(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        path = header.get("dir")
        if not isinstance(path, str):
            raise InvalidArgumentError(f"field 'dir': expected a path, got {path!r}")
        files = checkpoint.save_shard(self, path)
        return {"files": files}, {}

    def _load(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        path = header.get("dir")
        if not isinstance(path, str):
            raise InvalidArgumentError(f"field 'dir': expected a path, got {path!r}")
        tables, dense, clients = checkpoint.load_shard(self, path)
        # Swap in only once everything was read and verified: nothing half-applied.
        self.tables, self.dense, self.clients = tables, dense, clients
        self.sync = {}
        self.parked = {}
        return {"tables": sorted(tables), "dense": sorted(dense),
                "rows": sum(len(t) for t in tables.values())}, {}

    def _shutdown(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        self.stopping = True
        return {"stopping": True}, {}


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


def serve(bind: str, shard: int = 0, num_shards: int = 1, *,
          max_request_bytes: int = P.DEFAULT_MAX_REQUEST_BYTES,
          parent_pid: int | None = None, load: str | None = None) -> int:
    """Run one shard until SHUTDOWN, SIGTERM or SIGINT (or the parent process dies).

    Prints ``XDL-READY <endpoint>`` on stdout once the kernels are compiled and the
    socket is bound (``tcp://127.0.0.1:0`` binds a free port and prints it).
    """
    state = Shard(shard, num_shards, max_request_bytes)
    warm_up()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    # Hard ceiling below which the shard answers TOO_LARGE itself; beyond it ZeroMQ drops
    # the connection instead of buffering gigabytes.
    sock.setsockopt(zmq.MAXMSGSIZE, max(4 * max_request_bytes, 1 << 26))
    try:
        if bind.endswith(":0"):
            port = sock.bind_to_random_port(bind[: bind.rindex(":")])
            endpoint = f"{bind[: bind.rindex(':')]}:{port}"
        else:
            sock.bind(bind)
            endpoint = bind
    except zmq.ZMQError as exc:
        print(f"xdl server: cannot bind {bind}: {exc}", file=sys.stderr)
        sock.close(0)
        ctx.term()
        return 2
    if load:
        state.tables, state.dense, state.clients = checkpoint.load_shard(
            state, checkpoint.resolve(load))
    stop = {"flag": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"{READY_PREFIX}{endpoint}", flush=True)
    log.info("shard %d/%d serving on %s", shard, num_shards, endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while not stop["flag"] and not state.stopping:
            if not poller.poll(200):
                if parent_pid is not None and not _alive(parent_pid):
                    log.warning("parent process %d is gone; shard %d stops", parent_pid, shard)
                    break
                continue
            # Drain what is queued before polling again.
            for _ in range(64):
                try:
                    msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                identity, body = msg[0], msg[1:]

                def respond(frames: list[Any], _id: Any = identity) -> None:
                    sock.send_multipart([_id, *frames], copy=False)

                state.handle(body, respond)
                if state.stopping:
                    break
    finally:
        sock.close(0)
        ctx.term()
        log.info("shard %d stopped", shard)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
