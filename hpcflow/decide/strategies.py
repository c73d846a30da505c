"""The per-step placement decisions and their exact cost given a state.

Three decision types span the plan space (``docs/cost-model.md``):

* :class:`At` — gather every input row on one node and run the op there
  (reported as local / fetch / delegate);
* :class:`Split` — rowwise ops: each part of one row input (the ``basis``)
  runs on a node that holds it (``target`` if it holds the whole part, else
  the part's home); the other row inputs' overlapping rows and the whole of
  every broadcast operand are moved there;
* :class:`SplitReduce` — splittable reduce ops: holders compute partials and
  send them to ``combiner``; a part is sent raw instead when that is no larger.

:func:`evaluate` is the single source of truth for costs and resulting states;
the exact search, the baselines, the brute force in tests and the final plan
assembly all call it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from hpcflow.decide.cost import CostKey
from hpcflow.decide.plan import Transfer, Work
from hpcflow.decide.problem import Problem, StepInfo
from hpcflow.decide.state import DataObject, Holding, PartGeom, State, covers, missing


@dataclass(frozen=True)
class At:
    node: str


@dataclass(frozen=True)
class Split:
    target: str | None
    basis: int = 0  # index into StepInfo.row_inputs: whose partition the output follows


@dataclass(frozen=True)
class SplitReduce:
    combiner: str


Decision = At | Split | SplitReduce


@dataclass(frozen=True)
class Outcome:
    """A decision's effect: transfers, execution nodes, cost and the next state."""

    decision: Decision
    transfers: tuple[Transfer, ...]
    nodes: tuple[str, ...]
    nbytes: int
    seconds: float
    key: CostKey
    state: State
    work: tuple[Work, ...] = ()


def decisions(
    problem: Problem, index: int, state: State, *, exhaustive: bool = False
) -> list[Decision]:
    """All decisions for step ``index``; ``exhaustive`` skips the node-symmetry reduction."""
    info = problem.steps[index]
    nodes = info.capable if exhaustive else problem.candidates(index, state)
    out: list[Decision] = [At(n) for n in nodes]
    if info.spec.kind == "rowwise":
        for basis, name in enumerate(info.row_inputs):
            targets = nodes if exhaustive else _split_targets(info, state.holdings[name], nodes)
            out += [Split(None, basis), *(Split(n, basis) for n in targets)]
    elif info.spec.kind == "reduce" and info.splittable:
        out += [SplitReduce(n) for n in nodes]
    return out


def _split_targets(info: StepInfo, basis: Holding, nodes: tuple[str, ...]) -> tuple[str, ...]:
    """Split targets whose outcome can differ from ``Split(None)``: a target only matters
    where it holds a whole non-empty part of the basis, unless some part has no capable
    home (then the target runs it)."""
    parts = basis.obj.parts
    if not all(any(n in info.capable for n in p.homes) for p in parts):
        return nodes
    return tuple(
        n for n in nodes if any(p.rows and covers(basis.at(n), p.lo, p.hi) for p in parts)
    )


def outcomes(
    problem: Problem, index: int, state: State, *, exhaustive: bool = False
) -> list[Outcome]:
    """Feasible outcomes of step ``index``, one per distinct next state (the cheapest)."""
    best: dict[tuple[object, ...], Outcome] = {}
    for decision in decisions(problem, index, state, exhaustive=exhaustive):
        outcome = evaluate(problem, index, state, decision)
        if outcome is None:
            continue
        old = best.get(outcome.state.key)
        if old is None or outcome.key < old.key:
            best[outcome.state.key] = outcome
    return list(best.values())


def evaluate(problem: Problem, index: int, state: State, decision: Decision) -> Outcome | None:
    """Cost and next state of running step ``index`` per ``decision``; None if infeasible."""
    info = problem.steps[index]
    chosen = decision.target if isinstance(decision, Split) else _node(decision)
    if chosen is not None and chosen not in info.capable:
        return None
    run = _Run(problem, state)
    nodes: tuple[str, ...] | None
    if isinstance(decision, At):
        nodes = run.at(info, decision.node)
    elif isinstance(decision, Split):
        nodes = run.split(info, decision.target, decision.basis)
    else:
        nodes = run.split_reduce(info, decision.combiner)
    if nodes is None:
        return None
    nbytes = sum(t.nbytes for t in run.transfers)
    seconds = run.seconds
    alive = problem.alive_after(index)
    return Outcome(
        decision,
        tuple(run.transfers),
        nodes,
        nbytes,
        seconds,
        problem.cost.key(nbytes, seconds),
        State({name: h for name, h in run.hold.items() if name in alive}),
        tuple(run.work),
    )


def _node(decision: At | SplitReduce) -> str:
    return decision.node if isinstance(decision, At) else decision.combiner


