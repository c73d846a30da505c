"""hpcflow: decentralised, data-locality-aware workflows for HPC clusters.

Public API::

    import hpcflow
    with hpcflow.connect("127.0.0.1:7101") as c:
        c.put("DS1", array)
        c.catalog()
        arr = c.fetch("DS1")
        h = c.run("fft", "DS1")          # a lazy Handle
        print(c.explain(h)); h.fetch()

    @hpcflow.op("expand", kind="rowwise")  # user operations
    def expand(x): ...
"""

from ._version import __version__
from .catalog.base import CatalogSnapshot, Location, PartLocation
from .catalog.record import DatasetRecord
from .client.client import Client, connect
from .client.flow import Handle, PlanView, gather
from .client.lazy import LazyArray
from .config import NodeConfig
from .errors import (
    ArityError,
    ConfigError,
    DatasetChanged,
    DatasetConflict,
    DatasetExists,
    DatasetNotFound,
    HpcflowError,
    InputError,
    IntegrityError,
    InvalidData,
    InvalidName,
    NotOwner,
    OpError,
    Overloaded,
    ParamError,
    PeerUnavailable,
    PlanningError,
    ProtocolError,
    RegistrationError,
    RemoteError,
    StoreError,
    TransportError,
    UnknownOpError,
)
from .ops import op

__all__ = [
    "ArityError",
    "CatalogSnapshot",
    "Client",
    "ConfigError",
    "DatasetChanged",
    "DatasetConflict",
    "DatasetExists",
    "DatasetNotFound",
    "DatasetRecord",
    "Handle",
    "HpcflowError",
    "InputError",
    "IntegrityError",
    "InvalidData",
    "InvalidName",
    "LazyArray",
    "Location",
    "NodeConfig",
    "NotOwner",
    "OpError",
    "Overloaded",
    "ParamError",
    "PartLocation",
    "PeerUnavailable",
    "PlanView",
    "PlanningError",
    "ProtocolError",
    "RegistrationError",
    "RemoteError",
    "StoreError",
    "TransportError",
    "UnknownOpError",
    "__version__",
    "connect",
    "gather",
    "op",
]
