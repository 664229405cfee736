"""What a shard must do with any input, checked in-process (hypothesis suite, atheris target).

:func:`check_request` hands one message to a shard and asserts the contract of
:mod:`xdl.server.dispatch`: the shard does not raise or hang, answers with exactly one
decodable reply (none only for a ``DENSE_PULL`` that waits for a version), and a
refused request leaves tables, dense variables, sync sums and waiting pulls as they
were. The exactly-once records and request counters may change (a refused push is
remembered as refused); nothing else may.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xdl import codec
from xdl import init as xinit
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.server.shard import Shard

CID = "oracle"


def request(command: bytes, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
            seq: int = 1, cid: str = CID) -> list[bytes]:
    """The frames of one well-formed request (from client :data:`CID` by default)."""
    h = {"cid": cid, "inc": 1, "seq": seq, **header}
    return [bytes(memoryview(f)) for f in codec.encode(command, h, arrays)]


def fresh_shard() -> Shard:
    """A shard with a table (``emb``, 20 rows), an async and a sync dense variable."""
    shard = Shard(0, 1, max_request_bytes=1 << 20, max_parked=4, park_timeout_s=0.2)
    setup: list[tuple[bytes, dict[str, Any], dict[str, np.ndarray] | None]] = [
        (P.CREATE_TABLE, {"table": "emb", "dim": 4, "seed": 3,
                          "initializer": xinit.Normal(stddev=0.1).to_dict(),
                          "optimizer": xoptim.Adagrad(lr=0.1).to_dict()}, None),
        (P.PUSH, {"table": "emb"}, {"ids": np.arange(20, dtype=np.int64),
                                    "grads": np.ones((20, 4), np.float32)}),
        (P.CREATE_DENSE, {"name": "fc", "shape": [3, 2],
                          "optimizer": xoptim.SGD(lr=0.5).to_dict()}, None),
        (P.CREATE_DENSE, {"name": "sync", "shape": [2], "sync_workers": 2}, None),
    ]
    for seq, (command, header, arrays) in enumerate(setup, 1):
        out: list[list[Any]] = []
        shard.handle(request(command, header, arrays, seq=seq, cid="setup"), out.append)
        assert codec.decode(out[0])[1]["ok"], codec.decode(out[0])[1]
    return shard


def snapshot(shard: Shard) -> tuple[Any, ...]:
    """Everything a refused request must leave unchanged, as comparable values."""
    tables = {}
    for name, t in shard.tables.items():
        arrays = t.export()
        order = np.argsort(arrays["keys"], kind="stable")
        tables[name] = (repr(t.spec_dict()), t.step,
                        tuple((k, a[order].tobytes()) for k, a in sorted(arrays.items())))
    dense = {name: (v.pull().tobytes(), v.version, tuple(v.shape),
                    tuple((s, a.tobytes()) for s, a in sorted(v.slots.items())))
             for name, v in shard.dense.items()}
    sync = {name: (s.workers, s.grad_sum.tobytes(), tuple(sorted(s.pushed)))
            for name, s in shard.sync.items()}
    return (tables, dense, sync, shard.parked_count(), shard.staged is None)


def check_request(shard: Shard, frames: list[Any], compare: bool = True) -> dict[str, Any] | None:
    """Serve ``frames`` on ``shard`` and assert the contract; returns the reply header.

    ``compare=False`` skips the state comparison (cheaper, for long fuzzing runs).
    """
    before = snapshot(shard) if compare else None
    out: list[list[Any]] = []
    shard.handle(list(frames), out.append)  # must not raise
    assert len(out) <= 1, f"{len(out)} replies to one request"
    if not out:
        # Only a DENSE_PULL waiting for a version answers later.
        assert len(frames) > 1 and bytes(frames[1]) == P.DENSE_PULL, frames[:2]
        assert shard.parked_count() > 0
        return None
    _, header, _ = codec.decode([bytes(memoryview(f)) for f in out[0]])
    assert isinstance(header.get("ok"), bool), header
    if not header["ok"]:
        assert header.get("code") in P.ERROR_CODES, header
        assert isinstance(header.get("message"), str) and header["message"], header
        assert header["code"] != "INTERNAL", header["message"]
        if compare:
            assert snapshot(shard) == before, f"refused request changed state: {header}"
    return header


def still_serving(shard: Shard) -> None:
    """The shard answers a PING."""
    out: list[list[Any]] = []
    shard.handle(request(P.PING, {}), out.append)
    assert codec.decode(out[0])[1]["ok"]
