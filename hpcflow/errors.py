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
    │   └── CatalogValueTooLarge a catalog entry over the DHT's value limit (--catalog dht)
    ├── DatasetNotFound          no live node holds it
    │   └── DatasetChanged       the version being read was replaced (overwritten, or
    │                            deleted and put again) while a lazy array read it
    ├── DatasetExists            put would overwrite without overwrite=True, or another
    │   │                        node holds (or is putting) the name
    │   └── DatasetConflict      two nodes hold different data under one name (both puts
    │                            were acknowledged during a partition, or one node
    │                            announced a name another held): delete one
    ├── NotOwner                 delete of a dataset this node does not hold
    ├── IntegrityError           checksum mismatch that retries could not fix
    ├── StoreError               the local HDF5 store failed (disk full, permissions)
    ├── OpError                  an op failed while running, or cannot be registered or loaded
    │   ├── UnknownOpError       no op of that name (on the initiator, or in a registry)
    │   ├── RegistrationError    a malformed op definition, or a clash with another
    │   ├── ArityError           an op was given the wrong number of inputs
    │   ├── InputError           input shapes or dtypes do not fit the op
    │   └── ParamError           missing, unknown or out-of-range op parameters
    ├── PlanningError            no valid plan: unknown input, no node can run a step
    ├── LineageError             a saved dataset cannot be re-derived from its lineage (none
    │   │                        recorded, truncated, an op's definition changed, or the
    │   │                        recomputed data differs from what was saved)
    │   ├── InputChanged         an input the lineage names differs now (checksum or version)
    │   └── InputMissing         an input the lineage names is gone (no live node holds all
    │                            of it)
    └── TransportError           anything on the wire
        ├── ProtocolError        a malformed message
        ├── PeerUnavailable      dead, unreachable or timed-out peer
        ├── Overloaded           the peer is at a limit (requests in flight ...): retry later
        │   └── CatalogBusy      a member serves enough snapshots at once: ask another
        ├── AuthenticationError  the CURVE handshake failed: wrong, missing or unexpected keys
        │   └── PermissionDenied a client's key asked for what only nodes may do
        │       └── NotFlowOwner run, save or close of a flow without its secret
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


class CatalogValueTooLarge(InvalidData):
    """A value for the DHT catalog (``--catalog dht``) is over what one kademlia message
    carries (8 KB msgpack): it is refused before anything is sent, and nothing stored
    changes.  Records keep to the limit by leaving a large lineage out (see
    ``catalog/dht/values.py``); this is what is left (a name with too many holders)."""


class DatasetNotFound(HpcflowError, KeyError):
    """No live node holds the named dataset (or part)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "dataset not found"


class DatasetChanged(DatasetNotFound):
    """The version of a dataset (part) a reader pinned is gone: it was overwritten, or
    deleted and put again, while being read.  A lazy array reports this rather than mix
    rows of two versions; open it again (``refresh()``) to read the new one.  A kind of
    :class:`DatasetNotFound` (the version asked for is on no node), so code that fails
    over to another holder on that keeps doing so."""


class DatasetExists(HpcflowError):
    """A put would replace an existing dataset and ``overwrite`` was not given, or the
    name (part) is held by another node, alive or down, or being put by one right now."""


class DatasetConflict(DatasetExists):
    """Two nodes hold different data under one name, whatever their versions: each was
    acknowledged a put while they could not see each other, or one of them announced a
    name the other held (a rogue "peer", issue 11 item 3 a).  Reads fail until all but
    one are deleted; neither copy is ever served in place of the other."""


class NotOwner(HpcflowError):
    """The node asked to change a dataset does not hold it."""


class IntegrityError(HpcflowError):
    """Data failed checksum verification, also after retries."""


class StoreError(HpcflowError):
    """The local HDF5 store could not complete an operation."""


class OpError(HpcflowError, ValueError):
    """An op failed while running, or cannot be defined, validated or loaded.

    The subclasses say *what* was wrong, so a caller can tell a typo in an op
    name from a shape mismatch; the planner and the daemons raise them as they
    are (with the step they concern in the message), never flattened.
    """


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


class PlanningError(HpcflowError, ValueError):
    """The workflow cannot be planned: unknown inputs, or no node can run a step."""


class LineageError(HpcflowError):
    """A saved dataset cannot be re-derived from its recorded lineage: it has none (it was
    put, not saved), the lineage was truncated past its size limit, an op it names is
    defined differently now, or the recomputed data differs from what was saved.  Nothing
    is stored when this is raised."""


class InputChanged(LineageError):
    """An input the lineage names is not the data it was derived from: its checksum or
    versions differ from the recorded ones (the message names the input)."""


class InputMissing(LineageError):
    """An input the lineage names is gone: no live node holds it, or some of its parts
    (the message names the input)."""


class TransportError(HpcflowError):
    """Something went wrong on the wire."""


class ProtocolError(TransportError):
    """A message did not follow the protocol."""


class PeerUnavailable(TransportError):
    """A peer is dead, unreachable, or did not answer in time."""


class Overloaded(TransportError):
    """A peer refused a request because it is at one of its limits; retrying later may work."""


class CatalogBusy(Overloaded):
    """A member refused a catalog snapshot: it is serving as many as it serves at once.
    A joiner asks another member (every member holds the whole catalog)."""


class AuthenticationError(TransportError):
    """The security handshake with a peer failed: it refused our keys, or we refused its
    (different clusters' keys, keys on one side only).  Raised as soon as the handshake
    fails, not at a timeout; retrying with the same keys cannot help."""


class PermissionDenied(AuthenticationError):
    """An authenticated caller asked for something its role may not do: a script's
    client key calling a node-to-node RPC, or uploading what only nodes create."""


class NotFlowOwner(PermissionDenied):
    """``execute``, ``save`` or ``cleanup`` of a flow without that flow's secret (or with
    another's): only the script that created a flow may run, save or close it, with or
    without keys (see :class:`~hpcflow.rpc.messages.FlowSecret`)."""


class RemoteError(TransportError):
    """A peer failed in a way that has no more specific hpcflow type."""


def _all_subclasses(cls: type[HpcflowError]) -> dict[str, type[HpcflowError]]:
    found: dict[str, type[HpcflowError]] = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_all_subclasses(sub))
    return found


def with_context(exc: HpcflowError, message: str) -> HpcflowError:
    """The same kind of error with a new message (e.g. the step it concerns prefixed),
    so adding context never flattens a specific class into a general one."""
    try:
        return type(exc)(message)
    except TypeError:  # a subclass with its own constructor signature
        return HpcflowError(message)


def to_wire(exc: BaseException) -> tuple[str, str]:
    """Encode an exception as ``(type name, message)`` for the wire."""
    if isinstance(exc, HpcflowError):
        return type(exc).__name__, str(exc)
    return "RemoteError", f"{type(exc).__name__}: {exc}"


def from_wire(name: Any, message: Any) -> HpcflowError:
    """Rebuild the hpcflow error a peer sent; unknown names become RemoteError.

    Subclasses are looked up at call time, so an error class defined elsewhere
    (a subclass of one of these) is found too once its module is imported.
    """
    known = _all_subclasses(HpcflowError)
    cls = known.get(str(name), RemoteError)
    if cls is RemoteError and str(name) not in ("RemoteError", ""):
        return RemoteError(f"{name}: {message}")
    return cls(str(message))
