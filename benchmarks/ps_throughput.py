"""Parameter-server throughput: xdl against dmlc/ps-lite and a strict ceiling, same run.

The workload (issue 7): 1 M random int64 keys are inserted first; each request draws
its keys uniformly at random from them (distinct within a request, since ps-lite wants
unique keys; xdl still de-duplicates, its default); one request in flight; an Adagrad
push is waited for. xdl is driven through its default API only::

    rows = client.pull(table, ids)
    client.wait(client.push(table, ids, grads))

Rows: 65,536 and 4,096 keys per request x dim 16 and 64, on 1 and 2 shards (tcp
loopback, shard processes started by ``xdl.connect(local_shards=N)``).

Compared with, in the same run:

* **ps-lite** (``--pslite BIN``, the peer of ``../shared/bench/pslite``: C++, ZeroMQ,
  ``unordered_map`` index, Adagrad handler, keys handed over pre-sorted), run
  interleaved with xdl: each round measures every row on both, ``--rounds`` rounds
  (default 3), medians printed with xdl / ps-lite. Targets: >= 1.5 at 65,536 keys,
  >= 1.0 at 4,096.
* **the strict ceiling**: the irreducible work of one request, measured here and
  summed: a bare numba open-addressing lookup of the same keys in a 1 M-key table
  (key and row side by side) + ``np.take`` of the rows into a preallocated buffer (a
  push: a bare fused Adagrad loop over the rows instead) + a bare pyzmq round trip of
  the same frame sizes to one echo process per shard (shards work in parallel, so the
  compute term is one shard's share). Target: xdl >= 0.6 x ceiling.

``--big-rows N`` (opt-in) fills an N-key dim-16 Adagrad table on one shard and prints
resident bytes per row, fill time and pull rows/s at that size.

Run: ``python benchmarks/ps_throughput.py [--pslite /work/pslite-build/bench_kv]``.
Figures move with machine load; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from numba import njit

import xdl
from xdl.sharding import shard_of

KEYS = 1_000_000
SIZES = (65_536, 4_096)
DIMS = (16, 64)
BATCHES = 8  # distinct requests per row, cycled
LR = 0.01
PSLITE_RUN = Path(__file__).resolve().parents[2] / "shared" / "bench" / "pslite" / "run.sh"
TARGET_PSLITE = {65_536: 1.5, 4_096: 1.0}
TARGET_CEILING = 0.6


# -- the strict ceiling's pieces ------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _bare_build(keys: np.ndarray, bits: int) -> np.ndarray:
    # slot = (key, row + 1), side by side; row 0 marks an empty slot
    cap = 1 << bits
    table = np.zeros((cap, 2), dtype=np.int64)
    shift = np.uint64(64 - bits)
    mask = np.uint64(cap - 1)
    for i in range(keys.shape[0]):
        h = (np.uint64(keys[i]) * _GOLDEN) >> shift
        while table[h, 1] != 0:
            h = (h + np.uint64(1)) & mask
        table[h, 0] = keys[i]
        table[h, 1] = i + 1
    return table


@njit(cache=True)
def _bare_lookup(table: np.ndarray, bits: int, keys: np.ndarray, out: np.ndarray) -> None:
    shift = np.uint64(64 - bits)
    mask = np.uint64(table.shape[0] - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        h = (np.uint64(k) * _GOLDEN) >> shift
        while table[h, 0] != k:  # every key is present
            h = (h + np.uint64(1)) & mask
        out[i] = table[h, 1] - 1


@njit(cache=True, error_model="numpy")
def _bare_adagrad(w: np.ndarray, acc: np.ndarray, rows: np.ndarray, g: np.ndarray,
                  lr: np.float32, eps: np.float32) -> None:
    dim = w.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(dim):
            gj = g[i, j]
            a = acc[r, j] + gj * gj
            acc[r, j] = a
            w[r, j] -= lr * gj / (np.sqrt(a) + eps)


class BareStore:
    """The ceiling's compute: 1 M keys in a bare numba index, rows in flat arenas."""

    def __init__(self, keys: np.ndarray, dims: tuple[int, ...]):
        self.bits = max(4, int(np.ceil(np.log2(2 * keys.size))))  # load <= 0.5
        self.table = _bare_build(keys, self.bits)
        rng = np.random.default_rng(3)
        self.values = {d: rng.random((keys.size, d), dtype=np.float32) for d in dims}
        # np.full, not np.zeros: calloc leaves pages to be faulted in during timing
        self.accum = {d: np.full((keys.size, d), 0.0, dtype=np.float32) for d in dims}
        self.idx = np.empty(max(SIZES), dtype=np.int64)
        self.out = {d: np.empty((max(SIZES), d), dtype=np.float32) for d in dims}

    def pull(self, keys: np.ndarray, dim: int) -> None:
        """Lookup + ``np.take`` into a preallocated buffer."""
        n = keys.size
        _bare_lookup(self.table, self.bits, keys, self.idx[:n])
        np.take(self.values[dim], self.idx[:n], axis=0, out=self.out[dim][:n])

    def push(self, keys: np.ndarray, grads: np.ndarray, dim: int) -> None:
        """Lookup + a bare fused Adagrad loop over the rows."""
        n = keys.size
        _bare_lookup(self.table, self.bits, keys, self.idx[:n])
        _bare_adagrad(self.values[dim], self.accum[dim], self.idx[:n], grads,
                      np.float32(LR), np.float32(1e-10))


