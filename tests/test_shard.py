"""The shard's command handlers in-process: exactly-once pushes and bad input.

Every bad request must get an error reply naming what was wrong, leave the shard's
state untouched, and leave the shard serving.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from xdl import codec
from xdl import init as xinit
from xdl import optim as xoptim
from xdl import protocol as P
from xdl.server.shard import Shard


class Caller:
    """Sends requests to an in-process shard as one client would."""

    def __init__(self, shard: Shard, cid: str = "c1", inc: int = 1) -> None:
        self.shard, self.cid, self.inc, self.seq = shard, cid, inc, 0

    def frames(self, command: bytes, header: dict[str, Any] | None = None,
               arrays: dict[str, np.ndarray] | None = None, seq: int | None = None) -> list[Any]:
        if seq is None:
            self.seq += 1
            seq = self.seq
        h = {"cid": self.cid, "inc": self.inc, "seq": seq, **(header or {})}
        return [bytes(memoryview(f)) for f in codec.encode(command, h, arrays)]

    def send_frames(self, frames: list[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        out: list[list[Any]] = []
        self.shard.handle(frames, out.append)
        assert len(out) == 1
        _, header, arrays = codec.decode([bytes(memoryview(f)) for f in out[0]])
        return header, arrays

    def __call__(self, command: bytes, header: dict[str, Any] | None = None,
                 arrays: dict[str, np.ndarray] | None = None, seq: int | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self.send_frames(self.frames(command, header, arrays, seq))


@pytest.fixture
def call() -> Caller:
    c = Caller(Shard())
    h, _ = c(P.CREATE_TABLE, {"table": "emb", "dim": 4, "seed": 3,
                              "initializer": xinit.Normal(stddev=0.1).to_dict(),
                              "optimizer": xoptim.Adagrad(lr=0.1).to_dict()})
    assert h["ok"], h
    return c


def table_state(call: Caller) -> dict[str, np.ndarray]:
    arrays = call.shard.tables["emb"].export()
    order = np.argsort(arrays["keys"])
    return {k: np.array(v)[order] for k, v in arrays.items()}


def test_pull_push_applies_the_optimizer(call: Caller) -> None:
    ids = np.array([1, 2, 3], dtype=np.int64)
    _, a = call(P.PULL, {"table": "emb"}, {"ids": ids})
    before = a["rows"].copy()
    np.testing.assert_array_equal(before, xinit.generate(xinit.Normal(stddev=0.1), 3, ids, 4))
    g = np.ones((3, 4), dtype=np.float32)
    h, _ = call(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    assert h["ok"]
    _, a = call(P.PULL, {"table": "emb"}, {"ids": ids})
    # Adagrad (torch): acc = 1, w -= 0.1 * 1 / (1 + 1e-10)
    np.testing.assert_allclose(a["rows"], before - 0.1, atol=1e-6)


def test_duplicate_push_is_acknowledged_and_not_applied(call: Caller) -> None:
    ids = np.array([7, 8], dtype=np.int64)
    frames = call.frames(P.PUSH, {"table": "emb"},
                         {"ids": ids, "grads": np.full((2, 4), 0.5, np.float32)})
    h1, _ = call.send_frames(frames)
    state = table_state(call)
    h2, _ = call.send_frames(frames)  # the same request again: a retried send
    assert h1["ok"] and h2["ok"] and h2.get("dup") is True and not h1.get("dup")
    assert h2["step"] == h1["step"]  # the stored reply is replayed
    after = table_state(call)
    for k in state:
        np.testing.assert_array_equal(state[k], after[k])


def test_older_seq_after_newer_is_not_applied(call: Caller) -> None:
    ids = np.array([7], dtype=np.int64)
    g = np.ones((1, 4), np.float32)
    old = call.frames(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    call(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    state = table_state(call)
    h, _ = call.send_frames(old)
    assert h["ok"] and h["dup"]
    np.testing.assert_array_equal(state["values"], table_state(call)["values"])


def test_new_incarnation_resets_and_old_incarnation_is_refused(call: Caller) -> None:
    g = np.ones((1, 4), np.float32)
    ids = np.array([1], dtype=np.int64)
    call(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    restarted = Caller(call.shard, cid="c1", inc=2)
    h, _ = restarted(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    assert h["ok"] and not h.get("dup")  # seq 1 again, but a new incarnation
    h, _ = call(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": g})
    assert not h["ok"] and h["code"] == "STALE_CLIENT"


BAD_PUSHES = [
    ({"table": "nope"}, {"ids": np.array([1]), "grads": np.ones((1, 4), np.float32)},
     "NO_SUCH_TABLE", "no table 'nope'"),
    ({"table": "emb"}, {"ids": np.array([1, 2]), "grads": np.ones((2, 3), np.float32)},
     "INVALID_ARGUMENT", "4"),
    ({"table": "emb"}, {"ids": np.array([1, 2]), "grads": np.ones((3, 4), np.float32)},
     "INVALID_ARGUMENT", "2"),
    ({"table": "emb"}, {"ids": np.array([1, 2]), "grads": np.ones((2, 4), np.float64)},
     "INVALID_ARGUMENT", "float32"),
    ({"table": "emb"}, {"ids": np.array([1.0, 2.0]), "grads": np.ones((2, 4), np.float32)},
     "INVALID_ARGUMENT", "int64"),
    ({"table": "emb"}, {"ids": np.array([1, 2]),
                        "grads": np.array([[0, 0, 0, np.nan]] * 2, np.float32)},
     "INVALID_ARGUMENT", "finite|NaN"),
    ({"table": "emb"}, {"ids": np.array([1, 2]),
                        "grads": np.array([[np.inf, 0, 0, 0]] * 2, np.float32)},
     "INVALID_ARGUMENT", "finite|Inf"),
    ({"table": "emb"}, {"ids": np.array([3, 3]), "grads": np.ones((2, 4), np.float32)},
     "INVALID_ARGUMENT", "unique|duplicate"),
    ({"table": "emb"}, {"ids": np.array([1])}, "INVALID_ARGUMENT", "grads"),
]


@pytest.mark.parametrize("header, arrays, code, match", BAD_PUSHES)
def test_bad_push_is_refused_and_changes_nothing(call: Caller, header: dict[str, Any],
                                                 arrays: dict[str, np.ndarray], code: str,
                                                 match: str) -> None:
    call(P.PULL, {"table": "emb"}, {"ids": np.array([1, 2, 3], dtype=np.int64)})
    state = table_state(call)
    h, _ = call(P.PUSH, header, arrays)
    assert not h["ok"] and h["code"] == code, h
    import re
    assert re.search(match, h["message"]), h["message"]
    after = table_state(call)
    for k in state:
        np.testing.assert_array_equal(state[k], after[k])
    h, _ = call(P.PING)
    assert h["ok"]


@pytest.mark.parametrize("frames, code", [
    ([], "PROTOCOL"),
    ([P.MAGIC], "PROTOCOL"),
    ([b"GET / HTTP/1.1", b"", b""], "PROTOCOL"),
    ([b"XDL\x02", P.PING, codec.packb({})], "PROTOCOL"),
    ([P.MAGIC, b"FROBNICATE", codec.packb({"cid": "c", "inc": 1, "seq": 1})], "UNKNOWN_COMMAND"),
    ([P.MAGIC, P.PULL, codec.packb({"cid": "c", "inc": 1, "seq": 1, "table": "emb",
                                    "arrays": [["ids", "<i8", [2]]]}), b"\0" * 3], "PROTOCOL"),
    ([P.MAGIC, P.PULL, codec.packb({"table": "emb"})], "PROTOCOL"),
])
def test_malformed_requests_get_error_replies(call: Caller, frames: list[bytes],
                                              code: str) -> None:
    h, _ = call.send_frames(frames)
    assert not h["ok"] and h["code"] == code, h
    assert call(P.PING)[0]["ok"]


def test_oversize_request_is_refused() -> None:
    c = Caller(Shard(max_request_bytes=1024))
    c(P.CREATE_TABLE, {"table": "t", "dim": 2})
    h, _ = c(P.PULL, {"table": "t"}, {"ids": np.arange(1000, dtype=np.int64)})
    assert not h["ok"] and h["code"] == "TOO_LARGE" and "1024" in h["message"]
    assert c(P.PULL, {"table": "t"}, {"ids": np.arange(10, dtype=np.int64)})[0]["ok"]


def test_create_table_conflicts_and_bad_names(call: Caller) -> None:
    h, _ = call(P.CREATE_TABLE, {"table": "emb", "dim": 8})
    assert h["code"] == "TABLE_EXISTS"
    h, _ = call(P.CREATE_TABLE, {"table": "../etc", "dim": 8})
    assert h["code"] == "INVALID_ARGUMENT" and "invalid" in h["message"]
    h, _ = call(P.CREATE_TABLE, {"table": "x", "dim": 0})
    assert h["code"] == "INVALID_ARGUMENT" and "dim" in h["message"]
    h, _ = call(P.CREATE_TABLE, {"table": "x", "dim": 2, "optimizer": {"kind": "lion"}})
    assert not h["ok"] and "lion" in h["message"]


def test_ids_of_another_shard_are_refused() -> None:
    from xdl.sharding import shard_of

    c = Caller(Shard(0, 2))
    c(P.CREATE_TABLE, {"table": "t", "dim": 2})
    ids = np.arange(100, dtype=np.int64)
    h, _ = c(P.PULL, {"table": "t"}, {"ids": ids})
    assert h["code"] == "INVALID_ARGUMENT" and "shard order" in h["message"]
    mine = ids[shard_of(ids, 2) == 0]
    assert c(P.PULL, {"table": "t"}, {"ids": mine})[0]["ok"]


def test_dense_sync_mode_aggregates_workers() -> None:
    shard = Shard()
    w1, w2 = Caller(shard, "w1"), Caller(shard, "w2")
    h, _ = w1(P.CREATE_DENSE, {"name": "fc", "shape": [2], "sync_workers": 2,
                               "optimizer": xoptim.SGD(lr=1.0).to_dict()},
              {"initial": np.zeros(2, np.float32)})
    assert h["ok"]
    parked: list[list[Any]] = []
    shard.handle(w1.frames(P.DENSE_PULL, {"name": "fc", "min_version": 1}), parked.append)
    assert parked == []  # waits for step 1
    w1(P.DENSE_PUSH, {"name": "fc", "step": 0}, {"grad": np.array([1, 2], np.float32)})
    assert parked == []
    h, _ = w2(P.DENSE_PUSH, {"name": "fc", "step": 0}, {"grad": np.array([3, 4], np.float32)})
    assert h["version"] == 1 and len(parked) == 1
    _, rh, ra = codec.decode([bytes(memoryview(f)) for f in parked[0]])
    np.testing.assert_allclose(ra["value"], [-2.0, -3.0])
    h, _ = w1(P.DENSE_PUSH, {"name": "fc", "step": 0}, {"grad": np.ones(2, np.float32)})
    assert h["code"] == "INVALID_ARGUMENT" and "step" in h["message"]


def test_every_command_has_one_handler() -> None:
    from xdl.server.shard import HANDLERS

    assert set(HANDLERS) == set(P.COMMANDS)


def test_optimizer_kinds_map_to_kernels() -> None:
    from xdl.server import optimizers

    for kind in ("sgd", "momentum", "adagrad", "adam", "rmsprop", "ftrl"):
        assert optimizers.kernel_for(xoptim.from_dict({"kind": kind, "lr": 0.1})) \
            is optimizers.KERNELS[kind]


def test_plugin_optimizer_becomes_an_entry_of_the_kernel_map() -> None:
    from typing import ClassVar

    from xdl.server import optimizers

    class Halve(xoptim.Optimizer):
        kind: ClassVar[str] = "test_halve"

        def update(self, values: Any, slots: Any, rows: Any, grads: Any, step: int) -> None:
            values[rows] *= 0.5

    values = np.ones((3, 2), np.float32)
    optimizers.apply(Halve(), values, {}, np.array([1]), np.zeros((1, 2), np.float32), 1)
    np.testing.assert_array_equal(values[:, 0], [1.0, 0.5, 1.0])
    assert "test_halve" in optimizers.KERNELS


def test_refused_push_stays_refused_on_resend(call: Caller, tmp_path: Any) -> None:
    ids = np.array([7], dtype=np.int64)
    bad = call.frames(P.PUSH, {"table": "emb"}, {"ids": ids,
                                                 "grads": np.full((1, 4), np.nan, np.float32)})
    good = call.frames(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": np.ones((1, 4), np.float32)})
    h, _ = call.send_frames(bad)
    assert h["code"] == "INVALID_ARGUMENT" and "NaN" in h["message"]
    assert call.send_frames(good)[0]["ok"]
    state = table_state(call)
    for frames in (bad, good, bad):  # resends of both, below the high-water mark
        h, _ = call.send_frames(frames)
        assert h["dup"] is True
    h, _ = call.send_frames(bad)
    assert not h["ok"] and h["code"] == "INVALID_ARGUMENT" and "NaN" in h["message"]
    assert call.send_frames(good)[0]["ok"]
    np.testing.assert_array_equal(state["values"], table_state(call)["values"])
    # The outcome survives a checkpoint: a restored shard still refuses the resend.
    from xdl import ckpt_layout
    from xdl.server import checkpoint

    call.shard.checkpoint_root = str(tmp_path)
    tmp = ckpt_layout.begin(str(tmp_path))
    h, _ = call(P.SAVE, {"dir": tmp})
    ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [h])
    restored = Shard(checkpoint_root=str(tmp_path))
    checkpoint.swap_in(restored, checkpoint.stage(restored, ckpt_layout.resolve(str(tmp_path))))
    again = Caller(restored)
    h, _ = again.send_frames(bad)
    assert not h["ok"] and "NaN" in h["message"] and h["dup"]
    h, _ = again.send_frames(good)
    assert h["ok"] and h["dup"]


def test_outcomes_older_than_the_refusal_window_are_not_guessed(call: Caller) -> None:
    from xdl.server.exactly_once import REFUSED_WINDOW

    nan = np.full((1, 4), np.nan, np.float32)
    ids = np.array([1], dtype=np.int64)
    first = call.frames(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": nan})
    call.send_frames(first)
    for _ in range(REFUSED_WINDOW):
        call(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": nan})
    h, _ = call.send_frames(first)  # its refusal has left the window
    assert not h["ok"] and h["code"] == "STALE_CLIENT" and "no longer knows" in h["message"]
