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

Each scenario is replayed ``--repeats`` times (default 3); every approach is
reported by its median-time run (one replay's wall time on a shared 2-core
machine varies by more than the differences being measured).

Writes ``bench/results/scenarios-{netns,loopback}.{json,png}``.
Run: ``python bench/scenarios.py [--loopback] [--repeats N] [SCENARIO ...]``
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


def median_run(same_approach: list[Any]) -> Any:
    """The run with the median wall time among one approach's replays (failed runs
    count as slowest, so an approach that failed in most replays is reported failed).
    Bytes are deterministic: a replay that moved different bytes is reported."""
    ran = [x for x in same_approach if x.ran]
    if len({x.bytes_moved for x in ran}) > 1:
        print(f"{same_approach[0].approach}: bytes moved differ between replays: "
              f"{sorted(x.bytes_moved for x in ran)}", file=sys.stderr)
    ordered = sorted(same_approach, key=lambda x: (not x.ran, x.wall_s if x.ran else 0.0))
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--loopback", action="store_true", help="no network namespaces")
    ap.add_argument("--repeats", type=int, default=3,
                    help="replays per scenario; each approach reports its median-time run")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    paths = [Path(p) for p in a.scenarios] or list_scenarios(ROOT / "scenarios")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, docs, by_scenario = [], [], {}
    for path in paths:
        runs = []
        for k in range(a.repeats):
            print(f"== {path.name}: replay {k + 1} of {a.repeats}", file=sys.stderr, flush=True)
            sc, got = replay(path, netns=not a.loopback,
                             progress=lambda m: print(m, file=sys.stderr, flush=True))
            runs.append(got)
        results = [median_run([run[i] for run in runs]) for i in range(len(runs[0]))]
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
    print(f"\nbytes moved / wall time per approach ({mode}, median of {a.repeats}):")
    for name, results in by_scenario.items():
        cells = [f"{x.approach[:3]} {report.human_bytes(x.bytes_moved):>9} "
                 f"{x.wall_s * 1000:5.0f} ms" if x.ran else f"{x.approach[:3]} n/a"
                 for x in results]
        print(f"{name:<19} " + "   ".join(cells))
    (out_dir / f"scenarios-{mode}.json").write_text(json.dumps(docs, indent=2))
    report.plot(by_scenario, out_dir / f"scenarios-{mode}.png")
    print(f"wrote bench/results/scenarios-{mode}.json and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
