"""Pure-numpy execution of ops, whole or split.

The split helpers are what a daemon runs on one holder; :func:`apply` is the
whole-array reference the split results must equal.  Every entry point
validates inputs and params first and wraps failures inside the op function in
:class:`OpError`, so a daemon can report them without knowing the op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hpcflow.errors import HpcflowError
from hpcflow.ops.errors import ArityError, InputError, OpError, ParamError
from hpcflow.ops.spec import Array, OpSpec, Params, Partial, Shape, kept_rows, rows_within

_NUMERIC_KINDS = "biufc"


def apply(spec: OpSpec, inputs: Sequence[Array], params: Params) -> Array:
    """Run ``spec`` on whole arrays: the reference for every split execution."""
    if spec.kind == "rowwise":
        return run_rowwise_part(spec, inputs, params)
    if spec.kind == "reduce":
        _check_call(spec, inputs, params)
        return _combine(spec, [_partial(spec, inputs[0], params)])
    return run_global(spec, inputs, params)


def run_rowwise_part(spec: OpSpec, parts_of_inputs: Sequence[Array], params: Params,
                     span: tuple[int, int, int] | None = None) -> Array:
    """Run a rowwise op on one row block of each row input (the blocks cover the same
    rows) and the whole of each broadcast operand (see :func:`row_roles`).

    ``span = (lo, hi, total)`` places the block at rows ``[lo, hi)`` of an input of
    ``total`` rows (None: the block is the whole input); a row-selecting op
    (``spec.rows``) needs it to keep the right rows of the block."""
    _require_kind(spec, "rowwise")
    _check_call(spec, parts_of_inputs, params)
    inputs = list(parts_of_inputs)
    if spec.rows is not None:
        inputs[0] = select_rows(spec, inputs[0], params, span)
    return _output(spec, _call(spec, spec.fn, *inputs, **params))


def select_rows(spec: OpSpec, x: Array, params: Params,
                span: tuple[int, int, int] | None) -> Array:
    """The rows of the block ``x`` (rows ``span[0]:span[1]`` of ``span[2]``) that the
    row-selecting op ``spec`` keeps, by their global row numbers."""
    lo, hi, total = (0, len(x), len(x)) if span is None else span
    if hi - lo != len(x) or not 0 <= lo <= hi <= total:
        raise InputError(f"op {spec.name!r}: a block of {len(x)} rows cannot be rows "
                         f"{lo}:{hi} of {total}")
    kept = kept_rows(spec, params, total)
    assert kept is not None
    mine = rows_within(kept, lo, hi)
    if not mine:
        return x[:0]
    return x[mine.start - lo:mine[-1] - lo + 1:mine.step]


def run_selected(spec: OpSpec, inputs: Sequence[Array], params: Params) -> Array:
    """A rowwise op's function on rows it keeps already (output-model inference of a
    row-selecting op models the function and the selection apart)."""
    _require_kind(spec, "rowwise")
    _check_call(spec, inputs, params)
    return _output(spec, _call(spec, spec.fn, *inputs, **params))


def run_rowwise_into(spec: OpSpec, parts_of_inputs: Sequence[Array], params: Params,
                     out: Array) -> Array:
    """:func:`run_rowwise_part` writing into ``out`` through the op's ``into`` function."""
    _require_kind(spec, "rowwise")
    if spec.into is None:
        raise OpError(f"op {spec.name!r} has no into function")
    _check_call(spec, parts_of_inputs, params)
    _call(spec, spec.into, *parts_of_inputs, out=out, **params)
    return out


def run_partial(spec: OpSpec, x: Array, params: Params) -> Partial:
    """Partial of a reduce op over the rows one holder has (possibly none)."""
    _require_kind(spec, "reduce")
    if not spec.can_split(params):
        raise ParamError(f"op {spec.name!r} cannot be split with params {dict(params)!r}")
    _check_call(spec, [x], params)
    return _partial(spec, x, params)


def combine_partials(spec: OpSpec, partials: Sequence[Partial], params: Params) -> Array:
    """Combine the partials of all holders into the op's result.

    ``params`` are only validated: the combine function receives the partials
    alone, since a partial must carry everything needed to merge it.
    """
    _require_kind(spec, "reduce")
    _check_params(spec, params)
    if not partials:
        raise InputError(f"op {spec.name!r}: combine needs at least one partial")
    return _combine(spec, partials)


def run_global(spec: OpSpec, inputs: Sequence[Array], params: Params) -> Array:
    """Run a global op on co-located whole inputs."""
    _require_kind(spec, "global")
    _check_call(spec, inputs, params)
    return _output(spec, _call(spec, spec.fn, *inputs, **params))


