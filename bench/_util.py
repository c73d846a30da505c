"""Small helpers shared by the benchmarks."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]
