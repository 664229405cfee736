"""Every error xdl raises, in one module.

Each class carries a stable ``code`` (the same code travels in a shard's error
reply, see :mod:`xdl.protocol`) and a message that says what was wrong, where
(endpoint, table, field) and what was expected.
"""

from __future__ import annotations


class XdlError(Exception):
    """Base class of every error raised by xdl."""

    code: str = "ERROR"

    def __init__(self, message: str, *, endpoint: str | None = None, table: str | None = None):
        self.message = message
        self.endpoint = endpoint
        self.table = table
        where = []
        if endpoint:
            where.append(f"endpoint {endpoint}")
        if table:
            where.append(f"table {table!r}")
        prefix = f"[{', '.join(where)}] " if where else ""
        super().__init__(f"{prefix}{message}")


class ProtocolError(XdlError):
    """A message could not be decoded: wrong magic or version, truncated or malformed frames."""

    code = "PROTOCOL"


class UnknownCommandError(XdlError):
    """The shard does not know the command it was sent."""

    code = "UNKNOWN_COMMAND"


class TableNotFoundError(XdlError):
    """The named table or dense variable does not exist on the shard."""

    code = "NO_SUCH_TABLE"


class TableExistsError(XdlError):
    """A table was created twice with different settings."""

    code = "TABLE_EXISTS"


class InvalidArgumentError(XdlError):
    """A request's arrays or fields are inconsistent (dim, dtype, length, duplicates, NaN/Inf)."""

    code = "INVALID_ARGUMENT"


class RequestTooLargeError(XdlError):
    """A request is larger than the shard accepts (``--max-request-bytes``)."""

    code = "TOO_LARGE"


class StaleClientError(XdlError):
    """A request came from an older incarnation of a client that has since restarted."""

    code = "STALE_CLIENT"


class CheckpointError(XdlError):
    """A checkpoint could not be written or read (missing file, checksum mismatch, bad manifest)."""

    code = "CHECKPOINT"


class DiskFullError(CheckpointError):
    """A checkpoint (or log) could not be written because its device is full."""

    code = "DISK_FULL"


class PermissionDeniedError(XdlError):
    """A client's CURVE key may not send this command (an admin command from a non-admin key)."""

    code = "DENIED"


class ShardRestartedError(XdlError):
    """A request was sent to a shard process that has since restarted (``boot`` differs).

    The client's transport handles it: it resends its unanswered requests, in order,
    to the new process. It reaches a caller only from a client that does not.
    """

    code = "RESTARTED"


class ServerUnavailableError(XdlError):
    """A shard did not answer within the timeout after every retry.

    The requests it left unanswered may still be applied later. To retry safely, call
    :meth:`xdl.Client.resend_unanswered` once the shard is back: it resends them with
    their original sequence numbers, so a shard that applied one answers it as a
    duplicate instead of applying it twice.
    """

    code = "UNAVAILABLE"


class DeadlineExceededError(XdlError):
    """A request waited on a shard longer than its deadline (a parked ``DENSE_PULL``)."""

    code = "DEADLINE"


class InternalError(XdlError):
    """An unexpected failure inside a shard; the shard keeps serving."""

    code = "INTERNAL"


class PluginError(XdlError):
    """A plugin is malformed (misspelled hook, bad registration) or a backend is missing."""

    code = "PLUGIN"


class BackendNotAvailableError(XdlError, ImportError):
    """A framework backend was asked for but its framework is not installed."""

    code = "BACKEND_MISSING"


#: code → class, so a client can re-raise a shard's error reply as the matching class.
ERRORS_BY_CODE: dict[str, type[XdlError]] = {
    cls.code: cls
    for cls in (
        XdlError,
        ProtocolError,
        UnknownCommandError,
        TableNotFoundError,
        TableExistsError,
        InvalidArgumentError,
        RequestTooLargeError,
        StaleClientError,
        CheckpointError,
        DiskFullError,
        PermissionDeniedError,
        ShardRestartedError,
        ServerUnavailableError,
        DeadlineExceededError,
        InternalError,
        PluginError,
        BackendNotAvailableError,
    )
}


def error_from_code(code: str, message: str, *, endpoint: str | None = None,
                    table: str | None = None) -> XdlError:
    """Build the error class registered for ``code`` (``XdlError`` when unknown)."""
    cls = ERRORS_BY_CODE.get(code, XdlError)
    return cls(message, endpoint=endpoint, table=table)
