"""The zerorpc protocol, strict and lean: no event can stop a server answering.

hpcflow speaks zerorpc's wire protocol (msgpack ``[header, name, args]``
events over ROUTER/DEALER, ``OK``/``ERR`` replies, ``_zpc_hb`` heartbeats), so
zerorpc's Python and Node.js clients and servers interoperate with it.  It
does not use zerorpc 0.6.3's implementation, for two measured reasons:

* **Robustness.** Its channel multiplexer trusts the peer: one event whose
  header has a field of the wrong type (``response_to`` set to a map) ends the
  greenlet that routes every event, and the server answers no one again while
  the process lives; a client sending a few events on a call that is not
  reading blocks that greenlet, and with it every call; channels are keyed by
  the client-chosen message id alone, so one client can feed another's call;
  reply events sent as requests each hold a channel until a heartbeat times out.
* **Cost.** Each call spawns three greenlets on the client and four on the
  server and hands every event through four queues: ~1.2 ms of a 1.5 ms round
  trip on loopback where a raw ZeroMQ round trip takes 0.25 ms.

Here :func:`decode` checks every event against the grammar below (anything
else is dropped, counted and logged at most once per interval, never raised);
one greenlet owns each socket's receiving side; a call costs one greenlet on
the server and none on the client; one ticker per socket sends and checks the
heartbeats of every call in flight that is older than the heartbeat interval,
with zerorpc's semantics (a peer silent for two intervals is lost).  Calls
are keyed by (connection, message id); only heartbeats may follow a request;
requests in flight are bounded per connection and in total, and one over a
limit is answered at once with :class:`~hpcflow.errors.Overloaded`.

The accepted wire (zerorpc protocol v1-v3)::

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

import contextvars
import inspect
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.lock
import msgpack
import zmq
import zmq.green as zmqg

from ..errors import AuthenticationError, PeerUnavailable, ProtocolError, from_wire
from . import auth, greenio

log = logging.getLogger("hpcflow.rpc")

PROTOCOL_VERSION = 3
#: Events only a server sends: never a request, and never sent on a server's call.
REPLY_NAMES = frozenset({"OK", "ERR", "STREAM", "STREAM_DONE"})
#: Channel control events; the only ones a client may send on an open call.
CONTROL_NAMES = frozenset({"_zpc_hb", "_zpc_more"})
MAX_ID = 128
MAX_NAME = 256
MAX_IDENTITY_FRAMES = 8
#: Items in one msgpack array or map of an event (a share's tasks are bounded below it).
MAX_ITEMS = 100_000


class Malformed(ProtocolError):
    """Frames that are not a well-formed zerorpc event (the reason is the message)."""


class LostRemote(PeerUnavailable):
    """The server of a call stopped heartbeating (raised in the caller)."""


def caller_role() -> str | None:
    """Inside a call being served: the role ZAP gave its caller (``node`` or
    ``client``; None on a server without keys, or outside a served call)."""
    call = _CURRENT.get()
    return call.role if call is not None else None


class CallerLost(gevent.GreenletExit):
    """Raised inside a call being served when its caller stopped heartbeating: the work
    is abandoned (like a cancellation: cleanup runs, nothing is retried)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one server holds for its peers."""

    #: Requests being served at once for one connection (one client socket; a peer node
    #: multiplexes all its flows' calls over one).
    per_connection: int = 1024
    #: Requests being served at once in total.
    total: int = 4096
    #: Methods that may block for long while costing almost nothing (a ``wait`` for a
    #: dataset): counted apart, so idle long polls cannot lock ordinary calls out.
    long_polls: frozenset[str] = frozenset({"wait"})
    #: Long polls in flight at once in total (per connection: ``per_connection``).
    long_polls_total: int = 16384
    #: Largest message accepted; a larger one closes the sender's connection (libzmq).
    #: Decoding runs on the socket's one reader: 16 MiB of the smallest msgpack objects
    #: take about half a second, well inside a heartbeat TTL.
    max_message_bytes: int = 16 * 1024 * 1024
    #: At most one warning per reason per this many seconds.
    log_every_s: float = 10.0


@dataclass
class Event:
    """One decoded zerorpc event."""

    header: dict[Any, Any]
    name: str
    args: list[Any]
    identity: list[bytes] = field(default_factory=list)

    @property
    def message_id(self) -> str | bytes:
        return self.header["message_id"]

    @property
    def response_to(self) -> str | bytes | None:
        return self.header.get("response_to")

    @property
    def version(self) -> int:
        return int(self.header.get("v", 1))


def _check_id(value: Any, field_name: str) -> None:
    if not isinstance(value, str | bytes):
        raise Malformed(f"header {field_name} is {type(value).__name__}, not str or bytes")
    if not 1 <= len(value) <= MAX_ID:
        raise Malformed(f"header {field_name} has length {len(value)}, not 1..{MAX_ID}")


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def decode(parts: Sequence[Any], *, router: bool) -> Event:
    """The event carried by ``parts`` (zmq frames or bytes), with its identity.

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
        identity = [_frame_bytes(f) for f in (parts[:-2] if len(parts) > 2 else parts[:1])]
        if len(identity) > MAX_IDENTITY_FRAMES:
            raise Malformed(f"{len(identity)} identity frames")
    else:
        if len(parts) > 2 or (len(parts) == 2 and len(_frame_bytes(parts[0])) != 0):
            raise Malformed(f"{len(parts)} frames where [delimiter] event was expected")
        identity = []
    blob = parts[-1]
    try:
        msg = msgpack.unpackb(getattr(blob, "buffer", blob), raw=False,
                              max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS)
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
    return Event(header, name, args, identity)


