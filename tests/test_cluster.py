"""Shard processes and the client over tcp loopback: routing, fan-out, retries, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq

import xdl
from xdl import codec
from xdl import protocol as P
from xdl.client import Client
from xdl.errors import InvalidArgumentError, ServerUnavailableError, TableNotFoundError
from xdl.server.table import SparseTable
from xdl.sharding import shard_of


def reference(dim: int, opt: xdl.optim.Optimizer, init: xdl.init.Initializer) -> SparseTable:
    return SparseTable("ref", dim, init, opt, seed=11)


@pytest.mark.parametrize("n", [2, 3])
def test_training_matches_a_single_in_process_table(start_cluster: Callable[..., Client],
                                                    n: int) -> None:
    client = start_cluster(n)
    opt, init = xdl.optim.Adam(lr=0.01), xdl.init.Uniform(-0.1, 0.1)
    client.create_table("emb", 8, initializer=init, optimizer=opt, seed=11)
    ref = reference(8, opt, init)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(-(2**62), 2**62, size=300) % 5000 - 2500  # repeats and negatives
        rows = client.pull("emb", ids)
        uniq, inv = np.unique(ids, return_inverse=True)
        np.testing.assert_array_equal(rows, ref.pull(uniq)[inv])
        grads = rng.normal(size=(ids.size, 8)).astype(np.float32)
        client.push("emb", ids, grads)
        summed = np.zeros((uniq.size, 8), np.float32)
        np.add.at(summed, inv, grads)
        ref.push(uniq, summed)
    client.wait()
    keys = np.arange(-2500, 2500)
    np.testing.assert_allclose(client.pull("emb", keys), ref.pull(keys), rtol=0, atol=1e-6)
    desc = client.describe_table("emb")
    assert desc["rows"] == 5000 and len(desc["rows_per_shard"]) == n
    assert all(r > 0 for r in desc["rows_per_shard"])
    stats = client.stats()
    assert [s["shard"] for s in stats] == list(range(n))
    assert stats[0]["requests"]["PULL"]["count"] >= 20
    assert stats[0]["tables"]["emb"]["bytes"] > 0


def test_rows_live_on_the_shard_that_owns_their_bucket(cluster2: Client) -> None:
    cluster2.create_table("t", 2)
    ids = np.arange(1000)
    cluster2.pull("t", ids)
    want = np.bincount(shard_of(ids, 2), minlength=2)
    assert cluster2.describe_table("t")["rows_per_shard"] == want.tolist()


def test_errors_name_table_and_endpoint(cluster2: Client) -> None:
    with pytest.raises(TableNotFoundError) as info:
        cluster2.pull("missing", [1, 2])
    assert "missing" in str(info.value) and "tcp://127.0.0.1:" in str(info.value)
    cluster2.create_table("t", 4)
    with pytest.raises(InvalidArgumentError, match=r"expected shape \[2, 4\]"):
        cluster2.push("t", [1, 2], np.ones((2, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        cluster2.push("t", [1, 2], np.full((2, 4), np.nan, np.float32))
    with pytest.raises(InvalidArgumentError, match="integers"):
        cluster2.pull("t", [1.5])


def test_async_push_error_surfaces_at_wait(cluster2: Client) -> None:
    cluster2.create_table("t", 2)
    cluster2.drop_table("t")
    cluster2._dims["t"] = 2  # the client still believes the table exists
    ticket = cluster2.push("t", [1, 2, 3], np.ones((3, 2), np.float32))
    with pytest.raises(TableNotFoundError):
        cluster2.wait(ticket)
    assert cluster2.ping()  # the client keeps working


def test_dense_variables_async_and_sync(start_cluster: Callable[..., Client]) -> None:
    a = start_cluster(2)
    b = Client(a.servers)
    try:
        a.create_dense("w", [3], optimizer=xdl.optim.SGD(lr=0.5),
                       initial=np.ones(3, np.float32))
        a.wait(a.dense_push("w", np.ones(3, np.float32)))
        np.testing.assert_allclose(a.dense_pull("w"), 0.5)
        a.create_dense("s", [2], optimizer=xdl.optim.SGD(lr=1.0), sync_workers=2)
        for c in (a, b):
            np.testing.assert_allclose(c.dense_pull("s"), 0.0)
        a.wait(a.dense_push("s", np.array([1, 1], np.float32)))
        result: dict[str, np.ndarray] = {}
        t = threading.Thread(target=lambda: result.update(v=a.dense_pull("s", min_version=1)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive()  # waits for worker b
        b.wait(b.dense_push("s", np.array([3, 5], np.float32)))
        t.join(10)
        np.testing.assert_allclose(result["v"], [-2.0, -3.0])
    finally:
        b.close()


class LossyProxy:
    """Forwards one client's requests to a shard, dropping chosen replies (in-test chaos)."""

    def __init__(self, ctx: zmq.Context, backend: str, drop: Callable[[bytes], bool]) -> None:
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(backend)
        self.drop, self.dropped, self.stop = drop, 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        peer = None
        while not self.stop:
            events = dict(poller.poll(50))
            if self.front in events:
                peer, *frames = self.front.recv_multipart()
                self.back.send_multipart(frames)
            if self.back in events:
                frames = self.back.recv_multipart()
                if self.drop(frames[1]):
                    self.dropped += 1
                    continue
                self.front.send_multipart([peer, *frames])

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.front.close(0)
        self.back.close(0)


