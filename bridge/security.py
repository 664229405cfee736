"""Trusted clients only: CurveZMQ on every socket once keys are configured.

Keys are ZeroMQ certificates (``zmq.auth`` format): ``NAME.key`` holds a public key,
``NAME.key_secret`` the pair (readable by its owner only). ``xdl keys generate DIR``
writes them. A cluster uses:

- one **server** key pair, shared by every shard (``--curve-secret`` /
  ``XDL_CURVE_SERVER_SECRET``); clients know its public half (``XDL_CURVE_SERVER_KEY``);
- one key pair per **client** (``XDL_CURVE_CLIENT_SECRET``); a shard accepts only the
  public keys it was given (``--curve-clients`` / ``XDL_CURVE_CLIENTS``: a folder of
  ``*.key`` files or a comma-separated list of them);
- optionally **admin** keys (``--curve-admins`` / ``XDL_CURVE_ADMINS``): when set, only
  they may run the administrative commands (:data:`ADMIN_COMMANDS`).

A shard checks client keys with a ZAP authenticator (``zmq.auth``) running in a thread;
a refused handshake is logged with the key and never reaches the shard's loop, so an
unknown client gets no reply at all. The key an accepted request came from travels as
the message's ``User-Id`` property (the z85 public key), which decides admin rights.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import os
import socket as _socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from . import codec
from . import protocol as P
from .errors import InvalidArgumentError, PermissionDeniedError

log = logging.getLogger("xdl.security")

ENV_SERVER_SECRET = "XDL_CURVE_SERVER_SECRET"
ENV_CLIENTS = "XDL_CURVE_CLIENTS"
ENV_ADMINS = "XDL_CURVE_ADMINS"
ENV_CLIENT_SECRET = "XDL_CURVE_CLIENT_SECRET"
ENV_SERVER_KEY = "XDL_CURVE_SERVER_KEY"

#: ZAP domain of every shard socket.
ZAP_DOMAIN = "xdl"

#: Commands that only admin keys may send when admin keys are configured.
ADMIN_COMMANDS = frozenset({P.SHUTDOWN, P.SAVE, P.LOAD})


def _keyerror(path: str, what: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{path}: {what}; create keys with `xdl keys generate DIR`")


def generate_keys(directory: str, names: Iterable[str] = ("server", "client")
                  ) -> list[tuple[str, str]]:
    """Write a CURVE key pair per name into ``directory``; return ``(public, secret)`` paths.

    Existing files are never overwritten (that would lock out whoever holds the old
    keys). Secret files are made readable by their owner only.
    """
    os.makedirs(directory, exist_ok=True)
    out = []
    for name in names:
        if not name or os.sep in name or name.startswith("."):
            raise InvalidArgumentError(f"key name {name!r}: use a plain file name")
        base = os.path.join(directory, name)
        for path in (base + ".key", base + ".key_secret"):
            if os.path.exists(path):
                raise InvalidArgumentError(f"{path} exists; remove it first or pick another name")
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        out.append((public, secret))
    return out


def load_secret(path: str) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys of the pair in ``path`` (a ``.key_secret`` file)."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise _keyerror(path, f"cannot read a key pair ({exc})") from None
    if not secret:
        raise _keyerror(path, "holds only a public key; pass the .key_secret file")
    return public, secret


def load_public(path: str) -> bytes:
    """The z85 public key in ``path`` (a ``.key`` or ``.key_secret`` file)."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise _keyerror(path, f"cannot read a public key ({exc})") from None
    return public


def load_publics(spec: str) -> dict[bytes, str]:
    """Public keys named by ``spec``: a folder of ``*.key`` files or comma-separated files.

    Returns ``{z85 key: file name}``.
    """
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.key")))
            if not found:
                raise _keyerror(part, "holds no *.key public key files")
            paths.extend(found)
        else:
            paths.append(part)
    if not paths:
        raise InvalidArgumentError(f"no public key files in {spec!r}")
    return {load_public(p): os.path.basename(p) for p in paths}


class _Authenticator(ThreadAuthenticator):
    """ZAP handler that accepts known client keys and logs every refusal."""

    def __init__(self, context: zmq.Context, allowed: dict[bytes, str]) -> None:
        super().__init__(context, log=logging.getLogger("xdl.security.zap"))
        self.allowed = allowed
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        """Credentials provider hook of pyzmq: whether the z85 ``key`` may connect."""
        name = self.allowed.get(key)
        if name is None:
            self.refused += 1
            log.warning("refused a client with unknown CURVE key %s (ZAP domain %s): add its "
                        "public key to the shard's --curve-clients to allow it",
                        key.decode("ascii", "replace"), domain)
            return False
        log.debug("accepted client key %s (%s)", key.decode("ascii", "replace"), name)
        return True


