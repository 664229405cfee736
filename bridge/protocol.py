"""The xdl wire protocol: frame layout and named constants, in one place.

A request or reply is one ZeroMQ multipart message::

    frame 0   MAGIC            b"XDL" + one version byte
    frame 1   command          ASCII name, e.g. b"PULL" (replies echo it)
    frame 2   header           msgpack map (see below)
    frame 3.. array frames     raw little-endian buffers, one per entry of header["arrays"]

Request header keys:

``cid``   client id (str), ``inc`` incarnation (int), ``seq`` sequence number (int),
``arrays`` list of ``[role, dtype, shape]`` describing frames 3.., plus the
command's own fields (``table``, ``dim``, ...). Optional ``boot``: the shard process
the client believes it talks to; a shard whose boot id differs refuses the request
with ``RESTARTED`` without running it (see below).

Reply header keys:

``ok`` (bool), ``seq`` (the request's seq), ``arrays`` as above; on failure ``code``
(one of :data:`ERROR_CODES`, also :attr:`xdl.errors.XdlError.code`) and ``message``.
``boot`` (str): an id of the shard process, new at every start, and ``wal`` (bool):
whether it keeps a write-ahead log. A client that sees a new boot id resends its
unanswered requests in seq order, stamped with it: requests that were in flight when
a shard died are refused by its successor rather than overtaken by later ones.

A shard binds one ROUTER; a client holds one DEALER per shard and sends without an
empty delimiter frame. Pushes are applied exactly once per ``(cid, inc, seq)``:
a shard keeps, per client, the highest applied push seq and its reply, and answers
a duplicate with that reply (flag ``dup``) without applying it again.
"""

from __future__ import annotations

VERSION = 1
MAGIC = b"XDL" + bytes([VERSION])
MAGIC_PREFIX = b"XDL"

# Commands.
PING = b"PING"
CREATE_TABLE = b"CREATE_TABLE"
DESCRIBE_TABLE = b"DESCRIBE_TABLE"
LIST_TABLES = b"LIST_TABLES"
DROP_TABLE = b"DROP_TABLE"
PULL = b"PULL"
PUSH = b"PUSH"
#: several tables in one request: header ``tables`` (names) and ``counts`` (ids per
#: table); array ``ids`` holds every table's ids back to back, ``rows`` / ``grads`` the
#: tables' rows back to back as one flat float32 array (``count × dim`` values each)
PULL_MANY = b"PULL_MANY"
PUSH_MANY = b"PUSH_MANY"
DELETE = b"DELETE"
SET_ROWS = b"SET_ROWS"
CREATE_DENSE = b"CREATE_DENSE"
DENSE_PULL = b"DENSE_PULL"
DENSE_PUSH = b"DENSE_PUSH"
STATS = b"STATS"
SAVE = b"SAVE"
LOAD = b"LOAD"
SHUTDOWN = b"SHUTDOWN"

COMMANDS = frozenset({
    PING, CREATE_TABLE, DESCRIBE_TABLE, LIST_TABLES, DROP_TABLE, PULL, PUSH, DELETE, SET_ROWS,
    CREATE_DENSE, DENSE_PULL, DENSE_PUSH, STATS, SAVE, LOAD, SHUTDOWN, PULL_MANY, PUSH_MANY,
})

#: Commands that change state and are therefore applied exactly once per seq.
MUTATING = frozenset({CREATE_TABLE, DROP_TABLE, PUSH, DELETE, SET_ROWS, CREATE_DENSE,
                      DENSE_PUSH, LOAD, PUSH_MANY})

# Array dtypes allowed on the wire (numpy dtype strings, little-endian).
DTYPES = frozenset({"<i8", "<u8", "<i4", "<f4", "<f8", "|u1"})

# Sharding: an id's bucket is mix64(id) >> BUCKET_SHIFT.
NUM_BUCKETS = 65536
BUCKET_SHIFT = 48

# Limits.
DEFAULT_MAX_REQUEST_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 64
#: Most dimensions an array on the wire (or a dense variable) may have.
MAX_RANK = 8
#: Largest dimension of one array axis (far above any real array; keeps products exact).
MAX_DIM = 1 << 40
#: ``DENSE_PULL`` requests one shard keeps waiting for a version, and for how long.
MAX_PARKED = 1024
PARK_TIMEOUT_S = 60.0

#: First words of the line a shard prints on stdout once it serves: ``XDL-READY <endpoint>``.
READY_PREFIX = "XDL-READY "

# Client defaults (overridable per connect() call or by XDL_* variables).
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3

ERROR_CODES = frozenset({
    "ERROR", "PROTOCOL", "UNKNOWN_COMMAND", "NO_SUCH_TABLE", "TABLE_EXISTS", "INVALID_ARGUMENT",
    "TOO_LARGE", "STALE_CLIENT", "CHECKPOINT", "DISK_FULL", "DEADLINE", "DENIED",
    "RESTARTED", "INTERNAL",
})
