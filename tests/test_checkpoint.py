"""Checkpoints: exact restore (values, slots, metadata, high-water marks), N → M
resharding, atomicity under a crash mid-save, and corruption detection."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable

import numpy as np
import pytest

import xdl
from xdl import ckpt_layout, codec
from xdl import protocol as P
from xdl.client import Client
from xdl.errors import CheckpointError, DiskFullError
from xdl.server import checkpoint
from xdl.server.shard import Shard

IDS = np.arange(-3000, 3000, 7)


def train(client: Client, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        ids = rng.choice(IDS, size=200)
        client.push("emb", ids, rng.normal(size=(200, 4)).astype(np.float32))
    client.wait()


def make(client: Client) -> None:
    client.create_table("emb", 4, initializer=xdl.init.Normal(stddev=0.1),
                        optimizer=xdl.optim.Adam(lr=0.01), seed=5)
    client.create_dense("fc.weight", [3, 2], optimizer=xdl.optim.Adagrad(lr=0.1),
                        initial=np.arange(6, dtype=np.float32).reshape(3, 2))


@pytest.mark.parametrize("n, m", [(2, 2), (2, 3), (3, 1)])
def test_restore_continues_exactly(start_cluster: Callable[..., Client], tmp_path: os.PathLike[str],
                                   n: int, m: int) -> None:
    src = start_cluster(n)
    make(src)
    train(src, 10, seed=1)
    src.wait(src.dense_push("fc.weight", np.ones((3, 2), np.float32)))
    path = src.save(str(tmp_path))
    saved_rows = src.describe_table("emb")["rows"]
    assert os.path.basename(path) == "ckpt-000001"
    # The uninterrupted run goes on ...
    train(src, 5, seed=2)
    src.wait(src.dense_push("fc.weight", np.ones((3, 2), np.float32)))
    expected = src.pull("emb", IDS)
    expected_dense = src.dense_pull("fc.weight")
    # ... and a fresh cluster of another size resumes from the checkpoint.
    dst = start_cluster(m)
    info = dst.load(str(tmp_path))
    assert info["rows"] == saved_rows
    train(dst, 5, seed=2)
    dst.wait(dst.dense_push("fc.weight", np.ones((3, 2), np.float32)))
    np.testing.assert_array_equal(dst.pull("emb", IDS), expected)  # slots restored too
    np.testing.assert_array_equal(dst.dense_pull("fc.weight"), expected_dense)
    assert dst.describe_table("emb")["step"] >= 10


def test_high_water_marks_survive_a_restore(tmp_path: os.PathLike[str]) -> None:
    shard = Shard(checkpoint_root=str(tmp_path))
    replies: list[list[bytes]] = []

    def send(seq: int, command: bytes, header: dict, arrays: dict | None = None) -> dict:
        h = {"cid": "w", "inc": 1, "seq": seq, **header}
        shard.handle([bytes(memoryview(f)) for f in codec.encode(command, h, arrays)],
                     replies.append)
        return codec.decode([bytes(memoryview(f)) for f in replies[-1]])[1]

    send(1, P.CREATE_TABLE, {"table": "t", "dim": 2, "optimizer": {"kind": "sgd", "lr": 1.0}})
    push = {"ids": np.array([1], np.int64), "grads": np.ones((1, 2), np.float32)}
    send(2, P.PUSH, {"table": "t"}, push)
    tmp = ckpt_layout.begin(str(tmp_path))
    reply = send(3, P.SAVE, {"dir": tmp})
    ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [reply])
    fresh = Shard()
    shard.tables, shard.dense, shard.clients = checkpoint.load_shard(
        fresh, ckpt_layout.resolve(str(tmp_path)))
    h = send(2, P.PUSH, {"table": "t"}, push)  # the retry of an already applied push
    assert h["ok"] and h["dup"]
    np.testing.assert_array_equal(shard.tables["t"].pull(np.array([1], np.int64)), [[-1.0, -1.0]])


def test_crash_during_save_keeps_the_previous_checkpoint(cluster2: Client,
                                                         tmp_path: os.PathLike[str]) -> None:
    make(cluster2)
    train(cluster2, 3, seed=1)
    first = cluster2.save(str(tmp_path))
    before = cluster2.pull("emb", IDS)
    train(cluster2, 3, seed=2)
    # A save that died after the shards wrote their parts but before the manifest:
    tmp = ckpt_layout.begin(str(tmp_path))
    cluster2._call_all(P.SAVE, {"dir": tmp})
    assert ckpt_layout.resolve(str(tmp_path)) == first
    cluster2.load(str(tmp_path))
    np.testing.assert_array_equal(cluster2.pull("emb", IDS), before)
    # The next save cleans the leftover and numbers on.
    second = cluster2.save(str(tmp_path), keep=1)
    assert os.path.basename(second) == "ckpt-000002"
    assert sorted(os.listdir(tmp_path)) == ["LATEST", "ckpt-000002"]


def test_corrupt_checkpoint_is_refused_and_state_kept(cluster2: Client,
                                                      tmp_path: os.PathLike[str]) -> None:
    make(cluster2)
    train(cluster2, 2, seed=1)
    path = cluster2.save(str(tmp_path))
    current = cluster2.pull("emb", IDS)
    victim = os.path.join(path, "tables", "emb", "part-1.values.npy")
    with open(victim, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="checksum"):
        cluster2.load(path)
    np.testing.assert_array_equal(cluster2.pull("emb", IDS), current)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        cluster2.load(str(tmp_path / "nowhere"))  # type: ignore[operator]


def test_checkpoint_files_hold_no_pickle(cluster2: Client, tmp_path: os.PathLike[str]) -> None:
    make(cluster2)
    train(cluster2, 1, seed=1)
    path = cluster2.save(str(tmp_path))
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(".npy"):
                np.load(os.path.join(root, name), allow_pickle=False)


def _corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")


@pytest.mark.parametrize("victim", ["tables/emb/part-0.values.npy",
                                    "tables/emb/part-1.values.npy",
                                    "tables/emb/part-1.json",
                                    "dense/fc.weight.values.npy",
                                    "clients/part-1.json"])
def test_load_is_all_or_nothing_across_shards(cluster2: Client, tmp_path: os.PathLike[str],
                                              victim: str) -> None:
    make(cluster2)
    train(cluster2, 2, seed=1)
    path = cluster2.save(str(tmp_path))
    # Live state moves on, so a shard that swapped in the checkpoint would show.
    train(cluster2, 2, seed=2)
    cluster2.wait(cluster2.dense_push("fc.weight", np.ones((3, 2), np.float32)))
    live = cluster2.pull("emb", IDS)
    dense = cluster2.dense_pull("fc.weight")
    step = cluster2.describe_table("emb")["step"]
    _corrupt(os.path.join(path, victim))
    with pytest.raises(CheckpointError, match="checksum"):
        cluster2.load(path)
    np.testing.assert_array_equal(cluster2.pull("emb", IDS), live)
    np.testing.assert_array_equal(cluster2.dense_pull("fc.weight"), dense)
    assert cluster2.describe_table("emb")["step"] == step
    assert cluster2.list_tables()["tables"] == ["emb"]


@pytest.mark.parametrize("name", ["../" * 40 + "dir", "emb\n", ".", "a/b", ""])
def test_manifest_names_are_checked_like_wire_names(cluster2: Client, tmp_path: os.PathLike[str],
                                                    name: str) -> None:
    make(cluster2)
    path = cluster2.save(str(tmp_path))
    mpath = os.path.join(path, ckpt_layout.MANIFEST)
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["tables"][name] = manifest["tables"].pop("emb")
    manifest["dense"] = [name]
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="name"):
        cluster2.load(path)
    assert cluster2.list_tables()["tables"] == ["emb"]
    cluster2.save(str(tmp_path))  # the next save writes under the root only
    assert not os.path.exists("/dir")


def test_manifest_without_files_is_a_checkpoint_error(tmp_path: os.PathLike[str]) -> None:
    folder = os.path.join(str(tmp_path), "ckpt-000001")
    os.makedirs(folder)
    with open(os.path.join(folder, ckpt_layout.MANIFEST), "w") as f:
        json.dump({"format": ckpt_layout.FORMAT_VERSION, "num_shards": 1, "ranges": [],
                   "tables": {}, "dense": []}, f)
    with pytest.raises(CheckpointError, match="'files' is missing"):
        ckpt_layout.read_manifest(folder)


def test_save_into_a_file_or_a_full_disk_says_so(tmp_path: os.PathLike[str]) -> None:
    afile = os.path.join(str(tmp_path), "f")
    open(afile, "w").close()
    with pytest.raises(CheckpointError, match="is a file"):
        ckpt_layout.begin(afile)
    import errno

    err = ckpt_layout.disk_error(OSError(errno.ENOSPC, "No space left on device"), afile)
    assert isinstance(err, DiskFullError) and "no space left" in str(err)
    if os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode):
        # a real write to a device that is always full (written in place, never renamed)
        with pytest.raises(DiskFullError):
            checkpoint._write_npy("/dev/full", np.zeros(100000, np.float32))


def test_checkpoint_files_with_matching_checksums_are_still_checked(
        tmp_path: os.PathLike[str]) -> None:
    """A crafted checkpoint (consistent checksums, absurd contents) is refused cleanly."""
    root = str(tmp_path)
    shard = Shard(checkpoint_root=root)
    out: list[list[bytes]] = []

    def send(seq: int, command: bytes, header: dict) -> dict:
        h = {"cid": "w", "inc": 1, "seq": seq, **header}
        shard.handle([bytes(memoryview(f)) for f in codec.encode(command, h)], out.append)
        return codec.decode([bytes(memoryview(f)) for f in out[-1]])[1]

    assert send(1, P.CREATE_DENSE, {"name": "fc", "shape": [2]})["ok"]
    tmp = ckpt_layout.begin(root)
    path = ckpt_layout.commit(tmp, 1, [(0, P.NUM_BUCKETS)], [send(2, P.SAVE, {"dir": tmp})])
    rel = "dense/fc.json"
    with open(os.path.join(path, rel)) as f:
        meta = json.load(f)
    meta["shape"] = [2 ** 32, 2 ** 32]
    ckpt_layout.write_json(os.path.join(path, rel), meta)
    mpath = os.path.join(path, ckpt_layout.MANIFEST)
    with open(mpath) as f:
        manifest = json.load(f)
    manifest["files"][rel]["sha256"] = ckpt_layout.sha256(os.path.join(path, rel))
    ckpt_layout.write_json(mpath, manifest)
    h = send(3, P.LOAD, {"dir": path})
    assert h["code"] == "CHECKPOINT" and "cannot hold" in h["message"], h
    assert shard.dense["fc"].shape == (2,)
