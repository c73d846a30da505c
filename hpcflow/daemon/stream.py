"""Rows as they land: a step's op starts on the first row blocks of its input.

A pull that copies rows here into memory (a part, or a slice of one) reports
each block of rows once its bytes are verified and in place (a :class:`Feed`,
registered with the node's :class:`Arrivals`).  :func:`row_blocks` gives a
consumer the rows ``[lo, hi)`` of a dataset block by block as they become
local — from committed local copies at once, from pulls still in flight as
their chunks land — in no particular order, each row exactly once.

The worker runs a rowwise op's unit this way (see
:meth:`~hpcflow.daemon.worker.Worker.run`): each block goes to the op pool as
soon as it is here and writes its rows of the output, so the compute overlaps
the transfer and uses several cores.  Only bytes already verified against their
chunk digest are handed out, and a pull that fails makes the unit fail, so a
streamed result is never made of wrong bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gevent
import gevent.event
import numpy as np

from ..errors import DatasetNotFound

Rows = tuple[int, int]
Block = tuple[int, int, np.ndarray[Any, Any]]


class Feed:
    """One pull's destination: rows ``[row0, row0 + shape[0])`` of ``name``, landing
    block by block in a flat byte buffer."""

    def __init__(self, arrivals: Arrivals, name: str, row0: int) -> None:
        self.arrivals = arrivals
        self.name = name
        self.row0 = row0
        self.rows: np.ndarray[Any, Any] | None = None
        self.row_bytes = 0
        #: Global row ranges whose bytes are in :attr:`rows`, verified.
        self.landed_rows: list[Rows] = []

    def open(self, flat: np.ndarray[Any, Any], dtype: Any, shape: Sequence[int]) -> None:
        """The pull's bytes go to ``flat`` (uint8, C order) for an array of ``shape``."""
        if self.rows is not None or not shape:
            return
        dt = np.dtype(dtype)
        self.row_bytes = dt.itemsize * math.prod(shape[1:])
        if self.row_bytes == 0 or flat.nbytes != self.row_bytes * shape[0]:
            return
        self.rows = flat.view(dt).reshape(tuple(shape))
        self.arrivals.opened(self)

    def landed(self, off: int, nbytes: int) -> None:
        """Bytes ``[off, off + nbytes)`` of the destination are in place and verified.
        Only whole rows count (a chunk layout that cuts rows streams nothing)."""
        if self.rows is None or off % self.row_bytes or nbytes % self.row_bytes or not nbytes:
            return
        a = self.row0 + off // self.row_bytes
        self.landed_rows.append((a, a + nbytes // self.row_bytes))
        self.arrivals.poke()

    def blocks(self) -> list[Block]:
        assert self.rows is not None
        return [(a, b, self.rows[a - self.row0 : b - self.row0]) for a, b in self.landed_rows]

    def close(self) -> None:
        self.arrivals.closed(self)


class Arrivals:
    """The pulls landing in this node's memory right now, by dataset name."""

    def __init__(self) -> None:
        self._open: dict[str, list[Feed]] = {}
        self._changed = gevent.event.Event()

    def feed(self, name: str, row0: int) -> Feed:
        return Feed(self, name, row0)

    def opened(self, feed: Feed) -> None:
        self._open.setdefault(feed.name, []).append(feed)
        self.poke()

    def closed(self, feed: Feed) -> None:
        feeds = self._open.get(feed.name, [])
        if feed in feeds:
            feeds.remove(feed)
            if not feeds:
                del self._open[feed.name]
        self.poke()

    def poke(self) -> None:
        """Wake every consumer waiting for rows (something landed, closed or ended)."""
        ev, self._changed = self._changed, gevent.event.Event()
        ev.set()

    def changed(self) -> gevent.event.Event:
        """Set at the next :meth:`poke`: take it *before* looking, then wait on it."""
        return self._changed

    def landed(self, name: str) -> list[Block]:
        return [b for f in self._open.get(name, []) for b in f.blocks()]


def _overlaps(todo: list[Rows], a: int, b: int) -> list[Rows]:
    return [(max(x, a), min(y, b)) for x, y in todo if max(x, a) < min(y, b)]


def _subtract(todo: list[Rows], a: int, b: int) -> list[Rows]:
    out: list[Rows] = []
    for x, y in todo:
        if y <= a or b <= x:
            out.append((x, y))
            continue
        if x < a:
            out.append((x, a))
        if b < y:
            out.append((b, y))
    return out


def row_blocks(name: str, lo: int, hi: int, *, local: Callable[[], list[Block]],
               arrivals: Arrivals, pending: Callable[[], bool], block_rows: int
               ) -> Iterator[Block]:
    """Rows ``[lo, hi)`` of ``name`` as ``(a, b, rows)`` blocks of at most
    ``block_rows`` rows, as they become local; each row once, in no set order.

    ``local()`` lists the row ranges committed here (cheap views where it can);
    ``pending()`` says whether pulls that may still bring rows are running: when
    none is and rows are missing, :class:`DatasetNotFound` (the plan relied on them).
    """
    todo: list[Rows] = [(lo, hi)] if lo < hi else []
    while todo:
        changed = arrivals.changed()
        ready: list[Block] = []
        for a, b, arr in [*local(), *arrivals.landed(name)]:
            for x, y in _overlaps(todo, a, b):
                ready.append((x, y, arr[x - a : y - a]))
                todo = _subtract(todo, x, y)
        for x, y, arr in ready:
            for s in range(x, y, block_rows):
                e = min(y, s + block_rows)
                yield s, e, arr[s - x : e - x]
        if not todo:
            return
        if not ready:
            if not pending():
                if arrivals.changed() is changed:  # nothing landed since we looked
                    x, y = todo[0]
                    raise DatasetNotFound(f"rows [{x}, {y}) of {name} never arrived here")
                continue
            changed.wait()


__all__ = ["Arrivals", "Feed", "row_blocks"]
