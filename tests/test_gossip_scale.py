"""The replicated catalog's idle cost per node does not grow with the cluster (issue 12).

Real daemons on loopback: a cluster of 10 grows to 24 (the 14 newcomers start at
once, all through one seed), and the heartbeats each node receives per second stay
the same (each follows at most FANIN members and takes the heartbeats of HB_FANIN of
them; a full mesh of heartbeats would multiply them by 23/9); a put on one node is
seen by all (relayed); a killed node is found dead by every other: by the few that
take its heartbeats, and by the rest from their news, each checking with a probe.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from hpcflow.catalog.membership import FANIN, HB_FANIN
from tests.conftest import SCALE, Cluster, NodeProc, names_on, wait_for

HB = 0.5  # slower than the suite's 0.2 s: 24 daemons share two loaded cores
TTL = 2.5 * SCALE
SMALL, LARGE = 10, 24
EXTRA = ["--heartbeat", str(HB), "--ttl", str(TTL)]


def _counters(nodes: list[NodeProc]) -> dict[str, tuple[float, int]]:
    out = {}
    for n in nodes:
        with n.client() as c:
            out[n.name] = (time.monotonic(), int(c.stats()["catalog"]["heartbeats_received"]))
    return out


def _settled(nodes: list[NodeProc]) -> bool:
    """No node has membership news left to spread (each heartbeat is an idle one)."""
    for n in nodes:
        with n.client() as c:
            if c.stats()["catalog"]["news_pending"]:
                return False
    return True


def _rate(nodes: list[NodeProc], window_s: float) -> float:
    """Mean heartbeats received per node per second over ``window_s``, once idle."""
    wait_for(lambda: _settled(nodes), 30, "every node to heartbeat at its idle interval")
    before = _counters(nodes)
    time.sleep(window_s)  # a measurement window, not synchronisation
    after = _counters(nodes)
    rates = [(after[k][1] - before[k][1]) / (after[k][0] - before[k][0]) for k in before]
    return sum(rates) / len(rates)


def _add_many(cluster: Cluster, names: list[str], via: str) -> None:
    """Start several daemons at once (all joining through ``via``)."""
    peers = [cluster[via].rpc]
    procs = [NodeProc(n, cluster.root / n, peers, EXTRA) for n in names]
    for p in procs:
        cluster.nodes[p.name] = p
    for p in procs:
        p.launch()
    for p in procs:
        p.wait_ready(60)


def _all_alive(nodes: list[NodeProc], expect: set[str]) -> bool:
    for n in nodes:
        with n.client() as c:
            if {m["name"] for m in c.nodes() if m["alive"]} != expect:
                return False
    return True


def test_idle_messages_per_node_do_not_grow_and_the_cluster_converges(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        cluster.add("g00", extra=EXTRA)
        _add_many(cluster, [f"g{i:02d}" for i in range(1, SMALL)], via="g00")
        nodes = [cluster[n] for n in cluster.nodes]
        wait_for(lambda: _all_alive(nodes, set(cluster.nodes)), 40, f"{SMALL} nodes to form")
        small = _rate(nodes, 8 * HB)

        _add_many(cluster, [f"g{i:02d}" for i in range(SMALL, LARGE)], via="g00")
        nodes = [cluster[n] for n in cluster.nodes]
        t0 = time.monotonic()
        wait_for(lambda: _all_alive(nodes, set(cluster.nodes)), 60, f"{LARGE} nodes to form")
        formed = time.monotonic() - t0
        wait_for(lambda: _settled(nodes), 30, "every node to heartbeat at its idle interval")
        ae_before = {}
        for n in nodes:
            with n.client() as c:
                ae_before[n.name] = int(c.stats()["catalog"]["anti_entropy"])
        large = _rate(nodes, 8 * HB)
        # Each node now receives HB_FANIN heartbeats per period at both sizes; a full
        # mesh would receive (LARGE-1)/(SMALL-1) = 2.6 times as many at 24.
        assert large < 1.4 * small, (small, large)
        assert large < 1.5 * HB_FANIN / HB, (large, HB_FANIN / HB)
        rounds = 0  # anti-entropy vector requests since the window began
        for n in nodes:
            with n.client() as c:
                cat = c.stats()["catalog"]
                assert cat["followed"] <= FANIN and cat["heard"] <= HB_FANIN, cat
                rounds += cat["anti_entropy"] - ae_before.get(n.name, 0)
        # Idle and in agreement, the digests on the heartbeats a node takes match its
        # own: no vector round trips (asking a random member made one per node every
        # ANTI_ENTROPY_EVERY periods, ~LARGE * 0.8 in this window).
        assert rounds <= LARGE // 4, rounds
        print(f"formed {LARGE} in {formed:.1f} s; heartbeats received per node per s: "
              f"{small:.1f} at {SMALL}, {large:.1f} at {LARGE}")

        # A put on one node is seen by every other.
        with nodes[5].client() as c:
            c.put("everywhere", np.arange(10.0))
        wait_for(lambda: all("everywhere" in names_on(n) for n in nodes), 20,
                 "the put to be visible on every node")

        # A killed node is dead to every other: the few that take its heartbeats find
        # it silent after TTL (or their stream's connection drops), and pass the news
        # on; each receiver believes it after a probe of its own.
        victim = nodes.pop(7)
        victim.kill(signal.SIGKILL)
        t0 = time.monotonic()
        rest = {n.name for n in nodes}
        wait_for(lambda: _all_alive(nodes, rest), 20, "every node to find the killed one dead")
        detected = time.monotonic() - t0
        print(f"killed node dead everywhere after {detected:.1f} s")
        assert detected < 2 * TTL
    finally:
        cluster.stop()
