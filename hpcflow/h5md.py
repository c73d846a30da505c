"""H5MD in and out: an element's units and time axis when it is put, a valid element on get.

An H5MD *time-dependent element* is a group holding ``value`` (frames first),
``step`` and optionally ``time``; ``step``/``time`` are either one entry per
frame or a scalar (a fixed interval) with an ``offset`` attribute, frame *i*
then being at ``offset + i * interval``.  Units are the ``unit`` attributes of
``value`` and ``time``.

What ``put`` keeps of an element, for the rows it stores:

* in the record's lineage (it travels in every catalog message, so it stays
  small): ``h5md`` = ``{"element", "unit", "step": AXIS, "time": AXIS}`` where
  AXIS is ``{"form": "array", "dtype"}`` (the entries are kept beside the
  data, see below), ``{"form": "linear", "dtype", "offset", "every"}`` (the
  scalar form, its offset moved to the first row stored) and ``time`` also has
  its ``unit``;
* in the node's store file beside the data, the per-frame arrays
  (``/aux/step``, ``/aux/time``): 100 000 frames of them are 1.6 MB, which do
  not belong in catalog messages.

A per-frame result (a ``rowwise`` op's output, one row per input row) has
``axis`` = ``{"of": NAME, "rows": [lo, hi], "versions": [...], "time_unit"}``
in its lineage: its rows are rows ``lo..hi`` of the put dataset ``NAME``,
whose time axis it shares (nothing is copied).

This module is pure (h5py and numpy only): the client, the CLI and the daemon use it.
"""

from __future__ import annotations

import math
from typing import Any

import h5py
import numpy as np

from .catalog.record import validate_dtype
from .errors import InvalidData, ProtocolError

#: The per-frame arrays an element may have, in the order they are stored.
AXES = ("step", "time")
#: H5MD version written (``/h5md`` ``version`` attribute).
H5MD_VERSION = (1, 1)
#: Longest unit string or element path kept.
MAX_TEXT = 256
#: Entries of a per-frame axis one metadata reply carries at most (the step and time of
#: this many frames, 16 bytes a frame, stay under the RPC's 15 MiB).
MAX_AXIS_ROWS = 900_000


def _text(v: Any, what: str) -> str | None:
    """An HDF5 string attribute as a str (None when absent)."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise InvalidData(f"{what} must be a string attribute, got {type(v).__name__}")
    if len(v) > MAX_TEXT:
        raise InvalidData(f"{what} is longer than {MAX_TEXT} characters")
    return v


def _number(v: Any, what: str) -> int | float:
    """A scalar interval or offset as a plain Python number (msgpack cannot send numpy's)."""
    a = np.asarray(v)
    if a.shape != () or a.dtype.kind not in "iuf":
        raise InvalidData(f"{what} must be a scalar number, got {a.dtype} {list(a.shape)}")
    x = a.item()
    if isinstance(x, float) and not math.isfinite(x):
        raise InvalidData(f"{what} is not finite ({x})")
    return x


def element_of(ds: h5py.Dataset) -> h5py.Group | None:
    """The H5MD element ``ds`` is the ``value`` of (its parent group), or None."""
    if not ds.name or not ds.name.endswith("/value") or ds.parent.name == "/":
        return None
    return ds.parent


def read_element(ds: h5py.Dataset, rows: tuple[int, int] | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]] | None:
    """What an H5MD element keeps for rows ``[lo, hi)`` (default all) of its ``value``
    ``ds``: ``(h5md lineage entry, per-frame arrays to store beside the data)``, or
    None when ``ds`` is not the value of an element.

    A malformed element (a ``step`` of another length than ``value``'s frames, a
    non-numeric axis, a unit that is no string) is :class:`InvalidData`: an axis
    silently dropped or misaligned would be lost without a word.
    """
    el = element_of(ds)
    if el is None:
        return None
    where = f"{el.file.filename}:{el.name}"
    frames = int(ds.shape[0]) if ds.shape else 0
    lo, hi = rows if rows is not None else (0, frames)
    if not 0 <= lo <= hi <= frames:
        raise InvalidData(f"rows [{lo}, {hi}) outside {where} ({frames} frames)")
    meta: dict[str, Any] = {"element": el.name[:MAX_TEXT],
                            "unit": _text(ds.attrs.get("unit"), f"{where}/value unit")}
    aux: dict[str, np.ndarray[Any, Any]] = {}
    for key in AXES:
        try:
            obj = el.get(key)
        except (KeyError, RuntimeError, OSError) as exc:  # dangling links and the like
            raise InvalidData(f"{where}/{key} cannot be opened: {exc}") from None
        if obj is None:
            continue
        if not isinstance(obj, h5py.Dataset) or obj.shape is None:
            raise InvalidData(f"{where}/{key} is not a dataset with data: not a valid H5MD "
                              "element")
        try:
            dt = validate_dtype(obj.dtype)
        except InvalidData:
            raise InvalidData(f"{where}/{key} has dtype {obj.dtype}, not a number") from None
        if dt.kind not in "iuf" or dt.itemsize > 8:  # 8 bytes: see MAX_AXIS_ROWS
            raise InvalidData(f"{where}/{key} has dtype {dt}, not an integer or float of "
                              "at most 64 bits")
        axis: dict[str, Any] = {"dtype": dt.str}
        if obj.shape == ():  # a fixed interval: frame i at offset + i * interval
            every = _number(obj[()], f"{where}/{key}")
            offset = _number(obj.attrs.get("offset", 0), f"{where}/{key} offset")
            axis.update(form="linear", every=every, offset=offset + lo * every)
        elif obj.ndim == 1 and obj.shape[0] == frames:
            try:
                aux[key] = np.ascontiguousarray(obj[lo:hi], dtype=dt)
            except (OSError, ValueError) as exc:
                raise InvalidData(f"{where}/{key}: read failed ({exc})") from exc
            axis["form"] = "array"
        else:
            raise InvalidData(f"{where}/{key} has shape {list(obj.shape)} but value has "
                              f"{frames} frames: not a valid H5MD element")
        if key == "time":
            axis["unit"] = _text(obj.attrs.get("unit"), f"{where}/time unit")
        meta[key] = axis
    return meta, aux


