"""A shard lets go of a request's buffers as soon as it has answered (issue 10: 8 x 48 MB
frames used to stay resident after the request)."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref
from typing import Any

import numpy as np
import psutil
import zmq

from xdl import codec
from xdl import protocol as P
from xdl.server.shard import Shard


def test_refused_request_buffers_are_freed_without_the_garbage_collector() -> None:
    shard = Shard()
    payload = np.zeros(1 << 20, np.uint8)
    alive = weakref.ref(payload)
    header = codec.packb({"cid": "c", "inc": 1, "seq": 1, "table": "nope",
                          "arrays": [["ids", "|u1", [1 << 20]]]})
    out: list[list[Any]] = []
    gc.disable()
    try:
        frames = [P.MAGIC, P.PULL, header, memoryview(payload)]
        shard.handle(frames, out.append)  # refused: no such table
        del frames, payload
        assert alive() is None, "the refused request's buffer is still referenced"
    finally:
        gc.enable()
    assert codec.decode(out[0])[1]["code"] == "NO_SUCH_TABLE"


def test_shard_memory_returns_after_large_requests() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "xdl.server", "--bind", "tcp://127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60_000)
    try:
        assert proc.stdout is not None
        sock.connect(proc.stdout.readline().split()[1])
        shard = psutil.Process(proc.pid)
        big = b"\0" * (32 << 20)
        header = {"cid": "m", "inc": 1, "seq": 1, "table": "x",
                  "arrays": [[f"a{i}", "|u1", [32 << 20]] for i in range(4)]}
        sock.send_multipart(codec.encode(P.PING, {"cid": "m", "inc": 1, "seq": 0}))
        sock.recv_multipart()
        before = shard.memory_info().rss
        for _ in range(3):  # 128 MiB per request
            sock.send_multipart([P.MAGIC, P.PULL, codec.packb(header), *[big] * 4])
            assert codec.decode(sock.recv_multipart())[1]["code"] == "NO_SUCH_TABLE"
        time.sleep(0.2)
        grown = shard.memory_info().rss - before
        assert grown < 48 << 20, f"shard holds {grown >> 20} MiB more after the requests"
    finally:
        sock.close(0)
        ctx.term()
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
