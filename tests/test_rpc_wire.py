"""No zerorpc event can stop a daemon answering (issue 11, item 1).

A structure-aware fuzzer builds zerorpc events field by field: every field of
the envelope and header takes a value of every msgpack type (and a few
crafted encodings msgpack itself would refuse to produce).  The pure decoder
must sort each one into "an event" or ``Malformed``; a real daemon gets them
over a real socket, interleaved with valid calls that must still be answered,
while a long call of another client is in flight and must still complete.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from typing import Any

import gevent
import msgpack
import numpy as np
import pytest
import zmq

import hpcflow
from hpcflow.errors import from_wire
from hpcflow.rpc import strict
from tests.conftest import SCALE, Cluster, NodeProc


class Raw(bytes):
    """Bytes to splice into an encoding as they are (msgpack cannot produce them)."""


#: One or more values of every msgpack type (and format width), plus crafted encodings.
VALUES: list[Any] = [
    None, True, False,
    0, 127, 128, 255, 2**16, 2**32, 2**64 - 1, -1, -33, -(2**15), -(2**63),
    1.5, float("nan"), float("inf"), -0.0,
    "", "ping", "x" * 40, "y" * 300, "é" * 70_000,
    b"", b"\x00", b"z" * 300,
    [], [1], [[[]]], list(range(20)), ["ping"],
    {}, {"a": 1}, {"message_id": b"m"}, {"response_to": {}}, {"k": [{}]},
    msgpack.ExtType(5, b"ext"), msgpack.ExtType(127, b"\x00" * 4), msgpack.Timestamp(1, 2),
    Raw(b"\xd6\xff\x00\x00\x00\x07"),       # the timestamp ext type (-1), 32-bit form
    Raw(b"\xc7\x03\xff\x00\x00\x00"),       # ext -1 with a length no timestamp has
    Raw(b"\xa2\xff\xfe"),                    # a str that is not UTF-8
    Raw(b"\x81\x01\x02"),                    # a map with an int key
    Raw(b"\x81\x80\x01"),                    # a map with a map key (unhashable)
    Raw(b"\x81\x91\x01\x02"),                # a map with an array key
    Raw(b"\xca" + struct.pack(">f", 1.25)),  # float32
    Raw(b"\x91" * 3000 + b"\xc0"),           # arrays nested 3000 deep
    Raw(b"\xdd\xff\xff\xff\xff"),            # an array that claims 4 G items, and ends
    Raw(b"\xc1"),                            # the one byte msgpack never uses
]


def enc(value: Any) -> bytes:
    """msgpack encoding of ``value``, splicing :class:`Raw` pieces in as they are."""
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, list) and any(isinstance(v, Raw) for v in value):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(enc(v) for v in value)
    if isinstance(value, dict) and any(isinstance(v, Raw) for v in value.values()):
        head = bytes([0x80 | len(value)])
        return head + b"".join(enc(k) + enc(v) for k, v in value.items())
    return msgpack.packb(value, use_bin_type=True)


def event(header: Any, name: Any, args: Any) -> bytes:
    return enc([header, name, args])


def structured_events(msgid: bytes) -> Iterator[bytes]:
    """Every field of a valid ``ping`` request, replaced in turn by every value."""
    base_header = {"message_id": msgid, "v": 3}
    for i, value in enumerate(VALUES):
        mid = msgid + b"-%d" % i
        yield enc(value)                                          # the whole event
        yield event(value, "ping", [])                            # header
        yield event({**base_header, "message_id": value}, "ping", [])
        yield event({"message_id": mid, "v": value}, "ping", [])
        yield event({"message_id": mid, "v": 3, "response_to": value}, "ping", [])
        yield event({"message_id": mid, "v": 3, "zz": value}, "ping", [])
        yield event({"message_id": mid, "v": 3}, value, [])       # name
        yield event({"message_id": mid, "v": 3}, "ping", value)   # args
        yield event({"message_id": mid, "v": 3}, "ping", [value])
        yield enc([base_header, "ping"])                          # too short
        yield enc([base_header, "ping", [], value])               # too long
        yield enc([base_header, "ping", []]) + enc(value)         # trailing bytes


def random_events(rng: random.Random, msgid: bytes, n: int) -> Iterator[bytes]:
    """Random combinations: several fields wrong at once, reply names, odd ids."""
    names = ["ping", "OK", "ERR", "STREAM", "STREAM_DONE", "_zpc_hb", "_zpc_more",
             "_zerorpc_inspect", "_zerorpc_help", "wait", "nosuch"]
    for i in range(n):
        header: dict[Any, Any] = {"message_id": msgid + b"r%d" % i, "v": rng.choice([1, 2, 3])}
        for key in rng.sample(["message_id", "v", "response_to", "extra"], rng.randint(0, 3)):
            header[key] = rng.choice(VALUES)
        name = rng.choice(names) if rng.random() < 0.8 else rng.choice(VALUES)
        args = rng.choice([[], [rng.choice(VALUES)], [rng.choice(VALUES)] * 3,
                           rng.choice(VALUES)])
        yield event(header, name, args)


def frame_variants(blob: bytes) -> list[list[bytes]]:
    """Envelopes as a DEALER sends them: right, without delimiter, and wrong."""
    return [[b"", blob], [blob], [b"x", blob], [b"", b"", blob], [b"", blob, blob], []]


def test_decoder_sorts_every_structured_event() -> None:
    """Pure: each generated event decodes, or is Malformed; nothing else escapes."""
    rng = random.Random(7)
    blobs = [*structured_events(b"id"), *random_events(rng, b"id", 3000)]
    accepted = 0
    for blob in blobs:
        for parts in ([b"peer", b"", blob], [b"peer", blob], [b"", blob], [blob],
                      [b"peer", b"junk", blob]):
            for router in (True, False):
                try:
                    ev = strict.decode(parts, router=router)
                except strict.Malformed:
                    continue
                accepted += 1
                # What passes is what zerorpc's layers need, in the types they need.
                assert isinstance(ev.name, str) and ev.name
                assert isinstance(ev.args, list)
                assert isinstance(ev.header["message_id"], str | bytes)
                assert isinstance(ev.header.get("response_to", b""), str | bytes)
                hash(ev.header.get("response_to"))
                assert isinstance(ev.header.get("v", 1), int)
    assert accepted > 100  # the valid variants and benign extra header keys get through


@pytest.fixture
def node(make_cluster: Any) -> Iterator[NodeProc]:
    c: Cluster = make_cluster()
    n = c.add("n1")
    with n.client() as client:
        client.put("D", np.arange(12.0).reshape(3, 4))
    yield n


def answered(c: hpcflow.Client) -> None:
    with gevent.Timeout(10 * SCALE, AssertionError("a valid call went unanswered")):
        assert c.ping()["name"] == "n1"
        assert c.locate("D")["shape"] == [3, 4]


def test_fuzzed_events_never_stop_dispatch(node: NodeProc) -> None:
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(3)]
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(node.rpc)
    rng = random.Random(11)
    with node.client() as legit, node.client() as victim:
        # Another client's long call is in flight the whole time and must complete.
        late = gevent.spawn(victim.wait_for, "LATE", 120 * SCALE)
        with gevent.Timeout(10 * SCALE, AssertionError("the victim's call did not start")):
            while not victim._rpc.pending:
                gevent.sleep(0.01)  # the call runs in a greenlet of this process
        victim_id = next(iter(victim._rpc.pending))
        # An attacker's own long call, whose channel it then floods.
        own = b"own-call"
        socks[0].send_multipart([b"", event({"message_id": own, "v": 3}, "wait",
                                            ["NEVER", 60.0])])
        blobs = [*structured_events(b"s"), *random_events(rng, b"r", 1500)]
        for name in ("OK", "ERR", "STREAM", "STREAM_DONE", "_zpc_hb", "_zpc_more", "ping"):
            for target in (victim_id, own, b"nobody"):  # replies and more, on open calls
                blobs += [event({"message_id": b"x%d" % i, "v": 3, "response_to": target},
                                name, ["a", "b", "c"] if name == "ERR" else [1])
                          for i in range(150)]
            blobs.append(event({"message_id": victim_id, "v": 3}, name, []))  # its id
            blobs.append(event({"message_id": own, "v": 3}, name, []))        # duplicate
        rng.shuffle(blobs)
        sent = 0
        for start in range(0, len(blobs), 500):
            for blob in blobs[start:start + 500]:
                for parts in rng.sample(frame_variants(blob), 2):
                    if parts:
                        rng.choice(socks).send_multipart(parts)
                        sent += 1
            answered(legit)
        assert not late.ready(), "the victim's wait ended early"
        legit.put("LATE", np.ones(3))
        with gevent.Timeout(20 * SCALE, AssertionError("the victim's call never completed")):
            assert late.get()["shape"] == [3]
        answered(legit)
        rpc = legit.stats()["rpc"]
    for s in socks:
        s.close()
    ctx.term()
    assert sent > 3000
    assert rpc["dropped"].get("malformed", 0) > 1000, rpc
    assert node.alive()
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_requests_over_the_limit_are_refused_at_once(node: NodeProc) -> None:
    """One connection at its limit of calls in flight gets Overloaded for more; others
    are served."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(node.rpc)
    limit = strict.Limits().per_connection
    for i in range(limit + 20):
        s.send_multipart([b"", event({"message_id": b"w%d" % i, "v": 3}, "wait",
                                     ["NEVER", 30.0])])
    refused = []
    deadline = time.monotonic() + 10 * SCALE
    while len(refused) < 20 and time.monotonic() < deadline:
        if s.poll(100):
            _, blob = s.recv_multipart()
            header, name, args = msgpack.unpackb(blob, raw=False)
            if name == "ERR":
                refused.append((header["response_to"], args[0]))
    assert len(refused) == 20, refused
    assert {a for _, a in refused} == {"Overloaded"}
    assert {r for r, _ in refused} == {b"w%d" % i for i in range(limit, limit + 20)}
    with node.client() as c:
        answered(c)
        assert c.stats()["rpc"]["overloaded"] >= 20
    s.close()
    ctx.term()


