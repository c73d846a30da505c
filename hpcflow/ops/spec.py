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

from hpcflow.ops.errors import RegistrationError

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
    definition_hash: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise RegistrationError(f"op name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise RegistrationError(f"op {self.name!r}: kind must be in {KINDS}, not {self.kind!r}")
        if self.arity < 1:
            raise RegistrationError(f"op {self.name!r}: arity must be >= 1, got {self.arity}")
        if self.kind == "reduce" and self.arity != 1:
            raise RegistrationError(f"op {self.name!r}: reduce ops take exactly one input")
        if self.combine is not None and self.kind != "reduce":
            raise RegistrationError(f"op {self.name!r}: only reduce ops take a combine function")
        if self.out_dtype is not None:
            object.__setattr__(self, "out_dtype", np.dtype(self.out_dtype))
        object.__setattr__(self, "definition_hash", definition_hash(self))

    def can_split(self, params: Params) -> bool:
        """True if the op may run per part (rowwise) or per holder (reduce)."""
        if self.kind == "global":
            return False
        return self.splittable is None or self.splittable(params)


def definition_hash(spec: OpSpec) -> str:
    """Stable hash of the op's code, kind and arity.

    The function source is used when available (so formatting-only changes do
    change the hash, but re-importing the same file does not); otherwise the
    code object is fingerprinted without addresses or line numbers.  A reduce
    op's combine function is included because it changes results too.
    """
    digest = hashlib.sha256()
    digest.update(f"kind={spec.kind};arity={spec.arity};".encode())
    digest.update(_fingerprint(spec.fn))
    if spec.combine is not None:
        digest.update(b";combine=")
        digest.update(_fingerprint(spec.combine))
    return digest.hexdigest()


def _fingerprint(fn: Callable[..., Any]) -> bytes:
    try:
        return textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if isinstance(code, types.CodeType):
            return _code_bytes(code)
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
        return f"{type(fn).__module__}.{qualname}".encode()


def _code_bytes(code: types.CodeType) -> bytes:
    """Bytecode, names and constants, recursing into nested code objects."""
    out = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        nested = isinstance(const, types.CodeType)
        out.append(_code_bytes(const) if nested else repr(const).encode())
    return b"\x00".join(out)
