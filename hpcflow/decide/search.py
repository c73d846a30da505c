"""Exact whole-workflow planning: depth-first branch and bound with state memoisation.

The plan space is every sequence of per-step decisions (:mod:`strategies`).
Exactness rests on three facts, argued in ``docs/cost-model.md``:

1. costs are additive over steps and each step's cost depends only on the
   state (who holds which rows of the objects still needed), so two partial
   plans reaching the same state after step k can keep only the cheaper
   (memo table keyed by ``(k, state)``);
2. the bound — bytes of already-existing results missing on the initiator,
   which must still be moved, and zero seconds — never overestimates (also
   lexicographically under the time objective), so pruning on
   ``cost so far + bound >= best`` never drops a better plan;
3. the per-step node candidates lose nothing up to relabelling of
   interchangeable empty nodes (:meth:`Problem.candidates`).

The incumbent starts as the better of the greedy and pull-all plans, so the
search only ever has to prove or improve on them.
"""

from __future__ import annotations

from hpcflow.decide.assemble import assemble, decisions_cost
from hpcflow.decide.baselines import baseline_decisions
from hpcflow.decide.cost import CostKey, CostModel
from hpcflow.decide.model import NodeOps, Placement, Workflow
from hpcflow.decide.plan import Plan
from hpcflow.decide.problem import Problem
from hpcflow.decide.state import State
from hpcflow.decide.strategies import Decision, deliver, outcomes
from hpcflow.ops import OpRegistry


def optimal_plan(
    workflow: Workflow,
    placement: Placement,
    *,
    registry: OpRegistry | None = None,
    node_ops: NodeOps | None = None,
    cost: CostModel | None = None,
) -> Plan:
    """The cheapest plan under ``cost`` (fewest bytes by default), found exactly."""
    problem = Problem(workflow, placement, registry=registry, node_ops=node_ops, cost=cost)
    decided: dict[int, Decision] = {}
    for indices in components(workflow):
        sub = Problem(
            Workflow(
                tuple(workflow.steps[i] for i in indices),
                workflow.initiator,
                tuple(name for name in workflow.deliver if name in _names(workflow, indices)),
            ),
            placement,
            registry=registry,
            node_ops=node_ops,
            cost=cost,
            nodes=problem.nodes,
        )
        decided.update(zip(indices, search(sub), strict=True))
    return assemble(problem, [decided[i] for i in range(len(workflow.steps))], method="optimal")


def search(problem: Problem) -> list[Decision]:
    """Decisions of a minimum-cost plan for ``problem``."""
    return _BranchAndBound(problem).run()


def components(workflow: Workflow) -> list[list[int]]:
    """Step indices grouped by the objects they share (inputs, outputs, delivery).

    Costs of steps in different groups never interact: every transfer moves
    rows of one object and a step's cost depends only on its inputs' holdings.
    So the groups are planned separately and their costs add up.
    """
    parent = list(range(len(workflow.steps)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_user: dict[str, int] = {}
    for index, step in enumerate(workflow.steps):
        for name in (step.out, *step.inputs):
            other = first_user.setdefault(name, index)
            parent[root(index)] = root(other)
    groups: dict[int, list[int]] = {}
    for index in range(len(workflow.steps)):
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def _names(workflow: Workflow, indices: list[int]) -> set[str]:
    return {name for i in indices for name in (workflow.steps[i].out, *workflow.steps[i].inputs)}


class _BranchAndBound:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.best_key: CostKey | None = None
        self.best: list[Decision] = []
        for decided in baseline_decisions(problem):
            key = decisions_cost(problem, decided)
            if self.best_key is None or key < self.best_key:
                self.best_key, self.best = key, decided
        self.memo: dict[tuple[int, tuple[object, ...]], CostKey] = {}
        self.path: list[Decision] = []

    def run(self) -> list[Decision]:
        settled, state = self._settle(-1, self.problem.initial_state())
        self._visit(0, state, settled)
        return self.best

    def _visit(self, index: int, state: State, spent: CostKey) -> None:
        problem = self.problem
        if index == len(problem.steps):
            # every result was settled after the last step reading it
            if self.best_key is None or spent < self.best_key:
                self.best_key, self.best = spent, list(self.path)
            return
        options = sorted(outcomes(problem, index, state), key=lambda o: o.key)
        for outcome in options:
            settled, state_after = self._settle(index, outcome.state)
            reached = _add(_add(spent, outcome.key), settled)
            if not self._promising(index, reached, state_after):
                continue
            memo_key = (index, state_after.key)
            seen = self.memo.get(memo_key)
            if seen is not None and seen <= reached:
                continue
            self.memo[memo_key] = reached
            self.path.append(outcome.decision)
            self._visit(index + 1, state_after, reached)
            self.path.pop()

    def _settle(self, index: int, state: State) -> tuple[CostKey, State]:
        """Deliver results no later step reads now and drop them from the state.

        Their remaining cost is fixed (their holdings cannot change any more),
        so settling early is exact and lets states that differ only in where
        finished results sit share one memo entry.
        """
        problem = self.problem
        read = problem.read_after(index)
        done = [n for n in problem.workflow.deliver if n in state.holdings and n not in read]
        if not done:
            return (0.0, 0.0), state
        transfers, seconds = deliver(problem, state, done)
        keep = [name for name in state.holdings if name not in done]
        return problem.cost.key(sum(t.nbytes for t in transfers), seconds), state.restricted(keep)

    def _promising(self, index: int, reached: CostKey, state: State) -> bool:
        if self.best_key is None:
            return True
        return _add(reached, self._bound(index, state)) < self.best_key

    def _bound(self, index: int, state: State) -> CostKey:
        """Bytes that must still move, summed per existing object after step ``index``.

        A delivered object must become whole on the initiator; one that a later
        global step reads must become whole on *some* node.  Every transfer moves
        rows of exactly one object, so per-object minima add up to a lower bound.
        """
        problem = self.problem
        delivered = problem.workflow.deliver
        gathered = problem.gathered_after(index)
        nbytes = 0
        for name, holding in state.holdings.items():
            rows = holding.obj.rows
            if name in delivered:
                nbytes += holding.missing_bytes(problem.initiator, 0, rows)
            elif name in gathered:
                nbytes += min(holding.missing_bytes(node, 0, rows) for node in problem.nodes)
        return problem.cost.key(nbytes, 0.0)


def _add(a: CostKey, b: CostKey) -> CostKey:
    return (a[0] + b[0], a[1] + b[1])
