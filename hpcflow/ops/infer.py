"""Cheap output-shape inference by running an op on tiny samples.

The planner needs output sizes for arbitrary row counts without touching real
data.  We run the op once on each of three synthetic inputs of 2, 3 and 5
rows, fit every output dimension (and a reduce op's partial size) as
``slope * rows + intercept`` on the first two and check the fit on the third.
This covers row-preserving ops (``fft``, ``sort_rows``: slope 1) and
fixed-size results (``colsum``, ``gram``, ``quantiles``: slope 0).  A
rowwise op's broadcast operands (:func:`~hpcflow.ops.exec.row_roles`) are
sampled at their real shape.  Assumptions, documented in
``docs/cost-model.md``: output sizes are affine in the row count, do not
depend on the data values (the daemons check this on the real output), and
multi-input ops see the same row count on every row input.  Ops breaking
them must declare ``out_shape``/``out_dtype`` or be ``global``.

A planning run asks for the same model many times (sub-problems, baselines):
:class:`ModelCache` runs the op code once per op, parameters and input
shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hpcflow.errors import with_context
from hpcflow.ops.errors import ArityError, InputError, OpError
from hpcflow.ops.exec import (
    apply,
    check_inputs,
    check_params,
    combine_partials,
    row_roles,
    run_partial,
)
from hpcflow.ops.spec import Array, OpSpec, Params, Partial, Shape, constant_bytes

_FIT_ROWS = (2, 3)
_CHECK_ROWS = 5
_Affine = tuple[int, int]


@dataclass(frozen=True)
class OutputModel:
    """Output shape, dtype and partial size of one op application as functions of rows."""

    dims: tuple[_Affine, ...]
    dtype: np.dtype[Any]
    partial: _Affine | None
    # rows -> (shape, nbytes): the planner asks about the same row counts over and over
    _sizes: dict[int, tuple[Shape, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def _size(self, rows: int) -> tuple[Shape, int]:
        found = self._sizes.get(rows)
        if found is None:
            shape = tuple(max(0, slope * rows + icpt) for slope, icpt in self.dims)
            found = self._sizes[rows] = (shape, math.prod(shape) * self.dtype.itemsize)
        return found

    def shape(self, rows: int) -> Shape:
        return self._size(rows)[0]

    def nbytes(self, rows: int) -> int:
        return self._size(rows)[1]

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
    *,
    broadcast: Sequence[Shape | None] = (),
) -> OutputModel:
    """Fit an :class:`OutputModel` for inputs with the given per-row shapes and dtypes.

    ``broadcast[i]``, when given and not None, is the whole shape of input
    ``i``, a broadcast operand of a rowwise op (its ``row_shapes`` entry is
    then ignored).
    """
    check_params(spec, params)
    dts = [np.dtype(d) for d in dtypes]
    if len(row_shapes) != len(dts):
        raise InputError(f"op {spec.name!r}: {len(row_shapes)} shapes but {len(dts)} dtypes")
    whole = list(broadcast) + [None] * (len(dts) - len(broadcast))
    samples = {
        rows: [
            _sample(rows, tuple(rs), dt) if full is None else _sample_whole(tuple(full), dt)
            for rs, dt, full in zip(row_shapes, dts, whole, strict=True)
        ]
        for rows in (*_FIT_ROWS, _CHECK_ROWS)
    }
    split = spec.kind == "reduce" and spec.can_split(params)
    shapes: dict[int, list[int]] = {}
    sizes: dict[int, list[int]] = {}
    dtype = spec.out_dtype
    for rows, inputs in samples.items():
        check_inputs(spec, inputs)
        try:
            shape, out_dtype, partial = _probe(spec, inputs, params, split, dtype is None)
        except OpError as exc:
            raise with_context(exc, f"{exc} (while inferring the output size from "
                               f"{rows}-row samples)") from exc
        shapes[rows] = list(shape)
        if partial is not None:
            sizes[rows] = [partial]
        if dtype is None:
            dtype = out_dtype
    dims = _fit(spec, shapes, "output shape")
    partial_fit = _fit(spec, sizes, "partial size")[0] if split else None
    assert dtype is not None
    return OutputModel(dims=tuple(dims), dtype=np.dtype(dtype), partial=partial_fit)


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
    aligned = row_roles(spec, [tuple(s) for s in input_shapes])
    rows = next(shape[0] for shape, a in zip(input_shapes, aligned, strict=True) if a)
    model = output_model(
        spec,
        [tuple(shape[1:]) for shape in input_shapes],
        input_dtypes,
        params,
        broadcast=[None if a else tuple(s) for s, a in zip(input_shapes, aligned, strict=True)],
    )
    return model.shape(rows), model.dtype


class ModelCache:
    """Output models of one planning run: each op, params and input shapes inferred once.

    Inference runs user code (possibly slow) on samples; a planning run builds
    several problems over the same steps (sub-problems, baselines), so they
    share one cache.  Failures are not cached.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], OutputModel] = {}
        self.misses = 0

    def model(
        self,
        spec: OpSpec,
        row_shapes: Sequence[Shape],
        dtypes: Sequence[npt.DTypeLike],
        params: Params,
        *,
        broadcast: Sequence[Shape | None] = (),
    ) -> OutputModel:
        pkey = constant_bytes(dict(params))
        key = (
            spec.name,
            spec.definition_hash,
            tuple(tuple(s) for s in row_shapes),
            tuple(np.dtype(d).str for d in dtypes),
            tuple(None if b is None else tuple(b) for b in broadcast),
            pkey,
        )
        found = self._models.get(key) if pkey is not None else None
        if found is None:
            self.misses += 1
            found = output_model(spec, row_shapes, dtypes, params, broadcast=broadcast)
            if pkey is not None:
                self._models[key] = found
        return found


def _probe(
    spec: OpSpec, inputs: list[Array], params: Params, split: bool, want_dtype: bool
) -> tuple[Shape, np.dtype[Any] | None, int | None]:
    """Run the op once on a sample: output shape, dtype (if asked) and partial size.

    A splittable reduce op runs as one partial plus the combine (which is what
    :func:`apply` does), so the partial's size comes with the output.  A
    declared ``out_shape`` (and ``out_dtype``) spares running the op at all.
    """
    declared = (
        tuple(spec.out_shape([x.shape for x in inputs], params))
        if spec.out_shape is not None
        else None
    )
    if split:
        partial: Partial = run_partial(spec, inputs[0], params)
        out = combine_partials(spec, [partial], params)
        items = partial if isinstance(partial, tuple) else (partial,)
        size = sum(int(item.nbytes) for item in items)
        return declared or out.shape, out.dtype, size
    if declared is not None and not want_dtype:
        return declared, None, None
    out = apply(spec, inputs, params)
    return declared or out.shape, out.dtype, None


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
    return _sample_whole((rows, *row_shape), dtype, seed=rows)


def _sample_whole(shape: Shape, dtype: np.dtype[Any], seed: int = 1) -> Array:
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 1.5, shape)
    if dtype.kind == "c":
        values = values + 1j * rng.uniform(0.5, 1.5, values.shape)
    return values.astype(dtype)