def axis_values(axis: Any, rows: int, stored: np.ndarray[Any, Any] | None, start: int = 0
                ) -> np.ndarray[Any, Any] | None:
    """Entries ``start .. start + rows`` of one axis of an ``h5md`` lineage entry: the
    stored array (those entries already), or the linear form expanded; None when the
    entry has no such axis.  The entry comes from the catalog (any client may have
    written it): malformed is :class:`InvalidData`."""
    if axis is None:
        return None
    if not isinstance(axis, dict) or axis.get("form") not in ("array", "linear"):
        raise InvalidData(f"malformed H5MD axis {str(axis)[:80]}")
    dt = validate_dtype(axis.get("dtype"))
    if axis["form"] == "array":
        if stored is None:
            raise InvalidData("the record says its axis is stored beside the data, "
                              "but it is not there")
        if stored.shape != (rows,):
            raise InvalidData(f"stored axis has {list(stored.shape)} entries, not {rows}")
        return stored
    every = _number(axis.get("every"), "axis interval")
    offset = _number(axis.get("offset"), "axis offset")
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= MAX_AXIS_ROWS:
        raise InvalidData(f"an axis has at most {MAX_AXIS_ROWS} entries here, not {rows!r}")
    ramp: np.ndarray[Any, Any] = np.arange(start, start + rows,
                                           dtype=np.float64 if dt.kind == "f" else np.int64)
    return np.asarray(ramp * every + offset).astype(dt)


def pack_axis(arr: np.ndarray[Any, Any] | None) -> dict[str, Any] | None:
    """An axis as msgpack-safe ``{"dtype", "data"}`` (None stays None)."""
    if arr is None:
        return None
    a = np.ascontiguousarray(arr)
    return {"dtype": a.dtype.str, "data": a.tobytes()}


def unpack_axis(d: Any, rows: int, what: str) -> np.ndarray[Any, Any] | None:
    """An axis as packed by :func:`pack_axis` (from a peer or a node): checked."""
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("data"), bytes):
        raise ProtocolError(f"malformed {what}")
    dt = validate_dtype(d.get("dtype"))
    if dt.kind not in "iuf" or dt.itemsize > 8 or len(d["data"]) != rows * dt.itemsize:
        raise ProtocolError(f"{what} is not {rows} numbers")
    return np.frombuffer(d["data"], dtype=dt).copy()


def write_element(f: h5py.File, element: str,
                  step: np.ndarray[Any, Any] | None, time: np.ndarray[Any, Any] | None,
                  time_unit: str | None, *, author: str = "N/A",
                  creator_version: str = "") -> str:
    """Lay out an H5MD file around one time-dependent element; returns the path of its
    ``value``, which the caller creates (and fills, and gives its ``unit``).

    ``/h5md`` gets ``version`` and ``author``/``creator``; an element under
    ``/particles/GROUP`` gets the ``box`` group H5MD requires there (``dimension`` 3,
    no boundary known: ``none``), as MDAnalysis' reader expects.  H5MD requires ``step``
    for time-dependent data: the caller numbers the frames when it knows no steps.
    """
    parts = [p for p in element.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise InvalidData(f"H5MD element path {element!r} must name a group, like "
                          "/particles/trajectory/position")
    h = f.require_group("h5md")
    h.attrs["version"] = np.asarray(H5MD_VERSION, dtype=np.int32)
    h.require_group("author").attrs["name"] = author
    creator = h.require_group("creator")
    creator.attrs["name"] = "hpcflow"
    creator.attrs["version"] = creator_version
    el = f.require_group("/" + "/".join(parts))
    if len(parts) >= 2 and parts[0] == "particles":
        box = f.require_group(f"/particles/{parts[1]}/box")
        box.attrs["dimension"] = np.int32(3)
        box.attrs["boundary"] = np.asarray([b"none"] * 3, dtype="S8")
    if step is not None:
        el.create_dataset("step", data=step)
    if time is not None:
        t = el.create_dataset("time", data=time)
        if time_unit:
            t.attrs["unit"] = time_unit
    return f"{el.name}/value"


__all__ = ["AXES", "MAX_AXIS_ROWS", "axis_values", "element_of", "pack_axis", "read_element",
           "unpack_axis", "write_element"]
