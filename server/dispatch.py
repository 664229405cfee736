"""The dispatcher: from a request's frames to a reply, whatever the frames hold.

It checks the message's size, decodes it, identifies the client, routes the command
to its handler (through the exactly-once filter for mutating commands) and turns
every failure into an error reply: an :class:`~xdl.errors.XdlError` as its own code,
anything else as ``INTERNAL`` naming the command (the traceback is logged once per
distinct failure). It never raises, so no input can stop the service loop.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from xdl import codec
from xdl import protocol as P
from xdl.errors import (
    InternalError,
    ProtocolError,
    RequestTooLargeError,
    UnknownCommandError,
    XdlError,
)

from .state import Reply, Request, Respond, ShardState
from .stats import CommandStats

log = logging.getLogger("xdl.server")

#: A command handler: a reply, or ``None`` when it will answer later through
#: ``req.respond`` (a parked dense pull).
Handler = Callable[[ShardState, Request], "Reply | None"]

#: Frames a message may have: magic, command, header and the array frames.
MAX_FRAMES = 3 + P.MAX_ARRAYS


def frame_size(frame: Any) -> int:
    """Bytes in one frame (``zmq.Frame``, bytes or memoryview)."""
    if type(frame) is zmq.Frame or type(frame) is bytes:
        return len(frame)  # no memoryview (a Frame's .buffer builds one per call)
    buf = getattr(frame, "buffer", frame)
    return memoryview(buf).nbytes


class Dispatcher:
    """Routes decoded requests of one shard to ``handlers`` (command → handler).

    :param state: the shard state the handlers work on.
    :param handlers: one handler per command.
    """

    def __init__(self, state: ShardState, handlers: Mapping[bytes, Handler]) -> None:
        self.state = state
        self.handlers = dict(handlers)
        self._logged: set[tuple[str, str, str]] = set()
        #: command → its name in the statistics (decoded once, not per request)
        self._names = {c: c.decode("ascii") for c in self.handlers}
        #: called as ``journal(frames, request, ok)`` after a request ran (not a resend),
        #: before its reply: the write-ahead log (:class:`xdl.server.durability.Durability`)
        self.journal: Callable[[list[Any], Request, bool], None] | None = None

    def handle(self, frames: list[Any], respond: Respond) -> None:
        """Serve one request (its frames without the routing identity); never raises."""
        t0 = time.perf_counter()
        command = b"?"
        seq = -1
        ok = False
        try:
            if len(frames) > MAX_FRAMES:
                raise ProtocolError(f"message of {len(frames)} frames: at most {MAX_FRAMES} "
                                    f"(magic, command, header and {P.MAX_ARRAYS} arrays)")
            size = sum(frame_size(f) for f in frames)
            if size > self.state.max_request_bytes:
                if len(frames) > 1:
                    command = bytes(memoryview(getattr(frames[1], "buffer", frames[1]))[:32])
                raise RequestTooLargeError(
                    f"request of {size} bytes exceeds this shard's limit of "
                    f"{self.state.max_request_bytes} bytes; split it into smaller calls")
            command, header, arrays = codec.decode(frames)
            raw_seq = header.get("seq")
            if isinstance(raw_seq, int) and not isinstance(raw_seq, bool):
                seq = raw_seq
            handler = self.handlers.get(command)
            if handler is None:
                raise UnknownCommandError(
                    f"unknown command {command[:32]!r}; known: "
                    f"{sorted(c.decode() for c in self.handlers)}")
            cid, inc = _identify(header)
            req = Request(command, header, arrays, cid, inc, seq, respond)
            ok = self._route(handler, req, frames)
        except XdlError as exc:
            respond(self._error_reply(command, seq, exc))
        except Exception as exc:  # decoding or filtering bug: still a reply, never a crash
            respond(self._error_reply(command, seq, self._internal(command, exc)))
        finally:
            name = self._names.get(command)
            if name is None:  # a handler added after construction, or an unknown command
                name = command.decode("ascii") if command in self.handlers else "?"
            st = self.state.stats.get(name)
            if st is None:
                st = self.state.stats[name] = CommandStats()
            st.record(time.perf_counter() - t0, ok)

    def _route(self, handler: Handler, req: Request, frames: list[Any]) -> bool:
        if req.command not in P.MUTATING:
            reply, refusal = self._run(handler, req)
            if self.journal is not None and req.command == P.SAVE:
                self.journal(frames, req, refusal is None)
            if reply is not None:
                req.respond(reply)
            return refusal is None
        filt = self.state.exactly_once
        rec = filt.record(req.cid, req.inc)
        resent = filt.resend_reply(req.cid, rec, req.command, req.seq)
        if resent is not None:
            req.respond(resent)
            return True
        reply, refusal = self._run(handler, req)
        assert reply is not None, "mutating handlers answer at once"
        filt.remember(rec, req.seq, reply, refusal)
        if self.journal is not None:
            self.journal(frames, req, refusal is None)
        req.respond(reply)
        return refusal is None

    def _run(self, handler: Handler, req: Request
             ) -> tuple[list[Any] | None, tuple[str, str, str | None] | None]:
        """Run ``handler``: ``(reply frames or None, refusal or None)``."""
        try:
            out = handler(self.state, req)
            if out is None:
                return None, None
            rh, ra = out
            return codec.encode(req.command, {"ok": True, "seq": req.seq, **rh}, ra), None
        # The reply is built inside each except clause: keeping the exception past it
        # would tie this frame (and the request's buffers) into a reference cycle with
        # its traceback, held until the garbage collector happens to run.
        except XdlError as exc:
            return self._refusal(req, exc)
        except Exception as exc:  # a bug must not take the shard down
            return self._refusal(req, self._internal(req.command, exc))

    def _refusal(self, req: Request, err: XdlError
                 ) -> tuple[list[Any], tuple[str, str, str | None]]:
        return self._error_reply(req.command, req.seq, err), (err.code, str(err), err.table)

    def _internal(self, command: bytes, exc: Exception) -> InternalError:
        name = command[:32].decode("ascii", "replace")
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        key = (name, type(exc).__name__, where)
        if key not in self._logged:  # once per distinct failure, not once per request
            self._logged.add(key)
            log.error("internal error in %s on shard %d:\n%s", name, self.state.shard,
                      "".join(traceback.format_exception(exc)))
        return InternalError(f"{name} failed: {type(exc).__name__}: {exc} (shard "
                             f"{self.state.shard}; see the shard's log)")

    def _error_reply(self, command: bytes, seq: int, exc: XdlError) -> list[Any]:
        return codec.encode(command if command in P.COMMANDS else b"ERROR", {
            "ok": False, "seq": seq, "code": exc.code, "message": str(exc),
            "table": exc.table})


def _identify(header: dict[str, Any]) -> tuple[str, int]:
    cid, inc, seq = header.get("cid"), header.get("inc"), header.get("seq")
    if (not isinstance(cid, str) or not 0 < len(cid) <= 256
            or not isinstance(inc, int) or isinstance(inc, bool)
            or not isinstance(seq, int) or isinstance(seq, bool)
            or not -(1 << 63) <= inc < 1 << 63 or not -1 <= seq < 1 << 63):
        raise ProtocolError("header must carry 'cid' (str of 1-256 characters), 'inc' and "
                            "'seq' (64-bit ints, seq >= -1)")
    return cid, inc
