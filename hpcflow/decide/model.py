"""Frozen, I/O-free input model of the planner.

A live catalog is adapted into a :class:`Placement` (which node holds which row
block of which dataset), a :class:`Workflow` (ordered steps), node op
advertisements (``node -> {op name: definition hash}``) and a cost model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hpcflow.decide.errors import PlanningError

#: ``node -> {op name: definition hash}`` as advertised by each daemon.
NodeOps = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class PartLoc:
    """One replica of one row block: the catalog's unit of placement."""

    dataset: str
    part: int
    node: str
    rows: int
    nbytes: int


@dataclass(frozen=True)
class Part:
    """A row block of a dataset and every node holding a replica of it."""

    rows: int
    nbytes: int
    holders: tuple[str, ...]


@dataclass(frozen=True)
class Dataset:
    """A stored dataset: per-row shape and dtype, and its parts in row order."""

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]
    parts: tuple[Part, ...]

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)


@dataclass(frozen=True)
class Placement:
    """Snapshot of where every dataset's parts live."""

    datasets: Mapping[str, Dataset]

    @classmethod
    def from_locs(
        cls,
        locs: Iterable[PartLoc],
        schema: Mapping[str, tuple[Sequence[int], npt.DTypeLike]],
    ) -> Placement:
        """Group catalog rows into datasets.

        ``schema`` gives each dataset's per-row shape and dtype (needed to infer
        op output sizes).  Part numbers must be ``0..k-1``; replicas of a part
        must agree on rows and bytes.
        """
        grouped: dict[str, dict[int, list[PartLoc]]] = {}
        for loc in locs:
            grouped.setdefault(loc.dataset, {}).setdefault(loc.part, []).append(loc)
        datasets = {}
        for name, by_part in grouped.items():
            if name not in schema:
                raise PlanningError(f"dataset {name!r} has no schema (row shape, dtype)")
            if sorted(by_part) != list(range(len(by_part))):
                raise PlanningError(f"dataset {name!r}: parts must be numbered 0..k-1")
            parts = tuple(_merge_replicas(name, by_part[i]) for i in range(len(by_part)))
            row_shape, dtype = schema[name]
            datasets[name] = Dataset(name, tuple(row_shape), np.dtype(dtype), parts)
        return cls(datasets)


def _merge_replicas(name: str, replicas: list[PartLoc]) -> Part:
    first = replicas[0]
    for loc in replicas:
        if (loc.rows, loc.nbytes) != (first.rows, first.nbytes):
            raise PlanningError(f"dataset {name!r} part {first.part}: replicas disagree")
        if loc.rows < 0 or loc.nbytes < 0:
            raise PlanningError(f"dataset {name!r} part {first.part}: negative size")
    holders = tuple(dict.fromkeys(loc.node for loc in replicas))
    return Part(first.rows, first.nbytes, holders)


@dataclass(frozen=True)
class Step:
    """``out = op(*inputs, **params)``; inputs name datasets or earlier outputs.

    Sequences given to the constructor are stored as tuples.
    """

    out: str
    op: str
    inputs: Sequence[str]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))


@dataclass(frozen=True)
class Workflow:
    """Ordered steps, the node that asked, and the results it must end up with.

    ``deliver`` defaults to the last step's output; sequences are stored as tuples.
    ``stay``: nothing is delivered, the results stay where the steps make them (a
    partitioned save of a result not fetched); ``deliver`` must then be empty.
    """

    steps: Sequence[Step]
    initiator: str
    deliver: Sequence[str] = ()
    stay: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        deliver = tuple(self.deliver)
        if self.stay and deliver:
            raise ValueError("a workflow whose results stay delivers nothing")
        if not deliver and self.steps and not self.stay:
            deliver = (self.steps[-1].out,)
        object.__setattr__(self, "deliver", deliver)
