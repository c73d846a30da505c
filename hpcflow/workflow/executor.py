"""Carry out a plan on the cluster, from the initiating node.

For each step: the planned transfers become ``pull`` calls on their
destination nodes, naming the source the plan chose (one greenlet per
destination, so different links work in parallel), then the step's work
units become ``run_op`` calls (in parallel across nodes).  Reduce partials
are pulled to the combiner, then combined.  Steps run as soon as the steps
they depend on are done (those producing their inputs, or moving rows of an
object they read too), so independent steps overlap.  Finally the results
reach the initiator: a small one (at most ``INLINE_TOTAL`` bytes, known from
the plan's output model) travelled inline in the replies of the ``run_op``
calls that made it, and goes back to the script in the ``execute`` reply; a
bigger one stays where it was made and the reply says where its parts are,
so the script pulls them straight from their holders (the plan's delivery
transfers, counted by the script) without a second copy on the initiator.

Every pull reports the bytes it received from each source, so the execution
report gives *actual* bytes per link next to the planned ones.  Everything an
execution creates (outputs, partials, copies, slices) carries its flow tag
(:mod:`.lifecycle`) and is listed so the flow can remove it later; if a step
fails, the other running steps finish, then what this execution created is
removed before the error propagates, so no partial output stays announced.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import numpy as np

from ..catalog.base import locate
from ..catalog.record import DatasetRecord
from ..decide import Plan, StepPlan, Transfer, Work
from ..errors import HpcflowError, PeerUnavailable
from .lifecycle import FlowTag
from .worker import MAX_INLINE, RunReply

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("hpcflow.executor")

LONG_CALL_S = 24 * 3600.0  # liveness comes from zerorpc heartbeats, not from this
#: A delivered result whose planned size is at most this travels inline (see module doc).
INLINE_TOTAL = 16 << 20


@dataclass
class Execution:
    """What actually happened: bytes per link, what was created, results."""

    moved: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    created: list[tuple[str, str, int | None]] = field(default_factory=list)
    #: Where each result that did not come back inline lies (a catalog location).
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Results that came back inline, as arrays (not stored on the initiator).
    values: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)
    calls: int = 0
    seconds: float = 0.0

    def absorb(self, other: Execution) -> None:
        """Count a failed attempt's traffic and calls too (its bytes did move)."""
        for link, n in other.moved.items():
            self.moved[link] += n
        self.calls += other.calls

    def to_wire(self) -> dict[str, Any]:
        return {"moved": {f"{a}->{b}": n for (a, b), n in sorted(self.moved.items())},
                "bytes_moved": sum(self.moved.values()),
                "created": [list(c) for c in self.created], "results": self.results,
                "inline": {name: {"shape": list(a.shape), "dtype": a.dtype.str,
                                  "data": a.tobytes()} for name, a in self.values.items()},
                "calls": self.calls, "seconds": round(self.seconds, 6)}


def plan_uses(plan: Plan, steps: dict[str, Any]) -> set[tuple[str, str]]:
    """``(node, dataset)`` pairs an execution of ``plan`` reads: transfer sources and
    the inputs of every unit of work where it runs (so a flow closing meanwhile does
    not delete a copy this one relies on)."""
    uses = {(t.src, t.obj) for t in plan.transfers}
    for sp in plan.steps:
        for w in sp.work:
            uses.update((w.node, name) for name in steps[sp.out].inputs)
    return uses


