"""Handlers of dense variables: create, pull (possibly waiting for a version), push.

In synchronous mode (``sync_workers`` > 0) a variable sums the gradients of every
worker for a step and applies their mean once all have pushed; a ``DENSE_PULL`` with
``min_version`` above the current version waits ("parks") until then. Parked pulls
are bounded in number (:attr:`ShardState.max_parked`) and each has a deadline, after
which it is answered with ``DEADLINE``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from xdl import codec
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.errors import DeadlineExceededError, InvalidArgumentError, TableExistsError

from .fields import array, int_field, name_field, spec_field
from .state import ParkedPull, Reply, Request, ShardState, SyncState
from .table import DenseVariable

#: Largest version a pull may wait for (far beyond any run; keeps the field a sane int).
MAX_VERSION = (1 << 62)


def create_dense(state: ShardState, req: Request) -> Reply:
    """Create a dense variable, or confirm one of the same shape exists."""
    h = req.header
    name = name_field(h, "name", "dense variable")
    shape = h.get("shape")
    if (not isinstance(shape, list) or not 0 < len(shape) <= P.MAX_RANK
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= P.MAX_DIM
                       for s in shape)):
        raise InvalidArgumentError(f"field 'shape': expected a list of 1 to {P.MAX_RANK} "
                                   f"positive ints, got {shape!r:.80}", table=name)
    # A variable must fit in one request and one reply: bound its size by the request cap.
    size = math.prod(shape)
    if size * 4 > state.max_request_bytes:
        raise InvalidArgumentError(
            f"field 'shape': {shape} holds {size} float32 values, more than one request of "
            f"at most {state.max_request_bytes} bytes can carry; split the variable",
            table=name)
    workers = int_field(h, "sync_workers", 0, 1 << 20, default=0, table=name)
    optimizer = xoptim.from_dict(spec_field(h, "optimizer", {"kind": "sgd", "lr": 0.01}, name))
    initial = req.arrays.get("initial")
    if initial is not None and (list(initial.shape) != shape or initial.dtype.kind != "f"):
        raise InvalidArgumentError(f"array 'initial': expected float of shape {shape}, got "
                                   f"{initial.dtype} of shape {list(initial.shape)}", table=name)
    existing = state.dense.get(name)
    if existing is not None:
        if list(existing.shape) != shape:
            raise TableExistsError(f"dense variable exists with shape {list(existing.shape)}, "
                                   f"requested {shape}", table=name)
        return {"created": False, "version": existing.version}, {}
    var = DenseVariable(name, tuple(shape), optimizer,
                        None if initial is None else np.array(initial, dtype=np.float32))
    state.dense[name] = var
    if workers:
        state.sync[name] = SyncState(workers, np.zeros(var.shape, dtype=np.float32))
    return {"created": True, "version": var.version}, {}


def dense_pull(state: ShardState, req: Request) -> Reply | None:
    """The value once the version reaches ``min_version`` (at once, or parked until then)."""
    var = state.dense_var(req.header.get("name"))
    min_version = int_field(req.header, "min_version", 0, MAX_VERSION, default=0,
                            table=var.name)
    if var.version >= min_version:
        return {"version": var.version}, {"value": var.pull()}
    if state.parked_count() >= state.max_parked:
        raise InvalidArgumentError(
            f"{state.max_parked} dense pulls already wait on shard {state.shard}; a pull for "
            f"version {min_version} (now {var.version}) cannot wait too: are the "
            "workers' sync_workers settings right?", table=var.name)
    seq, respond, name = req.seq, req.respond, var.name

    def answer() -> None:
        current = state.dense.get(name)
        if current is None:
            refuse("its dense variable is gone")
            return
        respond(codec.encode(P.DENSE_PULL, {"ok": True, "seq": seq, "version": current.version},
                             {"value": current.pull()}))

    def refuse(why: str) -> None:
        exc = DeadlineExceededError(f"dense pull for version {min_version} {why}", table=name)
        respond(codec.encode(P.DENSE_PULL, {"ok": False, "seq": seq, "code": exc.code,
                                            "message": str(exc), "table": name}))

    state.parked.setdefault(name, []).append(ParkedPull(
        min_version, time.monotonic() + state.park_timeout_s, answer, refuse))
    return None


def dense_push(state: ShardState, req: Request) -> Reply:
    """Apply a gradient (async mode) or add it to the step's sum (sync mode)."""
    var = state.dense_var(req.header.get("name"))
    grad = array(req, "grad", var.name)
    if tuple(grad.shape) != tuple(var.shape) or grad.dtype != np.float32:
        raise InvalidArgumentError(
            f"field 'grad': expected float32 of shape {list(var.shape)}, got {grad.dtype} "
            f"of shape {list(grad.shape)}", table=var.name)
    if not np.isfinite(grad).all():
        raise InvalidArgumentError("field 'grad' holds NaN or Inf values; nothing applied",
                                   table=var.name)
    sync = state.sync.get(var.name)
    if sync is None:
        var.apply(grad)
    else:
        step = req.header.get("step")
        if isinstance(step, bool) or step != var.version:
            raise InvalidArgumentError(
                f"synchronous push for step {step!r:.40}, but the variable is at step "
                f"{var.version}: pull the current value before pushing", table=var.name)
        if req.cid in sync.pushed:
            raise InvalidArgumentError(f"worker {req.cid} already pushed step {step}",
                                       table=var.name)
        sync.grad_sum += grad
        sync.pushed.add(req.cid)
        if len(sync.pushed) >= sync.workers:
            var.apply(sync.grad_sum / np.float32(sync.workers))
            sync.grad_sum[...] = 0
            sync.pushed.clear()
    state.release_parked(var.name, var.version)
    return {"version": var.version}, {}


HANDLERS = {P.CREATE_DENSE: create_dense, P.DENSE_PULL: dense_pull, P.DENSE_PUSH: dense_push}
