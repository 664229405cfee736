"""Encoding and decoding of xdl messages (layout in :mod:`xdl.protocol`).

All msgpack options live here. Arrays travel as raw buffers next to a small
header that names their dtype and shape; they are sent without copies when large
(:data:`COPY_BELOW`; :func:`send_frames`), received without copies
(:func:`recv_frames`) and decoded with :func:`numpy.frombuffer` (read-only views of
the received frame). No pickle is used anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from . import protocol as P
from .errors import ProtocolError

Arrays = dict[str, np.ndarray]

#: Longest command name accepted in a message's second frame.
MAX_COMMAND_BYTES = 32

#: Frames shorter than this are copied into ZeroMQ when sent; longer ones are handed over
#: without a copy. A zero-copy send costs more than copying a small frame: pyzmq frees
#: the buffer through its garbage-collector thread, which wakes and takes the GIL once
#: per frame. Measured on a 2-core host (``benchmarks/ps_throughput.py``, 4,096 keys x
#: dim 16 on 2 shards, 128 KiB replies): copying below this size costs less CPU per
#: request.
COPY_BELOW = 1 << 20

_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def packb(obj: Any) -> bytes:
    """Serialize a header (maps, lists, str, bytes, numbers) with msgpack."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes | memoryview) -> Any:
    """Deserialize a header, refusing anything msgpack would need extension types for."""
    return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=P.MAX_HEADER_BYTES,
                           max_str_len=P.MAX_HEADER_BYTES)


def _wire_array(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dt.str not in P.DTYPES:
        raise ProtocolError(f"dtype {a.dtype} cannot travel; allowed: {sorted(P.DTYPES)}")
    # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray would make it 1-d)
    return np.asarray(a, dtype=dt, order="C")


def encode(command: bytes, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
           ) -> list[Any]:
    """Build the frames of one message: ``[MAGIC, command, header, *array buffers]``."""
    h = dict(header)
    frames: list[Any] = []
    meta = []
    for role, arr in (arrays or {}).items():
        a = _wire_array(arr)
        meta.append([role, a.dtype.str, list(a.shape)])
        frames.append(memoryview(a).cast("B") if a.size else b"")  # type: ignore[arg-type]
    h["arrays"] = meta
    return [P.MAGIC, command, packb(h), *frames]


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message on ``sock``.

    Like ``sock.send_multipart(frames, copy=False)`` but copies every frame shorter than
    :data:`COPY_BELOW` (see there) and skips pyzmq's per-call type checks and flag enums.
    Frames are bytes, 1-D byte memoryviews (as :func:`encode` makes them), any other
    buffer, or ``zmq.Frame``.
    """
    last = len(frames) - 1
    more = flags | _SNDMORE
    send = sock.send
    for i, f in enumerate(frames):
        n = len(f) if isinstance(f, bytes) else memoryview(f).nbytes
        send(f, more if i < last else flags, copy=n < COPY_BELOW)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[zmq.Frame]:
    """Receive one multipart message as ``zmq.Frame`` objects (no copies).

    Like ``sock.recv_multipart(flags, copy=False)`` without a ``RCVMORE`` socket option
    read per frame (each frame says whether more follow).
    """
    f = sock.recv(flags, copy=False)
    out = [f]
    while f.more:
        f = sock.recv(flags, copy=False)
        out.append(f)
    return out


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock`` (its ``EVENTS`` option: no poll, no wait).

    Plain ints, not pyzmq's flag enums, which cost more than the option read.
    """
    events: int = sock.getsockopt(_EVENTS)  # type: ignore[assignment]
    return bool(events & _POLLIN)


def _frame_bytes(f: Any) -> memoryview:
    # zmq.Frame, bytes and memoryview all export the buffer protocol
    return memoryview(f)


def decode(frames: Sequence[Any]) -> tuple[bytes, dict[str, Any], Arrays]:
    """Parse a message's frames into ``(command, header, arrays)``.

    Raises :class:`~xdl.errors.ProtocolError` naming what is wrong: missing frames,
    wrong magic or version, a header that is not a map, an unknown dtype, or an
    array frame whose length does not match its declared shape.
    """
    if len(frames) < 3:
        raise ProtocolError(f"truncated message: expected at least 3 frames, got {len(frames)}")
    magic = bytes(_frame_bytes(frames[0])[:8])
    if magic != P.MAGIC:
        if len(magic) == 4 and magic[:3] == P.MAGIC_PREFIX:
            raise ProtocolError(f"protocol version {magic[3]} not supported; this side speaks "
                                f"version {P.VERSION}")
        raise ProtocolError(f"bad magic {magic[:8]!r}: expected {P.MAGIC!r}")
    cbuf = _frame_bytes(frames[1])
    if cbuf.nbytes > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command frame of {cbuf.nbytes} bytes: a command name has at "
                            f"most {MAX_COMMAND_BYTES}")
    command = bytes(cbuf)
    hbuf = _frame_bytes(frames[2])
    if hbuf.nbytes > P.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {hbuf.nbytes} bytes exceeds {P.MAX_HEADER_BYTES}")
    try:
        header = unpackb(hbuf)
    except Exception as exc:  # msgpack raises several unrelated classes
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    meta = header.get("arrays", [])
    if not isinstance(meta, list) or len(meta) > P.MAX_ARRAYS:
        raise ProtocolError(f"header field 'arrays' must be a list of at most {P.MAX_ARRAYS} "
                            "[role, dtype, shape] entries")
    if len(meta) != len(frames) - 3:
        raise ProtocolError(f"header declares {len(meta)} array frames, message has "
                            f"{len(frames) - 3}")
    arrays: Arrays = {}
    for entry, frame in zip(meta, frames[3:], strict=True):
        role, dt, shape = _descriptor(entry)
        if role in arrays:
            raise ProtocolError(f"array {role!r} is declared twice")
        buf = _frame_bytes(frame)
        # Python ints: the product cannot wrap, whatever the declared shape.
        expected = math.prod(shape) * dt.itemsize
        if buf.nbytes != expected:
            raise ProtocolError(f"array {role!r}: shape {list(shape)} of {dt.str} needs "
                                f"{expected} bytes, frame has {buf.nbytes}")
        arrays[role] = np.frombuffer(buf, dtype=dt).reshape(shape) if expected else \
            np.empty(shape, dtype=dt)
    return command, header, arrays


def _descriptor(entry: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    """Check one ``[role, dtype, shape]`` descriptor of any wire type; refuse it clearly."""
    if not isinstance(entry, list) or len(entry) != 3:
        raise ProtocolError(f"bad array descriptor {_short(entry)}: expected [role, dtype, "
                            "shape]")
    role, dtype, shape = entry
    if not isinstance(role, str) or not 0 < len(role) <= 64:
        raise ProtocolError(f"bad array role {_short(role)}: expected a name of 1-64 "
                            "characters")
    if not isinstance(dtype, str) or dtype not in P.DTYPES:
        raise ProtocolError(f"array {role!r}: dtype {_short(dtype)} not allowed; allowed: "
                            f"{sorted(P.DTYPES)}")
    if not isinstance(shape, list) or len(shape) > P.MAX_RANK:
        raise ProtocolError(f"array {role!r}: shape {_short(shape)} must be a list of at most "
                            f"{P.MAX_RANK} dimensions")
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= P.MAX_DIM:
            raise ProtocolError(f"array {role!r}: shape {_short(shape)} must hold ints in "
                                f"[0, {P.MAX_DIM}]")
    return role, np.dtype(dtype), tuple(shape)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
