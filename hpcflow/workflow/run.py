"""The initiator's side of a workflow request: plan it, execute it, clean up after it.

A request (from the script API or the CLI) is a map::

    {"wf": "wf-1a2b3c", "steps": [{"out", "op", "inputs", "params"}, ...],
     "deliver": ["..."], "objective": "bytes" | "time",
     "method": "optimal" | "greedy" | "pull_all"}

Inputs are dataset names; outputs of earlier requests of the same flow are
datasets by then, so every request is planned from the current catalog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent

from ..catalog.record import validate_name
from ..decide import Plan, PlanningError, Step, greedy_plan, optimal_plan, pull_all_plan
from ..errors import DatasetExists, InvalidData, PeerUnavailable
from . import adapter
from .executor import Executor

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("hpcflow.run")

PLANNERS: dict[str, Callable[..., Plan]] = {
    "optimal": optimal_plan, "greedy": greedy_plan, "pull_all": pull_all_plan}


def _parse(node: Node, req: object) -> tuple[str, list[Step], list[str], str, str]:
    if not isinstance(req, dict):
        raise InvalidData("workflow request must be a map")
    wf = validate_name(req.get("wf", "wf"))
    steps = adapter.parse_steps(req.get("steps"))
    outs = [validate_name(s.out) for s in steps]
    if len(set(outs)) != len(outs):
        raise InvalidData("step outputs must be unique")
    existing = {r.name for r in node.catalog.records()}
    clash = [o for o in outs if o in existing]
    if clash:
        raise DatasetExists(f"step output(s) {', '.join(clash)} already exist as datasets")
    deliver = req.get("deliver") or [steps[-1].out]
    if not isinstance(deliver, list) or not all(d in outs for d in deliver):
        raise InvalidData("deliver must list outputs of the request's steps")
    objective, method = req.get("objective", "bytes"), req.get("method", "optimal")
    if method not in PLANNERS:
        raise InvalidData(f"method must be one of {sorted(PLANNERS)}, not {method!r}")
    return wf, steps, list(deliver), str(objective), str(method)


def make_plan(node: Node, req: object) -> tuple[Plan, str, list[Step], list[str]]:
    wf, steps, deliver, objective, method = _parse(node, req)
    snap = node.catalog.snapshot()
    for step in steps:  # the initiator plans with its own op definitions: it needs them all
        if step.op not in node.registry:
            have = sorted(v.info.name for v in snap.nodes if v.alive and step.op in v.ops)
            hint = (f"nodes that have it: {', '.join(have)}; connect to one of them or load "
                    f"its module here with --ops") if have else "no live node has it"
            raise PlanningError(f"step {step.out!r}: op {step.op!r} is unknown on the "
                                f"initiator {node.name} ({hint})")
    placement = adapter.placement(snap, adapter.source_names(steps))
    learned = {(peer, node.name): bw for peer, bw in node.traffic.bandwidth.items()}
    cost = adapter.cost_model(snap, objective, node.config.link_gbit, learned)
    plan = PLANNERS[method](adapter.workflow(steps, node.name, deliver), placement,
                            registry=node.registry, node_ops=adapter.node_ops(snap), cost=cost)
    return plan, wf, steps, deliver


def plan(node: Node, req: object) -> dict[str, Any]:
    return adapter.plan_to_wire(make_plan(node, req)[0])


def execute(node: Node, req: object) -> dict[str, Any]:
    """Plan and run; if a node dies mid-way, re-plan once from the remaining replicas."""
    for attempt in (1, 2):
        the_plan, wf, steps, deliver = make_plan(node, req)
        log.info("workflow %s: %s", wf, the_plan.explain().splitlines()[-1])
        try:
            ex = Executor(node, wf).run(the_plan, {s.out: s for s in steps}, deliver)
            return {"plan": adapter.plan_to_wire(the_plan), "execution": ex.to_wire(),
                    "replanned": attempt > 1}
        except PeerUnavailable as exc:
            if attempt == 2:
                raise
            log.warning("workflow %s: %s; re-planning without it", wf, exc)
            # Wait until the catalog has noticed (TTL), so the new plan avoids the dead node.
            gevent.sleep(node.config.ttl_s + node.config.heartbeat_s)
    raise AssertionError("unreachable")


def cleanup(node: Node, created: object) -> int:
    if not isinstance(created, list):
        raise InvalidData("created must be a list of [node, name, part]")
    items = []
    for c in created:
        if not isinstance(c, list | tuple) or len(c) != 3 or not isinstance(c[0], str):
            raise InvalidData("created must be a list of [node, name, part]")
        items.append((c[0], validate_name(c[1]), c[2]))
    return Executor(node, "cleanup").cleanup(items)


def deliver(node: Node, wf: object, name: object) -> dict[str, Any]:
    """Bring an existing output wholly to this node and materialise it."""
    ex = Executor(node, validate_name(wf))
    ex._pull(node.name, validate_name(name), None)
    result = ex._materialise(str(name))
    out = ex.ex.to_wire()
    return {"created": out["created"], "moved": out["moved"], "result": result}


def save(node: Node, local: object, name: object, overwrite: object = False) -> dict[str, Any]:
    """Copy a local dataset under a user's name, kept after the flow closes."""
    src = node.store.get(validate_name(local))
    arr = node.store.read_array(src.name)
    return node.put_array(validate_name(name), arr, nparts=None,
                          overwrite=bool(overwrite)).to_wire()
