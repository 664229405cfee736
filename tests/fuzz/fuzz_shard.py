"""atheris fuzz target: any message handed to a shard's dispatcher.

Each input is split into frames; the shard (one per run, so state accumulates as in a
real shard) must answer every message with one decodable reply, never raise, never
reply ``INTERNAL``, and leave its state unchanged when it refuses (see
:mod:`shard_oracle`). A finding stops the run with a traceback and the input.

Run for a fixed time (libFuzzer options pass through)::

    .venv/bin/python tests/fuzz/fuzz_shard.py -max_total_time=60

Inputs start from a small corpus of valid requests (written to ``-corpus_dir``, by
default build/fuzz_corpus) so that the fuzzer reaches the handlers quickly.
"""

from __future__ import annotations

import os
import sys

import atheris
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Modules with numba kernels are imported before instrumentation starts (numba cannot
# compile instrumented bytecode); the pure-Python request path imported below is
# instrumented for coverage.
import xdl.dedup  # noqa: E402, F401
import xdl.init  # noqa: E402, F401
import xdl.server.kernels  # noqa: E402, F401
import xdl.server.optimizers  # noqa: E402, F401
import xdl.sharding  # noqa: E402, F401

with atheris.instrument_imports(include=["xdl"], exclude=[
        "xdl.dedup", "xdl.init", "xdl.sharding", "xdl.server.kernels",
        "xdl.server.optimizers"]):
    from shard_oracle import check_request, fresh_shard, request, still_serving

    from xdl import codec
    from xdl import protocol as P

SEPARATOR = b"\xff\xfe|"  # splits an input into frames
_state = {"shard": fresh_shard(), "n": 0}


def frames_of(data: bytes) -> list[bytes]:
    """An input's frames: the parts between separators."""
    return data.split(SEPARATOR)


def seeds() -> list[bytes]:
    """Valid requests of every command, joined into fuzzer inputs."""
    ids = np.arange(4, dtype=np.int64)
    reqs = [
        request(P.PING, {}),
        request(P.PULL, {"table": "emb"}, {"ids": ids}),
        request(P.PUSH, {"table": "emb"}, {"ids": ids, "grads": np.ones((4, 4), np.float32)}),
        request(P.DELETE, {"table": "emb"}, {"ids": ids[:1]}),
        request(P.SET_ROWS, {"table": "emb"}, {"ids": ids, "rows": np.ones((4, 4), np.float32)}),
        request(P.CREATE_TABLE, {"table": "t", "dim": 2, "optimizer": {"kind": "adam",
                                                                       "lr": 0.1}}),
        request(P.DESCRIBE_TABLE, {"table": "emb"}),
        request(P.LIST_TABLES, {}),
        request(P.DROP_TABLE, {"table": "t"}),
        request(P.CREATE_DENSE, {"name": "d", "shape": [2, 2]},
                {"initial": np.zeros((2, 2), np.float32)}),
        request(P.DENSE_PULL, {"name": "fc", "min_version": 0}),
        request(P.DENSE_PUSH, {"name": "fc"}, {"grad": np.ones((3, 2), np.float32)}),
        request(P.DENSE_PUSH, {"name": "sync", "step": 0}, {"grad": np.ones(2, np.float32)}),
        request(P.PULL_MANY, {"tables": ["emb"], "counts": [4]}, {"ids": ids}),
        request(P.PUSH_MANY, {"tables": ["emb"], "counts": [4]},
                {"ids": ids, "grads": np.ones(16, np.float32)}),
        request(P.STATS, {}),
        request(P.LOAD, {"dir": "x", "phase": "abort"}),
    ]
    return [SEPARATOR.join(bytes(f) for f in r) for r in reqs]


def test_one_input(data: bytes) -> None:
    """One fuzzer input: one message to the long-lived shard."""
    shard = _state["shard"]
    frames = frames_of(data)
    if len(frames) > 1 and frames[1] == P.SHUTDOWN:
        frames[1] = P.PING  # stopping is the one state change a refusal check cannot see
    check_request(shard, frames)
    _state["n"] += 1
    if _state["n"] % 2000 == 0:
        still_serving(shard)
        if len(shard.tables) > 64 or sum(len(t) for t in shard.tables.values()) > 1_000_000:
            _state["shard"] = fresh_shard()  # keep the state small enough to compare fast
    if shard.parked:
        shard.refuse_parked("(fuzzer: released)")


def main(argv: list[str]) -> None:
    """Write the seed corpus, then fuzz until libFuzzer's limits stop the run."""
    corpus = next((a.split("=", 1)[1] for a in argv if a.startswith("-corpus_dir=")),
                  os.path.join(os.path.dirname(__file__), "..", "..", "build", "fuzz_corpus"))
    argv = [a for a in argv if not a.startswith("-corpus_dir=")]
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed-{i:02d}"), "wb") as f:
            f.write(seed)
    codec.decode(frames_of(seeds()[0]))  # the seeds split back into valid messages
    atheris.Setup([argv[0], *argv[1:], corpus], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
