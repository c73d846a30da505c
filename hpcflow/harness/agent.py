"""The script side of a replayed approach, run as its own process.

``python -m hpcflow.harness.agent JOB.json`` runs where the approach's
client lives: on the initiator for hpcflow (decentralised), on the
orchestrator host for the centralised baseline.  Under ``--netns`` the
replay starts it inside that host's network namespace, so its traffic
crosses the emulated links like everything else.  It saves the result to
``job["result"]`` (.npy) and prints one JSON line of measurements.  Lines
on stderr starting with :data:`AGENT_PROGRESS` are progress for the replay
to show; anything else there is diagnostics.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..client.client import connect
from .centralised import Orchestrator
from .scenario import Scenario, load_scenario

AGENT_PROGRESS = "agent: "


def _progress(msg: str) -> None:
    print(AGENT_PROGRESS + msg, file=sys.stderr, flush=True)


def _node_counters(nodes: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rpc in nodes.items():
        with connect(rpc) as c:
            out[name] = c.stats()["traffic"]
    return out


def _transport_bytes(before: dict[str, Any], after: dict[str, Any]) -> int:
    """Bytes the daemons' transports moved between hosts during the workflow.

    Daemon-to-daemon bytes are counted by the receiver.  A script's fetch is
    counted by the sender against ``client@NODE`` (NODE: the daemon the
    script is connected to, i.e. the initiator's host); it crosses a link
    unless the sender is that node itself.
    """
    total = 0
    for node, t in after.items():
        old = before[node]
        total += sum(n - old["bytes_received"].get(peer, 0)
                     for peer, n in t["bytes_received"].items() if peer in after)
        total += sum(n - old["bytes_sent"].get(peer, 0)
                     for peer, n in t["bytes_sent"].items()
                     if peer.startswith("client@") and peer[len("client@"):] in after
                     and peer != f"client@{node}")
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
        _progress("workflow running")
        t0 = time.perf_counter()
        target = handles.get(sc.result)
        delivery: dict[str, int] = {}
        if target is not None:  # the initiator's daemon holds the result: a local read
            result = target.fetch()
            delivery_messages = 0
        else:
            result, delivery, delivery_messages = _fetch_to_initiator(flow, sc.result, initiator)
        wall = time.perf_counter() - t0
        report = flow.report()
        plan = target.plan.explain() if target is not None and target.plan else ""
        after = _node_counters(nodes)
    links = dict(report["moved"])
    for link, n in delivery.items():
        links[link] = links.get(link, 0) + n
    transport = _transport_bytes(before, after)
    messages = report["calls"] * 2 + delivery_messages + sum(
        t["messages_received"] - before[n]["messages_received"] for n, t in after.items())
    return result, {"wall_s": wall, "links": links, "messages": messages,
                    "extra": {"bytes_planned": report["bytes_planned"] + sum(delivery.values()),
                              "transport_bytes": transport, "replans": report["replans"],
                              "plan": plan}}


def _fetch_to_initiator(client: Any, name: str,
                        initiator: str) -> tuple[Any, dict[str, int], int]:
    """The script on the initiator reads an input dataset straight from its holders.

    No step produces it, so no plan moves it: the script's fetch is the
    delivery, and the parts held elsewhere cross links like every other byte.
    Returns the array, bytes per link and the bulk messages received from
    other hosts (parts are read one by one to attribute them).
    """
    links: dict[str, int] = {}
    messages = 0
    pieces = []
    for part in client.locate(name)["parts"]:
        got, msgs = dict(client.traffic.bytes_received), client.traffic.messages_received
        pieces.append(client.fetch(name, part=part["part"]))
        for holder, n in client.traffic.bytes_received.items():
            if holder != initiator and n > got.get(holder, 0):
                links[f"{holder}->{initiator}"] = (links.get(f"{holder}->{initiator}", 0)
                                                   + n - got.get(holder, 0))
                messages += client.traffic.messages_received - msgs
    return (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)), links, messages


def centralised(sc: Scenario, nodes: dict[str, str], initiator: str,
                threshold: int) -> tuple[Any, dict[str, Any]]:
    with connect(nodes[initiator]) as c:
        for name in sc.datasets:
            c.wait_for(name, 60)
    orch = Orchestrator(nodes, initiator, threshold=threshold)
    try:
        _progress("workflow running")
        t0 = time.perf_counter()
        result = orch.run(sc)
        wall = time.perf_counter() - t0
        links = orch.links()
        messages = orch.calls * 2 + orch.traffic.messages_sent + orch.traffic.messages_received
        orch.cleanup()
    finally:
        orch.close()
    return result, {"wall_s": wall, "links": links, "messages": messages,
                    "extra": {"threshold": threshold, "step_node": orch.step_node}}


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
