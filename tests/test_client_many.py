"""Many tables in one round trip: ``Client.pull_many`` and ``Client.push_many``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import xdl
from xdl import protocol as P
from xdl.client import Client
from xdl.errors import InvalidArgumentError, TableNotFoundError
from xdl.sharding import shard_of

pytestmark = pytest.mark.timeout(120)

DIMS = {"many.a": 2, "many.b": 5, "many.c": 1}


@pytest.fixture(scope="module", params=[1, 2], ids=["1shard", "2shards"])
def client(request: pytest.FixtureRequest) -> Iterator[Client]:
    """One client per shard count for the whole module; tables made per test."""
    with xdl.connect(local_shards=request.param, timeout=20.0) as c:
        yield c


@pytest.fixture
def tables(client: Client, request: pytest.FixtureRequest) -> dict[str, int]:
    """Fresh SGD(lr=1) tables with random initial rows, named after the test."""
    prefix = request.node.name.replace("[", ".").replace("]", "")
    made = {}
    for i, (name, dim) in enumerate(DIMS.items()):
        full = f"{prefix}.{name}"
        client.create_table(full, dim, optimizer=xdl.optim.SGD(lr=1.0),
                            initializer=xdl.init.Uniform(-1.0, 1.0), seed=i)
        made[full] = dim
    return made


def sends(client: Client, command: bytes, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the requests of ``command`` the client sends or queues from now on."""
    seen: list[bytes] = []
    for method in ("send", "send_later"):
        original = getattr(client._transport, method)

        def spy(k: int, cmd: bytes, *args: Any, _original: Any = original, **kwargs: Any) -> int:
            seen.append(cmd)
            return int(_original(k, cmd, *args, **kwargs))

        monkeypatch.setattr(client._transport, method, spy)
    return lambda: seen.count(command)


def test_pull_many_matches_one_pull_per_table(client: Client, tables: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    ids = {name: rng.integers(0, 50, size=(n, 3)) for name, n in zip(tables, [40, 7, 1],
                                                                       strict=True)}
    got = client.pull_many(ids)
    assert list(got) == list(tables)
    for name, dim in tables.items():
        assert got[name].shape == (ids[name].size, dim) and got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], client.pull(name, ids[name]))
    uniq = {name: np.unique(v) for name, v in ids.items()}
    got_u = client.pull_many(uniq, unique=True)
    for name in tables:
        np.testing.assert_array_equal(got_u[name], client.pull(name, uniq[name]))
    assert client.pull_many({}) == {}


