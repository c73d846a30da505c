"""hpcflow.rpc.greenio: whole messages on zmq.green sockets, blocking only the greenlet."""

from __future__ import annotations

import gevent
import zmq
import zmq.green as zmqg

from hpcflow.config import timeout_scale
from hpcflow.rpc import greenio

WAIT_S = 5 * timeout_scale()


def _pair(ctx: zmqg.Context) -> tuple[zmqg.Socket, zmqg.Socket]:
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def test_messages_arrive_whole_and_in_order_between_greenlets() -> None:
    ctx = zmqg.Context()
    router, dealer = _pair(ctx)
    try:
        got: list[list[bytes]] = []

        def reader() -> None:  # blocks in recv until the writer's messages come
            for _ in range(500):
                got.append([f.bytes for f in greenio.recv_multipart(router)])

        r = gevent.spawn(reader)
        for i in range(500):
            greenio.send_multipart(dealer, [b"", str(i).encode(), b"x" * (i % 3)])
            if i % 50 == 0:
                gevent.sleep(0)
        r.join(timeout=WAIT_S)
        assert r.successful(), r.exception
        assert [m[1:] for m in got] == [[b"", str(i).encode(), b"x" * (i % 3)]
                                        for i in range(500)]
        ident = got[0][0]
        greenio.send_multipart(router, [ident, b"", b"back"])
        with gevent.Timeout(WAIT_S):
            assert [f.bytes for f in greenio.recv_multipart(dealer)] == [b"", b"back"]
        assert dealer.poll(0) == 0  # nothing more arrived
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_a_send_that_cannot_go_yet_blocks_only_its_greenlet() -> None:
    """A DEALER with no peer cannot send: the sender waits, others run, and the message
    goes once a peer appears."""
    ctx = zmqg.Context()
    dealer = ctx.socket(zmq.DEALER)
    port = dealer.bind_to_random_port("tcp://127.0.0.1")
    router = None
    try:
        sender = gevent.spawn(greenio.send_multipart, dealer, [b"", b"hello"])
        ticks = 0
        for _ in range(20):
            gevent.sleep(0.005)
            ticks += 1
        assert not sender.ready() and ticks == 20  # the loop kept running meanwhile
        router = ctx.socket(zmq.ROUTER)
        router.connect(f"tcp://127.0.0.1:{port}")
        sender.join(timeout=WAIT_S)
        assert sender.successful(), sender.exception
        with gevent.Timeout(WAIT_S):
            assert [f.bytes for f in greenio.recv_multipart(router)][1:] == [b"", b"hello"]
    finally:
        dealer.close(linger=0)
        if router is not None:
            router.close(linger=0)
        ctx.term()
