"""Search state: which rows of which live object each node holds.

Holdings are row-interval sets per (object, node), so a slice moved for a
multi-input split is free for later steps that need only those rows, and a
whole part moved once is free everywhere after.  Everything is immutable so
states hash fast and can key the search's memo table; a :class:`Holding`
caches its hash and the byte counts the search asks for again and again
(the same holding is shared by every state that did not touch its object).
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


def missing_rows(have: Intervals, lo: int, hi: int) -> int:
    """How many rows of ``[lo, hi)`` ``have`` lacks (``have`` sorted and disjoint)."""
    if lo >= hi:
        return 0
    count = hi - lo
    for a, b in have:
        if b <= lo:
            continue
        if a >= hi:
            break
        count -= min(b, hi) - max(a, lo)
    return count


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

    @property
    def row_floor(self) -> int:
        """Bytes per row rounded down: any transfer of ``k`` of these rows costs at least
        ``k * row_floor`` (sub-range sizes round down, so a part moved piecewise can cost
        slightly less than whole), which makes it the rate for lower bounds."""
        return self.nbytes // self.rows if self.rows else 0

    def bytes_of(self, lo: int, hi: int) -> int:
        """Bytes of the sub-range ``[lo, hi)``, proportional to rows (rounded down)."""
        if lo == self.lo and hi == self.hi:
            return self.nbytes
        return self.nbytes * (hi - lo) // (self.hi - self.lo)


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


class Holding:
    """An object and, per node (sorted), the rows of it that node has.

    Immutable.  Equality and hash cover ``(obj, held)``; the hash and every
    :meth:`missing_bytes` / :meth:`floor_missing` answer are cached on the
    instance because the search asks the same questions of one holding for
    every decision it tries and every bound it computes.
    """

    __slots__ = ("_floor", "_hash", "_missing", "_nodes", "held", "obj")

    def __init__(self, obj: DataObject, held: tuple[tuple[str, Intervals], ...]) -> None:
        self.obj = obj
        self.held = held
        self._nodes = dict(held)
        self._hash = hash((obj, held))
        self._missing: dict[tuple[str, int, int], int] = {}
        self._floor: dict[str, int] = {}

    @classmethod
    def original(cls, obj: DataObject) -> Holding:
        have: dict[str, Intervals] = {}
        for part in obj.parts:
            for node in part.homes:
                have[node] = union(have.get(node, ()), part.lo, part.hi)
        return cls(obj, tuple(sorted(have.items())))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Holding):
            return NotImplemented
        return self._hash == other._hash and self.held == other.held and self.obj == other.obj

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Holding({self.obj.name!r}, {self.held!r})"

    def at(self, node: str) -> Intervals:
        return self._nodes.get(node, ())

    def nodes(self) -> Iterable[str]:
        """Nodes holding at least one row."""
        return self._nodes.keys()

    def with_rows(self, node: str, lo: int, hi: int) -> Holding:
        have = dict(self.held)
        have[node] = union(have.get(node, ()), lo, hi)
        return Holding(self.obj, tuple(sorted(have.items())))

    def missing_bytes(self, node: str, lo: int, hi: int) -> int:
        """Bytes of ``[lo, hi)`` that ``node`` does not have yet."""
        key = (node, lo, hi)
        total = self._missing.get(key)
        if total is None:
            have = self._nodes.get(node, ())
            total = 0
            for part in self.obj.parts:
                a, b = max(lo, part.lo), min(hi, part.hi)
                if a < b:
                    total += sum(part.bytes_of(x, y) for x, y in missing(have, a, b))
            self._missing[key] = total
        return total

    def floor_missing(self, node: str) -> int:
        """Lower bound on the bytes that must still move to make ``node`` hold all rows:
        missing rows at each part's :attr:`PartGeom.row_floor`."""
        total = self._floor.get(node)
        if total is None:
            have = self._nodes.get(node, ())
            total = sum(
                part.row_floor * missing_rows(have, part.lo, part.hi) for part in self.obj.parts
            )
            self._floor[node] = total
        return total

    def floor_total(self) -> int:
        """:meth:`floor_missing` for a node that holds none of the object."""
        return sum(part.row_floor * part.rows for part in self.obj.parts)

    def holders(self, lo: int, hi: int) -> list[str]:
        """Nodes that have all of ``[lo, hi)``."""
        return [node for node, have in self.held if covers(have, lo, hi)]


class State:
    """Holdings of the objects still needed, immutable and hashable by :attr:`key`."""

    __slots__ = ("_occupied", "holdings", "key")

    def __init__(self, holdings: Mapping[str, Holding]) -> None:
        self.holdings = dict(holdings)
        self.key = tuple(self.holdings[name] for name in sorted(self.holdings))
        self._occupied: frozenset[str] | None = None

    def occupied(self) -> frozenset[str]:
        """Nodes holding any row of any live object."""
        if self._occupied is None:
            self._occupied = frozenset(
                node for h in self.holdings.values() for node, have in h.held if have
            )
        return self._occupied

    def restricted(self, names: Iterable[str]) -> State:
        return State({name: self.holdings[name] for name in names if name in self.holdings})