def echo_server() -> None:
    """Echo process: answer each request with a reply of the size its first frame asks."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    replies: dict[int, zmq.Frame] = {}
    while True:
        ident, size, *_ = sock.recv_multipart(copy=False)
        nbytes = int(np.frombuffer(size.buffer, dtype=np.int64)[0])
        if nbytes < 0:
            break
        if nbytes not in replies:
            replies[nbytes] = zmq.Frame(np.zeros(nbytes, dtype=np.uint8))
        sock.send_multipart([ident, replies[nbytes]], copy=False)
    sock.close(0)
    ctx.term()


class Echo:
    """Client side of the bare round trip: one DEALER per echo process."""

    def __init__(self, shards: int):
        self.procs = [subprocess.Popen([sys.executable, __file__, "--echo-server"],
                                       stdout=subprocess.PIPE, text=True)
                      for _ in range(shards)]
        self.ctx = zmq.Context()
        self.socks = []
        for p in self.procs:
            assert p.stdout is not None
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(p.stdout.readline().strip())
            self.socks.append(s)

    def pids(self) -> list[int]:
        """The echo processes' ids."""
        return [p.pid for p in self.procs]

    def call(self, parts: list[tuple[np.ndarray, list[np.ndarray]]]) -> None:
        """Send each shard its (reply size, frames) and wait for every reply."""
        for s, (size, frames) in zip(self.socks, parts, strict=True):
            msg: list[Any] = [size, *frames]
            s.send_multipart(msg, copy=False)
        for s in self.socks:
            s.recv_multipart(copy=False)

    def close(self) -> None:
        """Stop the echo processes."""
        for s in self.socks:
            s.send_multipart([np.array([-1], np.int64).tobytes()])
            s.close(0)
        for p in self.procs:
            p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.ctx.term()