def encode(header: dict[str, Any], name: str, args: Any) -> bytes:
    return msgpack.packb([header, name, args], use_bin_type=True)


class _Ids:
    """zerorpc-style message ids: a per-process random base and a counter."""

    def __init__(self) -> None:
        self.base = os.urandom(12).hex().encode()
        self.n = 0

    def next(self) -> bytes:
        self.n += 1
        return b"%08x" % (self.n & 0xFFFFFFFF) + self.base


def _peer_address(parts: Sequence[Any]) -> str:
    try:
        return str(parts[-1].get("Peer-Address"))
    except Exception:  # not a frame, or a transport without addresses (ipc)
        return "?"


class _Endpoint:
    """What a server and a client share: a socket, its send lock, drop accounting."""

    def __init__(self, sock: Any, heartbeat: float | None, log_every_s: float) -> None:
        self.sock = sock
        self.heartbeat = heartbeat
        self.log_every_s = log_every_s
        self.ids = _Ids()
        self._send_lock = gevent.lock.Semaphore()
        self.dropped: Counter[str] = Counter()
        self._last_warned: dict[str, float] = {}
        self._greenlets: list[gevent.Greenlet] = []

    def reply_header(self, response_to: str | bytes) -> dict[str, Any]:
        """The header of an event sent on the call ``response_to``, with a fresh id."""
        return {"message_id": self.ids.next(), "v": PROTOCOL_VERSION,
                "response_to": response_to}

    def send(self, identity: Sequence[bytes], header: dict[str, Any], name: str,
             args: Any) -> None:
        self.send_blob(identity, encode(header, name, args))

    def send_blob(self, identity: Sequence[bytes], blob: bytes,
                  track: bool = False) -> zmq.MessageTracker | None:
        """Send; with ``track``, a big (zero-copy) blob's tracker tells when libzmq let
        go of it (sent, or dropped with its connection).  None: nothing left to wait for."""
        # Zero-copy only pays for big messages: a zmq.Frame costs more than copying 64 KiB.
        copy = len(blob) < 65536
        with self._send_lock:  # one writer at a time on a zmq.green socket
            tracker = greenio.send_multipart(self.sock, [*identity, b"", blob], copy=copy,
                                             track=track and not copy)
        return tracker

    def drop(self, reason: str, detail: str, peer: str) -> None:
        self.dropped[reason] += 1
        self.warn(reason, detail, peer, self.dropped[reason])

    def warn(self, reason: str, detail: str, peer: str, count: int) -> None:
        now = time.monotonic()
        if now - self._last_warned.get(reason, float("-inf")) >= self.log_every_s:
            self._last_warned[reason] = now
            log.warning("rpc: dropped an event from %s (%s: %s); %d so far, further ones are "
                        "logged at most every %.0f s", peer, reason, detail, count,
                        self.log_every_s)

    def receive_loop(self, route: Callable[[Sequence[Any]], None]) -> None:
        """The socket's one reader: decode and route each message, whatever it is."""
        while True:
            try:
                parts = greenio.recv_multipart(self.sock)
            except zmq.ContextTerminated:
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ENOTSOCK:
                    return
                self.drop("recv", str(exc), "?")
                gevent.sleep(0.01)
                continue
            try:
                route(parts)
            except Malformed as exc:
                self.drop("malformed", str(exc), _peer_address(parts))
            except Exception as exc:  # never let one event end the loop
                log.exception("rpc: unexpected error routing an event")
                self.drop("error", f"{type(exc).__name__}: {exc}", _peer_address(parts))

    def spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        g = gevent.spawn(fn, *args)
        self._greenlets.append(g)
        return g

    def close(self) -> None:
        gevent.killall(self._greenlets, block=False)
        self._greenlets.clear()
        self.sock.close(linger=0)


