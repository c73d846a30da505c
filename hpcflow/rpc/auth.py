"""CURVE keys, the ZAP authenticator and roles: who may talk to a node, and as what.

A cluster has two CURVE keypairs, made by ``hpcflow keygen KEYDIR``
(pyzmq's :func:`zmq.auth.create_certificates`):

* ``node.key`` / ``node.key_secret`` -- shared by every node.  Every socket a
  node binds (RPC ROUTER, catalog PUB, bulk ROUTER) is a CURVE server with
  it, and every socket a node connects (RPC DEALER to a peer, catalog SUB,
  bulk DEALER) presents it as its client key;
* ``client.key`` / ``client.key_secret`` -- what scripts and the CLI present.

A node needs ``node.key_secret`` and ``client.key``; a client needs
``client.key_secret`` and ``node.key`` (the server key it checks nodes
against).  Secret key files must not be readable or writable by others
(:class:`~hpcflow.errors.ConfigError` naming the path otherwise).

Each node serves ZAP (ZeroMQ's authentication protocol) itself: one inproc REP
socket in the node's context, owned by one greenlet (pyzmq's
``ThreadAuthenticator`` does not fit a gevent loop).  It accepts the node key
as role ``node`` and the client key as role ``client`` (the ZAP User-Id,
which every received message carries: :func:`role_of`), and refuses
anything else, so the handshake fails and nothing is delivered.  Without
keys nothing here runs: sockets use the NULL mechanism as before, so stock
zerorpc and plain pyzmq clients still talk to the node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import zmq
import zmq.auth
import zmq.green as zmqg
from zmq.utils import z85

from ..errors import AuthenticationError, ConfigError
from ..logutil import Throttled

log = logging.getLogger("hpcflow.auth")

NODE = "node"
CLIENT = "client"
ROLES = (NODE, CLIENT)
#: Where libzmq looks for a context's ZAP handler.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Socket types that bind in hpcflow (CURVE servers) and that connect (CURVE clients).
SERVER_TYPES = frozenset({zmq.ROUTER, zmq.PUB, zmq.XPUB})
CLIENT_TYPES = frozenset({zmq.DEALER, zmq.SUB, zmq.XSUB})
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
#: Environment variable naming a key directory when no ``--keys`` / ``keys=`` is given.
KEYS_ENV = "HPCFLOW_KEYS"


def _key_file(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys from ``directory/name.key[_secret]``, checked."""
    path = directory / (f"{name}.key_secret" if secret else f"{name}.key")
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"key file {path} is missing or unreadable: {exc.strerror}; "
                          "make a cluster's keys with `hpcflow keygen KEYDIR`") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"key file {path} is not a regular file")
    if secret and st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(f"secret key file {path} is accessible to other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o}): chmod 600 {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"key file {path} cannot be read: {exc}") from None
    for what, key in (("public", public), ("secret", secret_key)):
        if key is None:
            if secret:
                raise ConfigError(f"key file {path} holds no secret key")
            continue
        try:
            ok = len(z85.decode(key)) == 32
        except (ValueError, KeyError, IndexError):
            ok = False
        if not ok:
            raise ConfigError(f"key file {path}: the {what} key is not a CURVE key (40 Z85 "
                              "characters)")
    return public, secret_key


@dataclass(frozen=True)
class Keys:
    """The keys one process uses: its own keypair, the nodes' public key, and (on a
    node) the client public key it admits."""

    directory: Path
    role: str
    public: bytes
    secret: bytes
    server: bytes
    client: bytes | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike[str], role: str) -> Keys:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, not {role!r}")
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise ConfigError(f"key directory {d} does not exist or is not a directory; make "
                              "one with `hpcflow keygen KEYDIR`")
        public, secret = _key_file(d, role, secret=True)
        assert secret is not None
        if role == NODE:
            return cls(d, role, public, secret, public, _key_file(d, CLIENT, secret=False)[0])
        return cls(d, role, public, secret, _key_file(d, NODE, secret=False)[0])

    def secure(self, sock: Any, socket_type: int) -> None:
        """Make ``sock`` a CURVE server (types that bind) or client (types that connect)."""
        if socket_type in SERVER_TYPES:
            if self.role != NODE:
                return  # a client binds nothing; leave it NULL rather than half-secured
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_server = True
            sock.zap_domain = b"hpcflow"
        elif socket_type in CLIENT_TYPES:
            sock.curve_secretkey = self.secret
            sock.curve_publickey = self.public
            sock.curve_serverkey = self.server