# -- ps-lite ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PsLite:
    """A ps-lite cluster (scheduler, ``shards`` servers, one worker) driven over stdin."""

    def __init__(self, binary: str, shards: int, workdir: str):
        self.workdir = workdir
        self.pids: list[int] = []
        self.proc = subprocess.Popen(["bash", str(PSLITE_RUN), binary, str(shards),
                                      str(_free_port())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self._read()
        if line != "READY":
            self.close()
            raise RuntimeError(f"ps-lite peer did not start: {line!r}")
        self.pids = descendants(self.proc.pid)

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ps-lite peer exited (rc {self.proc.poll()})")
        return line.strip()

    def command(self, cmd: str) -> list[str]:
        """Send one command line; return the answer's fields after ``ok``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        ans = self._read().split()
        if not ans or ans[0] != "ok":
            raise RuntimeError(f"ps-lite peer answered {' '.join(ans)!r} to {cmd!r}")
        return ans[1:]

    def write_keys(self, name: str, keys: np.ndarray) -> str:
        """Keys as the peer's uint64 file; returns its path."""
        path = os.path.join(self.workdir, name)
        np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64).tofile(path)
        return path

    def bench(self, op: str, n: int, dim: int, min_s: float) -> tuple[float, int]:
        """(rows/s, requests made including the warm-up) of ``op`` (pull or push) with
        pre-sorted keys of batch size ``n``."""
        iters, secs = self.command(f"bench {op} {n} {dim} {min_s} 3 0")
        return n * int(iters) / float(secs), int(iters) + 1

    def measure(self, res: Results, key: tuple[int, int, int, str], n: int, dim: int,
                min_s: float) -> None:
        """Rows/s and CPU ms per request of one bench into ``res``."""
        self.pids = descendants(self.proc.pid)
        c0 = _cpu_seconds(self.pids)
        rows_s, calls = self.bench(key[3], n, dim, min_s)
        res.add((*key, "pslite_cpu_ms"), (_cpu_seconds(self.pids) - c0) / calls * 1e3)
        res.add((*key, "pslite"), rows_s)

    def close(self) -> None:
        """Quit the worker (the scheduler and servers follow); kill what is left."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            self.proc.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# -- measurement ------------------------------------------------------------------------
def rate(fn: Callable[[int], object], rows: int, min_time: float, min_iters: int = 3) -> float:
    """Rows/s of ``fn(i)`` for i = 0, 1, ... over at least ``min_time`` seconds."""
    return rate_calls(fn, rows, min_time, min_iters)[0]


def rate_calls(fn: Callable[[int], object], rows: int, min_time: float, min_iters: int = 3
               ) -> tuple[float, int]:
    """(rows/s, calls made including the untimed warm-up call) of ``fn(i)``."""
    fn(0)  # warm
    n, t0 = 0, time.perf_counter()
    while True:
        fn(n + 1)
        n += 1
        el = time.perf_counter() - t0
        if el >= min_time and n >= min_iters:
            return rows * n / el, n + 1


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (all threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def seconds(fn: Callable[[int], object], min_time: float, min_iters: int = 3) -> float:
    """Mean seconds of one ``fn(i)`` call."""
    return 1.0 / rate(fn, 1, min_time, min_iters)


@dataclass
class Workload:
    """The keys, the requests' key batches and the gradients."""

    keys: np.ndarray
    batches: dict[int, list[np.ndarray]]
    grads: dict[tuple[int, int], np.ndarray]

    @classmethod
    def make(cls, seed: int = 0) -> Workload:
        rng = np.random.default_rng(seed)
        keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=KEYS + KEYS // 50,
                                      dtype=np.int64))
        keys = rng.permutation(keys)[:KEYS]
        batches = {n: [keys[rng.choice(KEYS, n, replace=False)] for _ in range(BATCHES)]
                   for n in SIZES}
        grads = {(n, d): rng.normal(0, 0.1, size=(n, d)).astype(np.float32)
                 for n in SIZES for d in DIMS}
        return cls(keys, batches, grads)


@dataclass
class Results:
    """Rows/s per (shards, n, dim, op, system), one entry per round."""

    data: dict[tuple[int, int, int, str, str], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[int, int, int, str, str], value: float) -> None:
        self.data.setdefault(key, []).append(value)

    def record(self, key: tuple[int, int, int, str], xdl_rate: float, comp_s: float,
               rt_s: float) -> None:
        """One round of xdl and the ceiling for one (shards, n, dim, op)."""
        n = key[1]
        self.add((*key, "xdl"), xdl_rate)
        self.add((*key, "ceiling"), n / (comp_s + rt_s))
        self.add((*key, "ceiling_compute_ms"), comp_s * 1e3)
        self.add((*key, "ceiling_rt_ms"), rt_s * 1e3)

    def median(self, key: tuple[int, int, int, str, str]) -> float | None:
        v = self.data.get(key)
        return statistics.median(v) if v else None


def measure_row(client: xdl.Client, peer: PsLite | None, echo: Echo, bare: BareStore,
                wl: Workload, shards: int, n: int, d: int, owner: list[np.ndarray],
                min_time: float, res: Results) -> None:
    """Pull and push of one row (n keys x dim d): xdl, ps-lite, ceiling, in turn."""
    bs, table, g = wl.batches[n], f"d{d}", wl.grads[(n, d)]
    parts_pull = [[(np.array([(o == k).sum() * d * 4], np.int64), [b[o == k]])
                   for k in range(shards)] for b, o in zip(bs, owner, strict=True)]
    parts_push = [[(np.array([16], np.int64), [b[o == k], g[o == k]]) for k in range(shards)]
                  for b, o in zip(bs, owner, strict=True)]
    share = [b[o == 0] for b, o in zip(bs, owner, strict=True)]
    gshare = [g[o == 0] for o in owner]
    key = (shards, n, d)
    # CPU per request of every process involved (client + shards; ps-lite's scheduler,
    # servers and worker): a figure the other helpers' load moves much less than rows/s
    xpids = [p for p in descendants(os.getpid()) if p not in echo.pids()
             and (peer is None or p not in peer.pids)]
    res.add((*key, "pull", "load"), os.getloadavg()[0])
    c0 = _cpu_seconds(xpids)
    x, calls = rate_calls(lambda i: client.pull(table, bs[i % BATCHES]), n, min_time)
    res.add((*key, "pull", "xdl_cpu_ms"), (_cpu_seconds(xpids) - c0) / calls * 1e3)
    comp = seconds(lambda i: bare.pull(share[i % BATCHES], d), min_time / 2)
    rt = seconds(lambda i: echo.call(parts_pull[i % BATCHES]), min_time / 2)
    res.record((*key, "pull"), x, comp, rt)
    if peer:
        peer.measure(res, (*key, "pull"), n, d, min_time)
    res.add((*key, "push", "load"), os.getloadavg()[0])
    c0 = _cpu_seconds(xpids)
    x, calls = rate_calls(lambda i: client.wait(client.push(table, bs[i % BATCHES], g)), n,
                          min_time)
    res.add((*key, "push", "xdl_cpu_ms"), (_cpu_seconds(xpids) - c0) / calls * 1e3)
    comp = seconds(lambda i: bare.push(share[i % BATCHES], gshare[i % BATCHES], d),
                   min_time / 2)
    rt = seconds(lambda i: echo.call(parts_push[i % BATCHES]), min_time / 2)
    res.record((*key, "push"), x, comp, rt)
    if peer:
        peer.measure(res, (*key, "push"), n, d, min_time)


