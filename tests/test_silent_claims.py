"""A member that leaves claims unanswered (issue 11 follow-ups, item 3): real processes.

The rogue (``tests/rogue.py``, ``silent_claims``) is a real daemon that heartbeats
and answers pings as a healthy member but never answers a ``claim``.  A put
through another node must then fail with ``PeerUnavailable`` within
``rpc_timeout_s`` (and a second) and store nothing, and while it waits at its
commit the node's bulk channel must go on serving other transfers: a fetch, and
a second upload that streams all its bytes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gevent
import numpy as np

import hpcflow
from hpcflow.errors import PeerUnavailable
from tests.conftest import SCALE, Cluster, NodeProc, wait_for
from tests.test_rogue_peer import Rogue

RPC_TIMEOUT_S = 3.0 * SCALE


def _claims(node: NodeProc) -> dict[str, int]:
    with node.client() as c:
        return dict(c.stats()["claims"])


def _alive(node: NodeProc) -> dict[str, bool]:
    with node.client() as c:
        return {n["name"]: n["alive"] for n in c.nodes()}


def test_an_unanswered_claim_fails_the_put_in_time_and_stalls_nothing_else(
        tmp_path: Path) -> None:
    conf = tmp_path / "n1.toml"
    conf.write_text(f"rpc_timeout_s = {RPC_TIMEOUT_S}\n")
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1", extra=["--config", str(conf)])
        d = np.arange(200_000, dtype=np.float64).reshape(-1, 4)
        with n1.client() as a:
            a.put("D", d)  # alone: no claim round
        rogue = Rogue("evil", tmp_path / "evil", [n1.rpc], {"silent_claims": True})
        c.nodes["evil"] = rogue
        rogue.start()
        wait_for(lambda: _alive(n1).get("evil"), 15, "n1 to count the rogue as a member")

        results: dict[str, Any] = {}

        def put(name: str) -> None:
            t0 = time.monotonic()
            with n1.client() as cl:
                try:
                    results[name] = cl.put(name, np.ones((1000, 4)))
                except hpcflow.HpcflowError as exc:
                    results[name] = exc
            results[f"{name}_s"] = time.monotonic() - t0

        x = gevent.spawn(put, "X")
        wait_for(lambda: _claims(n1)["waiting"] == 1, 10, "X's bytes in, waiting for its claim")
        # The bulk channel serves others while X waits at its commit.
        with n1.client() as b:
            got = b.fetch("D")
        assert np.array_equal(got, d)
        assert not x.ready(), "the fetch was served only once X's commit was over"
        y = gevent.spawn(put, "Y")  # a second upload streams all its bytes meanwhile
        wait_for(lambda: _claims(n1)["waiting"] == 2, 10, "Y's bytes in too")
        assert not x.ready(), "X's claim was settled before the other transfers were served"
        gevent.joinall([x, y], raise_error=True)

        for name in ("X", "Y"):
            assert isinstance(results[name], PeerUnavailable), results[name]
            assert "evil" in str(results[name])
        # bounded: the round gives up after rpc_timeout_s (and a second)
        assert RPC_TIMEOUT_S * 0.9 <= results["X_s"] < RPC_TIMEOUT_S + 1.0 + 3.0 * SCALE
        with n1.client() as cl:
            assert {r.name for r in cl.catalog()} == {"D"}  # nothing of X or Y
            assert cl.stats()["claims"]["waiting"] == 0

        # Once the rogue is gone (declared dead), puts go through again.
        rogue.kill()
        wait_for(lambda: not _alive(n1).get("evil"), 15, "n1 to declare the rogue dead")
        with n1.client() as cl:
            assert cl.put("X", np.ones((1000, 4))).name == "X"
    finally:
        c.stop()

