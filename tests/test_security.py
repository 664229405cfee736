"""Trusted clients only: CURVE keys, the ZAP authenticator, admin commands, exposed binds."""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from xdl import codec
from xdl import protocol as P
from xdl import security as S
from xdl.cli import main as xdl_main
from xdl.client import connect
from xdl.errors import InvalidArgumentError, PermissionDeniedError, ServerUnavailableError


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder with key pairs server, alice, admin, mallory; allowed/ holds alice's key."""
    d = str(tmp_path_factory.mktemp("keys"))
    assert xdl_main(["keys", "generate", d, "server", "alice", "admin", "mallory"]) == 0
    os.makedirs(os.path.join(d, "allowed"))
    shutil.copy(os.path.join(d, "alice.key"), os.path.join(d, "allowed"))
    return d


def test_generated_keys_are_zmq_certificates_with_private_secrets(keys: str) -> None:
    public, secret = zmq.auth.load_certificate(os.path.join(keys, "alice.key_secret"))
    assert secret is not None and len(public) == 40 and len(secret) == 40
    assert zmq.auth.load_certificate(os.path.join(keys, "alice.key")) == (public, None)
    assert stat.S_IMODE(os.stat(os.path.join(keys, "alice.key_secret")).st_mode) == 0o600
    with pytest.raises(InvalidArgumentError, match="exists"):
        S.generate_keys(keys, ["alice"])  # never overwrites a key someone holds


