"""The errors of the ops layer (defined in :mod:`hpcflow.errors`, the one exception tree).

:class:`OpError` is a ``ValueError``; its subclasses say *what* was wrong so
callers and tests can tell a typo in an op name from a shape mismatch.
"""

from __future__ import annotations

from hpcflow.errors import (
    ArityError,
    InputError,
    OpError,
    ParamError,
    RegistrationError,
    UnknownOpError,
)

__all__ = [
    "ArityError",
    "InputError",
    "OpError",
    "ParamError",
    "RegistrationError",
    "UnknownOpError",
]
