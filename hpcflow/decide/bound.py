"""Admissible lower bound on the bytes a partial plan must still move.

The search prunes a partial plan when ``spent + bound >= best``, so the bound
must never exceed the bytes any completion still moves (``docs/cost-model.md``,
"Why the search is exact").  It is assembled from per-object pieces, because
every transfer moves rows of exactly one object:

* **own need** of an existing object: a delivered one must become whole on
  the initiator; one read later by a global (At-only) step must become whole
  on *some* node.
* **step need** of a later step: every row of its inputs must meet on the
  node that computes it (an At-only op: all rows of its existing inputs on one
  capable node; a rowwise op: row by row, through an expression tree whose
  leaves are the inputs that exist and whose inner nodes are the rowwise,
  row-preserving steps still to make the other inputs), and, if its output
  must end on the initiator (delivered) or whole on one node (read by an
  At-only step), every output row computed elsewhere must move there
  afterwards.  This covers the bytes of the leaves, inner results and output
  together.

A step need and the own needs of its objects bound the same bytes, so the
larger counts; step needs whose object sets overlap may share transfers, so
only a disjoint selection of them is added (greedily, by gain).  Inputs that
cannot be expanded (made by global or reduce steps, or used a second time in
one tree) are free: they could be produced anywhere.

Missing rows are priced at each part's rounded-down bytes per row
(:attr:`PartGeom.row_floor`): rows already on a node never have to move, rows
moved earlier cost at least that much, so the bound computed from the current
holdings stays valid whatever happens in between.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hpcflow.decide.problem import Problem, StepInfo
from hpcflow.decide.state import Holding, State, missing_rows

Dest = Literal["initiator", "one node"] | None


@dataclass(frozen=True)
class _Op:
    """A rowwise step in a need's expression tree: its output rows are its input rows."""

    index: int
    capable: frozenset[str]
    row_bytes: int  # exact bytes per output row; 0 if not proportional to rows
    children: tuple[str | _Op | None, ...]  # existing object, nested step, or free input


@dataclass(frozen=True)
class _Tree:
    """A rowwise need after some step: the step, the inputs that exist already
    (leaves) and every object whose bytes the need accounts for."""

    root: _Op
    dest: Dest
    leaves: tuple[str, ...]
    names: frozenset[str]


