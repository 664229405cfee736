"""The client's shard router and push log, without sockets (a recording transport)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from xdl.errors import InvalidArgumentError
from xdl.pushlog import PushLog
from xdl.routing import Routed, ShardRouter
from xdl.sharding import shard_of


class RecordingTransport:
    """Stands in for :class:`xdl.transport.Transport`: records requests, answers them
    with rows computed from the ids (row of id i = [i, 2i, ...] up to the width)."""

    def __init__(self, num_shards: int, widths: Mapping[str, int]) -> None:
        self.num_shards = num_shards
        self.servers = [f"tcp://shard-{k}" for k in range(num_shards)]
        self.lock = threading.RLock()
        self.widths = dict(widths)
        self.sent: list[tuple[int, bytes, dict[str, Any], dict[str, np.ndarray]]] = []
        self.corrupt = False

    def raise_failed(self) -> None:
        pass

    def send(self, k: int, command: bytes, header: Mapping[str, Any],
             arrays: Mapping[str, np.ndarray] | None = None) -> int:
        self.sent.append((k, command, dict(header), dict(arrays or {})))
        return len(self.sent)

    def results(self, sent: list[tuple[int, int]]) -> list[tuple[dict[str, Any],
                                                                 dict[str, np.ndarray]]]:
        out = []
        for _, seq in sent:
            _, _, header, arrays = self.sent[seq - 1]
            ids = arrays["ids"]
            names = header.get("tables", [header.get("table")])
            counts = header.get("counts", [ids.size])
            pieces, off = [], 0
            for name, c in zip(names, counts, strict=True):
                pieces.append(rows_of(ids[off:off + c], self.widths[name]).reshape(-1))
                off += c
            flat = np.concatenate(pieces)
            if self.corrupt:
                flat = flat[:-1]
            out.append(({"ok": True}, {"rows": flat}))
        return out


def rows_of(ids: np.ndarray, width: int) -> np.ndarray:
    return (ids[:, None] * np.arange(1, width + 1)).astype(np.float32)


def router_for(num_shards: int, **widths: int) -> tuple[ShardRouter, RecordingTransport]:
    t = RecordingTransport(num_shards, widths)
    return ShardRouter(t), t  # type: ignore[arg-type]


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_split_groups_ids_by_shard_and_remembers_their_places(num_shards: int) -> None:
    router, _ = router_for(num_shards)
    ids = np.random.default_rng(1).integers(0, 1 << 40, 500)
    routed = router.split(ids)
    order = np.arange(ids.size) if routed.order is None else routed.order
    np.testing.assert_array_equal(routed.ids, ids[order])
    assert sorted(order.tolist()) == list(range(ids.size))
    assert routed.bounds.tolist()[0] == 0 and routed.bounds.tolist()[-1] == ids.size
    for k in range(num_shards):
        mine = routed.ids[routed.bounds[k]:routed.bounds[k + 1]]
        assert (shard_of(mine, num_shards) == k).all()
        assert routed.count(k) == mine.size
    if num_shards == 1:
        assert routed.order is None and routed.ids is ids  # no copy, no permutation


def test_send_one_part_slices_without_copies_and_skips_idle_shards() -> None:
    router, t = router_for(2, t=2)
    ids = np.array([3, 4, 5, 6, 7, 8, 9], dtype=np.int64)
    routed = router.split(ids)
    grads = routed.in_shard_order(np.arange(14, dtype=np.float32).reshape(7, 2))
    sent = router.send(b"PUSH", {"table": "t"}, [(routed, {"grads": grads})])
    assert [s.shard for s in sent] == [k for k in range(2) if routed.count(k)]
    for s, (k, command, header, arrays) in zip(sent, t.sent, strict=True):
        assert (command, header, s.shard) == (b"PUSH", {"table": "t"}, k)
        assert np.shares_memory(arrays["ids"], routed.ids)
        assert np.shares_memory(arrays["grads"], grads)
        assert arrays["grads"].shape == (routed.count(k), 2)
    one_id = np.array([ids[0]])
    t.sent.clear()
    only = router.send(b"PULL", {"table": "t"}, [(router.split(one_id), {})])
    assert len(only) == 1 and len(t.sent) == 1  # the other shard gets nothing


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_many_tables_travel_in_one_request_per_shard(num_shards: int) -> None:
    router, t = router_for(num_shards, a=1, b=3, c=2)
    rng = np.random.default_rng(2)
    ids = [rng.integers(0, 1 << 40, 50), rng.integers(0, 1 << 40, 30),
           np.empty(0, dtype=np.int64)]
    dims = [1, 3, 2]
    grads = [rng.random((i.size, d), dtype=np.float32) for i, d in zip(ids, dims, strict=True)]
    routed = router.split_many(ids, dims)
    flat_g = np.concatenate([g.ravel() for g in grads])
    sorted_g = routed.in_shard_order(flat_g)
    sent = router.send_many(b"PUSH_MANY", {"tables": ["a", "b", "c"]}, routed,
                            {"grads": sorted_g})
    singles = [router.split(i) for i in ids]  # what one table alone sends each shard
    busy = [k for k in range(num_shards) if any(r.count(k) for r in singles)]
    assert [s.shard for s in sent] == [k for k, *_ in t.sent] == busy
    for s, (k, _, header, arrays) in zip(sent, t.sent, strict=True):
        counts = [r.count(k) for r in singles]
        assert header == {"tables": ["a", "b", "c"], "counts": counts}
        assert s.counts == tuple(counts)
        want_ids, want_g = [], []
        for r, g in zip(singles, grads, strict=True):
            lo, hi = int(r.bounds[k]), int(r.bounds[k + 1])
            want_ids.append(r.ids[lo:hi])
            want_g.append(r.in_shard_order(g)[lo:hi].ravel())
        np.testing.assert_array_equal(arrays["ids"], np.concatenate(want_ids))
        np.testing.assert_array_equal(arrays["grads"], np.concatenate(want_g))
        assert np.shares_memory(arrays["ids"], routed.ids)
        assert np.shares_memory(arrays["grads"], sorted_g)
    for i, a in enumerate(ids):
        np.testing.assert_array_equal(routed.table_ids(i), a)
        np.testing.assert_array_equal(routed.table_rows(flat_g, i), grads[i])
    with pytest.raises(ValueError, match="exactly one part"):
        router.send(b"PULL", {}, [(singles[0], {}), (singles[1], {})])


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_scatter_puts_rows_back_in_the_callers_order(num_shards: int) -> None:
    router, t = router_for(num_shards, a=2, b=5, c=1)
    rng = np.random.default_rng(3)
    ids_a, ids_b = rng.integers(0, 1 << 40, 40), rng.integers(0, 1 << 40, 7)
    ids_c = np.empty(0, dtype=np.int64)
    routed = router.split_many([ids_a, ids_b, ids_c], [2, 5, 1])
    out = np.full(int(routed.offsets[-1]), np.nan, np.float32)
    answered = router.call_many(b"PULL_MANY", {"tables": ["a", "b", "c"]}, routed)
    router.scatter_many(answered, "rows", routed, out, ["a", "b", "c"])
    np.testing.assert_array_equal(routed.table_rows(out, 0), rows_of(ids_a, 2))
    np.testing.assert_array_equal(routed.table_rows(out, 1), rows_of(ids_b, 5))
    assert routed.table_rows(out, 2).shape == (0, 1)
    single = router.split(ids_a)
    rows = np.empty((40, 2), np.float32)
    router.scatter(router.call(b"PULL", {"table": "a"}, [(single, {})]), "rows", single,
                   rows, "a")
    np.testing.assert_array_equal(rows, rows_of(ids_a, 2))


def test_scatter_refuses_a_reply_of_the_wrong_size() -> None:
    router, t = router_for(2, a=2, b=1)
    routed = router.split(np.arange(10))
    t.corrupt = True
    answered = router.call(b"PULL", {"table": "a"}, [(routed, {})])
    with pytest.raises(InvalidArgumentError, match="expected") as info:
        router.scatter(answered, "rows", routed, np.empty((10, 2), np.float32), "a")
    assert "tcp://shard-" in str(info.value)
    many = router.split_many([np.arange(10), np.arange(5)], [2, 1])
    answered = router.call_many(b"PULL_MANY", {"tables": ["a", "b"]}, many)
    with pytest.raises(InvalidArgumentError, match="expected"):
        router.scatter_many(answered, "rows", many, np.empty(25, np.float32), ["a", "b"])


def test_in_shard_order_is_the_identity_for_one_shard() -> None:
    rows = np.ones((3, 2), np.float32)
    assert Routed(np.arange(3), None, np.array([0, 3])).in_shard_order(rows) is rows


# ------------------------------------------------------------ push log
def test_push_log_marks_and_answers_sorted_unique_ids() -> None:
    log = PushLog(length=3)
    assert log.mark("t") == 0
    assert log.since("t", 0).tolist() == []
    first = np.array([9, 3, 7])
    log.record("t", first, False)
    assert not first.flags.writeable  # the log froze the ids it keeps
    assert log.mark("t") == 1 and log.mark("other") == 0
    assert log.since("t", 0).tolist() == [3, 7, 9]
    log.record("t", np.array([1, 3]), True)
    assert log.since("t", 0).tolist() == [1, 3, 7, 9]
    only = log.since("t", 1)
    assert only is not None and only.tolist() == [1, 3]  # one sorted entry: as recorded
    assert log.since("t", 2).tolist() == []


def test_push_log_says_when_it_no_longer_reaches_back() -> None:
    log = PushLog(length=2)
    for i in range(3):
        log.record("t", np.array([i]), True)
    assert log.since("t", 1).tolist() == [1, 2]
    assert log.since("t", 0) is None
    mark = log.mark("t")
    log.forget("t")  # rows changed without a push: every earlier mark is void
    assert log.since("t", mark) is None
    log.record("u", np.array([5]), True)
    log.forget()
    assert log.since("u", 0) is None
