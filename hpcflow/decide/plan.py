"""The planner's output: where each step runs, what moves, and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["local", "fetch", "delegate", "split"]


@dataclass(frozen=True)
class Transfer:
    """``nbytes`` of rows ``[lo, hi)`` of ``obj`` (or a partial over them) sent src -> dst."""

    src: str
    dst: str
    obj: str
    rows: tuple[int, int]
    nbytes: int
    kind: Literal["data", "partial"] = "data"

    def describe(self) -> str:
        lo, hi = self.rows
        what = f"{self.obj}[{lo}:{hi}]"
        if self.kind == "partial":
            what = f"partial of {what}"
        return f"{what} {self.src}->{self.dst} {format_bytes(self.nbytes)}"


Mode = Literal["whole", "part", "partial", "combine"]


@dataclass(frozen=True)
class Work:
    """One unit of execution, what an executor sends to ``node``.

    * ``whole``: the op over all rows of every input (``rows`` empty);
    * ``part``: a rowwise op over input rows ``rows[0]``, producing output rows
      ``out_rows`` (one output part per ``part`` unit, in row order);
    * ``partial``: a reduce partial over the input rows in ``rows``;
    * ``combine``: the combiner merging every ``partial`` of the step.
    """

    node: str
    mode: Mode
    rows: tuple[tuple[int, int], ...] = ()
    out_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class StepPlan:
    """How one step runs.

    ``nodes`` are the execution nodes (one per output part for a rowwise
    split, one per partial for a reduce split); ``combiner`` is where a split
    reduce's partials meet.  The output is left on ``nodes`` (or ``combiner``).
    """

    out: str
    op: str
    strategy: Strategy
    nodes: tuple[str, ...]
    combiner: str | None
    transfers: tuple[Transfer, ...]
    nbytes: int
    seconds: float
    reason: str
    work: tuple[Work, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A whole-workflow plan; ``delivery`` moves the results to the initiator last."""

    method: str
    objective: str
    initiator: str
    steps: tuple[StepPlan, ...]
    delivery: tuple[Transfer, ...]
    delivery_seconds: float

    @property
    def transfers(self) -> tuple[Transfer, ...]:
        return (*(t for step in self.steps for t in step.transfers), *self.delivery)

    @property
    def bytes_moved(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    @property
    def seconds(self) -> float:
        """Estimated time: steps run one after another, then the delivery."""
        return sum(step.seconds for step in self.steps) + self.delivery_seconds

    def step(self, out: str) -> StepPlan:
        return next(step for step in self.steps if step.out == out)

    def explain(self) -> str:
        """A text table: one row per step plus delivery and totals."""
        head = ("step", "op", "strategy", "nodes", "moved", "time", "reason")
        rows: list[tuple[str, ...]] = [
            (
                s.out,
                s.op,
                s.strategy,
                _nodes_label(s),
                format_bytes(s.nbytes),
                f"{s.seconds:.3g}s",
                s.reason,
            )
            for s in self.steps
        ]
        moved = sum(t.nbytes for t in self.delivery)
        what = ", ".join(t.describe() for t in self.delivery) or "results already there"
        rows.append(("(deliver)", "", "", self.initiator, format_bytes(moved), "", what))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
            for r in (head, *rows)
        ]
        lines.append(
            f"{self.method} plan ({self.objective} objective): "
            f"{format_bytes(self.bytes_moved)} moved, ~{self.seconds:.3g}s"
        )
        return "\n".join(line.rstrip() for line in lines)


def _nodes_label(step: StepPlan) -> str:
    nodes = ",".join(dict.fromkeys(step.nodes))
    return f"{nodes}->{step.combiner}" if step.combiner else nodes


def format_bytes(nbytes: float) -> str:
    """Binary units like the rest of hpcflow's output, e.g. ``1.5 MiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
