"""Named op registries, the ``@op`` decorator and loading of user op modules.

A daemon advertises :meth:`OpRegistry.hashes` of its registry; the planner uses
those hashes to decide which nodes may run which step.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from hpcflow.ops.errors import OpError, RegistrationError, UnknownOpError
from hpcflow.ops.spec import CombineFn, IntoFn, Kind, OpSpec, RowSelect, ShapeFn, SplitPredicate

F = TypeVar("F", bound=Callable[..., Any])


class OpRegistry:
    """A name -> :class:`OpSpec` mapping with clash detection."""

    def __init__(self, specs: Iterable[OpSpec] = ()) -> None:
        self._specs: dict[str, OpSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: OpSpec, *, replace: bool = False) -> OpSpec:
        """Add ``spec``; re-registering an identical definition is a no-op.

        A different definition under an existing name is refused unless
        ``replace`` is set, because silently swapping code would make the
        advertised hash lie about results already computed.
        """
        old = self._specs.get(spec.name)
        if old is not None and old.definition_hash != spec.definition_hash and not replace:
            raise RegistrationError(
                f"op {spec.name!r} is already registered with a different definition "
                "(pass replace=True to override)"
            )
        if old is None or old.definition_hash != spec.definition_hash:
            self._specs[spec.name] = spec
        return self._specs[spec.name]

    def get(self, name: str) -> OpSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise UnknownOpError(f"unknown op {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def hashes(self) -> dict[str, str]:
        """What a node advertises: op name -> definition hash."""
        return {name: spec.definition_hash for name, spec in sorted(self._specs.items())}

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[OpSpec]:
        return iter([self._specs[name] for name in self.names()])

    def __len__(self) -> int:
        return len(self._specs)

    def op(
        self,
        name: str,
        kind: Kind,
        *,
        combine: CombineFn | None = None,
        arity: int | None = None,
        out_shape: ShapeFn | None = None,
        out_dtype: npt.DTypeLike | None = None,
        splittable: SplitPredicate | None = None,
        into: IntoFn | None = None,
        rows: RowSelect | None = None,
        replace: bool = False,
    ) -> Callable[[F], F]:
        """Decorator registering a function as op ``name``.

        Without ``arity`` the inputs are the leading positional parameters that
        have no default; everything else is a parameter.
        ``rows`` (rowwise ops of one input): ``(params, total_rows) -> slice`` of the
        input rows the op keeps (see :mod:`hpcflow.ops.spec`).
        """

        def decorate(fn: F) -> F:
            spec = OpSpec(
                name=name,
                kind=kind,
                fn=fn,
                combine=combine,
                arity=_positional_arity(fn) if arity is None else arity,
                out_shape=out_shape,
                out_dtype=None if out_dtype is None else np.dtype(out_dtype),
                splittable=splittable,
                into=into,
                rows=rows,
            )
            self.register(spec, replace=replace)
            return fn

        return decorate


def _positional_arity(fn: Callable[..., Any]) -> int:
    count = 0
    for param in inspect.signature(fn).parameters.values():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise RegistrationError(f"{fn.__qualname__}: pass arity= for a *args function")
        positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        if positional and param.default is param.empty:
            count += 1
    return count


#: The process-wide registry used by ``@op``, :func:`get_op` and the daemon.
DEFAULT_REGISTRY = OpRegistry()
op = DEFAULT_REGISTRY.op


def get_op(name: str) -> OpSpec:
    """Look ``name`` up in the default registry."""
    return DEFAULT_REGISTRY.get(name)


def list_ops() -> list[str]:
    """Sorted names of the ops in the default registry."""
    return DEFAULT_REGISTRY.names()


def load_op_module(module: str | Path) -> tuple[str, ...]:
    """Import a user op module (dotted name or ``.py`` path) for its ``@op`` side effects.

    Returns the names whose registration in the default registry was added or
    changed by this import (an already imported module adds nothing).
    """
    before = DEFAULT_REGISTRY.hashes()
    try:
        path = Path(module)
        if path.suffix == ".py" or path.is_file():
            _import_path(path)
        else:
            importlib.import_module(str(module))
    except OpError:
        raise
    except SystemExit as exc:  # would end the daemon with the module's code, 0 looking fine
        raise OpError(f"cannot load op module {str(module)!r}: it called sys.exit("
                      f"{exc.code!r}) while being imported") from None
    except Exception as exc:
        raise OpError(f"cannot load op module {str(module)!r}: {exc}") from exc
    after = DEFAULT_REGISTRY.hashes()
    return tuple(name for name, digest in after.items() if before.get(name) != digest)


def _import_path(path: Path) -> None:
    resolved = path.resolve()
    tag = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"hpcflow_user_ops_{resolved.stem}_{tag}"
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise OpError(f"cannot load op module {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
