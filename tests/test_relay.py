"""The replicated catalog through a bounded fan-in overlay (issue 12, item 1): each node
follows at most ``fanin()`` members and relays what it accepts, updates stay
authentic through relays and third-party snapshots, a joiner takes one snapshot.

Real daemons on loopback; ``HPCFLOW_CATALOG_FANIN`` (test-only) makes the fan-in
smaller than the cluster so that relaying is what carries updates.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
import zmq.green as zmqg

from hpcflow.catalog.membership import FANIN_ENV, HB_FANIN, PeerInfo, heard_members
from hpcflow.catalog.replicated import SNAPSHOT_SLOTS, ReplicatedCatalog
from hpcflow.errors import CatalogBusy, PeerUnavailable
from hpcflow.rpc import strict
from tests.conftest import SCALE, TTL, Cluster, NodeProc, names_on, wait_for
from tests.test_rogue_peer import Rogue


def _cat(node: NodeProc) -> dict[str, Any]:
    with node.client() as c:
        return dict(c.stats()["catalog"])


def _start_all(c: Cluster, names: list[str], via: str) -> None:
    """Start several daemons at once, all joining through ``via``."""
    procs = [NodeProc(n, c.root / n, [c[via].rpc], [*c.extra]) for n in names]
    for p in procs:
        c.nodes[p.name] = p
        p.launch()
    for p in procs:
        p.wait_ready(60)


@pytest.fixture
def fanin2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FANIN_ENV, "2")


def test_updates_reach_every_node_through_relays(tmp_path: Path, fanin2: None) -> None:
    c = Cluster(tmp_path)
    try:
        c.add("r0")
        _start_all(c, [f"r{i}" for i in range(1, 7)], via="r0")
        c.wait_members(30)
        nodes = [c[n] for n in sorted(c.nodes)]
        wait_for(lambda: not any(_cat(n)["unsynced"] for n in nodes), 15, "all synced")
        for n in nodes:
            # nobody pulled anyone's table while forming: a new member's own endpoint
            # said it had published nothing when it was verified (or its heartbeat did)
            assert _cat(n)["resyncs"] == 0, n.name

        def ops_known(n: NodeProc) -> bool:
            # the planner delegates only to members whose ops it knows: each node hears
            # the heartbeats of 2 of its 6 peers, the others' ops come with their pings
            with n.client() as cl:
                return all(m["ops"].get("fft") for m in cl.nodes())

        for n in nodes:
            wait_for(lambda n=n: ops_known(n), 10, f"{n.name} to know every member's ops")
        with nodes[3].client() as cl:
            cl.put("EVERYWHERE", np.arange(5.0))
        for n in nodes:
            wait_for(lambda n=n: "EVERYWHERE" in names_on(n), 15, f"the put on {n.name}")
        stats = {n.name: _cat(n) for n in nodes}
        for name, st in stats.items():  # at most FANIN SUB sockets each
            assert 1 <= st["followed"] <= 2, (name, st["followed"])
        # 6 others know it, and r3 feeds at most two of them directly: the rest had it
        # from a relay (every node relays each update it accepts once)
        relayed = sum(st["relayed"] for name, st in stats.items() if name != "r3")
        assert relayed >= 6
        assert all(st["forged"] == 0 for st in stats.values())
        # every node still finds every other alive, and sees the same catalog
        with nodes[0].client() as cl:
            assert cl.fetch("EVERYWHERE").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    finally:
        c.stop()


def test_killing_a_relay_mid_stream_loses_no_update(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fan-in of 1 every node follows only its ring successor: r4's updates reach
    r2, r1 and r0 through r3 alone.  r3 is killed while r4 keeps putting; what r3 never
    relayed is pulled (gap repair, anti-entropy), and no update is lost."""
    monkeypatch.setenv(FANIN_ENV, "1")
    c = Cluster(tmp_path)
    try:
        c.add("r0")
        _start_all(c, ["r1", "r2", "r3", "r4"], via="r0")
        c.wait_members(30)
        r4, r3, r2 = c["r4"], c["r3"], c["r2"]
        assert all(_cat(c[n])["followed"] == 1 for n in c.nodes)
        puts: list[str] = []
        with r4.client() as cl:
            for i in range(5):
                puts.append(f"U{i}")
                cl.put(f"U{i}", np.arange(3.0))
            wait_for(lambda: set(puts) <= names_on(c["r0"]), 15, "the first puts on r0")
            before = _cat(r2)["sections_pulled"]
            r3.kill(signal.SIGKILL)
            for i in range(5, 40):  # while r2 still waits on r3's dead stream
                puts.append(f"U{i}")
                cl.put(f"U{i}", np.arange(3.0))
        rest = [c[n] for n in ("r0", "r1", "r2", "r4")]
        for n in rest:
            wait_for(lambda n=n: set(puts) <= names_on(n), 20 + TTL,
                     f"every put on {n.name}")
        assert _cat(r2)["sections_pulled"] > before  # r2 repaired what r3 never relayed
        with c["r0"].client() as cl:
            assert cl.fetch("U39").tolist() == [0.0, 1.0, 2.0]
    finally:
        c.stop()


