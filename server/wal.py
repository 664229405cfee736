"""A shard's write-ahead log: no acknowledged change is lost when the process dies.

Every request that changes a shard's state (create or drop a table, push, delete,
dense create and push) is appended to the log after the shard applied it and before
its reply leaves; the reply is held until the record is durable. A restarted shard
rebuilds its state from the latest checkpoint the log names plus a replay of every
request recorded after it, through the same exactly-once filter and handlers.

Record layout (little-endian)::

    "XWL1"  u32 body length  u32 CRC-32 of body      (12-byte frame header)
    body =  u32 meta length, msgpack meta, frame bytes...

``meta`` is a map ``{"lsn": int, "kind": str, "sizes": [bytes of each frame], ...}``
written with :func:`xdl.codec.packb`; the frames are the request's wire frames as the
shard received them (a request is logged without being re-encoded, and replayed by
handing the same frames to the shard). No pickle. The CRC covers meta and frames, so a
record torn by a crash mid-write is detected; recovery truncates the last segment at the
first bad record (nothing after it was ever acknowledged).

Kinds of record: ``req`` (a request's frames, replayed), ``save`` (the shard wrote its
part of a checkpoint into ``dir``; meta also holds this shard's exactly-once marks) and
``base`` (the state was replaced by the checkpoint at ``path``: a ``LOAD``, or
``--load`` at start). A checkpoint record starts a new segment; once its checkpoint is
committed, every older segment is deleted.

Durability (``fsync`` policy): ``"every"`` syncs before any reply leaves, as a group
commit: a thread runs ``fdatasync`` while the shard serves on, and the requests that
arrive meanwhile share the next one; a number of milliseconds starts a sync at most that
long after the oldest unsynced record (replies wait for it); ``"none"`` never syncs: a
record is written to the OS before the reply, so it survives the process being killed,
but not the machine losing power.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdl import codec
from xdl.errors import CheckpointError, DiskFullError, InvalidArgumentError

log = logging.getLogger("xdl.server")

RECORD_MAGIC = b"XWL1"
_FRAME = struct.Struct("<4sII")
_META_LEN = struct.Struct("<I")
#: largest record body accepted when reading (a corrupt length must not allocate gigabytes)
MAX_RECORD_BYTES = 1 << 32
DEFAULT_SEGMENT_BYTES = 64 << 20
_SEGMENT = re.compile(r"^(\d{20})\.wal$")

REQ = "req"
SAVE = "save"
BASE = "base"

Buffer = Any  # bytes, memoryview or zmq.Frame


def _bytes_of(frame: Buffer) -> memoryview:
    buf: Any = getattr(frame, "buffer", frame)
    return memoryview(buf).cast("B")


@dataclass(frozen=True)
class Record:
    """One decoded log record.

    :ivar lsn: log sequence number (1, 2, ... over the log's whole life).
    :ivar kind: ``"req"``, ``"save"`` or ``"base"``.
    :ivar meta: the record's msgpack map (``lsn``, ``kind``, ``sizes`` and kind fields).
    :ivar frames: the logged frames (read-only views).
    """

    lsn: int
    kind: str
    meta: dict[str, Any]
    frames: list[memoryview]


def encode_record(lsn: int, kind: str, frames: Sequence[Buffer] = (), **fields: Any
                  ) -> list[memoryview | bytes]:
    """Buffers of one record, ready for ``os.writev`` (frames are not copied)."""
    views = [_bytes_of(f) for f in frames]
    meta = codec.packb({**fields, "lsn": lsn, "kind": kind, "sizes": [v.nbytes for v in views]})
    head = _META_LEN.pack(len(meta))
    crc = zlib.crc32(meta, zlib.crc32(head))
    for v in views:
        crc = zlib.crc32(v, crc)
    length = len(head) + len(meta) + sum(v.nbytes for v in views)
    return [_FRAME.pack(RECORD_MAGIC, length, crc), head, meta, *views]


def decode_records(data: bytes | memoryview, where: str = "log") -> tuple[list[Record], int, str]:
    """Parse consecutive records from ``data``.

    Returns ``(records, good_bytes, problem)``: the records before the first bad one,
    the length of that valid prefix, and what was wrong with the rest ("" when the whole
    buffer parsed). Never raises on damaged input.
    """
    buf = memoryview(data).cast("B")
    records: list[Record] = []
    pos = 0
    end = buf.nbytes
    while pos < end:
        if end - pos < _FRAME.size:
            return records, pos, f"{where}: torn record header at byte {pos}"
        magic, length, crc = _FRAME.unpack_from(buf, pos)
        if magic != RECORD_MAGIC:
            return records, pos, f"{where}: bad record magic {bytes(magic)!r} at byte {pos}"
        body_start = pos + _FRAME.size
        if length < _META_LEN.size or length > MAX_RECORD_BYTES or body_start + length > end:
            return records, pos, (f"{where}: record at byte {pos} of {length} bytes runs past "
                                  "the end")
        body = buf[body_start: body_start + length]
        if zlib.crc32(body) != crc:
            return records, pos, f"{where}: CRC mismatch in the record at byte {pos}"
        (mlen,) = _META_LEN.unpack_from(body, 0)
        try:
            meta = codec.unpackb(body[_META_LEN.size: _META_LEN.size + mlen])
            lsn, kind, sizes = meta["lsn"], meta["kind"], meta["sizes"]
            if not (isinstance(lsn, int) and isinstance(kind, str) and isinstance(sizes, list)
                    and all(isinstance(s, int) and s >= 0 for s in sizes)
                    and _META_LEN.size + mlen + sum(sizes) == length):
                raise ValueError("inconsistent meta")
        except Exception as exc:  # msgpack raises several unrelated classes
            return records, pos, f"{where}: unreadable record meta at byte {pos}: {exc}"
        frames = []
        off = _META_LEN.size + mlen
        for s in sizes:
            frames.append(body[off: off + s].toreadonly())
            off += s
        records.append(Record(lsn, kind, meta, frames))
        pos = body_start + length
    return records, pos, ""


def parse_fsync(value: str | float | int) -> float | None:
    """Turn an fsync policy into seconds between syncs: ``"every"`` → 0, ``"none"`` → None,
    ``"5"`` / ``"5ms"`` / ``5`` → 0.005."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("every", "always", "0"):
            return 0.0
        if v in ("none", "off", "never"):
            return None
        v = v[:-2] if v.endswith("ms") else v
        try:
            ms = float(v)
        except ValueError:
            raise InvalidArgumentError(
                f"WAL fsync policy {value!r} not understood: use 'every', 'none' or a "
                "number of milliseconds such as '5'") from None
    else:
        ms = float(value)
    if not ms >= 0 or ms > 60_000:
        raise InvalidArgumentError(f"WAL fsync interval {value!r} ms must be in [0, 60000]")
    return ms / 1e3


@dataclass
class _Segment:
    first_lsn: int
    path: str


@dataclass
class WalStats:
    """Counters of one log since it was opened."""

    records: int = 0
    bytes: int = 0
    syncs: int = 0
    sync_seconds: float = 0.0
    truncated_bytes: int = 0
    dropped_segments: int = 0


class _Syncer:
    """A thread that runs ``fdatasync`` while the shard goes on serving.

    The service loop watches :attr:`wake_fd`, which becomes readable when a sync ends.
    """

    def __init__(self) -> None:
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        self._cv = threading.Condition()
        self._job: tuple[int, int] | None = None
        self.busy = False
        self.done_lsn = 0
        self.error: OSError | None = None
        self.seconds = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="xdl-wal-sync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._job is None:
                    return
                fd, lsn = self._job
            t0 = time.perf_counter()
            err: OSError | None = None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                err = exc
            with self._cv:
                self._job = None
                self.busy = False
                self.seconds += time.perf_counter() - t0
                if err is not None:
                    self.error = err
                else:
                    self.done_lsn = max(self.done_lsn, lsn)
                self._cv.notify_all()
            try:
                os.write(self._wake_w, b"s")
            except OSError:  # the pipe is full: the loop wakes up anyway
                pass

    def submit(self, fd: int, lsn: int) -> None:
        """Start syncing ``fd``; records up to ``lsn`` are durable once it ends."""
        with self._cv:
            self._job = (fd, lsn)
            self.busy = True
            self._cv.notify_all()

    def wait_idle(self) -> None:
        """Block until no sync runs."""
        with self._cv:
            while self.busy:
                self._cv.wait()

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Stop the thread and close the pipe."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_w)


class WriteAheadLog:
    """Append-only log in segment files ``<directory>/<first lsn>.wal``.

    Opening reads the last segment only: it cuts a torn tail (a write the crash
    interrupted) and appends continue after it. :meth:`records` reads the log back one
    segment at a time, so recovering a long log never holds more than one segment.

    :param directory: folder of the segments (created if absent).
    :param fsync: ``"every"``, ``"none"`` or milliseconds between syncs (see the module).
    :param segment_bytes: a segment is closed after a record takes it past this size.
    :param background: run group commits in a thread (:meth:`start_sync`), so the shard
        serves the next requests while the disk syncs; the loop watches :attr:`wake_fd`.
    """

    def __init__(self, directory: str, *, fsync: str | float = "every",
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, background: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        self.interval = parse_fsync(fsync)
        self.segment_bytes = int(segment_bytes)
        self.stats = WalStats()
        os.makedirs(self.directory, exist_ok=True)
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._size = 0
        self._unsynced_since: float | None = None
        self.next_lsn = 1
        self._open_existing()
        #: records below this lsn were on disk when the log was opened
        self.opened_lsn = self.next_lsn
        #: highest lsn known to be durable (with ``"none"``: written to the OS)
        self.synced_lsn = self.next_lsn - 1
        self._syncer = _Syncer() if background and self.interval is not None else None

    # ------------------------------------------------------------------ opening
    def _open_existing(self) -> None:
        names = sorted(n for n in os.listdir(self.directory) if _SEGMENT.match(n))
        self._segments = [_Segment(int(n[:20]), os.path.join(self.directory, n)) for n in names]
        if not self._segments:
            return
        last = self._segments[-1]
        with open(last.path, "rb") as f:
            data = f.read()
        records, good, problem = decode_records(data, last.path)
        if problem:
            log.warning("write-ahead log: %s; truncating %d bytes of an unfinished write",
                        problem, len(data) - good)
            with open(last.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
            self.stats.truncated_bytes += len(data) - good
        self.next_lsn = records[-1].lsn + 1 if records else last.first_lsn
        if good == 0:  # an empty last segment: drop it, the next append starts afresh
            os.unlink(self._segments.pop().path)
        else:
            self._size = good
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)

    def first_record(self, index: int) -> Record | None:
        """The first record of segment ``index`` (None if it cannot be read)."""
        with open(self._segments[index].path, "rb") as f:
            head = f.read(_FRAME.size)
            if len(head) < _FRAME.size:
                return None
            _, length, _ = _FRAME.unpack(head)
            body = f.read(min(length, MAX_RECORD_BYTES))
        records, _, _ = decode_records(head + body)
        return records[0] if records else None

    def records(self, start: int = 0) -> Iterator[Record]:
        """The records on disk at opening, from segment ``start`` on, one segment in memory.

        Raises :class:`~xdl.errors.CheckpointError` when a segment before the last is
        damaged or a record is missing: the log cannot be trusted past that point.
        """
        segments = list(self._segments)
        expect: int | None = None
        for i in range(start, len(segments)):
            seg = segments[i]
            with open(seg.path, "rb") as f:
                data = f.read()
            recs, _, problem = decode_records(data, seg.path)
            if problem and i != len(segments) - 1:
                raise CheckpointError(
                    f"write-ahead log is corrupt: {problem}, and later segments exist; move "
                    "the log folder aside and restart from the last checkpoint")
            for r in recs:
                if r.lsn >= self.opened_lsn:
                    return
                if (expect is not None and r.lsn != expect) or (
                        expect is None and r.lsn != seg.first_lsn):
                    raise CheckpointError(
                        f"write-ahead log {seg.path}: record {r.lsn} where "
                        f"{expect or seg.first_lsn} was expected; a segment is missing or damaged")
                expect = r.lsn + 1
                yield r
            del data, recs

    def recovered(self) -> list[Record]:
        """Every record on disk at opening, in order (reads the whole log; for tests and tools)."""
        return list(self.records())

    # ------------------------------------------------------------------ writing
    def append(self, kind: str, frames: Sequence[Buffer] = (), **fields: Any) -> int:
        """Write one record (to the OS, not yet synced) and return its lsn.

        Raises :class:`~xdl.errors.DiskFullError` (disk full) or
        :class:`~xdl.errors.CheckpointError` if the write fails: the caller must not
        acknowledge the change.
        """
        lsn = self.next_lsn
        bufs = encode_record(lsn, kind, frames, **fields)
        total = sum(memoryview(b).nbytes for b in bufs)
        if self._fd is None:
            self._start_segment(lsn)
        assert self._fd is not None
        try:
            written = os.writev(self._fd, bufs)
            if written < total:  # a short write: finish it with the remaining bytes
                rest = b"".join(bytes(memoryview(b)) for b in bufs)[written:]
                while rest:
                    n = os.write(self._fd, rest)
                    rest = rest[n:]
        except OSError as exc:
            self._undo_partial(total)
            cls = DiskFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else CheckpointError
            raise cls(
                f"cannot append to the write-ahead log in {self.directory}: "
                f"{exc.strerror or exc}; the change was not acknowledged: free space there "
                "(or move the log) and restart the shard, which recovers from its log") from None
        self.next_lsn = lsn + 1
        self._size += total
        self.stats.records += 1
        self.stats.bytes += total
        if self.interval is None:
            self.synced_lsn = lsn
        elif self._unsynced_since is None:
            self._unsynced_since = time.monotonic()
        if self._size >= self.segment_bytes:
            self.rotate()
        return lsn

    def _undo_partial(self, total: int) -> None:
        # cut a half-written record so that the next append does not follow garbage
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass

    def _start_segment(self, first_lsn: int) -> None:
        path = os.path.join(self.directory, f"{first_lsn:020d}.wal")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(_Segment(first_lsn, path))
        self._size = 0
        self._sync_directory()

    def _sync_directory(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ------------------------------------------------------------------ durability
    @property
    def unsynced(self) -> bool:
        """Whether written records are not yet durable (always False for ``"none"``)."""
        return self.next_lsn - 1 > self.synced_lsn

    @property
    def sync_busy(self) -> bool:
        """Whether a background sync is running."""
        return self._syncer is not None and self._syncer.busy

    @property
    def wake_fd(self) -> int | None:
        """A file descriptor that becomes readable when a background sync ends."""
        return self._syncer.wake_fd if self._syncer is not None else None

    def sync_due_in(self) -> float | None:
        """Seconds until the next group commit is due (0: now), or None when nothing waits."""
        if self._unsynced_since is None or self.interval is None:
            return None
        return max(0.0, self._unsynced_since + self.interval - time.monotonic())

    def start_sync(self) -> None:
        """Begin a group commit of every record written so far.

        In the background when the log was opened with ``background=True`` (see
        :meth:`collect`), else right here. Does nothing while a background sync runs.
        """
        if not self.unsynced or self._fd is None or self.sync_busy:
            return
        if self._syncer is None:
            self.sync()
            return
        self._unsynced_since = None
        self.stats.syncs += 1
        self._syncer.submit(self._fd, self.next_lsn - 1)

    def collect(self) -> int:
        """Take note of finished background syncs; return the highest durable lsn.

        Raises :class:`~xdl.errors.CheckpointError` if a sync failed: nothing written
        since the last good one may be acknowledged.
        """
        if self._syncer is not None:
            self._syncer.drain_wakeups()
            if self._syncer.error is not None:
                raise CheckpointError(
                    f"cannot sync the write-ahead log in {self.directory}: "
                    f"{self._syncer.error}; the shard stops without acknowledging what it "
                    "wrote since the last sync")
            self.synced_lsn = max(self.synced_lsn, self._syncer.done_lsn)
            self.stats.sync_seconds = self._syncer.seconds
        return self.synced_lsn

    def sync(self) -> None:
        """Make every record written so far durable now (``fdatasync``), waiting if needed."""
        if self._syncer is not None:
            self._syncer.wait_idle()
            self.collect()
        if not self.unsynced:
            self._unsynced_since = None
            return
        t0 = time.perf_counter()
        if self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot sync the write-ahead log in {self.directory}: {exc}; what was "
                    "written since the last sync is not acknowledged") from None
        self.stats.syncs += 1
        self.stats.sync_seconds += time.perf_counter() - t0
        self._unsynced_since = None
        self.synced_lsn = self.next_lsn - 1

    def rotate(self) -> None:
        """Close the current segment (synced); the next record starts a new one."""
        if self._fd is None:
            return
        if self.interval is not None:
            self.sync()
        os.close(self._fd)
        self._fd = None

    def drop_before(self, lsn: int) -> int:
        """Delete every segment whose records all have an lsn below ``lsn``; return how many."""
        dropped = 0
        while len(self._segments) > 1 and self._segments[1].first_lsn <= lsn:
            os.unlink(self._segments.pop(0).path)
            dropped += 1
        if dropped:
            self._sync_directory()
            self.stats.dropped_segments += dropped
        return dropped

    def segments(self) -> list[str]:
        """Paths of the segment files, oldest first."""
        return [s.path for s in self._segments]

    def close(self) -> None:
        """Sync (unless the policy is ``"none"``), close the segment, stop the sync thread."""
        try:
            if self._fd is not None:
                if self.interval is not None and (self._syncer is None
                                                  or self._syncer.error is None):
                    self.sync()
                os.close(self._fd)
                self._fd = None
        finally:
            if self._syncer is not None:
                self._syncer.close()
                self._syncer = None


@dataclass
class ReplyGate:
    """Holds replies until the log records before them are durable, then sends them in order.

    Replies that follow an unsynced record wait, whatever their command, so a client
    never sees a state that a crash could still take back.
    """

    wal: WriteAheadLog | None
    held: list[tuple[int, Callable[[list[Any]], None], list[Any]]] = field(default_factory=list)

    def send(self, send: Callable[[list[Any]], None], frames: list[Any]) -> None:
        """Send ``frames`` now, or once what was logged before them is durable."""
        if self.wal is None:
            send(frames)
            return
        need = self.wal.next_lsn - 1
        if self.held or need > self.wal.synced_lsn:
            self.held.append((need, send, frames))
        else:
            send(frames)

    def timeout_ms(self, idle_ms: int) -> int:
        """How long the service loop may block in poll before :meth:`commit_if_due`."""
        if self.wal is None or self.wal.sync_busy:
            return idle_ms  # a running sync wakes the loop through wal.wake_fd
        due = self.wal.sync_due_in()
        return idle_ms if due is None else min(idle_ms, int(due * 1e3) + 1)

    def commit_if_due(self, force: bool = False) -> None:
        """Start (or, with ``force``, finish) a group commit when due; send what is durable."""
        if self.wal is None:
            return
        self.wal.collect()
        if force:
            self.wal.sync()
        elif self.wal.unsynced and self.wal.sync_due_in() == 0:
            self.wal.start_sync()
        durable = self.wal.synced_lsn
        n = 0
        for need, send, frames in self.held:
            if need > durable:
                break
            send(frames)
            n += 1
        if n:
            del self.held[:n]

    def drop(self) -> int:
        """Forget every held reply (the shard stops without acknowledging them)."""
        n = len(self.held)
        self.held.clear()
        return n


# ---------------------------------------------------------------------- shard glue
def committed_checkpoint(save_dir: str) -> str | None:
    """The published checkpoint folder that the save into ``save_dir`` became, if any.

    Shards save into ``<root>/ckpt-N.tmp``; the client publishes it as ``<root>/ckpt-N``
    with a manifest (see :mod:`xdl.server.checkpoint`).
    """
    final = save_dir[:-4] if save_dir.endswith(".tmp") else save_dir
    return final if os.path.exists(os.path.join(final, "manifest.json")) else None


@dataclass
class RecoveryReport:
    """What a restart found in the log."""

    base: str | None = None
    replayed: int = 0
    records: int = 0
    truncated_bytes: int = 0
    seconds: float = 0.0


class ShardJournal:
    """Ties a shard to its write-ahead log: what to record, how to recover, when to trim.

    The shard calls :meth:`record_request` for every state-changing request it ran,
    :meth:`record_save` after writing its checkpoint part and :meth:`record_base` after
    its state was replaced by a checkpoint. :meth:`recover` rebuilds the state at start.

    :param wal: the open log.
    """

    def __init__(self, wal: WriteAheadLog) -> None:
        self.wal = wal
        self.replaying = False
        self._pending_saves: list[tuple[int, str]] = []  # (lsn, save dir) not yet committed

    def record_request(self, frames: Sequence[Buffer], ok: bool | None = None) -> None:
        """Log a state-changing request's frames (not while replaying).

        :param ok: its outcome (applied or refused), checked again when it is replayed.
        """
        if not self.replaying:
            if ok is None:
                self.wal.append(REQ, frames)
            else:
                self.wal.append(REQ, frames, ok=ok)

    def record_save(self, save_dir: str, clients: dict[str, list[int]]) -> None:
        """Log that the state up to here is in the checkpoint being written to ``save_dir``.

        :param clients: this shard's exactly-once marks ``{cid: [incarnation, hwm]}``.
        """
        if self.replaying:
            return
        self.wal.rotate()
        lsn = self.wal.append(SAVE, dir=save_dir, clients=clients)
        self._pending_saves.append((lsn, save_dir))
        self.trim()

    def record_base(self, path: str) -> None:
        """Log that the state was replaced by checkpoint ``path``; older segments go."""
        if self.replaying:
            return
        self.wal.rotate()
        lsn = self.wal.append(BASE, path=path)
        self._pending_saves.clear()
        self.wal.sync()
        self.wal.drop_before(lsn)

    def trim(self) -> None:
        """Drop the segments covered by the newest committed checkpoint (cheap; call often)."""
        newest = None
        for lsn, d in self._pending_saves:
            if committed_checkpoint(d) is not None:
                newest = lsn
        if newest is not None:
            self._pending_saves = [(lsn, d) for lsn, d in self._pending_saves if lsn > newest]
            self.wal.drop_before(newest)

    def recover(self, load: Callable[[str, dict[str, list[int]] | None], None],
                replay: Callable[[list[memoryview]], bool | None]) -> RecoveryReport:
        """Rebuild the state: load the newest usable checkpoint the log names, replay after it.

        :param load: ``load(checkpoint_path, clients)`` replaces the shard's state by a
            checkpoint (``clients``: exactly-once marks to use instead of the checkpoint's).
        :param replay: ``replay(frames)`` runs one logged request through the shard and
            returns whether it was applied (None: not known).

        Raises :class:`~xdl.errors.CheckpointError` when a replayed request has another
        outcome than when it was logged: the shard would not hold what it acknowledged
        (it was restarted with other settings, e.g. ``--num-shards``).
        """
        t0 = time.perf_counter()
        report = RecoveryReport(truncated_bytes=self.wal.stats.truncated_bytes)
        start, base_lsn = 0, 0
        for i in range(len(self.wal.segments()) - 1, -1, -1):
            # a checkpoint record always starts a segment (see record_save / record_base)
            r = self.wal.first_record(i)
            if r is None or r.kind == REQ:
                continue
            if r.kind == BASE:
                report.base, start, base_lsn = str(r.meta["path"]), i, r.lsn
                load(report.base, None)
                break
            if r.kind == SAVE:
                final = committed_checkpoint(str(r.meta["dir"]))
                if final is not None:
                    report.base, start, base_lsn = final, i, r.lsn
                    load(final, dict(r.meta.get("clients") or {}))
                    break
                self._pending_saves.insert(0, (r.lsn, str(r.meta["dir"])))
        self.replaying = True
        try:
            for r in self.wal.records(start):
                report.records += 1
                if r.kind == REQ and r.lsn > base_lsn:
                    ok = replay(r.frames)
                    logged = r.meta.get("ok")
                    if ok is not None and isinstance(logged, bool) and ok != logged:
                        raise CheckpointError(
                            f"write-ahead log record {r.lsn} was "
                            f"{'applied' if logged else 'refused'} when logged but is "
                            f"{'applied' if ok else 'refused'} on replay: restart the shard "
                            "with the settings it had (--shard, --num-shards, "
                            "--max-request-bytes, --checkpoint-root)")
                    report.replayed += 1
        finally:
            self.replaying = False
        report.seconds = time.perf_counter() - t0
        return report


def iter_records(directory: str) -> Iterator[Record]:
    """Every intact record of the log in ``directory`` (read-only; for tools and tests)."""
    for n in sorted(n for n in os.listdir(directory) if _SEGMENT.match(n)):
        with open(os.path.join(directory, n), "rb") as f:
            records, _, _ = decode_records(f.read(), n)
        yield from records


# ---------------------------------------------------------------------- the service's side
class Durability:
    """A shard's write-ahead log, reply gate and boot id, as the service loop uses them.

    Every reply is stamped with the process's boot id (``boot``) and whether it keeps a
    log (``wal``), so a client notices a restarted shard. With a log, the dispatcher
    reports each request it ran (:meth:`observe`) and replies wait for durability.

    :param shard: the shard (a :class:`xdl.server.shard.Shard`).
    :param wal: its open log, or None to run without one.
    """

    def __init__(self, shard: Any, wal: WriteAheadLog | None = None) -> None:
        self.shard = shard
        self.wal = wal
        self.gate = ReplyGate(wal)
        self.journal = ShardJournal(wal) if wal is not None else None
        self.boot = os.urandom(8).hex()
        self.report = RecoveryReport()
        self.failed = False
        self._last_trim = time.monotonic()
        if self.journal is not None:
            shard.dispatcher.journal = self.observe

    @classmethod
    def open(cls, shard: Any, directory: str, fsync: str | float = "every",
             segment_bytes: int = DEFAULT_SEGMENT_BYTES, background: bool = True
             ) -> Durability:
        """Open the log in ``directory`` and rebuild ``shard``'s state from it.

        :param background: sync in a thread while the shard serves on (see
            :class:`WriteAheadLog`); the service loop must then watch :attr:`wake_fd`.
        """
        self = cls(shard, WriteAheadLog(directory, fsync=fsync, segment_bytes=segment_bytes,
                                        background=background))
        assert self.journal is not None and self.wal is not None
        try:
            self.report = self.journal.recover(self._load, self._replay)
        except BaseException:
            self.wal.close()
            raise
        if self.report.records:
            log.info("shard %d recovered from its write-ahead log in %.2f s: %s, %d requests "
                     "replayed (%d torn bytes cut)", shard.shard, self.report.seconds,
                     f"checkpoint {self.report.base}" if self.report.base else "no checkpoint",
                     self.report.replayed, self.report.truncated_bytes)
        return self

    @property
    def recovered(self) -> bool:
        """Whether the log held records when opened (its state wins over ``--load``)."""
        return self.report.records > 0

    def _load(self, path: str, clients: dict[str, list[Any]] | None) -> None:
        from . import checkpoint
        from .exactly_once import ClientRecord

        checkpoint.swap_in(self.shard, checkpoint.stage(self.shard, path))
        if clients is not None:  # this shard's own marks, not the merge of every part
            self.shard.clients = {cid: ClientRecord.from_json(v) for cid, v in clients.items()}

    def _replay(self, frames: list[memoryview]) -> bool | None:
        replies: list[list[Any]] = []
        self.shard.handle(frames, replies.append)
        if len(replies) != 1:
            return None
        return bool(codec.unpackb(_bytes_of(replies[0][2])).get("ok"))

    def loaded(self, path: str) -> None:
        """Record that the state was replaced by checkpoint ``path`` (``--load`` at start)."""
        if self.journal is not None:
            self.journal.record_base(path)

    def observe(self, frames: Sequence[Buffer], req: Any, ok: bool) -> None:
        """Dispatcher hook, called after a request ran and before its reply: log it.

        If the log cannot be written, the shard stops: its memory is now ahead of its
        log, and a restart from the log is the way back to a state it can vouch for.
        """
        from xdl import protocol as P

        assert self.journal is not None
        command = req.command
        try:
            if command == P.SAVE:
                if ok:
                    from .admin import checkpoint_dir

                    self.journal.record_save(
                        checkpoint_dir(self.shard, req.header),
                        {cid: r.to_json() for cid, r in self.shard.clients.items()})
            elif command == P.LOAD:
                if ok and req.header.get("phase") in (None, "commit"):
                    from .admin import checkpoint_dir

                    self.journal.record_base(checkpoint_dir(self.shard, req.header))
            elif command in P.MUTATING:
                self.journal.record_request(frames, ok)
        except Exception:
            log.critical("shard %d cannot write its write-ahead log; it stops so that a "
                         "restart recovers a state it acknowledged", self.shard.shard)
            self.shard.stopping = True
            raise

    def refusal(self, frames: Sequence[Buffer]) -> list[Any] | None:
        """A ``RESTARTED`` reply if the request names another process's boot id, else None.

        A client stamps its requests with the boot id it last saw. A request stamped
        with an older one was sent before the client knew this process exists: requests
        sent just before it may have died with the old process, so running it could let
        it overtake them (their seqs would then look like duplicates). It is refused
        unrun; the client resends everything unanswered, in order, with the new id.
        """
        if len(frames) < 3:
            return None
        try:
            header = codec.unpackb(_bytes_of(frames[2]))
        except Exception:  # malformed: the dispatcher says what is wrong
            return None
        boot = header.get("boot") if isinstance(header, dict) else None
        if not isinstance(boot, str) or boot == self.boot:
            return None
        seq = header.get("seq")
        command = bytes(_bytes_of(frames[1])[:32])
        from xdl import protocol as P
        from xdl.errors import ShardRestartedError

        exc = ShardRestartedError(
            f"sent to shard process {boot[:16]!r}, which has restarted (now "
            f"{self.boot!r}); resend unanswered requests in order")
        return codec.encode(command if command in P.COMMANDS else b"ERROR", {
            "ok": False, "seq": seq if isinstance(seq, int) else -1, "code": exc.code,
            "message": str(exc), "table": None})

    def send(self, send: Callable[[list[Any]], None], frames: list[Any]) -> None:
        """Stamp the boot id on a reply and send it once what it follows is durable."""
        if len(frames) >= 3:
            header = codec.unpackb(_bytes_of(frames[2]))
            header["boot"] = self.boot
            header["wal"] = self.wal is not None
            frames = [frames[0], frames[1], codec.packb(header), *frames[3:]]
        self.gate.send(send, frames)

    def timeout_ms(self, idle_ms: int) -> int:
        """How long the loop may block in poll."""
        return self.gate.timeout_ms(idle_ms)

    @property
    def wake_fd(self) -> int | None:
        """A descriptor the loop polls too: readable when a background sync ends."""
        return self.wal.wake_fd if self.wal is not None else None

    def tick(self) -> None:
        """Group commit when due and send what became durable; now and then drop
        segments a checkpoint covers. A failed sync stops the shard unacknowledged."""
        if self.failed:
            return
        try:
            self.gate.commit_if_due()
        except CheckpointError as exc:
            self._fail(exc)
            return
        now = time.monotonic()
        if self.journal is not None and now - self._last_trim > 1.0:
            self._last_trim = now
            self.journal.trim()

    def _fail(self, exc: Exception) -> None:
        self.failed = True
        dropped = self.gate.drop()
        log.critical("shard %d: %s (%d replies withheld)", self.shard.shard, exc, dropped)
        self.shard.stopping = True

    def close(self) -> None:
        """Sync and send every held reply (unless syncing failed), then close the log."""
        try:
            if not self.failed:
                self.gate.commit_if_due(force=True)
        except CheckpointError as exc:
            self._fail(exc)
        finally:
            if self.wal is not None:
                self.wal.close()
