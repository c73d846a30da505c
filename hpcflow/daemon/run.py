"""The initiator's side of a workflow request: plan it, execute it, clean up after it.

A request (from the script API or the CLI) is a map::

    {"wf": "wf-<24 hex>", "steps": [{"out", "op", "inputs", "params"}, ...],
     "deliver": ["..."], "objective": "bytes" | "time",
     "method": "optimal" | "greedy" | "pull_all", "keep": false, "secret": "<64 hex>"}

Inputs are dataset names; outputs of earlier requests of the same flow are
datasets by then, so every request is planned from the current catalog.
``deliver`` (default: the last output) is what must reach the initiator; ``[]``
plans for the results to stay where they are made (a partitioned save).
Every output is named ``<wf>.<n>.<op>`` (a form users may not put, see
:mod:`.puts`).  ``execute``, ``save`` and ``cleanup`` need the flow's secret,
whose hash the flow id is (:class:`~hpcflow.rpc.messages.FlowSecret`): only the
script that created a flow can add to it, save from it or close it.

Planning is pure (and runs op code on samples), so it runs in gevent's thread
pool: the daemon's heartbeats and other requests keep flowing meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import gevent

from ..catalog.record import validate_flag, validate_name
from ..decide import Placement, Plan, Step, greedy_plan, optimal_plan, pull_all_plan
from ..errors import (
    DatasetExists,
    DatasetNotFound,
    InvalidData,
    InvalidName,
    PeerUnavailable,
    UnknownOpError,
)
from ..rpc import auth, strict
from ..rpc.messages import FLOW_ID, FlowSecret
from . import adapter, saving
from .executor import Execution, Executor, plan_uses
from .h5mdmeta import result_axis
from .lifecycle import FlowTag
from .parts import NodeParts
from .plancache import plan_key
from .pools import plan_pool, run_in
from .worker import Worker

log = logging.getLogger("hpcflow.run")

PLANNERS: dict[str, Callable[..., Plan]] = {
    "optimal": optimal_plan, "greedy": greedy_plan, "pull_all": pull_all_plan}


def _parse(node: NodeParts, req: object) -> tuple[str, list[Step], list[str], str, str]:
    if not isinstance(req, dict):
        raise InvalidData("workflow request must be a map")
    wf = req.get("wf")
    if not isinstance(wf, str) or not FLOW_ID.fullmatch(wf):
        raise InvalidData(f"wf must be a flow id (wf- and 24 hex digits), got {str(wf)[:60]!r}")
    steps = adapter.parse_steps(req.get("steps"))
    outs = [validate_name(s.out) for s in steps]
    for s in steps:  # a flow makes only names of its own, which users may not put
        n = s.out[len(wf) + 1:].split(".", 1)[0]
        if (not s.out.startswith(f"{wf}.") or not n.isdigit() or not n.isascii()
                or s.out != f"{wf}.{int(n)}.{s.op}"):
            raise InvalidName(f"step output {s.out!r} must be named {wf}.<n>.{s.op} "
                              "(the request's flow, a step number, the op)")
    if len(set(outs)) != len(outs):
        raise InvalidData("step outputs must be unique")
    clash = [o for o in outs if node.catalog.records_named(o)]
    if clash:
        raise DatasetExists(f"step output(s) {', '.join(clash)} already exist as datasets")
    deliver = req.get("deliver")  # [] (a partitioned save): nothing, results stay put
    if deliver is None:
        deliver = [steps[-1].out]
    if not isinstance(deliver, list) or not all(d in outs for d in deliver):
        raise InvalidData("deliver must list outputs of the request's steps")
    objective, method = req.get("objective", "bytes"), req.get("method", "optimal")
    if method not in PLANNERS:
        raise InvalidData(f"method must be one of {sorted(PLANNERS)}, not {method!r}")
    return wf, steps, list(deliver), str(objective), str(method)


def make_plan(node: NodeParts, worker: Worker, req: object
              ) -> tuple[Plan, str, list[Step], list[str], Placement]:
    """Plan from this node's catalog (the search runs off the event loop); also returns
    the placement planned with."""
    wf, steps, deliver, objective, method = _parse(node, req)
    sources = adapter.source_names(steps)
    snap = node.catalog.snapshot(sources)
    for step in steps:  # the initiator plans with its own op definitions: it needs them all
        if step.op not in node.registry:
            have = sorted(v.info.name for v in snap.nodes if v.alive and step.op in v.ops)
            hint = (f"nodes that have it: {', '.join(have)}; connect to one of them or load "
                    f"its module here with --ops") if have else "no live node has it"
            raise UnknownOpError(f"step {step.out!r}: op {step.op!r} is unknown on the "
                                 f"initiator {node.name} ({hint})")
    try:
        placement = adapter.placement(snap, sources)
    except DatasetNotFound:
        if not node.catalog.settling():
            raise
        # Just started (or resyncing a peer): the inputs may be announced in a moment.
        deadline = time.monotonic() + node.config.rpc_timeout_s
        for name in sources:
            node.catalog.wait_for(name, max(0.0, deadline - time.monotonic()))
        snap = node.catalog.snapshot(sources)
        placement = adapter.placement(snap, sources)
    learned = worker.learned.stable_links(
        {(peer, node.name): bw for peer, bw in node.traffic.bandwidth.items()})
    cost = adapter.cost_model(snap, objective, node.config.link_gbit, learned,
                              worker.learned)
    node_ops = adapter.node_ops(snap)
    cache = worker.plans
    key = plan_key(steps, deliver, objective, method, node.name, placement, node_ops, cost,
                   node.registry)
    planner = PLANNERS[method]

    def search() -> Plan:
        args = (adapter.workflow(steps, node.name, deliver), placement)
        kwargs = {"registry": node.registry, "node_ops": node_ops, "cost": cost,
                  "models": cache.models}
        return run_in(plan_pool(), lambda: planner(*args, **kwargs))

    t0 = time.monotonic()  # a cached plan is counted too: what a request waits for
    made = cache.get_or_make(key, steps, search)
    worker.events.planned(time.monotonic() - t0)
    return made, wf, steps, deliver, placement


def plan(node: NodeParts, worker: Worker, req: object) -> dict[str, Any]:
    """The plan, with the live nodes each step may not go to and why (``excluded``, and
    a line per such step under the explain table)."""
    the_plan, _, steps, _, _ = make_plan(node, worker, req)
    out = adapter.plan_to_wire(the_plan)
    ops = {v.info.name: v.ops for v in node.catalog.nodes() if v.alive}
    excluded = adapter.exclusions(steps, ops, node.registry)
    out["excluded"] = excluded
    if excluded:
        out["explain"] = f"{out['explain']}\n{adapter.describe_exclusions(excluded)}"
    return out


def execute(node: NodeParts, worker: Worker, req: object,
            admit_inline: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Plan and run; if a node dies mid-way, or an input the plan relied on vanished
    (a copy another flow removed), re-plan once from what the catalog says then.

    The reply's execution counts every byte that moved, the failed attempt's too.
    ``admit_inline``: whether a small result's bytes may ride in the reply (see
    :meth:`Executor.run`).
    """
    if not isinstance(req, dict):
        raise InvalidData("workflow request must be a map")
    FlowSecret.from_wire(req.get("secret"), req.get("wf"))  # NotFlowOwner unless its script
    keep = bool(req.get("keep"))
    book = worker.book
    failed = Execution()
    for attempt in (1, 2):
        the_plan, wf, steps, deliver, placed = make_plan(node, worker, req)
        log.info("workflow %s: %s", wf, the_plan.summary())
        by_out = {s.out: s for s in steps}
        xid = book.begin(wf, plan_uses(the_plan, by_out))
        executor = Executor(node, worker.learned, wf, xid, keep)
        try:
            ex = executor.run(the_plan, by_out, deliver, admit_inline)
        except (PeerUnavailable, DatasetNotFound) as exc:
            book.end(wf, xid, ok=False)
            failed.absorb(executor.ex)
            if attempt == 2:
                raise
            log.warning("workflow %s: %s; re-planning", wf, exc)
            if isinstance(exc, PeerUnavailable):
                # Wait until the catalog has noticed (TTL), so the new plan avoids the node.
                gevent.sleep(node.config.ttl_s + node.config.heartbeat_s)
            else:  # a copy was removed (another flow's clean-up) after we planned with it
                # Re-planning from the stale view (the removal not yet announced here)
                # would make the same plan: wait (at most the TTL) for the catalog to move.
                node.catalog.wait_until(partial(_placed_otherwise, node, steps, placed),
                                        node.config.ttl_s)
            # The failed attempt's outputs are removed (announced by their holders a
            # moment later); the next attempt makes them again under the same names.
            node.catalog.wait_until(partial(_outputs_gone, node, steps), node.config.ttl_s)
            continue
        except BaseException:
            book.end(wf, xid, ok=False)
            raise
        book.end(wf, xid, ok=True)
        ex.absorb(failed)
        return {"plan": adapter.plan_to_wire(the_plan, explain=False),
                "execution": ex.to_wire(),
                "replanned": attempt > 1}
    raise AssertionError("unreachable")


