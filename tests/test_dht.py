"""``--catalog dht`` on a real 3-node cluster: pointers in a Kademlia DHT on loopback UDP.

What the DHT mode must get right beyond what the parametrised cluster and
workflow tests check in both modes: several holders of one name, deletes as
tombstones, republishing after a restart, liveness filtering of a dead holder's
pointers, and a daemon that keeps serving while garbage arrives at its UDP port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import umsgpack
from kademlia.utils import digest

import hpcflow
from hpcflow.catalog.dht import keys as K
from hpcflow.catalog.dht.facade import DhtFacade
from hpcflow.catalog.dht.storage import PointerStorage
from hpcflow.catalog.dht.values import (
    decode_value,
    encode_value,
    index_body,
    make_entry,
    merge,
    pointer_body,
)
from hpcflow.catalog.record import DatasetRecord
from tests.conftest import SCALE, Cluster, catalog_args, names_on, wait_for

EPOCH = time.time_ns()


@pytest.fixture
def dht(tmp_path: Path) -> Iterator[Cluster]:
    """Three DHT-mode nodes in a chain: n2 joins through n1, n3 through n2."""
    c = Cluster(tmp_path, extra=catalog_args("dht"))
    try:
        c.add("n1")
        c.add("n2", via="n1")
        c.add("n3", via="n2")
        c.wait_members()
        for n in ("n1", "n2", "n3"):  # and every DHT node has the other two as contacts
            wait_for(lambda n=n: dht_stats(c[n])["contacts"] >= 2, 10, f"{n}'s DHT joined")
        yield c
    finally:
        c.stop()


def dht_stats(node: Any) -> dict[str, Any]:
    with node.client() as c:
        return dict(c.stats()["catalog"]["dht"])


def udp_port(node: Any) -> int:
    return int(node.rpc.rsplit(":", 1)[1])


def owners(node: Any, name: str) -> dict[int | None, list[str]]:
    with node.client() as c:
        loc = c.locate(name)
    return {p["part"]: sorted(h["owner"] for h in p["holders"]) for p in loc["parts"]}


def test_two_holders_of_one_name_are_both_found(dht: Cluster) -> None:
    rows = np.arange(60, dtype=np.float64).reshape(20, 3)
    with dht["n1"].client() as a, dht["n2"].client() as b:
        a.put("TWO", rows[:8], part=0, nparts=2)
        b.put("TWO", rows[8:], part=1, nparts=2)  # both write TWO's one index key
    with dht["n3"].client() as c:
        loc = c.wait_for("TWO", 10)
        assert loc["complete"]
        assert owners(dht["n3"], "TWO") == {0: ["n1"], 1: ["n2"]}
        assert np.array_equal(c.fetch("TWO"), rows)
    # the pointers came from the DHT, not from a replica: n3 looked them up
    assert dht_stats(dht["n3"])["lookups"] >= 1


def test_delete_is_a_tombstone_and_a_later_put_wins_over_it(dht: Cluster) -> None:
    with dht["n2"].client() as c:
        c.put("TMP", np.zeros(8))
    wait_for(lambda: "TMP" in names_on(dht["n1"]), 10, "TMP on n1")
    with dht["n2"].client() as c:
        c.delete("TMP")
    # gone from the listing and from lookups, also counting dead holders: the holder is
    # alive, so only the tombstone can hide its (undeletable) old pointer
    wait_for(lambda: "TMP" not in names_on(dht["n1"], include_dead=True), 10, "TMP gone")

    def not_found() -> bool:
        with dht["n1"].client() as c:
            try:
                c.locate("TMP")
            except hpcflow.DatasetNotFound:
                return True
            return False

    wait_for(not_found, 10, "TMP not found on n1")
    with dht["n2"].client() as c:
        c.put("TMP", np.ones(8))  # a newer stamp than the tombstone
    with dht["n1"].client() as c:
        wait_for(lambda: "TMP" in names_on(dht["n1"]), 10, "TMP back on n1")
        assert np.array_equal(c.fetch("TMP"), np.ones(8))


def test_dead_holder_is_excluded_and_its_restart_republishes(dht: Cluster) -> None:
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    with dht["n1"].client() as c:
        c.put("SIM", rows[:6], part=0, nparts=2)
    with dht["n3"].client() as c:
        c.put("SIM", rows[6:], part=1, nparts=2)
        c.put("ON3", np.ones((3, 2)))
    with dht["n2"].client() as c:
        c.wait_for("SIM", 10)
        wait_for(lambda: "ON3" in names_on(dht["n2"]), 10, "ON3 on n2")
    dht["n3"].kill(signal.SIGKILL)  # its pointers stay in the DHT (no delete there)
    with dht["n2"].client() as c:
        wait_for(lambda: not any(n["alive"] for n in c.nodes() if n["name"] == "n3"), 10,
                 "n3 marked dead")
        # within the cache's TTL the dead holder's pointer is already filtered out
        loc = c.locate("SIM")
        assert loc["missing"] == [1] and [p["part"] for p in loc["parts"]] == [0]
        with pytest.raises(hpcflow.DatasetNotFound, match="only on n3, which is not alive"):
            c.fetch("ON3")
        assert "ON3" not in names_on(dht["n2"])
        assert "ON3" in names_on(dht["n2"], include_dead=True)
    dht["n3"].start()  # same data dir, new ports (a new DHT node id and UDP port too)
    with dht["n1"].client() as c:
        c.wait_for("SIM", 15)
        assert np.array_equal(c.fetch("SIM"), rows)
        wait_for(lambda: "ON3" in names_on(dht["n1"]), 15, "ON3 back on n1")
    # what the DHT holds for ON3 now was written by n3's new run (its new epoch), not
    # left over from the killed one: read it as a DHT node of our own would
    with dht["n3"].client() as c:
        epoch = c.info()["epoch"]
    reader = DhtFacade(PointerStorage(), rpc_timeout_s=1.0, call_timeout_s=10 * SCALE)
    reader.start()
    try:
        reader.bootstrap([("127.0.0.1", udp_port(dht["n1"]))])

        def newest(key: str) -> Any:
            values = reader.get_many([key])[key]
            return merge([e for v in values for e in decode_value(v, None, key)], "n3")

        for key in (K.index_key("ON3"), K.pointer_key("ON3", None, "n3")):
            # republished by the new run as its routing table fills (within seconds)
            [entry] = wait_for(lambda key=key: [e for e in newest(key)
                                                if e.stamp[0] == epoch], 10,
                               f"{key} from n3's new run")
            assert not entry.tombstone
    finally:
        reader.stop()


def send_store(port: int, key: str, value: bytes) -> None:
    """A kademlia ``store`` request as rpcudp frames it, from a socket that is no node."""
    frame = b"\x00" + os.urandom(20) + umsgpack.packb(["store", [os.urandom(20),
                                                                 digest(key), value]])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(frame, ("127.0.0.1", port))


def test_garbage_and_forged_datagrams_at_the_dht_port(dht: Cluster) -> None:
    port = udp_port(dht["n2"])
    # Without keys anyone can write (as anyone can reach the other ports), but a pointer
    # of a node that is not a live member is never offered, and a writer other than the
    # one a pointer key names is refused by the storing node.
    ghost = DatasetRecord("GHOST", None, "ghost", (2,), "<f8", 16, "xxh3:00", 4096)
    send_store(port, K.index_key("GHOST"), encode_value(
        [make_entry(K.index_key("GHOST"), "ghost", (EPOCH, 1), index_body([None]), None)]))
    send_store(port, K.pointer_key("GHOST", None, "ghost"), encode_value(
        [make_entry(K.pointer_key("GHOST", None, "ghost"), "ghost", (EPOCH, 1),
                    pointer_body(ghost), None)]))
    send_store(port, K.pointer_key("X", None, "n1"), encode_value(
        [make_entry(K.pointer_key("X", None, "n1"), "ghost", (EPOCH, 1),
                    pointer_body(ghost), None)]))
    wait_for(lambda: dht_stats(dht["n2"])["storage"]["refused"] >= 1, 10,
             "the forged pointer refused")
    with dht["n2"].client() as c, pytest.raises(hpcflow.DatasetNotFound,
                                                 match="only on ghost, which is not alive"):
        c.locate("GHOST")
    junk = [b"", b"\x00", b"\x02" + b"x" * 40, b"\x00" + b"i" * 20 + b"\xc1\xc1",
            b"\x00" + b"i" * 20 + umsgpack.packb(["find_value", [1]]),
            b"\x00" + b"i" * 20 + umsgpack.packb(["store", ["a", "b", 3]]),
            b"\x00" + b"i" * 20 + umsgpack.packb(["nosuch", []]),
            b"\x01" + b"r" * 20 + umsgpack.packb([1, 2, 3]),
            bytes(np.random.default_rng(7).integers(0, 256, 1400, dtype=np.uint8))]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(30):
            for j in junk:
                s.sendto(j, ("127.0.0.1", port))
    wait_for(lambda: dht_stats(dht["n2"])["loop_errors"] >= 10, 10, "the garbage handled")
    with dht["n1"].client() as c:
        c.put("AFTER", np.arange(5.0))
    with dht["n2"].client() as c:
        c.wait_for("AFTER", 10)
        assert np.array_equal(c.fetch("AFTER"), np.arange(5.0))
    with dht["n3"].client() as c:  # and n2 still serves its part of the DHT to others
        c.wait_for("AFTER", 10)
    assert dht["n2"].alive()


def test_status_shows_the_dht_mode(dht: Cluster) -> None:
    out = subprocess.run([sys.executable, "-m", "hpcflow", "status", "--node", dht["n1"].rpc],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "(catalog dht)" in out


def test_with_keys_entries_need_the_cluster_mac(tmp_path: Path, keys: Path) -> None:
    """With --keys, pointers carry an HMAC under a key derived from the node secret: the
    cluster's own work end to end, and an unsigned or wrongly signed store is refused."""
    c = Cluster(tmp_path, extra=[*catalog_args("dht"), "--keys", str(keys)])
    try:
        c.add("n1")
        c.add("n2", via="n1")
        with c["n2"].client(keys=str(keys)) as k:
            wait_for(lambda: {n["name"] for n in k.nodes() if n["alive"]} == {"n1", "n2"},
                     15, "the keyed nodes to see each other")
            wait_for(lambda: k.stats()["catalog"]["dht"]["contacts"] >= 1, 10, "DHT joined")
        with c["n1"].client(keys=str(keys)) as k:
            k.put("SIGNED", np.arange(6.0))
        port = udp_port(c["n2"])
        forged = DatasetRecord("FORGED", None, "n1", (2,), "<f8", 16, "xxh3:00", 4096)
        for secret in (None, b"not the cluster's key" * 2):
            send_store(port, K.index_key("FORGED"), encode_value(
                [make_entry(K.index_key("FORGED"), "n1", (EPOCH, 1), index_body([None]),
                            secret)]))
            send_store(port, K.pointer_key("FORGED", None, "n1"), encode_value(
                [make_entry(K.pointer_key("FORGED", None, "n1"), "n1", (EPOCH, 1),
                            pointer_body(forged), secret)]))
        with c["n2"].client(keys=str(keys)) as k:
            wait_for(lambda: k.stats()["catalog"]["dht"]["storage"]["refused"] >= 4, 10,
                     "the four forged stores refused")
            k.wait_for("SIGNED", 10)  # the cluster's own signed entries are accepted
            assert np.array_equal(k.fetch("SIGNED"), np.arange(6.0))
            with pytest.raises(hpcflow.DatasetNotFound, match="no live node holds"):
                k.locate("FORGED")  # not even as a dead holder's: nothing was stored
    finally:
        c.stop()


