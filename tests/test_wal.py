"""The write-ahead log on its own: record format, torn tails, segments, group commit, recovery."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
import pytest

from xdl import codec
from xdl import protocol as P
from xdl.errors import CheckpointError, DiskFullError, InvalidArgumentError
from xdl.server import durability as D
from xdl.server import wal as W


def push_frames(i: int, n: int = 3) -> list[bytes]:
    ids = np.arange(i, i + n, dtype=np.int64)
    grads = np.full((n, 4), float(i), dtype=np.float32)
    return [bytes(memoryview(f)) for f in codec.encode(
        P.PUSH, {"cid": "c", "inc": 1, "seq": i, "table": "t"}, {"ids": ids, "grads": grads})]


def only_segment(d: str) -> str:
    (seg,) = [n for n in os.listdir(d) if n.endswith(".wal")]
    return os.path.join(d, seg)


def test_records_round_trip_with_their_frames(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path))
    sent = [push_frames(i) for i in range(1, 6)]
    for frames in sent:
        log.append(W.REQ, frames)
    log.append(W.SAVE, dir="/x/ckpt-000001.tmp", clients={"c": [1, 5]})
    log.close()
    again = W.WriteAheadLog(str(tmp_path))
    recs = again.recovered()
    assert [r.lsn for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r.kind for r in recs] == ["req"] * 5 + ["save"]
    for r, frames in zip(recs[:5], sent, strict=True):
        assert [bytes(f) for f in r.frames] == frames
        command, header, arrays = codec.decode(r.frames)
        assert command == P.PUSH and header["seq"] == r.lsn
        np.testing.assert_array_equal(arrays["grads"], np.full((3, 4), float(r.lsn), np.float32))
    assert recs[-1].meta["clients"] == {"c": [1, 5]}
    assert again.append(W.REQ, push_frames(7)) == 7
    again.close()


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 13, 40, -1])
def test_a_torn_last_record_is_cut_and_the_log_goes_on(tmp_path: Any, cut: int) -> None:
    log = W.WriteAheadLog(str(tmp_path))
    for i in range(1, 5):
        log.append(W.REQ, push_frames(i))
    good = os.path.getsize(only_segment(str(tmp_path)))
    log.append(W.REQ, push_frames(5))
    log.close()
    path = only_segment(str(tmp_path))
    full = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(good + cut if cut > 0 else full + cut)
    again = W.WriteAheadLog(str(tmp_path))
    assert [r.lsn for r in again.recovered()] == [1, 2, 3, 4]
    assert os.path.getsize(path) == good
    assert again.stats.truncated_bytes > 0
    assert again.append(W.REQ, push_frames(5)) == 5
    again.close()
    assert [r.lsn for r in W.iter_records(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_a_flipped_byte_is_caught_by_the_crc(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path))
    for i in range(1, 4):
        log.append(W.REQ, push_frames(i))
    log.close()
    path = only_segment(str(tmp_path))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 7)  # inside the last record's gradient bytes
        b = f.read(1)
        f.seek(size - 7)
        f.write(bytes([b[0] ^ 0x40]))
    again = W.WriteAheadLog(str(tmp_path))
    assert [r.lsn for r in again.recovered()] == [1, 2]
    again.close()


def test_corruption_before_the_last_segment_refuses_to_open(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path), segment_bytes=1)  # one record per segment
    for i in range(1, 4):
        log.append(W.REQ, push_frames(i))
    log.close()
    first = log.segments()[0]
    with open(first, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    again = W.WriteAheadLog(str(tmp_path))  # opening reads the last segment only
    with pytest.raises(CheckpointError, match="corrupt"):
        again.recovered()
    shard = FakeShard()
    with pytest.raises(CheckpointError, match="corrupt"):  # recovery refuses to go on
        D.ShardJournal(again).recover(shard.load, shard.replay)
    again.close()
    other = W.WriteAheadLog(str(tmp_path / "gap"), segment_bytes=1)
    for i in range(1, 4):
        other.append(W.REQ, push_frames(i))
    other.close()
    os.unlink(other.segments()[1])  # a missing segment in the middle is as bad
    with pytest.raises(CheckpointError, match="missing"):
        W.WriteAheadLog(str(tmp_path / "gap")).recovered()


def test_garbage_never_raises_from_the_decoder() -> None:
    rng = random.Random(7)
    good = b"".join(bytes(memoryview(b)) for b in W.encode_record(1, W.REQ, push_frames(1)))
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randrange(len(data) + 1)])
        records, n, problem = W.decode_records(cut)
        assert n == len(cut) if not problem else n < len(cut)
        for r in records:  # whatever survived the CRC is the original
            assert r.lsn == 1
    records, n, problem = W.decode_records(good)
    assert len(records) == 1 and n == len(good) and problem == ""


def test_segments_roll_and_are_dropped_only_when_covered(tmp_path: Any) -> None:
    one = sum(memoryview(b).nbytes for b in W.encode_record(1, W.REQ, push_frames(1)))
    log = W.WriteAheadLog(str(tmp_path), segment_bytes=2 * one)
    for i in range(1, 8):
        log.append(W.REQ, push_frames(i))
    firsts = [int(os.path.basename(p)[:20]) for p in log.segments()]
    assert firsts == [1, 3, 5, 7]
    assert log.drop_before(4) == 1  # segment 1-2 is covered; 3-4 still holds lsn 4
    assert log.drop_before(5) == 1
    assert log.drop_before(100) == 1  # the last segment always stays
    assert len(log.segments()) == 1
    log.close()
    again = W.WriteAheadLog(str(tmp_path))
    assert [r.lsn for r in again.recovered()] == [7]
    assert again.append(W.REQ, push_frames(8)) == 8
    again.close()


def test_fsync_policies_parse() -> None:
    assert W.parse_fsync("every") == 0.0
    assert W.parse_fsync("none") is None
    assert W.parse_fsync("5") == pytest.approx(0.005)
    assert W.parse_fsync("20ms") == pytest.approx(0.02)
    assert W.parse_fsync(2) == pytest.approx(0.002)
    for bad in ("sometimes", "-1", "1e9"):
        with pytest.raises(InvalidArgumentError, match="fsync"):
            W.parse_fsync(bad)


def test_group_commit_holds_replies_until_synced(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path), fsync="every")
    gate = D.ReplyGate(log)
    sent: list[Any] = []
    gate.send(sent.append, ["before"])  # nothing unsynced: goes at once
    assert sent == [["before"]]
    for i in range(1, 11):
        log.append(W.REQ, push_frames(i))
        gate.send(sent.append, [f"ack {i}"])
    gate.send(sent.append, ["pull"])  # a reply behind unsynced records waits too
    assert len(sent) == 1 and log.unsynced
    gate.commit_if_due()
    assert sent[1:] == [[f"ack {i}"] for i in range(1, 11)] + [["pull"]]
    assert log.stats.syncs == 1 and not log.unsynced  # ten records, one fdatasync
    log.close()


def test_an_interval_waits_for_its_deadline(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path), fsync="60000")
    gate = D.ReplyGate(log)
    sent: list[Any] = []
    log.append(W.REQ, push_frames(1))
    gate.send(sent.append, ["ack"])
    gate.commit_if_due()
    assert sent == [] and 0 < gate.timeout_ms(200) <= 200
    gate.commit_if_due(force=True)
    assert sent == [["ack"]] and log.stats.syncs == 1
    log.close()


def test_background_group_commit_sends_each_reply_once_its_record_is_durable(
        tmp_path: Any) -> None:
    import select

    log = W.WriteAheadLog(str(tmp_path), fsync="every", background=True)
    gate = D.ReplyGate(log)
    sent: list[tuple[str, int]] = []

    def send(frames: list[Any]) -> None:
        sent.append((frames[0], log.synced_lsn))

    for i in range(1, 41):  # records keep coming while earlier ones sync
        log.append(W.REQ, push_frames(i))
        gate.send(send, [f"ack {i}"])
        gate.commit_if_due()
    deadline = time.monotonic() + 30
    while len(sent) < 40 and time.monotonic() < deadline:
        assert log.wake_fd is not None
        select.select([log.wake_fd], [], [], 0.5)
        gate.commit_if_due()
    assert [f for f, _ in sent] == [f"ack {i}" for i in range(1, 41)]  # all, in order
    assert all(durable >= i for i, (_, durable) in enumerate(sent, 1))  # none too early
    assert 1 <= log.stats.syncs <= 40
    log.close()
    assert [r.lsn for r in W.iter_records(str(tmp_path))] == list(range(1, 41))


def test_no_fsync_acknowledges_at_once(tmp_path: Any) -> None:
    log = W.WriteAheadLog(str(tmp_path), fsync="none")
    gate = D.ReplyGate(log)
    sent: list[Any] = []
    log.append(W.REQ, push_frames(1))
    gate.send(sent.append, ["ack"])
    assert sent == [["ack"]] and not log.unsynced and log.stats.syncs == 0
    log.close()
    assert [r.lsn for r in W.iter_records(str(tmp_path))] == [1]  # written to the OS


class FakeShard:
    """Records what recovery asks of a shard."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, Any]] = []
        self.replayed: list[int] = []

    def load(self, path: str, clients: Any) -> None:
        self.loaded.append((path, clients))
        self.replayed.clear()

    def replay(self, frames: list[memoryview]) -> None:
        self.replayed.append(codec.decode(frames)[1]["seq"])


