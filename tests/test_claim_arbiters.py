"""A put's claim asks the name's arbiters, not every member (issue 12): real daemons.

Five nodes: a put asks at most three arbiters (the members ranking first for the
name), whatever the cluster's size; two nodes that are *not* arbiters of a name
race for it and exactly one wins (they never ask each other); a put that fails
after its claim was granted gives the grants back, so the name is free at once;
a grant whose release was lost (an arbiter that keeps it) is checked with its
claimant once it is in another claim's way, instead of holding the name; and so is
a grant whose record was deleted before the arbiter saw it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import gevent
import msgpack
import numpy as np
import zmq

import hpcflow
from hpcflow.daemon.claims import ARBITERS, rank
from tests.conftest import Cluster, NodeProc, names_on, wait_for
from tests.test_exhaustion import put_header, replies, stats
from tests.test_put_race import _race
from tests.test_rogue_peer import Rogue
from tests.test_silent_claims import _claims

NAMES = ["n1", "n2", "n3", "n4", "n5"]


def _five(tmp_path: Path) -> Cluster:
    c = Cluster(tmp_path)
    c.add("n1")
    for name in NAMES[1:]:
        c.add(name, via="n1")
    c.wait_members()
    return c


def _name_not_arbitrated_by(nodes: set[str], prefix: str) -> str:
    """A name none of ``nodes`` arbitrates among the five."""
    for i in itertools.count():
        name = f"{prefix}{i}"
        if not nodes & set(rank(name, NAMES)[:ARBITERS]):
            return name
    raise AssertionError("unreachable")


def test_a_put_asks_its_names_arbiters_only_and_racing_non_arbiters_get_one_winner(
        tmp_path: Path) -> None:
    c = _five(tmp_path)
    try:
        before = {n: _claims(c[n]) for n in NAMES}
        puts = [f"A{i}" for i in range(8)]
        with c["n1"].client() as cl:
            for name in puts:
                cl.put(name, np.arange(4.0))
        after = {n: _claims(c[n]) for n in NAMES}
        asked = after["n1"]["asked"] - before["n1"]["asked"]
        # n1 asks the other arbiters of each name: two or three of them, never all four.
        expected = sum(len(set(rank(name, NAMES)[:ARBITERS]) - {"n1"}) for name in puts)
        assert asked == expected < 4 * len(puts), (asked, expected)
        granted = {n: after[n]["granted"] - before[n]["granted"] for n in NAMES[1:]}
        for n in NAMES[1:]:  # each member granted exactly the names it arbitrates
            assert granted[n] == sum(n in rank(name, NAMES)[:ARBITERS] for name in puts), granted

        # n4 and n5 race for names neither of them arbitrates: only the arbiters
        # (n1..n3 in some order) can tell them apart, and exactly one wins each time.
        for r in range(6):
            name = _name_not_arbitrated_by({"n4", "n5"}, f"RACE{r}-")
            arrays = [np.full((30, 2), 1.0 + r), np.full((40, 2), -1.0 - r)]
            results = _race([c["n4"], c["n5"]], name, arrays)
            errors = [x for x in results if isinstance(x, Exception)]
            assert len(errors) == 1 and isinstance(errors[0], hpcflow.DatasetExists), results
            assert "asked first" in str(errors[0]) or "exists" in str(errors[0])
            winner = next(i for i, x in enumerate(results) if not isinstance(x, Exception))
            with c["n2"].client() as cl:
                wait_for(lambda cl=cl, name=name: name in {r.name for r in cl.catalog()},
                         10, f"{name} on n2")
                np.testing.assert_array_equal(cl.fetch(name), arrays[winner])
    finally:
        c.stop()


def _upload_then_abort(node: NodeProc, name: str, arbiters: list[NodeProc]) -> None:
    """Start a bulk upload of ``name`` through ``node``, wait until each of the other
    ``arbiters`` has granted its claim, then abort the upload."""
    granted = {a.name: _claims(a)["granted"] for a in arbiters}
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(node.info["bulk"])
        s.send_multipart(put_header(1, name, 1 << 20))
        [(verb, hdr)] = replies(s, 1)
        assert verb == b"OK", hdr
        for a in arbiters:
            wait_for(lambda a=a: _claims(a)["granted"] > granted[a.name], 10,
                     f"{a.name} to grant the claim")
        s.send_multipart([b"ABORT", msgpack.packb({"r": 2, "u": hdr["u"]})])
        wait_for(lambda: stats(node)["uploads_in_progress"] == 0, 10, "the abort")
    finally:
        ctx.destroy(linger=0)


def test_a_failed_put_releases_its_grants(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        n1, n2 = c.add("n1"), c.add("n2", via="n1")
        c.wait_members()
        released = _claims(n2)["released"]
        _upload_then_abort(n1, "FREED", [n2])
        wait_for(lambda: _claims(n2)["released"] > released, 10, "n1 to give n2's grant back")
        with n2.client() as cl:  # the name is free at once, through another node
            assert cl.put("FREED", np.arange(3.0)).owner == "n2"
    finally:
        c.stop()


def test_a_grant_whose_release_was_lost_is_checked_with_its_claimant(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        n1, n2 = c.add("n1"), c.add("n2", via="n1")
        keeper = Rogue("keeper", tmp_path / "keeper", [n1.rpc], {"drop_releases": True})
        c.nodes["keeper"] = keeper
        keeper.start()
        c.wait_members()
        # keeper answers n1's release but keeps the grant
        _upload_then_abort(n1, "LOST", [n2, keeper])
        wait_for(lambda: _claims(n1)["released"] >= 1, 10, "n1's own grant given back")
        with n2.client() as cl:  # keeper asks n1 whether its claim stands: it does not
            assert cl.put("LOST", np.arange(3.0)).owner == "n2"
        assert _claims(keeper)["stale"] == 1
    finally:
        c.stop()


def test_a_name_put_and_deleted_at_once_is_free_again_everywhere(tmp_path: Path) -> None:
    """Each arbiter still holds n2's grant when the delete comes (its catalog may not
    have seen the record in between): the next put, through any node, asks n2 and
    goes through."""
    c = _five(tmp_path)
    try:
        for r, via in enumerate(["n1", "n3", "n4", "n5"]):
            name = f"AGAIN{r}"
            with c["n2"].client() as cl:
                cl.put(name, np.arange(4.0))
                cl.delete(name)
            wait_for(lambda v=via, name=name: name not in names_on(c[v]), 10, "the delete")
            with c[via].client() as cl:
                assert cl.put(name, np.ones(2)).owner == via
    finally:
        c.stop()


def test_rank_is_the_same_everywhere_and_a_join_moves_no_other_member() -> None:
    members = [f"m{i}" for i in range(40)]
    for i in range(200):
        name = f"D{i}"
        order = rank(name, members)
        assert order == rank(name, list(reversed(members)))  # no node's view order matters
        joined = rank(name, [*members, "new"])
        assert [m for m in joined if m != "new"] == order
    # names spread: every member arbitrates some of 200 names, none most of them
    firsts = [rank(f"D{i}", members)[:ARBITERS] for i in range(200)]
    counts = {m: sum(m in f for f in firsts) for m in members}
    assert min(counts.values()) >= 1 and max(counts.values()) <= 40, counts


def test_an_overwrite_that_changes_dtype_races_a_new_sibling_part(tmp_path: Path) -> None:
    """n4 holds X@0 (float64) and overwrites it as int32 while n5 puts X@1 as float64;
    neither arbitrates X.  The arbiters see n4's *old* record of X@0: it must not count
    as the overwrite's record (that grant would be dropped and both puts stored, with
    parts that disagree).  Exactly one is stored, the other is InvalidData."""
    c = _five(tmp_path)
    try:
        for r in range(4):
            name = _name_not_arbitrated_by({"n4", "n5"}, f"OVER{r}-")
            with c["n4"].client() as cl:
                cl.put(name, np.zeros((20, 2)), part=0, nparts=2)
            for n in ("n1", "n2", "n3", "n5"):
                wait_for(lambda n=n, name=name: f"{name}@0" in names_on(c[n]), 10, "X@0")
            clients = [c["n4"].client(), c["n5"].client()]
            try:
                gs = [gevent.spawn(clients[0].put, name, np.ones((20, 2), dtype=np.int32),
                                   part=0, nparts=2, overwrite=True),
                      gevent.spawn(clients[1].put, name, np.ones((20, 2)), part=1, nparts=2)]
                gevent.joinall(gs)
            finally:
                for cl in clients:
                    cl.close()
            oks = [g for g in gs if g.successful()]
            assert len(oks) == 1, [g.exception for g in gs]
            bad = next(g for g in gs if not g.successful()).exception
            assert isinstance(bad, hpcflow.InvalidData), bad
    finally:
        c.stop()
