"""The plan cache's rules (pure logic: plans from the real planner, keys as tuples)."""

from __future__ import annotations

import gevent
import numpy as np

from hpcflow.daemon.plancache import PlanCache
from hpcflow.decide import Dataset, Part, Placement, Plan, Step, Workflow, optimal_plan


def _plan(out: str) -> tuple[list[Step], Plan]:
    steps = [Step(out, "colsum", ["D"])]
    ds = Dataset("D", (4,), np.dtype("float64"), (Part(100, 3200, ("n2",)),))
    return steps, optimal_plan(Workflow(tuple(steps), "n1", (out,)), Placement({"D": ds}))


def _key(objective: str, costs: str) -> tuple[object, ...]:
    # plan_key's layout: (steps, deliver, objective, method, initiator, ..., cost fingerprint)
    return ("colsum(D)", (0,), objective, "optimal", "n1", "placement", "ops", costs)


def _cached(objective: str, **kw: float) -> tuple[PlanCache, Plan]:
    """A cache holding the plan of ``wf.1.colsum`` made under ``costs-1``."""
    cache = PlanCache(**kw)
    steps1, plan1 = _plan("wf.1.colsum")
    cache.put(_key(objective, "costs-1"), steps1, plan1)
    return cache, plan1


def test_under_the_bytes_objective_moved_costs_serve_the_last_plan_and_replan_behind() -> None:
    cache, plan1 = _cached("bytes")
    steps2, plan2 = _plan("wf.2.colsum")
    searched: list[str] = []

    def search() -> Plan:
        searched.append("costs-2")
        gevent.sleep(0.01)  # a search takes a while; the request must not wait for it
        return plan2

    got = cache.get_or_make(_key("bytes", "costs-2"), steps2, search)
    assert got.steps[0].out == "wf.2.colsum"  # the old plan, renamed for this request
    assert got.bytes_moved == plan1.bytes_moved
    assert cache.stale == 1 and searched == []  # served before any search ran
    gevent.sleep(0.05)  # the background search under the new costs
    assert searched == ["costs-2"]
    hits = cache.hits
    steps3, _ = _plan("wf.3.colsum")
    again = cache.get_or_make(_key("bytes", "costs-2"), steps3, lambda: plan2)
    assert cache.hits == hits + 1 and again.steps[0].out == "wf.3.colsum"


def test_under_the_time_objective_moved_costs_wait_for_a_new_plan() -> None:
    cache, _ = _cached("time")
    steps2, plan2 = _plan("wf.2.colsum")
    assert cache.get_or_make(_key("time", "costs-2"), steps2, lambda: plan2) is plan2
    assert cache.misses == 1 and cache.stale == 0


def test_other_data_or_steps_are_never_served_an_old_plan() -> None:
    cache, _ = _cached("bytes")
    steps2, plan2 = _plan("wf.2.colsum")
    moved = list(_key("bytes", "costs-1"))
    moved[5] = "other placement"
    assert cache.get_or_make(tuple(moved), steps2, lambda: plan2) is plan2
    assert cache.stale == 0


def test_background_replans_are_rate_limited() -> None:
    """Learned costs wobble under load; each search takes CPU from running executions."""
    cache, _ = _cached("bytes", refresh_every_s=3600)
    searched: list[str] = []

    def search(costs: str, out: str) -> Plan:
        searched.append(costs)
        return _plan(out)[1]

    for i, costs in enumerate(("costs-2", "costs-3", "costs-4")):
        out = f"wf.{i + 2}.colsum"
        steps, _ = _plan(out)
        got = cache.get_or_make(_key("bytes", costs), steps,
                                lambda c=costs, o=out: search(c, o))  # type: ignore[misc]
        assert got.steps[0].out == out
        gevent.sleep(0.01)
    assert searched == ["costs-2"] and cache.stale == 3