def publish(save_dir: str) -> str:
    final = save_dir[:-4]
    os.makedirs(final)
    with open(os.path.join(final, "manifest.json"), "w") as f:
        f.write("{}")
    return final


def test_recovery_starts_at_the_newest_committed_checkpoint(tmp_path: Any) -> None:
    wdir, root = str(tmp_path / "wal"), tmp_path / "ckpt"
    root.mkdir()
    j = D.ShardJournal(W.WriteAheadLog(wdir, segment_bytes=1 << 20))
    j.record_base(str(root / "start"))
    j.record_request(push_frames(1))
    j.record_save(str(root / "ckpt-000001.tmp"), {"c": [1, 1]})
    j.record_request(push_frames(2))
    j.record_save(str(root / "ckpt-000002.tmp"), {"c": [1, 2]})  # never published
    j.record_request(push_frames(3))
    assert len(j.wal.segments()) == 3  # base, save 1, save 2 each start a segment
    final = publish(str(root / "ckpt-000001.tmp"))
    j.trim()
    assert len(j.wal.segments()) == 2  # the base's segment is covered by checkpoint 1
    j.wal.close()

    shard = FakeShard()
    j2 = D.ShardJournal(W.WriteAheadLog(wdir))
    report = j2.recover(shard.load, shard.replay)
    assert shard.loaded == [(final, {"c": [1, 1]})]  # this shard's own marks
    assert shard.replayed == [2, 3]
    assert report.base == final and report.replayed == 2
    publish(str(root / "ckpt-000002.tmp"))
    j2.trim()  # the pending save found in the log is trimmed once published
    assert len(j2.wal.segments()) == 1
    j2.record_request(push_frames(4))
    j2.wal.close()
    shard = FakeShard()
    D.ShardJournal(W.WriteAheadLog(wdir)).recover(shard.load, shard.replay)
    assert shard.loaded[0][1] == {"c": [1, 2]} and shard.replayed == [3, 4]


