"""The :class:`OpSpec` record: what the planner and executors know about an op.

An op's *kind* decides where it may run (see ``docs/cost-model.md``):

``rowwise``
    linear and row-local, ``f(A ⊕ B) = f(A) ⊕ f(B)``; runs on every holder of a
    row-partitioned input and its output stays partitioned.
``reduce``
    each holder computes one small *partial* over all rows it holds; one node
    combines the partials.  Always exactly one input.
``global``
    needs all input rows on one node.

A rowwise op of one input may declare ``rows``: which rows of the whole input
it keeps, as a ``slice`` of the input's row count (``frames``: every k-th frame
of a range).  The executors cut each part to the kept rows that fall in it,
knowing the part's global row offset, so a stride stays consistent across part
boundaries; ``fn`` then runs row-locally on those rows.  The planner predicts
every part's output rows from the same function (:func:`kept_rows`).

``definition_hash`` lets nodes advertise ``name -> hash`` so that the planner
never ships a step to a node whose code for the op differs from the initiator's.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from hpcflow.ops.errors import ParamError, RegistrationError

Kind = Literal["rowwise", "reduce", "global"]
KINDS: tuple[Kind, ...] = get_args(Kind)

Array = npt.NDArray[Any]
Params = Mapping[str, Any]
Shape = tuple[int, ...]
#: A reduce op's per-holder result: one array or a small tuple of arrays, so it
#: serialises like any other payload.
Partial = Array | tuple[Array, ...]
CombineFn = Callable[[Sequence[Partial]], Array]
#: Declared output shape: ``(input_shapes, params) -> shape``.
ShapeFn = Callable[[Sequence[Shape], Params], Shape]
#: Whether a reduce op can be split for the given params (e.g. histogram needs
#: a fixed ``range``); ``None`` means always.
SplitPredicate = Callable[[Params], bool]
#: Writes a rowwise op's output for its inputs into ``out`` (see :attr:`OpSpec.into`).
IntoFn = Callable[..., None]
#: A row-selecting rowwise op's kept rows: ``(params, total_rows) -> slice`` (step >= 1).
RowSelect = Callable[[Params, int], slice]


@dataclass(frozen=True)
class OpSpec:
    """Everything needed to run, split and plan one named operation."""

    name: str
    kind: Kind
    fn: Callable[..., Any]
    combine: CombineFn | None = None
    arity: int = 1
    out_shape: ShapeFn | None = None
    out_dtype: np.dtype[Any] | None = None
    splittable: SplitPredicate | None = None
    #: A rowwise op may also say how to write its output into a given array:
    #: ``into(*inputs, out=block, **params)`` fills ``block`` with what ``fn`` would
    #: return, so a node computing row block by block writes straight into the result.
    into: IntoFn | None = None
    rows: RowSelect | None = None
    definition_hash: str = field(init=False, compare=False)
    #: The op function's signature, taken once: checking a call's parameters against it
    #: is done for every unit of work, and ``inspect.signature`` costs tens of µs.
    signature: inspect.Signature = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise RegistrationError(f"op name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise RegistrationError(f"op {self.name!r}: kind must be in {KINDS}, not {self.kind!r}")
        if self.arity < 1:
            raise RegistrationError(f"op {self.name!r}: arity must be >= 1, got {self.arity}")
        if self.kind == "reduce" and self.arity != 1:
            raise RegistrationError(f"op {self.name!r}: reduce ops take exactly one input")
        if self.into is not None and self.kind != "rowwise":
            raise RegistrationError(f"op {self.name!r}: only rowwise ops take an into function")
        if self.combine is not None and self.kind != "reduce":
            raise RegistrationError(f"op {self.name!r}: only reduce ops take a combine function")
        if self.rows is not None and (self.kind != "rowwise" or self.arity != 1
                                      or self.into is not None):
            raise RegistrationError(f"op {self.name!r}: only rowwise ops of one input, "
                                    "without into=, select rows (rows=)")
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", np.dtype(self.out_dtype))
        object.__setattr__(self, "definition_hash", definition_hash(self))
        try:
            object.__setattr__(self, "signature", inspect.signature(self.fn))
        except (TypeError, ValueError) as exc:
            raise RegistrationError(f"op {self.name!r}: its function has no signature to "
                                    f"check parameters against ({exc}); wrap it in a def") from None

    def can_split(self, params: Params) -> bool:
        """True if the op may run per part (rowwise) or per holder (reduce)."""
        if self.kind == "global":
            return False
        return self.splittable is None or self.splittable(params)


def definition_hash(spec: OpSpec) -> str:
    """Stable hash of everything that decides an op's results and how it is planned.

    Covers the kind, arity, declared output dtype, and the code of the op
    function, its combine function, its split predicate and its declared
    output shape.  Code is fingerprinted from its source when available (so
    formatting-only changes do change the hash, but re-importing the same file
    does not), otherwise from the code object without addresses or line
    numbers; either way together with the *values* of the module globals and
    closure variables it reads that are plain constants (numbers, strings,
    bytes, tuples/lists/dicts of them, numpy arrays by content), and the code
    of helper functions from the same module.  So ``K = 2.0`` vs ``K = 3.0``
    behind ``def f(x): return x * K`` gives two hashes.  Modules, classes and
    library functions it calls are not hashed (their version is the
    deployment's business).
    """
    digest = hashlib.sha256()
    dtype = None if spec.out_dtype is None else spec.out_dtype.str
    digest.update(f"kind={spec.kind};arity={spec.arity};out_dtype={dtype};".encode())
    for label, fn in (("fn", spec.fn), ("combine", spec.combine),
                      ("splittable", spec.splittable), ("out_shape", spec.out_shape)):
        digest.update(f";{label}=".encode())
        if fn is not None:
            digest.update(_fingerprint(fn, set()))
    if spec.into is not None:  # only then: ops without one keep the hashes they had
        digest.update(b";into=" + _fingerprint(spec.into, set()))
    if spec.rows is not None:  # only then: the other ops keep the hashes they had
        digest.update(b";rows=" + _fingerprint(spec.rows, set()))
    return digest.hexdigest()


def kept_rows(spec: OpSpec, params: Params, total: int) -> range | None:
    """The rows of an input of ``total`` rows that ``spec`` keeps (None: all, not a
    row-selecting op).  A bad selection is a ParamError."""
    if spec.rows is None:
        return None
    try:
        sl = spec.rows(params, int(total))
    except ParamError:
        raise
    except Exception as exc:
        raise ParamError(f"op {spec.name!r}: cannot select rows with {dict(params)!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(sl, slice) or (sl.step is not None and (
            not isinstance(sl.step, int) or sl.step < 1)):
        raise ParamError(f"op {spec.name!r}: its rows function must give a slice with a "
                         f"step >= 1, got {sl!r}")
    return range(*sl.indices(int(total)))


def rows_within(kept: range, lo: int, hi: int) -> range:
    """The rows of ``kept`` (step >= 1) that fall in ``[lo, hi)``, as global indices."""
    step = kept.step
    first = max(0, -(-(lo - kept.start) // step))
    last = max(0, -(-(hi - kept.start) // step))
    n = len(kept)
    return kept[min(first, n):min(last, n)]


def _fingerprint(fn: Callable[..., Any], seen: set[int]) -> bytes:
    """Code plus the constants it reads (see :func:`definition_hash`)."""
    seen.add(id(fn))
    try:
        text = textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if isinstance(code, types.CodeType):
            text = _code_bytes(code)
        else:
            qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
            return f"{type(fn).__module__}.{qualname}".encode()
    return b"\x00".join([text, *_referenced(fn, seen)])


def _referenced(fn: Callable[..., Any], seen: set[int]) -> list[bytes]:
    """``name=value`` for the globals and closure cells ``fn`` reads that are constants,
    and the fingerprints of same-module helper functions it calls."""
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return []
    values: dict[str, Any] = {}
    cells = getattr(fn, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars, cells, strict=False):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    glob = getattr(fn, "__globals__", {})
    for name in sorted(_names(code)):
        if name not in values and name in glob:
            values[name] = glob[name]
    out = []
    for name in sorted(values):
        value = values[name]
        if isinstance(value, types.FunctionType):
            if id(value) in seen or value.__module__ != getattr(fn, "__module__", None):
                continue
            out.append(name.encode() + b"=" + _fingerprint(value, seen))
            continue
        text = constant_bytes(value)
        if text is not None:
            out.append(name.encode() + b"=" + text)
    return out


def _names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the code nested in it) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_SCALARS = (bool, int, float, complex, str, bytes, type(None), np.generic)


def constant_bytes(value: Any, depth: int = 0) -> bytes | None:
    """A canonical byte form of a plain constant, or None if ``value`` is not one."""
    if isinstance(value, _SCALARS):
        return f"{type(value).__name__}:{value!r}".encode()
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            return None
        body = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        return f"ndarray:{value.dtype.str}:{value.shape}:{body}".encode()
    if depth > 4:
        return None
    if isinstance(value, (tuple, list, frozenset, set)):
        found = [constant_bytes(v, depth + 1) for v in value]
        items = [i for i in found if i is not None]
        if len(items) < len(found):
            return None
        if isinstance(value, (frozenset, set)):
            items.sort()
        return f"{type(value).__name__}(".encode() + b",".join(items) + b")"
    if isinstance(value, dict):
        pairs = []
        for k in sorted(value, key=repr):
            key, item = constant_bytes(k, depth + 1), constant_bytes(value[k], depth + 1)
            if key is None or item is None:
                return None
            pairs.append(key + b":" + item)
        return b"dict(" + b",".join(pairs) + b")"
    return None


def _code_bytes(code: types.CodeType) -> bytes:
    """Bytecode, names and constants, recursing into nested code objects."""
    out = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        nested = isinstance(const, types.CodeType)
        out.append(_code_bytes(const) if nested else repr(const).encode())
    return b"\x00".join(out)
