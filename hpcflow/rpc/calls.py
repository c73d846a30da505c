"""RPC clients at the boundary: one per peer, calls, and fast refusal.

The clients are :class:`~hpcflow.rpc.strict.Client` (the zerorpc protocol);
they raise hpcflow errors: the peer's own error class by name, or
:class:`~hpcflow.errors.PeerUnavailable` for a timeout or a lost peer.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent.socket

from ..errors import AuthenticationError, PeerUnavailable
from . import strict

#: Peer clients kept between calls (see :class:`PeerClients`), and for how long unused.
MAX_IDLE_CLIENTS = 32
IDLE_CLIENT_S = 60.0


def refuses_connections(endpoint: str, timeout_s: float = 2.0) -> bool:
    """True when nothing listens at ``endpoint`` (connection refused, no such socket).

    ZeroMQ would keep retrying a dead endpoint until a call times out; a plain
    connect (cooperative: gevent's socket) tells at once.  A slow or filtered
    host is not "refused": let the caller's timeout decide.
    """
    try:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            host = host.strip("[]")
            family = _numeric_family(host)
            if family is None:
                conn = gevent.socket.create_connection((host, int(port)), timeout=timeout_s)
            else:
                conn = _connect(family, (host, int(port)), timeout_s)
        elif endpoint.startswith("ipc://"):
            conn = _connect(gevent.socket.AF_UNIX, endpoint[len("ipc://"):], timeout_s)
        else:
            return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except (OSError, ValueError):
        return False
    conn.close()
    return False


def _numeric_family(host: str) -> int | None:
    """The address family of a numeric IP address, None for a host name.  A name takes
    gevent's resolver, which runs ``getaddrinfo`` on a thread of the hub's pool: for a
    numeric address (every member's endpoint on loopback, and usually on a cluster) that
    was a thread and a cross-thread wake-up for each liveness probe."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):
            continue
    return None


def _connect(family: int, address: Any, timeout_s: float) -> gevent.socket.socket:
    conn = gevent.socket.socket(family, gevent.socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        conn.connect(address)
    except BaseException:
        conn.close()
        raise
    return conn


def new_client(endpoint: str, timeout_s: float, heartbeat_s: float | None = 5.0,
               context: Any = None) -> strict.Client:
    """A client of ``endpoint``; ``context`` (see ``auth.context``) carries the keys."""
    client = strict.Client(timeout=timeout_s, heartbeat=heartbeat_s, context=context)
    client.connect(endpoint)
    return client


class PeerClients:
    """Clients of peer endpoints, reused; dropped after a failure.  At most
    ``max_idle`` are kept between calls (least recently used go first), and none unused
    for ``idle_s`` (closed at the next call): a node of a large cluster probes and
    verifies every member now and then, and a client kept per member (its socket,
    connection, monitor and greenlets on both sides) cost about 0.4 MB per member.
    Each kept client also has two sockets waiting, each woken by zmq.green's guard
    poll (``auth.IDLE_POLL_S``): 32 of them were a third of an idle node's wake-ups."""

    def __init__(self, timeout_s: float, heartbeat_s: float = 5.0, context: Any = None,
                 max_idle: int = MAX_IDLE_CLIENTS, idle_s: float = IDLE_CLIENT_S) -> None:
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.context = context
        self.max_idle, self.idle_s = max_idle, idle_s
        self._clients: dict[str, strict.Client] = {}  # least recently used first
        self._used: dict[str, float] = {}  # when each last ended a call
        self._busy: dict[str, int] = {}

    def connected(self, endpoint: str) -> bool:
        """Whether a kept client of ``endpoint`` has its connection up."""
        client = self._clients.get(endpoint)
        return client is not None and client.connected

    def call(self, endpoint: str, method: str, *args: Any,
             timeout_s: float | None = None) -> Any:
        client = self._clients.pop(endpoint, None)
        if client is None:
            client = new_client(endpoint, self.timeout_s, self.heartbeat_s, self.context)
        self._clients[endpoint] = client  # now the most recently used
        self._busy[endpoint] = self._busy.get(endpoint, 0) + 1
        try:
            return client.call(method, *args, timeout=timeout_s)
        except (PeerUnavailable, AuthenticationError):
            if self._clients.get(endpoint) is client:
                del self._clients[endpoint]
            client.close()
            raise
        finally:
            left = self._busy.pop(endpoint) - 1
            if left:
                self._busy[endpoint] = left
            if endpoint in self._clients:  # most recently used is last, by when calls end
                self._clients[endpoint] = self._clients.pop(endpoint)
                self._used[endpoint] = time.monotonic()
            else:
                self._used.pop(endpoint, None)
            self._trim()

    def _trim(self) -> None:
        """Close the least recently used clients beyond ``max_idle``, and those unused
        for ``idle_s`` (none in a call)."""
        extra = len(self._clients) - self.max_idle
        stale = time.monotonic() - self.idle_s
        for endpoint in list(self._clients):
            if endpoint in self._busy:
                continue
            if extra > 0 or self._used.get(endpoint, 0.0) < stale:
                self._clients.pop(endpoint).close()
                self._used.pop(endpoint, None)
                extra -= 1
            else:
                return  # the rest were used later

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        self._used.clear()
