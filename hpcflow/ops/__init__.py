"""Operations on row-partitioned numpy arrays: definitions, registry, execution, inference.

Importing this package registers the built-in ops in :data:`DEFAULT_REGISTRY`.
"""

from hpcflow.ops import builtin as _builtin  # noqa: F401 - registers the built-ins
from hpcflow.ops.builtin import histogram_counts_edges
from hpcflow.ops.errors import (
    ArityError,
    InputError,
    OpError,
    ParamError,
    RegistrationError,
    UnknownOpError,
)
from hpcflow.ops.exec import (
    apply,
    check_inputs,
    check_params,
    combine_partials,
    row_roles,
    run_global,
    run_partial,
    run_rowwise_into,
    run_rowwise_part,
)
from hpcflow.ops.infer import ModelCache, OutputModel, infer_output, output_model
from hpcflow.ops.registry import DEFAULT_REGISTRY, OpRegistry, get_op, list_ops, load_op_module, op
from hpcflow.ops.spec import KINDS, Kind, OpSpec, Partial

__all__ = [
    "DEFAULT_REGISTRY",
    "KINDS",
    "ArityError",
    "InputError",
    "Kind",
    "ModelCache",
    "OpError",
    "OpRegistry",
    "OpSpec",
    "OutputModel",
    "ParamError",
    "Partial",
    "RegistrationError",
    "UnknownOpError",
    "apply",
    "check_inputs",
    "check_params",
    "combine_partials",
    "get_op",
    "histogram_counts_edges",
    "infer_output",
    "list_ops",
    "load_op_module",
    "op",
    "output_model",
    "row_roles",
    "run_global",
    "run_partial",
    "run_rowwise_into",
    "run_rowwise_part",
]