class Executor:
    """Runs one plan; ``node`` is the initiator it runs on, ``tag`` marks what it makes."""

    def __init__(self, node: Node, workflow_id: str, xid: str, keep: bool = False) -> None:
        self.node = node
        self.wf = workflow_id
        self.tag = FlowTag(node.name, node.epoch, xid)
        self.keep = keep
        self.ex = Execution()
        #: Outputs to bring back inline, and the replies (by part) that carried them.
        self._inline: dict[str, dict[int | None, RunReply]] = {}
        self._units: dict[str, int] = {}
        self._made: dict[str, list[DatasetRecord]] = defaultdict(list)

    def lineage(self, keep: bool = False) -> dict[str, Any]:
        tag = FlowTag(self.tag.initiator, self.tag.epoch, self.tag.execution, keep)
        return tag.to_lineage(self.wf)

    def _alive(self, target: str) -> str | None:
        return next((v.info.rpc for v in self.node.catalog.nodes()
                     if v.info.name == target and v.alive), None)

    def _call(self, target: str, method: str, *args: Any) -> Any:
        """Call ``method`` on ``target`` (directly if it is us).  A long call is watched:
        if the catalog declares the target dead meanwhile, it fails then, not at a timeout."""
        self.ex.calls += 1
        if target == self.node.name:
            return getattr(self.node.service, method)(*args)
        endpoint = self._alive(target)
        if endpoint is None:
            raise PeerUnavailable(f"node {target} is not alive")
        call = gevent.spawn(self.node.peers.call, endpoint, method, *args,
                            timeout_s=LONG_CALL_S)
        while not call.ready():
            call.join(timeout=self.node.config.heartbeat_s)
            if not call.ready() and self._alive(target) is None:
                call.kill(block=False)
                raise PeerUnavailable(f"node {target} died during {method}")
        return call.get()

    def pull(self, dst: str, obj: str, rows: tuple[int, int] | None,
             src: str | None = None) -> None:
        """Make rows of ``obj`` local on ``dst``, from ``src`` if it can."""
        reply = self._call(dst, "pull", obj, list(rows) if rows else None, src, self.lineage())
        for d in reply["created"]:
            rec = DatasetRecord.from_wire(d)
            self.ex.created.append((dst, rec.name, rec.part))
        for source, nbytes in reply["moved"].items():
            self.ex.moved[(source, dst)] += int(nbytes)

    def _run(self, target: str, request: dict[str, Any]) -> DatasetRecord:
        reply = RunReply.from_wire(self._call(target, "run_op", request))
        rec = reply.record
        self.ex.created.append((target, rec.name, rec.part))
        self._made[rec.name].append(rec)
        if reply.data is not None and rec.name in self._inline:
            self._inline[rec.name][rec.part] = reply
            if target != self.node.name:
                self.ex.moved[(target, self.node.name)] += len(reply.data)
                self.node.traffic.received(target, len(reply.data))
        return rec

    @staticmethod
    def _parallel(jobs: list[Callable[[], Any]]) -> list[Any]:
        if not jobs:
            return []
        if len(jobs) == 1:
            return [jobs[0]()]
        greenlets = [gevent.spawn(job) for job in jobs]
        gevent.joinall(greenlets)
        for g in greenlets:  # first failure wins; the others have finished by now
            if g.exception is not None:
                raise g.exception
        return [g.value for g in greenlets]

    def _transfers(self, transfers: tuple[Transfer, ...] | list[Transfer]) -> None:
        by_dst: dict[str, list[Transfer]] = defaultdict(list)
        for t in transfers:
            by_dst[t.dst].append(t)

        def worker(ts: list[Transfer]) -> None:
            for t in ts:
                self.pull(t.dst, t.obj, t.rows, t.src)

        self._parallel([partial(worker, ts) for ts in by_dst.values()])

    def run(self, plan: Plan, steps: dict[str, Any], deliver: list[str]) -> Execution:
        """Execute ``plan``; ``steps`` maps each output name to its step (op, inputs,
        params); ``deliver`` names the results to materialise on the initiator."""
        t0 = time.monotonic()
        self._inline = {sp.out: {} for sp in plan.steps
                        if sp.out in deliver and _inline_size(sp) <= INLINE_TOTAL}
        try:
            self._steps(plan, steps)
            inline = {name for name, got in self._inline.items()
                      if got and len(got) == self._units.get(name)}
            for name in deliver:
                if name in inline:
                    self.ex.values[name] = self._assemble(name)
                else:
                    self.ex.results[name] = self.location(name)
        except BaseException:
            self.cleanup(self.ex.created)
            raise
        self.ex.seconds = time.monotonic() - t0
        return self.ex

    def _steps(self, plan: Plan, steps: dict[str, Any]) -> None:
        """Run every step once the steps it depends on are done; on a failure start
        nothing more, let running steps finish, and raise the first error."""
        done = {sp.out: gevent.event.Event() for sp in plan.steps}
        failed = gevent.event.Event()
        errors: list[BaseException] = []

        def one(k: int, sp: StepPlan) -> None:
            try:
                for j in depends_on(plan, steps, k):
                    gevent.wait([done[plan.steps[j].out], failed], count=1)
                    if failed.is_set():
                        return
                self._step(sp, steps[sp.out])
                done[sp.out].set()
            except BaseException as exc:  # re-raised below, once the others are done
                errors.append(exc)
                failed.set()

        gevent.joinall([gevent.spawn(one, k, sp) for k, sp in enumerate(plan.steps)])
        if errors:
            raise errors[0]

    def _step(self, sp: StepPlan, step: Any) -> None:
        self._transfers([t for t in sp.transfers if t.kind == "data"])
        base = {"op": step.op, "params": dict(step.params), "hash": self._hash(step.op),
                "lineage": self.lineage(), "inline": MAX_INLINE if step.out in self._inline else 0}
        out_lineage = self.lineage(keep=self.keep)
        units = list(sp.work)
        parts = [w for w in units if w.mode == "part"]
        self._units[step.out] = len(parts) or 1
        if parts:
            self._parallel([partial(self._run, w.node, {
                **base, "lineage": out_lineage, "mode": "part", "out": step.out, "part": k,
                "nparts": len(parts), "expect": _expect(w, sp),
                "inputs": [{"name": n, "rows": None if n in sp.broadcast else list(w.rows[0])}
                           for n in step.inputs]})
                for k, w in enumerate(parts)])
        for w in units:
            if w.mode == "whole":
                self._run(w.node, {**base, "lineage": out_lineage, "mode": "whole",
                                   "out": step.out, "expect": _expect(w, sp),
                                   "inputs": [{"name": n} for n in step.inputs]})
        partials = [w for w in units if w.mode == "partial"]
        if partials:
            names = {w.node: f"{step.out}.partial{k}" for k, w in enumerate(partials)}
            self._parallel([partial(self._run, w.node, {
                **base, "mode": "partial", "out": names[w.node],
                "inputs": _row_inputs(step.inputs[0], w)}) for w in partials])
            combine = next(w for w in units if w.mode == "combine")
            self._parallel([partial(self.pull, combine.node, names[w.node], None, w.node)
                            for w in partials if w.node != combine.node])
            self._run(combine.node, {**base, "lineage": out_lineage, "mode": "combine",
                                     "out": step.out, "expect": _expect(combine, sp),
                                     "inputs": [{"name": names[w.node]} for w in partials]})

    def location(self, name: str) -> dict[str, Any]:
        """Where the parts of a result lie, for the script to pull (the records this
        execution made, else the catalog's), with the holders' bulk endpoints."""
        made = self._made.get(name)
        loc = locate(name, made) if made else self.node.catalog.locate(name)
        return {**loc.to_wire(), "bulk": self.node.bulk_endpoints()}

    def _assemble(self, name: str) -> np.ndarray[Any, Any]:
        """A result from the parts that came back inline, in part order."""
        got = self._inline[name]
        if list(got) == [None]:
            return got[None].array().copy()
        return np.concatenate([got[k].array() for k in sorted(k for k in got if k is not None)])

    def _hash(self, op: str) -> str:
        return self.node.registry.get(op).definition_hash

    def cleanup(self, created: list[tuple[str, str, int | None]]) -> int:
        """Delete what an execution created (best effort: nodes that are down are
        skipped; their janitors drop it when they are back)."""
        by_node: dict[str, list[list[Any]]] = defaultdict(list)
        for node, name, part in created:
            by_node[node].append([name, part])
        removed = 0
        for node, items in by_node.items():
            try:
                removed += int(self._call(node, "delete_parts", items))
            except HpcflowError as exc:
                log.warning("cleanup on %s failed: %s", node, exc)
        return removed