def test_recovery_without_checkpoint_replays_everything(tmp_path: Any) -> None:
    j = D.ShardJournal(W.WriteAheadLog(str(tmp_path)))
    for i in range(1, 4):
        j.record_request(push_frames(i))
    j.wal.close()
    shard = FakeShard()
    j2 = D.ShardJournal(W.WriteAheadLog(str(tmp_path)))
    report = j2.recover(shard.load, shard.replay)
    assert shard.loaded == [] and shard.replayed == [1, 2, 3] and report.base is None
    j2.record_request(push_frames(9))  # replay is not logged again; new requests are
    j2.wal.close()
    assert [r.lsn for r in W.iter_records(str(tmp_path))] == [1, 2, 3, 4]


def test_a_failed_write_is_not_left_half_in_the_log(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = W.WriteAheadLog(str(tmp_path))
    log.append(W.REQ, push_frames(1))

    def full(fd: int, bufs: Any) -> int:
        os.write(fd, b"XWL1\x00\x00")  # a few bytes land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(DiskFullError, match="No space left"):
        log.append(W.REQ, push_frames(2))
    monkeypatch.undo()
    assert log.append(W.REQ, push_frames(2)) == 2
    log.close()
    assert [r.lsn for r in W.iter_records(str(tmp_path))] == [1, 2]


# ---------------------------------------------------------------------- with a real shard
class LoggedShard:
    """An in-process shard with a write-ahead log, fed the way the service loop feeds it."""

    def __init__(self, wal_dir: str, root: str, num_shards: int = 1) -> None:
        from xdl.server.shard import Shard

        self.shard = Shard(0, num_shards, checkpoint_root=root)
        self.durable = D.Durability.open(self.shard, wal_dir, "every", background=False)

    def __call__(self, seq: int, command: bytes, header: dict[str, Any],
                 arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        out: list[Any] = []
        h = {"cid": "w", "inc": 1, "seq": seq, **header}
        frames = [bytes(memoryview(f)) for f in codec.encode(command, h, arrays)]
        self.shard.handle(frames, lambda r: self.durable.send(out.append, r))
        self.held = not out
        self.durable.tick()
        (reply,) = out
        return codec.decode([bytes(memoryview(f)) for f in reply])[1]

    def die(self) -> None:
        """Let go of the log as a killed process would: no sync, no flush, lock released."""
        wal = self.durable.wal
        assert wal is not None
        for fd in (wal._fd, wal._lock_fd):
            if fd is not None:
                os.close(fd)
        wal._fd = wal._lock_fd = None


def state_of(shard: Any) -> dict[str, np.ndarray]:
    t = shard.tables["t"].export()
    order = np.argsort(t["keys"])
    out = {k: np.asarray(v)[order] for k, v in t.items()}
    out["dense"] = shard.dense["d"].pull()
    return out


def test_a_shard_rebuilds_its_state_and_marks_from_checkpoint_and_log(tmp_path: Any) -> None:
    from xdl import ckpt_layout

    root, wal_dir = str(tmp_path / "ckpt"), str(tmp_path / "wal")
    os.makedirs(root)
    s = LoggedShard(wal_dir, root)
    ids = np.array([3, 5, 8], np.int64)
    g = np.ones((3, 2), np.float32)
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2, "optimizer": {"kind": "adagrad",
                                                                       "lr": 0.1}})["ok"]
    assert s(2, P.CREATE_DENSE, {"name": "d", "shape": [2, 2]})["ok"]
    for seq in range(3, 8):
        assert s(seq, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g * seq})["ok"]
        assert s.held  # the ack waited for the group commit
    tmp = ckpt_layout.begin(root)
    reply = s(8, P.SAVE, {"dir": tmp})
    ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [reply])
    refused = s(9, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g * np.nan})
    assert not refused["ok"]
    assert s(10, P.DELETE, {"table": "t"}, {"ids": ids[:1]})["ok"]
    assert s(11, P.DENSE_PUSH, {"name": "d", "step": 0}, {"grad": np.ones((2, 2), np.float32)})
    assert s(12, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})["ok"]
    s.durable.journal.trim()  # type: ignore[union-attr]
    assert int(os.path.basename(s.durable.wal.segments()[0])[:20]) > 1  # pre-save log gone
    before = state_of(s.shard)
    s.die()  # nothing flushed beyond what each reply waited for
    again = LoggedShard(wal_dir, root)
    assert again.durable.report.base == tmp[:-4] and again.durable.report.replayed == 4
    after = state_of(again.shard)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    h = again(12, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})  # resend of the last
    assert h["ok"] and h["dup"] and not again.held  # a resend writes nothing
    h = again(9, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})  # a refused one stays so
    assert not h["ok"] and h["dup"] and h["code"] == refused["code"]
    h = again(6, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})  # covered by the checkpoint
    assert h["ok"] and h["dup"]
    for k, v in state_of(again.shard).items():
        np.testing.assert_array_equal(before[k], v, err_msg=k)
    again.durable.close()


