"""Lazy arrays: ``Client.array(name)`` reads only the rows (and columns) indexed.

A :class:`LazyArray` pins the dataset's layout when it is made: its parts,
their row ranges and, for every holder, the version and checksum of its copy.
Indexing it (numpy's rules: integers, slices with any step, ``...``,
``None``, integer and boolean arrays, on any axis) works out which rows of
which parts are needed and, along the second axis, the span of columns (or
atoms) between the first and the last one asked for, and pulls just those
bytes straight from each part's holders over the bulk channel (``RANGE``
requests: byte ranges of the part, never across parts), every part at once.
Rows close together are read through (a gap up to :data:`GAP_BYTES`) rather
than asked for apart, and at most :data:`MAX_RANGES` ranges are asked of one
part; what is not asked for never moves.  A run read through arrives in
pieces of whole rows and the rows wanted are copied out of each piece as it
arrives, so a read holds its result block and a few pieces, never the span.
The numpy indexing of the fetched block (the order asked for, repeats,
broadcasting) happens here, on that block.

A holder that is dead or silent is replaced by another holder of the same
part.  Every request names the version and checksum pinned: a holder whose
copy was replaced since (overwritten, or deleted and put again) refuses, and
the read fails with :class:`~hpcflow.errors.DatasetChanged` rather than mixing
rows of two versions; :meth:`LazyArray.refresh` pins the new one.

Reads may come from any thread (dask's threaded scheduler calls
``__getitem__`` from its workers): each read makes its own sockets in the
calling thread's gevent hub and makes no RPC call, except that in the thread
that made the array a silent holder is checked against the node's catalog
(elsewhere: whether its port still listens).  Bytes read in another thread
are counted apart and added to the client's ``traffic`` when the read ends.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import numpy as np

from ..catalog.chunking import Payload
from ..catalog.record import DatasetRecord, validate_name
from ..errors import DatasetChanged, DatasetNotFound, InvalidData, PeerUnavailable
from ..rpc.bulk import MAX_RANGE, BulkClient, from_holders
from ..rpc.calls import refuses_connections
from ..rpc.traffic import Traffic

#: A gap between two wanted byte ranges of a part up to this size is read through.
GAP_BYTES = 64 * 1024
#: At most this many byte ranges are asked of one part in one read (closest merged first).
MAX_RANGES = 4096
#: Bytes asked for in one piece of a range (rounded to whole rows when read through).
PIECE_BYTES = 4 * 1024 * 1024
#: Held while a read from another thread adds its traffic to the client's counters.
_COUNTING = threading.Lock()


class Source(Protocol):
    """What a lazy array uses of its client (:class:`~hpcflow.client.client.Client`)."""

    node: str
    traffic: Traffic
    bulk: BulkClient

    def _call(self, method: str, *args: Any) -> Any: ...

    def _parts(self, name: str, part: int | None,
               loc: dict[str, Any] | None = None) -> tuple[Any, ...]: ...

    def _peer_alive(self, name: str) -> bool: ...


@dataclass(frozen=True)
class _Part:
    index: int | None
    start: int
    stop: int
    holders: tuple[DatasetRecord, ...]


class LazyArray:
    """A dataset on the cluster, read by the rows and columns indexed (see the module
    docstring).  ``np.asarray(arr)`` or ``arr[...]`` reads all of it."""

    def __init__(self, source: Source, name: str, location: dict[str, Any] | None = None,
                 *, prefault: Callable[[np.ndarray[Any, Any]], None] | None = None) -> None:
        self.name = validate_name(name)
        self._source = source
        #: Faults in a large fresh block's pages beside the transfer (the client's).
        self._prefault = prefault
        self._owner = threading.get_ident()
        self._pin(location)

    # -- layout ------------------------------------------------------------------------
    def _pin(self, location: dict[str, Any] | None) -> None:
        loc = location if location is not None else self._source._call("locate", self.name)
        shape, dtype_s, _total, parts, bulk = self._source._parts(self.name, None, loc)
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.dtype: np.dtype[Any] = np.dtype(dtype_s)
        self._bulk: dict[str, str] = dict(bulk)
        self._parts = [
            _Part(p["part"], int(p["row_start"]), int(p["row_stop"]),
                  tuple(DatasetRecord.from_wire(h) for h in p["holders"]))
            for p in parts]
        # one client per array: its liveness check must not make RPC calls from the
        # worker threads of dask (the RPC socket belongs to the thread that connected)
        b = self._source.bulk
        self._bulk_client = BulkClient(b.ctx, self._source.traffic, b.me, b.settings,
                                       is_alive=self._alive)

    def refresh(self) -> LazyArray:
        """Pin the dataset as the catalog lists it now (after a :class:`DatasetChanged`,
        to read the new version; its shape may differ).  Returns ``self``.  It asks the
        node: call it in the thread that made the array (the client's RPC socket's)."""
        self._pin(None)
        return self

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def versions(self) -> tuple[tuple[int | None, int, str], ...]:
        """``(part, version, checksum)`` of each part as pinned (of its first holder)."""
        return tuple((p.index, p.holders[0].version, p.holders[0].checksum)
                     for p in self._parts)

    @property
    def part_chunks(self) -> tuple[tuple[int, ...], ...]:
        """Chunks aligned with the parts, in dask's form: the rows of each part on the
        first axis, whole on the others (``da.from_array(arr, chunks=arr.part_chunks)``)."""
        if not self.shape:
            return ()
        rows = tuple(p.stop - p.start for p in self._parts) or (0,)
        return (rows, *((n,) for n in self.shape[1:]))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Iterator[Any]:
        """Row by row, one read each (slice it for fewer, larger reads)."""
        if not self.shape:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __repr__(self) -> str:
        return (f"<LazyArray {self.name} {self.shape} {self.dtype} in "
                f"{len(self._parts)} part{'s' if len(self._parts) != 1 else ''}>")

    def __dask_tokenize__(self) -> Any:
        """Equal for equal pinned contents, so dask caches per version."""
        return ("hpcflow.LazyArray", self.name, self.shape, self.dtype.str,
                tuple((p.start, p.stop, p.holders[0].checksum) for p in self._parts))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray[Any, Any]:
        if copy is False:  # numpy 2: a view was demanded; the bytes are on other nodes
            raise ValueError(f"{self.name} is read from its holders, never viewed: "
                             "np.asarray(arr, copy=False) cannot be honoured")
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def to_dask(self, chunks: Any = None) -> Any:
        """A dask array over this one (``chunks`` default: :attr:`part_chunks`)."""
        import dask.array as da

        return da.from_array(self, chunks=self.part_chunks if chunks is None else chunks,
                             asarray=True)

    # -- reading -----------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if not self.shape:  # a 0-d dataset: its one element, indexed by numpy
            return self._read(range(1), 0, 1, (1,)).reshape(())[key]
        rows, span, new_key = _plan(key, self.shape)
        lo, hi = span
        block = self._read(rows, lo, hi, self.shape)
        return block[new_key]

    def _read(self, rows: Rows, lo: int, hi: int, shape: tuple[int, ...]
              ) -> np.ndarray[Any, Any]:
        """Rows ``rows`` (sorted, unique) with ``[lo, hi)`` of the second axis, as one
        block ``(len(rows), hi - lo, *shape[2:])``; the 0-d case comes as ``(1,)``."""
        inner = math.prod(shape[2:]) * self.dtype.itemsize
        row_bytes = (shape[1] if len(shape) > 1 else 1) * inner
        b0, b1 = (lo * inner, hi * inner) if len(shape) > 1 else (0, row_bytes)
        width = b1 - b0
        block_shape = (len(rows), hi - lo, *shape[2:]) if len(shape) > 1 else (len(rows),)
        block = np.empty(block_shape, dtype=self.dtype)
        if block.nbytes == 0:
            return block
        if self._bulk_client.ctx.closed:
            raise InvalidData(f"the client that made this array of {self.name} is closed: "
                              "read it before closing, or connect again")
        flat = block.reshape(len(rows), -1).view(np.uint8)
        if self._prefault is not None:
            self._prefault(flat.reshape(-1))
        jobs = []
        for part in self._parts:
            a, b = _position(rows, part.start), _position(rows, part.stop)
            if a < b:
                jobs.append((part, _shift(rows[a:b], -part.start), flat[a:b]))
        if threading.get_ident() == self._owner:
            bulk, counted = self._bulk_client, None
        else:  # another thread (dask's): its own counters, added to the client's after
            counted = Traffic()
            own = self._bulk_client
            bulk = BulkClient(own.ctx, counted, own.me, own.settings, is_alive=self._alive)

        def read(job: tuple[_Part, Rows, np.ndarray[Any, Any]]) -> Exception | None:
            try:  # returned, not raised: a failed greenlet would be printed by the hub
                self._read_part(bulk, *job, row_bytes, b0, width)
            except Exception as exc:
                return exc
            return None

        reads = [gevent.spawn(read, job) for job in jobs]
        try:
            gevent.joinall(reads)
        finally:
            gevent.killall(reads)
            if counted is not None:
                with _COUNTING:
                    self._source.traffic.add(counted)
        for g in reads:
            if g.value is not None:
                raise g.value
        return block

    def _read_part(self, bulk: BulkClient, part: _Part, local: Rows,
                   dest: np.ndarray[Any, Any], row_bytes: int, b0: int, width: int) -> None:
        """Rows ``local`` of one part (bytes ``[b0, b0 + width)`` of each) into ``dest``
        (one row of ``width`` bytes per entry), from the first holder that answers.

        A run of rows read through (gaps, or a column span) arrives in pieces of whole
        rows (:func:`_piece`); each piece's wanted rows are picked into ``dest`` as it
        arrives, so nothing but the block itself is held."""
        piece = _piece(row_bytes)
        targets: list[tuple[int, Callable[[int, Payload], None]]] = []
        ranges: list[tuple[int, int]] = []
        pos = 0
        for first, last, n in _merge(local, row_bytes, width, merge=piece is not None):
            out = dest[pos:pos + n]
            start = first * row_bytes + b0
            if last - first + 1 == n and (width == row_bytes or n == 1):
                targets.append((start, _landing(out.reshape(-1))))
                ranges.append((start, n * width))
            else:  # rows with gaps, or a column span: picked from each piece
                targets.append((start, _picking(out, _shift(local[pos:pos + n], -first),
                                                row_bytes, width)))
                ranges.append((start, (last - first) * row_bytes + width))
            pos += n
        offsets = [t[0] for t in targets]

        def deliver(off: int, payload: Payload) -> None:
            start, land = targets[bisect.bisect_right(offsets, off) - 1]
            land(off - start, payload)

        errors: list[Exception] = []

        def fetch(rec: DatasetRecord, endpoint: str | None) -> int:
            assert endpoint is not None
            try:
                return bulk.fetch_ranges(endpoint, rec.owner, rec, ranges, deliver,
                                         piece or PIECE_BYTES)
            except (PeerUnavailable, DatasetNotFound) as exc:
                errors.append(exc)
                raise PeerUnavailable(f"{rec.owner}: {exc}") from exc

        what = f"rows of {self.name}" + ("" if part.index is None else f" part {part.index}")
        try:
            from_holders(part.holders, fetch, self._bulk.get, what=what,
                         here=self._source.node)
        except PeerUnavailable as exc:
            if any(isinstance(e, DatasetChanged) for e in errors):
                raise DatasetChanged(
                    f"{self.name} changed while being read ({exc}): the version pinned when "
                    "the array was made is gone; arr.refresh() reads the new one") from None
            if errors and all(isinstance(e, DatasetNotFound) for e in errors):
                raise DatasetNotFound(f"{self.name} is gone: {exc}") from None
            raise

    def _alive(self, peer: str) -> bool:
        """Is ``peer`` still worth waiting for?  The node's catalog says, from the thread
        that owns the RPC socket; other threads see only whether its port still listens."""
        if threading.get_ident() == self._owner:
            return self._source._peer_alive(peer)
        endpoint = self._bulk.get(peer)
        return endpoint is None or not refuses_connections(endpoint, timeout_s=1.0)


Rows = range | np.ndarray[Any, Any]
"""Sorted unique row indices: a ``range`` for a slice (no index array for a[:] of a
billion rows), an array otherwise."""


def _position(rows: Rows, x: int) -> int:
    """Where ``x`` would go in ``rows`` (the first index not below it)."""
    if isinstance(rows, range):
        return bisect.bisect_left(rows, x)
    return int(np.searchsorted(rows, x))


def _shift(rows: Rows, d: int) -> Rows:
    if isinstance(rows, range):
        return range(rows.start + d, rows.stop + d, rows.step)
    return rows + d


def _piece(row_bytes: int) -> int | None:
    """Size of the pieces a run of rows is asked for in: whole rows, about
    :data:`PIECE_BYTES`; None when one row is larger than a range request may be
    (such rows are then never read through, each is a range of its own)."""
    if row_bytes > MAX_RANGE:
        return None
    return max(1, PIECE_BYTES // row_bytes) * row_bytes


def _landing(buf: np.ndarray[Any, Any]) -> Callable[[int, Payload], None]:
    """Pieces of a contiguous run land where they belong in ``buf``."""
    def land(rel: int, payload: Payload) -> None:
        payload.copy_into(buf, rel)
    return land


def _picking(out: np.ndarray[Any, Any], at: Rows, row_bytes: int, width: int
             ) -> Callable[[int, Payload], None]:
    """Pieces of a run read through: each starts at a whole row (``rel`` is a multiple
    of ``row_bytes``); the rows ``at`` (relative to the run's first) that it holds are
    copied into ``out`` (``width`` bytes each, from the start of each row's window)."""
    def pick(rel: int, payload: Payload) -> None:
        r0, count = rel // row_bytes, -(-payload.nbytes // row_bytes)
        scratch = np.empty(count * row_bytes, dtype=np.uint8)
        payload.copy_into(scratch, 0)  # the last row of the run may be cut after width
        rows = scratch.reshape(count, row_bytes)[:, :width]
        i0, i1 = _position(at, r0), _position(at, r0 + count)
        sel = _shift(at[i0:i1], -r0)
        out[i0:i1] = rows[slice(sel.start, sel.stop, sel.step) if isinstance(sel, range)
                          else sel]
    return pick


def _merge(local: Rows, row_bytes: int, width: int, merge: bool = True
           ) -> list[tuple[int, int, int]]:
    """Group sorted row indices into runs read as one byte range each: ``(first row, last
    row, rows in it)``.  Neighbours whose gap is at most :data:`GAP_BYTES` share a range,
    and the widest gaps split them until at most :data:`MAX_RANGES` remain; with
    ``merge=False`` every row is a range of its own."""
    n = len(local)
    if n == 0:
        return []
    if n == 1 or (merge and isinstance(local, range)
                  and local.step * row_bytes - width <= GAP_BYTES):
        return [(int(local[0]), int(local[-1]), n)]
    if not merge:
        return [(int(r), int(r), 1) for r in local]
    rows = np.asarray(local)
    gaps = (rows[1:] - rows[:-1]) * row_bytes - width  # bytes between two wanted ranges
    limit = GAP_BYTES
    if np.count_nonzero(gaps > limit) >= MAX_RANGES:
        limit = int(np.partition(gaps, len(gaps) - MAX_RANGES + 1)[len(gaps) - MAX_RANGES + 1])
    cuts = np.flatnonzero(gaps > limit) + 1
    bounds = [0, *cuts.tolist(), n]
    return [(int(rows[a]), int(rows[b - 1]), b - a) for a, b in itertools.pairwise(bounds)]


# -- indexing -------------------------------------------------------------------------------

def _is_int(k: Any) -> bool:
    if isinstance(k, bool | np.bool_):
        return False
    try:
        operator.index(k)
    except TypeError:
        return False
    return not isinstance(k, np.ndarray)


def _plan(key: Any, shape: tuple[int, ...]) -> tuple[Rows, tuple[int, int], tuple[Any, ...]]:
    """What ``arr[key]`` needs: the sorted unique rows, the span ``[lo, hi)`` of the
    second axis, and the key to apply to that block so the result is numpy's.

    Errors are numpy's own: the key is first applied to a stand-in array of no bytes
    whose axes are empty except those indexed by integers or arrays."""
    items = list(key) if isinstance(key, tuple) else [key]
    kinds = []  # per item: axes it consumes
    for k in items:
        if k is None or k is Ellipsis:
            kinds.append(0)
        elif isinstance(k, slice) or _is_int(k):
            kinds.append(1)
        else:
            try:
                a = np.asarray(k)
            except (ValueError, TypeError) as exc:
                raise IndexError(f"cannot use {type(k).__name__} as an index: {exc}") from None
            kinds.append(a.ndim if a.dtype == np.bool_ else 1)
    if sum(k is Ellipsis for k in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = sum(kinds)
    if used > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, "
                         f"but {used} were indexed")
    if Ellipsis in [k for k in items if k is Ellipsis]:
        at = next(i for i, k in enumerate(items) if k is Ellipsis)
        fill = len(shape) - used
        items[at:at + 1] = [slice(None)] * fill
        kinds[at:at + 1] = [1] * fill
    # which item indexes which axis
    axis_of: list[int | None] = []
    ax = 0
    for n in kinds:
        axis_of.append(ax if n else None)
        ax += n
    # numpy checks types, bounds and broadcasting on a stand-in with no bytes
    probe_shape = [0] * len(shape)
    for k, n, axis in zip(items, kinds, axis_of, strict=True):
        if axis is not None and not isinstance(k, slice):
            for j in range(axis, axis + n):
                probe_shape[j] = shape[j]
    probe = np.broadcast_to(np.empty((), dtype="V0"), tuple(probe_shape))
    probe[tuple(items)]  # raises IndexError/TypeError exactly as numpy would

    rows: Rows = range(shape[0])
    lo, hi = 0, shape[1] if len(shape) > 1 else 1
    for i, (k, n, axis) in enumerate(zip(items, kinds, axis_of, strict=True)):
        if axis == 0 and n == 1:
            rows, items[i] = _rows(k, shape[0])
        elif axis == 0 and n > 1:
            break  # a boolean mask over several axes from the first: read them whole
        elif axis == 1 and n == 1:
            (lo, hi), items[i] = _span(k, shape[1])
    return rows, (lo, hi), tuple(items)


def _rows(k: Any, n: int) -> tuple[Rows, Any]:
    """The rows an index of the first axis needs (sorted, unique) and the index that
    picks them from a block of just those rows."""
    if isinstance(k, slice):
        r = range(*k.indices(n))
        if r.step < 0:
            return r[::-1], slice(None, None, -1)
        return r, slice(None)
    if _is_int(k):
        i = operator.index(k)
        i = i + n if i < 0 else i
        return range(i, i + 1), 0
    a = np.asarray(k)
    if a.dtype == np.bool_:
        rows = np.flatnonzero(a)
        return rows, np.arange(len(rows))
    if a.size == 0:
        return np.zeros(0, dtype=np.intp), a.astype(np.intp)
    a = np.where(a < 0, a + n, a).astype(np.intp)
    rows = np.unique(a)
    return rows, np.searchsorted(rows, a)


def _span(k: Any, n: int) -> tuple[tuple[int, int], Any]:
    """The span ``[lo, hi)`` an index of the second axis needs, and the index that picks
    it from a block holding just that span."""
    if isinstance(k, slice):
        r = range(*k.indices(n))
        if len(r) == 0:
            return (0, 0), slice(0, 0)
        lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
        stop = r[-1] - lo + (1 if r.step > 0 else -1)
        return (lo, hi), slice(r[0] - lo, None if stop < 0 else stop, r.step)
    if _is_int(k):
        i = operator.index(k)
        i = i + n if i < 0 else i
        return (i, i + 1), 0
    a = np.asarray(k)
    if a.dtype == np.bool_:
        a = np.flatnonzero(a)
    if a.size == 0:
        return (0, 0), a.astype(np.intp)
    a = np.where(a < 0, a + n, a).astype(np.intp)
    lo = int(a.min())
    return (lo, int(a.max()) + 1), a - lo


__all__ = ["GAP_BYTES", "MAX_RANGES", "LazyArray"]
