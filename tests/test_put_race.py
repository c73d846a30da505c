"""Puts racing for one name, with real daemons (issue 11, item 5).

Two clients put the same new name (or the same part) through two different
nodes at the same instant: exactly one is acknowledged, the other gets
``DatasetExists`` and nothing of its data is stored; every node serves the
winner's bytes.  A name whose holder is down cannot be taken by another node.
Two sides of a partition that both took a name see a ``DatasetConflict`` on
read once they meet, never one side's bytes in place of the other's.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import gevent
import numpy as np
import pytest

import hpcflow
from hpcflow.errors import DatasetConflict
from tests.conftest import SCALE, TTL, Cluster, NodeProc, names_on, wait_for

MakeCluster = Callable[[], Cluster]

ROUNDS = 12


def _race(nodes: list[NodeProc], name: str, arrays: list[Any], **kw: Any) -> list[Any]:
    """Put ``arrays[i]`` through ``nodes[i]``, all at once; each result or error."""
    clients = [n.client() for n in nodes]
    try:
        start = gevent.event.Event()

        def put(i: int) -> Any:
            start.wait()
            try:
                return clients[i].put(name, arrays[i], **kw)
            except hpcflow.HpcflowError as exc:
                return exc

        gs = [gevent.spawn(put, i) for i in range(len(nodes))]
        gevent.sleep(0)
        start.set()
        gevent.joinall(gs, raise_error=True)
        return [g.value for g in gs]
    finally:
        for cl in clients:
            cl.close()


def _fetch_everywhere(cluster: Cluster, name: str, part: int | None = None) -> list[Any]:
    out = []
    for n in cluster.nodes.values():
        with n.client() as c:  # type: ignore[attr-defined]
            wait_for(lambda c=c: name in {r.name for r in c.catalog()}, 10, f"{name} on {n.name}")
            out.append(c.fetch(name, part))
    return out


def test_same_new_name_put_through_two_nodes_at_once(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    for r in range(ROUNDS):
        name = f"RACE{r}"
        arrays = [np.full((50, 4), 1.0 + r), np.full((70, 4), -1.0 - r)]
        results = _race([n1, n2], name, arrays)
        errors = [x for x in results if isinstance(x, Exception)]
        assert len(errors) == 1, f"round {r}: {results}"
        assert isinstance(errors[0], hpcflow.DatasetExists), errors[0]
        winner = next(i for i, x in enumerate(results) if not isinstance(x, Exception))
        loser = (n1, n2)[1 - winner]
        for got in _fetch_everywhere(cluster, name):  # the loser's client included
            np.testing.assert_array_equal(got, arrays[winner])
        assert not list((loser.data_dir / "datasets").glob(f"*{name}*"))  # not even a temp
        with loser.client() as c:
            holders = {h["owner"] for p in c.locate(name)["parts"] for h in p["holders"]}
        assert holders == {("n1", "n2")[winner]}


def test_same_part_put_through_two_nodes_at_once(cluster: Cluster) -> None:
    n1, n3 = cluster["n1"], cluster["n3"]
    for r in range(ROUNDS // 2):
        name = f"PARTS{r}"
        arrays = [np.full((10, 3), 7.0), np.full((20, 3), 9.0)]
        results = _race([n1, n3], name, arrays, part=0, nparts=2)
        errors = [x for x in results if isinstance(x, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], hpcflow.DatasetExists), results
        winner = next(i for i, x in enumerate(results) if not isinstance(x, Exception))
        for got in _fetch_everywhere(cluster, name, part=0):
            np.testing.assert_array_equal(got, arrays[winner])


def test_different_parts_at_once_both_succeed_unless_they_disagree(cluster: Cluster) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    rows = np.arange(40.0).reshape(20, 2)
    c1, c2 = n1.client(), n2.client()
    try:
        gs = [gevent.spawn(c1.put, "SIB", rows[:10], part=0, nparts=2),
              gevent.spawn(c2.put, "SIB", rows[10:], part=1, nparts=2)]
        gevent.joinall(gs, raise_error=True)
        with cluster["n3"].client() as c:
            wait_for(lambda: c.locate("SIB")["complete"], 10, "both parts")
            np.testing.assert_array_equal(c.fetch("SIB"), rows)
        # Sibling parts of different dtypes raced: never both stored.
        gs = [gevent.spawn(c1.put, "ODD", np.zeros((4, 2)), part=0),
              gevent.spawn(c2.put, "ODD", np.zeros((4, 2), dtype=np.int32), part=1)]
        gevent.joinall(gs)
        oks = [g for g in gs if g.successful()]
        assert len(oks) == 1, [g.exception for g in gs]
        assert isinstance(next(g for g in gs if not g.successful()).exception,
                          hpcflow.InvalidData)
    finally:
        c1.close()
        c2.close()


def test_a_name_whose_holder_is_down_is_not_taken(cluster: Cluster) -> None:
    n1, n2, n3 = cluster["n1"], cluster["n2"], cluster["n3"]
    mine = np.arange(12.0).reshape(3, 4)
    with n1.client() as c:
        c.put("HELD", mine)
        c.put("PARTED", mine, part=0, nparts=2)
    wait_for(lambda: {"HELD", "PARTED@0"} <= names_on(n2), 10, "n1's data on n2")
    n1.kill(signal.SIGKILL)
    with n2.client() as c:
        wait_for(lambda: not {n["name"]: n["alive"] for n in c.nodes()}["n1"], 10 + TTL,
                 "n1 marked dead")
        with pytest.raises(hpcflow.DatasetExists, match="n1, which is not alive"):
            c.put("HELD", np.zeros((3, 4)))
        with pytest.raises(hpcflow.DatasetExists, match="n1, which is not alive"):
            c.put("PARTED", np.zeros((3, 4)), part=0)
        c.put("PARTED", np.ones((3, 4)), part=1)  # its other part is free
    n1.start()
    with n3.client() as c:
        wait_for(lambda: "HELD" in {r.name for r in c.catalog()}, 10, "n1 back")
        np.testing.assert_array_equal(c.fetch("HELD"), mine)
        wait_for(lambda: c.locate("PARTED")["complete"], 10, "both parts of PARTED")
        np.testing.assert_array_equal(c.fetch("PARTED"), np.vstack([mine, np.ones((3, 4))]))


def test_a_name_taken_on_both_sides_of_a_partition_is_a_conflict(
        make_cluster: MakeCluster) -> None:
    c = make_cluster()
    a, b = c.add("a"), c.add("b")  # two clusters that do not know each other
    with a.client() as ca, b.client() as cb:
        ca.put("SPLIT", np.ones(4))
        cb.put("SPLIT", np.zeros(4))
        assert ca.stats()["claims"]["rounds"] == 0  # a node alone asks nobody
    bridge = NodeProc("bridge", c.root / "bridge", [a.rpc, b.rpc], [])
    c.nodes["bridge"] = bridge
    bridge.start()
    c.wait_members()
    for n in (a, b, bridge):
        with n.client() as cl:
            wait_for(lambda cl=cl: len([r for r in cl.catalog() if r.name == "SPLIT"]) == 2,
                     10, f"both records on {n.name}")
            with pytest.raises(DatasetConflict, match=r"\ba\b.*\bb\b"):
                cl.fetch("SPLIT")
    with b.client() as cb:
        cb.delete("SPLIT")
    with bridge.client() as cl:
        wait_for(lambda: len([r for r in cl.catalog() if r.name == "SPLIT"]) == 1, 10,
                 "b's copy gone")
        np.testing.assert_array_equal(cl.fetch("SPLIT"), np.ones(4))


def test_a_put_while_a_member_is_frozen_completes_once_it_is_declared_dead(
        cluster: Cluster) -> None:
    """n3 stops answering (SIGSTOP) just before a put through n1: the claim cannot be
    asked of n3, so the put waits until n3 is declared dead (a TTL), not forever."""
    n1, n3 = cluster["n1"], cluster["n3"]
    assert n3.proc is not None
    n3.proc.send_signal(signal.SIGSTOP)
    try:
        with n1.client() as c:
            t0 = time.monotonic()
            c.put("FROZEN", np.arange(6.0))
            took = time.monotonic() - t0
            assert not {n["name"]: n["alive"] for n in c.nodes()}["n3"]
        assert took < 4 * TTL * SCALE + 5, took
    finally:
        n3.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: "FROZEN" in names_on(n3), 10 + TTL, "n3 back, with n1's put")
    with n3.client() as c:
        np.testing.assert_array_equal(c.fetch("FROZEN"), np.arange(6.0))


def test_a_put_right_after_a_member_crashed_does_not_wait_for_it(
        make_cluster: MakeCluster) -> None:
    """With a long TTL, n2 still counts a SIGKILLed n3 as alive: its claim cannot be
    answered, but n3's endpoint refuses connections, so n3 is skipped at once."""
    c = make_cluster()
    slow = ["--ttl", "60"]  # given after the fixture's --ttl, so it wins
    n1, n2 = c.add("n1", extra=slow), c.add("n2", via="n1", extra=slow)
    n3 = c.add("n3", via="n1", extra=slow)
    c.wait_members()
    n3.kill(signal.SIGKILL)
    with n2.client() as cl:
        t0 = time.monotonic()
        cl.put("AFTERCRASH", np.arange(4.0))
        took = time.monotonic() - t0
        assert {n["name"]: n["alive"] for n in cl.nodes()}["n3"]  # not declared dead yet
    assert took < 5 * SCALE, took
    with n1.client() as cl:
        wait_for(lambda: "AFTERCRASH" in {r.name for r in cl.catalog()}, 10, "the put on n1")