def test_lost_push_reply_is_retried_and_applied_once(start_cluster: Callable[..., Client],
                                                     zmq_ctx: zmq.Context) -> None:
    direct = start_cluster(1)
    direct.create_table("t", 2, optimizer=xdl.optim.SGD(lr=1.0))
    budget = {"n": 2}

    def drop_two_push_replies(command: bytes) -> bool:
        if command == P.PUSH and budget["n"]:
            budget["n"] -= 1
            return True
        return False

    proxy = LossyProxy(zmq_ctx, direct.servers[0], drop_two_push_replies)
    try:
        client = Client([proxy.endpoint], timeout=1.0, retries=6)
        try:
            client.wait(client.push("t", [5], np.ones((1, 2), np.float32)))
            np.testing.assert_allclose(client.pull("t", [5]), -1.0)  # applied once, not 3x
            assert proxy.dropped == 2
        finally:
            client.close()
    finally:
        proxy.close()
    stats = direct.stats()[0]
    # 1 applied + at least 2 duplicates answered from the stored reply (more if a slow
    # machine made the client time out once more)
    assert stats["requests"]["PUSH"]["count"] >= 3


def test_dead_shard_gives_an_error_naming_the_endpoint(start_cluster: Callable[..., Client]
                                                       ) -> None:
    client = start_cluster(2, timeout=0.3, retries=1)
    client.create_table("t", 2)
    assert client._local is not None
    victim = client._local.procs[1]
    victim.kill()
    victim.wait()
    ids = np.arange(100)
    with pytest.raises(ServerUnavailableError) as info:
        client.pull("t", ids)
    assert client.servers[1] in str(info.value) and "PULL" in str(info.value)


def test_wrong_server_order_is_detected(start_cluster: Callable[..., Client]) -> None:
    client = start_cluster(2)
    with pytest.raises(InvalidArgumentError, match="shard order"):
        Client(list(reversed(client.servers)))


