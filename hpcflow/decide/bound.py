"""Admissible lower bounds on the bytes and the seconds a partial plan still costs.

The search prunes a partial plan when ``spent + bound >= best``, so the bound
must never exceed what any completion still costs (``docs/cost-model.md``,
"Why the search is exact").  The byte bound is assembled from per-object
pieces, because every transfer moves rows of exactly one object:

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
holdings stays valid whatever happens in between.  Broadcast operands of
rowwise steps are free in a need's tree (a lower bound ignores them).

The seconds bound follows how the cost model composes time.  A step takes at
least its smallest fixed cost among the nodes that could run it (queueing
delay plus the latency of the call that hands the node its work, none on
the initiator, plus one step overhead), plus:
an At-only step, its inbound transfers *and* its compute on its one node; any
step, its busiest destination's inbound time (so at least that into the
initiator), and the average over its execution nodes of inbound plus compute
(at most as many nodes as its input has parts).  Steps add up, so the
remaining time is at least

    fixed + At-only compute + max(into the initiator, all transfers / D + other compute)

where *into the initiator* is the time of every byte that must enter the
initiator over its fastest link, *all transfers* the time of every byte
still to move over the fastest link, ``D`` the most parts any object has
(only a rowwise split receives into several nodes at once, one per part),
and *other compute* each later step's input bytes over the op's throughput,
divided by the most parts its input can have.  Each byte piece carries the
bytes of it that must enter the initiator (a delivered object's missing
rows; a delivered step need's rows that arrive there whichever node computes
them).  Input sizes of steps not run yet come from the output models (0
where the partition could make them smaller).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hpcflow.decide.problem import Problem, StepInfo
from hpcflow.decide.state import DataObject, Holding, State, missing_rows

Dest = Literal["initiator", "one node"] | None
_Terms = tuple[float, float, float]


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
    """``bound(index, state)``: (bytes, seconds) still to spend after step ``index``,
    never overestimated.

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
        self._step: dict[tuple[int, int, tuple[Holding, ...]], tuple[int, int]] = {}
        self._rates = _Rates(problem)
        self._fixed = [self._step_fixed(info) for info in problem.steps]
        self._size, self._parts, self._largest, self._row = _static_sizes(problem)
        self._computes: dict[tuple[int, tuple[Holding | None, ...]], _Terms] = {}

    def __call__(self, index: int, state: State) -> tuple[int, float]:
        gathered = self.problem.gathered_after(index)
        own: dict[str, int] = {}
        own_init: dict[str, int] = {}
        for name, holding in state.holdings.items():
            if name in self.delivered:
                own[name] = own_init[name] = self._own_need(holding, True)
            elif name in gathered:
                own[name] = self._own_need(holding, False)
        total = sum(own.values())
        gains: list[tuple[int, int, frozenset[str]]] = []
        for k in range(index + 1, len(self.steps)):
            need = self._need(index, k, state)
            if need is not None:
                value, need_init, names = need
                gain = value - sum(own.get(n, 0) for n in names)
                if gain > 0:
                    gains.append((gain, need_init, names))
        used: set[str] = set()
        into_init, transfers = 0, 0
        for gain, need_init, names in sorted(gains, key=lambda g: -g[0]):
            if used.isdisjoint(names):
                total += gain
                used |= names
                piece = max(need_init, sum(own_init.get(n, 0) for n in names))
                into_init += piece
                transfers += piece > 0
        for name, missing in own_init.items():
            if name not in used and missing > 0:
                into_init += missing
                transfers += 1
        init_s, spread_s = self._rates.seconds(total, into_init, transfers)
        at_only, shared, biggest = self._compute(index, state)
        fixed = sum(self._fixed[index + 1 :])
        return total, fixed + at_only + max(init_s, spread_s + shared, biggest)

    def _step_fixed(self, info: StepInfo) -> float:
        """Least fixed time of step ``info`` wherever it runs (0 if it may run nothing).

        Every decision runs at least one unit on a capable node whose call,
        queueing and overhead precede what the other terms count: an At node,
        a split's slowest node (each node's fixed costs are at least this
        much) or a split reduce's combiner (after the holders' partials).
        """
        if _may_run_nothing(info):
            return 0.0
        cost, init = self.problem.cost, self.initiator
        least = min(cost.wait_seconds(n) + cost.call_seconds(init, n) for n in info.capable)
        return least + cost.step_overhead

    def _compute(self, index: int, state: State) -> tuple[float, float, float]:
        """Compute time of the steps after ``index``: At-only ones (on one node); the
        others shared by at most as many nodes as their input has parts; and the
        others' largest part each (one node computes every row of a part)."""
        at_only = shared = biggest = 0.0
        for info in self.steps[index + 1 :]:
            held = tuple(state.holdings.get(n) for n in info.step.inputs)
            key = (info.index, held)
            terms = self._computes.get(key)
            if terms is None:
                objs = [h.obj if h is not None else None for h in held]
                terms = self._computes[key] = self._step_compute(info, objs)
            at_only += terms[0]
            shared += terms[1]
            biggest += terms[2]
        return at_only, shared, biggest

    def _step_compute(
        self, info: StepInfo, objs: list[DataObject | None]
    ) -> _Terms:
        """(At-only compute, shared compute, largest-part compute) of one later step given
        which of its inputs exist (the others at their least possible size)."""
        cost = self.problem.cost
        op, inputs = info.step.op, info.step.inputs
        nbytes = sum(o.nbytes if o else self._size[n] for n, o in zip(inputs, objs, strict=True))
        if info.at_only:
            return cost.compute_seconds(op, nbytes), 0.0, 0.0
        if _may_run_nothing(info):
            return 0.0, 0.0, 0.0
        ways = max(self._parts[n] for n in info.row_inputs)
        shared = cost.compute_seconds(op, nbytes) / max(1, min(ways, len(info.capable)))
        rows = min(
            max((p.rows for p in o.parts), default=0) if o else self._largest[n]
            for n, o in zip(inputs, objs, strict=True)
            if n in info.row_inputs
        )
        part = sum(
            (o.nbytes if o else self._size[n])
            if n in info.broadcast_inputs
            else rows * ((o.nbytes // o.rows if o.rows else 0) if o else self._row[n])
            for n, o in zip(inputs, objs, strict=True)
        )
        return 0.0, shared, cost.compute_seconds(op, part)

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

    def _need(self, index: int, k: int, state: State) -> tuple[int, int, frozenset[str]] | None:
        """Step ``k``'s need after step ``index``: bytes, those of them that must enter
        the initiator, and the objects they belong to."""
        info = self.steps[k]
        if info.at_only:
            held = tuple(state.holdings[n] for n in info.step.inputs if n in state.holdings)
            if not held:
                return None
            key = (index, k, held)
            value = self._step.get(key)
            if value is None:
                value = self._step[key] = self._gather(info, held)
            return value[0], value[1], frozenset(h.obj.name for h in held) | {info.step.out}
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
        return value[0], value[1], tree.names

    def _gather(self, info: StepInfo, held: tuple[Holding, ...]) -> tuple[int, int]:
        """All input rows on one capable node, the output then to the initiator if delivered
        (and the bytes of that which must enter the initiator)."""
        out = 0
        if info.step.out in self.delivered:
            rows = info.model.out_rows(info.input_rows)
            out = info.model.nbytes(info.input_rows) // rows * rows if rows else 0
        nodes = self._nodes(held)
        options = [
            sum(h.floor_missing(n) for h in held) + (out if n != self.initiator else 0)
            for n in nodes
            if n in info.capable
        ]
        if any(n not in nodes for n in info.capable):  # a capable node holding none of it
            options.append(sum(h.floor_total() for h in held) + out)
        at_init = sum(h.floor_missing(self.initiator) for h in held)
        elsewhere = any(n != self.initiator for n in info.capable)
        init = min(
            at_init if self.initiator in info.capable else _INF, out if elsewhere else _INF
        )
        return min(options), int(init)

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
                tuple(map(child, info.row_inputs)),  # broadcast operands: free
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

    def _rows(self, tree: _Tree, held: tuple[Holding, ...]) -> tuple[int, int]:
        """Cheapest way, row by row, to compute the tree and put its output in place
        (and, for a delivered root, the least of that which must enter the initiator).

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
        init = nodes.index(self.initiator)
        blank = len(nodes) < len(self.problem.nodes)
        # capability per op and node; the blank column stands for every node holding no leaf
        capable: dict[int, list[bool]] = {}
        elsewhere: dict[int, bool] = {}

        def flags(op: _Op) -> None:
            col = [n in op.capable for n in nodes]
            if blank:
                col.append(any(n not in nodes for n in op.capable))
            capable[op.index] = col
            elsewhere[op.index] = any(n != self.initiator for n in op.capable)
            for c in op.children:
                if isinstance(c, _Op):
                    flags(c)

        flags(tree.root)
        width = len(nodes) + blank
        at_dest = [0] * width
        total = into_init = 0
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
                total += int(root[init])
                into_init += int(_into(tree.root, leaf_cost, capable, elsewhere, init, length))
            else:
                at_dest = [int(x + y) for x, y in zip(at_dest, root, strict=True)]
        return total + (min(at_dest) if tree.dest == "one node" else 0), into_init


class _Rates:
    """Fastest links and smallest latencies, to turn bytes into admissible seconds."""

    def __init__(self, problem: Problem) -> None:
        cost, nodes, init = problem.cost, problem.nodes, problem.initiator
        pairs = [(a, b) for a in nodes for b in nodes if a != b]
        links = [cost.link(a, b) for a, b in pairs] or [cost.default_link]
        into = [cost.link(a, init) for a in nodes if a != init] or [cost.default_link]
        self.bandwidth = max(link.bandwidth for link in links)
        self.latency = min(link.latency for link in links)
        self.init_bandwidth = max(link.bandwidth for link in into)
        self.init_latency = min(link.latency for link in into)
        parts = [len(obj.parts) for obj in problem.sources.values()]
        self.fan_in = max(1, min(len(nodes), max(parts, default=1)))

    def seconds(self, nbytes: int, into_init: int, transfers_into_init: int) -> tuple[float, float]:
        """Least time of the transfers into the initiator (``into_init`` bytes in at least
        ``transfers_into_init`` transfers), and of ``nbytes`` in all over ``fan_in``
        destinations at a time."""
        spread = (self.latency + nbytes / self.bandwidth) / self.fan_in if nbytes > 0 else 0.0
        init = (
            transfers_into_init * self.init_latency + into_init / self.init_bandwidth
            if into_init > 0
            else 0.0
        )
        return init, spread


def _may_run_nothing(info: StepInfo) -> bool:
    """A rowwise split of inputs without rows, whose output for no rows is empty, runs
    the op nowhere (it costs nothing, not even a broadcast operand's compute)."""
    return info.spec.kind == "rowwise" and not info.in_rows and not info.model.nbytes(0)


def _static_sizes(
    problem: Problem,
) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
    """Per object, whatever the plan: the fewest bytes it can have, the most parts, the
    fewest rows its largest part can have, and the fewest bytes per row.

    Sources are what they are; an At or reduce output is one part of exactly
    the model's size; a rowwise split output has its row inputs' parts at most
    (one of them is its basis, and merging adjacent parts only makes parts
    larger), and exact bytes per row only when its size is proportional to
    rows (else 0, since parts could make it smaller).
    """
    size = {name: obj.nbytes for name, obj in problem.sources.items()}
    parts = {name: len(obj.parts) for name, obj in problem.sources.items()}
    largest = {name: max((p.rows for p in obj.parts), default=0)
               for name, obj in problem.sources.items()}
    row = {name: min((p.row_floor for p in obj.parts if p.rows), default=0)
           for name, obj in problem.sources.items()}
    for info in problem.steps:
        out = info.step.out
        per_row = _row_bytes(info)
        if info.spec.kind == "rowwise":
            size[out] = per_row * info.in_rows
            parts[out] = max(parts[n] for n in info.row_inputs)
            preserving = _row_preserving(info)
            largest[out] = min(largest[n] for n in info.row_inputs) if preserving else 0
            row[out] = per_row
        else:
            size[out] = info.model.nbytes(info.input_rows)
            parts[out] = 1
            rows = info.model.out_rows(info.input_rows)
            largest[out] = rows
            row[out] = size[out] // rows if rows else 0
    return size, parts, largest, row


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


def _into(
    op: _Op,
    leaf_cost: dict[str, list[float]],
    capable: dict[int, list[bool]],
    elsewhere: dict[int, bool],
    init: int,
    length: int,
) -> float:
    """Least bytes of this segment that enter the initiator (column ``init``) to put
    ``op``'s output there: computed there (inputs brought in) or elsewhere and moved."""
    here = 0.0 if capable[op.index][init] else _INF
    for c in op.children:
        if c is None:
            continue
        here += leaf_cost[c][init] if isinstance(c, str) else _into(
            c, leaf_cost, capable, elsewhere, init, length
        )
    moved = op.row_bytes * length if elsewhere[op.index] else _INF
    return min(here, moved)


_INF = float("inf")


def _row_preserving(info: StepInfo) -> bool:
    """Output row i is made from input row i (not so for a row-selecting op)."""
    dims = info.model.dims
    return bool(dims) and tuple(dims[0]) == (1, 0) and info.model.keep is None


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