@dataclass
class _Call:
    """A request being served."""

    key: tuple[tuple[bytes, ...], str | bytes]
    identity: list[bytes]
    message_id: str | bytes
    version: int
    started: float
    last_heard: float
    greenlet: gevent.Greenlet | None = None
    long: bool = False
    role: str | None = None
    #: Run once the reply has left the process (see :func:`after_reply`).
    after_reply: list[Callable[[], None]] = field(default_factory=list)


#: The call the current greenlet is serving (each call runs in its own greenlet).
_CURRENT: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("rpc_call",
                                                                       default=None)
#: How often a reply still queued for its client is checked (backing off to the maximum).
_TRACK_POLL_S = (0.002, 0.1)


def current_connection() -> tuple[bytes, ...] | None:
    """The connection (client socket identity) of the call being served, if any."""
    call = _CURRENT.get()
    return call.key[0] if call is not None else None


def after_reply(fn: Callable[[], None]) -> bool:
    """Run ``fn`` once the reply of the call being served has left this process: handed
    to the network, or dropped with its connection (a client that never reads keeps it
    queued in libzmq until then), or at once when the call ends without one.  For
    releasing what the reply's bytes were counted against.  False (and ``fn`` is not
    kept) when no call is being served."""
    call = _CURRENT.get()
    if call is None:
        return False
    call.after_reply.append(fn)
    return True


def _public_methods(obj: Any) -> dict[str, Callable[..., Any]]:
    if isinstance(obj, dict):
        return dict(obj)
    return {name: getattr(obj, name) for name in dir(obj)
            if not name.startswith("_") and callable(getattr(obj, name))}


