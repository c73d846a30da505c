"""Cheap output-shape inference by running an op on tiny samples.

The planner needs output sizes for arbitrary row counts without touching real
data.  We run the op once on each of three synthetic inputs of 2, 3 and 5
rows, fit every output dimension (and a reduce op's partial size) as
``slope * rows + intercept`` on the first two and check the fit on the third.
This covers row-preserving ops (``fft``, ``sort_rows``: slope 1) and
fixed-size results (``colsum``, ``gram``, ``quantiles``: slope 0).  A
rowwise op's broadcast operands (:func:`~hpcflow.ops.exec.row_roles`) are
sampled at their real shape.

A global op over several inputs may get inputs of different row counts (a
sort of their union has ``rows0 + rows1 + rows2`` rows), so it is also run
with one input at a time grown from 2 to 3 rows, which fits each dimension as
``a0 * rows0 + a1 * rows1 + ... + intercept``, checked on inputs of 5, 6, 7,
... rows.  An op that fails on such samples (it needs equal row counts) or
whose sizes are not affine in each row count separately keeps the
equal-rows model, evaluated at its first input's rows.

Assumptions, documented in ``docs/cost-model.md``: output sizes are affine
in the row counts and do not depend on the data values (the daemons check
this on the real output); a rowwise op's row inputs share a row count.  Ops
breaking them must declare ``out_shape``/``out_dtype`` (and a filter must be
``global``).

A row-selecting op (``OpSpec.rows``, e.g. ``frames``) is modelled in two
pieces: its function is fitted on samples of rows it keeps, and the rows it
keeps of an input (or of one part of it, at its global offset) come from its
own selection, exactly: ``ceil(rows / step)`` is not affine.

A planning run asks for the same model many times (sub-problems, baselines):
:class:`ModelCache` runs the op code once per op, parameters and input
shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    run_selected,
)
from hpcflow.ops.spec import (
    Array,
    OpSpec,
    Params,
    Partial,
    Shape,
    constant_bytes,
    kept_rows,
    rows_within,
)

_FIT_ROWS = (2, 3)
_CHECK_ROWS = 5
_Affine = tuple[int, int]
#: Row counts to evaluate a model at: one for every row input, or one per input.
Rows = int | Sequence[int]


@dataclass(frozen=True)
class OutputModel:
    """Output shape, dtype and partial size of one op application as functions of rows.

    ``rows`` (:data:`Rows`) is either one count, which every row input has,
    or a sequence with each input's count (broadcast operands' entries are
    ignored).  ``dims[d] = (slope, intercept)`` gives output dimension ``d``
    when every row input has the same count; ``terms[d]``, when known (a
    global op over several inputs), splits ``slope`` into one coefficient
    per input, so that inputs of different row counts are modelled too.
    Without ``terms`` a sequence is read at input ``basis``'s count.  ``keep``, for a
    row-selecting op, maps an input's row count to the rows it keeps; ``dims`` then
    model the function over the kept rows (see :meth:`part_shape`).
    """

    dims: tuple[_Affine, ...]
    dtype: np.dtype[Any]
    partial: _Affine | None
    terms: tuple[tuple[int, ...], ...] | None = None
    basis: int = 0
    keep: Callable[[int], range] | None = field(default=None, compare=False, hash=False)
    # rows -> (shape, nbytes): the planner asks about the same row counts over and over
    _sizes: dict[int | tuple[int, ...], tuple[Shape, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def _size(self, rows: Rows) -> tuple[Shape, int]:
        key = tuple(rows) if isinstance(rows, Sequence) else rows
        found = self._sizes.get(key)
        if found is None:
            shape = self._shape(key)
            found = self._sizes[key] = (shape, math.prod(shape) * self.dtype.itemsize)
        return found

    def _shape(self, rows: int | tuple[int, ...]) -> Shape:
        if isinstance(rows, tuple) and self.terms is not None:
            return tuple(
                max(0, sum(k * n for k, n in zip(coefs, rows, strict=True)) + icpt)
                for coefs, (_, icpt) in zip(self.terms, self.dims, strict=True)
            )
        count = rows[self.basis] if isinstance(rows, tuple) else rows
        if self.keep is not None:
            count = len(self.keep(count))
        return self._of(count)

    def _of(self, count: int) -> Shape:
        return tuple(max(0, slope * count + icpt) for slope, icpt in self.dims)

    def part_shape(self, lo: int, hi: int, total: int) -> Shape:
        """Output shape of a rowwise op run on input rows ``[lo, hi)`` of ``total`` (a
        row-selecting op keeps only the rows of its selection that lie there)."""
        if self.keep is None:
            return self.shape(hi - lo)
        return self._of(len(rows_within(self.keep(total), lo, hi)))

    def part_nbytes(self, lo: int, hi: int, total: int) -> int:
        return math.prod(self.part_shape(lo, hi, total)) * self.dtype.itemsize

    def shape(self, rows: Rows) -> Shape:
        return self._size(rows)[0]

    def nbytes(self, rows: Rows) -> int:
        return self._size(rows)[1]

    def out_rows(self, rows: Rows) -> int:
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
    then ignored).  A global op over several inputs is also sampled with
    different row counts per input (see the module docstring).
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
    kept_rows(spec, params, _CHECK_ROWS)  # a bad row selection: ParamError here
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
    terms = None
    if spec.kind == "global" and len(dts) > 1:
        terms = _fit_terms(spec, [tuple(rs) for rs in row_shapes], dts, params, dims,
                           shapes[_FIT_ROWS[0]])
    assert dtype is not None
    basis = next((i for i, full in enumerate(whole) if full is None), 0)
    return OutputModel(dims=tuple(dims), dtype=np.dtype(dtype), partial=partial_fit,
                       terms=terms, basis=basis, keep=_keeper(spec, params))


def _keeper(spec: OpSpec, params: Params) -> Callable[[int], range] | None:
    if spec.rows is None:
        return None
    frozen = dict(params)

    def keep(total: int) -> range:
        kept = kept_rows(spec, frozen, total)
        assert kept is not None
        return kept
    return keep


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
    model = output_model(
        spec,
        [tuple(shape[1:]) for shape in input_shapes],
        input_dtypes,
        params,
        broadcast=[None if a else tuple(s) for s, a in zip(input_shapes, aligned, strict=True)],
    )
    return model.shape([shape[0] for shape in input_shapes]), model.dtype


class ModelCache:
    """Output models by op, definition, params and input row shapes: each inferred once.

    Inference runs user code (possibly slow) on samples; a planning run builds
    several problems over the same steps (sub-problems, baselines), and an
    initiator plans the same ops again and again, so they share one cache (a
    changed op definition has another hash, hence another key).  Failures are
    not cached; past ``limit`` entries the cache starts afresh.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
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
                if len(self._models) >= self.limit:
                    self._models.clear()
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
    out = run_selected(spec, inputs, params) if spec.rows is not None else apply(
        spec, inputs, params)
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