def test_a_shard_whose_log_cannot_be_written_refuses_and_stops(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    wal_dir, root = str(tmp_path / "wal"), str(tmp_path / "ckpt")
    s = LoggedShard(wal_dir, root)
    ids = np.array([1, 2], np.int64)
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2})["ok"]

    def full(fd: int, bufs: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    h = s(2, P.PUSH, {"table": "t"}, {"ids": ids, "grads": np.ones((2, 2), np.float32)})
    monkeypatch.undo()
    assert not h["ok"] and h["code"] == "DISK_FULL" and "not acknowledged" in h["message"]
    assert s.shard.stopping  # its memory is ahead of its log: it stops
    s.die()
    again = LoggedShard(wal_dir, root)  # and the restart holds only what was logged
    assert len(again.shard.tables["t"]) == 0
    again.durable.close()


def test_a_load_becomes_the_base_of_recovery(tmp_path: Any) -> None:
    from xdl import ckpt_layout

    root, wal_dir = str(tmp_path / "ckpt"), str(tmp_path / "wal")
    os.makedirs(root)
    s = LoggedShard(wal_dir, root)
    ids = np.array([4, 9], np.int64)
    g = np.ones((2, 2), np.float32)
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2})["ok"]
    assert s(2, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})["ok"]
    tmp = ckpt_layout.begin(root)
    ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [s(3, P.SAVE, {"dir": tmp})])
    assert s(4, P.PUSH, {"table": "t"}, {"ids": ids, "grads": g})["ok"]
    saved_rows = s.shard.tables["t"].pull(ids).copy()
    assert s(5, P.LOAD, {"dir": tmp[:-4]})["ok"]  # back to the checkpoint: one push undone
    assert s(6, P.PUSH, {"table": "t"}, {"ids": ids[:1], "grads": g[:1]})["ok"]
    assert len(s.durable.wal.segments()) == 1  # everything before the load is gone
    want = s.shard.tables["t"].pull(ids).copy()
    assert not np.array_equal(want, saved_rows)
    s.die()
    again = LoggedShard(wal_dir, root)
    assert again.durable.report.base == tmp[:-4] and again.durable.report.replayed == 1
    np.testing.assert_array_equal(again.shard.tables["t"].pull(ids), want)
    again.durable.close()


