"""From the live catalog to the planner's pure inputs.

The planner (:mod:`hpcflow.decide`) knows nothing about catalogs or sockets;
this module turns a :class:`~hpcflow.catalog.base.CatalogSnapshot` plus a
workflow request into its frozen input model, and learned link speeds, call
latencies, step overhead, op throughput and node load into its
:class:`~hpcflow.decide.CostModel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..catalog.base import CatalogSnapshot
from ..decide import CostModel, Link, PartLoc, Placement, Step, Workflow
from ..errors import DatasetNotFound, InvalidData
from ..ops import OpRegistry
from .learned import Learned

DEFAULT_LATENCY_S = 1e-4
#: The most ops a heartbeat may say a node has running or queued (the planner's load).
MAX_LOAD = 1_000_000


def parse_steps(raw: object) -> list[Step]:
    """Validate the wire form ``[{"out", "op", "inputs", "params"}, ...]``."""
    if not isinstance(raw, list) or not raw or len(raw) > 1000:
        raise InvalidData("steps must be a non-empty list")
    steps = []
    for i, d in enumerate(raw):
        if not isinstance(d, dict):
            raise InvalidData(f"step {i} must be a map")
        out, op, inputs, params = d.get("out"), d.get("op"), d.get("inputs"), d.get("params")
        if not isinstance(out, str) or not isinstance(op, str):
            raise InvalidData(f"step {i}: out and op must be strings")
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(x, str) for x in inputs):
            raise InvalidData(f"step {i} ({out}): inputs must be a non-empty list of names")
        if params is not None and not isinstance(params, dict):
            raise InvalidData(f"step {i} ({out}): params must be a map")
        steps.append(Step(out, op, tuple(inputs), dict(params or {})))
    return steps


def source_names(steps: Sequence[Step]) -> list[str]:
    produced: set[str] = set()
    sources: list[str] = []
    for step in steps:
        for name in step.inputs:
            if name not in produced and name not in sources:
                sources.append(name)
        produced.add(step.out)
    return sources


def placement(snapshot: CatalogSnapshot, names: Sequence[str]) -> Placement:
    """Where every part of every named dataset lives (live holders only)."""
    locs, schema = [], {}
    for name in names:
        loc = snapshot.locate(name)
        if not loc.complete:
            raise DatasetNotFound(f"{name}: parts {list(loc.missing)} are on no live node")
        if not loc.shape:
            raise InvalidData(f"{name} is a scalar; workflow inputs need a row axis")
        schema[name] = (tuple(loc.shape[1:]), loc.dtype)
        for i, part in enumerate(loc.parts):
            for rec in part.holders:
                locs.append(PartLoc(name, i, rec.owner, part.row_stop - part.row_start,
                                    part.nbytes))
    return Placement.from_locs(locs, schema)


def node_ops(snapshot: CatalogSnapshot) -> dict[str, dict[str, str]]:
    return {v.info.name: dict(v.ops) for v in snapshot.nodes if v.alive}


def exclusions(steps: Sequence[Step], ops: Mapping[str, Mapping[str, str]],
               registry: OpRegistry) -> dict[str, dict[str, str]]:
    """Per step output, the live nodes the planner may not send it to, and why: the op
    is missing there, or its definition differs from the initiator's (whose definitions
    the plan is made with).  Steps every node can run are left out."""
    out: dict[str, dict[str, str]] = {}
    for step in steps:
        if step.op not in registry:
            continue  # the initiator's own UnknownOpError says so
        mine = registry.get(step.op).definition_hash
        why = {}
        for node, table in sorted(ops.items()):
            theirs = table.get(step.op)
            if theirs is None:
                why[node] = f"op {step.op!r} missing"
            elif theirs != mine:
                why[node] = (f"op {step.op!r} defined differently ({theirs[:8]}, "
                             f"initiator's {mine[:8]})")
        if why:
            out[step.out] = why
    return out


def describe_exclusions(excluded: Mapping[str, Mapping[str, str]]) -> str:
    """Lines for the explain table: ``excluded for STEP: NODE (why), ...``."""
    return "\n".join(f"excluded for {out}: "
                     + ", ".join(f"{n} ({why})" for n, why in nodes.items())
                     for out, nodes in excluded.items())


def quantise(value: float) -> float:
    """``value`` to two significant digits: learned numbers wobble from one observation
    to the next, and plans are cached by the cost model's contents
    (:func:`~hpcflow.daemon.plancache.plan_key`), so only real changes make new keys."""
    return float(f"{value:.2g}")


def cost_model(snapshot: CatalogSnapshot, objective: str, default_gbit: float,
               learned_bandwidth: Mapping[tuple[str, str], float],
               learned: Learned | None = None) -> CostModel:
    """The planner's cost model from what this node knows.

    Links: learned bandwidth (bytes/s) where we have measured it, else the
    default.  Load is each node's active work (ops running or queued,
    transfers) as last heartbeated.  From ``learned`` (if given): each peer's
    call latency, the step overhead and per-op throughput; the defaults of
    :class:`~hpcflow.decide.CostModel` elsewhere.  Every learned number goes
    through :func:`quantise`.
    """
    if objective not in ("bytes", "time"):
        raise InvalidData(f"objective must be 'bytes' or 'time', not {objective!r}")
    default = Link(bandwidth=default_gbit * 1e9 / 8, latency=DEFAULT_LATENCY_S)
    links = {pair: Link(bandwidth=quantise(bw), latency=DEFAULT_LATENCY_S)
             for pair, bw in learned_bandwidth.items() if math.isfinite(bw) and bw > 0}
    # A peer's load comes from its heartbeats: kept in range, a negative one would make
    # its time look below zero to the search (whose bounds assume none is).
    load = {v.info.name: min(max(int(v.load.get("active", 0)), 0), MAX_LOAD)
            for v in snapshot.nodes if isinstance(v.load.get("active", 0), int)}
    extra: dict[str, Any] = {}
    if learned is not None:
        got = learned.stable_costs()
        extra["call_latency"] = {peer: quantise(s) for peer, s in got.call_latency.items()}
        extra["throughput"] = {op: quantise(r) for op, r in got.throughput.items()}
        if got.step_overhead is not None:
            extra["step_overhead"] = quantise(got.step_overhead)
    return CostModel(objective=objective, default_link=default, links=links,  # type: ignore[arg-type]
                     load=load, **extra)


def workflow(steps: Sequence[Step], initiator: str, deliver: Sequence[str]) -> Workflow:
    """No ``deliver`` (an empty list): the results stay where they are made."""
    return Workflow(tuple(steps), initiator, tuple(deliver), stay=not deliver)


def plan_to_wire(plan: Any, explain: bool = True) -> dict[str, Any]:
    """The plan for a reply; ``execute`` leaves the explain table out (the client
    formats it from the plan when asked: it costs the initiator more than the rest of
    a small op's reply)."""
    return dict(plan.to_wire(explain=explain))