def run_shards(shards: int, wl: Workload, pslite: str | None, rounds: int, min_time: float,
               res: Results, tmp: str) -> None:
    """Every row on ``shards`` shards: xdl, ps-lite and the ceiling, interleaved."""
    t0 = time.perf_counter()
    client = xdl.connect(local_shards=shards)
    peer = PsLite(pslite, shards, tmp) if pslite else None
    echo = Echo(shards)
    try:
        for d in DIMS:
            client.create_table(f"d{d}", d, optimizer=xdl.optim.Adagrad(lr=LR))
            for i in range(0, KEYS, 65_536):
                client.pull(f"d{d}", wl.keys[i:i + 65_536])
        if peer:
            kfile = peer.write_keys("all.bin", wl.keys)
            for d in DIMS:
                peer.command(f"insert {d} {kfile} 65536")
            for n in SIZES:
                path = peer.write_keys(f"b{n}.bin", np.concatenate(wl.batches[n]))
                peer.command(f"load {n} {path}")
        bare = BareStore(wl.keys, DIMS)
        # the ceiling's frames: what the client sends each shard (ids, grads) and the reply
        owner = {n: [shard_of(b, shards) for b in wl.batches[n]] for n in SIZES}
        print(f"  {shards} shard(s): set up in {time.perf_counter() - t0:.1f} s", flush=True)

        for r in range(rounds):
            for n in SIZES:
                for d in DIMS:
                    measure_row(client, peer, echo, bare, wl, shards, n, d, owner[n],
                                min_time, res)
            print(f"  {shards} shard(s): round {r + 1}/{rounds} done", flush=True)
    finally:
        echo.close()
        if peer:
            peer.close()
        client.close()


def report(res: Results, with_peer: bool) -> None:
    """Print the table of medians and ratios."""
    head = (f"{'shards':>6} {'keys':>6} {'dim':>3} {'op':>4} | {'xdl Mrows/s':>11} | "
            f"{'ceiling':>7} {'(comp+rt ms)':>13} {'ratio':>5} | ")
    if with_peer:
        head += (f"{'ps-lite':>7} {'ratio':>5} {'target':>6} | "
                 f"{'CPU ms/req xdl':>14} {'ps-lite':>7} {'ratio':>5} | ")
    head += "load"
    print(head)
    print("-" * len(head))
    misses = 0
    for shards in (1, 2):
        for n in SIZES:
            for d in DIMS:
                for op in ("pull", "push"):
                    key = (shards, n, d, op)
                    x = res.median((*key, "xdl"))
                    c = res.median((*key, "ceiling"))
                    if x is None or c is None:
                        continue
                    cc = res.median((*key, "ceiling_compute_ms"))
                    cr = res.median((*key, "ceiling_rt_ms"))
                    ok_c = x >= TARGET_CEILING * c
                    misses += not ok_c
                    line = (f"{shards:>6} {n:>6} {d:>3} {op:>4} | {x / 1e6:>11.2f} | "
                            f"{c / 1e6:>7.2f} {f'({cc:.2f}+{cr:.2f})':>13} "
                            f"{x / c:>5.2f}{'' if ok_c else '*'}| ")
                    p = res.median((*key, "pslite"))
                    if p is not None:
                        ok_p = x >= TARGET_PSLITE[n] * p
                        misses += not ok_p
                        line += (f"{p / 1e6:>7.2f} {x / p:>5.2f} {TARGET_PSLITE[n]:>5.1f}"
                                 f"{'' if ok_p else '*':1} | ")
                        xc = res.median((*key, "xdl_cpu_ms"))
                        pc = res.median((*key, "pslite_cpu_ms"))
                        if xc and pc:
                            line += f"{xc:>14.2f} {pc:>7.2f} {pc / xc:>5.2f} | "
                    load = res.median((*key, "load"))
                    if load is not None:
                        line += f"{load:>4.1f}"
                    print(line)
    print(f"* = below target (ceiling ratio >= {TARGET_CEILING}"
          f"{', ps-lite ratio >= target' if with_peer else ''}); {misses} miss(es)")
    if with_peer:
        print("CPU ms/req: user+system CPU of every process of each system (xdl: client and "
              "shards; ps-lite: scheduler, servers, worker) per request; ratio = ps-lite / "
              "xdl (> 1: xdl does the request with less CPU)")
    print(f"load: the machine's 1-minute load average when the row's xdl measurement began "
          f"(median over rounds; {os.cpu_count()} CPUs): other processes' load moves the "
          "rows/s, the CPU figures much less")


