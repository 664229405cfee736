"""Shard processes started on this machine: :class:`LocalShards`.

:func:`xdl.connect` starts them when no endpoints are given (``local_shards=N``).
Each is ``python -m xdl.server`` bound to a random loopback port; it prints
``XDL-READY <endpoint>`` once its kernels are compiled, and exits by itself when
this process dies (``--parent-pid``).
"""

from __future__ import annotations

import atexit
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence

from .errors import ServerUnavailableError

#: the line a shard prints once it serves, followed by its endpoint
READY_PREFIX = "XDL-READY "


def _root_args(extra_args: Sequence[str]) -> list[str]:
    """``--checkpoint-root`` for local shards unless ``extra_args`` has one.

    Local shards run as this user and exist for this process only, so they save where the
    caller asks: their root is ``XDL_CHECKPOINT_ROOT`` when set, else the file system's
    root. They still write only into a checkpoint folder being written (``ckpt-<n>.tmp``)
    and load only committed checkpoints.
    """
    if any(a == "--checkpoint-root" or a.startswith("--checkpoint-root=") for a in extra_args):
        return []
    return ["--checkpoint-root", os.environ.get("XDL_CHECKPOINT_ROOT") or os.sep]


class LocalShards:
    """Shard processes started on this machine by :func:`xdl.connect` (``local_shards=N``).

    They are stopped by :meth:`stop`, by :meth:`xdl.Client.close` and at interpreter exit;
    each shard also exits by itself when this process dies.

    :param num_shards: how many shards to start.
    :param host: interface to bind (loopback by default).
    :param startup_timeout: seconds a shard may take to report ready.
    :param extra_args: more command-line arguments for every shard.
    """

    def __init__(self, num_shards: int, *, host: str = "127.0.0.1", startup_timeout: float = 180.0,
                 extra_args: Sequence[str] = ()) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.endpoints: list[str] = []
        try:
            for k in range(num_shards):
                cmd = [sys.executable, "-m", "xdl.server", "--bind", f"tcp://{host}:0",
                       "--shard", str(k), "--num-shards", str(num_shards),
                       "--parent-pid", str(os.getpid()), *_root_args(extra_args), *extra_args]
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                                   stdin=subprocess.DEVNULL))
            for k, proc in enumerate(self.procs):
                self.endpoints.append(self._await_ready(k, proc, startup_timeout))
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)

    @staticmethod
    def _await_ready(k: int, proc: subprocess.Popen[str], timeout: float) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.5):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith(READY_PREFIX):
                    return line[len(READY_PREFIX):].strip()
        finally:
            sel.close()
        code = proc.poll()
        raise ServerUnavailableError(
            f"local shard {k} did not report ready within {timeout:.0f} s "
            f"(exit code {code}); run `python -m xdl.server --shard {k}` to see its output")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate every shard process and reap it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []
        atexit.unregister(self.stop)