def _outputs_gone(node: NodeParts, steps: list[Step]) -> bool:
    return not any(node.catalog.records_named(s.out) for s in steps)


def _placed_otherwise(node: NodeParts, steps: list[Step], before: Placement) -> bool:
    sources = adapter.source_names(steps)
    try:
        return adapter.placement(node.catalog.snapshot(sources), sources) != before
    except DatasetNotFound:
        return True  # now missing: the new attempt says so


def _items(created: object) -> list[tuple[str, str, int | None]]:
    if not isinstance(created, list):
        raise InvalidData("created must be a list of [node, name, part]")
    items = []
    for c in created:
        if not isinstance(c, list | tuple) or len(c) != 3 or not isinstance(c[0], str):
            raise InvalidData("created must be a list of [node, name, part]")
        items.append((c[0], validate_name(c[1]), c[2]))
    return items


def cleanup(node: NodeParts, worker: Worker, created: object, wf: object = None,
            secret: object = None) -> int:
    """Delete what a flow created; with ``wf``, the flow is closed too.

    Closing flow ``wf`` takes its secret (NotFlowOwner otherwise), and items the
    catalog shows as anything but flow ``wf``'s are skipped.  A caller holding a
    client key (with keys) may only remove what flow ``wf`` made: items the catalog
    does not show tagged with ``wf`` are skipped too (their holders' janitors drop
    them if they are).  Copies that a running execution on this node still reads
    are left (the holder's janitor drops them once nobody does).
    """
    items = _items(created)
    book = worker.book
    if wf is not None:
        FlowSecret.from_wire(secret, wf)  # before anything is closed or removed
        flow = str(wf)
        book.close(flow)
        items = [it for it in items if not _made_by_other(node, it, flow)]
    if strict.caller_role() == auth.CLIENT:
        items = [it for it in items if wf is not None and _made_by(node, it, str(wf))]
    base = [(n, name.split(":rows", 1)[0]) for n, name, _ in items]
    mine = [item for item, (n, name) in zip(items, base, strict=True)
            if not book.in_use(n, name)]
    return Executor(node, worker.learned, "cleanup", "cleanup").cleanup(mine)


