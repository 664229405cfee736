"""The client transport's queued sends: order, read-your-writes, threads, close."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

import xdl
from xdl.client import Client

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """Two shards for the module."""
    with xdl.connect(local_shards=2, timeout=20.0) as c:
        yield c


def test_a_pull_after_a_queued_push_sees_it(client: Client) -> None:
    client.create_table("rw", 3, optimizer=xdl.optim.SGD(lr=1.0))
    ids = np.arange(40)
    ones = np.ones((40, 3), np.float32)
    for step in range(1, 31):
        client.push("rw", ids, ones, unique=True)  # not waited for
        np.testing.assert_array_equal(client.pull("rw", ids), -float(step))
    client.wait()


def test_pushes_from_many_threads_are_each_applied_once(client: Client) -> None:
    # Every socket must carry seqs in increasing order, or the shards' exactly-once
    # filter takes a late push for a resend and drops it: the sums would come out short.
    client.create_table("threads", 2, optimizer=xdl.optim.SGD(lr=1.0))
    ids = np.arange(64)
    pushes_per_thread, pushers = 40, 4
    errors: list[BaseException] = []

    def push() -> None:
        try:
            for i in range(pushes_per_thread):
                client.push_many({"threads": (ids, np.ones((64, 2), np.float32))},
                                 unique=bool(i % 2))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    def pull() -> None:
        try:
            for _ in range(pushes_per_thread):
                rows = client.pull("threads", ids)
                assert (rows <= 0).all()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=push) for _ in range(pushers)]
    threads += [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    client.wait()
    np.testing.assert_array_equal(client.pull("threads", ids),
                                  -float(pushes_per_thread * pushers))


def test_close_sends_and_confirms_queued_pushes(client: Client) -> None:
    client.create_table("closing", 2, optimizer=xdl.optim.SGD(lr=1.0))
    with Client(client.servers, timeout=20.0) as other:
        for _ in range(25):
            other.push("closing", np.arange(10), np.ones((10, 2), np.float32))
        dense = np.ones(3, np.float32)
        other.create_dense("closing.w", [3], optimizer=xdl.optim.SGD(lr=1.0))
        other.dense_push("closing.w", dense)
        dense[:] = 100.0  # the caller may reuse its array at once
    np.testing.assert_array_equal(client.pull("closing", np.arange(10)), -25.0)
    np.testing.assert_array_equal(client.dense_pull("closing.w"), -1.0)
    assert not client._transport.has_pending()
