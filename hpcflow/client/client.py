"""The script API: ``hpcflow.connect(address)`` returns a :class:`Client`.

Metadata calls go over RPC (zerorpc's protocol) to the node you connected to, which answers
from its replicated catalog.  Dataset bytes never go over RPC: ``put``
uploads to the connected node's bulk channel, ``fetch`` pulls every part
straight from a live holder's bulk channel, verifying checksums.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .._version import __version__
from ..catalog.chunking import DEFAULT_CHUNK_BYTES, Payload
from ..catalog.lineage import Lineage
from ..catalog.record import (
    DatasetRecord,
    validate_flag,
    validate_name,
    validate_nparts,
    validate_part,
)
from ..config import normalize_endpoint, timeout_scale
from ..errors import (
    AuthenticationError,
    DatasetNotFound,
    HpcflowError,
    InvalidData,
    PeerUnavailable,
    ProtocolError,
    StoreError,
    with_context,
)
from ..h5md import AXES, MAX_AXIS_ROWS, unpack_axis, write_element
from ..rpc import auth
from ..rpc.bulk import BulkClient, BulkSettings, Deliver, from_holders
from ..rpc.calls import new_client, refuses_connections
from ..rpc.traffic import Traffic
from ..sources import open_source, parse_rows, row_range, source_metadata
from ..wire import unencodable
from . import lineage as lineage_calls
from .flow import Flow, Handle
from .lazy import LazyArray

#: ``progress(done_bytes, total_bytes)``, for put, put_split, fetch and fetch_to alike.
Progress = Callable[[int, int], None]
log = logging.getLogger("hpcflow.client")
#: How long ``delete(all_parts=True)`` waits for the connected node's catalog to show it.
DELETE_SETTLE_S = 2.0


class Client:
    """A connection to one hpcflow node.  Use as a context manager or call :meth:`close`."""

    def __init__(self, address: str, *, timeout_s: float = 30.0,
                 settings: BulkSettings | None = None, keep: bool = False,
                 objective: str = "bytes", keys: str | os.PathLike[str] | None = None) -> None:
        keep = validate_flag(keep, "keep")  # keep="no" would keep every output
        self.endpoint = normalize_endpoint(address)
        self.timeout_s = _seconds("timeout_s", timeout_s) * timeout_scale()
        self.keys = auth.load(keys, auth.CLIENT)  # keys=None: $HPCFLOW_KEYS, else none
        _refuse_fast(self.endpoint, address)
        self.ctx = auth.context(self.keys)
        self._rpc = new_client(self.endpoint, self.timeout_s,
                               context=self.ctx if self.keys is not None else None)
        self.traffic = Traffic()
        self.flow = Flow(self, keep=keep, objective=objective)
        self._dead: set[str] = set()
        self._dead_checked = float("-inf")
        try:
            hello = self._call("info")
        except PeerUnavailable:
            self.close()
            raise PeerUnavailable(f"no hpcflow node answers at {address} "
                                  "(is `hpcflow node` running there?)") from None
        except AuthenticationError:
            self.close()
            raise
        self.node = str(hello["name"])
        self.node_bulk = str(hello["endpoints"]["bulk"])
        self.bulk = BulkClient(self.ctx, self.traffic, f"client@{self.node}",
                               settings or BulkSettings(timeout_s=self.timeout_s),
                               is_alive=self._peer_alive)

    #: Calls that may legitimately run for hours; the RPC heartbeat still notices a
    #: dead node, so they need no request timeout of their own.
    LONG_CALLS = frozenset({"execute", "replicate", "save", "cleanup"})

    def _call(self, method: str, *args: Any) -> Any:
        timeout = 24 * 3600.0 if method in self.LONG_CALLS else None
        return self._rpc.call(method, *args, timeout=timeout)

    def _peer_alive(self, name: str) -> bool:
        """Asked by a silent transfer: has our node's catalog declared ``name`` dead?
        (At most one ``info`` call a second.)"""
        now = time.monotonic()
        if now - self._dead_checked >= 1.0:
            self._dead_checked = now
            try:
                info = self._rpc.call("info", timeout=min(2.0, self.timeout_s))
                self._dead = set(info.get("peers_dead", ()))
            except HpcflowError:
                self._dead = set()  # cannot tell: the transfer's own timeout decides
        return name not in self._dead

    def close(self) -> None:
        """Remove the flow's intermediate outputs (unless kept), then disconnect."""
        try:
            self.flow.close()
        except HpcflowError as exc:  # never mask the caller's own error on the way out
            log.warning("could not remove the flow's intermediate outputs: %s", exc)
        finally:
            self._rpc.close()
            self.ctx.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workflows ------------------------------------------------------------------
    def run(self, op: str, *inputs: Handle | str, **params: Any) -> Handle:
        """A lazy handle for ``op(*inputs, **params)``; inputs are dataset names or handles."""
        return self.flow.run(op, *inputs, **params)

    def submit(self, op: str, *inputs: Handle | str, **params: Any) -> Handle:
        """Like :meth:`run` but starts executing at once, without waiting: submit many
        independent ops, then ``hpcflow.gather(handles)`` or ``handle.fetch()``."""
        return self.flow.submit(op, *inputs, **params)

    def explain(self, handle: Handle, method: str = "optimal") -> str:
        """The plan for what ``handle`` still needs, per step, with bytes and reasons."""
        return self.flow.explain(handle, method)

    def report(self) -> dict[str, Any]:
        """Planned vs actually moved bytes per link for this flow."""
        return self.flow.report()

    def lineage(self, name: str) -> Lineage | None:
        """How saved dataset ``name`` was derived, back to the datasets that were put
        (None for a dataset that was put); ``"\n".join(lin.render(name))`` draws the
        tree, as ``hpcflow lineage`` prints it."""
        return lineage_calls.lineage(self, name)

    def recompute(self, name: str) -> dict[str, Any]:
        """Re-derive the parts of saved dataset ``name`` whose holders are gone, from its
        lineage; :class:`~hpcflow.errors.InputChanged` or
        :class:`~hpcflow.errors.InputMissing` (naming the input) if an input is not the
        data it was derived from.  Returns ``restored`` (the parts written), ``moved``
        and the recomputing flow's ``report``."""
        return lineage_calls.recompute(self, name)

    # -- metadata -----------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return dict(self._call("ping"))

    def info(self) -> dict[str, Any]:
        return dict(self._call("info"))

    def catalog(self, include_dead: bool = False) -> list[DatasetRecord]:
        """Every dataset part on every live node (or every known node)."""
        reply = self._call("catalog", include_dead)
        return sorted((DatasetRecord.from_wire(d) for d in reply["records"]),
                      key=lambda r: (r.name, -1 if r.part is None else r.part, r.owner))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._call("catalog", False)["nodes"])

    def locate(self, name: str) -> dict[str, Any]:
        return dict(self._call("locate", validate_name(name)))

    def wait_for(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Block until every part of ``name`` is on a live node; DatasetNotFound on timeout."""
        timeout_s = _seconds("timeout_s", timeout_s, allow_zero=True)
        return dict(self._rpc.call("wait", validate_name(name), timeout_s,
                                   timeout=timeout_s + self.timeout_s))

    def describe(self, name: str, part: int | None = None) -> dict[str, Any]:
        return dict(self._call("describe", validate_name(name), validate_part(part)))

    def metadata(self, name: str | Handle, rows: tuple[int, int] | None = None
                 ) -> dict[str, Any]:
        """H5MD metadata of ``name`` (a dataset or a flow's handle; rows ``[lo, hi)`` of
        it, default all): ``unit`` (of the values), ``element`` (its H5MD path when
        put), ``time_unit``, ``step`` and ``time`` (numpy arrays, one entry per row, or
        None), ``sources`` (file, path, rows per part) and ``of`` (for a per-frame op
        result: the dataset whose time axis it has).  See :mod:`hpcflow.h5md`."""
        if isinstance(name, Handle):
            name.flow._done(name)  # computed first, if need be
            name = name.name
        rng = _row_range(rows)
        if rng is None:
            shape = self._call("locate", validate_name(name))["shape"]
            rng = [0, shape[0] if shape else 1]
        pages = [metadata_from_wire(self._call("metadata", validate_name(name), [a, b]))
                 for a, b in _pages(*rng)]
        if len(pages) == 1:
            return pages[0]
        out = {**pages[0], "rows": rng}
        for k in AXES:  # an axis some rows lack is no axis
            got = [p[k] for p in pages]
            out[k] = None if any(g is None for g in got) else np.concatenate(got)
        return out

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def delete(self, name: str, part: int | None = None, *,
               all_parts: bool = False) -> Any:
        """Delete ``name`` (or its part ``part``) from the connected node, which must hold
        it; returns its record.  ``all_parts=True`` deletes every part of a split dataset
        (and every durable copy) from every holder, asking each one in turn, and returns
        their records, once the connected node's catalog no longer lists them (at most
        ``DELETE_SETTLE_S``); refused before anything is deleted while a holder is down.  A
        running flow's copies are left to it (they go when its script closes it)."""
        name = validate_name(name)
        if not validate_flag(all_parts, "all_parts"):
            return DatasetRecord.from_wire(self._call("delete", name, validate_part(part)))
        if part is not None:
            raise InvalidData("give part or all_parts=True, not both")
        return self._delete_everywhere(name)

    def _delete_everywhere(self, name: str) -> list[DatasetRecord]:
        # a running flow's copies are left to it: they go when its script closes it
        def held() -> list[DatasetRecord]:
            return [r for r in self.catalog(include_dead=True)
                    if r.name == name and not _flow_copy(r)]
        recs = held()
        if not recs:
            raise DatasetNotFound(f"{name} is held by no node (a running flow's copies of "
                                  "it go when that flow is closed)")
        nparts = max((r.nparts or 0 for r in recs), default=0)
        if len({r.part for r in recs if r.part is not None}) < nparts:
            # parts just put elsewhere may not have reached our node's catalog yet
            self.wait_for(name, self.timeout_s)
            recs = held()
        members = {n["name"]: n for n in self.nodes()}
        down = sorted({r.owner for r in recs if not members.get(r.owner, {}).get("alive")})
        if down:
            raise PeerUnavailable(f"{name} has parts on {', '.join(down)}, which "
                                  f"{'is' if len(down) == 1 else 'are'} not alive now: nothing "
                                  "deleted; retry once back (or rm --part K on each live holder)")
        out: list[DatasetRecord] = []
        for rec in recs:  # one RPC to each holder: it deletes its own copy, by the usual rules
            try:
                out.append(DatasetRecord.from_wire(self._call_on(
                    rec.owner, members[rec.owner]["rpc"], "delete", name, rec.part)))
            except HpcflowError as exc:
                if not out:
                    raise
                done = ", ".join(f"{r.key} on {r.owner}" for r in out)
                raise with_context(exc, f"{exc} (deleted already: {done}; rm --all-parts "
                                   "again deletes the rest)") from exc
        self._until_unlisted(name, {(r.owner, r.part) for r in out})
        return out

    def _until_unlisted(self, name: str, gone: set[tuple[str, int | None]]) -> None:
        """Return once the connected node's catalog no longer lists the copies of ``name``
        that other holders just deleted (at most ``DELETE_SETTLE_S``), so an ``ls`` right
        after ``rm --all-parts`` does not show them; the deletion itself is done."""
        import gevent

        gone = {g for g in gone if g[0] != self.node}
        deadline, pause = time.monotonic() + DELETE_SETTLE_S * timeout_scale(), 0.005
        while gone and time.monotonic() < deadline:
            listed = {(r.owner, r.part) for r in self.catalog(include_dead=True)
                      if r.name == name}
            if not gone & listed:
                return
            gevent.sleep(pause)  # the catalog's news has no event a client can wait on
            pause = min(2 * pause, 0.1)

    def _call_on(self, node: str, endpoint: str, method: str, *args: Any) -> Any:
        """``method`` on the member ``node`` (our own node through our connection)."""
        if node == self.node:
            return self._call(method, *args)
        rpc = new_client(endpoint, self.timeout_s,
                         context=self.ctx if self.keys is not None else None)
        try:
            return rpc.call(method, *args)
        finally:
            rpc.close()

    def replicate(self, name: str, part: int | None = None) -> list[DatasetRecord]:
        """Ask the connected node to keep its own copy of ``name``."""
        return [DatasetRecord.from_wire(d)
                for d in self._call("replicate", validate_name(name), validate_part(part))]

    # -- data -------------------------------------------------------------------------
    def put(self, name: str, data: Any, *, part: int | None = None, nparts: int | None = None,
            dataset: str | None = None, rows: Any = None, overwrite: bool = False,
            lineage: dict[str, Any] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            progress: Progress | None = None) -> DatasetRecord:
        """Store ``data`` on the connected node and announce it to the cluster.

        ``data`` is a numpy array, a ``.npy`` path, an HDF5 path with ``dataset``
        naming the array inside it, or an open ``h5py.Dataset`` (or H5MD element
        group).  ``rows=(lo, hi)`` (or ``slice(lo, hi)``; ``hi`` None for the end)
        stores only rows ``[lo, hi)`` of it, reading nothing else.  ``part``/``nparts``
        make it one row-part of a dataset partitioned across nodes.  A file's path,
        HDF5 path and rows are recorded in the lineage (``source``), and an H5MD
        element's units, step and time (of those rows) are kept (:meth:`metadata`).
        ``progress(done_bytes, total_bytes)`` is called as the bytes are acknowledged.
        """
        validate_name(name)
        part = validate_part(part)
        nparts = validate_nparts(nparts, part)
        overwrite = validate_flag(overwrite, "overwrite")
        _check_lineage(lineage)
        _check_progress(progress)
        _check_chunk_bytes(chunk_bytes)
        src = open_source(data, dataset, rows)
        try:
            # a file's path and rows, H5MD units and times (of those rows)
            found, aux = _metadata(data, dataset, _span(rows, src.shape))
            return self.bulk.upload(
                self.node_bulk, self.node, name, src.shape, src.dtype, src.read,
                part=part, nparts=nparts, overwrite=overwrite,
                lineage={**(lineage or {}), **found},
                chunk_bytes=chunk_bytes, progress=progress, aux=aux)
        finally:
            src.close()

    def put_split(self, name: str, data: Any, *, nodes: list[str], nparts: int,
                  dataset: str | None = None, rows: Any = None, overwrite: bool = False,
                  lineage: dict[str, Any] | None = None,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  progress: Progress | None = None) -> list[DatasetRecord]:
        """Spread ``data``'s rows (or ``rows=(lo, hi)`` of them) over ``nodes`` as ``nparts``
        row-parts of ``name``: part ``k`` holds rows ``[k*R//nparts, (k+1)*R//nparts)`` of
        the ``R`` rows and goes to ``nodes[k % len(nodes)]``, streamed from the source
        straight to that node's bulk channel.  ``progress(done_bytes, total_bytes)``
        counts all parts.  If a part fails, the parts already stored are deleted again
        and the error is raised: nothing of the put remains.  Returns once the connected
        node's catalog has every part (so the next call through it sees them all)."""
        validate_name(name)
        nparts_ = validate_nparts(nparts, 0)
        if nparts_ is None:
            raise InvalidData("nparts must be given: how many parts to split the rows into")
        if (not isinstance(nodes, list | tuple) or not nodes
                or not all(isinstance(n, str) for n in nodes)):
            raise InvalidData(f"nodes must be a non-empty list of node names, got {nodes!r}")
        if len(set(nodes)) != len(nodes):
            raise InvalidData(f"nodes lists a node twice: {list(nodes)}")
        overwrite = validate_flag(overwrite, "overwrite")
        _check_lineage(lineage)
        _check_progress(progress)
        _check_chunk_bytes(chunk_bytes)
        members = {n["name"]: n for n in self.nodes()}
        for n in nodes:
            if n not in members:
                raise InvalidData(f"no member is named {n!r} (members: "
                                  f"{', '.join(sorted(members))})")
            if not members[n]["alive"]:
                raise PeerUnavailable(f"{n} is not alive: cannot put a part there")
        if overwrite:  # parts the new layout would not replace: refused, nothing lost
            stale = sorted({"whole" if r.part is None else f"part {r.part}"
                            for r in self.catalog(include_dead=True)
                            if r.name == name and (r.part is None or r.part >= nparts_)})
            if stale:
                raise InvalidData(f"{name} has {', '.join(stale)} on the cluster, which "
                                  f"{nparts_} parts would not replace: delete it first "
                                  f"(rm {name} --all-parts)")
        src = open_source(data, dataset, rows)
        stored: list[DatasetRecord] = []
        try:
            if not src.shape:
                raise InvalidData(f"{src.origin} is a scalar: it has no rows to split")
            if src.shape[0] < nparts_:
                raise InvalidData(f"{src.origin} has {src.shape[0]} rows: too few for "
                                  f"nparts={nparts_} (every part needs a row)")
        except BaseException:
            src.close()
            raise
        total_rows = src.shape[0]
        total = math.prod(src.shape) * src.dtype.itemsize
        row_bytes = math.prod(src.shape[1:]) * src.dtype.itemsize
        first = (_span(rows, src.shape) or (0, 0))[0]  # the source's rows start here
        try:
            for k in range(nparts_):
                lo, hi = k * total_rows // nparts_, (k + 1) * total_rows // nparts_
                node = nodes[k % len(nodes)]
                sub = row_range(src, (lo, hi))
                shown = None if progress is None else _offset(progress, lo * row_bytes, total)
                # each part records its own rows of the file (and their H5MD step/time)
                found, aux = _metadata(data, dataset, (first + lo, first + hi))
                stored.append(self.bulk.upload(
                    members[node]["bulk"], node, name, sub.shape, sub.dtype, sub.read,
                    part=k, nparts=nparts_, overwrite=overwrite,
                    lineage={**(lineage or {}), **found},
                    chunk_bytes=chunk_bytes, progress=shown, aux=aux))
        except BaseException:
            for rec in stored:  # take back what was stored: no half-split dataset is left
                try:
                    self._call_on(rec.owner, members[rec.owner]["rpc"], "delete", name,
                                  rec.part)
                except HpcflowError as exc:
                    log.warning("could not delete part %s of %s from %s after the split put "
                                "failed: %s", rec.part, name, rec.owner, exc)
            raise
        finally:
            src.close()
        # the connected node's catalog hears of the other nodes' parts a moment later:
        # return once it has them all, so the next call through it sees the whole dataset
        self.wait_for(name, self.timeout_s)
        return stored

    def fetch(self, name: str, part: int | None = None,
              progress: Progress | None = None, *, out: Any = None,
              location: dict[str, Any] | None = None) -> Any:
        """The dataset (all parts, in row order, or one part) as a numpy array.

        ``out``, if given, is an existing C-contiguous writable array of the
        dataset's exact shape and dtype to fill instead of allocating a new one
        (a buffer reused across the frames of a loop skips the allocation, which
        for GiB-sized data costs as much as the transfer).  It is returned.  If
        the fetch fails part-way, ``out`` holds a mix of old and new bytes.
        ``location`` (a ``locate`` answer with bulk endpoints, as a workflow
        execution returns for its results) saves asking the node where the parts are.
        """
        _check_progress(progress)
        plan = self._parts(name, part, location)
        shape, dtype, total = plan[0], np.dtype(plan[1]), plan[2]
        if out is None:
            out = np.empty(shape, dtype=dtype)
            flat = out.reshape(-1).view(np.uint8)
            prefault(flat)
        else:
            flat = _destination(out, shape, dtype, name)

        def sink(base: int) -> Deliver:
            def deliver(i: int, off: int, buf: Payload, d: int) -> None:
                buf.copy_into(flat, base + off)
            return deliver

        self._pull_parts(plan[3], plan[4], sink, total, progress)
        return out

    def fetch_to(self, name: str, path: str | Path, *, part: int | None = None,
                 h5path: str | None = None, progress: Progress | None = None,
                 h5md: bool | None = None) -> Path:
        """Write the dataset into a new HDF5 file with bounded memory; atomic rename at the end.

        The array goes to ``h5path`` (default ``/data``).  As H5MD (``h5md=True``, the
        default for a ``.h5md`` file): an H5MD file with the dataset as the ``value`` of
        the element ``h5path`` (default: the element it was put from, else
        ``/observables/NAME``), with its step, time and units (see :mod:`hpcflow.h5md`)."""
        path = check_output_path(path)
        h5md = path.suffix == ".h5md" if h5md is None else validate_flag(h5md, "h5md")
        if not h5md:
            group, leaf = split_h5path("/data" if h5path is None else h5path)
        elif h5path is not None:
            split_h5path(h5path)  # a user error before anything moves
        _check_progress(progress)
        shape, dtype_s, total, parts, bulk = self._parts(name, part)
        dtype = np.dtype(dtype_s)
        tmp = partial_path(path)
        try:
            with h5py.File(tmp, "w") as f:
                if h5md:
                    lo = parts[0]["row_start"] if shape else 0
                    value, unit = h5md_layout(f, name, self.metadata(
                        name, (lo, lo + shape[0])) if shape else None, h5path, shape)
                    group, leaf = split_h5path(value)
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                if total:
                    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                grp = f.require_group(group)
                dsid = h5py.h5d.create(grp.id, leaf.encode(), h5py.h5t.py_create(dtype),
                                       h5py.h5s.create_simple(shape), dcpl=dcpl)
                offset = dsid.get_offset() if total else 0
                f[f"{group.rstrip('/')}/{leaf}"].attrs["hpcflow_name"] = name
                if h5md and unit:
                    f[f"{group.rstrip('/')}/{leaf}"].attrs["unit"] = unit
            fd = os.open(tmp, os.O_RDWR)
            try:
                def sink(base: int) -> Deliver:
                    def deliver(i: int, off: int, buf: Payload, d: int) -> None:
                        buf.pwrite(fd, offset + base + off)
                    return deliver
                self._pull_parts(parts, bulk, sink, total, progress)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:  # h5py and the syscalls: disk full, permissions ...
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {path}: {exc}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def array(self, name: str, *, location: dict[str, Any] | None = None) -> LazyArray:
        """A lazy view of dataset ``name``: ``shape``, ``dtype``, numpy indexing and
        ``__array__``, reading only the rows (and column span) indexed, straight from the
        parts' holders (see :mod:`hpcflow.client.lazy`).  Works with
        ``dask.array.from_array`` and xarray.  Unknown name: DatasetNotFound."""
        return LazyArray(self, name, location, prefault=prefault)

    def _parts(self, name: str, part: int | None,
               loc: dict[str, Any] | None = None) -> tuple[Any, ...]:
        part = validate_part(part)
        if loc is None:
            loc = self._call("locate", validate_name(name))
        parts = [p for p in loc["parts"] if part is None or p["part"] == part]
        if part is None and loc["missing"]:
            raise DatasetNotFound(f"{name}: parts {loc['missing']} are on no live node")
        if not parts:
            raise DatasetNotFound(f"{name} has no part {part} on any live node")
        rows = sum(p["row_stop"] - p["row_start"] for p in parts)
        shape = (rows, *loc["shape"][1:]) if loc["shape"] else ()
        total = sum(p["nbytes"] for p in parts)
        row_shape, dtype = list(loc["shape"][1:]), np.dtype(loc["dtype"])
        for p in parts:  # never fill a buffer from parts that do not tile it
            for h in p["holders"]:
                if list(h["shape"][1:]) != row_shape or h["dtype"] != dtype.str:
                    raise InvalidData(f"part {p['part']} of {name} on {h['owner']} has rows of "
                                      f"{h['shape'][1:]} {h['dtype']}, the dataset "
                                      f"{row_shape} {dtype.str}")
        if total != math.prod(shape) * dtype.itemsize:
            raise InvalidData(f"the parts of {name} hold {total} bytes, not the "
                              f"{math.prod(shape) * dtype.itemsize} of {list(shape)} {dtype}")
        return shape, loc["dtype"], total, parts, loc["bulk"]

    def _pull_parts(self, parts: list[dict[str, Any]], bulk: dict[str, str],
                    sink: Callable[[int], Deliver],
                    total: int, progress: Progress | None) -> None:
        base, done = 0, [0]
        for p in parts:
            holders = [DatasetRecord.from_wire(h) for h in p["holders"]]
            deliver = sink(base)
            if progress is not None:
                deliver = _counting(deliver, done, total, progress)

            def fetch(rec: DatasetRecord, endpoint: str | None, deliver: Deliver = deliver
                      ) -> int:
                assert endpoint is not None
                return self.bulk.fetch(endpoint, rec.owner, rec, deliver)

            # our node's copy first, then the others in the order the node gave them
            from_holders(holders, fetch, bulk.get, what=f"part {p['part']}", here=self.node)
            base += p["nbytes"]