def test_overloaded_reaches_the_script_as_its_type(node: NodeProc) -> None:
    assert issubclass(hpcflow.Overloaded, hpcflow.TransportError)
    err = from_wire("Overloaded", "busy")
    assert isinstance(err, hpcflow.Overloaded) and str(err) == "busy"


class _Methods:
    def echo(self, x: Any) -> Any:
        return x

    def slow(self, seconds: float) -> str:
        gevent.sleep(seconds)
        return "done"

    def boom(self) -> None:
        raise hpcflow.DatasetNotFound("no such thing")

    def unencodable(self) -> Any:
        return {1, 2}


@pytest.fixture
def served() -> Iterator[tuple[strict.Server, str]]:
    server = strict.Server(_Methods(), heartbeat=0.2)
    endpoint = server.bind("tcp://127.0.0.1:0")
    runner = gevent.spawn(server.run)
    yield server, endpoint
    server.close()
    runner.kill()


def test_stock_zerorpc_clients_and_servers_interoperate(
        served: tuple[strict.Server, str]) -> None:
    """The wire is zerorpc's: its client calls our server, our client calls its server."""
    import zerorpc

    _, endpoint = served
    stock = zerorpc.Client(timeout=10 * SCALE, heartbeat=0.2)
    stock.connect(endpoint)
    assert stock.echo({"a": [1, b"x"]}) == {"a": [1, b"x"]}
    assert stock.slow(0.8) == "done"  # longer than two heartbeats: both sides heartbeat
    with pytest.raises(zerorpc.RemoteError) as err:
        stock.boom()
    assert err.value.name == "DatasetNotFound"
    assert stock._zerorpc_ping()[0] == "pong"
    stock.close()

    their = zerorpc.Server(_Methods(), heartbeat=0.2)
    their.bind("tcp://127.0.0.1:0")
    their_ep = their._events._socket.getsockopt_string(zmq.LAST_ENDPOINT)
    runner = gevent.spawn(their.run)
    with strict.Client(timeout=10 * SCALE, heartbeat=0.2) as ours:
        ours.connect(their_ep)
        assert ours.echo([1, "two"]) == [1, "two"]
        assert ours.slow(0.8) == "done"
        with pytest.raises(hpcflow.DatasetNotFound, match="no such thing"):
            ours.boom()
    their.close()
    runner.kill()


