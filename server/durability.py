"""A shard's durability: what it logs, when its replies go out, how it recovers.

Every request that changes a shard's state (create or drop a table, push, delete,
``SET_ROWS``, ``PUSH_MANY``, dense create and push) is appended to its write-ahead log
(:mod:`xdl.server.wal`) after the shard applied it and before its reply leaves; the
reply is held until the record is durable (:class:`ReplyGate`). A restarted shard
rebuilds its state from the newest checkpoint the log names plus a replay of every
request logged after it, through the same exactly-once filter and handlers
(:class:`ShardJournal`). Every reply carries the process's boot id, and a request
stamped with another one is refused unrun (:class:`Durability`), so that a client
resends what a dead process left unanswered, in order.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdl import codec
from xdl.errors import CheckpointError

from .wal import (
    BASE,
    DEFAULT_SEGMENT_BYTES,
    REQ,
    SAVE,
    Buffer,
    WriteAheadLog,
    bytes_of,
)

log = logging.getLogger("xdl.server")


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
        if report.base is None and self.wal.segments():
            first = self.wal.first_record(0)
            if first is not None and first.lsn != 1:
                # older records were dropped because a checkpoint covered them: the log
                # alone would rebuild a state with a hole in it
                raise CheckpointError(
                    f"the write-ahead log in {self.wal.directory} starts at record "
                    f"{first.lsn}, after a checkpoint that is gone "
                    f"({first.meta.get('dir') or first.meta.get('path') or '?'}): restore "
                    "that checkpoint, or move the log aside and start from another one")
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
        # msgpack of the request field naming this process, and of the two reply fields
        self._own_boot = codec.packb("boot") + codec.packb(self.boot)
        self._stamp = self._own_boot + codec.packb("wal") + codec.packb(wal is not None)
        self.report = RecoveryReport()
        self.failed = False
        self._last_trim = time.monotonic()
        if self.journal is not None:
            shard.dispatcher.journal = self.observe
        self._wrap_stats()

    def _wrap_stats(self) -> None:
        # STATS also reports the log (handlers are plain functions: wrap, do not edit)
        from xdl import protocol as P

        handlers = getattr(getattr(self.shard, "dispatcher", None), "handlers", None)
        if not isinstance(handlers, dict) or handlers.get(P.STATS) is None:
            return
        inner = handlers[P.STATS]

        def stats(state: Any, req: Any) -> Any:
            header, arrays = inner(state, req)
            return {**header, "durability": self.describe()}, arrays

        handlers[P.STATS] = stats

    def describe(self) -> dict[str, Any]:
        """The boot id and the log's figures (as ``STATS`` reports them under ``durability``)."""
        out: dict[str, Any] = {"boot": self.boot, "wal": self.wal is not None}
        if self.wal is not None:
            st = self.wal.stats
            interval = self.wal.interval
            out.update({
                "dir": self.wal.directory,
                "fsync": "none" if interval is None else "every" if interval == 0
                else f"{interval * 1e3:g} ms",
                "segments": len(self.wal.segments()), "next_lsn": self.wal.next_lsn,
                "synced_lsn": self.wal.synced_lsn, "records": st.records, "bytes": st.bytes,
                "syncs": st.syncs, "sync_seconds": round(st.sync_seconds, 6),
                "dropped_segments": st.dropped_segments, "held_replies": len(self.gate.held),
                "recovered": {"base": self.report.base, "replayed": self.report.replayed,
                              "truncated_bytes": self.report.truncated_bytes,
                              "seconds": round(self.report.seconds, 6)}})
        return out

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
        return bool(codec.unpackb(bytes_of(replies[0][2])).get("ok"))

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
        raw = bytes(bytes_of(frames[2]))
        if self._own_boot in raw:  # names this process (the common case): no decoding
            return None
        try:
            header = codec.unpackb(raw)
        except Exception:  # malformed: the dispatcher says what is wrong
            return None
        boot = header.get("boot") if isinstance(header, dict) else None
        if not isinstance(boot, str) or boot == self.boot:
            return None
        seq = header.get("seq")
        command = bytes(bytes_of(frames[1])[:32])
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
            frames = [frames[0], frames[1], self._stamped(bytes(bytes_of(frames[2]))),
                      *frames[3:]]
        self.gate.send(send, frames)

    def _stamped(self, header: bytes) -> bytes:
        # A reply header is a msgpack map the shard built: add the two fields by raising
        # its entry count and appending them (fixmap or map16), else decode and re-encode.
        first = header[0] if header else 0
        if 0x80 <= first <= 0x8D:  # fixmap of at most 13 entries: 2 more still fit
            return bytes([first + 2]) + header[1:] + self._stamp
        if first == 0xDE and len(header) >= 3:
            n = int.from_bytes(header[1:3], "big")
            if n <= 0xFFFD:
                return b"\xde" + (n + 2).to_bytes(2, "big") + header[3:] + self._stamp
        fields = codec.unpackb(header)
        fields["boot"] = self.boot
        fields["wal"] = self.wal is not None
        return codec.packb(fields)

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