class LowerBound:
    """``bound(index, state)``: bytes still to move after step ``index``, never overestimated.

    Values depend only on the holdings involved, so they are cached by holding
    (holdings are immutable and shared between states).
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.steps = problem.steps
        self.initiator = problem.initiator
        self.delivered = frozenset(problem.workflow.deliver)
        self.producer = {info.step.out: info.index for info in problem.steps}
        self._trees: dict[tuple[int, int], _Tree | None] = {}
        self._own: dict[tuple[Holding, bool], int] = {}
        self._step: dict[tuple[int, int, tuple[Holding, ...]], int] = {}

    def __call__(self, index: int, state: State) -> int:
        gathered = self.problem.gathered_after(index)
        own: dict[str, int] = {}
        for name, holding in state.holdings.items():
            if name in self.delivered:
                own[name] = self._own_need(holding, True)
            elif name in gathered:
                own[name] = self._own_need(holding, False)
        total = sum(own.values())
        gains: list[tuple[int, frozenset[str]]] = []
        for k in range(index + 1, len(self.steps)):
            need = self._need(index, k, state)
            if need is not None:
                value, names = need
                gain = value - sum(own.get(n, 0) for n in names)
                if gain > 0:
                    gains.append((gain, names))
        used: set[str] = set()
        for gain, names in sorted(gains, key=lambda g: -g[0]):
            if used.isdisjoint(names):
                total += gain
                used |= names
        return total

    def _own_need(self, holding: Holding, delivered: bool) -> int:
        key = (holding, delivered)
        value = self._own.get(key)
        if value is None:
            if delivered:
                value = holding.floor_missing(self.initiator)
            else:
                held = [holding.floor_missing(n) for n in holding.nodes()]
                if len(held) < len(self.problem.nodes):  # some node holds none of it
                    held.append(holding.floor_total())
                value = min(held)
            self._own[key] = value
        return value

    def _need(self, index: int, k: int, state: State) -> tuple[int, frozenset[str]] | None:
        """Step ``k``'s need after step ``index``: bytes and the objects they belong to."""
        info = self.steps[k]
        if info.at_only:
            held = tuple(state.holdings[n] for n in info.step.inputs if n in state.holdings)
            if not held:
                return None
            key = (index, k, held)
            value = self._step.get(key)
            if value is None:
                value = self._step[key] = self._gather(info, held)
            return value, frozenset(h.obj.name for h in held) | {info.step.out}
        if info.spec.kind != "rowwise":
            return None  # a split reduce moves partials, next to nothing
        tree = self._tree(index, k)
        if tree is None:
            return None
        held = tuple(state.holdings[n] for n in tree.leaves)
        key = (index, k, held)
        value = self._step.get(key)
        if value is None:
            value = self._step[key] = self._rows(tree, held)
        return value, tree.names

    def _gather(self, info: StepInfo, held: tuple[Holding, ...]) -> int:
        """All input rows on one capable node, the output then to the initiator if delivered."""
        out = 0
        if info.step.out in self.delivered:
            rows = info.model.out_rows(info.in_rows)
            out = info.model.nbytes(info.in_rows) // rows * rows if rows else 0
        nodes = self._nodes(held)
        options = [
            sum(h.floor_missing(n) for h in held) + (out if n != self.initiator else 0)
            for n in nodes
            if n in info.capable
        ]
        if any(n not in nodes for n in info.capable):  # a capable node holding none of it
            options.append(sum(h.floor_total() for h in held) + out)
        return min(options)

    def _tree(self, index: int, k: int) -> _Tree | None:
        """Step ``k`` with its not-yet-existing inputs expanded through rowwise steps.

        An input that exists after step ``index`` is a leaf; one a later rowwise,
        row-preserving step produces is expanded; anything else (or a repeat)
        is free.  None if no leaf exists.
        """
        key = (index, k)
        if key in self._trees:
            return self._trees[key]
        leaves: list[str] = []
        names: set[str] = set()

        def expand(j: int) -> _Op:
            info = self.steps[j]
            names.add(info.step.out)
            return _Op(
                j,
                frozenset(info.capable),
                _row_bytes(info),
                tuple(map(child, dict.fromkeys(info.step.inputs))),
            )

        def child(name: str) -> str | _Op | None:
            if name in names or name in leaves:
                return None
            j = self.producer.get(name)
            if j is None or j <= index:
                leaves.append(name)
                return name
            if self.steps[j].spec.kind == "rowwise" and _row_preserving(self.steps[j]):
                return expand(j)
            return None

        root = expand(k)
        out = self.steps[k].step.out
        dest: Dest = None
        if out in self.delivered:
            dest = "initiator"
        elif out in self.problem.gathered_after(k):
            dest = "one node"
        tree = _Tree(root, dest, tuple(leaves), frozenset(names | set(leaves))) if leaves else None
        self._trees[key] = tree
        return tree

    def _nodes(self, held: Sequence[Holding]) -> list[str]:
        """Nodes holding any row of ``held``, and the initiator."""
        return list(dict.fromkeys([*(n for h in held for n in h.nodes()), self.initiator]))

    def _rows(self, tree: _Tree, held: tuple[Holding, ...]) -> int:
        """Cheapest way, row by row, to compute the tree and put its output in place.

        Cuts at every part and holding boundary make each node hold all or none
        of a segment, so costs are per row and the result holds whatever
        partitions the steps end up with.
        """
        rows = held[0].obj.rows
        cuts = {0, rows}
        for h in held:
            cuts.update(p.lo for p in h.obj.parts)
            cuts.update(x for _, have in h.held for iv in have for x in iv)
        bounds = sorted(c for c in cuts if 0 <= c <= rows)
        nodes = self._nodes(held)
        blank = len(nodes) < len(self.problem.nodes)
        # capability per op and node; the blank column stands for every node holding no leaf
        capable: dict[int, list[bool]] = {}

        def flags(op: _Op) -> None:
            col = [n in op.capable for n in nodes]
            if blank:
                col.append(any(n not in nodes for n in op.capable))
            capable[op.index] = col
            for c in op.children:
                if isinstance(c, _Op):
                    flags(c)

        flags(tree.root)
        width = len(nodes) + blank
        at_dest = [0] * width
        total = 0
        for a, b in itertools.pairwise(bounds):
            if a == b:
                continue
            length = b - a
            leaf_cost: dict[str, list[float]] = {}
            for h in held:
                rate = _rate(h, a) * length
                col = [float(rate if missing_rows(h.at(n), a, b) else 0) for n in nodes]
                if blank:
                    col.append(rate)
                leaf_cost[h.obj.name] = col
            root = _made(tree.root, leaf_cost, capable, length)
            if tree.dest is None:
                total += int(min(root))
            elif tree.dest == "initiator":
                total += int(root[nodes.index(self.initiator)])
            else:
                at_dest = [int(x + y) for x, y in zip(at_dest, root, strict=True)]
        return total + (min(at_dest) if tree.dest == "one node" else 0)


def _made(
    op: _Op, leaf_cost: dict[str, list[float]], capable: dict[int, list[bool]], length: int
) -> list[float]:
    """Per node: the least bytes that put this segment of ``op``'s output there,
    computed there (inputs brought) or computed elsewhere and moved."""
    here = [0.0 if ok else _INF for ok in capable[op.index]]
    for c in op.children:
        if c is None:
            continue
        cost = leaf_cost[c] if isinstance(c, str) else _made(c, leaf_cost, capable, length)
        here = [x + y for x, y in zip(here, cost, strict=True)]
    moved = min(here) + op.row_bytes * length
    return [min(x, moved) for x in here]


_INF = float("inf")


def _row_preserving(info: StepInfo) -> bool:
    dims = info.model.dims
    return bool(dims) and tuple(dims[0]) == (1, 0)


def _row_bytes(info: StepInfo) -> int:
    """Exact bytes per output row if the output size is proportional to rows, else 0."""
    dims = info.model.dims
    if _row_preserving(info) and all(slope == 0 for slope, _ in dims[1:]):
        return info.model.nbytes(1)
    return 0


def _rate(holding: Holding, row: int) -> int:
    """Rounded-down bytes per row of the part of ``holding`` containing ``row``."""
    for part in holding.obj.parts:
        if part.lo <= row < part.hi:
            return part.row_floor
    return 0
