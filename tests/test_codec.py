"""Frame layout, zero-copy decoding and malformed-message errors of the codec."""

from __future__ import annotations

import numpy as np
import pytest

from xdl import codec
from xdl import protocol as P
from xdl.errors import ProtocolError


def test_round_trip_keeps_dtypes_shapes_and_header() -> None:
    arrays = {"ids": np.array([5, -1, 2**62], dtype=np.int64),
              "grads": np.arange(6, dtype=np.float32).reshape(3, 2),
              "empty": np.zeros((0, 4), dtype=np.float32)}
    frames = codec.encode(P.PUSH, {"table": "t", "seq": 7}, arrays)
    assert frames[0] == P.MAGIC and frames[1] == P.PUSH
    command, header, got = codec.decode([bytes(memoryview(f)) for f in frames])
    assert command == P.PUSH and header["table"] == "t" and header["seq"] == 7
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_decoded_arrays_are_views_of_the_frames() -> None:
    buf = bytearray(np.arange(4, dtype=np.int64).tobytes())
    frames = [P.MAGIC, P.PULL, codec.packb({"arrays": [["ids", "<i8", [4]]]}), buf]
    _, _, arrays = codec.decode(frames)
    buf[0] = 9  # no copy: the array sees the change
    assert arrays["ids"][0] == 9


def test_big_endian_input_travels_little_endian() -> None:
    a = np.arange(3, dtype=">i8")
    _, _, got = codec.decode(codec.encode(P.PULL, {}, {"ids": a}))
    assert got["ids"].dtype.str == "<i8"
    np.testing.assert_array_equal(got["ids"], [0, 1, 2])


@pytest.mark.parametrize("frames, match", [
    ([P.MAGIC, P.PING], "truncated"),
    ([b"ZMQ\x01", P.PING, codec.packb({})], "bad magic"),
    ([b"XDL\x09", P.PING, codec.packb({})], "version 9 not supported"),
    ([P.MAGIC, P.PING, b"\xc1"], "not valid msgpack"),
    ([P.MAGIC, P.PING, codec.packb([1, 2])], "must be a map"),
    ([P.MAGIC, P.PULL, codec.packb({"arrays": [["ids", "<i8", [4]]]})], "declares 1 array"),
    ([P.MAGIC, P.PULL, codec.packb({"arrays": [["ids", "<i8", [4]]]}), b"\0" * 31],
     "needs 32 bytes, frame has 31"),
    ([P.MAGIC, P.PULL, codec.packb({"arrays": [["ids", "O", [1]]]}), b"\0" * 8], "not allowed"),
    ([P.MAGIC, P.PULL, codec.packb({"arrays": [["ids", "<i8"]]}), b""], "bad array descriptor"),
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        codec.decode(frames)


def test_object_arrays_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError, match="cannot travel"):
        codec.encode(P.PULL, {}, {"ids": np.array(["a"], dtype=object)})


@pytest.mark.parametrize("copy_below", [0, 64, 1 << 20])
def test_send_frames_and_recv_frames_carry_a_message_whole(
        monkeypatch: pytest.MonkeyPatch, copy_below: int) -> None:
    """Copied (small) and zero-copy (large) frames arrive equal, in order, as one message."""
    import zmq

    monkeypatch.setattr(codec, "COPY_BELOW", copy_below)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://codec-frames")
        b.connect("inproc://codec-frames")
        assert not codec.readable(b)
        rows = np.arange(4096, dtype=np.float32).reshape(256, 16)
        frames = codec.encode(P.PULL, {"seq": 3}, {"rows": rows, "none": np.zeros(0, "<i8")})
        codec.send_frames(a, frames)
        codec.send_frames(a, [P.MAGIC])  # a second message stays separate
        assert codec.readable(b)
        got = codec.recv_frames(b)
        assert [bytes(f) for f in got] == [bytes(memoryview(f)) for f in frames]
        command, header, arrays = codec.decode(got)
        assert command == P.PULL and header["seq"] == 3
        np.testing.assert_array_equal(arrays["rows"], rows)
        assert arrays["none"].shape == (0,)
        codec.send_frames(a, got)  # received frames can be sent on as they are
        assert [bytes(f) for f in codec.recv_frames(b)] == [P.MAGIC]
        assert [bytes(f) for f in codec.recv_frames(b)] == [bytes(f) for f in got]
        assert not codec.readable(b)
        with pytest.raises(zmq.Again):
            codec.recv_frames(b, zmq.NOBLOCK)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
