"""Carry out a plan on the cluster, from the initiating node, peer to peer.

The plan becomes one share per participating node (:mod:`hpcflow.rpc.messages`): its
pulls (from the source the plan chose) and its units of work, in plan order.
Every node gets its share in one call, all at once, and runs it on its own
(:mod:`.share`): a step starts when the steps it depends on are done there,
and inputs other nodes make are waited for through the catalog, where their
makers announce them, so partials go straight to their combiner and no step
waits for a round trip to the initiator.  If one share fails, the initiator
cancels the others; each removes what it made before answering.

Results reach the script without a second copy on the initiator: a small
one (at most ``INLINE_TOTAL`` bytes, known from the plan's output model)
travels inline in the share replies of the nodes that made it and goes back
in the ``execute`` reply; a bigger one stays where it was made, and the
reply says where its parts are, so the script pulls them straight from their
holders (the plan's delivery transfers, counted by the script).

Every share reports the bytes it received from each source and the seconds
its steps spent (transfer, compute, wait), so the execution report gives
*actual* bytes per link next to the planned ones.  Everything an execution
creates (outputs, partials, copies, slices) carries its flow tag
(:mod:`.lifecycle`) and is listed so the flow can remove it later.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import numpy as np

from ..catalog.base import locate
from ..catalog.record import DatasetRecord
from ..decide import Plan, StepPlan, Work
from ..errors import HpcflowError, PeerUnavailable, from_wire
from ..rpc.messages import MAX_INLINE, PullTask, RunReply, RunTask, Share, ShareReply, Task
from .learned import Learned
from .lifecycle import FlowTag
from .parts import NodeParts
from .share import ShareCancelled

log = logging.getLogger("hpcflow.executor")

#: How long a flow's clean-up waits for its removals on other nodes to show here.
CLEANUP_SETTLE_S = 1.0
LONG_CALL_S = 24 * 3600.0  # liveness comes from RPC heartbeats, not from this
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
    #: Seconds per step output and kind (transfer, compute, wait), summed over nodes.
    step_seconds: defaultdict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(dict))
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
                "steps": {out: {k: round(v, 6) for k, v in d.items()}
                          for out, d in self.step_seconds.items()},
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
    """Runs one plan; ``node`` is the initiator it runs on, ``tag`` marks what it makes,
    ``learned`` gets the fixed costs it observes."""

    def __init__(self, node: NodeParts, learned: Learned, workflow_id: str, xid: str,
                 keep: bool = False) -> None:
        self.node = node
        self.learned = learned
        self.wf = workflow_id
        self.tag = FlowTag(node.name, node.epoch, xid)
        self.keep = keep
        self.ex = Execution()
        #: Outputs to bring back inline, and the replies (by part) that carried them.
        self._inline: dict[str, dict[int | None, RunReply]] = {}
        self._units: dict[str, int] = {}
        self._made: dict[str, list[DatasetRecord]] = defaultdict(list)
        self._outs: list[str] = []

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
            return self.node.call_local(method, *args)
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

    def run(self, plan: Plan, steps: dict[str, Any], deliver: list[str],
            admit_inline: Callable[[int], bool] | None = None) -> Execution:
        """Execute ``plan``; ``steps`` maps each output name to its step (op, inputs,
        params); ``deliver`` names the results the script wants.  A small result comes
        back in the reply if ``admit_inline`` (given its bytes) agrees, else as its
        location (the script pulls it from its holders)."""
        t0 = time.monotonic()
        self._inline = {sp.out: {} for sp in plan.steps
                        if sp.out in deliver and _inline_size(sp) <= INLINE_TOTAL}
        try:
            self._outs = [sp.out for sp in plan.steps]
            self._run_shares(self.shares(plan, steps))
            inline = {name for name, got in self._inline.items()
                      if got and len(got) == self._units.get(name)}
            for name in deliver:
                if name in inline and (admit_inline is None or admit_inline(
                        sum(len(u.data or b"") for u in self._inline[name].values()))):
                    self.ex.values[name] = self._assemble(name)
                else:
                    self.ex.results[name] = self.location(name)
        except BaseException:
            self.cleanup(self.ex.created)
            raise
        self.ex.seconds = time.monotonic() - t0
        return self.ex

    def shares(self, plan: Plan, steps: dict[str, Any]) -> dict[str, Share]:
        """Each participating node's tasks (see :mod:`hpcflow.rpc.messages`), in plan order."""
        tasks: dict[str, list[Task]] = defaultdict(list)
        made = {sp.out for sp in plan.steps}  # outputs (and partials) of this execution
        copies: set[tuple[str, str]] = set()  # (node, dataset) copies this execution makes
        for k, sp in enumerate(plan.steps):
            step = steps[sp.out]
            for t in sp.transfers:
                if t.kind != "data":
                    continue
                here = t.obj in made or (t.src, t.obj) in copies
                tasks[t.dst].append(PullTask(k, 0, t.obj, t.rows, t.src, here))
                copies.add((t.dst, t.obj))
            uses_made = any(n in made for n in step.inputs)
            base = {"op": step.op, "params": dict(step.params), "hash": self._hash(step.op),
                    "lineage": self.lineage(),
                    "inline": MAX_INLINE if step.out in self._inline else 0}
            out_lineage = self.lineage(keep=self.keep)
            units = list(sp.work)
            parts = [w for w in units if w.mode == "part"]
            self._units[step.out] = len(parts) or 1
            total = max((w.rows[0][1] for w in parts), default=0)  # the blocks cover the rows
            for k_part, w in enumerate(parts):
                tasks[w.node].append(RunTask.of(k, 1, {
                    **base, "lineage": out_lineage, "mode": "part", "out": step.out,
                    "part": k_part, "nparts": len(parts), "expect": _expect(w, sp),
                    "inputs": [{"name": n} if n in sp.broadcast else
                               {"name": n, "rows": list(w.rows[0]), "total": total}
                               for n in step.inputs]}, uses_made))
            for w in units:
                if w.mode == "whole":
                    tasks[w.node].append(RunTask.of(k, 1, {
                        **base, "lineage": out_lineage, "mode": "whole", "out": step.out,
                        "expect": _expect(w, sp), "inputs": [{"name": n} for n in step.inputs]},
                        uses_made))
            partials = [w for w in units if w.mode == "partial"]
            if partials:
                names = {w.node: f"{step.out}.partial{i}" for i, w in enumerate(partials)}
                made.update(names.values())
                for w in partials:
                    tasks[w.node].append(RunTask.of(k, 1, {
                        **base, "mode": "partial", "out": names[w.node],
                        "inputs": _row_inputs(step.inputs[0], w)}, uses_made))
                combine = next(w for w in units if w.mode == "combine")
                for w in partials:
                    if w.node != combine.node:
                        tasks[combine.node].append(PullTask(k, 2, names[w.node], None, w.node,
                                                            True))
                tasks[combine.node].append(RunTask.of(k, 3, {
                    **base, "lineage": out_lineage, "mode": "combine", "out": step.out,
                    "expect": _expect(combine, sp),
                    "inputs": [{"name": names[w.node]} for w in partials]}, True))
        depends = tuple(tuple(depends_on(plan, steps, k)) for k in range(len(plan.steps)))
        return {node: Share(self.wf, self.tag.execution, self.lineage(), depends, tuple(ts))
                for node, ts in tasks.items()}

    def _run_shares(self, shares: dict[str, Share]) -> None:
        """Hand every node its share at once; on the first failure cancel the others
        (they remove what they made), then raise it."""
        started = time.monotonic()
        jobs = {node: gevent.spawn(self._call, node, "run_share", share.to_wire())
                for node, share in shares.items()}
        ended: dict[str, float] = {}
        for node, g in jobs.items():
            g.link(lambda _, node=node: ended.setdefault(node, time.monotonic()))
        failed: BaseException | None = None
        pending = set(jobs.values())
        cancelled = False
        try:
            while pending:
                finished = gevent.wait(list(pending), count=1)
                for g in finished:
                    pending.discard(g)
                    bad = g.exception is not None or (isinstance(g.value, dict)
                                                      and g.value.get("error"))
                    if g.exception is not None and failed is None:
                        failed = g.exception
                    if bad and not cancelled:
                        cancelled = True
                        self._cancel_running(jobs)
        except BaseException:
            # This execution was abandoned (its script went away, the node is stopping):
            # the shares still running would otherwise wait for inputs that never come.
            self._cancel_running(jobs)
            gevent.killall([g for g in jobs.values() if not g.ready()], block=False)
            raise
        for node, g in jobs.items():
            if g.successful():
                reply = ShareReply.from_wire(g.value)
                self._absorb(node, reply)
                if node != self.node.name and node in ended:
                    self.learned.observe_call(
                        node, ended[node] - started - reply.wall_s)
                if reply.error is not None and (failed is None or isinstance(
                        failed, ShareCancelled)):
                    failed = from_wire(*reply.error)
        if failed is not None:
            raise failed

    def _cancel_running(self, jobs: dict[str, gevent.Greenlet]) -> None:
        """Ask every node whose share has not answered yet to cancel it."""
        for node, g in jobs.items():
            if not g.ready():
                gevent.spawn(self._cancel, node)

    def _cancel(self, node: str) -> None:
        try:
            self._call(node, "cancel_share", self.tag.execution)
        except HpcflowError as exc:  # it failed or died already: its own share says so
            log.debug("cancel on %s: %s", node, exc)

    def _absorb(self, node: str, reply: ShareReply) -> None:
        self.ex.created += reply.created
        for (k, kind), s in reply.seconds.items():
            if 0 <= k < len(self._outs):
                d = self.ex.step_seconds[self._outs[k]]
                d[kind] = d.get(kind, 0.0) + s
        for src, n in reply.moved.items():
            self.ex.moved[(src, node)] += n
        learned = self.learned
        for out in reply.runs:
            op = out.record.lineage.get("op")
            if isinstance(op, str) and out.run_s > 0:
                learned.observe_compute(op, out.nbytes_in, out.compute_s)
                learned.observe_step(out.run_s - out.compute_s)
            rec = out.record
            self._made[rec.name].append(rec)
            if out.data is not None and rec.name in self._inline:
                self._inline[rec.name][rec.part] = out
                if node != self.node.name:
                    self.ex.moved[(node, self.node.name)] += len(out.data)
                    self.node.traffic.received(node, len(out.data))

    def location(self, name: str) -> dict[str, Any]:
        """Where the parts of a result lie, for the script to pull (the records this
        execution made, else the catalog's), with the holders' bulk endpoints."""
        made = self._made.get(name)
        loc = locate(name, made) if made else self.node.catalog.locate(name)
        return {**loc.to_wire(), "bulk": self.node.bulk_endpoints(loc.owners)}

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
        gone: list[tuple[str, str, int | None]] = []
        for node, items in by_node.items():
            try:
                removed += int(self._call(node, "delete_parts", items))
                gone += [(node, name, part) for name, part in items]
            except HpcflowError as exc:
                log.warning("cleanup on %s failed: %s", node, exc)
        self._await_removals(gone)
        return removed

    def _await_removals(self, gone: list[tuple[str, str, int | None]]) -> None:
        """Return once this node's catalog no longer shows what other nodes just removed
        (at most ``CLEANUP_SETTLE_S``): the script's next flow plans from this catalog,
        and a plan counting on a copy that is gone fails and has to be made again."""
        cat = self.node.catalog
        others = [g for g in gone if g[0] != self.node.name]
        if not others or not cat.pushed:
            return

        def shown_removed() -> bool:
            return not any(rec.owner == holder and rec.part == part
                           for holder, name, part in others
                           for rec in cat.records_named(name))

        cat.wait_until(shown_removed, CLEANUP_SETTLE_S)


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