def test_pull_many_and_push_many_send_one_request_per_shard(
        client: Client, tables: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    ids = {name: np.arange(200) for name in tables}
    pulls = sends(client, P.PULL_MANY, monkeypatch)
    client.pull_many(ids)
    assert pulls() == client.num_shards  # 200 ids reach every shard, whatever the tables
    pushes = sends(client, P.PUSH_MANY, monkeypatch)
    grads = {name: (ids[name], np.ones((200, dim), np.float32)) for name, dim in tables.items()}
    client.wait(client.push_many(grads))
    assert pushes() == client.num_shards


def test_push_many_applies_like_one_push_per_table(client: Client,
                                                   tables: dict[str, int]) -> None:
    rng = np.random.default_rng(1)
    names = list(tables)
    ids = {names[0]: np.array([5, 1, 5, 9]), names[1]: np.array([2, 3]),
           names[2]: np.array([], dtype=np.int64)}
    grads = {n: rng.standard_normal((ids[n].size, tables[n])).astype(np.float32) for n in names}
    before = client.pull_many({n: np.arange(12) for n in names})
    ticket = client.push_many({n: (ids[n], grads[n]) for n in names})
    client.wait(ticket)
    after = client.pull_many({n: np.arange(12) for n in names})
    for n in names:
        expected = before[n].copy()
        np.add.at(expected, ids[n], -grads[n])  # SGD lr=1, repeated ids summed
        np.testing.assert_allclose(after[n], expected, rtol=0, atol=1e-6)
    since = client.pushed_since(names[0], client.push_mark(names[0]) - 1)
    assert since is not None and since.tolist() == [1, 5, 9]  # logged per table


def test_push_many_unique_skips_dedup_and_keeps_callers_arrays(client: Client,
                                                              tables: dict[str, int]) -> None:
    names = list(tables)
    ids = {n: np.array([4, 8, 15]) for n in names}
    grads = {n: np.ones((3, tables[n]), np.float32) for n in names}
    before = client.pull_many(ids, unique=True)
    ticket = client.push_many({n: (ids[n], grads[n]) for n in names}, unique=True)
    for n in names:  # the caller may reuse its arrays at once
        ids[n][:] = 0
        grads[n][:] = 100.0
    client.wait(ticket)
    after = client.pull_many({n: np.array([4, 8, 15]) for n in names}, unique=True)
    for n in names:
        np.testing.assert_allclose(after[n], before[n] - 1.0, rtol=0, atol=1e-6)
        assert client.pushed_since(n, client.push_mark(n) - 1).tolist() == [4, 8, 15]


def test_a_resent_push_many_is_applied_once(client: Client, tables: dict[str, int]) -> None:
    names = list(tables)
    ids = np.arange(30)
    before = client.pull_many({n: ids for n in names})
    ticket = client.push_many({n: (ids, np.ones((30, tables[n]), np.float32)) for n in names})
    t = client._transport
    with t.lock:  # what Lazy Pirate does after a timeout: reopen, resend with the same seq
        for conn in t.conns:
            if conn.pending:
                t._reconnect(conn)
    client.wait(ticket)
    after = client.pull_many({n: ids for n in names})
    for n in names:
        np.testing.assert_allclose(after[n], before[n] - 1.0, rtol=0, atol=1e-6)


def test_a_refused_table_leaves_every_table_of_the_push_unchanged(
        client: Client, tables: dict[str, int]) -> None:
    names = list(tables)
    ids = np.arange(30)
    before = client.pull(names[0], ids)
    client.drop_table(names[1])
    client._dims[names[1]] = tables[names[1]]  # the client still believes it exists
    ticket = client.push_many({n: (ids, np.ones((30, tables[n]), np.float32)) for n in names})
    with pytest.raises(TableNotFoundError, match=names[1]):
        client.wait(ticket)
    np.testing.assert_array_equal(client.pull(names[0], ids), before)
    with pytest.raises(TableNotFoundError):
        client.pull_many({n: ids for n in names})
    assert client.ping()  # the client keeps working


def test_a_push_many_refused_by_the_shard_changes_no_table(client: Client,
                                                           tables: dict[str, int]) -> None:
    # one request per shard is the unit: keep every id on the shard that refuses
    names = list(tables)
    near = np.arange(200)
    ids = near[shard_of(near, client.num_shards) == shard_of(np.array([3]),
                                                             client.num_shards)[0]][:10]
    before = client.pull_many({n: ids for n in names})
    repeated = np.array([3, 3])  # a broken promise of unique=True: the shards refuse it
    parts = {n: (ids, np.ones((10, tables[n]), np.float32)) for n in names[:2]}
    parts[names[2]] = (repeated, np.ones((2, tables[names[2]]), np.float32))
    ticket = client.push_many(parts, unique=True)
    with pytest.raises(InvalidArgumentError, match="unique"):
        client.wait(ticket)
    after = client.pull_many({n: ids for n in names})
    for n in names:
        np.testing.assert_array_equal(after[n], before[n])


@pytest.mark.parametrize("unique", [False, True])
def test_push_many_refuses_bad_grads_naming_the_first_bad_table(
        client: Client, tables: dict[str, int], unique: bool) -> None:
    names = list(tables)
    ids = np.arange(4)
    good = {n: (ids, np.ones((4, tables[n]), np.float32)) for n in names}
    nan = np.ones((4, tables[names[1]]), np.float32)
    nan[2, 0] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN") as info:
        client.push_many({**good, names[1]: (ids, nan)}, unique=unique)
    assert info.value.table == names[1]
    # a NaN in an earlier table is reported before a wrong shape in a later one
    wrong = np.ones((3, tables[names[2]]), np.float32)
    with pytest.raises(InvalidArgumentError, match="NaN") as info:
        client.push_many({**good, names[1]: (ids, nan), names[2]: (ids, wrong)}, unique=unique)
    assert info.value.table == names[1]
    with pytest.raises(InvalidArgumentError, match="shape") as info:
        client.push_many({**good, names[2]: (ids, wrong)}, unique=unique)
    assert info.value.table == names[2]
    mark = client.push_mark(names[0])
    client.wait(client.push_many(good, unique=unique))  # nothing refused was logged or sent
    assert client.push_mark(names[0]) == mark + 1