def test_connect_uses_xdl_servers(cluster2: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDL_SERVERS", ",".join(cluster2.servers))
    with xdl.connect() as c:
        assert [p["shard"] for p in c.ping()] == [0, 1]


def test_connect_local_shards_stops_them_on_close() -> None:
    client = xdl.connect(local_shards=2)
    assert client._local is not None
    procs = list(client._local.procs)
    client.create_table("t", 3)
    assert client.pull("t", [1, 2]).shape == (2, 3)
    client.close()
    assert all(p.poll() is not None for p in procs)


def test_standalone_server_stops_cleanly_on_sigterm(zmq_ctx: zmq.Context) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "xdl.server", "--bind", "tcp://127.0.0.1:0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("XDL-READY tcp://127.0.0.1:")
        sock = zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(line.split()[1])
        sock.send_multipart(codec.encode(P.PING, {"cid": "x", "inc": 1, "seq": 1}))
        assert sock.poll(10000)
        _, h, _ = codec.decode(sock.recv_multipart())
        assert h["ok"] and h["shard"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_shard_exits_when_its_parent_dies(tmp_path: os.PathLike[str]) -> None:
    code = ("import xdl, time, sys; c = xdl.connect(local_shards=1); "
            "print(c._local.procs[0].pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("shard outlived its parent")


def test_close_releases_every_socket(start_cluster: Callable[..., Client]) -> None:
    client = start_cluster(2)
    socks = [c.socket for c in client._conns]
    client.create_table("t", 2)
    client.push("t", [1], np.ones((1, 2), np.float32))  # left unwaited: close waits for it
    client.close()
    assert all(s.closed for s in socks) and client._ctx.closed
    with pytest.raises(xdl.errors.XdlError, match="closed"):
        client.pull("t", [1])


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_push_does_not_share_the_callers_arrays(start_cluster: Callable[..., Client],
                                                 n: int, unique: bool) -> None:
    # pushes are asynchronous and kept for resends: changing the arrays after push()
    # returns must not change what the shards apply (with unique=False and no repeated
    # ids too, where de-duplication hands back the caller's gradients unchanged)
    client = start_cluster(n)
    opt = xdl.optim.Adagrad(lr=0.1)
    client.create_table("emb", 4, optimizer=opt, seed=11)
    ref = reference(4, opt, xdl.init.Zeros())
    rng = np.random.default_rng(4)
    ids = rng.permutation(1000)[:200].astype(np.int64)
    grads = rng.standard_normal((200, 4)).astype(np.float32)
    want_ids, want_grads = ids.copy(), grads.copy()
    ticket = client.push("emb", ids, grads, unique=unique)
    ids[:] = 5000 + np.arange(200)
    grads[:] = np.nan
    client.wait(ticket)
    ref.push(want_ids, want_grads)
    np.testing.assert_array_equal(client.pull("emb", want_ids), ref.pull(want_ids))
    assert client.describe_table("emb")["rows"] == 200


@pytest.mark.parametrize("n", [1, 2])
def test_pulled_rows_belong_to_the_caller(start_cluster: Callable[..., Client], n: int
                                          ) -> None:
    # a one-shard pull hands back the rows of the reply message itself (no copy): they
    # must be writable, and writing them changes neither the table nor another pull
    client = start_cluster(n)
    client.create_table("emb", 8, initializer=xdl.init.Uniform(), seed=3)
    ids = np.arange(5000, dtype=np.int64) * 7919
    first = client.pull("emb", ids)
    want = first.copy()
    second = client.pull("emb", ids)
    assert first.flags.writeable and second.flags.writeable
    assert not np.shares_memory(first, second)
    first[:] = -1.0
    np.testing.assert_array_equal(second, want)
    np.testing.assert_array_equal(client.pull("emb", ids), want)
    np.testing.assert_array_equal(client.pull("emb", np.concatenate([ids, ids[:7]])),
                                  np.concatenate([want, want[:7]]))


def test_concurrent_workers_each_push_applied_once(start_cluster: Callable[..., Client]
                                                   ) -> None:
    """4 workers x 25 pushes of overlapping ids into 2 shards; SGD sums commute, so the
    final rows must equal the initial rows minus lr x the sum of every gradient."""
    base = start_cluster(2)
    base.create_table("t", 3, optimizer=xdl.optim.SGD(lr=0.5))
    ids = np.arange(40)
    start = base.pull("t", ids)
    total = np.zeros((40, 3), np.float32)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            with Client(base.servers, timeout=20.0) as c:
                for _ in range(25):
                    chosen = rng.choice(ids, 10, replace=False)
                    g = rng.integers(-4, 5, (10, 3)).astype(np.float32)  # exact in float32
                    c.push("t", chosen, g)
                    with lock:
                        total[chosen] += g
                c.wait()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    np.testing.assert_allclose(base.pull("t", ids), start - 0.5 * total, atol=1e-5)


def test_uint64_ids_beyond_int64_are_refused_not_aliased(cluster2: Client) -> None:
    cluster2.create_table("u", 2)
    with pytest.raises(InvalidArgumentError, match="2\\*\\*63"):
        cluster2.pull("u", np.array([2 ** 63 + 1], dtype=np.uint64))
    with pytest.raises(InvalidArgumentError, match="2\\*\\*63"):
        cluster2.push("u", np.array([2 ** 64 - 1], dtype=np.uint64), np.ones((1, 2), np.float32))
    assert cluster2.describe_table("u")["rows"] == 0
    rows = cluster2.pull("u", np.array([5, 2 ** 63 - 1], dtype=np.uint64))  # fits: accepted
    assert rows.shape == (2, 2)
