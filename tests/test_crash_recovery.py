"""Durable pushes: shards killed with SIGKILL mid-stream lose no acknowledged push.

Two shards run with a write-ahead log. While one client streams asynchronous pushes
(and one checkpoint is saved half-way), a killer thread sends SIGKILL to a random
shard at random moments, ten times, and restarts it on the same port with the same
log. Every push writes +1 into rows that belong to it alone, so the final table says
how often each push was applied: every acknowledged push exactly once.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import pytest

from xdl import optim as xoptim
from xdl.client import connect
from xdl.protocol import READY_PREFIX

KILLS = 10
IDS_PER_PUSH = 8
WINDOW = 16


class Shard:
    """One shard process that can be killed and restarted on the same port and log."""

    def __init__(self, k: int, n: int, wal_dir: str, root: str, fsync: str,
                 extra: tuple[str, ...] = ()) -> None:
        self.k, self.n, self.wal_dir, self.root, self.fsync = k, n, wal_dir, root, fsync
        self.extra = extra
        self.endpoint = "tcp://127.0.0.1:0"
        self.proc: subprocess.Popen[str] | None = None
        self.log = open(os.path.join(os.path.dirname(wal_dir), f"shard{k}.log"), "a")

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "xdl.server", "--bind", self.endpoint, "--shard",
               str(self.k), "--num-shards", str(self.n), "--wal-dir", self.wal_dir,
               "--wal-fsync", self.fsync, "--checkpoint-root", self.root,
               "--parent-pid", str(os.getpid()), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(0.5):
                    line = self.proc.stdout.readline()
                    if line.startswith(READY_PREFIX):
                        self.endpoint = line[len(READY_PREFIX):].strip()
                        return
                    if not line:
                        break
                elif self.proc.poll() is not None:
                    break
        finally:
            sel.close()
        raise AssertionError(f"shard {self.k} did not start (exit {self.proc.poll()}); "
                             f"see {self.log.name}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture(params=[("every", KILLS), ("5", 4)], ids=["fsync-every", "fsync-5ms"])
def shards(tmp_path: Any, request: pytest.FixtureRequest) -> Any:
    """Two shards with logs (group commit per loop turn, or every 5 ms), and the kill count."""
    fsync, kills = request.param
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    group = [Shard(k, 2, str(tmp_path / f"wal{k}"), root, fsync) for k in range(2)]
    try:
        for s in group:
            s.start()
        yield group, root, kills
    finally:
        for s in group:
            s.stop()


def test_no_acknowledged_push_is_lost_or_doubled_across_sigkills(shards: Any) -> None:
    group, root, n_kills = shards
    rng = random.Random(1234)
    client = connect([s.endpoint for s in group], timeout=0.4, retries=200)
    client.create_table("t", dim=2, optimizer=xoptim.SGD(lr=1.0))
    acked: list[int] = []
    stop = threading.Event()
    kills: list[float] = []
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            t0 = time.monotonic()
            for _ in range(n_kills):
                time.sleep(rng.uniform(0.2, 1.2))
                victim = group[rng.randrange(len(group))]
                victim.kill()
                kills.append(time.monotonic() - t0)
                time.sleep(rng.uniform(0.0, 0.3))  # the client keeps sending meanwhile
                victim.start()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=killer, daemon=True)
    window: deque[tuple[int, Any]] = deque()
    grads = np.full((IDS_PER_PUSH, 2), -1.0, dtype=np.float32)  # SGD lr 1: +1 per push
    i = 0
    saved = None
    thread.start()
    try:
        while not stop.is_set():
            ids = np.arange(i * IDS_PER_PUSH, (i + 1) * IDS_PER_PUSH, dtype=np.int64)
            window.append((i, client.push("t", ids, grads, unique=True)))
            i += 1
            if len(window) >= WINDOW:
                j, ticket = window.popleft()
                client.wait(ticket)
                acked.append(j)
            if i == 150 and saved is None:  # a checkpoint mid-stream: recovery starts there
                saved = client.save(root)
        while window:
            j, ticket = window.popleft()
            client.wait(ticket)
            acked.append(j)
        thread.join(30)
        assert not errors, errors
        assert len(kills) == n_kills
        rows = client.pull("t", np.arange(i * IDS_PER_PUSH, dtype=np.int64))
        noticed = sum(c.restarts for c in client._transport.conns)
    finally:
        client.close()
    counts = rows[:, 0].reshape(i, IDS_PER_PUSH)
    assert len(acked) == i  # the client retried through every restart
    doubled = np.flatnonzero((counts > 1).any(axis=1))
    lost = np.flatnonzero((counts < 1).any(axis=1))
    assert doubled.size == 0, f"pushes applied twice: {doubled[:10]}"
    assert lost.size == 0, f"acknowledged pushes lost: {lost[:10]}"
    assert np.all(rows == 1.0)
    assert saved is not None
    # the client saw new boot ids (two kills before any reply in between count once)
    assert 1 <= noticed <= n_kills
    print(f"\n{i} pushes acknowledged through {n_kills} SIGKILLs at t = "
          f"{', '.join(f'{t:.1f}' for t in kills)} s; each applied exactly once; the client "
          f"noticed {noticed} restarts")


def test_load_at_start_then_the_log_wins_after_a_crash(tmp_path: Any) -> None:
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    ids = np.arange(16, dtype=np.int64)
    ones = np.full((16, 2), -1.0, dtype=np.float32)
    first = Shard(0, 1, str(tmp_path / "wal-a"), root, "every")
    try:
        first.start()
        with connect([first.endpoint], timeout=20.0) as client:
            client.create_table("t", dim=2, optimizer=xoptim.SGD(lr=1.0))
            client.wait(client.push("t", ids, ones))
            client.save(root)
    finally:
        first.stop()
    second = Shard(0, 1, str(tmp_path / "wal-b"), root, "every", extra=("--load", root))
    try:
        second.start()  # empty log: starts from the checkpoint, and logs that it did
        with connect([second.endpoint], timeout=0.5, retries=100) as client:
            np.testing.assert_array_equal(client.pull("t", ids), -ones)
            client.wait(client.push("t", ids, ones))
            second.kill()
            second.start()  # same --load, but the log holds newer state: the log wins
            np.testing.assert_array_equal(client.pull("t", ids), -2 * ones)
    finally:
        second.stop()


def test_requests_sent_while_a_shard_is_down_do_not_overtake_lost_ones(tmp_path: Any) -> None:
    """Pushes in flight die with the shard; later ones wait in the socket and reach its
    successor first. The successor refuses them (they name the old boot id), and the
    client resends everything in order: none is taken for a duplicate and dropped."""
    root = str(tmp_path / "ckpt")
    os.makedirs(root)
    shard = Shard(0, 1, str(tmp_path / "wal"), root, "every")
    try:
        shard.start()
        # a long timeout: no reconnect (which would drop the queued requests) before
        # the successor is up
        with connect([shard.endpoint], timeout=10.0, retries=5) as client:
            client.create_table("t", dim=2, optimizer=xoptim.SGD(lr=1.0))
            grads = np.full((4, 2), -1.0, dtype=np.float32)
            tickets = [client.push("t", np.arange(4 * i, 4 * i + 4, dtype=np.int64), grads,
                                   unique=True) for i in range(200)]
            shard.kill()
            tickets += [client.push("t", np.arange(4 * i, 4 * i + 4, dtype=np.int64), grads,
                                    unique=True) for i in range(200, 210)]
            shard.start()
            for t in tickets:
                client.wait(t)
            rows = client.pull("t", np.arange(4 * 210, dtype=np.int64))[:, 0]
            noticed = sum(c.restarts for c in client._transport.conns)
    finally:
        shard.stop()
    counts = rows.reshape(210, 4)
    assert np.flatnonzero((counts < 1).any(axis=1)).size == 0, "pushes lost"
    assert np.flatnonzero((counts > 1).any(axis=1)).size == 0, "pushes applied twice"
    assert noticed == 1
