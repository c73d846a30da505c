"""Benchmark: every shipped scenario on emulated hosts, hpcflow vs the baselines.

Runs ``hpcflow replay --netns`` on each scenario (one network namespace per
node, orchestrator and NFS server; veth links shaped with tbf per the
scenario's ``[links]``; needs root) and prints, per scenario:

* bytes(decentralised) / bytes(centralised), / bytes(nfs), and / the minimum
  possible under the planner's cost model, found by exhaustive search over
  the whole plan space (no pruning, no symmetry; for the largest scenarios
  the search is capped and the exact branch-and-bound optimum is used);
* the same three ratios for wall time; the reference for the minimum is the
  cost model's estimate for the fastest plan (objective "time"), so a ratio
  above 1 is hpcflow's real overhead beyond pure link time.

Writes ``bench/results/scenarios-{netns,loopback}.{json,png}``.
Run: ``python bench/scenarios.py [--loopback] [SCENARIO ...]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hpcflow.decide import CostModel, Dataset, Link, Part, Placement, Step, Workflow
from hpcflow.decide.problem import Problem
from hpcflow.decide.search import optimal_plan
from hpcflow.decide.state import State
from hpcflow.decide.strategies import deliver, outcomes
from hpcflow.harness import report
from hpcflow.harness.replay import replay
from hpcflow.harness.scenario import Scenario, list_scenarios

ROOT = Path(__file__).resolve().parents[1]
CAP = 300_000  # leaves visited before the exhaustive search gives up


def planner_inputs(sc: Scenario, objective: str) -> tuple[Workflow, Placement, CostModel]:
    datasets = {
        name: Dataset(name, tuple(ds.shape[1:]), np.dtype(ds.dtype), tuple(
            Part(p.rows, p.rows * ds.nbytes // max(ds.shape[0], 1), (p.node,))
            for p in ds.parts))
        for name, ds in sc.datasets.items()}
    steps = tuple(Step(s.out, s.op, tuple(s.inputs), dict(s.params)) for s in sc.steps)
    links = {}
    for a in sc.nodes:
        for b in sc.nodes:
            if a < b:
                links[(a, b)] = Link(sc.links.gbit(a, b) * 1e9 / 8, 1e-4)
    cost = CostModel(objective=objective,  # type: ignore[arg-type]
                     default_link=Link(sc.links.default_gbit * 1e9 / 8, 1e-4), links=links)
    return Workflow(steps, sc.initiator, (sc.result,)), Placement(datasets), cost


def exhaustive(sc: Scenario, objective: str) -> tuple[float, float, str]:
    """Minimum (bytes, seconds) over the whole plan space; 'exhaustive' or 'b&b'."""
    wf, placement, cost = planner_inputs(sc, objective)
    problem = Problem(wf, placement, cost=cost, nodes=sc.nodes)
    best: list[tuple[float, float]] = []
    leaves = [0]

    class Capped(Exception):
        pass

    def visit(i: int, state: State, nbytes: float, secs: float) -> None:
        if i == len(problem.steps):
            leaves[0] += 1
            if leaves[0] > CAP:
                raise Capped
            ts, s = deliver(problem, state)
            total = (nbytes + sum(t.nbytes for t in ts), secs + s)
            if not best or cost.key(*total) < cost.key(*best[0]):
                best[:] = [total]
            return
        for o in outcomes(problem, i, state, exhaustive=True):
            visit(i + 1, o.state, nbytes + o.nbytes, secs + o.seconds)

    try:
        visit(0, problem.initial_state(), 0.0, 0.0)
        return best[0][0], best[0][1], "exhaustive"
    except Capped:
        plan = optimal_plan(wf, placement, cost=cost)
        return float(plan.bytes_moved), plan.seconds, "b&b"


def ratio(x: float, y: float) -> str:
    return f"{x / y:.3f}" if y else ("1.000" if x == 0 else "inf")


def vs(r: dict[str, Any], name: str, attr: str) -> str:
    """hpcflow's value over another approach's, or why there is none."""
    other, dec = r.get(name), r["decentralised"]
    if other is None or other.skipped:
        return "skipped"
    if not (other.ran and dec.ran):
        return "failed"
    return ratio(getattr(dec, attr), getattr(other, attr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--loopback", action="store_true", help="no network namespaces")
    a = ap.parse_args()
    paths = [Path(p) for p in a.scenarios] or list_scenarios(ROOT / "scenarios")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, docs, by_scenario = [], [], {}
    for path in paths:
        sc, results = replay(path, netns=not a.loopback,
                             progress=lambda m: print(m, file=sys.stderr, flush=True))
        r = {x.approach: x for x in results}
        min_bytes, _, how = exhaustive(sc, "bytes")
        _, min_secs, how_t = exhaustive(sc, "time")
        dec = r["decentralised"]
        rows.append([sc.name, vs(r, "centralised", "bytes_moved"), vs(r, "nfs", "bytes_moved"),
                     (ratio(dec.bytes_moved, min_bytes) + ("" if how == "exhaustive" else "*"))
                     if dec.ran else "failed",
                     vs(r, "centralised", "wall_s"), vs(r, "nfs", "wall_s"),
                     (ratio(dec.wall_s, min_secs) + ("" if how_t == "exhaustive" else "*"))
                     if dec.ran else "failed"])
        for x in results:
            if x.failed:
                print(f"{sc.name}: {x.approach} FAILED: {x.failed}", file=sys.stderr)
        docs.append({**report.to_json(sc, results), "min_bytes": min_bytes,
                     "min_seconds_estimate": min_secs, "min_search": how})
        by_scenario[sc.name] = results
    head = ["scenario", "B dec/cen", "B dec/nfs", "B dec/min", "T dec/cen", "T dec/nfs",
            "T dec/min"]
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print("B = bytes moved, T = wall time; < 1 means hpcflow is better; min = the cost "
          "model's optimum by exhaustive search (* = search capped, exact b&b optimum used)")
    mode = "loopback" if a.loopback else "netns"
    (out_dir / f"scenarios-{mode}.json").write_text(json.dumps(docs, indent=2))
    report.plot(by_scenario, out_dir / f"scenarios-{mode}.png")
    print(f"wrote bench/results/scenarios-{mode}.json and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