@dataclass
class ServerSecurity:
    """A shard's CURVE settings: its key pair, the allowed client keys, the admin keys.

    :param public: the shard's z85 public key.
    :param secret: the shard's z85 secret key.
    :param clients: allowed client keys, ``{z85 key: name}``.
    :param admins: keys allowed to send :data:`ADMIN_COMMANDS` (empty: every client).
    """

    public: bytes
    secret: bytes
    clients: dict[bytes, str]
    admins: dict[bytes, str] = field(default_factory=dict)
    _auth: _Authenticator | None = None

    @classmethod
    def from_options(cls, secret: str | None = None, clients: str | None = None,
                     admins: str | None = None) -> ServerSecurity | None:
        """Settings from command-line values, falling back to the shard-side variables.

        Returns None when no key is configured (plain TCP). Admin keys are allowed
        clients too.
        """
        secret = secret or os.environ.get(ENV_SERVER_SECRET) or None
        clients = clients or os.environ.get(ENV_CLIENTS) or None
        admins = admins or os.environ.get(ENV_ADMINS) or None
        if not secret and not clients and not admins:
            return None
        if not secret or not (clients or admins):
            raise InvalidArgumentError(
                "CURVE needs both the shard's secret key (--curve-secret or "
                f"{ENV_SERVER_SECRET}) and the allowed client keys (--curve-clients or "
                f"{ENV_CLIENTS})")
        public, sec = load_secret(secret)
        admin_keys = load_publics(admins) if admins else {}
        allowed = {**(load_publics(clients) if clients else {}), **admin_keys}
        return cls(public, sec, allowed, admin_keys)

    def secure(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Start the authenticator on ``ctx`` and make ``sock`` a CURVE server (before bind)."""
        if self._auth is None:
            self._auth = _Authenticator(ctx, self.clients)
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._auth)
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        """Stop the authenticator thread."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def refusal(self, frames: Sequence[Any]) -> list[Any] | None:
        """An error reply if ``frames`` hold an admin command from a non-admin key, else None.

        The key comes from the ``User-Id`` ZeroMQ sets on every frame of an
        authenticated message.
        """
        if not self.admins or len(frames) < 2:
            return None
        command = bytes(memoryview(getattr(frames[1], "buffer", frames[1]))[:32])
        if command not in ADMIN_COMMANDS:
            return None
        user = _user_id(frames[1])
        if user is not None and user.encode() in self.admins:
            return None
        name = self.clients.get(user.encode(), "?") if user else "?"
        log.warning("refused %s from client key %s (%s): not an admin key",
                    command.decode("ascii", "replace"), user, name)
        seq = -1
        try:
            _, header, _ = codec.decode(frames)
            seq = header.get("seq", -1) if isinstance(header.get("seq"), int) else -1
        except Exception:  # an undecodable admin request is refused all the same
            pass
        exc = PermissionDeniedError(
            f"{command.decode('ascii', 'replace')} needs an admin key; this client's key "
            f"({name}) is not among the shard's --curve-admins")
        return codec.encode(command, {"ok": False, "seq": seq, "code": exc.code,
                                      "message": str(exc), "table": None})


def _user_id(frame: Any) -> str | None:
    try:
        value = frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE settings: its own key pair and the shards' public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_options(cls, secret: str | None = None, server_key: str | None = None
                     ) -> ClientKeys | None:
        """Keys from :func:`xdl.connect` arguments, falling back to the client-side variables.

        Returns None when neither is configured (plain TCP).
        """
        secret = secret or os.environ.get(ENV_CLIENT_SECRET) or None
        server_key = server_key or os.environ.get(ENV_SERVER_KEY) or None
        if not secret and not server_key:
            return None
        if not secret or not server_key:
            raise InvalidArgumentError(
                "CURVE needs both this client's secret key (curve_secret= or "
                f"{ENV_CLIENT_SECRET}) and the shards' public key (curve_server_key= or "
                f"{ENV_SERVER_KEY})")
        public, sec = load_secret(secret)
        return cls(public, sec, load_public(server_key))

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the shards (before connect)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server


def is_loopback(endpoint: str) -> bool:
    """Whether a ``tcp://host:port`` endpoint (or ``ipc://``/``inproc://``) stays on this host."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host in ("localhost", ""):
        return host == "localhost"
    if host == "*":
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(_socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def warn_if_exposed(endpoint: str, security: ServerSecurity | None) -> bool:
    """Log a warning when a shard binds beyond loopback without CURVE; return whether it did."""
    if security is not None or is_loopback(endpoint):
        return False
    log.warning("shard binds %s without CURVE: any process that can reach it may read, "
                "change or wipe every table, save over checkpoints or shut it down. Run "
                "`xdl keys generate` and pass --curve-secret / --curve-clients (see the "
                "README, 'Running a secured cluster')", endpoint)
    return True
