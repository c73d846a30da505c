"""A dataset's H5MD metadata, gathered by the node a client asks (``metadata`` RPC).

The small part (units, the element's path, the source file) is in each part's
record; a per-frame axis (step, time) is either in the record (the linear form)
or in the holder's store file beside the data (``Store.read_aux``), fetched from a
holder with the node-only ``aux`` call.  A per-frame op result points at the rows
of the put dataset it was computed from (``axis`` in its lineage, see
:func:`result_axis`) and takes their axis.  See :mod:`hpcflow.h5md`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..catalog.base import Catalog, Location
from ..catalog.record import DatasetRecord
from ..errors import DatasetNotFound, HpcflowError, InvalidData, PeerUnavailable, ProtocolError
from ..h5md import AXES, MAX_AXIS_ROWS, axis_values, pack_axis, unpack_axis
from .parts import NodeParts

log = logging.getLogger("hpcflow.h5md")

#: How many results deep an axis pointer may lead (a result's axis names a put dataset;
#: anything deeper is a forged or broken record).
MAX_DEPTH = 4


def _rows(loc: Location, rows: Any) -> tuple[int, int]:
    total = loc.shape[0] if loc.shape else 1
    if rows is None:
        return 0, total
    if (not isinstance(rows, list | tuple) or len(rows) != 2
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows)):
        raise InvalidData(f"rows must be [lo, hi], got {rows!r}")
    lo, hi = int(rows[0]), int(rows[1])
    if not 0 <= lo <= hi <= total:
        raise InvalidData(f"rows [{lo}, {hi}) outside {loc.name} ({total} rows)")
    return lo, hi


def local_aux(node: NodeParts, key: Any, version: Any, lo: Any, hi: Any) -> dict[str, Any]:
    """The ``aux`` call: rows ``[lo, hi)`` of the per-frame arrays this node keeps beside
    part ``key`` (version ``version``).  Refused when it keeps none (a replica)."""
    if not isinstance(key, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (version, lo, hi)):
        raise InvalidData("aux takes a part key, its version and a row range")
    aux = node.store.read_aux(key, version)
    if not aux:
        raise DatasetNotFound(f"{key} on {node.name} has no per-frame metadata beside it")
    if not 0 <= lo <= hi or hi - lo > MAX_AXIS_ROWS:
        raise InvalidData(f"rows [{lo}, {hi}): at most {MAX_AXIS_ROWS} per call")
    out = {}
    for k, arr in aux.items():
        if k in AXES:
            if hi > arr.shape[0]:
                raise InvalidData(f"rows [{lo}, {hi}) outside the {arr.shape[0]} of {key}")
            out[k] = pack_axis(arr[lo:hi])
    return out


def _stored(node: NodeParts, holders: tuple[DatasetRecord, ...], lo: int, hi: int
            ) -> dict[str, np.ndarray[Any, Any]]:
    """Rows ``[lo, hi)`` of a part's stored axes: from our store if we keep them, else
    from the first holder that does (replicas keep none)."""
    errors = []
    ordered = sorted(holders, key=lambda r: r.owner != node.name)
    for rec in ordered:
        try:
            if rec.owner == node.name:
                aux = node.store.read_aux(rec.key, rec.version)
                if not aux:
                    raise DatasetNotFound(f"{rec.key} on {node.name} has no per-frame "
                                          "metadata beside it")
                return {k: a[lo:hi] for k, a in aux.items() if k in AXES}
            endpoint = next((v.info.rpc for v in node.catalog.nodes()
                             if v.info.name == rec.owner and v.alive), None)
            if endpoint is None:
                raise PeerUnavailable(f"{rec.owner} is not alive")
            reply = node.peers.call(endpoint, "aux", rec.key, rec.version, lo, hi,
                                    timeout_s=node.config.rpc_timeout_s)
            if not isinstance(reply, dict):
                raise ProtocolError("aux reply must be a map")
            out = {}
            for k in AXES:
                arr = unpack_axis(reply.get(k), hi - lo, f"{k} of {rec.key} from {rec.owner}")
                if arr is not None:
                    out[k] = arr
            return out
        except HpcflowError as exc:
            errors.append(f"{rec.owner}: {exc}")
    raise DatasetNotFound("no holder has the per-frame metadata: " + "; ".join(errors))


def copy_axes(node: NodeParts, holders: tuple[DatasetRecord, ...]
              ) -> dict[str, np.ndarray[Any, Any]] | None:
    """The per-frame arrays a durable copy of a part keeps beside its data (taken from a
    holder that has them), or None when the part has none stored or no holder can
    send them (the copy is then made without: its metadata comes from the others)."""
    h5 = holders[0].lineage.get("h5md")
    if not isinstance(h5, dict) or not any(
            isinstance(h5.get(k), dict) and h5[k].get("form") == "array" for k in AXES):
        return None
    rows = holders[0].rows
    try:
        pages = [_stored(node, holders, a, min(rows, a + MAX_AXIS_ROWS))
                 for a in range(0, rows, MAX_AXIS_ROWS)] or [_stored(node, holders, 0, 0)]
    except HpcflowError as exc:
        log.warning("copy of %s made without its step/time: %s", holders[0].key, exc)
        return None
    return {k: np.concatenate([p[k] for p in pages]) for k in pages[0]}


def metadata(node: NodeParts, name: str, rows: Any = None, depth: int = 0) -> dict[str, Any]:
    """What the ``metadata`` call answers for rows ``rows`` (default all) of ``name``:
    ``{"name", "rows", "unit", "element", "time_unit", "step", "time", "sources",
    "of"}``; ``step``/``time`` packed (:func:`hpcflow.h5md.pack_axis`), None when some
    row has none."""
    if depth > MAX_DEPTH:
        raise InvalidData(f"{name}: its time axis points more than {MAX_DEPTH} datasets deep")
    loc = node.catalog.locate(name)
    if loc.missing:
        raise DatasetNotFound(f"{name}: parts {list(loc.missing)} are on no live node")
    lo, hi = _rows(loc, rows)
    if hi - lo > MAX_AXIS_ROWS:
        raise InvalidData(f"{name}: {hi - lo} rows asked, at most {MAX_AXIS_ROWS} per call: "
                          "ask for a row range (metadata(name, rows=(lo, hi)))")
    units, elements, time_units, sources, ofs = set(), set(), set(), [], set()
    axes: dict[str, list[np.ndarray[Any, Any]] | None] = {k: [] for k in AXES}
    for p in loc.parts:
        a, b = max(lo, p.row_start), min(hi, p.row_stop)
        if a >= b and not (lo == hi == p.row_start == p.row_stop):
            continue
        lineage = p.holders[0].lineage
        if isinstance(lineage.get("source"), dict):
            sources.append({"part": p.part, **lineage["source"]})
        got = _part_axes(node, p.holders, lineage, a - p.row_start, b - p.row_start, depth)
        units.add(got["unit"])
        elements.add(got["element"])
        time_units.add(got["time_unit"])
        ofs.add(got["of"])
        for k in AXES:
            have = axes[k]
            if have is not None:
                axes[k] = None if got[k] is None else [*have, got[k]]
    def one(values: set[Any], what: str) -> Any:
        if len(values) > 1:
            raise InvalidData(f"the parts of {name} disagree on their {what}: "
                              f"{sorted(map(str, values))}")
        return next(iter(values), None)
    joined = {k: (np.concatenate(v) if v else None) if v is not None else None
              for k, v in axes.items()}
    return {"name": name, "rows": [lo, hi], "unit": one(units, "unit"),
            "element": one(elements, "H5MD element"),
            "time_unit": one(time_units, "time unit"), "sources": sources,
            "of": one(ofs, "origin"),
            **{k: pack_axis(v) for k, v in joined.items()}}


def _part_axes(node: NodeParts, holders: tuple[DatasetRecord, ...], lineage: dict[str, Any],
               a: int, b: int, depth: int) -> dict[str, Any]:
    """Unit, element, time unit and rows ``[a, b)`` of step/time of one part."""
    out: dict[str, Any] = {"unit": None, "element": None, "time_unit": None, "of": None,
                           **{k: None for k in AXES}}
    axis = lineage.get("axis")
    if isinstance(axis, dict):  # a per-frame result: the rows of a put dataset
        of, span = axis.get("of"), axis.get("rows")
        if (not isinstance(of, str) or not isinstance(span, list) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or span[1] - span[0] != holders[0].rows):
            raise InvalidData(f"malformed time axis pointer in {holders[0].key}: "
                              f"{str(axis)[:120]}")
        versions, now = axis.get("versions"), _versions(node.catalog, of)
        if not now:
            raise DatasetNotFound(f"{of}, whose frames {holders[0].key} was computed from, "
                                  "is gone, and its time axis with it")
        if versions is not None and versions != now:
            raise InvalidData(f"{of} changed since {holders[0].key} was computed from it "
                              f"(versions {versions}, now {now}): its time axis is gone")
        src = metadata(node, of, [span[0] + a, span[0] + b], depth + 1)
        out.update(time_unit=src["time_unit"], of=src["of"] or of)
        for k in AXES:
            out[k] = unpack_axis(src[k], b - a, f"{k} of {of}")
        return out
    h5 = lineage.get("h5md")
    if not isinstance(h5, dict):
        return out
    out.update(unit=h5.get("unit"), element=h5.get("element"))
    stored: dict[str, np.ndarray[Any, Any]] | None = None
    for k in AXES:
        spec = h5.get(k)
        if spec is None:
            continue
        if isinstance(spec, dict) and spec.get("form") == "array":
            if stored is None:
                stored = _stored(node, holders, a, b)
            arr = stored.get(k)
            out[k] = axis_values(spec, b - a, arr)
        else:  # linear: the offset is this part's first row
            out[k] = axis_values(spec, b - a, None, start=a)
        if k == "time" and isinstance(spec, dict):
            out["time_unit"] = spec.get("unit")
    return out


def _versions(catalog: Catalog, name: str) -> list[int]:
    try:
        return sorted({h.version for p in catalog.locate(name).parts for h in p.holders})
    except DatasetNotFound:
        return []


def _origin(loc: Location, lo: int, hi: int) -> tuple[str, int, int] | None:
    """Rows ``[lo, hi)`` of dataset ``loc`` as one row range of a dataset with a time
    axis (itself, when it was put from an H5MD element; the dataset a per-frame result
    was computed from), or None."""
    name = loc.name
    found: tuple[str, int, int] | None = None
    for p in loc.parts:
        a, b = max(lo, p.row_start), min(hi, p.row_stop)
        if a >= b:
            continue
        lin = p.holders[0].lineage
        if isinstance(lin.get("h5md"), dict):
            piece = (name, a, b)
        elif isinstance(lin.get("axis"), dict) and isinstance(lin["axis"].get("of"), str):
            span = lin["axis"].get("rows")
            if not isinstance(span, list) or len(span) != 2 or not isinstance(span[0], int):
                return None
            base = span[0] - p.row_start
            piece = (lin["axis"]["of"], a + base, b + base)
        else:
            return None
        if found is None:
            found = piece
        elif found[0] == piece[0] and found[2] == piece[1]:
            found = (found[0], found[1], piece[2])
        else:
            return None  # not one contiguous range of one dataset
    return found if found is not None and found[2] - found[1] == hi - lo else None


def result_axis(catalog: Catalog, inputs: list[tuple[str, tuple[int, int] | None]],
                out_rows: int | None) -> dict[str, Any] | None:
    """The ``axis`` lineage entry of a rowwise op's output of ``out_rows`` rows computed
    from ``inputs`` (``(name, rows or None)``): the first input with that many rows and
    a time axis gives it.  None for anything else (a reduction never asks)."""
    if out_rows is None:
        return None
    for name, rows in inputs:
        try:
            loc = catalog.locate(name)
        except DatasetNotFound:
            continue
        if not loc.shape:
            continue
        lo, hi = rows if rows is not None else (0, loc.shape[0])
        if hi - lo != out_rows or len(loc.shape) < 1:
            continue
        found = _origin(loc, lo, hi)
        if found is not None:
            of, a, b = found
            return {"axis": {"of": of, "rows": [a, b], "versions": _versions(catalog, of)}}
    return None


__all__ = ["copy_axes", "local_aux", "metadata", "result_axis"]