def test_dht_mode_start_up_errors_name_the_problem(tmp_path: Path) -> None:
    def node(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpcflow", "node", "--catalog", "dht",
                               "--data-dir", str(tmp_path / "d"), *args],
                              capture_output=True, text=True, timeout=60)

    r = node("--listen", f"ipc://{tmp_path}/n.sock")
    assert r.returncode == 1 and "--catalog dht needs a TCP --listen" in r.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        r = node("--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1 and f"cannot bind UDP port {port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_one_hop_writes_and_reads_go_to_the_k_members_nearest_the_key() -> None:
    """With every member's id known (the membership), a write is stored on exactly the
    k members nearest the key by XOR distance and a read asks them in one round: the
    set a Kademlia lookup converges to, without its rounds.  Ten real DHT nodes on
    loopback UDP, k = 3 (a crawl-free write that picked other nodes, or a read that
    asked others, would miss)."""
    from hpcflow.catalog.dht.facade import member_id

    ids = [member_id(f"tcp://n{i}:1") for i in range(10)]
    nodes = [DhtFacade(PointerStorage(), rpc_timeout_s=1.0, call_timeout_s=10 * SCALE,
                       ksize=3, node_id=i) for i in ids]
    try:
        for f in nodes:
            f.start()
        addrs = [("127.0.0.1", f.port) for f in nodes]
        for k, f in enumerate(nodes):
            f.set_allowed({a: i for j, (a, i) in enumerate(zip(addrs, ids, strict=True))
                           if j != k})
        crawled = []  # find_node requests: a crawl's rounds (one-hop makes none)
        for f in nodes:
            proto = f.server.protocol
            proto.rpc_find_node = (lambda *a, _p=proto: crawled.append(a)
                                   or type(_p).rpc_find_node(_p, *a))
        key = K.index_key("ONEHOP")
        dkey = digest(key)
        value = encode_value([make_entry(key, "n0", (EPOCH, 1), index_body([None]), None)])
        nearest = sorted(range(1, 10), key=lambda j: int.from_bytes(ids[j], "big")
                         ^ int.from_bytes(dkey, "big"))[:3]
        assert nodes[0].set(key, value)
        holders = {j for j, f in enumerate(nodes) if f.storage.get(dkey) is not None}
        assert holders == {0, *nearest}  # the writer keeps its own copy
        reader = next(j for j in range(1, 10) if j not in nearest)
        assert nodes[reader].get_many([key])[key] == [nodes[nearest[0]].storage.get(dkey)]
        nodes[0].stop()  # found on the nearest alone, not through the writer
        assert len(nodes[reader].get_many([key])[key]) == 1
        assert not crawled
        # a nearest member that stops answering (the membership still lists it) is
        # passed over after one timeout: the next nearest is asked instead
        gone = nearest[0]
        nodes[gone].stop()
        assert len(nodes[reader].get_many([key])[key]) == 1  # waited for it once
        targets = nodes[reader]._targets(dkey)
        assert targets is not None and addrs[gone] not in {(n.ip, n.port) for n in targets}
        assert len(targets) == 3
    finally:
        for f in nodes:
            f.stop()
