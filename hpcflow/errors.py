"""The one exception hierarchy of hpcflow.

Every error a user can see is an :class:`HpcflowError`.  Library errors
(zerorpc, pyzmq, h5py, OSError) are translated at the boundary where they
happen, so callers never have to catch a dependency's exception type.

Errors cross the RPC and bulk wires by *name*: the server sends
``(type(exc).__name__, str(exc))`` and the client rebuilds the same class
with :func:`from_wire`.  That is why every class here must keep a stable name.

Tree::

    HpcflowError
    ├── ConfigError              bad option, config file or scenario
    ├── InvalidName              dataset name that is path-like, empty, too long ...
    ├── InvalidData              wrong dtype/shape/parts, unreadable or truncated input
    ├── DatasetNotFound          no live node holds it
    ├── DatasetExists            put would overwrite without overwrite=True
    ├── NotOwner                 delete of a dataset this node does not hold
    ├── IntegrityError           checksum mismatch that retries could not fix
    ├── StoreError               the local HDF5 store failed (disk full, permissions)
    ├── OpError                  (hpcflow.ops) defining, validating or running an op
    │   ├── UnknownOpError, RegistrationError, ArityError, InputError, ParamError
    ├── PlanningError            (hpcflow.decide) no valid plan: bad references, no capable node
    └── TransportError           anything on the wire
        ├── ProtocolError        a malformed message
        ├── PeerUnavailable      dead, unreachable or timed-out peer
        └── RemoteError          an unexpected failure inside a peer
"""

from __future__ import annotations

from typing import Any


class HpcflowError(Exception):
    """Base of every error hpcflow raises on purpose."""


class ConfigError(HpcflowError):
    """A configuration value, option or file is invalid."""


class InvalidName(HpcflowError, ValueError):
    """A dataset name is not acceptable (path separators, traversal, control chars ...)."""


class InvalidData(HpcflowError, ValueError):
    """Input data has the wrong dtype, shape, layout, or cannot be read."""


class DatasetNotFound(HpcflowError, KeyError):
    """No live node holds the named dataset (or part)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "dataset not found"


class DatasetExists(HpcflowError):
    """A put would replace an existing dataset and ``overwrite`` was not given."""


class NotOwner(HpcflowError):
    """The node asked to change a dataset does not hold it."""


class IntegrityError(HpcflowError):
    """Data failed checksum verification, also after retries."""


class StoreError(HpcflowError):
    """The local HDF5 store could not complete an operation."""


class TransportError(HpcflowError):
    """Something went wrong on the wire."""


class ProtocolError(TransportError):
    """A message did not follow the protocol."""


class PeerUnavailable(TransportError):
    """A peer is dead, unreachable, or did not answer in time."""


class RemoteError(TransportError):
    """A peer failed in a way that has no more specific hpcflow type."""


def _all_subclasses(cls: type[HpcflowError]) -> dict[str, type[HpcflowError]]:
    found: dict[str, type[HpcflowError]] = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


def to_wire(exc: BaseException) -> tuple[str, str]:
    """Encode an exception as ``(type name, message)`` for the wire."""
    if isinstance(exc, HpcflowError):
        return type(exc).__name__, str(exc)
    return "RemoteError", f"{type(exc).__name__}: {exc}"


def from_wire(name: Any, message: Any) -> HpcflowError:
    """Rebuild the hpcflow error a peer sent; unknown names become RemoteError.

    Subclasses are looked up at call time so errors defined in later-imported
    modules (ops, planning) are found too.
    """
    import hpcflow.decide.errors
    import hpcflow.ops.errors  # noqa: F401  (register their classes)

    known = _all_subclasses(HpcflowError)
    cls = known.get(str(name), RemoteError)
    if cls is RemoteError and str(name) not in ("RemoteError", ""):
        return RemoteError(f"{name}: {message}")
    return cls(str(message))
