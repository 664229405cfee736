"""Retrying after ServerUnavailableError applies nothing twice (issue 10, item 4)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import numpy as np
import pytest

import xdl
from xdl.client import Client
from xdl.errors import ServerUnavailableError


def test_resend_after_unavailable_reuses_sequence_numbers(
        start_cluster: Callable[..., Client]) -> None:
    client = start_cluster(1, timeout=0.3, retries=1)
    client.create_table("t", 2, optimizer=xdl.optim.SGD(lr=1.0))
    ids = np.arange(5, dtype=np.int64)
    pid = client.ping()[0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # the shard hangs longer than every retry
    try:
        ticket = client.push("t", ids, np.ones((5, 2), np.float32))
        with pytest.raises(ServerUnavailableError, match="resend_unanswered"):
            client.wait(ticket)
    finally:
        os.kill(pid, signal.SIGCONT)
    # The shard now sees the push (and its resends): it applies it once. Retrying the
    # documented way resends with the same seq and is answered as a duplicate.
    assert client.resend_unanswered() >= 1
    np.testing.assert_array_equal(client.pull("t", ids), -np.ones((5, 2), np.float32))
    assert client.describe_table("t")["step"] == 1
    assert client.resend_unanswered() == 0
