"""The script side of a replayed approach, run as its own process.

``python -m hpcflow.harness.agent JOB.json`` runs where the approach's
client lives: on the initiator for hpcflow (decentralised), on the
orchestrator host for the centralised baseline.  Under ``--netns`` the
replay starts it inside that host's network namespace, so its traffic
crosses the emulated links like everything else.  It saves the result to
``job["result"]`` (.npy) and prints one JSON line of measurements.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..rpc.client import connect
from .centralised import Orchestrator
from .scenario import Scenario, load_scenario


def _node_counters(nodes: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rpc in nodes.items():
        with connect(rpc) as c:
            out[name] = c.stats()["traffic"]
    return out


def _between_nodes(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    """Sum of a per-peer counter's growth over node peers only (clients excluded)."""
    total = 0
    for node, t in after.items():
        old = before[node][key]
        total += sum(n - old.get(peer, 0) for peer, n in t[key].items() if peer in after)
    return total


def decentralised(sc: Scenario, nodes: dict[str, str],
                  initiator: str) -> tuple[Any, dict[str, Any]]:
    with connect(nodes[initiator]) as flow:
        for name in sc.datasets:
            flow.wait_for(name, 60)
        before = _node_counters(nodes)
        handles: dict[str, Any] = {}
        for step in sc.steps:
            ins = [handles.get(i, i) for i in step.inputs]
            handles[step.out] = flow.run(step.op, *ins, **dict(step.params))
        t0 = time.perf_counter()
        target = handles.get(sc.result)
        result = target.fetch() if target is not None else flow.fetch(sc.result)
        wall = time.perf_counter() - t0
        report = flow.report()
        plan = target.plan.explain() if target is not None and target.plan else ""
        after = _node_counters(nodes)
    transport = _between_nodes(before, after, "bytes_received")
    messages = report["calls"] * 2 + sum(
        t["messages_received"] - before[n]["messages_received"] for n, t in after.items())
    return result, {"wall_s": wall, "links": report["moved"], "messages": messages,
                    "extra": {"bytes_planned": report["bytes_planned"],
                              "transport_bytes": transport, "replans": report["replans"],
                              "plan": plan}}


def centralised(sc: Scenario, nodes: dict[str, str], initiator: str,
                threshold: int) -> tuple[Any, dict[str, Any]]:
    with connect(nodes[initiator]) as c:
        for name in sc.datasets:
            c.wait_for(name, 60)
    orch = Orchestrator(nodes, initiator, threshold=threshold)
    try:
        t0 = time.perf_counter()
        result = orch.run(sc)
        wall = time.perf_counter() - t0
        links = orch.links()
        messages = orch.calls * 2 + orch.traffic.messages_sent + orch.traffic.messages_received
        orch.cleanup()
    finally:
        orch.close()
    return result, {"wall_s": wall, "links": links, "messages": messages,
                    "extra": {"threshold": threshold}}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    sc = load_scenario(job["scenario"])
    sc.load_ops()  # the planner (decentralised) infers output sizes with the same code
    nodes: dict[str, str] = job["nodes"]
    if job["approach"] == "decentralised":
        result, m = decentralised(sc, nodes, job["initiator"])
    else:
        result, m = centralised(sc, nodes, job["initiator"], int(job.get("threshold", 3)))
    np.save(job["result"], np.asarray(result))
    print(json.dumps(m))
    return 0


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
