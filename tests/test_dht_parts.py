"""The pieces of the DHT catalog (``--catalog dht``) in one process, on real UDP sockets.

Values and the version-aware storage (merging, stamps, MACs, garbage), and the
facade: kademlia's asyncio loop in its own thread, driven from gevent without
blocking the hub, across several real kademlia nodes on loopback.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import msgpack
import numpy as np
import pytest
from kademlia.utils import digest

from hpcflow.catalog.dht import keys as K
from hpcflow.catalog.dht.facade import MAX_MESSAGE, DhtFacade, store_message_size
from hpcflow.catalog.dht.storage import PointerStorage
from hpcflow.catalog.dht.values import (
    decode_value,
    encode_value,
    index_body,
    make_entry,
    parts_of,
    pointer_body,
    record_of,
)
from hpcflow.catalog.record import DatasetRecord
from hpcflow.config import timeout_scale
from hpcflow.errors import CatalogValueTooLarge, InvalidData

SCALE = timeout_scale()
EPOCH = 1_700_000_000_000_000_000


def rec(name: str = "D", part: int | None = None, owner: str = "n1") -> DatasetRecord:
    return DatasetRecord(name, part, owner, (4, 3), "<f8", 96, "xxh3:00", 4096)


def test_index_entries_of_two_holders_merge_and_newer_stamps_win() -> None:
    store = PointerStorage()
    key = K.index_key("D")
    a1 = make_entry(key, "a", (EPOCH, 1), index_body([0]), None)
    b1 = make_entry(key, "b", (EPOCH, 1), index_body([1]), None)
    a2 = make_entry(key, "a", (EPOCH, 2), index_body([]), None)  # a's tombstone
    store[digest(key)] = encode_value([a1])
    store[digest(key)] = encode_value([b1])  # kademlia would keep only this one
    held = decode_value(store.get(digest(key)), None, key)
    assert {(e.writer, tuple(parts_of(e))) for e in held} == {("a", (0,)), ("b", (1,))}
    store[digest(key)] = encode_value([a2])
    store[digest(key)] = encode_value([a1])  # late, older: must not resurrect a's part
    held = {e.writer: e for e in decode_value(store.get(digest(key)), None, key)}
    assert held["a"].tombstone and parts_of(held["b"]) == [1]
    assert store.stats["stale"] == 1


def test_pointer_keys_take_only_their_writer_and_macs_are_checked() -> None:
    secret = b"k" * 32
    store = PointerStorage(secret)
    key = K.pointer_key("D", 0, "n1")
    forged = make_entry(key, "rogue", (EPOCH, 9), pointer_body(rec(owner="rogue")), secret)
    unsigned = make_entry(key, "n1", (EPOCH, 9), pointer_body(rec(part=0)), None)
    good = make_entry(key, "n1", (EPOCH, 1), pointer_body(rec(part=0)), secret)
    for value in (encode_value([forged]), encode_value([unsigned]), b"\xc1garbage", b""):
        store[digest(key)] = value
    assert store.get(digest(key)) is None and store.stats["refused"] == 4
    store[digest(key)] = encode_value([good])
    [e] = decode_value(store.get(digest(key)), secret, key)
    got = record_of(e, "n1")
    assert got is not None and got.key == "D@0"
    # an entry written for another key is not accepted under this one
    other = make_entry(K.pointer_key("E", 0, "n1"), "n1", (EPOCH, 5), {}, secret)
    store[digest(key)] = encode_value([other])
    assert decode_value(store.get(digest(key)), secret, key) == [e]


def test_a_large_lineage_is_trimmed_to_fit_one_value() -> None:
    big = DatasetRecord("D", 0, "n1", (4, 3), "<f8", 96, "xxh3:00", 4096,
                        lineage={"slice_of": "S", "params": {"x": "y" * 20_000}})
    body = pointer_body(big)
    assert body["lineage"] == {"slice_of": "S", "lineage_trimmed": True}
    value = encode_value([make_entry(K.pointer_key("D", 0, "n1"), "n1", (EPOCH, 1), body,
                                     None)])
    assert store_message_size(value) < MAX_MESSAGE


@pytest.fixture
def facades() -> Iterator[list[DhtFacade]]:
    made: list[DhtFacade] = []
    try:
        for _ in range(5):
            f = DhtFacade(PointerStorage(), rpc_timeout_s=1.0, call_timeout_s=10 * SCALE)
            f.start()
            made.append(f)
        for f in made[1:]:
            assert f.bootstrap([("127.0.0.1", made[0].port)]) >= 1
        yield made
    finally:
        for f in made:
            f.stop()


def test_facade_set_get_across_nodes_without_blocking_the_hub(
        facades: list[DhtFacade]) -> None:
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.005)) for _ in range(10_000)])
    key = K.index_key("D")
    v1 = encode_value([make_entry(key, "a", (EPOCH, 1), index_body([0]), None)])
    v2 = encode_value([make_entry(key, "b", (EPOCH, 1), index_body([1]), None)])
    facades[1].set(key, v1)
    facades[2].set(key, v2)
    before = len(ticks)
    got = facades[4].get_many([key, K.index_key("nothing")])
    writers = {e.writer for v in got[key] for e in decode_value(v, None, key)}
    assert writers == {"a", "b"}  # both holders, though they wrote one key
    assert got[K.index_key("nothing")] == []
    # many concurrent greenlets each wait on their own wakeup; the hub kept running
    jobs = [gevent.spawn(facades[3].get_many, [key]) for _ in range(20)]
    gevent.joinall(jobs, raise_error=True)
    assert all(j.value[key] for j in jobs)
    assert len(ticks) > before
    ticker.kill()


def test_oversized_value_is_refused_before_sending(facades: list[DhtFacade]) -> None:
    key = K.pointer_key("D", 0, "n1")
    huge = encode_value([make_entry(key, "n1", (EPOCH, 1), {"x": "y" * 9000}, None)])
    with pytest.raises(CatalogValueTooLarge) as err:
        facades[0].set(key, huge)
    assert isinstance(err.value, InvalidData) and "8192" in str(err.value)
    assert facades[0].storage.get(digest(key)) is None  # nothing stored, even here
    assert facades[0].stats["sets"] == 0


def test_garbage_datagrams_do_not_stop_the_dht(facades: list[DhtFacade]) -> None:
    target = facades[2]
    junk = [b"", b"\x00", b"\x00" + b"x" * 20 + b"\xc1", b"\x00" + b"i" * 20
            + msgpack.packb(["store", [b"n" * 20, b"k" * 20, b"v"]]),
            b"\x00" + b"i" * 20 + msgpack.packb(["find_value", [1, 2]]),
            b"\x01" + b"r" * 20 + msgpack.packb(None),
            bytes(np.random.default_rng(1).integers(0, 256, 1400, dtype=np.uint8))]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for j in junk * 20:
            s.sendto(j, ("127.0.0.1", target.port))
    key = K.index_key("after")
    facades[0].set(key, encode_value([make_entry(key, "a", (EPOCH, 1), index_body([0]),
                                                 None)]))
    assert target.get_many([key])[key]  # still answers and stores
    assert target.storage.stats["refused"] >= 20  # the forged store was dropped


def test_an_entry_over_the_limit_is_refused_alone_and_the_rest_is_stored() -> None:
    """A real DhtCatalog (its membership a real ReplicatedCatalog, unstarted peers): a
    holder of 1500 scattered parts of one name has an index entry over one kademlia
    message; it is refused and counted, every pointer and the other name's entries of
    the same batch are stored, and nothing is left to republish for the refused one."""
    import zmq.green as zmqg

    from hpcflow.catalog.dht.catalog import DhtCatalog
    from hpcflow.catalog.membership import PeerInfo
    from hpcflow.catalog.replicated import ReplicatedCatalog

    ctx = zmqg.Context()
    me = PeerInfo("solo", EPOCH, "tcp://127.0.0.1:9", "", "")
    membership = ReplicatedCatalog(me, ctx, lambda info: {}, pub_bind="tcp://127.0.0.1:0")
    facade = DhtFacade(PointerStorage(), call_timeout_s=10 * SCALE)
    cat = DhtCatalog(membership, facade)
    cat.start()
    try:
        for p in range(0, 3000, 2):  # 1500 runs of one part each: ~10 KB of index entry
            cat.announce(DatasetRecord("WIDE", p, "solo", (1, 3), "<f8", 24, "xxh3:00",
                                       4096, nparts=3000))
        cat.announce(rec("SMALL", owner="solo"))
        deadline = time.monotonic() + 30 * SCALE
        while cat.stats["too_large"] < 1 or K.index_key("SMALL") not in cat.written:
            assert time.monotonic() < deadline, cat.stats
            gevent.sleep(0.05)
        gevent.sleep(0)
        held = facade.get_many([K.index_key("SMALL"), K.pointer_key("WIDE", 2998, "solo"),
                                K.index_key("WIDE")])
        assert held[K.index_key("SMALL")] and held[K.pointer_key("WIDE", 2998, "solo")]
        assert held[K.index_key("WIDE")] == []  # refused before anything was sent
        assert K.index_key("WIDE") not in cat.written and cat.stats["too_large"] == 1
    finally:
        cat.stop()
        ctx.destroy(linger=0)