def depends_on(plan: Plan, steps: dict[str, Any], k: int) -> list[int]:
    """Earlier steps step ``k`` must wait for: those producing one of its inputs, and
    those reading one of its inputs too (their transfers may leave the copies that
    step ``k``'s plan counts on)."""
    mine = set(steps[plan.steps[k].out].inputs)
    out = []
    for j in range(k):
        step = steps[plan.steps[j].out]
        if step.out in mine or mine & set(step.inputs):
            out.append(j)
    return out


def _inline_size(sp: StepPlan) -> float:
    """Planned bytes of a step's output (infinite when a unit's size is unknown or one
    unit is over what a reply may carry)."""
    total = 0
    itemsize = np.dtype(sp.dtype).itemsize if sp.dtype else 0
    for w in sp.work:
        if w.mode == "partial":
            continue
        if w.shape is None or not itemsize:
            return float("inf")
        n = int(np.prod(w.shape, dtype=np.int64)) * itemsize
        if n > MAX_INLINE:
            return float("inf")
        total += n
    return total


def _expect(w: Work, sp: StepPlan) -> dict[str, Any] | None:
    if w.shape is None or not sp.dtype:
        return None
    return {"shape": list(w.shape), "dtype": sp.dtype}


def _row_inputs(name: str, w: Work) -> list[dict[str, Any]]:
    if not w.rows:
        return [{"name": name, "rows": [0, 0]}]
    return [{"name": name, "rows": list(r)} for r in w.rows]
