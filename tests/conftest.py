"""Shared fixtures: shard clusters over loopback that are always stopped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import psutil
import pytest
import zmq

from xdl.client import Client, LocalShards, connect


@pytest.fixture
def start_cluster() -> Iterator[Callable[..., Client]]:
    """Factory: ``start_cluster(n, **connect_kwargs)`` starts n shard processes and a client."""
    started: list[tuple[Client, LocalShards | None]] = []

    def start(n: int = 2, *, extra_args: tuple[str, ...] = (), **kwargs: object) -> Client:
        local = LocalShards(n, extra_args=extra_args)
        client = Client(local.endpoints, local=local, **kwargs)  # type: ignore[arg-type]
        started.append((client, local))
        return client

    yield start
    for client, local in started:
        client.close()
        if local is not None:
            local.stop()
            assert all(p.poll() is not None for p in local.procs)


@pytest.fixture
def cluster2(start_cluster: Callable[..., Client]) -> Client:
    """A client of two fresh local shards."""
    return start_cluster(2, timeout=20.0)


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_processes() -> Iterator[None]:
    yield
    children = [p for p in psutil.Process(os.getpid()).children(recursive=True)
                if "xdl.server" in " ".join(p.cmdline())]
    assert not children, f"shard processes left running: {[p.pid for p in children]}"


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    """A ZeroMQ context whose sockets are all closed (linger 0) at teardown."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


__all__ = ["connect"]
