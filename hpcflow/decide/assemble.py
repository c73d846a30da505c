"""Turn a decision sequence into a :class:`Plan` with per-step reasons.

Replaying the decisions through :func:`strategies.evaluate` guarantees the
reported transfers and costs are exactly what the search optimised.
"""

from __future__ import annotations

from collections.abc import Sequence

from hpcflow.decide.cost import CostKey
from hpcflow.decide.plan import Plan, StepPlan, Strategy, format_bytes, format_seconds
from hpcflow.decide.problem import Problem, StepInfo
from hpcflow.decide.state import State
from hpcflow.decide.strategies import (
    At,
    Decision,
    Outcome,
    Split,
    SplitReduce,
    deliver,
    evaluate,
    outcomes,
)


def replay(problem: Problem, decided: Sequence[Decision]) -> tuple[list[Outcome], State]:
    """Apply ``decided`` step by step; raises ValueError if one is infeasible."""
    state = problem.initial_state()
    done = []
    for index, decision in enumerate(decided):
        outcome = evaluate(problem, index, state, decision)
        if outcome is None:
            raise ValueError(f"decision {decision} is infeasible for step {index}")
        done.append(outcome)
        state = outcome.state
    return done, state


def decisions_cost(problem: Problem, decided: Sequence[Decision]) -> CostKey:
    """Total cost key of a complete decision sequence, delivery included."""
    done, state = replay(problem, decided)
    transfers, seconds = deliver(problem, state)
    nbytes = sum(o.nbytes for o in done) + sum(t.nbytes for t in transfers)
    return problem.cost.key(nbytes, sum(o.seconds for o in done) + seconds)


def assemble(problem: Problem, decided: Sequence[Decision], *, method: str) -> Plan:
    state = problem.initial_state()
    steps = []
    for info, decision in zip(problem.steps, decided, strict=True):
        outcome = evaluate(problem, info.index, state, decision)
        if outcome is None:
            raise ValueError(f"decision {decision} is infeasible for step {info.step.out!r}")
        steps.append(_step_plan(problem, info, state, outcome))
        state = outcome.state
    delivery, seconds = deliver(problem, state)
    return Plan(
        method=method,
        objective=problem.cost.objective,
        initiator=problem.initiator,
        steps=tuple(steps),
        delivery=delivery,
        delivery_seconds=seconds,
    )


def _step_plan(problem: Problem, info: StepInfo, before: State, outcome: Outcome) -> StepPlan:
    decision = outcome.decision
    strategy: Strategy = "split"
    if isinstance(decision, At):
        if decision.node != problem.initiator:
            strategy = "delegate"
        else:
            strategy = "fetch" if outcome.transfers else "local"
    combiner = decision.combiner if isinstance(decision, SplitReduce) else None
    return StepPlan(
        out=info.step.out,
        op=info.step.op,
        strategy=strategy,
        nodes=outcome.nodes,
        combiner=combiner,
        transfers=outcome.transfers,
        nbytes=outcome.nbytes,
        seconds=outcome.seconds,
        reason=_reason(problem, info, before, outcome, strategy),
        work=outcome.work,
        broadcast=info.broadcast_inputs,
        dtype=info.model.dtype.str,
    )


def _reason(
    problem: Problem, info: StepInfo, before: State, outcome: Outcome, strategy: Strategy
) -> str:
    decision = outcome.decision
    moved = format_bytes(outcome.nbytes)
    if isinstance(decision, At):
        total = sum(before.holdings[name].obj.nbytes for name in dict.fromkeys(info.step.inputs))
        share = 100.0 * (1 - outcome.nbytes / total) if total else 100.0
        text = {
            "local": "inputs already on the initiator",
            "fetch": f"fetch {moved} of inputs to the initiator",
            "delegate": f"run on {decision.node}, which holds {share:.0f}% of the input bytes",
        }[strategy]
    elif isinstance(decision, Split):
        text = f"each of {len(outcome.nodes)} part(s) runs where it lies"
        if len(info.row_inputs) > 1:
            text += f" (split like {info.row_inputs[decision.basis]})"
        if outcome.nbytes:
            text += f"; {moved} of aligned rows moved"
        if info.broadcast_inputs:
            text += f"; {', '.join(info.broadcast_inputs)} sent whole to every part"
    else:
        partials = sum(t.nbytes for t in outcome.transfers if t.kind == "partial")
        text = f"partials ({format_bytes(partials)}) combined on {decision.combiner}"
        if outcome.nbytes > partials:
            text += f"; {format_bytes(outcome.nbytes - partials)} sent raw (no bigger)"
    return text + _comparison(problem, info, before, outcome)


def _comparison(problem: Problem, info: StepInfo, before: State, outcome: Outcome) -> str:
    """Why not the step's cheapest local option, or why not fetch to the initiator.

    Differences below a microsecond (with equal bytes) are ties, not reasons.
    """
    options = outcomes(problem, info.index, before)
    cheapest = min(options, key=lambda o: o.key)
    delta = _delta(problem, outcome, cheapest)
    if cheapest.key < outcome.key and delta:
        return (
            f"; {delta} dearer than the best choice for this step"
            " alone, repaid by later steps or delivery"
        )
    fetch = evaluate(problem, info.index, before, At(problem.initiator))
    if fetch is not None and fetch.decision != outcome.decision and fetch.key > outcome.key:
        delta = _delta(problem, fetch, outcome)
        if delta:
            return f"; fetching to {problem.initiator} instead: {delta} more"
    # Under the time objective a step may move more bytes than it must (a tiny input is
    # fetched rather than paying a call and a step on its holder): say what that saves.
    leanest = min(options, key=lambda o: (o.nbytes, o.key))
    if leanest.nbytes < outcome.nbytes and leanest.key > outcome.key:
        delta = _delta(problem, leanest, outcome)
        if delta:
            return (
                f"; {_describe(problem, leanest.decision)} instead would move "
                f"{format_bytes(outcome.nbytes - leanest.nbytes)} less but take {delta} more"
            )
    return ""


def _describe(problem: Problem, decision: Decision) -> str:
    if isinstance(decision, At):
        if decision.node == problem.initiator:
            return f"running on {decision.node}"
        return f"delegating to {decision.node}"
    if isinstance(decision, SplitReduce):
        return f"combining partials on {decision.combiner}"
    return "running each part where it lies"


#: Estimated time differences below this are reported as ties.
_TIE_S = 1e-6


def _delta(problem: Problem, worse: Outcome, better: Outcome) -> str:
    """How much dearer ``worse`` is, in the objective's unit ('' for a negligible tie)."""
    if problem.cost.objective == "time" or worse.nbytes == better.nbytes:
        seconds = worse.seconds - better.seconds
        return format_seconds(seconds) if seconds >= _TIE_S else ""
    return format_bytes(worse.nbytes - better.nbytes)
