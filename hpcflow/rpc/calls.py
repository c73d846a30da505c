"""zerorpc at the boundary: clients, calls, and error translation.

zerorpc raises its own exception types (``RemoteError`` carrying the remote
class name, ``LostRemote``, ``TimeoutExpired``); here they become the
hpcflow error the peer raised, or :class:`~hpcflow.errors.PeerUnavailable`.
"""

from __future__ import annotations

import logging
from typing import Any

import gevent.socket
import zerorpc
import zerorpc.exceptions

from ..errors import PeerUnavailable, from_wire
from . import strict

# zerorpc logs every exception a handler raises with a traceback, including
# expected ones like DatasetNotFound; the service logs what matters itself.
logging.getLogger("zerorpc.core").setLevel(logging.CRITICAL)
logging.getLogger("zerorpc.channel").setLevel(logging.CRITICAL)
# zerorpc's own gevent/zmq glue logs "/!\ gevent_zeromq BUG /!\ catching up after missing
# event" at ERROR when it recovers from a missed wake-up; it is harmless and alarming.
logging.getLogger("zerorpc.gevent_zmq").setLevel(logging.CRITICAL)


def refuses_connections(endpoint: str, timeout_s: float = 2.0) -> bool:
    """True when nothing listens at ``endpoint`` (connection refused, no such socket).

    ZeroMQ would keep retrying a dead endpoint until a call times out; a plain
    connect (cooperative: gevent's socket) tells at once.  A slow or filtered
    host is not "refused": let the caller's timeout decide.
    """
    try:
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            conn = gevent.socket.create_connection((host.strip("[]"), int(port)),
                                                   timeout=timeout_s)
        elif endpoint.startswith("ipc://"):
            conn = gevent.socket.socket(gevent.socket.AF_UNIX, gevent.socket.SOCK_STREAM)
            conn.settimeout(timeout_s)
            try:
                conn.connect(endpoint[len("ipc://"):])
            except BaseException:
                conn.close()
                raise
        else:
            return False
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except (OSError, ValueError):
        return False
    conn.close()
    return False


def new_client(endpoint: str, timeout_s: float, heartbeat_s: float | None = 5.0) -> Any:
    client = strict.Client(timeout=timeout_s, heartbeat=heartbeat_s)
    client.connect(endpoint)
    return client


def call(client: Any, endpoint: str, method: str, *args: Any,
         timeout_s: float | None = None) -> Any:
    """Call ``method`` and translate zerorpc's exceptions into hpcflow's."""
    try:
        if timeout_s is not None:
            return getattr(client, method)(*args, timeout=timeout_s)
        return getattr(client, method)(*args)
    except zerorpc.exceptions.RemoteError as exc:
        raise from_wire(exc.name, exc.msg) from None
    except (zerorpc.exceptions.LostRemote, zerorpc.exceptions.TimeoutExpired) as exc:
        raise PeerUnavailable(f"no answer from {endpoint} to {method}: {exc}") from None


class PeerClients:
    """One zerorpc client per peer endpoint, reused; dropped after a failure."""

    def __init__(self, timeout_s: float, heartbeat_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self._clients: dict[str, Any] = {}

    def call(self, endpoint: str, method: str, *args: Any,
             timeout_s: float | None = None) -> Any:
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = new_client(endpoint, self.timeout_s,
                                                          self.heartbeat_s)
        try:
            return call(client, endpoint, method, *args, timeout_s=timeout_s)
        except PeerUnavailable:
            self._clients.pop(endpoint, None)
            client.close()
            raise

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
