"""What a node does when a plan asks it to: make rows local, run an op on local data.

The executor on the initiating node drives every other node through two RPCs
(see :class:`~hpcflow.daemon.service.NodeService`):

* ``pull(name, lo, hi, src)`` — make rows ``[lo, hi)`` of dataset ``name``
  local, from ``src`` (the source the plan chose) if it can, else from
  another holder; the reply says which node really sent what.  A part the
  range covers whole is copied (a catalogued replica, verified against the
  dataset checksum); a part it covers partly is fetched as a row range and
  stored as a *slice*, a dataset named ``NAME:rowsLO-HI`` whose lineage says
  what it is a slice of.  Copies and slices carry the execution's flow tag
  (:mod:`.lifecycle`).
* ``run_op(request)`` — run an op on rows that are all local, check the
  output against the plan's model (shape and dtype), store it (whole, one
  row-part, or a reduce partial) and announce it with lineage.

Op code, and the gathering of its input rows, run in gevent's thread pool:
numpy releases the GIL for its heavy loops, so heartbeats and other requests
keep flowing during long operations.  Both count as the node's load (what
``objective="time"`` weighs), idle requests do not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gevent
import gevent.pool
import numpy as np

from ..catalog.base import Location, PartLocation
from ..catalog.lineage import source_digest
from ..catalog.memory import MemoryReader
from ..catalog.record import DatasetRecord, key_of
from ..errors import DatasetNotFound, InvalidData, PeerUnavailable
from ..ops import (
    OpError,
    OpRegistry,
    apply,
    combine_partials,
    row_roles,
    run_partial,
    run_rowwise_into,
    run_rowwise_part,
)
from ..rpc.bulk import from_holders
from ..rpc.messages import RunReply, RunRequest
from .datasets import Datasets
from .events import Events
from .h5mdmeta import result_axis
from .learned import Learned
from .lifecycle import FlowBook, Janitor
from .parts import NodeParts
from .plancache import PlanCache
from .pools import op_pool, run_in
from .share import Shares
from .stream import Arrivals, Block, Feed, row_blocks

log = logging.getLogger("hpcflow.worker")


#: Inputs up to this many bytes are computed on the event loop: a thread hop costs more.
INLINE_COMPUTE_BYTES = 1024 * 1024
#: A rowwise unit on at least this many input bytes runs block by block (:mod:`.stream`).
STREAM_MIN_BYTES = 1 << 20


def _nbytes(partial: Any) -> int:
    items = partial if isinstance(partial, tuple) else (partial,)
    return sum(int(np.asarray(x).nbytes) for x in items)


def _builtin(spec: Any) -> bool:
    return bool(getattr(spec.fn, "__module__", "").startswith("hpcflow.ops."))


#: A streamed unit's inputs: ``(name, lo, hi, is_row_input)`` each.
Layout = list[tuple[str, int, int, bool]]


def _always(x: np.ndarray[Any, Any]) -> Callable[[int, int], np.ndarray[Any, Any]]:
    return lambda a, b: x


def slice_name(name: str, lo: int, hi: int) -> str:
    return f"{name}:rows{lo}-{hi}"


def pack_partial(partial: Any) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    """A reduce partial as one array to store and move, plus what is needed to unpack it.

    A single-array partial is stored as it is (so the bytes that move are
    exactly the partial's); a tuple is concatenated as raw bytes, its items'
    dtypes and shapes kept in the lineage.
    """
    if not isinstance(partial, tuple):
        return np.asarray(partial), {"partial": "array"}
    items = [np.asarray(x) for x in partial]
    layout = [[x.dtype.str, list(x.shape)] for x in items]  # 0-d stays 0-d
    # ravel, not ascontiguousarray: that makes a 0-d item 1-d
    blob = np.concatenate([x.ravel(order="C").view(np.uint8) for x in items]) if items else (
        np.empty(0, np.uint8))
    return blob, {"partial": "tuple", "layout": layout}


def unpack_partial(arr: np.ndarray[Any, Any], lineage: dict[str, Any]) -> Any:
    if lineage.get("partial") == "array":
        return arr
    if lineage.get("partial") != "tuple":
        raise InvalidData("dataset is not a stored reduce partial")
    items, pos, raw = [], 0, arr.reshape(-1).view(np.uint8)
    try:
        for dtype, shape in lineage["layout"]:
            dt = np.dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            items.append(raw[pos : pos + n].view(dt).reshape(shape))
            pos += n
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidData(f"bad partial layout: {exc}") from exc
    return tuple(items)


class Worker:
    """Everything a node does for workflows: resolves local rows, runs ops, stores
    results; as an initiator it keeps the :class:`FlowBook`; as a holder its
    :class:`Janitor` sweeps intermediates of finished flows."""

    def __init__(self, node: NodeParts, datasets: Datasets, registry: OpRegistry) -> None:
        self.node = node
        self.datasets = datasets
        self.registry = registry
        self.book = FlowBook()
        self.plans = PlanCache()
        #: Fixed costs and op speeds measured here, for this node's plans.
        self.learned = Learned()
        #: Ops run and failed, plans, step phases: read by the metrics endpoint.
        self.events = Events()
        #: Pulls landing here, for units that start on their first row blocks.
        self.arrivals = Arrivals()
        self.shares = Shares(node, self)
        #: Started by the node (it waits for the node to start).
        self.janitor = Janitor(node, self.book)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count real work (an op running or queued, a transfer) as the node's load."""
        self.node.active += 1
        try:
            yield
        finally:
            self.node.active -= 1

    # -- rows ------------------------------------------------------------------
    def _pieces(self, name: str, wait_s: float = 0.0
                ) -> tuple[Location, list[tuple[int, int, DatasetRecord]]]:
        """Locally held row ranges of ``name``: whole parts and slices.

        ``wait_s`` > 0 waits for the dataset to be complete in the catalog: an
        executor may ask for an output another node announced a moment ago.
        """
        loc = (self.node.catalog.wait_for(name, wait_s) if wait_s > 0
               else self.node.catalog.locate(name))
        starts = {p.part: (p.row_start, p.row_stop) for p in loc.parts}
        pieces = []
        store = self.node.store
        for rec in store.named(name):
            if rec.part in starts:
                lo, hi = starts[rec.part]
                pieces.append((lo, hi, rec))
        for rec in store.slices_of(name):
            lo, hi = rec.lineage["rows"]
            pieces.append((int(lo), int(hi), rec))
        pieces.sort(key=lambda p: (p[0], -p[1]))
        return loc, pieces

    def local_rows(self, name: str, rows: tuple[int, int] | None,
                   wait_s: float | None = None, view: bool = False) -> np.ndarray[Any, Any]:
        """Rows ``[lo, hi)`` of ``name`` from local copies only (no network).

        Row offsets come from the catalog, so wait until it knows every part:
        parts made a moment ago on other nodes may still be on their way.
        Rows the plan expected here but that are gone (a copy another flow
        removed, say) are a :class:`DatasetNotFound`: the initiator re-plans.
        Big reads are copied piecewise, yielding between pieces.  ``wait_s``: how long
        to wait for the catalog to know the whole dataset (default the RPC timeout).
        ``view``: rows held by one in-memory part come back as a read-only view of it,
        not a copy (for code that never writes its inputs: the built-in ops).
        """
        loc, pieces = self._pieces(name, wait_s=self._wait(wait_s))
        total = loc.shape[0] if loc.shape else 1
        lo, hi = rows if rows is not None else (0, total)
        if not 0 <= lo <= hi <= total:
            raise InvalidData(f"rows [{lo}, {hi}) outside {name} ({total} rows)")
        if not loc.shape:  # a scalar dataset: one "row"
            rec = next((r for _, _, r in pieces), None)
            if rec is None:
                raise DatasetNotFound(f"{name} is not on {self.node.name}")
            return np.asarray(self.node.store.read_array(rec.name, rec.part, verify=False))
        if view:
            for plo, phi, rec in pieces:
                if plo <= lo and hi <= phi:
                    reader = self.node.store.reader(rec.key)
                    if isinstance(reader, MemoryReader):
                        return reader.array()[lo - plo : hi - plo]
                    break
        out = np.empty((hi - lo, *loc.shape[1:]), dtype=np.dtype(loc.dtype))
        row_bytes = out.itemsize * math.prod(loc.shape[1:])
        flat = out.reshape(-1).view(np.uint8)
        step = max(1, self.node.config.chunk_bytes // max(row_bytes, 1))
        pos = lo
        for plo, phi, rec in pieces:
            while pos < hi and plo <= pos < phi:
                take = min(phi, hi, pos + step) - pos
                reader = self.node.store.reader(rec.key)
                src = reader.byte_range((pos - plo) * row_bytes, take * row_bytes)
                dst = (pos - lo) * row_bytes
                flat[dst : dst + take * row_bytes] = np.frombuffer(memoryview(src).cast("B"),
                                                                   dtype=np.uint8)
                pos += take
                gevent.sleep(0)
        if pos < hi:
            raise DatasetNotFound(f"rows [{pos}, {hi}) of {name} are no longer on "
                                  f"{self.node.name} (the plan relied on them)")
        return out

    def _wait(self, wait_s: float | None) -> float:
        return self.node.config.rpc_timeout_s if wait_s is None else wait_s

    def pull(self, name: str, rows: tuple[int, int] | None, src: str | None = None,
             tag: dict[str, Any] | None = None, wait_s: float | None = None
             ) -> tuple[list[DatasetRecord], dict[str, int]]:
        """Make rows local; returns the records created (copies, slices) and the
        bytes received from each source node.

        ``src`` (the plan's choice) is tried first: a whole part from its copy,
        a row range from its copy or from a slice it holds; other holders are
        the fallback.  ``tag`` is added to the lineage of what is created.
        """
        with self.busy(), self.events.pulling():
            loc, pieces = self._pieces(name, wait_s=self._wait(wait_s))
            total = loc.shape[0] if loc.shape else 1
            lo, hi = rows if rows is not None else (0, total)
            created: list[DatasetRecord] = []
            moved: dict[str, int] = {}
            for p in loc.parts:
                a, b = max(lo, p.row_start), min(hi, p.row_stop)
                if a >= b and not (p.row_start == p.row_stop and lo <= p.row_start < hi):
                    continue
                # Another execution may be copying the same rows here right now: use its
                # copy once written rather than fail to write a second one.
                keys = (key_of(name, p.part), slice_name(name, a, b))
                if any(self.node.store.busy(k) for k in keys):
                    for k in keys:
                        self.node.store.wait_idle(k, self._wait(wait_s))
                    pieces = self._pieces(name)[1]
                if any(plo <= a and b <= phi for plo, phi, _ in pieces):
                    continue  # already here
                whole = (a, b) == (p.row_start, p.row_stop)
                feed = self.arrivals.feed(name, a)
                try:
                    if whole and (src is None or src in p.nodes
                                  or not self._slices(name, a, b, src)):
                        rec, used = self.datasets.replicate_part(p, prefer=src, lineage=tag,
                                                                 feed=feed)
                    else:
                        rec, used = self._pull_slice(name, p, a, b, src, tag, feed)
                finally:
                    feed.close()
                created.append(rec)
                if used is not None:
                    moved[used] = moved.get(used, 0) + rec.nbytes
            return created, moved

    def _slices(self, name: str, lo: int, hi: int, owner: str | None = None
                ) -> list[tuple[DatasetRecord, int]]:
        """Catalogued slices of ``name`` covering rows ``[lo, hi)`` (with their first row)."""
        out = []
        for rec in self.node.catalog.slices_of(name):
            if owner and rec.owner != owner:
                continue
            rows = rec.lineage.get("rows")
            if isinstance(rows, list) and len(rows) == 2 and rows[0] <= lo and hi <= rows[1]:
                out.append((rec, int(rows[0])))
        return out

    def _pull_slice(self, name: str, p: PartLocation, glo: int, ghi: int, prefer: str | None,
                    tag: dict[str, Any] | None, feed: Feed | None = None
                    ) -> tuple[DatasetRecord, str]:
        """Rows ``[glo, ghi)`` of part ``p`` as a local slice: from ``prefer``'s copy or
        slice first, then the part's other holders."""
        sources = [(rec, p.row_start) for rec in p.holders]
        if prefer is not None:
            sources += self._slices(name, glo, ghi, prefer)
        first = p.holders[0]
        row_bytes = first.nbytes // max(first.rows, 1)
        shape = (ghi - glo, *first.shape[1:])
        writer = self.node.store.begin(
            slice_name(name, glo, ghi), shape, first.dtype, overwrite=True,
            lineage={"slice_of": name, "rows": [glo, ghi], "source_version": first.version,
                     **(tag or {})},
            chunk_bytes=self.node.config.chunk_bytes, volatile=True)
        flat = np.empty(writer.chunking.nbytes, dtype=np.uint8)
        piece = max(row_bytes, self.node.config.chunk_bytes // max(row_bytes, 1) * row_bytes)
        if feed is not None:
            feed.open(flat, first.dtype, shape)

        def landed(k: int, off: int, buf: Any, d: int) -> None:
            buf.copy_into(flat, off)
            if feed is not None:
                feed.landed(off, buf.nbytes)

        def fetch(source: tuple[DatasetRecord, int], endpoint: str | None) -> None:
            rec, start = source
            assert endpoint is not None
            self.node.bulk_client.fetch_range(
                endpoint, rec.owner, rec, (glo - start) * row_bytes, (ghi - glo) * row_bytes,
                landed, piece)

        try:
            (used, _), _ = from_holders(
                sources, fetch, lambda owner: self.node.bulk_endpoints([owner]).get(owner),
                what=f"{name} rows [{glo}, {ghi})", prefer=prefer, here=self.node.name,
                retry_on=(PeerUnavailable, DatasetNotFound), owner=lambda s: s[0].owner)
            for i in range(len(writer.chunking)):
                off, length = writer.chunking.byte_range(i)
                writer.write_chunk(i, flat[off : off + length])
            return writer.commit(), used.owner
        except BaseException:
            writer.abort()
            raise

    # -- ops -------------------------------------------------------------------
    def run(self, req: RunRequest, wait_s: float | None = None,
            feeding: Sequence[gevent.Greenlet] = ()) -> RunReply:
        """Run one unit of a plan on local rows; store and announce the checked output.
        Counted by op in :attr:`events` (a cancellation is no failure).

        ``feeding``: pulls still bringing this unit's rows here.  A rowwise unit starts
        on the rows that have landed (:mod:`.stream`); any other waits for them."""
        t0 = time.monotonic()
        try:
            reply = self._run_unit(req, wait_s, feeding)
        except gevent.GreenletExit:
            raise
        except BaseException:
            self.events.op_failed(req.op)
            raise
        self.events.op_ran(req.op, time.monotonic() - t0)
        return reply

    def _run_unit(self, req: RunRequest, wait_s: float | None,
                  feeding: Sequence[gevent.Greenlet] = ()) -> RunReply:
        with self.busy():
            t0 = time.monotonic()
            timing: dict[str, float] = {"compute_s": 0.0, "nbytes": 0}
            spec = self.registry.get(req.op)
            if req.op_hash is not None and req.op_hash != spec.definition_hash:
                raise OpError(f"op {req.op!r} on {self.node.name} has a different definition "
                              "than the initiator's")
            result = self._empty_part(req)
            layout = self._streams(req, spec) if result is None else None
            if layout is not None:
                result = self._compute_streamed(req, spec, layout, wait_s, timing, feeding)
            if result is None:
                self._settle(feeding)
                result = self._compute(req, spec, wait_s, timing)
            lineage = {"op": req.op, "op_hash": spec.definition_hash, "params": req.params,
                       "mode": req.mode, "inputs": [
                           {"name": i.name, "rows": list(i.rows) if i.rows else None,
                            **self._versions(i.name)} for i in req.inputs],
                       **req.lineage}
            if req.mode == "partial":
                result, how = pack_partial(result)
                lineage.update(how)
            else:
                self._check(req, np.asarray(result))
            arr = np.asarray(result)
            if spec.kind == "rowwise" and req.mode in ("part", "whole") and arr.ndim:
                # one row per input frame: the frames' time axis (see h5mdmeta)
                lineage.update(result_axis(self.node.catalog, [
                    (i.name, i.rows) for i in req.inputs], arr.shape[0]) or {})
            # An intermediate (kept only in memory) unless the flow keeps its outputs.
            keep = isinstance(req.lineage.get("flow"), dict) and req.lineage["flow"].get("keep")
            # A built-in op's output is a fresh array nobody else holds: the memory store
            # keeps it as it is (a user op might return an array it keeps and changes).
            rec = self.node.store.put_array(req.out, arr, part=req.part, nparts=req.nparts,
                                            lineage=lineage, overwrite=True,
                                            chunk_bytes=self.node.config.chunk_bytes,
                                            volatile=not keep,
                                            adopt=_builtin(spec) or bool(timing.get("ours")))
            times = (time.monotonic() - t0, timing["compute_s"], int(timing["nbytes"]))
            if req.mode == "partial" or arr.nbytes > req.inline:
                return RunReply(rec, None, *times)
            who = req.initiator
            if who is not None and who != self.node.name:
                self.node.traffic.sent(who, arr.nbytes)
            return RunReply(rec, np.ascontiguousarray(arr).tobytes(), *times)

    def _settle(self, feeding: Sequence[gevent.Greenlet]) -> None:
        """Wait for the pulls bringing a unit's rows (their errors are the share's)."""
        gevent.joinall(list(feeding))

    def _streams(self, req: RunRequest, spec: Any) -> Layout | None:
        """How a unit runs block by block, if it does: its op is rowwise, each row of its
        (first) row input makes one output row, and that input is big enough to be worth
        it.  ``[(name, lo, hi, is_row_input)]`` per input (broadcast operands go whole
        to every block)."""
        ex = req.expect
        if spec.kind != "rowwise" or req.mode not in ("whole", "part"):
            return None
        if spec.rows is not None:  # selects rows by their global index
            return None
        if ex is None or not ex.shape:
            return None
        layout, shapes, itemsizes = [], [], []
        for i in req.inputs:
            try:
                loc = self.node.catalog.locate(i.name)
            except DatasetNotFound:
                return None
            if not loc.shape:
                return None
            lo, hi = i.rows if i.rows is not None else (0, loc.shape[0])
            layout.append((i.name, lo, hi))
            shapes.append((hi - lo, *loc.shape[1:]))
            itemsizes.append(np.dtype(loc.dtype).itemsize)
        try:
            roles = row_roles(spec, shapes)
        except OpError:
            return None  # the unit's own run says what is wrong
        first = roles.index(True)
        rows = shapes[first][0]
        if len(shapes[first]) < 2 or ex.shape[0] != rows:
            return None
        if itemsizes[first] * math.prod(shapes[first]) < STREAM_MIN_BYTES:
            return None
        return [(*x, r) for x, r in zip(layout, roles, strict=True)]

    def _local_blocks(self, name: str, wait_s: float | None) -> list[Block]:
        """Row ranges of ``name`` committed here, as read-only arrays (views where the
        store can: memory, or a mapped HDF5 file)."""
        loc, pieces = self._pieces(name, wait_s=self._wait(wait_s))
        dt = np.dtype(loc.dtype)
        out = []
        for plo, phi, rec in pieces:
            reader = self.node.store.reader(rec.key)
            raw = reader.byte_range(0, rec.nbytes)
            arr = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8).view(dt)
            arr = arr.reshape((phi - plo, *loc.shape[1:]))
            arr.flags.writeable = False
            out.append((plo, phi, arr))
        return out

    def _compute_streamed(self, req: RunRequest, spec: Any, layout: Layout,
                          wait_s: float | None, timing: dict[str, float],
                          feeding: Sequence[gevent.Greenlet]) -> np.ndarray[Any, Any] | None:
        """A rowwise unit block by block, on the op pool, as the rows of its first row
        input become local (:mod:`.stream`); its other inputs must be here (their rows
        for each block, broadcast operands whole).  Each block writes its rows of a
        preallocated output.  ``None`` when a block's output does not have the rows the
        plan's model says (the unit then runs whole, and its output check explains)."""
        ex = req.expect
        assert ex is not None
        first = next(k for k, x in enumerate(layout) if x[3])
        name, lo, hi, _ = layout[first]
        if len(layout) > 1:
            self._settle(feeding)  # the other inputs whole first: then stream the first
            feeding = ()
        others: list[Callable[[int, int], np.ndarray[Any, Any]]] = []
        for k, (other, olo, ohi, is_row) in enumerate(layout):
            if k == first:
                continue
            if is_row:
                others.append(self._rows_of(other, olo - lo, wait_s))
            else:
                others.append(_always(self.local_rows(other, (olo, ohi), wait_s)))
        out = np.empty(ex.shape, dtype=np.dtype(ex.dtype))
        trailing, dtype = tuple(ex.shape[1:]), np.dtype(ex.dtype)
        copy_in = not _builtin(spec)  # a user op may change its input: give it its own rows

        def one(a: int, b: int, x: np.ndarray[Any, Any]) -> tuple[bool, float]:
            t = time.monotonic()
            args = [x, *(get(a, b) for get in others)]
            args.insert(first, args.pop(0))
            if copy_in:
                args = [np.array(y) for y in args]
            if spec.into is not None:  # straight into the result
                run_rowwise_into(spec, args, req.params, out[a - lo : b - lo])
                return True, time.monotonic() - t
            y = run_rowwise_part(spec, args, req.params)
            if y.shape != (b - a, *trailing) or y.dtype != dtype:
                return False, 0.0
            out[a - lo : b - lo] = y
            return True, time.monotonic() - t

        for g in feeding:
            g.link(lambda _g: self.arrivals.poke())
        loc = self.node.catalog.wait_for(name, self._wait(wait_s))
        row_bytes = np.dtype(loc.dtype).itemsize * math.prod(loc.shape[1:])
        block_rows = max(1, self.node.config.chunk_bytes // max(row_bytes, 1))
        blocks = row_blocks(name, lo, hi, local=lambda: self._local_blocks(name, wait_s),
                            arrivals=self.arrivals, block_rows=block_rows,
                            pending=lambda: any(not g.ready() for g in feeding))
        pool = gevent.pool.Pool(op_pool().maxsize)
        jobs: list[gevent.Greenlet] = []
        try:
            streamed = self.events.streamed
            for a, b, x in blocks:
                jobs.append(pool.spawn(run_in, op_pool(), one, a, b, x))
                streamed["blocks"] += 1
                if any(not g.ready() for g in feeding):
                    streamed["early_blocks"] += 1
                for g in jobs:
                    if g.ready() and not g.successful():
                        raise g.exception
            gevent.joinall(jobs, raise_error=True)
        except BaseException:
            pool.kill()
            raise
        timing["compute_s"] = sum(g.value[1] for g in jobs)
        timing["nbytes"] = (hi - lo) * row_bytes
        if not all(g.value[0] for g in jobs):
            return None
        self.events.streamed["units"] += 1
        timing["ours"] = 1.0  # our own array: the store keeps it without a copy
        return out

    def _rows_of(self, name: str, shift: int, wait_s: float | None
                 ) -> Callable[[int, int], np.ndarray[Any, Any]]:
        """Rows ``[a + shift, b + shift)`` of ``name`` from the pieces here now: a view of
        one piece, or the pieces' rows joined."""
        pieces = self._local_blocks(name, wait_s)

        def get(a: int, b: int) -> np.ndarray[Any, Any]:
            a, b = a + shift, b + shift
            for plo, phi, arr in pieces:
                if plo <= a and b <= phi:
                    return arr[a - plo : b - plo]
            parts, pos = [], a
            for plo, phi, arr in pieces:
                if plo <= pos < phi:
                    take = min(phi, b)
                    parts.append(arr[pos - plo : take - plo])
                    pos = take
            if pos < b:
                raise DatasetNotFound(f"rows [{pos}, {b}) of {name} are not on {self.node.name}")
            return np.concatenate(parts)
        return get

    def _empty_part(self, req: RunRequest) -> np.ndarray[Any, Any] | None:
        """A row block with no rows whose planned output is empty needs no op run (nor the
        broadcast operands, which the plan does not send there)."""
        ex = req.expect
        if req.mode != "part" or ex is None or math.prod(ex.shape) != 0:
            return None
        if not any(i.rows is not None and i.rows[0] == i.rows[1] for i in req.inputs):
            return None
        return np.empty(ex.shape, dtype=ex.dtype)

    @staticmethod
    def _off_loop(spec: Any, nbytes: int, fn: Callable[..., Any], args: tuple[Any, ...],
                  timing: dict[str, float]) -> Any:
        """Run op code in the thread pool, so heartbeats go on; a built-in op on small
        inputs runs right here (the thread hop would cost more than the op).  ``timing``
        gets the seconds it took and the input bytes."""
        t0 = time.monotonic()
        try:
            if nbytes <= INLINE_COMPUTE_BYTES and _builtin(spec):
                return fn(*args)
            return run_in(op_pool(), fn, *args)
        finally:
            timing["compute_s"], timing["nbytes"] = time.monotonic() - t0, nbytes

    def _compute(self, req: RunRequest, spec: Any, wait_s: float | None,
                 timing: dict[str, float]) -> Any:
        fn: Callable[..., Any]
        if req.mode == "combine":
            partials = [unpack_partial(self.local_rows(i.name, None, wait_s),
                                       self._lineage(i.name))
                        for i in req.inputs]
            return self._off_loop(spec, sum(_nbytes(p) for p in partials), combine_partials,
                                  (spec, partials, req.params), timing)
        ours = _builtin(spec)
        arrays = [self.local_rows(i.name, i.rows, wait_s, view=ours) for i in req.inputs]
        nbytes = sum(a.nbytes for a in arrays)
        runners: dict[str, Callable[..., Any]] = {
            "whole": apply, "part": run_rowwise_part, "partial": run_partial}
        fn = runners[req.mode]
        if req.mode == "partial":  # several row ranges of one input
            def partial(arrays: list[Any], params: dict[str, Any]) -> Any:
                first = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                return run_partial(spec, first, params)
            return self._off_loop(spec, nbytes, partial, (arrays, req.params), timing)
        if req.mode == "part" and spec.rows is not None:  # frames: where the block lies
            ref = req.inputs[0]
            if ref.rows is None or ref.total is None:
                raise OpError(f"op {req.op!r} selects rows: its row block needs its place "
                              "in the input (rows and total)")
            span = (ref.rows[0], ref.rows[1], ref.total)
            return self._off_loop(spec, nbytes, fn, (spec, arrays, req.params, span), timing)
        return self._off_loop(spec, nbytes, fn, (spec, arrays, req.params), timing)

    def _check(self, req: RunRequest, out: np.ndarray[Any, Any]) -> None:
        """The real output must be what the plan's output model said: an op whose output
        size depends on the data (a filter, say) would otherwise break later steps."""
        ex = req.expect
        if ex is None or (out.shape == ex.shape and out.dtype == ex.dtype):
            return
        # suggest only what the op does not declare already
        spec = self.registry.get(req.op)
        if spec.out_shape is not None:
            declare = "correct its declared out_shape="
        else:
            declare = "give out_shape=" + (" and out_dtype=" if spec.out_dtype is None else "")
        if spec.kind != "global":
            fix = f"declare it kind='global' or {declare}"
        else:
            fix = ("it is kind='global' already, and inference assumes each output dimension "
                   f"is affine in its inputs' row counts: {declare} (a function of the input "
                   "shapes)")
        raise OpError(
            f"op {req.op!r} on {self.node.name} returned shape {out.shape} {out.dtype} for "
            f"{req.out} but its output model (inferred from small samples) expected "
            f"{ex.shape} {ex.dtype}: its output size must not depend on the data values; "
            + fix)

    def _lineage(self, name: str) -> dict[str, Any]:
        recs = self.node.store.named(name)
        if not recs:
            raise DatasetNotFound(f"partial {name} is not on {self.node.name}")
        return recs[0].lineage

    def _versions(self, name: str) -> dict[str, Any]:
        """The versions and whole-dataset checksum an input has as the op reads it (a saved
        result's lineage records them, see :mod:`hpcflow.catalog.lineage`)."""
        try:
            parts = self.node.catalog.locate(name).parts
        except DatasetNotFound:
            return {"versions": []}
        return {"versions": sorted({h.version for p in parts for h in p.holders}),
                "checksum": source_digest((p.part, p.holders[0].checksum) for p in parts)}
