"""The replicated catalog in-process, against a raw publisher on a real PUB socket:
gap- and heartbeat-triggered resyncs, what stays offered meanwhile, forgetting long
dead members; and the pure location logic and address choice."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import zmq
import zmq.green as zmqg

from hpcflow.catalog.base import locate
from hpcflow.catalog.kvmsg import HB, KV, KVMsg
from hpcflow.catalog.membership import PeerInfo, vector_digest
from hpcflow.catalog.record import DatasetRecord
from hpcflow.catalog.replicated import ReplicatedCatalog
from hpcflow.catalog.signing import Signer
from hpcflow.config import (
    advertised,
    interface_addresses,
    is_local_only,
    pick_host,
    wildcard_host,
)
from hpcflow.errors import InvalidData
from hpcflow.rpc.traffic import MAX_PEERS, OTHER, Traffic
from tests.conftest import SCALE


def record(name: str, owner: str = "p", part: int | None = None, shape: tuple[int, ...] = (4, 2),
           dtype: str = "<f8", nparts: int | None = None) -> DatasetRecord:
    n = 1
    for k in shape:
        n *= k
    return DatasetRecord(name=name, part=part, owner=owner, shape=shape, dtype=dtype,
                         nbytes=n * 8 if dtype == "<f8" else n, checksum=f"c-{name}-{part}",
                         chunk_bytes=4096, nparts=nparts)


def until(cond: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    with gevent.Timeout(timeout * SCALE, AssertionError(f"timed out waiting for {what}")):
        while not cond():
            gevent.sleep(0.01)


class RawPeer:
    """A publisher we drive by hand (signing its updates with its own key), with the
    snapshot sections a real peer would serve."""

    def __init__(self, ctx: zmqg.Context, name: str, epoch: int = 7) -> None:
        self.name, self.epoch = name, epoch
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.signer = Signer()
        self.info = PeerInfo(name, epoch, "tcp://127.0.0.1:9", f"tcp://127.0.0.1:{port}",
                             "tcp://127.0.0.1:9", self.signer.public_hex)
        self.seq = 0
        self.state: dict[str, tuple[int, dict[str, Any], bytes]] = {}
        self.snapshots = 0

    def snapshot(self, origins: list[str] | None = None) -> dict[str, Any]:
        self.snapshots += 1
        gevent.sleep(0.2)  # a slow snapshot: the resync window is observable
        entries = [[k, q, v, sig] for k, (q, v, sig) in self.state.items()]
        return {"epoch": self.epoch, "seq": self.seq, "self": self.info.to_wire(),
                "origins": [{"info": self.info.to_wire(), "seq": self.seq,
                             "entries": entries}]}

    def put(self, rec: DatasetRecord, send: bool = True) -> None:
        self.seq += 1
        value = rec.to_wire()
        sig = self.signer.sign(KV, self.name, self.epoch, self.seq, rec.key, value)
        self.state[rec.key] = (self.seq, value, sig)
        if send:
            self.send(KVMsg(KV, self.name, self.epoch, self.seq, rec.key, value, sig=sig))

    def beat(self, members: list[dict[str, Any]] | None = None) -> None:
        self.send(KVMsg(HB, self.name, self.epoch, self.seq,
                        props={"members": members or [self.info.to_wire()]}))

    def send(self, msg: KVMsg) -> None:
        self.pub.send_multipart(msg.encode())


@pytest.fixture
def ctx() -> Iterator[zmqg.Context]:
    c = zmqg.Context()
    yield c
    c.destroy(linger=0)


def make_catalog(ctx: zmqg.Context, peers: dict[str, RawPeer], **kw: Any) -> ReplicatedCatalog:
    me = PeerInfo("me", 1, "tcp://127.0.0.1:9", "tcp://127.0.0.1:0", "tcp://127.0.0.1:9")
    cat = ReplicatedCatalog(me, ctx, lambda info, origins: peers[info.name].snapshot(origins),
                            heartbeat_s=0.1, **kw)
    cat.start()
    return cat


def join(cat: ReplicatedCatalog, peer: RawPeer) -> None:
    cat.add_peer(peer.info, verified=True)  # as its hello would (its RPC is not real here)

    def synced() -> bool:
        peer.beat()  # until the subscription is up (slow joiner) and the snapshot applied
        return cat.peers[peer.name].synced

    until(synced, f"{peer.name} synced")


def test_gap_and_heartbeat_resyncs_keep_offering_the_last_known_state(ctx: zmqg.Context) -> None:
    p = RawPeer(ctx, "p")
    cat = make_catalog(ctx, {"p": p}, ttl_s=5.0)
    try:
        join(cat, p)
        p.put(record("A"))
        p.put(record("B"))
        until(lambda: {r.key for r in cat.records()} == {"A", "B"}, "A and B")
        seen: list[int] = []

        def count() -> None:
            while True:
                seen.append(len(cat.records()))
                gevent.sleep(0.005)

        watch = gevent.spawn(count)
        # (joining took no snapshot: p's heartbeat said it had published nothing yet)
        resyncs, snapshots = cat.stats["resyncs"], p.snapshots
        p.put(record("C"), send=False)  # lost on the way: the next update shows a gap
        p.put(record("D"))
        until(lambda: {r.key for r in cat.records()} == {"A", "B", "C", "D"}, "gap resync")
        assert cat.stats["resyncs"] == resyncs + 1 and p.snapshots == snapshots + 1
        p.put(record("E"), send=False)  # the last update lost: only a heartbeat tells
        p.beat()
        until(lambda: "E" in {r.key for r in cat.records()}, "heartbeat resync")
        assert cat.stats["resyncs"] == resyncs + 2 and p.snapshots == snapshots + 2
        watch.kill()
        assert len(seen) > 20 and min(seen) >= 2, "entries vanished while resyncing"
    finally:
        cat.stop()
        p.pub.close()


def test_the_vector_digest_on_heartbeats_follows_every_change(ctx: zmqg.Context) -> None:
    """The digest of our per-origin vector is cached between changes (it is on every
    heartbeat); it must still change with our own updates and with a member's."""
    p = RawPeer(ctx, "p")
    cat = make_catalog(ctx, {"p": p}, ttl_s=5.0)
    try:
        def fresh() -> str:
            d = cat.vdigest()
            assert d == vector_digest(cat.vector())
            return d

        before = fresh()
        join(cat, p)
        joined = fresh()
        p.put(record("A"))
        until(lambda: "A" in {r.key for r in cat.records()}, "A")
        theirs = fresh()
        cat.announce(record("M", owner="me"))
        ours = fresh()
        assert len({before, joined, theirs, ours}) == 4
        assert cat.vdigest() == ours  # no change since: the same (cached) digest
    finally:
        cat.stop()
        p.pub.close()


