"""Search state: which rows of which live object each node holds.

Holdings are row-interval sets per (object, node), so a slice moved for a
multi-input split is free for later steps that need only those rows, and a
whole part moved once is free everywhere after.  Everything is built from
tuples so states hash fast and can key the search's memo table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

Interval = tuple[int, int]
Intervals = tuple[Interval, ...]


def covers(have: Intervals, lo: int, hi: int) -> bool:
    """True if ``[lo, hi)`` lies inside one interval of ``have`` (empty ranges always do)."""
    return lo >= hi or any(a <= lo and hi <= b for a, b in have)


def missing(have: Intervals, lo: int, hi: int) -> list[Interval]:
    """The sub-ranges of ``[lo, hi)`` not covered by ``have`` (sorted, disjoint)."""
    gaps = []
    cursor = lo
    for a, b in have:
        if b <= cursor:
            continue
        if a >= hi:
            break
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
        if cursor >= hi:
            break
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def union(have: Intervals, lo: int, hi: int) -> Intervals:
    """``have`` plus ``[lo, hi)``, merged and sorted."""
    if lo >= hi:
        return have
    merged: list[Interval] = []
    for a, b in sorted((*have, (lo, hi))):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


class PartGeom(NamedTuple):
    """Rows ``[lo, hi)`` of an object, their size, and the nodes that own them originally."""

    lo: int
    hi: int
    nbytes: int
    homes: tuple[str, ...]

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    def bytes_of(self, lo: int, hi: int) -> int:
        """Bytes of the sub-range ``[lo, hi)``, proportional to rows (rounded down)."""
        if (lo, hi) == (self.lo, self.hi):
            return self.nbytes
        return self.nbytes * (hi - lo) // self.rows


class DataObject(NamedTuple):
    """A dataset or step output with its partition (fixed once it exists)."""

    name: str
    parts: tuple[PartGeom, ...]

    @property
    def rows(self) -> int:
        return self.parts[-1].hi if self.parts else 0

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)


class Holding(NamedTuple):
    """An object and, per node (sorted), the rows of it that node has."""

    obj: DataObject
    held: tuple[tuple[str, Intervals], ...]

    @classmethod
    def original(cls, obj: DataObject) -> Holding:
        have: dict[str, Intervals] = {}
        for part in obj.parts:
            for node in part.homes:
                have[node] = union(have.get(node, ()), part.lo, part.hi)
        return cls(obj, tuple(sorted(have.items())))

    def at(self, node: str) -> Intervals:
        for name, intervals in self.held:
            if name == node:
                return intervals
        return ()

    def with_rows(self, node: str, lo: int, hi: int) -> Holding:
        have = dict(self.held)
        have[node] = union(have.get(node, ()), lo, hi)
        return Holding(self.obj, tuple(sorted(have.items())))

    def missing_bytes(self, node: str, lo: int, hi: int) -> int:
        """Bytes of ``[lo, hi)`` that ``node`` does not have yet."""
        have = self.at(node)
        total = 0
        for part in self.obj.parts:
            a, b = max(lo, part.lo), min(hi, part.hi)
            if a < b:
                total += sum(part.bytes_of(x, y) for x, y in missing(have, a, b))
        return total

    def holders(self, lo: int, hi: int) -> list[str]:
        """Nodes that have all of ``[lo, hi)``."""
        return [node for node, have in self.held if covers(have, lo, hi)]


class State:
    """Holdings of the objects still needed, immutable and hashable by :attr:`key`."""

    __slots__ = ("holdings", "key")

    def __init__(self, holdings: Mapping[str, Holding]) -> None:
        self.holdings = dict(holdings)
        self.key = tuple(self.holdings[name] for name in sorted(self.holdings))

    def occupied(self) -> set[str]:
        """Nodes holding any row of any live object."""
        return {node for h in self.holdings.values() for node, have in h.held if have}

    def restricted(self, names: Iterable[str]) -> State:
        return State({name: self.holdings[name] for name in names if name in self.holdings})
