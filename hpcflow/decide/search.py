"""Exact whole-workflow planning: depth-first branch and bound with state memoisation.

The plan space is every sequence of per-step decisions (:mod:`strategies`).
Exactness rests on three facts, argued in ``docs/cost-model.md``:

1. costs are additive over steps and each step's cost depends only on the
   state (who holds which rows of the objects still needed), so two partial
   plans reaching the same state after step k can keep only the cheaper
   (memo table keyed by ``(k, state)``);
2. the bound (:mod:`bound`: bytes that objects existing now must still move
   for delivery, global steps and the co-location of later steps' inputs,
   and the least seconds those transfers, queueing and compute still take)
   never overestimates either component, hence neither the lexicographic
   key of either objective, so pruning on ``cost so far + bound >= best``
   never drops a better plan;
3. the per-step node candidates lose nothing up to relabelling of
   interchangeable empty nodes (:meth:`Problem.candidates`).

The incumbent starts as the better of the greedy and pull-all plans, so the
search only ever has to prove or improve on them; children are explored in
order of cost so far plus bound, so a better incumbent tends to come early.

The search is exponential in the worst case, so it has a time budget
(:data:`DEFAULT_BUDGET_S`, one second): when it runs out, the best plan found
so far is returned with ``method`` set to :data:`BEST_WITHIN_BUDGET` instead
of ``"optimal"``.
"""

from __future__ import annotations

import time

from hpcflow.decide.assemble import assemble, decisions_cost
from hpcflow.decide.baselines import baseline_decisions
from hpcflow.decide.bound import LowerBound
from hpcflow.decide.cost import CostKey, CostModel
from hpcflow.decide.model import NodeOps, Placement, Workflow
from hpcflow.decide.plan import Plan
from hpcflow.decide.problem import Problem
from hpcflow.decide.state import Holding, State
from hpcflow.decide.strategies import Decision, deliver, outcomes
from hpcflow.ops import ModelCache, OpRegistry

#: ``Plan.method`` of a plan returned because the time budget ran out.
BEST_WITHIN_BUDGET = "best_within_budget"
#: Default search budget (seconds): the issue's "within a second".  Random
#: 12-step, 12-node workflows are proven optimal well within it under the bytes
#: objective; under ``objective="time"`` (a weaker bound) some are not, and
#: the plan says so (see ``docs/cost-model.md``, "Time budget").
DEFAULT_BUDGET_S = 1.0


def optimal_plan(
    workflow: Workflow,
    placement: Placement,
    *,
    registry: OpRegistry | None = None,
    node_ops: NodeOps | None = None,
    cost: CostModel | None = None,
    time_budget: float | None = DEFAULT_BUDGET_S,
    models: ModelCache | None = None,
) -> Plan:
    """The cheapest plan under ``cost`` (fewest bytes by default), found exactly.

    ``time_budget`` (seconds of search, None = unlimited) caps the search:
    once spent, the best plan found so far (never worse than the greedy and
    pull-all plans) is returned with ``method`` set to
    :data:`BEST_WITHIN_BUDGET` rather than ``"optimal"``.  Within the budget
    the result is the same as without it.  Op output inference (which runs op
    code on samples) happens before the search, once per op, parameters and
    input shapes for the whole run (or across runs, with a long-lived ``models``).
    """
    models = models if models is not None else ModelCache()
    problem = Problem(
        workflow, placement, registry=registry, node_ops=node_ops, cost=cost, models=models
    )
    deadline = None if time_budget is None else time.monotonic() + time_budget
    decided: dict[int, Decision] = {}
    proven = True
    for indices in components(workflow):
        sub = Problem(
            Workflow(
                tuple(workflow.steps[i] for i in indices),
                workflow.initiator,
                tuple(name for name in workflow.deliver if name in _names(workflow, indices)),
                stay=workflow.stay,
            ),
            placement,
            registry=registry,
            node_ops=node_ops,
            cost=cost,
            nodes=problem.nodes,
            models=models,
        )
        found, exact = search(sub, deadline)
        decided.update(zip(indices, found, strict=True))
        proven = proven and exact
    method = "optimal" if proven else BEST_WITHIN_BUDGET
    return assemble(problem, [decided[i] for i in range(len(workflow.steps))], method=method)


