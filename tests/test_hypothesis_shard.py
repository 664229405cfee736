"""Property-based checks (hypothesis) of the codec and of the shard's dispatch.

Bounded example counts keep the whole module to a few seconds; the atheris target
(tests/fuzz/fuzz_shard.py) runs the same oracle for as long as it is given.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdl import codec
from xdl import protocol as P
from xdl.errors import ProtocolError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fuzz"))
from shard_oracle import check_request, fresh_shard, still_serving  # noqa: E402

#: examples per property; XDL_HYPOTHESIS_EXAMPLES raises it for a longer search
SETTINGS = settings(max_examples=int(os.environ.get("XDL_HYPOTHESIS_EXAMPLES", "250")),
                    deadline=None, derandomize="XDL_HYPOTHESIS_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: header keys the handlers read, plus some they do not
KEYS = ["cid", "inc", "seq", "table", "name", "dim", "seed", "shape", "min_version", "phase",
        "dir", "optimizer", "initializer", "sync_workers", "step", "kind", "lr", "arrays"]
DTYPES = sorted(P.DTYPES)

ints = st.one_of(st.integers(-3, 40), st.integers(-(2 ** 63), 2 ** 64 - 1))
scalars = st.one_of(st.none(), st.booleans(), ints,
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["emb", "fc", "sync", "sgd", "adagrad", "zeros", "stage",
                                     "commit", "abort", "../x", "emb\n", "", "/tmp"]),
                    st.text(max_size=8), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner, max_size=4)),
    max_leaves=12)


@st.composite
def array_parts(draw: Any) -> tuple[list[Any], bytes]:
    """One ``[role, dtype, shape]`` descriptor and a frame, consistent or not."""
    role = draw(st.one_of(st.sampled_from(["ids", "grads", "rows", "grad", "initial"]), values))
    if draw(st.booleans()):  # consistent: a real array of an allowed dtype
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        payload = draw(st.binary(min_size=nbytes, max_size=nbytes))
        return [role, dtype, shape], payload
    return [role, draw(st.one_of(st.sampled_from(DTYPES), values)),
            draw(st.one_of(st.lists(ints, max_size=10), values))], draw(st.binary(max_size=64))


NAMES = st.sampled_from(["emb", "fc", "sync", "t2", "d2"])
FIELDS = {
    "table": st.one_of(NAMES, values), "name": st.one_of(NAMES, values),
    "dim": st.one_of(st.integers(-1, 6), values), "seed": ints,
    "shape": st.one_of(st.lists(st.integers(0, 4), max_size=3), values),
    "min_version": st.one_of(st.integers(-1, 3), values),
    "sync_workers": st.one_of(st.integers(0, 3), values),
    "step": st.one_of(st.integers(-1, 3), values),
    "phase": st.one_of(st.sampled_from(["stage", "commit", "abort"]), values),
    "dir": st.sampled_from(["/tmp", "x", "../y", "ckpt-000001.tmp"]),
    "tables": st.one_of(st.lists(NAMES, max_size=3), values),
    "counts": st.one_of(st.lists(st.integers(0, 5), max_size=3), values),
    "optimizer": st.one_of(st.sampled_from([
        {"kind": "sgd", "lr": 0.1}, {"kind": "adam", "lr": 0.01}, {"kind": "ftrl", "lr": 0.1},
        {"kind": "rmsprop", "lr": 0.1, "centered": True}, {"kind": "momentum", "lr": 0.1}]),
        values),
    "initializer": st.one_of(st.sampled_from([{"kind": "zeros"}, {"kind": "normal",
                                                                   "stddev": 0.1}]), values),
}


@st.composite
def plausible(draw: Any) -> list[bytes]:
    """A request that passes decoding and reaches a handler, with odd values in it."""
    command = draw(st.sampled_from(sorted(P.COMMANDS - {P.SHUTDOWN})))
    header = {"cid": draw(st.sampled_from(["h", "w2"])), "inc": 1,
              "seq": draw(st.integers(1, 60)),
              "table": draw(st.sampled_from(["emb", "emb", "emb", "fc", "t2"])),
              "name": draw(st.sampled_from(["fc", "fc", "sync", "emb", "d2"]))}
    n = draw(st.integers(0, 5))
    if command in (P.PULL_MANY, P.PUSH_MANY):
        header.update(tables=["emb"], counts=[n])
    elif command == P.CREATE_TABLE:
        header.update(table=draw(st.sampled_from(["t2", "t3", "emb"])), dim=draw(
            st.integers(1, 6)))
    elif command == P.CREATE_DENSE:
        header.update(name=draw(st.sampled_from(["d2", "d3", "fc"])), shape=[2, 2])
    elif command == P.DENSE_PUSH:
        header.update(step=0)
    for key in draw(st.sets(st.sampled_from(sorted(FIELDS)), max_size=5)):
        header[key] = draw(FIELDS[key])
    dim = draw(st.sampled_from([4, 4, 2]))
    arrays: dict[str, np.ndarray] = {}
    roles = draw(st.sets(st.sampled_from(["ids", "grads", "rows", "grad", "initial"])))
    if draw(st.integers(0, 9)) < 8:  # mostly the arrays the command needs
        roles |= {P.PUSH: {"ids", "grads"}, P.PUSH_MANY: {"ids", "grads"},
                  P.SET_ROWS: {"ids", "rows"}, P.DENSE_PUSH: {"grad"}}.get(command, {"ids"})
    for role in sorted(roles):
        if role == "ids":
            ids = np.array(draw(st.lists(st.integers(-3, 25), min_size=n, max_size=n)),
                           dtype=np.int64)
            arrays[role] = ids.astype(draw(st.sampled_from(["<i8", "<i8", "<i4", "<u8"])))
        else:
            flat_grads = command == P.PUSH_MANY and role == "grads"
            shape = {"grads": (n * dim,) if flat_grads else (n, dim),
                     "rows": (n, dim)}.get(role) or draw(
                st.sampled_from([(3, 2), (2,), (2, 2), (1,)]))
            bad = draw(st.integers(0, 3)) == 0  # NaN and Inf in one array of four
            elements = st.floats(width=32, allow_nan=bad, allow_infinity=bad)
            flat = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
            arrays[role] = np.array(flat, dtype=draw(st.sampled_from(["<f4", "<f4", "<f8"]))
                                    ).reshape(shape)
    frames = [bytes(memoryview(f)) for f in codec.encode(command, header, arrays)]
    if frames[3:] and draw(st.integers(0, 9)) == 0:  # a frame cut short
        i = draw(st.integers(3, len(frames) - 1))
        frames[i] = frames[i][: len(frames[i]) // 2]
    return frames


@st.composite
def messages(draw: Any) -> list[bytes]:
    """A message as a client (or an attacker) could send it."""
    kind = draw(st.integers(0, 9))
    if kind == 0:  # raw frames
        return draw(st.lists(st.binary(max_size=40), max_size=6))
    if kind >= 4:
        return draw(plausible())
    command = draw(st.one_of(st.sampled_from(sorted(P.COMMANDS)), st.binary(max_size=12)))
    header: dict[str, Any] = {}
    if draw(st.integers(0, 4)):  # mostly a valid identity, to reach the handlers
        header.update(cid="h", inc=1, seq=draw(st.integers(1, 50)))
    header.update(draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=5)))
    parts = draw(st.lists(array_parts(), max_size=3))
    if draw(st.integers(0, 3)):
        header["arrays"] = [d for d, _ in parts]
    try:
        packed = codec.packb(header)
    except (OverflowError, ValueError, TypeError):
        packed = b"\x80"
    magic = P.MAGIC if draw(st.integers(0, 9)) else draw(st.binary(max_size=5))
    return [magic, command, packed, *(p for _, p in parts)]


@SETTINGS
@given(st.lists(messages(), min_size=1, max_size=4))
def test_dispatch_never_crashes_and_refusals_change_nothing(batch: list[list[bytes]]) -> None:
    shard = fresh_shard()
    for frames in batch:
        check_request(shard, frames)
    still_serving(shard)


@SETTINGS
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_decode_of_any_frames_returns_or_raises_protocol_error(frames: list[bytes]) -> None:
    try:
        command, header, arrays = codec.decode(frames)
    except ProtocolError:
        return
    assert isinstance(command, bytes) and isinstance(header, dict)
    assert all(isinstance(a, np.ndarray) for a in arrays.values())


@SETTINGS
@given(messages())
def test_decode_of_structured_messages_returns_or_raises_protocol_error(
        frames: list[bytes]) -> None:
    try:
        codec.decode(frames)
    except ProtocolError as exc:
        assert str(exc)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["ids", "grads", "value"]), st.tuples(
    st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["table", "seq", "x"]), scalars, max_size=3),
    st.randoms(use_true_random=False))
def test_encode_decode_round_trip(spec: dict[str, tuple[str, list[int]]], header: dict[str, Any],
                                  rnd: Any) -> None:
    arrays = {}
    for role, (dtype, shape) in spec.items():
        n = math.prod(shape) * np.dtype(dtype).itemsize
        arrays[role] = np.frombuffer(rnd.randbytes(n), dtype=dtype).reshape(shape)
    try:
        frames = codec.encode(P.PUSH, header, arrays)
    except (OverflowError, ValueError, TypeError):
        return  # a header msgpack cannot carry
    command, h, out = codec.decode([bytes(memoryview(f)) for f in frames])
    assert command == P.PUSH and set(out) == set(arrays)
    for role, a in arrays.items():
        assert out[role].dtype == a.dtype and out[role].shape == a.shape
        assert out[role].tobytes() == a.tobytes()
    assert {k: v for k, v in h.items() if k != "arrays"}.keys() == header.keys()