def test_settings_come_from_options_or_environment(keys: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (S.ENV_SERVER_SECRET, S.ENV_CLIENTS, S.ENV_ADMINS, S.ENV_CLIENT_SECRET,
                S.ENV_SERVER_KEY):
        monkeypatch.delenv(var, raising=False)
    assert S.ServerSecurity.from_options() is None and S.ClientKeys.from_options() is None
    with pytest.raises(InvalidArgumentError, match="allowed client keys"):
        S.ServerSecurity.from_options(secret=os.path.join(keys, "server.key_secret"))
    with pytest.raises(InvalidArgumentError, match="only a public key"):
        S.ServerSecurity.from_options(os.path.join(keys, "server.key"), os.path.join(keys, "x"))
    monkeypatch.setenv(S.ENV_SERVER_SECRET, os.path.join(keys, "server.key_secret"))
    monkeypatch.setenv(S.ENV_CLIENTS, os.path.join(keys, "allowed"))
    monkeypatch.setenv(S.ENV_ADMINS, os.path.join(keys, "admin.key"))
    sec = S.ServerSecurity.from_options()
    assert sec is not None
    assert sorted(sec.clients.values()) == ["admin.key", "alice.key"]  # admins are clients
    assert list(sec.admins.values()) == ["admin.key"]
    monkeypatch.setenv(S.ENV_CLIENT_SECRET, os.path.join(keys, "alice.key_secret"))
    with pytest.raises(InvalidArgumentError, match="public key"):
        S.ClientKeys.from_options()
    monkeypatch.setenv(S.ENV_SERVER_KEY, os.path.join(keys, "server.key"))
    ck = S.ClientKeys.from_options()
    assert ck is not None and ck.server == sec.public


@pytest.fixture
def router(keys: str) -> Iterator[tuple[zmq.Context, zmq.Socket, str, S.ServerSecurity]]:
    sec = S.ServerSecurity.from_options(os.path.join(keys, "server.key_secret"),
                                        os.path.join(keys, "allowed"),
                                        os.path.join(keys, "admin.key"))
    assert sec is not None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sec.secure(ctx, sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield ctx, sock, f"tcp://127.0.0.1:{port}", sec
    sec.stop()
    ctx.destroy(linger=0)


def dealer(ctx: zmq.Context, keys: str, name: str, endpoint: str) -> zmq.Socket:
    ck = S.ClientKeys.from_options(os.path.join(keys, f"{name}.key_secret"),
                                   os.path.join(keys, "server.key"))
    assert ck is not None
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    ck.secure(sock)
    sock.connect(endpoint)
    return sock


def request(command: bytes, seq: int = 7) -> list[Any]:
    return codec.encode(command, {"cid": "c", "inc": 1, "seq": seq})


def test_an_unknown_key_gets_nothing_and_is_logged(keys: str, router: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ctx, sock, endpoint, _ = router
    with caplog.at_level(logging.WARNING, logger="xdl.security"):
        intruder = dealer(ctx, keys, "mallory", endpoint)
        intruder.send_multipart(request(P.PING))
        assert sock.poll(1500) == 0  # the message never reaches the shard's socket
    assert any("refused a client with unknown CURVE key" in r.getMessage()
               for r in caplog.records)
    friend = dealer(ctx, keys, "alice", endpoint)  # the shard still serves the others
    friend.send_multipart(request(P.PING))
    assert sock.poll(5000)
    msg = sock.recv_multipart(copy=False)
    assert codec.decode(msg[1:])[0] == P.PING
    assert msg[1].get("User-Id") == zmq.auth.load_certificate(
        os.path.join(keys, "alice.key"))[0].decode()


def test_a_client_without_curve_cannot_talk_to_a_curve_shard(router: Any) -> None:
    ctx, sock, endpoint, _ = router
    plain = ctx.socket(zmq.DEALER)
    plain.linger = 0
    plain.connect(endpoint)
    plain.send_multipart(request(P.PING))
    assert sock.poll(1000) == 0


def test_admin_commands_need_an_admin_key(keys: str, router: Any) -> None:
    ctx, sock, endpoint, sec = router
    for name, refused in (("alice", True), ("admin", False)):
        d = dealer(ctx, keys, name, endpoint)
        for command in (P.SHUTDOWN, P.SAVE, P.LOAD, P.PUSH):
            d.send_multipart(request(command, seq=11))
            assert sock.poll(5000)
            msg = sock.recv_multipart(copy=False)
            reply = sec.refusal(msg[1:])
            if refused and command in S.ADMIN_COMMANDS:
                assert reply is not None
                _, h, _ = codec.decode(reply)
                assert h["ok"] is False and h["code"] == "DENIED" and h["seq"] == 11
                assert "alice.key" in h["message"] and "admin" in h["message"]
            else:
                assert reply is None
        d.close()


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:7000", True), ("tcp://localhost:7000", True), ("tcp://[::1]:7000", True),
    ("tcp://0.0.0.0:7000", False), ("tcp://*:7000", False), ("tcp://10.1.2.3:7000", False),
    ("ipc:///tmp/x", True),
])
def test_binding_beyond_loopback_without_curve_warns(endpoint: str, local: bool, keys: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert S.is_loopback(endpoint) is local
    with caplog.at_level(logging.WARNING, logger="xdl.security"):
        assert S.warn_if_exposed(endpoint, None) is (not local)
        sec = S.ServerSecurity.from_options(os.path.join(keys, "server.key_secret"),
                                            os.path.join(keys, "allowed"))
        assert S.warn_if_exposed(endpoint, sec) is False
    assert any("without CURVE" in r.getMessage() for r in caplog.records) is (not local)


@pytest.fixture(scope="module")
def secured(keys: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """A shard process that accepts alice and admin, and SHUTDOWN/SAVE/LOAD from admin only."""
    logpath = str(tmp_path_factory.mktemp("shardlog") / "shard.log")
    with open(logpath, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xdl.server", "--bind", "tcp://127.0.0.1:0",
             "--curve-secret", os.path.join(keys, "server.key_secret"),
             "--curve-clients", os.path.join(keys, "allowed"),
             "--curve-admins", os.path.join(keys, "admin.key"),
             "--parent-pid", str(os.getpid())],
            stdout=subprocess.PIPE, stderr=err, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    endpoint = ""
    deadline = time.monotonic() + 120
    while not endpoint and time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.5):
            line = proc.stdout.readline()
            if line.startswith(P.READY_PREFIX):
                endpoint = line[len(P.READY_PREFIX):].strip()
    sel.close()
    try:
        assert endpoint, f"shard did not start: {open(logpath).read()}"
        yield endpoint, logpath, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        proc.stdout.close()


def as_client(keys: str, name: str, endpoint: str, **kw: Any) -> Any:
    return connect([endpoint], curve_secret=os.path.join(keys, f"{name}.key_secret"),
                   curve_server_key=os.path.join(keys, "server.key"), **kw)


def log_text(path: str, needle: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if needle in f.read():
                return True
        time.sleep(0.1)
    return False


def test_an_allowed_client_works_over_curve(keys: str, secured: Any) -> None:
    endpoint, _, _ = secured
    with as_client(keys, "alice", endpoint, timeout=20.0) as client:
        client.create_table("t", dim=2)
        ids = np.array([1, 2, 3], dtype=np.int64)
        client.wait(client.push("t", ids, np.ones((3, 2), np.float32)))
        np.testing.assert_allclose(client.pull("t", ids), np.full((3, 2), -0.01), rtol=1e-6)


def test_an_unknown_client_is_refused_and_logged(keys: str, secured: Any) -> None:
    endpoint, logpath, _ = secured
    with pytest.raises(ServerUnavailableError):
        as_client(keys, "mallory", endpoint, timeout=1.0, retries=0)
    mallory = zmq.auth.load_certificate(os.path.join(keys, "mallory.key"))[0].decode()
    assert log_text(logpath, f"refused a client with unknown CURVE key {mallory}")
    with pytest.raises(ServerUnavailableError):  # and so is one without any key
        connect([endpoint], timeout=1.0, retries=0)


def test_only_an_admin_key_may_shut_a_shard_down(keys: str, secured: Any) -> None:
    endpoint, logpath, proc = secured
    with as_client(keys, "alice", endpoint, timeout=20.0) as client:
        with pytest.raises(PermissionDeniedError, match="admin"):
            client.shutdown()
        assert client.ping()[0]["shard"] == 0  # still serving
    assert log_text(logpath, "refused SHUTDOWN from client key")
    with as_client(keys, "admin", endpoint, timeout=20.0) as admin:
        admin.shutdown()
    assert proc.wait(20) == 0
