"""A shard's write-ahead log: the record format, segments and syncing.

How a shard uses it (what it logs, when replies go out, recovery) is in
:mod:`xdl.server.durability`.

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
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

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


def bytes_of(frame: Buffer) -> memoryview:
    """A byte view of one frame (``zmq.Frame``, bytes or memoryview), without a copy."""
    if type(frame) is bytes or type(frame) is zmq.Frame:
        # both export flat unsigned bytes (a Frame's .buffer builds a memoryview per call)
        flat: Any = frame
        return memoryview(flat)
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
    views = [bytes_of(f) for f in frames]
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


def _lock(directory: str) -> int:
    """Take the log folder's lock (released when the process ends, however it ends)."""
    path = os.path.join(directory, "LOCK")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise CheckpointError(
            f"the write-ahead log in {directory} is in use by another process (pid "
            f"{holder}): give each shard its own --wal-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


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
        self._lock_fd: int | None = _lock(self.directory)
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._size = 0
        self._unsynced_since: float | None = None
        self.next_lsn = 1
        try:
            self._open_existing()
        except BaseException:
            os.close(self._lock_fd)
            raise
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
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None


def iter_records(directory: str) -> Iterator[Record]:
    """Every intact record of the log in ``directory`` (read-only; for tools and tests)."""
    for n in sorted(n for n in os.listdir(directory) if _SEGMENT.match(n)):
        with open(os.path.join(directory, n), "rb") as f:
            records, _, _ = decode_records(f.read(), n)
        yield from records
