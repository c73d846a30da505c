"""Where a put's data comes from: a numpy array, a ``.npy`` file, or a dataset in HDF5.

A source is read one chunk (hyperslab) at a time, so putting a file larger
than memory works.  H5MD trajectories are just HDF5: give the dataset path
(``/particles/all/position/value``); a group path that holds a ``value``
dataset (an H5MD time-dependent element) is accepted too, and so is an open
``h5py.Dataset`` (or H5MD element group) itself.  ``rows=(lo, hi)`` makes the
source rows ``[lo, hi)`` of the first axis: only those rows are ever read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .catalog.record import validate_dtype
from .errors import InvalidData
from .h5md import read_element


@dataclass
class Source:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    read: Callable[[tuple[int | slice, ...]], Any]
    close: Callable[[], None]
    origin: str


def open_source(data: Any, dataset: str | None = None, rows: Any = None) -> Source:
    """The source of a put: ``data`` (see the module docstring), restricted to rows
    ``[lo, hi)`` when ``rows`` is given; bad rows are InvalidData before anything is read."""
    src = _open(data, dataset)
    if rows is None:
        return src
    try:
        return row_range(src, rows)
    except BaseException:
        src.close()
        raise


def parse_rows(rows: Any) -> tuple[int, int | None]:
    """``rows`` as ``(lo, hi)``, ``hi`` None for "to the end": a pair of ints (``hi`` may be
    None), a ``slice`` without a step, or the command line's ``"LO:HI"`` (either side may
    be left out).  Negative or reversed bounds are InvalidData."""
    if isinstance(rows, str):
        lo_s, sep, hi_s = rows.partition(":")
        try:
            if not sep:
                raise ValueError
            pair: tuple[Any, Any] = (int(lo_s) if lo_s.strip() else 0,
                                     int(hi_s) if hi_s.strip() else None)
        except ValueError:
            raise InvalidData(f"rows {rows!r} must be LO:HI with integers, e.g. 0:666 (LO or HI "
                              "may be left out: 100: or :100)") from None
    elif isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise InvalidData(f"rows {rows!r} has a step: a put takes a contiguous row range "
                              "(select every k-th row afterwards with the frames op)")
        pair = (0 if rows.start is None else rows.start, rows.stop)
    elif isinstance(rows, tuple | list) and len(rows) == 2:
        pair = (rows[0], rows[1])
    else:
        raise InvalidData(f"rows must be (lo, hi), a slice or 'LO:HI', got {rows!r}")
    lo, hi = pair
    for what, v in (("lo", lo), ("hi", hi)):
        if v is None and what == "hi":
            continue
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise InvalidData(f"rows: {what} must be an integer, got {v!r}")
    lo, hi = int(lo), None if hi is None else int(hi)
    if lo < 0 or (hi is not None and hi < 0):
        raise InvalidData(f"rows {lo}:{'' if hi is None else hi}: bounds must be >= 0 "
                          "(row numbers from the start of the source)")
    if hi is not None and hi < lo:
        raise InvalidData(f"rows {lo}:{hi}: the end is before the start")
    return lo, hi


def row_range(src: Source, rows: Any) -> Source:
    """Rows ``[lo, hi)`` of ``src``: a source whose chunks read only those rows."""
    lo, hi = parse_rows(rows)
    if not src.shape:
        raise InvalidData(f"{src.origin} is a scalar: it has no rows to choose from")
    n = src.shape[0]
    hi = n if hi is None else hi
    if hi > n or lo > n:
        raise InvalidData(f"rows {lo}:{hi} are out of range: {src.origin} has {n} rows "
                          f"(0:{n})")
    inner = src.read

    def read(slab: tuple[int | slice, ...]) -> Any:
        first = slab[0]  # a chunk's slab: an int or a slice on the first axis, then the rest
        if isinstance(first, slice):
            start, stop = first.start or 0, hi - lo if first.stop is None else first.stop
            moved: int | slice = slice(start + lo, stop + lo)
        else:
            moved = first + lo
        return inner((moved, *slab[1:]))

    return Source((hi - lo, *src.shape[1:]), src.dtype, read, src.close,
                  f"{src.origin}[{lo}:{hi}]")


def _open(data: Any, dataset: str | None) -> Source:
    if isinstance(data, h5py.Dataset | h5py.Group):
        if dataset is not None:
            raise InvalidData(f"dataset={dataset!r} with an open h5py object: give the dataset "
                              "itself (f[path])")
        return _h5py_object(data)
    if dataset is not None and not isinstance(dataset, str):
        raise InvalidData(f"dataset must be a path inside an HDF5 file (a string), got "
                          f"{type(dataset).__name__}")
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.exists():
            raise InvalidData(f"{path}: no such file")
        if path.is_dir():
            raise InvalidData(f"{path} is a directory, not a .npy or HDF5 file")
        if path.suffix == ".npy":
            return _npy(path)
        return _hdf5(path, dataset)
    if dataset is not None:  # silently ignoring it would store something else than asked
        raise InvalidData(f"dataset={dataset!r} names an array inside an HDF5 file, but the "
                          f"data is a {type(data).__name__}, not a path to one")
    if isinstance(data, np.ma.MaskedArray):  # np.asarray would drop the mask silently
        raise InvalidData("masked arrays are not supported: the mask would be lost; store "
                          "arr.filled(value) and the mask (np.ma.getmaskarray(arr)) separately")
    if isinstance(data, np.ndarray) or np.isscalar(data) or isinstance(data, list | tuple):
        try:
            arr = np.asarray(data)
        except ValueError as exc:  # ragged lists
            raise InvalidData(f"cannot make an array of this {type(data).__name__}: {exc}"
                              ) from None
        validate_dtype(arr.dtype)
        return Source(arr.shape, arr.dtype, lambda slab: arr[slab], lambda: None, "array")
    raise InvalidData(f"cannot put a {type(data).__name__}: give a numpy array, a .npy path or "
                      "an HDF5 path with dataset=")


def _npy(path: Path) -> Source:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:  # numpy's word for an empty file
        raise InvalidData(f"{path}: empty file, not a .npy array") from None
    except (ValueError, OSError) as exc:
        raise InvalidData(f"{path}: not a readable .npy file ({exc})") from exc
    validate_dtype(arr.dtype)

    def read(slab: tuple[int | slice, ...]) -> Any:
        try:
            return np.array(arr[slab])
        except (ValueError, OSError) as exc:
            raise InvalidData(f"{path}: read failed ({exc}); is the file truncated?") from exc

    return Source(arr.shape, arr.dtype, read, lambda: None, str(path))


def _hdf5(path: Path, dataset: str | None) -> Source:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidData(f"{path}: cannot open as HDF5 ({exc}); truncated or not HDF5?") from exc
    try:
        return _dataset(_pick(f, path, dataset), str(path), f.close)
    except BaseException:
        f.close()
        raise


def _h5py_object(obj: h5py.Dataset | h5py.Group) -> Source:
    """An open h5py dataset (or H5MD element group) of the caller's: read in place, the
    file left open (it is the caller's)."""
    try:
        if not obj.id.valid:
            raise InvalidData("the h5py object is closed (its file was closed): open it again")
        path = obj.file.filename
    except (RuntimeError, ValueError, OSError) as exc:
        raise InvalidData(f"cannot use this h5py object: {exc}") from None
    if isinstance(obj, h5py.Group):
        value = obj.get("value")
        if not isinstance(value, h5py.Dataset):
            raise InvalidData(f"{path}:{obj.name} is a group, not a dataset (nor an H5MD "
                              "element with a value dataset)")
        obj = value
    return _dataset(obj, path, lambda: None)


def _dataset(ds: h5py.Dataset, path: str, close: Callable[[], None]) -> Source:
    dtype = validate_dtype(ds.dtype)
    if ds.shape is None:  # H5S_NULL: a dataset with a type but no data at all
        raise InvalidData(f"{path}:{ds.name} has a null dataspace (no data, not even "
                          "an empty array)")
    shape = tuple(int(n) for n in ds.shape)

    def read(slab: tuple[int | slice, ...]) -> Any:
        try:
            return ds[slab] if shape else ds[()]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidData(f"{path}:{ds.name}: read failed ({exc}); truncated file?") from exc

    return Source(shape, dtype, read, close, f"{path}:{ds.name}")


def _pick(f: h5py.File, path: Path, dataset: str | None) -> h5py.Dataset:
    found: list[str] = []
    f.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    if dataset is None:
        if len(found) == 1:
            return f[found[0]]
        listing = ", ".join(found[:20]) or "none"
        raise InvalidData(f"{path} holds {len(found)} datasets; choose one with --dataset "
                          f"(datasets: {listing})")
    try:
        obj = f[dataset]
        if isinstance(obj, h5py.Group) and isinstance(obj.get("value"), h5py.Dataset):
            return obj["value"]  # an H5MD element: its data is in "value"
    except (KeyError, ValueError):
        listing = ", ".join(found[:20]) or "none"
        raise InvalidData(f"{path} has no dataset {dataset!r} (datasets: {listing})") from None
    except (RuntimeError, OSError) as exc:  # a soft-link loop, a dangling external link ...
        raise InvalidData(f"{path}:{dataset} cannot be opened: {exc}") from None
    if not isinstance(obj, h5py.Dataset):
        raise InvalidData(f"{path}:{dataset} is a group, not a dataset")
    return obj


def source_metadata(data: Any, dataset: str | None = None,
                    rows: tuple[int, int] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a put of ``data`` records about where its rows came from, and the per-frame
    arrays to keep beside them: ``(lineage entries, aux arrays)``.

    Lineage: ``source`` = ``{"file", "path", "rows", "size", "mtime"}`` for a file or an
    open ``h5py.Dataset`` (the rows' checksum is the record's own: the xxh3-128 of
    exactly the rows read), and for an H5MD element also ``h5md`` (units, step and
    time: see :mod:`.h5md`).  ``rows`` (default all) is the row range put; step/time
    are cut to the same rows.  An array from memory records nothing.  Call after
    :func:`open_source` has accepted ``data``.
    """
    if isinstance(data, h5py.Dataset):
        return _dataset_metadata(data, _source_of(Path(data.file.filename)), rows)
    if not isinstance(data, str | Path):
        return {}, {}
    path = Path(data)
    source = _source_of(path)
    if path.suffix == ".npy":
        if rows is not None:
            source["rows"] = list(rows)
        return {"source": source}, {}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidData(f"{path}: cannot open as HDF5 ({exc})") from exc
    with f:
        return _dataset_metadata(_pick(f, path, dataset), source, rows)


def _source_of(path: Path) -> dict[str, Any]:
    path = path.resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise InvalidData(f"{path}: {exc}") from exc
    return {"file": str(path)[:4096], "size": st.st_size, "mtime": st.st_mtime}


def _dataset_metadata(ds: h5py.Dataset, source: dict[str, Any],
                      rows: tuple[int, int] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    frames = int(ds.shape[0]) if ds.shape else 1
    source["path"] = ds.name
    source["rows"] = list(rows) if rows is not None else [0, frames]
    lineage: dict[str, Any] = {"source": source}
    found = read_element(ds, rows) if ds.shape else None
    if found is None:
        return lineage, {}
    lineage["h5md"], aux = found
    return lineage, aux