def _made_by(node: NodeParts, item: tuple[str, str, int | None], wf: str) -> bool:
    """Whether the catalog shows ``item`` (node, name, part) tagged as made by flow ``wf``."""
    holder, name, part = item
    for rec in node.catalog.records_named(name):
        tagged = FlowTag.of(rec)
        if rec.owner == holder and rec.part == part and tagged is not None and tagged[0] == wf:
            return True
    return False


def _made_by_other(node: NodeParts, item: tuple[str, str, int | None], wf: str) -> bool:
    """Whether the catalog shows ``item`` held as anything but flow ``wf``'s (a user's
    dataset, another flow's intermediate): a flow's clean-up leaves it alone."""
    holder, name, part = item
    for rec in node.catalog.records_named(name):
        if rec.owner == holder and rec.part == part:
            tagged = FlowTag.of(rec)
            if tagged is None or tagged[0] != wf:
                return True
    return False


def save(node: NodeParts, worker: Worker, wf: object, output: object, name: object,
         overwrite: object = False, secret: object = None, options: object = None
         ) -> dict[str, Any]:
    """Store a flow's output durably under a user's name (kept after the flow).

    ``options["partitioned"]``: True keeps every part where it was made, as the
    parts of one saved dataset (nothing moves, :func:`.saving.save_in_place`);
    False pulls the parts here first (as volatile copies, removed after) and
    stores one whole dataset; None (the default) is True when the output is
    split.  ``options["restore"]``: write only the parts of the saved dataset
    ``name`` whose holders are gone, from this recomputed output
    (:func:`.saving.restore`).  The saved dataset records the whole derivation
    (:func:`.saving.derive`) but not the flow tag, so no clean-up ever removes
    it.  The reply says which bytes moved from where.  Only flow ``wf``'s script
    (its secret) may save, and only that flow's outputs.
    """
    FlowSecret.from_wire(secret, wf)
    wf, output, name = validate_name(wf), validate_name(output), validate_name(name)
    if not output.startswith(f"{wf}."):
        raise InvalidData(f"{output} is not an output of flow {wf}")
    overwrite = validate_flag(overwrite, "overwrite")
    opts = options if options is not None else {}
    if not isinstance(opts, dict):
        raise InvalidData("save options must be a map")
    partitioned = opts.get("partitioned")
    if partitioned is not None:
        partitioned = validate_flag(partitioned, "partitioned")
    book = worker.book
    xid = book.begin(wf)
    executor = Executor(node, worker.learned, wf, xid)
    try:
        if validate_flag(opts.get("restore", False), "restore"):
            return saving.restore(node, executor, output, name)
        loc = node.catalog.wait_for(output, node.config.rpc_timeout_s)
        lineage = saving.saved_lineage(saving.derive(node.catalog, wf, output), wf, output)
        if partitioned is None:
            partitioned = len(loc.parts) > 1
        if partitioned:
            recs = saving.save_in_place(node, executor, output, loc, name, overwrite, lineage)
            saving.until_known(node.catalog, recs, node.config.rpc_timeout_s)
            return {"record": recs[0].to_wire(), "records": [r.to_wire() for r in recs],
                    "moved": executor.ex.to_wire()["moved"]}
        executor.pull(node.name, output, None)
        arr = worker.local_rows(output, None)  # piecewise, yielding to heartbeats
        lineage = dict(lineage)
        lineage.pop("axis", None)  # the whole output's time axis, if it has one
        lineage.update(result_axis(node.catalog, [(output, None)], arr.shape[0] if arr.ndim
                                   else None) or {})
        rec = worker.datasets.put_array(name, arr, overwrite=overwrite, lineage=lineage)
    finally:
        book.end(wf, xid, ok=True)
        executor.cleanup(executor.ex.created)
    return {"record": rec.to_wire(), "records": [rec.to_wire()],
            "moved": executor.ex.to_wire()["moved"]}


def flow_status(node: NodeParts, worker: Worker, holder: object, items: object) -> list[bool]:
    """For a holder's janitor: which of its ``[wf, execution, name, keep]`` items are still
    wanted (see :mod:`.lifecycle`)."""
    if not isinstance(holder, str) or not isinstance(items, list) or len(items) > 100_000:
        raise InvalidData("flow_status takes a node name and a list of items")
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise InvalidData("items must be [workflow, execution, name, keep]")
    return worker.book.wanted(holder, items)


__all__ = ["cleanup", "execute", "flow_status", "make_plan", "plan", "save"]
