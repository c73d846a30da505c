"""Baseline planners the benchmark compares against the exact search.

* greedy: each step, in order, takes the decision cheapest for that step alone
  given what earlier steps placed (first in candidate order on ties);
* pull-all: fetch every input to the initiator and run every step there.
"""

from __future__ import annotations

from hpcflow.decide.assemble import assemble
from hpcflow.decide.cost import CostModel
from hpcflow.decide.errors import PlanningError
from hpcflow.decide.model import NodeOps, Placement, Workflow
from hpcflow.decide.plan import Plan
from hpcflow.decide.problem import Problem
from hpcflow.decide.strategies import At, Decision, evaluate, outcomes
from hpcflow.ops import ModelCache, OpRegistry


def greedy_plan(
    workflow: Workflow,
    placement: Placement,
    *,
    registry: OpRegistry | None = None,
    node_ops: NodeOps | None = None,
    cost: CostModel | None = None,
    models: ModelCache | None = None,
) -> Plan:
    """Per-step greedy plan (same cost model as :func:`optimal_plan`)."""
    problem = Problem(workflow, placement, registry=registry, node_ops=node_ops, cost=cost,
                      models=models)
    return assemble(problem, greedy_decisions(problem), method="greedy")


def pull_all_plan(
    workflow: Workflow,
    placement: Placement,
    *,
    registry: OpRegistry | None = None,
    node_ops: NodeOps | None = None,
    cost: CostModel | None = None,
    models: ModelCache | None = None,
) -> Plan:
    """Everything fetched to and run on the initiator; PlanningError if it lacks an op."""
    problem = Problem(workflow, placement, registry=registry, node_ops=node_ops, cost=cost,
                      models=models)
    decided = pull_all_decisions(problem)
    if decided is None:
        missing = [i.step.out for i in problem.steps if problem.initiator not in i.capable]
        raise PlanningError(
            f"pull-all: initiator {problem.initiator!r} cannot run step(s) {missing}"
        )
    return assemble(problem, decided, method="pull_all")


def greedy_decisions(problem: Problem) -> list[Decision]:
    state = problem.initial_state()
    decided = []
    for info in problem.steps:
        best = min(outcomes(problem, info.index, state), key=lambda o: o.key)
        decided.append(best.decision)
        state = best.state
    return decided


def pull_all_decisions(problem: Problem) -> list[Decision] | None:
    """At(initiator) for every step, or None if the initiator lacks an op."""
    state = problem.initial_state()
    decided: list[Decision] = []
    for info in problem.steps:
        outcome = evaluate(problem, info.index, state, At(problem.initiator))
        if outcome is None:
            return None
        decided.append(outcome.decision)
        state = outcome.state
    return decided


def baseline_decisions(problem: Problem) -> list[list[Decision]]:
    """The feasible baselines, used as the exact search's first incumbents."""
    pulled = pull_all_decisions(problem)
    return [greedy_decisions(problem), *([pulled] if pulled is not None else [])]