def test_lean_client_errors_are_typed(served: tuple[strict.Server, str]) -> None:
    server, endpoint = served
    with strict.Client(timeout=10 * SCALE, heartbeat=0.2) as c:
        c.connect(endpoint)
        with pytest.raises(hpcflow.DatasetNotFound):
            c.boom()
        with pytest.raises(hpcflow.RemoteError, match="NameError"):
            c.nosuchmethod()
        with pytest.raises(hpcflow.RemoteError, match="TypeError"):
            c.unencodable()  # a result msgpack cannot carry is an error, not a hang
        with pytest.raises(hpcflow.PeerUnavailable, match="within"):
            c.slow(5, timeout=0.3)
        # Concurrent calls on one client: answered each to its caller.
        calls = [gevent.spawn(c.echo, i) for i in range(200)]
        gevent.joinall(calls, raise_error=True)
        assert [g.value for g in calls] == list(range(200))
        # The call the client gave up on stops being heartbeated, so the server ends it
        # within about three intervals rather than running it to the end.
        assert server.stats()["in_flight"] == 1
        with gevent.Timeout(3 * SCALE, AssertionError("abandoned call still served")):
            while server.stats()["in_flight"]:
                gevent.sleep(0.05)


def test_a_silent_server_is_lost_within_heartbeats(served: tuple[strict.Server, str]) -> None:
    """A server that stops answering (closed mid-call) fails the call after about three
    heartbeat intervals, not at the call's timeout."""
    server, endpoint = served
    with strict.Client(timeout=60, heartbeat=0.2) as c:
        c.connect(endpoint)
        call = gevent.spawn(c.slow, 30)
        gevent.sleep(0.5)  # well into the call: heartbeats flowing both ways
        server.close()
        with (gevent.Timeout(5 * SCALE, AssertionError("the lost server went unnoticed")),
              pytest.raises(hpcflow.PeerUnavailable, match="heartbeat")):
            call.get()