def check_inputs(spec: OpSpec, inputs: Sequence[Array]) -> None:
    """Arity, numeric dtypes, a row axis, and (rowwise ops) rows that line up."""
    if len(inputs) != spec.arity:
        raise ArityError(f"op {spec.name!r} takes {spec.arity} input(s), got {len(inputs)}")
    for i, x in enumerate(inputs):
        if not isinstance(x, np.ndarray):
            kind = type(x).__name__
            raise InputError(f"op {spec.name!r}: input {i} is a {kind}, not a numpy array")
        if x.dtype.kind not in _NUMERIC_KINDS:
            raise InputError(f"op {spec.name!r}: input {i} has non-numeric dtype {x.dtype}")
        if x.ndim == 0:
            raise InputError(f"op {spec.name!r}: input {i} is 0-d; the first axis must be rows")
    row_roles(spec, [x.shape for x in inputs])


def row_roles(spec: OpSpec, shapes: Sequence[Shape]) -> tuple[bool, ...]:
    """Which inputs of a rowwise op are split by rows (True) and which are *broadcast
    operands* (False), sent whole to every row block, following numpy's broadcasting.

    The row inputs are those with the most dimensions and the row count ``R``
    those share; an input with fewer dimensions (numpy aligns it with the
    trailing axes, e.g. a column vector of shape ``(cols,)``) or with one row
    when ``R != 1`` (shape ``(1, cols)``) never touches the row axis, so each
    row block sees all of it.  Any other row count is an :class:`InputError`
    quoting the shapes.  Other kinds of op have no broadcast operands.
    """
    if spec.kind != "rowwise" or len(shapes) < 2:
        return (True,) * len(shapes)
    ndim = max(len(shape) for shape in shapes)
    counts = {shape[0] for shape in shapes if len(shape) == ndim and shape[0] != 1}
    if len(counts) > 1:
        raise InputError(
            f"op {spec.name!r}: rowwise inputs must have equal row counts or broadcast against "
            f"every row (fewer dimensions, or one row), got shapes "
            f"{', '.join(str(tuple(s)) for s in shapes)}")
    rows = counts.pop() if counts else 1
    return tuple(len(shape) == ndim and shape[0] == rows for shape in shapes)


def check_params(spec: OpSpec, params: Params) -> None:
    """Unknown or missing parameters, judged by the op function's signature."""
    _check_params(spec, params)


def _check_call(spec: OpSpec, inputs: Sequence[Array], params: Params) -> None:
    check_inputs(spec, inputs)
    _check_params(spec, params)


def _check_params(spec: OpSpec, params: Params) -> None:
    try:
        spec.signature.bind(*([None] * spec.arity), **params)
    except TypeError as exc:
        raise ParamError(f"op {spec.name!r}: bad params {sorted(params)}: {exc}") from None


def _require_kind(spec: OpSpec, kind: str) -> None:
    if spec.kind != kind:
        raise OpError(f"op {spec.name!r} is {spec.kind}, not {kind}")


def _partial(spec: OpSpec, x: Array, params: Params) -> Partial:
    result = _call(spec, spec.fn, x, **params)
    if isinstance(result, tuple):
        return tuple(np.asarray(item) for item in result)
    return np.asarray(result)


def _combine(spec: OpSpec, partials: Sequence[Partial]) -> Array:
    if spec.combine is not None:
        return _output(spec, _call(spec, spec.combine, list(partials)))
    if any(isinstance(p, tuple) for p in partials):
        raise OpError(f"op {spec.name!r}: tuple partials need an explicit combine function")
    return _output(spec, _call(spec, _sum_partials, partials))


def _sum_partials(partials: Sequence[Array]) -> Array:
    """Default combine: element-wise sum (right for sums, counts and Gram matrices)."""
    total = np.array(partials[0], copy=True)
    for part in partials[1:]:
        total = total + part
    return total


def _call(spec: OpSpec, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except HpcflowError:
        raise
    except SystemExit as exc:  # on a pool thread it would end the daemon without a word
        raise OpError(f"op {spec.name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise OpError(f"op {spec.name!r} failed: {type(exc).__name__}: {exc}") from exc


def _output(spec: OpSpec, result: Any) -> Array:
    if isinstance(result, tuple):
        raise OpError(f"op {spec.name!r} returned a tuple; ops must return one array")
    out = np.asarray(result)
    if spec.out_dtype is not None and out.dtype != spec.out_dtype:
        raise OpError(f"op {spec.name!r} declared dtype {spec.out_dtype} but returned {out.dtype}")
    return out
