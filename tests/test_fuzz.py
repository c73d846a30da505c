"""Garbage on every socket a daemon listens on: it logs, answers errors, keeps serving.

Each test records the cluster catalog first, throws random and malformed
frames at one socket, then checks the node still answers, still stores and
serves data, and its catalog is exactly what it was.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq

import hpcflow
from tests.conftest import SCALE, Cluster, FakePeer, wait_for


def catalog_state(cluster: Cluster, node: str = "n1") -> set[tuple[str, str, str, int]]:
    with cluster[node].client() as c:
        return {(r.key, r.owner, r.checksum, r.version) for r in c.catalog()}


@pytest.fixture
def seeded(cluster: Cluster) -> Iterator[Cluster]:
    for i, n in enumerate(("n1", "n2", "n3")):
        with cluster[n].client() as c:
            c.put(f"S{i}", np.full((100, 4), i, dtype=np.float64))
    wait_for(lambda: len(catalog_state(cluster)) == 3, 10, "seed data everywhere")
    yield cluster


def assert_healthy(cluster: Cluster, before: set[tuple[str, str, str, int]]) -> None:
    node = cluster["n1"]
    assert node.alive(), node.log_tail()
    with node.client() as c:
        assert c.ping()["name"] == "n1"
        c.put("AFTER", np.arange(10))
        assert c.fetch("AFTER").tolist() == list(range(10))
        assert c.fetch("S2").sum() == 2 * 400
        c.delete("AFTER")
    assert catalog_state(cluster) == before


def garbage(rng: random.Random) -> list[bytes]:
    """Random frames: random bytes, truncated msgpack, wrong types, odd frame counts."""
    choices = [
        lambda: [rng.randbytes(rng.randint(0, 200))],
        lambda: [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(0, 6))],
        lambda: [b"GET", msgpack.packb({"r": 1, "key": "S0", "v": 1, "i": 10**9, "by": "x"})],
        lambda: [b"GET", msgpack.packb({"r": -1, "key": "../../x", "v": "a", "i": 0})],
        lambda: [b"GET", msgpack.packb([1, 2, 3])],
        lambda: [b"PUT", msgpack.packb({"r": 1, "name": "Z", "shape": [10**12, 10**12],
                                        "dtype": "<f8", "chunk_bytes": 4096, "by": "x"})],
        lambda: [b"PUT", msgpack.packb({"r": 1, "name": "Z/../../etc", "shape": [1],
                                        "dtype": "<f8", "chunk_bytes": 4096, "by": "x"})],
        lambda: [b"PUT", msgpack.packb({"r": 1, "name": "Z", "shape": [1], "dtype": "|O",
                                        "chunk_bytes": 4096, "by": "x"})],
        lambda: [b"DATA", msgpack.packb({"r": 1, "u": "nope", "i": 0, "d": 0}), b"xx"],
        lambda: [b"END", msgpack.packb({"r": 1, "u": "nope", "checksum": "x"})],
        lambda: [b"GET", msgpack.packb({"r": 1})[:-1]],
        lambda: [msgpack.packb(({"message_id": b"x", "v": 3}, "put", [1, 2]))],
        lambda: [msgpack.packb(({"message_id": b"y", "v": 3}, "locate", ["../x"]))],
        lambda: [msgpack.packb(({"v": 3}, "snapshot", None))],
        lambda: [msgpack.packb([{}, "nosuchmethod", []])],
        lambda: [msgpack.packb("just a string")],
        lambda: [b"\x92" + rng.randbytes(30)],
    ]
    return rng.choice(choices)()


@pytest.mark.parametrize("port", ["rpc", "bulk"])
def test_zmq_garbage_on_rpc_and_bulk(seeded: Cluster, port: str) -> None:
    before = catalog_state(seeded)
    rng = random.Random(port)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(seeded["n1"].info[port])
    for _ in range(400):
        frames = garbage(rng)
        if frames:
            rng.choice(socks).send_multipart(frames)
    # A well-formed request after the flood is answered (the server loop survived).
    probe = socks[0]
    probe.send_multipart([b"GET", msgpack.packb({"r": 99, "key": "NOPE", "v": 1, "i": 0,
                                                 "by": "fuzz"})] if port == "bulk" else
                         [msgpack.packb(({"message_id": b"probe", "v": 3}, "ping", []))])
    deadline = 10_000 * SCALE
    while True:
        assert probe.poll(deadline), "no answer after the garbage"
        reply = probe.recv_multipart()
        if port == "bulk" and reply[0] == b"ERR" and msgpack.unpackb(reply[1])["r"] == 99:
            assert msgpack.unpackb(reply[1])["type"] == "DatasetNotFound"
            break
        if port == "rpc" and b"probe" in reply[-1]:
            break
    for s in socks:
        s.close()
    ctx.term()
    assert_healthy(seeded, before)


@pytest.mark.parametrize("port", ["rpc", "pub", "bulk"])
def test_raw_tcp_garbage_on_every_port(seeded: Cluster, port: str) -> None:
    before = catalog_state(seeded)
    host, p = seeded["n1"].info[port][len("tcp://"):].rsplit(":", 1)
    rng = random.Random(port)
    for i in range(30):
        with socket.create_connection((host, int(p)), timeout=5 * SCALE) as s:
            payload = rng.randbytes(rng.randint(1, 5000))
            if i % 3 == 0:  # a valid ZMTP greeting start, then nonsense
                payload = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + payload
            try:
                s.sendall(payload)
                if i % 2:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the daemon may hang up on us: that is fine
    assert_healthy(seeded, before)


def test_subscription_garbage_on_pub(seeded: Cluster) -> None:
    before = catalog_state(seeded)
    ctx = zmq.Context()
    x = ctx.socket(zmq.XSUB)
    x.setsockopt(zmq.LINGER, 0)
    x.connect(seeded["n1"].info["pub"])
    rng = random.Random(5)
    for _ in range(200):
        x.send(rng.choice([b"\x01", b"\x00", b"\x02"]) + rng.randbytes(rng.randint(0, 100)))
    x.close()
    ctx.term()
    assert_healthy(seeded, before)


def test_hostile_peer_publishing_garbage(seeded: Cluster) -> None:
    """A 'peer' that introduces itself, gets synced, then publishes nonsense and lies."""
    before = catalog_state(seeded)
    n1 = seeded["n1"]
    evil = FakePeer("evil", n1)
    pub = evil.pub

    # heartbeats until the subscription is up (slow joiner)
    wait_for(lambda: evil.heard_by(n1), 10, "evil's heartbeats to arrive")
    rng = random.Random(11)
    lie = {"name": "S0", "part": None, "owner": "n1", "shape": [1], "dtype": "<f8",
           "nbytes": 8, "checksum": "xxh3:0", "chunk_bytes": 4096}
    msgs: list[list[bytes]] = [
        [b"KV", rng.randbytes(50)],
        [b"HB", msgpack.packb({"s": "evil", "e": 1, "q": 0, "p": {"members": [{"x": 1}] * 50}})],
        [b"KV", msgpack.packb({"s": "evil", "e": 1, "q": 1, "k": "S0", "v": lie})],
        [b"KV", msgpack.packb({"s": "n2", "e": 1, "q": 5, "k": "S1", "v": None})],
        [b"HB", msgpack.packb({"s": "evil", "e": 1, "q": 2**64 - 1})],
        [b"XX", b"", b""],
        [b"KV", msgpack.packb({"s": "evil", "e": 1, "q": 2, "k": "Q", "v": {"name": 5}})],
    ]
    for _ in range(100):
        for m in msgs:
            pub.send_multipart(m)

    def flood_processed() -> bool:
        # one undecodable KV a round; the XX messages never arrive (n1 subscribes only
        # to the kinds it reads: the publisher's ZeroMQ filters the rest)
        with n1.client() as c:
            return bool(c.stats()["catalog"]["malformed"] >= 100)

    wait_for(flood_processed, 20, "the flood to be processed")
    evil.__exit__()
    assert_healthy(seeded, before)


def test_huge_subscription_then_clean_shutdown(seeded: Cluster) -> None:
    # libzmq segfaults when closing a socket that holds a ~200 KB+ subscription (FACTS.md).
    # The sender's own XSUB hits that on close, so it runs in a throwaway process; the
    # daemon's PUB must survive the subscription and still shut down cleanly.
    code = (
        "import zmq, sys\n"
        "ctx = zmq.Context(); x = ctx.socket(zmq.XSUB); x.connect(sys.argv[1])\n"
        "x.send(b'\\x01' + b'A' * 300_000)\n"
        "m = ctx.socket(zmq.SUB); m.connect(sys.argv[1]); m.subscribe(b'')\n"
        "m.recv_multipart()\n"  # a heartbeat arrived: the daemon has read our subscription
        "import os; os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, seeded["n1"].info["pub"]], timeout=30 * SCALE,
                   check=True)
    with seeded["n1"].client() as c:
        assert c.ping()["name"] == "n1"
    seeded["n1"].kill(signal.SIGTERM)
    proc = seeded["n1"].proc
    assert proc is not None and proc.returncode == 0, seeded["n1"].log_tail()


def test_rpc_methods_with_wrong_argument_types(seeded: Cluster) -> None:
    rng = random.Random(1)
    values = [None, 1, -5, 2**63 - 1, "", "x" * 10_000, b"\x00", [], {}, [1, "a"], 3.5,
              "../../etc/passwd", "S0", {"name": "S0"}]
    with seeded["n1"].client() as c:
        for method in ("locate", "describe", "put", "fetch", "delete", "replicate", "hello",
                       "catalog", "claim", "release_claim", "claim_stands", "metadata",
                       "aux"):
            for _ in range(12):
                args = [rng.choice(values) for _ in range(rng.randint(0, 4))]
                with contextlib.suppress(hpcflow.HpcflowError):
                    c._call(method, *args)
        assert c.ping()["name"] == "n1"
    before = catalog_state(seeded)
    assert {k for k, *_ in before} >= {"S0", "S1", "S2"}
