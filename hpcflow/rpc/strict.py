"""zerorpc with a strict wire: no event a peer sends can stop a server answering.

zerorpc 0.6.3 is a stack of small layers (events -> channel multiplexer ->
heartbeat -> buffered channel -> patterns).  Its multiplexer trusts the peer:
one greenlet routes every incoming event, and

* a header field of an unexpected type (``response_to`` set to a map) raises
  inside that greenlet and ends it: the server answers no one again while the
  process lives (the node keeps heartbeating on its catalog socket, so peers
  keep planning on it);
* routing ``put``s into a one-slot queue and blocks until the channel reads
  it: a client that sends a few events on its own long-running call (or on
  someone else's, since channels are keyed by the *client-chosen* message id
  alone) stalls the dispatcher, and with it every call;
* reply events (``OK``, ``ERR``, heartbeats) sent to a server as if they were
  requests each hold a channel open until its heartbeat gives up.

This module replaces the multiplexer layer and leaves the layers above it as
zerorpc ships them.  :func:`decode` turns frames into an event or raises
:class:`Malformed`; it is pure and checks the whole grammar below.  The
:class:`Multiplexer` owns the socket's receiving side: it decodes, routes by
(connection, message id), admits on an open channel only the events that may
follow there, never blocks on a slow channel, and bounds the requests in
flight per connection and in total, answering an over-limit request at once
with an :class:`~hpcflow.errors.Overloaded` error.  Whatever it refuses is
dropped, counted in :attr:`Multiplexer.dropped` and logged at most once per
interval, never raised.

The accepted wire (zerorpc protocol v1-v3, as the Python and Node.js clients
send it)::

    frames   ROUTER side: identity+ [b""] blob (the delimiter is required when
             more than one identity frame precedes the blob); DEALER side:
             [b""] blob
    blob     one msgpack array [header, name, args], nothing after it
    header   map; message_id: str|bytes (1..128); v: int (optional);
             response_to: str|bytes (1..128, optional); other keys ignored
    name     str (1..256)
    args     array (STREAM_DONE: nil); _zpc_more: [int >= 0, ...];
             ERR: [name, message, traceback] (v >= 2) or [message] (v1)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.queue
import msgpack
import zerorpc
import zerorpc.channel
import zerorpc.events
import zmq

from ..errors import ProtocolError

log = logging.getLogger("hpcflow.rpc")

#: Events only a server sends: never a request, and never sent on a server's channel.
REPLY_NAMES = frozenset({"OK", "ERR", "STREAM", "STREAM_DONE"})
#: Channel control events; the only ones a client may send on an open call.
CONTROL_NAMES = frozenset({"_zpc_hb", "_zpc_more"})
TERMINAL_NAMES = frozenset({"OK", "ERR", "STREAM_DONE"})
MAX_ID = 128
MAX_NAME = 256
MAX_IDENTITY_FRAMES = 8
#: Events queued on one channel before further ones are dropped.  A well-behaved
#: peer never has more than a handful outstanding (zerorpc's flow control).
CHANNEL_QUEUE = 64


class Malformed(ProtocolError):
    """Frames that are not a well-formed zerorpc event (the reason is the message)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one server holds for its peers."""

    #: Requests being served at once for one connection (one client socket).
    per_connection: int = 256
    #: Requests being served at once in total.
    total: int = 4096
    #: Largest message accepted; a larger one closes the sender's connection (libzmq).
    max_message_bytes: int = 80 * 1024 * 1024
    #: At most one warning per reason per this many seconds.
    log_every_s: float = 10.0


def _check_id(value: Any, field: str) -> None:
    if not isinstance(value, str | bytes):
        raise Malformed(f"header {field} is {type(value).__name__}, not str or bytes")
    if not 1 <= len(value) <= MAX_ID:
        raise Malformed(f"header {field} has length {len(value)}, not 1..{MAX_ID}")


def decode(parts: Sequence[Any], *, router: bool) -> zerorpc.events.Event:
    """The event carried by ``parts`` (zmq frames or bytes), with its identity set.

    Raises :class:`Malformed` for anything outside the grammar in this module's
    docstring; never anything else.
    """
    if not parts:
        raise Malformed("no frames")
    if router:
        if len(parts) < 2:
            raise Malformed("no identity frame")
        if len(parts) > 2 and len(_frame_bytes(parts[-2])) != 0:
            raise Malformed("no empty delimiter frame before the event")
        identity = list(parts[:-2] if len(parts) > 2 else parts[:1])
        if len(identity) > MAX_IDENTITY_FRAMES:
            raise Malformed(f"{len(identity)} identity frames")
    else:
        if len(parts) > 2 or (len(parts) == 2 and len(_frame_bytes(parts[0])) != 0):
            raise Malformed(f"{len(parts)} frames where [delimiter] event was expected")
        identity = list(parts[:-1])
    blob = parts[-1]
    try:
        msg = msgpack.unpackb(getattr(blob, "buffer", blob), raw=False)
    except Exception as exc:  # msgpack raises several types, all meaning "not msgpack"
        raise Malformed(f"not one msgpack value: {type(exc).__name__}: {exc}") from None
    if not isinstance(msg, list) or len(msg) != 3:
        raise Malformed(f"event is {type(msg).__name__}, not [header, name, args]")
    header, name, args = msg
    if not isinstance(header, dict):
        raise Malformed(f"header is {type(header).__name__}, not a map")
    if "message_id" not in header:
        raise Malformed("header has no message_id")
    _check_id(header["message_id"], "message_id")
    if "response_to" in header:
        _check_id(header["response_to"], "response_to")
    if "v" in header and (not isinstance(header["v"], int) or isinstance(header["v"], bool)):
        raise Malformed(f"header v is {type(header['v']).__name__}, not int")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        raise Malformed(f"name is not a str of 1..{MAX_NAME} characters")
    if name == "STREAM_DONE" and args is None:
        args = []
    if not isinstance(args, list):
        raise Malformed(f"args of {name} is {type(args).__name__}, not an array")
    if name == "_zpc_more" and (not args or not isinstance(args[0], int) or args[0] < 0):
        raise Malformed("_zpc_more without a slot count")
    if name == "ERR":
        want = 3 if header.get("v", 1) >= 2 else 1
        if len(args) != want or not all(isinstance(a, str | None) for a in args):
            raise Malformed(f"ERR args are not {want} strings")
    if name == "OK" and not args:
        raise Malformed("OK without a result")
    event = zerorpc.events.Event(name, args, None, header)
    event.identity = identity
    return event


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def _peer_address(parts: Sequence[Any]) -> str:
    try:
        return str(parts[-1].get("Peer-Address"))
    except Exception:  # not a frame, or a transport without addresses (ipc)
        return "?"


class _Channel(zerorpc.channel.Channel):
    """zerorpc's channel, keyed in its multiplexer by (connection, message id) on the
    server side, with a bounded queue the multiplexer fills without blocking."""

    def __init__(self, multiplexer: Multiplexer, key: Any = None,
                 first: zerorpc.events.Event | None = None) -> None:
        self._multiplexer = multiplexer
        self._queue = gevent.queue.Queue(maxsize=CHANNEL_QUEUE)
        self._channel_id = None
        self._zmqid = None
        self.key = key
        self.finished = False
        if first is not None:
            self._channel_id = first.header["message_id"]
            self._zmqid = first.identity
            self._queue.put_nowait(first)

    def new_event(self, name: str, args: Any, xheader: Any = None) -> Any:
        event = self._multiplexer.new_event(name, args, xheader)
        if self._channel_id is None:  # a client's call: its request's id names the channel
            self._channel_id = event.header["message_id"]
            self.key = self._channel_id
            self._multiplexer.register(self)
        else:
            event.header["response_to"] = self._channel_id
        event.identity = self._zmqid
        return event

    def close(self) -> None:
        if self.key is not None:
            self._multiplexer.unregister(self)
            self.key = None
            self._channel_id = None


class Multiplexer(zerorpc.channel.ChannelMultiplexer):
    """The channel layer of a :class:`Server` (``serve=True``) or a :class:`Client`.

    One greenlet owns the socket's receiving side (zerorpc's ``Receiver`` below
    it); it survives every event, see the module docstring.
    """

    def __init__(self, events: zerorpc.events.Events, *, serve: bool,
                 limits: Limits = Limits()) -> None:
        self._events = events
        self._serve = serve
        self.limits = limits
        self._active_channels: dict[Any, _Channel] = {}
        self._per_connection: Counter[tuple[bytes, ...]] = Counter()
        self._requests: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self._broadcast_queue = self._requests if serve else None
        self.dropped: Counter[str] = Counter()
        self.overloaded = 0
        self._last_warned: dict[str, float] = {}
        self._channel_dispatcher_task = (gevent.spawn(self._channel_dispatcher) if serve
                                         else None)

    # -- zerorpc's multiplexer interface --------------------------------------------
    def recv(self, timeout: float | None = None) -> Any:
        """The next new request (server side)."""
        return self._requests.get(timeout=timeout)

    def channel(self, from_event: Any = None) -> _Channel:
        if self._channel_dispatcher_task is None:
            self._channel_dispatcher_task = gevent.spawn(self._channel_dispatcher)
        if from_event is None:
            return _Channel(self)
        # The dispatcher opened the request's channel when it admitted the request.
        return self._active_channels[(self._conn(from_event.identity),
                                      from_event.header["message_id"])]

    def close(self) -> None:
        if self._channel_dispatcher_task is not None:
            self._channel_dispatcher_task.kill()
            self._channel_dispatcher_task = None

    def stats(self) -> dict[str, Any]:
        """Requests in flight, refused over the limits, and events dropped by reason."""
        return {"in_flight": len(self._active_channels), "overloaded": self.overloaded,
                "dropped": dict(self.dropped)}

    # -- bookkeeping for channels ----------------------------------------------------
    def register(self, channel: _Channel) -> None:
        self._active_channels[channel.key] = channel

    def unregister(self, channel: _Channel) -> None:
        if self._active_channels.get(channel.key) is channel:
            del self._active_channels[channel.key]
            if self._serve:
                conn = channel.key[0]
                self._per_connection[conn] -= 1
                if self._per_connection[conn] <= 0:
                    del self._per_connection[conn]

    @staticmethod
    def _conn(identity: Any) -> tuple[bytes, ...]:
        return tuple(_frame_bytes(f) for f in identity or ())

    # -- the dispatcher --------------------------------------------------------------
    def _channel_dispatcher(self) -> None:
        receive = self._events._recv  # zerorpc's Receiver: raw frames, one greenlet below us
        while True:
            try:
                parts = receive()
            except (gevent.GreenletExit, zmq.ContextTerminated):
                raise
            except Exception as exc:  # the socket is closing, or a bug in the layer below
                self._drop("recv", f"{type(exc).__name__}: {exc}", "?")
                gevent.sleep(0.01)
                continue
            try:
                self._route(parts)
            except Malformed as exc:
                self._drop("malformed", str(exc), _peer_address(parts))
            except Exception as exc:  # never let one event end the dispatcher
                log.exception("rpc: unexpected error routing an event")
                self._drop("error", f"{type(exc).__name__}: {exc}", _peer_address(parts))

    def _route(self, parts: Sequence[Any]) -> None:
        event = decode(parts, router=self._serve)
        header, name = event.header, event.name
        if self._serve:
            conn = self._conn(event.identity)
            if "response_to" not in header:
                self._admit(conn, event, parts)
                return
            channel = self._active_channels.get((conn, header["response_to"]))
            if channel is None:
                self.dropped["unrouted"] += 1  # e.g. a heartbeat just after the reply
                return
            if name not in CONTROL_NAMES:
                raise Malformed(f"{name} sent on an open call (only heartbeats may follow)")
        else:
            if "response_to" not in header:
                raise Malformed(f"{name} is not a reply")
            if name not in REPLY_NAMES | CONTROL_NAMES:
                raise Malformed(f"{name} is not a reply event")
            channel = self._active_channels.get(header["response_to"])
            if channel is None:
                self.dropped["unrouted"] += 1
                return
            if channel.finished and name not in CONTROL_NAMES:
                raise Malformed(f"{name} after the call's final reply")
            channel.finished = name in TERMINAL_NAMES
        try:
            channel._queue.put_nowait(event)
        except gevent.queue.Full:
            self._drop("overflow", f"{name} on a channel that is not reading",
                       _peer_address(parts))

    def _admit(self, conn: tuple[bytes, ...], event: Any, parts: Sequence[Any]) -> None:
        name, msgid = event.name, event.header["message_id"]
        if name in REPLY_NAMES or name in CONTROL_NAMES:
            raise Malformed(f"{name} sent to a server as a request")
        key = (conn, msgid)
        if key in self._active_channels:
            raise Malformed(f"request id {msgid!r} is already in use on this connection")
        lim = self.limits
        if (self._per_connection[conn] >= lim.per_connection
                or len(self._active_channels) >= lim.total):
            self.overloaded += 1
            self._refuse(event, f"the node is serving {len(self._active_channels)} requests "
                         f"({self._per_connection[conn]} for this connection; limits "
                         f"{lim.per_connection} and {lim.total}): retry later")
            self._warn("overloaded", "refusing requests over the limit", _peer_address(parts))
            return
        self._per_connection[conn] += 1
        self.register(_Channel(self, key, event))
        self._requests.put(event)

    def _refuse(self, request: Any, message: str) -> None:
        v2 = request.header.get("v", 1) >= 2
        reply = self._events.new_event("ERR", ["Overloaded", message, None] if v2
                                       else [f"Overloaded: {message}"])
        reply.header["response_to"] = request.header["message_id"]
        reply.identity = request.identity
        self._events.emit_event(reply)

    def _drop(self, reason: str, detail: str, peer: str) -> None:
        self.dropped[reason] += 1
        self._warn(reason, detail, peer)

    def _warn(self, reason: str, detail: str, peer: str) -> None:
        now = time.monotonic()
        if now - self._last_warned.get(reason, float("-inf")) >= self.limits.log_every_s:
            self._last_warned[reason] = now
            log.warning("rpc: dropped an event from %s (%s: %s); %d so far, further ones "
                        "are logged at most every %.0f s", peer, reason, detail,
                        self.dropped[reason] or self.overloaded, self.limits.log_every_s)


class Server(zerorpc.Server):
    """zerorpc's server over a :class:`Multiplexer`."""

    def __init__(self, methods: Any, *, heartbeat: float = 5.0,
                 limits: Limits = Limits()) -> None:
        super().__init__(methods, heartbeat=heartbeat)
        # zerorpc built its own multiplexer; its dispatcher greenlet has not run yet.
        stock: Any = self._multiplexer
        stock.close()
        self._multiplexer: Any = Multiplexer(self._events, serve=True, limits=limits)
        self._events._socket.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)

    @property
    def multiplexer(self) -> Multiplexer:
        mux: Multiplexer = self._multiplexer
        return mux


class Client(zerorpc.Client):
    """zerorpc's client over a :class:`Multiplexer` (a hostile server cannot wedge it)."""

    def __init__(self, timeout: float, heartbeat: float | None = 5.0) -> None:
        super().__init__(timeout=timeout, heartbeat=heartbeat)
        self._multiplexer = Multiplexer(self._events, serve=False)


__all__ = ["Client", "Limits", "Malformed", "Multiplexer", "Server", "decode"]