def test_a_replay_that_would_differ_refuses_to_start(tmp_path: Any) -> None:
    wal_dir, root = str(tmp_path / "wal"), str(tmp_path / "ckpt")
    s = LoggedShard(wal_dir, root)
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2})["ok"]
    ids = np.arange(64, dtype=np.int64)  # some belong to shard 1 of 2
    assert s(2, P.PUSH, {"table": "t"}, {"ids": ids, "grads": np.ones((64, 2), np.float32)})["ok"]
    s.durable.close()
    with pytest.raises(CheckpointError, match="applied when logged but is refused on replay"):
        LoggedShard(wal_dir, root, num_shards=2)  # restarted as one shard of two


def test_a_request_meant_for_the_previous_process_is_refused_unrun(tmp_path: Any) -> None:
    s = LoggedShard(str(tmp_path / "wal"), str(tmp_path / "ckpt"))
    d = s.durable

    def frames(boot: str | None) -> list[bytes]:
        h: dict[str, Any] = {"cid": "w", "inc": 1, "seq": 5, "table": "t"}
        if boot is not None:
            h["boot"] = boot
        return [bytes(memoryview(f)) for f in codec.encode(
            P.PUSH, h, {"ids": np.arange(2, dtype=np.int64),
                        "grads": np.ones((2, 2), np.float32)})]

    assert d.refusal(frames(None)) is None  # a client that has not seen a boot id yet
    assert d.refusal(frames(d.boot)) is None
    reply = d.refusal(frames("0123456789abcdef"))
    assert reply is not None
    _, h, _ = codec.decode([bytes(memoryview(f)) for f in reply])
    assert h["ok"] is False and h["code"] == "RESTARTED" and h["seq"] == 5
    assert d.refusal([P.MAGIC, P.PUSH, b"\xc1"]) is None  # malformed: the dispatcher's job
    d.close()


