"""Counters of what happens on a node, kept where it happens and read at scrape time.

Plain integers and floats, no dependency: the metrics endpoint
(:mod:`hpcflow.daemon.metrics`) turns them into Prometheus families when scraped,
so a node without ``--metrics`` pays one dictionary update per op or plan.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

#: Upper bounds (s) of the duration histograms' buckets (+Inf is implied).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0)
#: Distinct op names counted apart; more are added up under this one (names of ops
#: that exist in the registry only, but a node may load many).
MAX_OPS = 512
OTHER_OP = "(other)"


@dataclass
class Histogram:
    """Counts of observations per bucket (not cumulative) and their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count)]`` as Prometheus wants them, +Inf last."""
        out, acc = [], 0
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self.counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out


@dataclass
class Events:
    """What a node's worker did: ops run and failed (by op), plans made, step phases
    timed, pulls in flight."""

    ops_run: Counter[str] = field(default_factory=Counter)
    ops_failed: Counter[str] = field(default_factory=Counter)
    op_seconds: Histogram = field(default_factory=Histogram)
    planning: Histogram = field(default_factory=Histogram)
    #: Seconds of each share step on this node by phase: transfer, compute, wait.
    steps: dict[str, Histogram] = field(default_factory=dict)
    pulls_in_flight: int = 0
    #: Units run block by block, their blocks, and the blocks computed while the
    #: unit's pulls were still landing (transfer and compute overlapping).
    streamed: Counter[str] = field(default_factory=Counter)

    def _op(self, op: str, counter: Counter[str]) -> str:
        return op if op in counter or len(counter) < MAX_OPS else OTHER_OP

    def op_ran(self, op: str, seconds: float) -> None:
        self.ops_run[self._op(op, self.ops_run)] += 1
        self.op_seconds.observe(seconds)

    def op_failed(self, op: str) -> None:
        self.ops_failed[self._op(op, self.ops_failed)] += 1

    def planned(self, seconds: float) -> None:
        self.planning.observe(seconds)

    def step(self, phase: str, seconds: float) -> None:
        self.steps.setdefault(phase, Histogram()).observe(seconds)

    @contextlib.contextmanager
    def pulling(self) -> Iterator[None]:
        self.pulls_in_flight += 1
        try:
            yield
        finally:
            self.pulls_in_flight -= 1


__all__ = ["BUCKETS", "Events", "Histogram"]
