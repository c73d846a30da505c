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
from .config import NodeConfig
from .decide.errors import PlanningError
from .errors import (
    ConfigError,
    DatasetExists,
    DatasetNotFound,
    HpcflowError,
    IntegrityError,
    InvalidData,
    InvalidName,
    NotOwner,
    PeerUnavailable,
    ProtocolError,
    RemoteError,
    StoreError,
    TransportError,
)
from .ops import OpError, op
from .rpc.client import Client, connect
from .workflow.flow import Handle, PlanView

__all__ = [
    "CatalogSnapshot",
    "Client",
    "ConfigError",
    "DatasetExists",
    "DatasetNotFound",
    "DatasetRecord",
    "Handle",
    "HpcflowError",
    "IntegrityError",
    "InvalidData",
    "InvalidName",
    "Location",
    "NodeConfig",
    "NotOwner",
    "OpError",
    "PartLocation",
    "PeerUnavailable",
    "PlanView",
    "PlanningError",
    "ProtocolError",
    "RemoteError",
    "StoreError",
    "TransportError",
    "__version__",
    "connect",
    "op",
]