@pytest.mark.parametrize("extra", [0, 11, 12, 20])  # fixmap (to 13 entries), map16
def test_every_reply_carries_the_boot_id_and_its_fields(tmp_path: Any, extra: int) -> None:
    from xdl.server.shard import Shard

    d = D.Durability(Shard())
    fields = {"ok": True, "seq": 9, **{f"k{i}": i for i in range(extra)}}
    reply = codec.encode(P.PULL, fields, {"rows": np.ones((2, 3), np.float32)})
    out: list[Any] = []
    d.send(out.append, reply)
    _, h, arrays = codec.decode([bytes(memoryview(f)) for f in out[0]])
    assert h["boot"] == d.boot and h["wal"] is False
    assert {k: h[k] for k in fields} == fields
    np.testing.assert_array_equal(arrays["rows"], np.ones((2, 3), np.float32))
    assert d.refusal([bytes(memoryview(f)) for f in codec.encode(
        P.PING, {"cid": "c", "inc": 1, "seq": 1, "boot": d.boot})]) is None


def test_two_processes_cannot_share_a_log(tmp_path: Any) -> None:
    first = W.WriteAheadLog(str(tmp_path))
    with pytest.raises(CheckpointError, match=f"in use by another process .pid {os.getpid()}"):
        W.WriteAheadLog(str(tmp_path))
    first.close()
    W.WriteAheadLog(str(tmp_path)).close()  # free again once closed


def test_a_log_whose_checkpoint_is_gone_refuses_to_start(tmp_path: Any) -> None:
    import shutil

    from xdl import ckpt_layout

    root, wal_dir = str(tmp_path / "ckpt"), str(tmp_path / "wal")
    os.makedirs(root)
    s = LoggedShard(wal_dir, root)
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2})["ok"]
    tmp = ckpt_layout.begin(root)
    ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [s(2, P.SAVE, {"dir": tmp})])
    s.durable.journal.trim()  # type: ignore[union-attr]
    assert s(3, P.DROP_TABLE, {"table": "t"})["ok"]
    s.die()
    shutil.rmtree(tmp[:-4])  # someone deletes the checkpoint the log starts after
    with pytest.raises(CheckpointError, match="after a checkpoint that is gone"):
        LoggedShard(wal_dir, root)


def test_stats_report_the_log(tmp_path: Any) -> None:
    s = LoggedShard(str(tmp_path / "wal"), str(tmp_path / "ckpt"))
    assert s(1, P.CREATE_TABLE, {"table": "t", "dim": 2})["ok"]
    assert s(2, P.PUSH, {"table": "t"}, {"ids": np.arange(3, dtype=np.int64),
                                         "grads": np.ones((3, 2), np.float32)})["ok"]
    h = s(3, P.STATS, {})
    d = h["durability"]
    assert h["ok"] and "t" in h["tables"]  # the shard's own figures are all there
    assert d["wal"] is True and d["boot"] == s.durable.boot and d["fsync"] == "every"
    assert d["records"] == 2 and d["next_lsn"] == 3 and d["synced_lsn"] == 2
    assert d["syncs"] >= 1 and d["segments"] == 1 and d["recovered"]["replayed"] == 0
    s.durable.close()


def test_a_failed_background_sync_withholds_the_replies_and_stops_the_shard(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import select

    from xdl.server.shard import Shard

    shard = Shard()
    d = D.Durability.open(shard, str(tmp_path), "every", background=True)
    sent: list[Any] = []

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    frames = [bytes(memoryview(f)) for f in codec.encode(
        P.CREATE_TABLE, {"cid": "c", "inc": 1, "seq": 1, "table": "t", "dim": 2})]
    shard.handle(frames, lambda r: d.send(sent.append, r))
    d.tick()  # starts the sync in the background; it fails
    deadline = time.monotonic() + 10
    while not d.failed and time.monotonic() < deadline:
        assert d.wake_fd is not None
        select.select([d.wake_fd], [], [], 0.5)
        d.tick()
    assert d.failed and shard.stopping and sent == []  # never acknowledged
    d.close()
    assert sent == []
