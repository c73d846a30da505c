"""Typed errors raised by the ops layer.

They all derive from :class:`OpError` (a ``ValueError``) so a daemon can turn any
of them into one error reply; the subclasses say *what* was wrong so callers and
tests can tell a typo in an op name from a shape mismatch.
"""

from __future__ import annotations

from hpcflow.errors import HpcflowError


class OpError(HpcflowError, ValueError):
    """Base class of every error about defining, validating or running an op."""


class UnknownOpError(OpError):
    """No op with the requested name is registered."""


class RegistrationError(OpError):
    """An op definition is malformed or clashes with an existing one."""


class ArityError(OpError):
    """An op was given the wrong number of inputs."""


class InputError(OpError):
    """Inputs have incompatible shapes or unsupported dtypes."""


class ParamError(OpError):
    """Parameters are missing, unknown or out of range for the op."""
