"""The `xdl` command line against standalone shard processes, and malformed traffic
sent over the wire to a real shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from xdl import codec
from xdl import protocol as P
from xdl.client import Client
from xdl.errors import CheckpointError

XDL = [sys.executable, "-m", "xdl.cli"]


def start_shard(k: int, n: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([*XDL, "server", "--bind", "tcp://127.0.0.1:0", "--shard", str(k),
                             "--num-shards", str(n), *extra], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("XDL-READY "), line
    return proc, line.split()[1]


@pytest.fixture
def shards(tmp_path: os.PathLike[str]) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    started = [start_shard(k, 2, "--checkpoint-root", str(tmp_path)) for k in range(2)]
    yield started
    for proc, _ in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def xdl(*args: str, servers: str | None = None, timeout: str = "10"
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDL_TIMEOUT": timeout}
    if servers:
        env["XDL_SERVERS"] = servers
    return subprocess.run([*XDL, *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_ping_stats_save_load_shutdown(shards: list[tuple[subprocess.Popen[str], str]],
                                           tmp_path: os.PathLike[str]) -> None:
    servers = ",".join(ep for _, ep in shards)
    out = xdl("ping", servers=servers)
    assert out.returncode == 0 and out.stdout.count(" ok") == 2, out.stderr
    with Client(servers.split(",")) as c:
        c.create_table("t", 4)
        c.pull("t", np.arange(50))
    stats = json.loads(xdl("stats", servers=servers).stdout)
    assert sum(s["tables"]["t"]["rows"] for s in stats) == 50
    saved = xdl("save", str(tmp_path), servers=servers)
    assert saved.returncode == 0 and saved.stdout.strip().endswith("ckpt-000001")
    with Client(servers.split(",")) as c:
        c.drop_table("t")
    loaded = xdl("load", str(tmp_path), servers=servers)
    assert loaded.returncode == 0 and json.loads(loaded.stdout)["rows"] == 50
    assert xdl("shutdown", servers=servers).returncode == 0
    for proc, _ in shards:
        assert proc.wait(10) == 0


def test_shard_restores_a_checkpoint_at_start(shards: list[tuple[subprocess.Popen[str], str]],
                                              tmp_path: os.PathLike[str]) -> None:
    with Client([ep for _, ep in shards]) as c:
        c.create_table("t", 2, optimizer=None)
        before = c.pull("t", np.arange(20))
        c.save(str(tmp_path))
    proc, ep = start_shard(0, 1, "--load", str(tmp_path), "--checkpoint-root", str(tmp_path))
    try:
        with Client([ep]) as c:
            assert c.describe_table("t")["rows"] == 20
            np.testing.assert_array_equal(c.pull("t", np.arange(20)), before)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout:
            proc.stdout.close()


def test_shards_save_and_load_only_under_their_checkpoint_root(
        shards: list[tuple[subprocess.Popen[str], str]], tmp_path: os.PathLike[str]) -> None:
    servers = ",".join(ep for _, ep in shards)
    outside = os.path.join(os.path.dirname(str(tmp_path)), os.path.basename(str(tmp_path)) + "x")
    os.makedirs(outside, exist_ok=True)
    with Client(servers.split(",")) as c:
        c.create_table("t", 2)
        c.pull("t", np.arange(10))
        with pytest.raises(CheckpointError, match="outside shard .* checkpoint root"):
            c.save(outside)
        assert os.listdir(outside) == ["ckpt-000001.tmp"]  # made by the client, left empty
        assert os.listdir(os.path.join(outside, "ckpt-000001.tmp")) == []
        good = c.save(str(tmp_path))
        # A SAVE aimed at a committed checkpoint (or any folder but ckpt-<n>.tmp) is refused.
        for target in (good, str(tmp_path), os.path.join(str(tmp_path), "..", "elsewhere")):
            with pytest.raises(CheckpointError):
                c._transport.call_all(P.SAVE, {"dir": target})
        with pytest.raises(CheckpointError, match="outside"):
            c._transport.call_all(P.LOAD, {"dir": "/etc"})


def test_cli_without_servers_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDL_SERVERS"}
    out = subprocess.run([*XDL, "ping"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "XDL_SERVERS" in out.stderr


def test_cli_unreachable_server_fails_with_endpoint() -> None:
    out = xdl("ping", servers="tcp://127.0.0.1:9", timeout="0.5")
    assert out.returncode == 1 and "tcp://127.0.0.1:9" in out.stderr


def test_malformed_traffic_over_the_wire(zmq_ctx: zmq.Context) -> None:
    proc, ep = start_shard(0, 1, "--max-request-bytes", "64k")
    try:
        sock = zmq_ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)

        def ask(frames: list[bytes]) -> dict:
            sock.send_multipart(frames)
            assert sock.poll(10000), "shard did not answer"
            return codec.decode(sock.recv_multipart())[1]

        ids = {"cid": "x", "inc": 1}
        assert ask([b"\x00garbage"])["code"] == "PROTOCOL"
        assert ask([b"XDL\x07", P.PING, codec.packb({})])["code"] == "PROTOCOL"
        assert ask([P.MAGIC, b"NOPE", codec.packb({**ids, "seq": 1})])["code"] == \
            "UNKNOWN_COMMAND"
        big = codec.encode(P.PULL, {**ids, "seq": 2, "table": "t"},
                           {"ids": np.arange(20000, dtype=np.int64)})
        reply = ask([bytes(memoryview(f)) for f in big])
        assert reply["code"] == "TOO_LARGE" and str(64 * 1024) in reply["message"]
        assert ask(codec.encode(P.PING, {**ids, "seq": 3}))["ok"]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout:
            proc.stdout.close()


def test_load_at_start_stays_under_the_checkpoint_root(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "root")
    os.makedirs(root)
    out = subprocess.run([*XDL, "server", "--bind", "tcp://127.0.0.1:0", "--checkpoint-root",
                          root, "--load", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "outside" in out.stderr and "XDL-READY" not in out.stdout
