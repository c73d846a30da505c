"""xarray over hpcflow datasets: ``xr.open_dataset("hpcflow://HOST:PORT/NAME", engine="hpcflow")``.

The dataset is one variable (named like the dataset) whose data is a
:class:`~hpcflow.client.lazy.LazyArray` behind xarray's ``BackendArray`` and
``LazilyIndexedArray``: nothing is read until values are asked for, and then
only the rows and column span selected (``.isel``, ``.sel`` on positions,
``.values``, or dask with ``chunks=``).

The engine is registered as the ``xarray.backends`` entry point ``hpcflow``
(``setup.cfg``); without the installed entry point pass the class itself,
``engine=HpcflowBackendEntrypoint``.  ``filename_or_obj`` is an
``hpcflow://`` URL (a client is connected for the dataset and closed with it)
or a :class:`LazyArray` already made (``c.array(name)``; its client stays
yours).  :func:`open_dataarray` gives the same lazy variable as a
``DataArray``.

This module imports xarray: it is imported only when xarray asks for the
engine or you import it.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from ..errors import InvalidData
from .client import connect
from .lazy import LazyArray

SCHEME = "hpcflow://"


class HpcflowBackendArray(BackendArray):
    """A lazy array as xarray's backend array: outer indexing with at most one vector
    (what numpy's own indexing gives the same answer for) goes straight to it; xarray
    does the rest in memory on what was read."""

    def __init__(self, array: LazyArray) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray[Any, Any]:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER_1VECTOR, self.array.__getitem__)


def parse_url(url: str) -> tuple[str, str]:
    """``hpcflow://HOST:PORT/NAME`` -> (``HOST:PORT``, ``NAME``); InvalidData otherwise."""
    if not isinstance(url, str) or not url.startswith(SCHEME):
        raise InvalidData(f"not an hpcflow URL (hpcflow://HOST:PORT/NAME): {url!r}")
    parts = urlsplit(url)
    name = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if not parts.netloc or not name or parts.query or parts.fragment:
        raise InvalidData(f"an hpcflow URL is hpcflow://HOST:PORT/NAME, not {url!r}")
    return parts.netloc, name


def _dims(array: LazyArray, dims: Any) -> tuple[str, ...]:
    if dims is None:
        return tuple(f"dim_{i}" for i in range(array.ndim))
    out = (dims,) if isinstance(dims, str) else tuple(dims)
    if len(out) != array.ndim or not all(isinstance(d, str) for d in out):
        raise InvalidData(f"dims must name the {array.ndim} axes of {array.name}, got {dims!r}")
    return out


def variable(array: LazyArray, dims: Any = None) -> xr.Variable:
    """The lazy array as an xarray ``Variable`` (reads nothing yet)."""
    data = indexing.LazilyIndexedArray(HpcflowBackendArray(array))
    return xr.Variable(_dims(array, dims), data,
                       attrs={"hpcflow_name": array.name})


def open_dataarray(array: LazyArray, dims: Any = None) -> xr.DataArray:
    """``xr.DataArray`` over a lazy array: indexing it reads only what is selected."""
    return xr.DataArray(variable(array, dims), name=array.name)


class HpcflowBackendEntrypoint(BackendEntrypoint):
    """``engine="hpcflow"``: open a dataset on an hpcflow cluster lazily."""

    description = "Datasets on an hpcflow cluster, read lazily by the rows selected"
    url = "https://github.com/hpcflow/hpcflow#lazy-arrays-dask-and-xarray"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "dims", "keys",
                               "timeout_s")

    def open_dataset(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: Any = None,
        dims: Any = None,
        keys: str | os.PathLike[str] | None = None,
        timeout_s: float = 30.0,
    ) -> xr.Dataset:
        if isinstance(filename_or_obj, LazyArray):
            array, close = filename_or_obj, None
        else:
            address, name = parse_url(filename_or_obj)
            client = connect(address, timeout_s=timeout_s, keys=keys)
            try:
                array = client.array(name)
            except BaseException:
                client.close()
                raise
            close = client.close
        drop = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
        data_vars = {} if array.name in drop else {array.name: variable(array, dims)}
        ds = xr.Dataset(data_vars)
        if close is not None:
            ds.set_close(close)
        return ds

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return isinstance(filename_or_obj, LazyArray) or (
            isinstance(filename_or_obj, str) and filename_or_obj.startswith(SCHEME))


__all__ = ["HpcflowBackendArray", "HpcflowBackendEntrypoint", "open_dataarray", "parse_url",
           "variable"]