class Server:
    """Serves the public methods of ``methods`` (or a ``{name: fn}`` map).

    ``bind`` then ``run`` (blocks; run it in a greenlet); ``stop`` ends the
    requests in flight (their greenlets get GreenletExit); ``close`` the socket.
    Methods in ``node_only`` are refused (:class:`~hpcflow.errors.PermissionDenied`)
    to callers whose ZAP role is not ``node``: give it only on a keyed socket.
    """

    def __init__(self, methods: Any, *, heartbeat: float = 5.0, limits: Limits = Limits(),
                 context: Any = None, name: str | None = None,
                 node_only: frozenset[str] = frozenset()) -> None:
        self.limits = limits
        self.node_only = node_only
        self.denied = 0
        self.name = name or type(methods).__name__
        self.methods = _public_methods(methods)
        self.methods.update({
            "_zerorpc_ping": lambda: ["pong", self.name],
            "_zerorpc_name": lambda: self.name,
            "_zerorpc_list": lambda: sorted(m for m in self.methods if not m.startswith("_")),
            "_zerorpc_inspect": self._inspect,
        })
        self._ctx = context or zmqg.Context.instance()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
        self._io = _Endpoint(sock, heartbeat, limits.log_every_s)
        self.calls: dict[tuple[tuple[bytes, ...], str | bytes], _Call] = {}
        # In flight per (connection, long poll?) and in total per kind.
        self._per_connection: Counter[tuple[tuple[bytes, ...], bool]] = Counter()
        self._in_flight: Counter[bool] = Counter()
        self.overloaded = 0
        self._stopped = gevent.event.Event()

    def bind(self, endpoint: str) -> str:
        """Bind and return the bound endpoint (port 0 picks a free port)."""
        self._io.sock.bind(endpoint)
        return str(self._io.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def run(self) -> None:
        self._io.spawn(self._io.receive_loop, self._route)
        if self._io.heartbeat:
            self._io.spawn(self._ticker)
        self._stopped.wait()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking requests and end those in flight (bounded by ``grace_s``)."""
        self._stopped.set()
        gevent.killall([c.greenlet for c in list(self.calls.values()) if c.greenlet],
                       timeout=grace_s)

    def close(self) -> None:
        self.stop(0)
        self._io.close()

    def stats(self) -> dict[str, Any]:
        """Requests in flight, refused over the limits, and events dropped by reason."""
        return {"in_flight": len(self.calls), "overloaded": self.overloaded,
                "denied": self.denied, "dropped": dict(self._io.dropped)}

    # -- routing ---------------------------------------------------------------------
    def _route(self, parts: Sequence[Any]) -> None:
        ev = decode(parts, router=True)
        conn = tuple(ev.identity)
        if ev.response_to is None:
            self._admit(conn, ev, parts)
            return
        call = self.calls.get((conn, ev.response_to))
        if call is None:
            self._io.dropped["unrouted"] += 1  # e.g. a heartbeat just after the reply
            return
        if ev.name not in CONTROL_NAMES:
            raise Malformed(f"{ev.name} sent on an open call (only heartbeats may follow)")
        call.last_heard = time.monotonic()

    def _admit(self, conn: tuple[bytes, ...], ev: Event, parts: Sequence[Any]) -> None:
        if ev.name in REPLY_NAMES or ev.name in CONTROL_NAMES:
            raise Malformed(f"{ev.name} sent to a server as a request")
        if self._stopped.is_set():
            self._io.dropped["stopping"] += 1
            return
        key = (conn, ev.message_id)
        if key in self.calls:
            raise Malformed(f"request id {ev.message_id!r} is already in use on this connection")
        lim = self.limits
        long = ev.name in lim.long_polls
        total = lim.long_polls_total if long else lim.total
        mine = self._per_connection[(conn, long)]
        if mine >= lim.per_connection or self._in_flight[long] >= total:
            self.overloaded += 1
            self._io.warn("overloaded", "refusing requests over the limit",
                          _peer_address(parts), self.overloaded)
            kind = "long polls" if long else "requests"
            self._reply(ev.identity, ev.message_id, ev.version, "ERR", self._err(
                "Overloaded", f"the node is serving {self._in_flight[long]} {kind} "
                f"({mine} for this connection; limits {lim.per_connection} and {total}): "
                "retry later", ev.version))
            return
        role = auth.role_of(parts[-1])
        if ev.name in self.node_only and role != auth.NODE:
            self.denied += 1
            self._io.warn("denied", f"{ev.name} from a {role or 'anonymous'} caller",
                          _peer_address(parts), self.denied)
            self._reply(ev.identity, ev.message_id, ev.version, "ERR", self._err(
                "PermissionDenied", f"{ev.name} is a node-to-node call: a {role or 'anonymous'}"
                " key may not make it", ev.version))
            return
        now = time.monotonic()
        call = _Call(key, ev.identity, ev.message_id, ev.version, now, now, long=long,
                     role=role)
        self.calls[key] = call
        self._per_connection[(conn, long)] += 1
        self._in_flight[long] += 1
        call.greenlet = gevent.spawn(self._serve, call, ev)

    def _serve(self, call: _Call, ev: Event) -> None:
        _CURRENT.set(call)
        tracker = None
        try:
            header = self._io.reply_header(call.message_id)
            try:
                fn = self.methods.get(ev.name)
                if fn is None:
                    raise NameError(ev.name)
                blob = encode(header, "OK", [fn(*ev.args)])  # unencodable: an error too
            except gevent.GreenletExit:
                return
            except Exception as exc:
                blob = encode(header, "ERR", self._err(type(exc).__name__, str(exc),
                                                       call.version))
            try:
                tracker = self._io.send_blob(call.identity, blob, track=bool(call.after_reply))
            except zmq.ZMQError as exc:  # the socket is closing
                log.debug("rpc: cannot reply: %s", exc)
        finally:
            self._forget(call)
            if call.after_reply:
                if tracker is None or tracker.done:
                    self._run_after_reply(call)
                else:
                    # Not kept for close(): once the socket closes, libzmq drops the reply.
                    gevent.spawn(self._await_sent, call, tracker)

    def _await_sent(self, call: _Call, tracker: zmq.MessageTracker) -> None:
        delay = _TRACK_POLL_S[0]
        while not tracker.done:
            gevent.sleep(delay)
            delay = min(_TRACK_POLL_S[1], delay * 2)
        self._run_after_reply(call)

    @staticmethod
    def _run_after_reply(call: _Call) -> None:
        for fn in call.after_reply:
            try:
                fn()
            except Exception:  # one failing callback must not keep the others from running
                log.exception("rpc: after-reply callback failed")
        call.after_reply.clear()

    def _forget(self, call: _Call) -> None:
        if self.calls.pop(call.key, None) is not None:
            slot = (call.key[0], call.long)
            self._per_connection[slot] -= 1
            self._in_flight[call.long] -= 1
            if self._per_connection[slot] <= 0:
                del self._per_connection[slot]

    @staticmethod
    def _err(name: str, message: str, version: int) -> list[Any]:
        return [name, message, ""] if version >= 2 else [f"{name}: {message}"]

    def _reply(self, identity: list[bytes], message_id: str | bytes, version: int, name: str,
               args: Any) -> None:
        try:
            self._io.send(identity, self._io.reply_header(message_id), name, args)
        except zmq.ZMQError as exc:  # the socket is closing
            log.debug("rpc: cannot reply: %s", exc)

    def _ticker(self) -> None:
        """Heartbeat every call older than one interval; end those whose client went
        silent for two (zerorpc's rule; a v1 client heartbeats only if it wants to)."""
        freq = float(self._io.heartbeat or 0)
        while True:
            gevent.sleep(freq)
            now = time.monotonic()
            for call in list(self.calls.values()):
                if now - call.started < freq:
                    continue
                if call.version >= 2:
                    if now - call.last_heard > 2 * freq + freq and call.greenlet is not None:
                        call.greenlet.kill(CallerLost("client stopped heartbeating"),
                                           block=False)
                        continue
                    self._reply(call.identity, call.message_id, call.version, "_zpc_hb", [0])

    def _inspect(self) -> dict[str, Any]:
        out = {}
        for name, fn in self.methods.items():
            if name.startswith("_"):
                continue
            try:
                params = [{"name": p} for p in inspect.signature(fn).parameters]
            except (TypeError, ValueError):
                params = []
            out[name] = {"args": params, "doc": inspect.getdoc(fn) or ""}
        return {"name": self.name, "methods": out}


@dataclass
class _Pending:
    result: gevent.event.AsyncResult
    method: str
    started: float
    last_heard: float
    #: The greenlet sending the request while its send waits for the socket.
    sender: Any = None


class Client:
    """Calls a zerorpc-protocol server: ``client.method(*args, timeout=s)``.

    Errors are hpcflow's: the server's error class by name (``from_wire``),
    :class:`~hpcflow.errors.PeerUnavailable` on a timeout or a lost server, or
    :class:`~hpcflow.errors.AuthenticationError` as soon as the security handshake
    fails (keys on one side only, or another cluster's keys).
    """

    def __init__(self, timeout: float = 30.0, heartbeat: float | None = 5.0,
                 context: Any = None) -> None:
        self.timeout = timeout
        self._ctx = context or zmqg.Context.instance()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        self._io = _Endpoint(sock, heartbeat, 10.0)
        self.pending: dict[bytes, _Pending] = {}
        self.endpoint = ""
        self._started = False
        self._closed = False
        self._watch: auth.HandshakeWatch | None = None
        self._tick: gevent.Greenlet | None = None  # runs while calls are pending

    def connect(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._watch = auth.HandshakeWatch(self._io.sock, endpoint, self._refused)
        self._io.sock.connect(endpoint)

    @property
    def connected(self) -> bool:
        """The connection is up (handshaken, not dropped since): see HandshakeWatch."""
        return self._watch is not None and self._watch.connected and not self._closed

    def _refused(self, exc: AuthenticationError) -> None:
        for p in self.pending.values():
            if not p.result.ready():
                p.result.set((False, exc))
            if p.sender is not None:  # its send waits for a peer that refused us
                gevent.kill(p.sender, exc)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("__"):
            raise AttributeError(method)
        return lambda *args, timeout=None: self.call(method, *args, timeout=timeout)

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._closed:
            raise PeerUnavailable(f"client of {self.endpoint} is closed")
        if self._watch is not None and self._watch.error is not None:
            raise self._watch.error
        if not self._started:
            self._started = True
            self._io.spawn(self._io.receive_loop, self._route)
        msgid = self._io.ids.next()
        now = time.monotonic()
        p = _Pending(gevent.event.AsyncResult(), method, now, now)
        self.pending[msgid] = p
        if self._io.heartbeat and (self._tick is None or self._tick.dead):
            self._tick = gevent.spawn(self._ticker)
        limit = self.timeout if timeout is None else timeout
        try:
            p.sender = gevent.getcurrent()
            try:
                with gevent.Timeout(limit):  # a socket with no peer to take it waits
                    self._io.send((), {"message_id": msgid, "v": PROTOCOL_VERSION}, method,
                                  list(args))
            finally:
                p.sender = None
            ok, value = p.result.get(timeout=limit)
        except gevent.Timeout:
            raise PeerUnavailable(f"no answer from {self.endpoint} to {method} within "
                                  f"{limit:g} s") from None
        finally:
            self.pending.pop(msgid, None)
        if ok:
            return value
        raise value

    def _route(self, parts: Sequence[Any]) -> None:
        ev = decode(parts, router=False)
        rt = ev.response_to
        if rt is None or ev.name not in REPLY_NAMES | CONTROL_NAMES:
            raise Malformed(f"{ev.name} is not a reply")
        p = self.pending.get(rt if isinstance(rt, bytes) else rt.encode())
        if p is None or p.result.ready():
            self._io.dropped["unrouted"] += 1
            return
        p.last_heard = time.monotonic()
        if ev.name == "OK":
            p.result.set((True, ev.args[0]))
        elif ev.name == "ERR":
            name, message = (ev.args[0], ev.args[1]) if len(ev.args) == 3 else (
                "RemoteError", ev.args[0])
            p.result.set((False, from_wire(name or "RemoteError", message or "")))
        elif ev.name in ("STREAM", "STREAM_DONE"):
            p.result.set((False, ProtocolError(f"{p.method} answered with a stream")))

    def _ticker(self) -> None:
        """Heartbeat the calls in flight; ends when none is (and ``call`` starts it
        again): a node keeps a client per member, and tickers of idle clients waking
        every interval were a wake-up per member every 5 s."""
        freq = float(self._io.heartbeat or 0)
        while self.pending:
            gevent.sleep(freq)
            now = time.monotonic()
            for msgid, p in list(self.pending.items()):
                if now - p.started < freq or p.result.ready():
                    continue
                if now - p.last_heard > 2 * freq + freq:
                    p.result.set((False, LostRemote(
                        f"{self.endpoint} stopped answering during {p.method} (no heartbeat "
                        f"for {now - p.last_heard:.0f} s)")))
                    continue
                try:
                    self._io.send((), self._io.reply_header(msgid), "_zpc_hb", [0])
                except zmq.ZMQError:
                    return

    def stats(self) -> dict[str, Any]:
        return {"in_flight": len(self.pending), "dropped": dict(self._io.dropped)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self.pending.values():
            if not p.result.ready():
                p.result.set((False, PeerUnavailable(f"client of {self.endpoint} closed")))
        if self._watch is not None:
            self._watch.close()
        if self._tick is not None:
            self._tick.kill(block=False)
        self._io.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CallerLost", "Client", "Event", "Limits", "LostRemote", "Malformed", "Server",
           "after_reply", "caller_role", "current_connection", "decode", "encode"]
