"""The planner's output: where each step runs, what moves, and why."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

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

    def to_wire(self) -> dict[str, object]:
        return {"src": self.src, "dst": self.dst, "obj": self.obj, "rows": list(self.rows),
                "nbytes": self.nbytes, "kind": self.kind}

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

    ``shape`` is what the unit's output must look like under the op's output
    model (None for partials); the node checks the real output against it.
    """

    node: str
    mode: Mode
    rows: tuple[tuple[int, int], ...] = ()
    out_rows: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None

    def to_wire(self) -> dict[str, object]:
        return {"node": self.node, "mode": self.mode, "rows": [list(r) for r in self.rows],
                "out_rows": None if self.out_rows is None else list(self.out_rows),
                "shape": None if self.shape is None else list(self.shape)}


@dataclass(frozen=True)
class StepPlan:
    """How one step runs.

    ``nodes`` are the execution nodes (one per output part for a rowwise
    split, one per partial for a reduce split); ``combiner`` is where a split
    reduce's partials meet.  The output is left on ``nodes`` (or ``combiner``).
    ``broadcast`` names the inputs every ``part`` unit reads whole (broadcast
    operands of a rowwise op); ``dtype`` is the output's.
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
    broadcast: tuple[str, ...] = ()
    dtype: str = ""

    def to_wire(self) -> dict[str, object]:
        return {"out": self.out, "op": self.op, "strategy": self.strategy,
                "nodes": list(self.nodes), "combiner": self.combiner,
                "transfers": [t.to_wire() for t in self.transfers], "nbytes": self.nbytes,
                "seconds": self.seconds, "reason": self.reason,
                "work": [w.to_wire() for w in self.work], "broadcast": list(self.broadcast),
                "dtype": self.dtype}


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

    def to_wire(self, explain: bool = True) -> dict[str, object]:
        """The plan as plain data (what ``plan``/``execute`` answer), with its totals and
        (``explain``) the explain table; :meth:`from_wire` reads it back."""
        wire: dict[str, object] = {
            "method": self.method, "objective": self.objective,
            "initiator": self.initiator, "steps": [s.to_wire() for s in self.steps],
            "delivery": [t.to_wire() for t in self.delivery],
            "delivery_seconds": self.delivery_seconds, "bytes_moved": self.bytes_moved,
            "seconds": self.seconds}
        if explain:
            wire["explain"] = self.explain()
        return wire

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Plan:
        """The plan :meth:`to_wire` described (KeyError, TypeError or ValueError if the
        data is not one)."""
        def transfer(t: Mapping[str, Any]) -> Transfer:
            lo, hi = t["rows"]
            return Transfer(str(t["src"]), str(t["dst"]), str(t["obj"]), (int(lo), int(hi)),
                            int(t["nbytes"]), t.get("kind", "data"))

        def work(w: Mapping[str, Any]) -> Work:
            out = w.get("out_rows")
            shape = w.get("shape")
            return Work(str(w["node"]), w["mode"], tuple((int(a), int(b)) for a, b in w["rows"]),
                        None if out is None else (int(out[0]), int(out[1])),
                        None if shape is None else tuple(int(x) for x in shape))

        steps = tuple(StepPlan(
            out=str(s["out"]), op=str(s["op"]), strategy=s["strategy"],
            nodes=tuple(str(n) for n in s["nodes"]), combiner=s.get("combiner"),
            transfers=tuple(transfer(t) for t in s["transfers"]), nbytes=int(s["nbytes"]),
            seconds=float(s["seconds"]), reason=str(s["reason"]),
            work=tuple(work(w) for w in s.get("work", ())),
            broadcast=tuple(str(b) for b in s.get("broadcast", ())),
            dtype=str(s.get("dtype", ""))) for s in d["steps"])
        return cls(method=str(d["method"]), objective=str(d["objective"]),
                   initiator=str(d["initiator"]), steps=steps,
                   delivery=tuple(transfer(t) for t in d["delivery"]),
                   delivery_seconds=float(d["delivery_seconds"]))

    def summary(self) -> str:
        """The last line of :meth:`explain`: method, objective, bytes and time."""
        label = f"{self.method} plan"
        if self.method == "best_within_budget":
            label = "best plan found within the search budget (not proven optimal)"
        return (f"{label} ({self.objective} objective): "
                f"{format_bytes(self.bytes_moved)} moved, ~{format_seconds(self.seconds)} "
                "estimated")

    def renamed(self, names: Mapping[str, str]) -> Plan:
        """The same plan with objects renamed (``old -> new``), in the reasons too: a
        plan made for one request serves another that differs only in output names."""
        names = {k: v for k, v in names.items() if k != v}
        if not names:
            return self
        alternatives = "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.:-])(?:{alternatives})(?![\w.:-])")

        def text(s: str) -> str:
            return pattern.sub(lambda m: names[m.group(0)], s)

        def moved(t: Transfer) -> Transfer:
            return replace(t, obj=names.get(t.obj, t.obj))

        steps = tuple(replace(
            sp, out=names.get(sp.out, sp.out), transfers=tuple(moved(t) for t in sp.transfers),
            broadcast=tuple(names.get(b, b) for b in sp.broadcast), reason=text(sp.reason))
            for sp in self.steps)
        return replace(self, steps=steps, delivery=tuple(moved(t) for t in self.delivery))

    def explain(self) -> str:
        """A text table: one row per step plus delivery, with the bytes each moves and
        its estimated seconds (calls, step overheads, transfers, queueing and compute),
        and a last line with both totals."""
        head = ("step", "op", "strategy", "nodes", "moved", "est. time", "reason")
        rows: list[tuple[str, ...]] = [
            (
                s.out,
                s.op,
                s.strategy,
                _nodes_label(s),
                format_bytes(s.nbytes),
                format_seconds(s.seconds),
                s.reason,
            )
            for s in self.steps
        ]
        moved = sum(t.nbytes for t in self.delivery)
        what = ", ".join(t.describe() for t in self.delivery) or "results already there"
        seconds = format_seconds(self.delivery_seconds) if self.delivery else ""
        rows.append(("(deliver)", "", "", self.initiator, format_bytes(moved), seconds, what))
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head) - 1)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
            for r in (head, *rows)
        ]
        lines.append(self.summary())
        return "\n".join(line.rstrip() for line in lines)


def _nodes_label(step: StepPlan) -> str:
    nodes = ",".join(dict.fromkeys(step.nodes))
    return f"{nodes}->{step.combiner}" if step.combiner else nodes


def format_seconds(seconds: float) -> str:
    """Estimated durations at a sensible precision: ``1.23 s``, ``45.6 ms``, ``780 µs``,
    ``<1 µs`` (the model's estimates mean nothing below a microsecond)."""
    value = abs(seconds)
    sign = "-" if seconds < 0 else ""
    if value >= 1:
        return f"{sign}{value:.3g} s"
    if value >= 1e-3:
        return f"{sign}{value * 1e3:.3g} ms"
    if value >= 1e-6:
        return f"{sign}{value * 1e6:.3g} µs"
    return "<1 µs" if value else "0 s"


def format_bytes(nbytes: float) -> str:
    """Binary units like the rest of hpcflow's output, e.g. ``1.5 MiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