def test_a_joiner_takes_one_snapshot(tmp_path: Path, fanin2: None) -> None:
    c = Cluster(tmp_path)
    try:
        c.add("j0")
        _start_all(c, ["j1", "j2", "j3"], via="j0")
        c.wait_members(30)
        for n in ("j0", "j1", "j2", "j3"):
            with c[n].client() as cl:
                cl.put(f"D-{n}", np.arange(4.0))
        want = {f"D-j{i}" for i in range(4)}
        wait_for(lambda: want <= names_on(c["j0"]), 15, "every put on j0")
        members = ("j0", "j1", "j2", "j3")
        wait_for(lambda: all(_cat(c[n])["snapshots"] == 1 for n in members[1:]), 10,
                 "the first joiners to take their snapshots")
        served0 = sum(_cat(c[n])["snapshots_served"] for n in members)
        joiner = c.add("new", via="j1")
        wait_for(lambda: want <= names_on(joiner), 15, "the joiner to hold the catalog")
        st = _cat(joiner)
        assert st["snapshots"] == 1
        assert st["resyncs"] == 0  # no origin was pulled one by one
        assert sum(_cat(c[n])["snapshots_served"] for n in members) == served0 + 1
    finally:
        c.stop()


def test_snapshots_served_at_once_are_bounded(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        # a long heartbeat period: the SNAPSHOT_SLOTS calls below surely fall in one
        n = c.add("s0", extra=["--heartbeat", "5", "--ttl", "20"])
        with strict.Client(timeout=10 * SCALE) as raw:
            raw.connect(n.rpc)
            for _ in range(SNAPSHOT_SLOTS):
                assert raw.call("snapshot")["origins"][0]["info"]["name"] == "s0"
            with pytest.raises(CatalogBusy, match="ask another member"):
                raw.call("snapshot")
            # a section, or the vector, is not a full snapshot: still served
            assert raw.call("snapshot", ["s0"])["origins"][0]["seq"] == 0
            assert raw.call("snapshot", [])["vector"]["s0"][1] == 0
        assert _cat(n)["snapshots_refused"] == 1
    finally:
        c.stop()


@pytest.fixture
def ctx() -> Iterator[zmqg.Context]:
    ctx = zmqg.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_a_busy_member_makes_the_joiner_ask_another(ctx: zmqg.Context) -> None:
    """In process: the member a joiner came through answers CatalogBusy; the joiner
    takes the catalog from another member instead (and only from it)."""
    asked: list[str] = []
    a = PeerInfo("a", 5, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9", "tcp://127.0.0.1:9")
    b = PeerInfo("b", 6, "tcp://127.0.0.1:8", "tcp://127.0.0.1:8", "tcp://127.0.0.1:8")

    def fetch(info: PeerInfo, origins: list[str] | None) -> dict[str, Any]:
        asked.append(info.name)
        if info.name == "a":
            raise CatalogBusy("a is serving 4 catalog snapshots already: ask another member")
        if info.name == "b":
            return {"origins": []}
        raise PeerUnavailable(info.name)

    me = PeerInfo("me", 1, "tcp://127.0.0.1:7", "tcp://127.0.0.1:0", "tcp://127.0.0.1:7")
    cat = ReplicatedCatalog(me, ctx, fetch, heartbeat_s=0.05)
    cat.start()
    try:
        cat.add_peer(a, verified=True)
        cat.add_peer(b, verified=True)
        cat.bootstrap(a)
        with gevent.Timeout(5 * SCALE):
            while not cat._bootstrapped:
                gevent.sleep(0.01)
        assert asked[:2] == ["a", "b"] and cat.stats["snapshots"] == 1
    finally:
        cat.stop()


def test_a_member_cannot_relay_forged_updates_of_another(tmp_path: Path) -> None:
    """A rogue member publishes, as a relay would pass them on, v's next updates (v's
    epoch and sequence numbers): a record FORGED owned by v, and the deletion of v's
    real record.  Signed with its own key, not v's: every node drops them."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        v = c.add("v", via="n1")
        with v.client() as cl:
            cl.put("REAL", np.arange(3.0))
        wait_for(lambda: "REAL" in names_on(n1), 10, "v's put on n1")
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc], {"forge_relay": "v"})
        c.nodes["evil"] = rogue
        rogue.start()
        c.wait_members()
        n3 = c.add("n3", via="n1")
        for n in (n1, n3):
            wait_for(lambda n=n: _cat(n)["forged"] >= 4, 10, f"{n.name} to drop forgeries")
            assert "REAL" in names_on(n) and "FORGED" not in names_on(n)
        with v.client() as cl:  # v's own next update is not taken for a duplicate
            cl.put("AFTER", np.arange(2.0))
        for n in (n1, n3):
            wait_for(lambda n=n: "AFTER" in names_on(n), 10, f"v's next put on {n.name}")
            names = names_on(n)
            assert "REAL" in names and "FORGED" not in names
        assert rogue.alive()
    finally:
        c.stop()


def test_a_snapshot_served_by_a_third_node_cannot_forge_records(tmp_path: Path) -> None:
    """A joiner takes its catalog from a rogue member whose snapshot gives, in v's
    section, a record FORGED instead of v's real ones.  The joiner refuses that section
    (not v's signature) and gets v's real records from v."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        v = c.add("v", via="n1")
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc], {"forge_snapshot": "v"})
        c.nodes["evil"] = rogue
        rogue.start()
        with v.client() as cl:
            cl.put("REAL", np.arange(3.0))
        wait_for(lambda: "REAL" in names_on(n1), 10, "v's put on n1")
        c.wait_members()
        joiner = c.add("new", via="evil")
        wait_for(lambda: "REAL" in names_on(joiner), 15, "v's record on the joiner")
        st = _cat(joiner)
        assert st["forged"] >= 1 and st["snapshots"] == 1
        assert "FORGED" not in names_on(joiner)
        with joiner.client() as cl:
            assert cl.fetch("REAL").tolist() == [0.0, 1.0, 2.0]
    finally:
        c.stop()


def test_heard_members_are_the_successor_and_stable_rendezvous_picks() -> None:
    """Whose heartbeats a node takes beyond a full mesh (pure logic): its ring successor
    and HB_FANIN - 1 rendezvous-hash picks; every node is heard by its predecessor, and
    a join moves few nodes' choices (an offset in name order moved a third of them, each
    a SUB socket re-made while a cluster forms)."""
    names = [f"s{i:03d}" for i in range(256)]
    chosen = {n: heard_members(n, names) for n in names}
    for i, n in enumerate(names):
        assert names[(i + 1) % len(names)] in chosen[n] and n not in chosen[n]
        assert 1 <= len(chosen[n]) <= HB_FANIN
    assert heard_members("s000", names, 1) == {"s001"}
    grown = [*names, "s128b"]  # a newcomer in the middle of the name order
    moved = [n for n in names if n != "s128" and heard_members(n, grown) != chosen[n]]
    assert len(moved) <= 12, moved  # the expected number is about 2
    heard_by = {n: sum(n in c for c in chosen.values()) for n in names}
    assert sum(heard_by.values()) / len(names) > 2.5  # about HB_FANIN watchers each
