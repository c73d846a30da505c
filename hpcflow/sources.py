"""Where a put's data comes from: a numpy array, a ``.npy`` file, or a dataset in HDF5.

A source is read one chunk (hyperslab) at a time, so putting a file larger
than memory works.  H5MD trajectories are just HDF5: give the dataset path
(``/particles/all/position/value``); a group path that holds a ``value``
dataset (an H5MD time-dependent element) is accepted too.
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


def open_source(data: Any, dataset: str | None = None) -> Source:
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
        ds = _pick(f, path, dataset)
        dtype = validate_dtype(ds.dtype)
        if ds.shape is None:  # H5S_NULL: a dataset with a type but no data at all
            raise InvalidData(f"{path}:{ds.name} has a null dataspace (no data, not even "
                              "an empty array)")
        shape = tuple(int(n) for n in ds.shape)
    except BaseException:
        f.close()
        raise

    def read(slab: tuple[int | slice, ...]) -> Any:
        try:
            return ds[slab] if shape else ds[()]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidData(f"{path}:{ds.name}: read failed ({exc}); truncated file?") from exc

    return Source(shape, dtype, read, f.close, f"{path}:{ds.name}")


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