def test_members_silent_for_long_are_forgotten_unless_they_hold_entries(
        ctx: zmqg.Context) -> None:
    empty, holder = RawPeer(ctx, "empty"), RawPeer(ctx, "holder")
    holder.put(record("H", owner="holder"), send=False)
    cat = make_catalog(ctx, {"empty": empty, "holder": holder}, ttl_s=0.3, forget_after_s=0.8)
    try:
        join(cat, empty)
        join(cat, holder)
        assert {r.key for r in cat.records()} == {"H"}
        until(lambda: not any(v.alive for v in cat.nodes()[1:]), "both marked dead")
        until(lambda: "empty" not in {v.info.name for v in cat.nodes()}, "empty forgotten")
        gevent.sleep(0.5)
        assert {v.info.name for v in cat.nodes()} == {"me", "holder"}
        assert {r.key for r in cat.records(include_dead=True)} == {"H"}
        assert cat.stats["forgotten"] == 1
        join(cat, empty)  # it comes back: learned and followed again
        assert empty.name in {v.info.name for v in cat.nodes() if v.alive}
    finally:
        cat.stop()
        empty.pub.close()
        holder.pub.close()


def test_locate_counts_parts_whose_only_holder_is_dead() -> None:
    # nparts was never declared: only the dead member's record says part 1 exists.
    p0, p1 = record("SIM", "n1", part=0), record("SIM", "n2", part=1)
    live = locate("SIM", [p0], [p0, p1])
    assert not live.complete and live.missing == (1,) and live.shape == (4, 2)
    assert locate("SIM", [p0, p1], [p0, p1]).complete
    assert locate("SIM", [p0]).complete  # without that knowledge it looks whole


def test_locate_refuses_parts_that_do_not_tile() -> None:
    a = record("Q", "n1", part=0, shape=(3, 2))
    b = record("Q", "n1", part=1, shape=(2, 5), dtype="|i1")
    with pytest.raises(InvalidData, match="disagree"):
        locate("Q", [a, b])
    c = record("Q", "n2", part=1, shape=(2, 2), dtype="|i1")
    with pytest.raises(InvalidData, match="disagree"):
        locate("Q", [a, c])


def test_traffic_counters_are_bounded() -> None:
    t = Traffic()
    for i in range(MAX_PEERS + 500):
        t.sent(f"client-{i}", 1)
    assert len(t.bytes_sent) == MAX_PEERS + 1
    assert t.bytes_sent[OTHER] == 500 and sum(t.bytes_sent.values()) == MAX_PEERS + 500
    t.sent("client-0", 5)  # known peers keep their own counter
    assert t.bytes_sent["client-0"] == 6


def test_wildcard_listen_advertises_a_reachable_address(caplog: pytest.LogCaptureFixture) -> None:
    assert pick_host(["127.0.1.1", "127.0.0.1", "169.254.3.4", "10.1.2.3"]) == "10.1.2.3"
    assert pick_host(["127.0.1.1"]) is None
    assert advertised("tcp://0.0.0.0:7101", "node7.cluster") == "tcp://node7.cluster:7101"
    assert advertised("tcp://10.0.0.5:7101", None) == "tcp://10.0.0.5:7101"
    caplog.set_level(logging.INFO, "hpcflow.config")
    wildcard_host.cache_clear()
    host = advertised("tcp://0.0.0.0:7101", None).rsplit(":", 1)[0][len("tcp://"):]
    reachable = [a for a in interface_addresses() if not is_local_only(a)]
    if reachable:  # this host has one: it is used even if the host name maps to loopback
        assert not is_local_only(host)
    else:
        assert host == "127.0.0.1"
        assert "--advertise" in caplog.text
