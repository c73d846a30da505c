"""Compile a workflow, placement, op advertisements and cost model into a search problem.

Compilation does everything that does not depend on placement decisions once:
op lookup and hash matching, output-size models (via ``hpcflow.ops``), which
objects are still needed after each step, and the node symmetry classes that
let the search consider one empty "blank" node per class (see
:meth:`Problem.candidates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpcflow.decide.cost import CostModel
from hpcflow.decide.errors import PlanningError
from hpcflow.decide.model import Dataset, NodeOps, Part, Placement, Step, Workflow
from hpcflow.decide.state import DataObject, Holding, PartGeom, State
from hpcflow.errors import with_context
from hpcflow.ops import (
    DEFAULT_REGISTRY,
    ArityError,
    ModelCache,
    OpError,
    OpRegistry,
    OpSpec,
    OutputModel,
    row_roles,
)


@dataclass(frozen=True)
class StepInfo:
    """A step with everything the planner needs to cost it."""

    index: int
    step: Step
    spec: OpSpec
    model: OutputModel
    splittable: bool
    capable: tuple[str, ...]
    in_rows: int
    #: per input: split by rows (True) or a broadcast operand sent whole (rowwise ops)
    aligned: tuple[bool, ...]
    #: per input: its row count; what the model's whole output is a function of (a
    #: global op's inputs may differ, where ``in_rows`` is the first row input's)
    input_rows: tuple[int, ...]
    #: distinct inputs split by rows (all of them unless some are broadcast)
    row_inputs: tuple[str, ...] = field(init=False)
    #: distinct broadcast operands: every node running a row block needs all of them
    broadcast_inputs: tuple[str, ...] = field(init=False)
    #: whether only At decisions apply: global ops, and reduces that cannot split with
    #: these params (a rowwise op can always run per part)
    at_only: bool = field(init=False)

    def __post_init__(self) -> None:
        pairs = list(zip(self.step.inputs, self.aligned, strict=True))
        rows = tuple(dict.fromkeys(n for n, a in pairs if a))
        whole = tuple(dict.fromkeys(n for n, a in pairs if not a))
        object.__setattr__(self, "row_inputs", rows)
        object.__setattr__(self, "broadcast_inputs", whole)
        object.__setattr__(self, "at_only", self.spec.kind != "rowwise" and not self.splittable)


class Problem:
    """A compiled planning problem; immutable after construction.

    The nodes considered are the initiator, the holders of the workflow's
    sources, every node in ``node_ops`` and any extra ``nodes`` (so that
    sub-problems of one workflow see the same cluster).
    """

    def __init__(
        self,
        workflow: Workflow,
        placement: Placement,
        *,
        registry: OpRegistry | None = None,
        node_ops: NodeOps | None = None,
        cost: CostModel | None = None,
        nodes: Iterable[str] = (),
        models: ModelCache | None = None,
    ) -> None:
        self.workflow = workflow
        self.initiator = workflow.initiator
        self.cost = cost or CostModel()
        registry = registry or DEFAULT_REGISTRY
        sources = _used_sources(workflow, placement)
        holders = {n for ds in sources.values() for part in ds.parts for n in part.holders}
        universe = {self.initiator} | holders | set(node_ops or ()) | set(nodes)
        # Initiator first, then by name: the order candidates are tried and ties kept.
        self.nodes = (self.initiator, *sorted(universe - {self.initiator}))
        self.sources = {
            name: DataObject(name, _source_parts(ds.parts)) for name, ds in sources.items()
        }
        self.models = models or ModelCache()
        self.steps = _compile_steps(
            workflow, placement, registry, node_ops, self.nodes, self.models
        )
        self._alive_after, self._alive_at_start = _liveness(workflow)
        self._read_after = tuple(
            frozenset(name for later in workflow.steps[index + 1 :] for name in later.inputs)
            for index in range(len(workflow.steps))
        )
        self._read_at_start = frozenset(name for step in workflow.steps for name in step.inputs)
        self._gathered_after = tuple(
            frozenset(
                name
                for later in self.steps[index + 1 :]
                if later.at_only
                for name in later.step.inputs
            )
            for index in range(len(self.steps))
        )
        self._interchange = _interchange_keys(self)

    def initial_state(self) -> State:
        alive = self._alive_at_start
        return State({n: Holding.original(obj) for n, obj in self.sources.items() if n in alive})

    def alive_after(self, index: int) -> frozenset[str]:
        """Objects needed by steps after ``index`` or delivered."""
        return self._alive_after[index]

    def read_after(self, index: int) -> frozenset[str]:
        """Objects some step after ``index`` (-1: any step) reads."""
        return self._read_after[index] if index >= 0 else self._read_at_start

    def gathered_after(self, index: int) -> frozenset[str]:
        """Objects some step after ``index`` needs whole on one node (At-only steps)."""
        return self._gathered_after[index]

    def candidates(self, index: int, state: State) -> tuple[str, ...]:
        """Nodes worth trying for step ``index``: exact up to node symmetry.

        Every capable node is kept except *empty* ones: nodes other than the
        initiator that hold nothing in ``state``.  The rest of the plan depends
        only on the state and node parameters, so empty nodes with the same
        capabilities for the remaining steps, the same load and call latency
        and only default links are interchangeable: any plan using one can be relabelled to use
        the first of its class at equal cost (bytes and seconds alike).
        """
        occupied = state.occupied()
        seen: set[object] = set()
        out = []
        for node in self.steps[index].capable:
            key = self._interchange.get(node)
            if node == self.initiator or node in occupied or key is None:
                out.append(node)
                continue
            cls = (key, tuple(node in info.capable for info in self.steps[index:]))
            if cls not in seen:
                seen.add(cls)
                out.append(node)
        return tuple(out)


def _used_sources(workflow: Workflow, placement: Placement) -> dict[str, Dataset]:
    produced: set[str] = set()
    used = {}
    for step in workflow.steps:
        if step.out in produced or step.out in placement.datasets:
            raise PlanningError(f"step {step.out!r}: output name is already a dataset or output")
        for name in step.inputs:
            if name in produced:
                continue
            if name not in placement.datasets:
                raise PlanningError(f"step {step.out!r}: unknown input {name!r}")
            used[name] = placement.datasets[name]
        produced.add(step.out)
    for name in workflow.deliver:
        if name not in produced:
            if name not in placement.datasets:
                raise PlanningError(f"cannot deliver unknown result {name!r}")
            used[name] = placement.datasets[name]
    return used


def _source_parts(parts: tuple[Part, ...]) -> tuple[PartGeom, ...]:
    out = []
    lo = 0
    for part in parts:
        out.append(PartGeom(lo, lo + part.rows, part.nbytes, part.holders))
        lo += part.rows
    return tuple(out)


def _compile_steps(
    workflow: Workflow,
    placement: Placement,
    registry: OpRegistry,
    node_ops: NodeOps | None,
    nodes: tuple[str, ...],
    models: ModelCache,
) -> tuple[StepInfo, ...]:
    # name -> (rows, row_shape, dtype) of every object known so far
    shapes: dict[str, tuple[int, tuple[int, ...], np.dtype[Any]]] = {
        name: (ds.rows, ds.row_shape, ds.dtype) for name, ds in placement.datasets.items()
    }
    infos = []
    for index, step in enumerate(workflow.steps):
        where = f"step {step.out!r} (op {step.op!r})"
        ins = [shapes[name] for name in step.inputs]
        real = [(rows, *row_shape) for rows, row_shape, _ in ins]
        try:
            spec = registry.get(step.op)
            if len(step.inputs) != spec.arity:
                raise ArityError(f"takes {spec.arity} input(s), got {len(step.inputs)}")
            aligned = row_roles(spec, real)
            model = models.model(
                spec,
                [s for _, s, _ in ins],
                [d for _, _, d in ins],
                step.params,
                broadcast=[None if a else s for s, a in zip(real, aligned, strict=True)],
            )
        except OpError as exc:
            given = ", ".join(f"{n} {s}" for n, s in zip(step.inputs, real, strict=True))
            raise with_context(exc, f"{where} on {given}: {exc}") from None
        capable = tuple(
            n
            for n in nodes
            if node_ops is None or node_ops.get(n, {}).get(step.op) == spec.definition_hash
        )
        if not capable:
            raise PlanningError(
                f"{where}: no node can run it (none advertises definition hash "
                f"{spec.definition_hash[:12]})"
            )
        rows = next(r for (r, _, _), a in zip(ins, aligned, strict=True) if a)
        counts = tuple(r for r, _, _ in ins)
        shape = model.shape(counts)
        shapes[step.out] = (model.out_rows(counts), tuple(shape[1:]), model.dtype)
        infos.append(
            StepInfo(
                index,
                step,
                spec,
                model,
                spec.can_split(step.params),
                capable,
                rows,
                aligned,
                counts,
            )
        )
    return tuple(infos)


def _liveness(workflow: Workflow) -> tuple[tuple[frozenset[str], ...], frozenset[str]]:
    """Objects needed after each step (by later steps or delivery), and at the start."""
    alive = set(workflow.deliver)
    after = []
    for step in reversed(workflow.steps):
        after.append(frozenset(alive))
        alive.discard(step.out)
        alive.update(step.inputs)
    return tuple(reversed(after)), frozenset(alive)


def _interchange_keys(problem: Problem) -> Mapping[str, object]:
    """Cost parameters that must match for two empty nodes to be interchangeable.

    The node's load and the latency of a call to it (both add to its time,
    which counts under the time objective and breaks ties under the bytes
    objective); a node with any custom link gets no key (never merged).
    """
    cost = problem.cost
    return {
        node: (cost.load.get(node, 0), cost.call_seconds(problem.initiator, node))
        for node in problem.nodes
        if not cost.has_custom_link(node)
    }