def _shard_peak_rss() -> int | None:
    """Peak resident bytes (VmHWM) of this process's one shard child, if readable."""
    import glob

    me = str(os.getpid())
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(status) as f:
                text = f.read()
            with open(status.replace("status", "cmdline"), "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == me and b"xdl.server" in cmd:
            return int(fields["VmHWM"].split()[0]) * 1024
    return None


def bench_big(rows: int, min_time: float) -> str:
    """Fill an N-key dim-16 Adagrad table on one shard: bytes/row, fill time, pull rows/s."""
    with xdl.connect(local_shards=1) as client:
        base = client.stats()[0]["resident_bytes"]
        client.create_table("big", 16, optimizer=xdl.optim.Adagrad(lr=LR))
        step = 1 << 20
        rng = np.random.default_rng(5)
        t0 = time.perf_counter()
        keys = np.empty(0, np.int64)
        for i in range(0, rows, step):
            keys = rng.integers(-(2**63), 2**63 - 1, size=min(step, rows - i), dtype=np.int64)
            client.pull("big", keys)
            print(f"  filled {min(i + step, rows):>12,} rows", end="\r", flush=True)
        fill = time.perf_counter() - t0
        st = client.stats()[0]
        grown = st["resident_bytes"] - base
        n = client.describe_table("big")["rows"]
        peak = _shard_peak_rss()
        batches = [keys[rng.choice(keys.size, 65_536, replace=False)] for _ in range(BATCHES)]
        pull = rate(lambda i: client.pull("big", batches[i % BATCHES]), 65_536, min_time)
    out = (f"{n:,} keys x dim 16 Adagrad on 1 shard: filled in {fill:.1f} s "
           f"({n / fill / 1e6:.2f} M keys/s); resident {grown / n:.1f} bytes/row "
           f"({grown / n / 128:.2f} x the 128 B payload, target <= 1.3)")
    if peak:
        out += (f"; peak resident while filling {(peak - base) / n:.1f} bytes/row "
                f"({peak / st['resident_bytes']:.2f} x the final)")
    return out + f"; pull of 65,536 random keys {pull / 1e6:.2f} M rows/s"


def main() -> None:
    """Parse arguments, run the rows, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pslite", metavar="BIN", help="the ps-lite peer binary (bench_kv)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0,
                    help="seconds per measurement (default 1)")
    ap.add_argument("--shards", type=int, nargs="*", default=[1, 2], choices=[1, 2],
                    help="shard counts to run (default 1 2; none: only --big-rows)")
    ap.add_argument("--big-rows", type=int, default=0, metavar="N",
                    help="also fill an N-key table and report bytes/row (e.g. 50000000)")
    ap.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo_server:
        echo_server()
        return
    print(f"xdl-bridge parameter-server throughput: {KEYS:,} keys, random distinct keys "
          f"per request, 1 in flight, Adagrad; medians of {args.rounds} interleaved rounds")
    if args.pslite and not os.access(args.pslite, os.X_OK):
        sys.exit(f"--pslite {args.pslite}: not an executable (build it with "
                 f"{PSLITE_RUN.parent}/build.sh)")
    wl = Workload.make()
    res = Results()
    with tempfile.TemporaryDirectory(prefix="xdl-bench-") as tmp:
        for shards in args.shards:
            run_shards(shards, wl, args.pslite, args.rounds, args.min_time, res, tmp)
    if args.shards:
        report(res, bool(args.pslite))
    if args.big_rows:
        print(bench_big(args.big_rows, args.min_time))


if __name__ == "__main__":
    main()