def test_idle_long_polls_cannot_lock_ordinary_calls_out(node: NodeProc) -> None:
    """Connections cost nothing to open: a local user holding thousands of idle ``wait``
    calls over many connections must not make the node refuse a ping."""
    ctx = zmq.Context()
    socks = []
    for k in range(5):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(node.rpc)
        for i in range(1000):  # 5000 in all: over the ordinary calls' total of 4096
            s.send_multipart([b"", event({"message_id": b"L%d-%d" % (k, i), "v": 3}, "wait",
                                         ["NEVER", 30.0])])
        socks.append(s)
    with node.client() as c:
        with gevent.Timeout(20 * SCALE, AssertionError("the waits never all arrived")):
            while c.stats()["rpc"]["in_flight"] < 5000:
                gevent.sleep(0.05)
        answered(c)
    for s in socks:
        s.close()
    ctx.term()


def test_a_huge_event_is_refused_without_stalling_the_node(node: NodeProc) -> None:
    """An event of ten million empty arrays: refused by the decoder's item limit at once,
    not unpacked for seconds on the socket's one reader."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(node.rpc)
    blob = enc([{"message_id": b"huge", "v": 3}, "ping", Raw(b"\xdd" + struct.pack(">I", 10_000_000)
                                                           + b"\x90" * 10_000_000)])
    with node.client() as c:
        answered(c)
        s.send_multipart([b"", blob])
        t0 = time.monotonic()
        answered(c)
        assert time.monotonic() - t0 < 2 * SCALE
        with gevent.Timeout(10 * SCALE):
            while c.stats()["rpc"]["dropped"].get("malformed", 0) < 1:
                gevent.sleep(0.05)
    s.close()
    ctx.term()


def test_a_nan_timeout_is_refused_and_the_node_keeps_beating(node: NodeProc) -> None:
    """``wait(name, NaN)`` used to block forever and stop the node's heartbeats."""
    with node.client() as c:
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(hpcflow.InvalidData):
                c.wait_for("D", bad)
            with pytest.raises(hpcflow.InvalidData):  # straight over RPC, past the client
                c._call("wait", "D", bad)
        answered(c)
    with pytest.raises(hpcflow.InvalidData):
        hpcflow.connect(node.rpc, timeout_s=float("nan"))
