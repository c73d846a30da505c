"""Benchmark: bytes moved by the whole-workflow planner vs greedy vs pull-everything.

Generates random workflows over random placements (seeded, so runs compare),
plans each with ``optimal_plan``, ``greedy_plan`` (each step cheapest on its
own) and ``pull_all_plan`` (pull every input to the initiator), and prints,
per (steps, nodes) size: the total bytes of each, the ratios
optimal/greedy and optimal/pull-all (lower is better; 1.0 = no gain), how
often optimal was strictly better, and the planner's time (p50, max) against
the one-second budget (how many plans were proven optimal within it).  A second
table plans the same workflows under ``objective="time"``.

Run: ``python bench/decide.py [--per-size 40] [--seed 0]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from _util import percentile

from hpcflow.decide import (
    CostModel,
    Dataset,
    Part,
    Placement,
    Step,
    Workflow,
    greedy_plan,
    optimal_plan,
    pull_all_plan,
)

COLS = 12
ROW_BYTES = COLS * 8
SIZES = [(4, 4), (8, 8), (12, 12)]


def generate(rng: random.Random, steps: int, nodes: int) -> tuple[Workflow, Placement]:
    names = [f"n{i}" for i in range(1, nodes + 1)]
    # Every dataset shares one row split so any two can be added; parts live on 1-2 nodes.
    split = [rng.choice([10_000, 50_000, 200_000]) for _ in range(rng.randint(1, 4))]
    datasets = {}
    for d in range(rng.randint(2, 4)):
        parts = tuple(Part(r, r * ROW_BYTES, tuple(rng.sample(names[1:] or names,
                                                              rng.randint(1, 2))))
                      for r in split)
        datasets[f"D{d}"] = Dataset(f"D{d}", (COLS,), np.dtype("float64"), parts)
    tables = dict.fromkeys(datasets, "real")  # name -> "real" | "complex" (after fft)
    flow: list[Step] = []
    for i in range(steps):
        src = rng.choice(sorted(tables))
        out = f"S{i}"
        op = rng.choice(["scale", "fft", "add", "add", "colsum", "median", "gram", "sort_rows"])
        if op == "add":
            same = sorted(n for n, k in tables.items() if k == tables[src])
            flow.append(Step(out, "add", (src, rng.choice(same))))
        elif op == "scale":
            flow.append(Step(out, "scale", (src,), {"factor": 2.0}))
        else:
            flow.append(Step(out, op, (src,)))
        if op in ("add", "scale", "fft", "sort_rows"):
            tables[out] = "complex" if op == "fft" or tables[src] == "complex" else "real"
    read = {name for step in flow for name in step.inputs}
    deliver = tuple(step.out for step in flow if step.out not in read)
    return Workflow(tuple(flow), "n1", deliver), Placement(datasets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-size", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    cases = {size: [generate(rng, *size) for _ in range(a.per_size)] for size in SIZES}
    print(f"{'steps x nodes':>13} {'workflows':>9} {'optimal/greedy':>15} "
          f"{'optimal/pull-all':>17} {'better than greedy':>19} {'plan p50':>9} {'plan max':>9} "
          f"{'proven':>7}")
    for (steps, nodes), workflows in cases.items():
        tot = {"optimal": 0, "greedy": 0, "pull_all": 0}
        times: list[float] = []
        better = proven = 0
        for wf, placement in workflows:
            t0 = time.perf_counter()
            opt = optimal_plan(wf, placement)
            times.append(time.perf_counter() - t0)
            proven += opt.method == "optimal"
            greedy = greedy_plan(wf, placement)
            pull = pull_all_plan(wf, placement)
            assert opt.bytes_moved <= min(greedy.bytes_moved, pull.bytes_moved)
            tot["optimal"] += opt.bytes_moved
            tot["greedy"] += greedy.bytes_moved
            tot["pull_all"] += pull.bytes_moved
            better += opt.bytes_moved < greedy.bytes_moved
        print(f"{steps:>6} x {nodes:<4} {len(workflows):>9} "
              f"{tot['optimal'] / tot['greedy']:>15.3f} {tot['optimal'] / tot['pull_all']:>17.3f} "
              f"{better:>12}/{len(workflows):<6} {percentile(times, 50) * 1e3:>7.1f}ms "
              f"{max(times) * 1e3:>7.1f}ms {proven:>4}/{len(workflows)}")
    print("ratios are total bytes moved over all workflows of that size; lower is better")
    print()
    print('objective="time" (same workflows; seconds estimated by the cost model)')
    print(f"{'steps x nodes':>13} {'optimal/greedy':>15} {'optimal/pull-all':>17} "
          f"{'plan p50':>9} {'plan max':>9} {'proven':>7}")
    cost = CostModel(objective="time")
    for (steps, nodes), workflows in cases.items():
        secs = {"optimal": 0.0, "greedy": 0.0, "pull_all": 0.0}
        times = []
        proven = 0
        for wf, placement in workflows:
            t0 = time.perf_counter()
            opt = optimal_plan(wf, placement, cost=cost)
            times.append(time.perf_counter() - t0)
            proven += opt.method == "optimal"
            secs["optimal"] += opt.seconds
            secs["greedy"] += greedy_plan(wf, placement, cost=cost).seconds
            secs["pull_all"] += pull_all_plan(wf, placement, cost=cost).seconds
        print(f"{steps:>6} x {nodes:<4} {secs['optimal'] / secs['greedy']:>15.3f} "
              f"{secs['optimal'] / secs['pull_all']:>17.3f} "
              f"{percentile(times, 50) * 1e3:>7.1f}ms {max(times) * 1e3:>7.1f}ms "
              f"{proven:>4}/{len(workflows)}")
    print("proven = plans proven optimal within the 1 s budget (the rest: best found within it)")


if __name__ == "__main__":
    main()