def _fit_terms(
    spec: OpSpec,
    row_shapes: Sequence[Shape],
    dtypes: Sequence[np.dtype[Any]],
    params: Params,
    dims: Sequence[_Affine],
    base: Sequence[int],
) -> tuple[tuple[int, ...], ...] | None:
    """Per-input row coefficients of each output dimension of a global op over several
    inputs, or None if they cannot be told apart.

    ``base`` is the output shape with every input at the first fit row count;
    each input in turn is grown to the second while the others stay, and the
    fit is checked on inputs of 5, 6, 7, ... rows.  None (the caller keeps the
    equal-rows ``dims``) if the op fails on inputs of different row counts,
    or if its sizes are not affine in each row count separately.
    """
    lo, hi = _FIT_ROWS
    n = len(dtypes)
    grown = [tuple(hi if j == i else lo for j in range(n)) for i in range(n)]
    check = tuple(_CHECK_ROWS + i for i in range(n))
    got: dict[tuple[int, ...], Shape] = {}
    for counts in (*grown, check):
        inputs = [_sample(r, rs, dt) for r, rs, dt in zip(counts, row_shapes, dtypes, strict=True)]
        try:
            check_inputs(spec, inputs)
            got[counts] = _probe(spec, inputs, params, False, False)[0]
        except OpError:
            return None
        if len(got[counts]) != len(dims):
            return None
    terms = []
    for d, (slope, icpt) in enumerate(dims):
        coefs = tuple((got[counts][d] - base[d]) // (hi - lo) for counts in grown)
        predicted = sum(k * r for k, r in zip(coefs, check, strict=True)) + icpt
        if sum(coefs) != slope or predicted != got[check][d]:
            return None
        terms.append(coefs)
    return tuple(terms)


def _sample(rows: int, row_shape: Shape, dtype: np.dtype[Any]) -> Array:
    """Deterministic values in [0.5, 1.5): non-zero, positive, so logs and divisions work."""
    return _sample_whole((rows, *row_shape), dtype, seed=rows)


def _sample_whole(shape: Shape, dtype: np.dtype[Any], seed: int = 1) -> Array:
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 1.5, shape)
    if dtype.kind == "c":
        values = values + 1j * rng.uniform(0.5, 1.5, values.shape)
    return values.astype(dtype)
