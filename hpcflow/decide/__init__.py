"""Pure, I/O-free placement planner: where each workflow step runs and what moves.

Inputs are frozen dataclasses (:mod:`.model`, :mod:`.cost`); outputs are
:class:`Plan` objects.  :func:`optimal_plan` is exact; :func:`greedy_plan` and
:func:`pull_all_plan` are baselines.  See ``docs/cost-model.md``.
"""

from hpcflow.decide.baselines import greedy_plan, pull_all_plan
from hpcflow.decide.cost import CostModel, Link, Objective
from hpcflow.decide.errors import PlanningError
from hpcflow.decide.model import Dataset, NodeOps, Part, PartLoc, Placement, Step, Workflow
from hpcflow.decide.plan import Plan, StepPlan, Strategy, Transfer, Work
from hpcflow.decide.problem import Problem
from hpcflow.decide.search import BEST_WITHIN_BUDGET, DEFAULT_BUDGET_S, optimal_plan
from hpcflow.decide.strategies import At, Decision, Split, SplitReduce

__all__ = [
    "BEST_WITHIN_BUDGET",
    "DEFAULT_BUDGET_S",
    "At",
    "CostModel",
    "Dataset",
    "Decision",
    "Link",
    "NodeOps",
    "Objective",
    "Part",
    "PartLoc",
    "Placement",
    "Plan",
    "PlanningError",
    "Problem",
    "Split",
    "SplitReduce",
    "Step",
    "StepPlan",
    "Strategy",
    "Transfer",
    "Work",
    "Workflow",
    "greedy_plan",
    "optimal_plan",
    "pull_all_plan",
]