def _seconds(what: str, value: Any, allow_zero: bool = False) -> float:
    """A duration from the caller: a finite number of seconds (NaN would wait forever)."""
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise InvalidData(f"{what} must be a finite number of seconds "
                          f"{'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _destination(out: Any, shape: tuple[int, ...], dtype: np.dtype[Any], name: str) -> Any:
    """``out`` as a flat byte view, or InvalidData saying why it cannot hold ``name``."""
    if not isinstance(out, np.ndarray):
        raise InvalidData(f"out must be a numpy array, not {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise InvalidData(f"out is {list(out.shape)} {out.dtype.str} but {name} is "
                          f"{list(shape)} {dtype.str}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidData("out must be C-contiguous and writeable")
    return out.reshape(-1).view(np.uint8)


def split_h5path(h5path: str) -> tuple[str, str]:
    """``(group, dataset name)`` of an HDF5 dataset path; ``data`` means ``/data``."""
    if not isinstance(h5path, str) or h5path.endswith("/") or not h5path.strip("/"):
        raise InvalidData(f"HDF5 path {h5path!r} must name a dataset, like /data or "
                          "/group/data")
    names = h5path.strip("/").split("/")
    if any(n in ("", ".", "..") for n in names):
        raise InvalidData(f"HDF5 path {h5path!r} has an empty, '.' or '..' component")
    return "/" + "/".join(names[:-1]), names[-1]


def check_output_path(path: str | Path) -> Path:
    """An output file path whose directory exists and that is not itself a directory."""
    if not isinstance(path, str | os.PathLike):
        raise InvalidData(f"output path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise InvalidData(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise InvalidData(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def partial_path(path: Path) -> Path:
    """Where a file being written goes until it is complete (renamed then): next to it,
    so the rename is atomic, and not hidden, so a leftover of a SIGKILLed writer is
    seen and obviously incomplete (SIGINT and SIGTERM remove it)."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def h5md_layout(f: h5py.File, name: str, meta: dict[str, Any] | None, element: str | None,
                shape: tuple[int, ...]) -> tuple[str, str | None]:
    """Lay out file ``f`` as H5MD around dataset ``name`` (``meta``: its metadata for the
    rows written) and return where its ``value`` goes and its unit.  H5MD requires a
    step per frame: without one known, frames are numbered from 0."""
    meta = meta or {}
    if element is None:
        element = meta.get("element") or f"/observables/{name}"
    elif element.rstrip("/").endswith("/value"):
        element = element.rstrip("/")[: -len("/value")]
    if not shape:
        raise InvalidData(f"{name} is a scalar: an H5MD element has one row per frame")
    step = meta.get("step")
    return write_element(f, element, np.arange(shape[0]) if step is None else step,
                         meta.get("time"), meta.get("time_unit"),
                         creator_version=__version__), meta.get("unit")


def _pages(lo: int, hi: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` in ranges one metadata reply can carry."""
    return [(a, min(hi, a + MAX_AXIS_ROWS)) for a in range(lo, hi, MAX_AXIS_ROWS)] or [(lo, hi)]


def _row_range(rows: object) -> list[int] | None:
    if rows is None:
        return None
    if (not isinstance(rows, list | tuple) or len(rows) != 2 or not all(
            isinstance(r, int | np.integer) and not isinstance(r, bool) for r in rows)):
        raise InvalidData(f"rows must be (lo, hi), got {rows!r}")
    return [int(rows[0]), int(rows[1])]


def metadata_from_wire(d: Any) -> dict[str, Any]:
    """A ``metadata`` answer with its step and time as numpy arrays."""
    if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or len(d["rows"]) != 2:
        raise ProtocolError("malformed metadata reply")
    n = int(d["rows"][1]) - int(d["rows"][0])
    return {**d, **{k: unpack_axis(d.get(k), n, k) for k in AXES}}


def _check_lineage(lineage: object) -> None:
    if lineage is None:
        return
    if not isinstance(lineage, dict) or not all(isinstance(k, str) for k in lineage):
        raise InvalidData(f"lineage must be a dict with str keys, got {type(lineage).__name__}")
    why = unencodable(lineage)
    if why is not None:
        raise InvalidData(f"lineage cannot be sent ({why}): use numbers, strings, booleans, "
                          "lists and dicts")


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise InvalidData(f"progress must be a callable(done_bytes, total_bytes) or None, got "
                          f"{type(progress).__name__}")


def _check_chunk_bytes(chunk_bytes: object) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise InvalidData(f"chunk_bytes must be an int, got {type(chunk_bytes).__name__}")


def _flow_copy(rec: DatasetRecord) -> bool:
    """A copy (or output) a flow made and does not keep: only its flow removes it."""
    tag = rec.lineage.get("flow")
    return isinstance(tag, dict) and not tag.get("keep")


def _span(rows: Any, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The row range ``rows`` (checked already) of a source that ``open_source`` cut to
    ``shape``, as ``(lo, hi)`` of the whole source; None when no range was given."""
    if rows is None:
        return None
    lo = parse_rows(rows)[0]
    return lo, lo + (shape[0] if shape else 0)


def _metadata(data: Any, dataset: str | None, rows: tuple[int, int] | None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`source_metadata` of a put's source (an H5MD element group given as an open
    h5py object: of its ``value`` dataset)."""
    if isinstance(data, h5py.Group) and isinstance(data.get("value"), h5py.Dataset):
        data = data["value"]
    return source_metadata(data, dataset, rows)


def _offset(progress: Progress, base: int, total: int) -> Progress:
    """``progress`` of one part's bytes as bytes of the whole (the part starts at ``base``)."""
    def shown(done: int, _part_total: int) -> None:
        progress(base + done, total)
    return shown


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_PREFAULT_MIN = 64 << 20


def prefault(buf: np.ndarray[Any, Any]) -> None:
    """Fault in a large fresh array's pages on a worker thread, overlapping the transfer.

    First-touch page faults of a GiB-sized result cost 0.1-2 s here, serialised with
    the copies of arriving chunks; MADV_POPULATE_WRITE allocates the pages without
    touching their contents, so it is safe while chunks are being written.
    """
    if buf.nbytes < _PREFAULT_MIN or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    addr = buf.ctypes.data
    start = addr & ~(page - 1)
    length = buf.nbytes + (addr - start)

    def populate() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE)

    threading.Thread(target=populate, name="prefault", daemon=True).start()


def _refuse_fast(endpoint: str, address: str) -> None:
    """Fail at once when nothing listens (ZeroMQ would keep retrying until the timeout)."""
    if refuses_connections(endpoint):
        raise PeerUnavailable(f"no hpcflow node answers at {address}: connection refused "
                              "(is `hpcflow node` running there?)")


def _counting(deliver: Deliver, done: list[int], total: int, progress: Progress) -> Deliver:
    def counted(i: int, off: int, buf: Payload, d: int) -> None:
        deliver(i, off, buf, d)
        done[0] += buf.nbytes
        progress(done[0], total)
    return counted


def connect(address: str = "127.0.0.1:7101", **kw: Any) -> Client:
    """Connect to the hpcflow node at ``address`` (``HOST:PORT``, ``tcp://`` or ``ipc://``).

    ``keys=KEYDIR`` (default ``$HPCFLOW_KEYS``) authenticates with the cluster's client
    key; a node with other keys, or none, refuses at once with ``AuthenticationError``."""
    if not isinstance(address, str):
        raise InvalidData("address must be a string like '127.0.0.1:7101'")
    return Client(address, **kw)