def search(problem: Problem, deadline: float | None = None) -> tuple[list[Decision], bool]:
    """Decisions of a minimum-cost plan for ``problem``, and whether it is proven minimal.

    Past ``deadline`` (a :func:`time.monotonic` value) the search stops and
    returns the best decisions found so far, not proven.
    """
    bnb = _BranchAndBound(problem, deadline)
    found = bnb.run()
    return found, not bnb.timed_out


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


class _OutOfTime(Exception):
    """Raised inside the search when the time budget is spent."""


class _BranchAndBound:
    def __init__(self, problem: Problem, deadline: float | None = None) -> None:
        self.problem = problem
        self.deadline = deadline
        self.timed_out = False
        self.best_key: CostKey | None = None
        self.best: list[Decision] = []
        for decided in baseline_decisions(problem):
            key = decisions_cost(problem, decided)
            if self.best_key is None or key < self.best_key:
                self.best_key, self.best = key, decided
        self.bound = LowerBound(problem)
        self.memo: dict[tuple[int, tuple[object, ...]], CostKey] = {}
        self.settled: dict[tuple[Holding, ...], CostKey] = {}
        self.path: list[Decision] = []

    def run(self) -> list[Decision]:
        settled, state = self._settle(-1, self.problem.initial_state())
        try:
            self._visit(0, state, settled)
        except _OutOfTime:
            self.timed_out = True
        return self.best

    def _visit(self, index: int, state: State, spent: CostKey) -> None:
        problem = self.problem
        if index == len(problem.steps):
            # every result was settled after the last step reading it
            if self.best_key is None or spent < self.best_key:
                self.best_key, self.best = spent, list(self.path)
            return
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _OutOfTime
        cost = problem.cost
        children = []
        for outcome in outcomes(problem, index, state):
            settled, after = self._settle(index, outcome.state)
            reached = _add(_add(spent, outcome.key), settled)
            estimate = _add(reached, cost.key(*self.bound(index, after)))
            children.append((estimate, reached, after, outcome.decision))
        # most promising first, so a good incumbent is found early; the sort is
        # stable, so ties keep the decision order (initiator first, then by name)
        children.sort(key=lambda child: child[0])
        for estimate, reached, after, decision in children:
            if self.best_key is not None and estimate >= self.best_key:
                break  # sorted: every later child is pruned too
            memo_key = (index, after.key)
            seen = self.memo.get(memo_key)
            if seen is not None and seen <= reached:
                continue
            self.memo[memo_key] = reached
            self.path.append(decision)
            self._visit(index + 1, after, reached)
            self.path.pop()

    def _settle(self, index: int, state: State) -> tuple[CostKey, State]:
        """Deliver results no later step reads now and drop them from the state.

        Their remaining cost is fixed (their holdings cannot change any more),
        so settling early is exact and lets states that differ only in where
        finished results sit share one memo entry.  The cost depends only on
        the finished results' holdings, so it is cached by them.
        """
        problem = self.problem
        read = problem.read_after(index)
        done = [n for n in problem.workflow.deliver if n in state.holdings and n not in read]
        if not done:
            return (0.0, 0.0), state
        key = tuple(state.holdings[n] for n in done)
        cost = self.settled.get(key)
        if cost is None:
            transfers, seconds = deliver(problem, state, done)
            cost = self.settled[key] = problem.cost.key(sum(t.nbytes for t in transfers), seconds)
        return cost, State({name: h for name, h in state.holdings.items() if name not in done})


def _add(a: CostKey, b: CostKey) -> CostKey:
    return (a[0] + b[0], a[1] + b[1])