def resolve(keys: str | os.PathLike[str] | None) -> Path | None:
    """The key directory to use: ``keys`` if given, else ``$HPCFLOW_KEYS``, else None."""
    if keys is None or keys == "":
        keys = os.environ.get(KEYS_ENV) or None
    return Path(keys).expanduser() if keys is not None else None


def load(keys: str | os.PathLike[str] | Keys | None, role: str) -> Keys | None:
    """:class:`Keys` for ``role`` from a directory (or ``$HPCFLOW_KEYS``), or None."""
    if isinstance(keys, Keys):
        return keys
    d = resolve(keys)
    return None if d is None else Keys.load(d, role)


def keygen(directory: str | os.PathLike[str]) -> list[Path]:
    """Write a new cluster's node and client keypairs into ``directory`` (made 0700 if
    new; refused if it already holds keys).  Secret files are mode 0600."""
    d = Path(directory).expanduser()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create key directory {d}: {exc.strerror}") from None
    existing = [p for r in ROLES for p in (d / f"{r}.key", d / f"{r}.key_secret") if p.exists()]
    if existing:
        raise ConfigError(f"{d} already holds keys ({existing[0].name}); not overwriting a "
                          "cluster's keys: remove them or choose another directory")
    old = os.umask(0o077)  # no moment where a secret file is readable by others
    try:
        written = []
        for role in ROLES:
            public, secret = zmq.auth.create_certificates(d, role)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            written += [Path(public), Path(secret)]
    except OSError as exc:
        raise ConfigError(f"cannot write keys into {d}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return written


#: Seconds a zmq.green socket waits for its descriptor before it checks its events
#: anyway.  zmq.green's own 11.6 s is a guard against a missed edge of libzmq's
#: edge-triggered descriptor; our sends and receives check the events after every
#: operation (:mod:`.greenio`), as zmq.green's do.  With ~80 sockets in a node of a
#: large cluster (streams, RPC clients and their monitors) the guard's timeouts were
#: several wake-ups a second of an idle node.  Still a guard: a missed edge costs at
#: most this long (30 s, not 120: checking the events after an EAGAIN as well, to
#: miss fewer, consumed the edge its own wait then needed and stalled a server).
IDLE_POLL_S = 30.0


class GreenContext(zmqg.Context):
    """A zmq.green context whose sockets wait ``IDLE_POLL_S`` before polling."""

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(socket_type, *args, **kwargs)
        sock._gevent_bug_timeout = IDLE_POLL_S  # zmq.green's attribute (see above)
        return sock


class SecureContext(GreenContext):
    """A zmq.green context whose sockets are secured with ``keys`` as they are made
    (servers for the types hpcflow binds, clients for those it connects), so every
    part of a node (RPC, catalog, bulk) is covered without knowing about keys."""

    hpcflow_keys: Keys | None = None

    def socket(self, socket_type: int, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(socket_type, *args, **kwargs)
        if self.hpcflow_keys is not None:
            self.hpcflow_keys.secure(sock, socket_type)
        return sock


#: ZeroMQ sockets one context may hold (libzmq's default is 1023).  A node holds about
#: four per member (its stream's SUB; an RPC client's DEALER, plus the PAIR its handshake
#: watch reads and the PAIR libzmq monitors it with), so the default stopped a node at
#: about 250 members: ``zmq_socket`` fails with EMFILE ("Too many open files").
MAX_SOCKETS = 8192


def context(keys: Keys | None) -> Any:
    """A new zmq.green context; with keys, one that secures its sockets."""
    ctx = GreenContext() if keys is None else SecureContext()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    if keys is not None:
        ctx.hpcflow_keys = keys
    return ctx


class ZapHandler:
    """ZAP for one node's context: the node key is ``node``, the client key ``client``,
    anything else (another key, no CURVE at all) is refused."""

    def __init__(self, ctx: Any, keys: Keys) -> None:
        self.keys = {z85.decode(keys.public): NODE}
        if keys.client is not None:
            self.keys[z85.decode(keys.client)] = CLIENT
        self.refused = 0
        self._log = Throttled(log)  # a refused client retries every 100 ms
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._serve)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
        self._sock.close(linger=0)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request (RFC 27)."""
        if len(frames) < 6:
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400",
                    b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        creds = frames[6:]
        role = self.keys.get(creds[0]) if mechanism == b"CURVE" and creds else None
        if role is None:
            self.refused += 1
            self._log.warning("refused a connection from %s: %s",
                              address.decode(errors="replace"),
                              "unknown CURVE key" if mechanism == b"CURVE"
                              else f"mechanism {mechanism.decode(errors='replace')}")
            return [version, request_id, b"400", b"unknown key", b"", b""]
        return [version, request_id, b"200", b"OK", role.encode(), b""]

    def _serve(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            self._sock.send_multipart(self.answer(frames))


def role_of(frame: Any) -> str | None:
    """The role ZAP gave the sender of a received frame (None without keys)."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return user if user in ROLES else None


def monitor_event(frames: list[bytes]) -> int:
    """The event number of a libzmq socket-monitor message (16-bit event, 32-bit value,
    then the endpoint).  pyzmq's ``zmq.utils.monitor`` decodes the same, but importing it
    imports ``zmq.asyncio`` and so asyncio: about 6 MB more in every daemon and script."""
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError(f"not a socket-monitor message: {len(frames)} frames")
    return int(struct.unpack("=Hi", frames[0])[0])


class HandshakeWatch:
    """Watches a connecting socket's handshakes: ``error`` is an
    :class:`AuthenticationError` while the last handshake failed (the peer refused
    our keys or we refused its), None once one succeeds.  ``on_fail`` is called with
    the error, so waiting calls fail at once instead of timing out.  ``connected``: a
    handshake succeeded and the connection has not dropped since (a peer that exits
    drops it at once, so a call through a connected socket needs no check that
    something still listens there)."""

    def __init__(self, sock: Any, endpoint: str,
                 on_fail: Callable[[AuthenticationError], None]) -> None:
        self.sock, self.endpoint, self.on_fail = sock, endpoint, on_fail
        self.error: AuthenticationError | None = None
        self.connected = False
        self._mon = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                            | zmq.EVENT_DISCONNECTED)
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            try:
                event = monitor_event(self._mon.recv_multipart())
            except ValueError:
                continue  # (libzmq's own frames: not expected)
            except zmq.ZMQError:
                self.connected = False
                return
            if event == zmq.EVENT_DISCONNECTED:
                self.connected = False
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.error, self.connected = None, True
            elif event & HANDSHAKE_FAILED:
                self.connected = False
                why = ("it refused our key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                       else "the security handshake failed")
                self.error = AuthenticationError(
                    f"{self.endpoint}: {why}: client and node must use the same cluster's "
                    "keys (--keys / keys= / $HPCFLOW_KEYS), or neither")
                self.on_fail(self.error)

    def close(self) -> None:
        self._greenlet.kill(block=False)
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._mon.close(linger=0)


__all__ = ["CLIENT", "KEYS_ENV", "MAX_SOCKETS", "NODE", "HandshakeWatch", "Keys",
           "SecureContext", "ZapHandler", "context", "keygen", "load", "resolve", "role_of"]
