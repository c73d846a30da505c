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
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import numpy as np

from ..catalog.base import Location, PartLocation
from ..catalog.record import DatasetRecord, key_of
from ..errors import DatasetNotFound, InvalidData, PeerUnavailable
from ..ops import OpError, OpRegistry, apply, combine_partials, run_partial, run_rowwise_part
from ..rpc.bulk import from_holders
from ..rpc.messages import RunReply, RunRequest
from .datasets import Datasets
from .events import Events
from .learned import Learned
from .lifecycle import FlowBook, Janitor
from .parts import NodeParts
from .plancache import PlanCache
from .pools import op_pool, run_in
from .share import Shares

log = logging.getLogger("hpcflow.worker")


#: Inputs up to this many bytes are computed on the event loop: a thread hop costs more.
INLINE_COMPUTE_BYTES = 256 * 1024


def _nbytes(partial: Any) -> int:
    items = partial if isinstance(partial, tuple) else (partial,)
    return sum(int(np.asarray(x).nbytes) for x in items)


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
                   wait_s: float | None = None) -> np.ndarray[Any, Any]:
        """Rows ``[lo, hi)`` of ``name`` from local copies only (no network).

        Row offsets come from the catalog, so wait until it knows every part:
        parts made a moment ago on other nodes may still be on their way.
        Rows the plan expected here but that are gone (a copy another flow
        removed, say) are a :class:`DatasetNotFound`: the initiator re-plans.
        Big reads are copied piecewise, yielding between pieces.  ``wait_s``: how long
        to wait for the catalog to know the whole dataset (default the RPC timeout).
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
                if whole and (src is None or src in p.nodes or not self._slices(name, a, b, src)):
                    rec, used = self.datasets.replicate_part(p, prefer=src, lineage=tag)
                else:
                    rec, used = self._pull_slice(name, p, a, b, src, tag)
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
                    tag: dict[str, Any] | None) -> tuple[DatasetRecord, str]:
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

        def fetch(source: tuple[DatasetRecord, int], endpoint: str | None) -> None:
            rec, start = source
            assert endpoint is not None
            self.node.bulk_client.fetch_range(
                endpoint, rec.owner, rec, (glo - start) * row_bytes, (ghi - glo) * row_bytes,
                lambda k, off, buf, d: buf.copy_into(flat, off), piece)

        try:
            (used, _), _ = from_holders(
                sources, fetch, lambda owner: self.node.bulk_endpoints().get(owner),
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
    def run(self, req: RunRequest, wait_s: float | None = None) -> RunReply:
        """Run one unit of a plan on local rows; store and announce the checked output.
        Counted by op in :attr:`events` (a cancellation is no failure)."""
        t0 = time.monotonic()
        try:
            reply = self._run_unit(req, wait_s)
        except gevent.GreenletExit:
            raise
        except BaseException:
            self.events.op_failed(req.op)
            raise
        self.events.op_ran(req.op, time.monotonic() - t0)
        return reply

    def _run_unit(self, req: RunRequest, wait_s: float | None) -> RunReply:
        with self.busy():
            t0 = time.monotonic()
            timing: dict[str, float] = {"compute_s": 0.0, "nbytes": 0}
            spec = self.registry.get(req.op)
            if req.op_hash is not None and req.op_hash != spec.definition_hash:
                raise OpError(f"op {req.op!r} on {self.node.name} has a different definition "
                              "than the initiator's")
            result = self._empty_part(req)
            if result is None:
                result = self._compute(req, spec, wait_s, timing)
            lineage = {"op": req.op, "op_hash": spec.definition_hash, "params": req.params,
                       "mode": req.mode, "inputs": [
                           {"name": i.name, "rows": list(i.rows) if i.rows else None,
                            "versions": self._versions(i.name)} for i in req.inputs],
                       **req.lineage}
            if req.mode == "partial":
                result, how = pack_partial(result)
                lineage.update(how)
            else:
                self._check(req, np.asarray(result))
            arr = np.asarray(result)
            # An intermediate (kept only in memory) unless the flow keeps its outputs.
            keep = isinstance(req.lineage.get("flow"), dict) and req.lineage["flow"].get("keep")
            rec = self.node.store.put_array(req.out, arr, part=req.part, nparts=req.nparts,
                                            lineage=lineage, overwrite=True,
                                            chunk_bytes=self.node.config.chunk_bytes,
                                            volatile=not keep)
            times = (time.monotonic() - t0, timing["compute_s"], int(timing["nbytes"]))
            if req.mode == "partial" or arr.nbytes > req.inline:
                return RunReply(rec, None, *times)
            who = req.initiator
            if who is not None and who != self.node.name:
                self.node.traffic.sent(who, arr.nbytes)
            return RunReply(rec, np.ascontiguousarray(arr).tobytes(), *times)

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
            if nbytes <= INLINE_COMPUTE_BYTES and getattr(spec.fn, "__module__", "").startswith(
                    "hpcflow.ops."):
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
        arrays = [self.local_rows(i.name, i.rows, wait_s) for i in req.inputs]
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

    def _versions(self, name: str) -> list[int]:
        try:
            return sorted({h.version for p in self.node.catalog.locate(name).parts
                           for h in p.holders})
        except DatasetNotFound:
            return []
