"""Cheap output-shape inference by running an op on tiny samples.

The planner needs output sizes for arbitrary row counts without touching real
data.  We run the op on synthetic inputs of 2 and 3 rows, fit every output
dimension (and a reduce op's partial size) as ``slope * rows + intercept``, and
check the fit on a 5-row sample.  This covers row-preserving ops (``fft``,
``sort_rows``: slope 1) and fixed-size results (``colsum``, ``gram``,
``quantiles``: slope 0).  Assumptions, documented in ``docs/cost-model.md``:
output sizes are affine in the row count, do not depend on the data values,
and multi-input ops see the same row count on every input.  Ops breaking them
must declare ``out_shape``/``out_dtype``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hpcflow.ops.errors import ArityError, InputError, OpError
from hpcflow.ops.exec import apply, check_inputs, check_params, run_partial
from hpcflow.ops.spec import Array, OpSpec, Params, Partial, Shape

_FIT_ROWS = (2, 3)
_CHECK_ROWS = 5
_Affine = tuple[int, int]


@dataclass(frozen=True)
class OutputModel:
    """Output shape, dtype and partial size of one op application as functions of rows."""

    dims: tuple[_Affine, ...]
    dtype: np.dtype[Any]
    partial: _Affine | None

    def shape(self, rows: int) -> Shape:
        return tuple(max(0, slope * rows + icpt) for slope, icpt in self.dims)

    def nbytes(self, rows: int) -> int:
        return int(np.prod(self.shape(rows), dtype=np.int64)) * self.dtype.itemsize

    def out_rows(self, rows: int) -> int:
        """Length of the output's first axis (1 for a 0-d result)."""
        shape = self.shape(rows)
        return shape[0] if shape else 1

    def partial_nbytes(self, rows: int) -> int:
        """Bytes of one reduce partial over ``rows`` rows (0 if the op has none)."""
        if self.partial is None:
            return 0
        slope, icpt = self.partial
        return max(0, slope * rows + icpt)


def output_model(
    spec: OpSpec,
    row_shapes: Sequence[Shape],
    dtypes: Sequence[npt.DTypeLike],
    params: Params,
) -> OutputModel:
    """Fit an :class:`OutputModel` for inputs with the given per-row shapes and dtypes."""
    check_params(spec, params)
    dts = [np.dtype(d) for d in dtypes]
    if len(row_shapes) != len(dts):
        raise InputError(f"op {spec.name!r}: {len(row_shapes)} shapes but {len(dts)} dtypes")
    samples = {
        rows: [_sample(rows, tuple(rs), dt) for rs, dt in zip(row_shapes, dts, strict=True)]
        for rows in (*_FIT_ROWS, _CHECK_ROWS)
    }
    for inputs in samples.values():
        check_inputs(spec, inputs)
    shapes = {rows: list(_out_shape(spec, inputs, params)) for rows, inputs in samples.items()}
    dims = _fit(spec, shapes, "output shape")
    dtype = spec.out_dtype
    if dtype is None:
        dtype = apply(spec, samples[_FIT_ROWS[0]], params).dtype
    partial = None
    if spec.kind == "reduce" and spec.can_split(params):
        sizes = {rows: [_partial_nbytes(spec, xs[0], params)] for rows, xs in samples.items()}
        partial = _fit(spec, sizes, "partial size")[0]
    return OutputModel(dims=tuple(dims), dtype=np.dtype(dtype), partial=partial)


def infer_output(
    spec: OpSpec,
    input_shapes: Sequence[Shape],
    input_dtypes: Sequence[npt.DTypeLike],
    params: Params,
) -> tuple[Shape, np.dtype[Any]]:
    """Shape and dtype of ``apply(spec, inputs, params)`` for inputs of these shapes."""
    if len(input_shapes) != spec.arity:
        raise ArityError(f"op {spec.name!r} takes {spec.arity} input(s), got {len(input_shapes)}")
    if any(len(shape) == 0 for shape in input_shapes):
        shapes = list(input_shapes)
        raise InputError(f"op {spec.name!r}: inputs need a row axis, got shapes {shapes}")
    rows = [shape[0] for shape in input_shapes]
    if spec.kind == "rowwise" and len(set(rows)) > 1:
        raise InputError(f"op {spec.name!r}: rowwise inputs must have equal row counts, got {rows}")
    model = output_model(spec, [tuple(shape[1:]) for shape in input_shapes], input_dtypes, params)
    return model.shape(rows[0]), model.dtype


def _out_shape(spec: OpSpec, inputs: list[Array], params: Params) -> Shape:
    if spec.out_shape is not None:
        return tuple(spec.out_shape([x.shape for x in inputs], params))
    return apply(spec, inputs, params).shape


def _partial_nbytes(spec: OpSpec, x: Array, params: Params) -> int:
    partial: Partial = run_partial(spec, x, params)
    items = partial if isinstance(partial, tuple) else (partial,)
    return sum(int(item.nbytes) for item in items)


def _fit(spec: OpSpec, values: dict[int, list[int]], what: str) -> list[_Affine]:
    (r0, r1), check = _FIT_ROWS, _CHECK_ROWS
    if len({len(v) for v in values.values()}) > 1:
        raise OpError(f"op {spec.name!r}: {what} changes rank with the row count")
    fitted = []
    for a, b, c in zip(values[r0], values[r1], values[check], strict=True):
        slope = (b - a) // (r1 - r0)
        icpt = a - slope * r0
        if slope * check + icpt != c:
            raise OpError(f"op {spec.name!r}: {what} is not affine in the row count")
        fitted.append((slope, icpt))
    return fitted


def _sample(rows: int, row_shape: Shape, dtype: np.dtype[Any]) -> Array:
    """Deterministic values in [0.5, 1.5): non-zero, positive, so logs and divisions work."""
    rng = np.random.default_rng(rows)
    values = rng.uniform(0.5, 1.5, (rows, *row_shape))
    if dtype.kind == "c":
        values = values + 1j * rng.uniform(0.5, 1.5, values.shape)
    return values.astype(dtype)
