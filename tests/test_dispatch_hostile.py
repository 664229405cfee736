"""Messages that used to kill a shard (issue 10): each gets an error reply naming what
was wrong, changes nothing, and the shard keeps serving."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import pytest

from xdl import codec
from xdl import protocol as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
from shard_oracle import check_request, fresh_shard, request, still_serving  # noqa: E402


def raw(command: bytes, header: dict[str, Any], payload: list[bytes]) -> list[bytes]:
    """A request whose header (array descriptors included) is sent exactly as given."""
    return [P.MAGIC, command, codec.packb({"cid": "x", "inc": 1, "seq": 7, **header}),
            *payload]


HOSTILE = {
    "dtype is a list": raw(P.PULL, {"table": "emb", "arrays": [["ids", ["<i8"], [2]]]},
                           [b"\0" * 16]),
    "dtype is a map": raw(P.PULL, {"table": "emb", "arrays": [["ids", {"a": 1}, [2]]]},
                          [b"\0" * 16]),
    "shape product wraps int64": raw(P.PULL, {"table": "emb", "arrays": [
        ["ids", "<i8", [2 ** 62, 4]]]}, [b""]),
    "shape of 2**64-1": raw(P.PULL, {"table": "emb", "arrays": [
        ["ids", "<i8", [0, 2 ** 64 - 1]]]}, [b""]),
    "33 dimensions": raw(P.PULL, {"table": "emb", "arrays": [["ids", "<i8", [1] * 33]]},
                         [b"\0" * 8]),
    "negative dimension": raw(P.PULL, {"table": "emb", "arrays": [["ids", "<i8", [-1]]]},
                              [b""]),
    "float dimension": raw(P.PULL, {"table": "emb", "arrays": [["ids", "<i8", [2.5]]]},
                           [b"\0" * 16]),
    "role twice": raw(P.PULL, {"table": "emb", "arrays": [["ids", "<i8", [1]],
                                                          ["ids", "<i8", [1]]]},
                      [b"\0" * 8, b"\0" * 8]),
    "descriptor not a list": raw(P.PULL, {"table": "emb", "arrays": ["ids"]}, [b""]),
    "min_version x": request(P.DENSE_PULL, {"name": "fc", "min_version": "x"}),
    "min_version inf": request(P.DENSE_PULL, {"name": "fc", "min_version": float("inf")}),
    "min_version nan": request(P.DENSE_PULL, {"name": "fc", "min_version": float("nan")}),
    "min_version true": request(P.DENSE_PULL, {"name": "fc", "min_version": True}),
    "dense of 2**64 values": request(P.CREATE_DENSE, {"name": "big", "shape": [2 ** 32, 2 ** 32]}),
    "dense of 9 dimensions": request(P.CREATE_DENSE, {"name": "big", "shape": [1] * 9}),
    "dense shape of bools": request(P.CREATE_DENSE, {"name": "big", "shape": [True, 2]}),
    "name with a newline": request(P.CREATE_TABLE, {"table": "emb2\n", "dim": 2}),
    "name that climbs": request(P.CREATE_TABLE, {"table": "..", "dim": 2}),
    "dim of 2**64-1": request(P.CREATE_TABLE, {"table": "t2", "dim": 2 ** 64 - 1}),
    "seed a float": request(P.CREATE_TABLE, {"table": "t2", "dim": 2, "seed": 1.5}),
    "optimizer not a map": request(P.CREATE_TABLE, {"table": "t2", "dim": 2, "optimizer": [1]}),
    "optimizer lr a string": request(P.CREATE_TABLE, {"table": "t2", "dim": 2,
                                                      "optimizer": {"kind": "sgd", "lr": "x"}}),
    "uint64 ids": request(P.PULL, {"table": "emb"},
                          {"ids": np.array([2 ** 63 + 5], np.uint64)}),
    "ids of rank 2": request(P.PUSH, {"table": "emb"}, {"ids": np.zeros((2, 1), np.int64),
                                                        "grads": np.zeros((2, 4), np.float32)}),
    "grads NaN": request(P.PUSH, {"table": "emb"}, {"ids": np.arange(2, dtype=np.int64),
                                                    "grads": np.full((2, 4), np.nan, np.float32)}),
    "grads of another width": request(P.PUSH, {"table": "emb"}, {
        "ids": np.arange(2, dtype=np.int64), "grads": np.zeros((2, 3), np.float32)}),
    "duplicate push ids": request(P.PUSH, {"table": "emb"}, {
        "ids": np.zeros(2, np.int64), "grads": np.zeros((2, 4), np.float32)}),
    "seq a string": raw(P.PING, {"seq": "1"}, []),
    "cid a list": raw(P.PING, {"cid": [1]}, []),
    "LOAD phase unknown": request(P.LOAD, {"dir": "/tmp", "phase": "now"}),
    "SAVE without a root": request(P.SAVE, {"dir": "/tmp"}),
    "LOAD commit with nothing staged": request(P.LOAD, {"dir": "/tmp", "phase": "commit"}),
    "long command": [P.MAGIC, b"X" * 4096, codec.packb({"cid": "x", "inc": 1, "seq": 1})],
    "header not a map": [P.MAGIC, P.PING, codec.packb([1, 2])],
    "header not msgpack": [P.MAGIC, P.PING, b"\xc1\xc1"],
    "too many frames": [P.MAGIC, P.PING, codec.packb({})] + [b""] * 100,
}


@pytest.mark.parametrize("frames", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_message_is_refused_and_changes_nothing(frames: list[bytes]) -> None:
    shard = fresh_shard()
    header = check_request(shard, frames)
    assert header is not None and not header["ok"], header
    still_serving(shard)


def test_request_cap_covers_the_whole_message() -> None:
    shard = fresh_shard()  # 1 MiB cap
    ids = np.arange(100_000, dtype=np.int64)  # 800 kB per frame, under the cap alone
    frames = request(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": np.zeros((100_000, 4),
                                                                                np.float32)})
    header = check_request(shard, frames)
    assert header is not None and header["code"] == "TOO_LARGE", header


def test_parked_pulls_are_bounded_and_expire() -> None:
    shard = fresh_shard()  # at most 4 parked, 0.2 s deadline
    parked: list[list[Any]] = []
    for i in range(4):
        shard.handle(request(P.DENSE_PULL, {"name": "sync", "min_version": 2 ** 40}, seq=10 + i),
                     parked.append)
    assert parked == [] and shard.parked_count() == 4
    header = check_request(shard, request(P.DENSE_PULL, {"name": "sync", "min_version": 5}))
    assert header is not None and header["code"] == "INVALID_ARGUMENT" and "wait" in \
        header["message"]
    time.sleep(0.25)
    shard.expire_parked(time.monotonic())
    assert shard.parked_count() == 0 and len(parked) == 4
    for frames in parked:
        h = codec.decode(frames)[1]
        assert h["code"] == "DEADLINE" and "deadline" in h["message"]


def test_unexpected_failure_becomes_internal_reply_and_is_logged_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from xdl.server import admin

    shard = fresh_shard()

    def broken(state: Any, req: Any) -> Any:
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(shard.dispatcher.handlers, P.STATS, broken)
    for seq in (1, 2, 3):
        out: list[list[Any]] = []
        shard.handle(request(P.STATS, {}, seq=seq), out.append)
        h = codec.decode(out[0])[1]
        assert h["code"] == "INTERNAL" and "STATS" in h["message"] and "boom" in h["message"]
    assert sum("ZeroDivisionError" in r.getMessage() for r in caplog.records) == 1
    still_serving(shard)
    assert admin.HANDLERS[P.STATS] is admin.stats