def deliver(
    problem: Problem, state: State, names: Iterable[str] | None = None
) -> tuple[tuple[Transfer, ...], float]:
    """Transfers (and their time) that put results (default: all) wholly on the initiator."""
    run = _Run(problem, state)
    for name in problem.workflow.deliver if names is None else names:
        run.bring(name, 0, run.hold[name].obj.rows, problem.initiator)
    return tuple(run.transfers), run.inbound[problem.initiator]


class _Run:
    """Mutable scratch space for evaluating one decision."""

    def __init__(self, problem: Problem, state: State) -> None:
        self.problem = problem
        self.cost = problem.cost
        self.initiator = problem.initiator
        self.hold = dict(state.holdings)
        self.transfers: list[Transfer] = []
        self.inbound: defaultdict[str, float] = defaultdict(float)
        self.seconds = 0.0
        self.work: list[Work] = []

    def at(self, info: StepInfo, node: str) -> tuple[str, ...]:
        step = info.step
        for name in dict.fromkeys(step.inputs):
            self.bring(name, 0, self.hold[name].obj.rows, node)
        work = sum(self.hold[name].obj.nbytes for name in step.inputs)
        self.seconds = self.inbound[node] + self._unit(info, node, work, 1)
        rows = info.model.out_rows(info.input_rows)
        self._create(step.out, (PartGeom(0, rows, info.model.nbytes(info.input_rows), (node,)),))
        self.work.append(Work(node, "whole", (), (0, rows), info.model.shape(info.input_rows)))
        return (node,)

    def split(self, info: StepInfo, target: str | None, basis: int = 0) -> tuple[str, ...] | None:
        step = info.step
        if basis >= len(info.row_inputs):
            return None
        first = self.hold[info.row_inputs[basis]]
        work: defaultdict[str, int] = defaultdict(int)
        units: defaultdict[str, int] = defaultdict(int)
        nodes, parts = [], []
        lo_out = 0
        for part in first.obj.parts:
            node = self._split_node(info, first, part, target)
            if node is None:
                return None
            if part.rows or info.model.nbytes(0):
                for name in info.row_inputs:
                    self.bring(name, part.lo, part.hi, node)
                for name in info.broadcast_inputs:
                    self.bring(name, 0, self.hold[name].obj.rows, node)
                work[node] += sum(
                    self._bytes(name, part.lo, part.hi) if aligned else self.hold[name].obj.nbytes
                    for name, aligned in zip(step.inputs, info.aligned, strict=True)
                )
                units[node] += 1
            # a row-selecting op (frames) keeps the rows of its selection in this part
            shape = info.model.part_shape(part.lo, part.hi, first.obj.rows)
            rows = shape[0] if shape else 1
            nbytes = info.model.part_nbytes(part.lo, part.hi, first.obj.rows)
            parts.append(PartGeom(lo_out, lo_out + rows, nbytes, (node,)))
            self.work.append(Work(node, "part", ((part.lo, part.hi),), (lo_out, lo_out + rows),
                                  shape))
            nodes.append(node)
            lo_out += rows
        # one call per node (its units start in parallel), each unit's fixed overhead
        self.seconds = max(
            (self.inbound[n] + self._unit(info, n, w, units[n]) for n, w in work.items()),
            default=0.0,
        )
        self._create(step.out, tuple(parts))
        return tuple(nodes)

    def _split_node(
        self, info: StepInfo, first: Holding, part: PartGeom, target: str | None
    ) -> str | None:
        """Where a part runs: target if it has the part, else the cheapest capable home.

        An empty part moves nothing, so it goes to its first capable home, or
        ``target``, or the first capable node.
        """
        homes = [n for n in part.homes if n in info.capable]
        if part.rows == 0:
            return homes[0] if homes else target or info.capable[0]
        if target is not None and covers(first.at(target), part.lo, part.hi):
            return target
        if homes:
            others = [n for n in info.row_inputs if n != first.obj.name]
            whole = info.broadcast_inputs
            return min(
                homes,
                key=lambda n: sum(self._missing(o, part.lo, part.hi, n) for o in others)
                + sum(self._missing(b, 0, self.hold[b].obj.rows, n) for b in whole),
            )
        return target

    def split_reduce(self, info: StepInfo, combiner: str) -> tuple[str, ...]:
        name = info.step.inputs[0]
        x = self.hold[name]
        groups: dict[str, list[PartGeom]] = {}
        for part in x.obj.parts:
            if part.rows:
                groups.setdefault(self._partial_node(info, x, part, combiner), []).append(part)
        work: defaultdict[str, int] = defaultdict(int)
        at_combiner: list[tuple[int, int]] = []
        for node, parts in groups.items():
            partial = info.model.partial_nbytes(sum(p.rows for p in parts))
            raw = sum(self._missing(name, p.lo, p.hi, combiner) for p in parts)
            if node != combiner and partial <= raw:
                span = (parts[0].lo, parts[-1].hi)
                self._send(Transfer(node, combiner, name, span, partial, "partial"))
                work[node] += sum(p.nbytes for p in parts)
                self.work.append(Work(node, "partial", tuple((p.lo, p.hi) for p in parts)))
            else:
                for p in parts:
                    self.bring(name, p.lo, p.hi, combiner)
                work[combiner] += sum(p.nbytes for p in parts)
                at_combiner += [(p.lo, p.hi) for p in parts]
        if at_combiner or not self.work:
            self.work.append(Work(combiner, "partial", tuple(sorted(at_combiner))))
        out_rows = (0, info.model.out_rows(info.in_rows))
        self.work.append(Work(combiner, "combine", (), out_rows, info.model.shape(info.in_rows)))
        holders = max(
            (self._unit(info, n, w, 1) for n, w in work.items() if n != combiner), default=0.0
        )
        at_combiner_units = sum(w.node == combiner for w in self.work)  # partial?, combine
        combine = self.inbound[combiner] + self._unit(
            info, combiner, work[combiner], at_combiner_units
        )
        self.seconds = holders + combine
        self._create(
            info.step.out,
            (
                PartGeom(
                    0,
                    info.model.out_rows(info.in_rows),
                    info.model.nbytes(info.in_rows),
                    (combiner,),
                ),
            ),
        )
        return tuple(work)

    def _partial_node(self, info: StepInfo, x: Holding, part: PartGeom, combiner: str) -> str:
        """Where a part's partial is computed: the combiner if it has the rows or no
        capable home exists, else the home that gets a partial there soonest.
        Each node sends one partial over all its parts (unless raw rows are smaller;
        a partial as big as the rows is still computed there, in parallel)."""
        homes = [n for n in part.homes if n in info.capable and n != combiner]
        if not homes or covers(x.at(combiner), part.lo, part.hi):
            return combiner
        nbytes = info.model.partial_nbytes(part.rows)
        cost = self.cost
        return min(
            homes,
            key=lambda n: cost.call_seconds(self.initiator, n)
            + cost.wait_seconds(n)
            + cost.transfer_seconds(n, combiner, nbytes),
        )

    def bring(self, name: str, lo: int, hi: int, dst: str) -> None:
        """Move the rows of ``[lo, hi)`` that ``dst`` lacks, part by part, from the best source."""
        holding = self.hold[name]
        have = holding.at(dst)
        if covers(have, lo, hi):
            return
        for part in holding.obj.parts:
            a, b = max(lo, part.lo), min(hi, part.hi)
            if a >= b:
                continue
            for x, y in missing(have, a, b):
                nbytes = part.bytes_of(x, y)
                src = self._source(holding, part, x, y, dst, nbytes)
                self._send(Transfer(src, dst, name, (x, y), nbytes))
        self.hold[name] = holding.with_rows(dst, lo, hi)

    def _source(
        self, holding: Holding, part: PartGeom, lo: int, hi: int, dst: str, nbytes: int
    ) -> str:
        """Fastest node with the whole range; homes win ties (they always have it)."""
        if not self.cost.links and part.homes:
            # every source is equally fast over the default link: the first home wins
            return part.homes[0]
        nodes = [*part.homes, *sorted(set(holding.holders(lo, hi)) - set(part.homes))]
        return min(nodes, key=lambda n: self.cost.transfer_seconds(n, dst, nbytes))

    def _send(self, transfer: Transfer) -> None:
        self.transfers.append(transfer)
        self.inbound[transfer.dst] += self.cost.transfer_seconds(
            transfer.src, transfer.dst, transfer.nbytes
        )

    def _missing(self, name: str, lo: int, hi: int, node: str) -> int:
        return self.hold[name].missing_bytes(node, lo, hi)

    def _bytes(self, name: str, lo: int, hi: int) -> int:
        return sum(
            part.bytes_of(max(lo, part.lo), min(hi, part.hi))
            for part in self.hold[name].obj.parts
            if max(lo, part.lo) < min(hi, part.hi)
        )

    def _unit(self, info: StepInfo, node: str, nbytes_in: int, units: int) -> float:
        """Time on ``node`` once its inputs are there: the call that hands it the work
        (none on the initiator), ``units`` fixed step overheads, queueing, compute."""
        cost = self.cost
        return (
            cost.call_seconds(self.initiator, node)
            + units * cost.step_overhead
            + cost.wait_seconds(node)
            + cost.compute_seconds(info.step.op, nbytes_in)
        )

    def _create(self, name: str, parts: tuple[PartGeom, ...]) -> None:
        """Record a new output; adjacent parts on the same node become one part, so
        equivalent placements reach identical states."""
        merged: list[PartGeom] = []
        for part in parts:
            prev = merged[-1] if merged else None
            if prev is not None and prev.homes == part.homes:
                merged[-1] = PartGeom(prev.lo, part.hi, prev.nbytes + part.nbytes, part.homes)
            else:
                merged.append(part)
        self.hold[name] = Holding.original(DataObject(name, tuple(merged)))
