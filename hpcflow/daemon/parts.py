"""What the daemon's parts may use of the node that wires them.

:class:`~hpcflow.daemon.node.Node` builds the store, catalog, bulk channel and
peer clients, and hands itself to the parts above them (the worker, a share,
the janitor, the executor, the RPC service) typed as one of these protocols:
a part sees exactly these attributes and methods, never the Node class, so nothing below
the Node imports ``node.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..catalog.base import Catalog
from ..catalog.membership import PeerInfo
from ..catalog.record import DatasetRecord
from ..catalog.store import Store
from ..config import NodeConfig
from ..ops import OpRegistry
from ..rpc.bulk import BulkClient
from ..rpc.calls import PeerClients
from ..rpc.messages import RunReply, RunRequest
from ..rpc.traffic import Traffic
from .events import Events


class NodeParts(Protocol):
    """The node's parts and facts, for the code that runs in it."""

    #: Requests doing real work right now (ops, transfers): part of the node's load.
    active: int

    @property
    def name(self) -> str: ...

    @property
    def epoch(self) -> int:
        """Fixed per daemon run: a restart is a new epoch."""
        ...

    @property
    def me(self) -> PeerInfo:
        """Our descriptor (endpoints as advertised), as other nodes see it."""
        ...

    @property
    def config(self) -> NodeConfig: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def store(self) -> Store: ...

    @property
    def traffic(self) -> Traffic: ...

    @property
    def peers(self) -> PeerClients:
        """RPC clients of the other nodes."""
        ...

    @property
    def bulk_client(self) -> BulkClient: ...

    @property
    def registry(self) -> OpRegistry: ...

    @property
    def ready(self) -> bool:
        """Started: the catalog and the RPC service exist."""
        ...

    def bulk_endpoints(self, owners: Iterable[str]) -> dict[str, str]:
        """The bulk endpoints of those of ``owners`` that are live members, by node name
        (a reply names the holders it locates, not every member: that was O(N) per
        lookup, each end)."""
        ...

    def call_local(self, method: str, *args: Any) -> Any:
        """Call an RPC method of this node directly (no socket)."""
        ...


class ServedNode(NodeParts, Protocol):
    """What the RPC service also reports: who we are and how we are doing."""

    @property
    def pid(self) -> int: ...

    def load(self) -> dict[str, Any]: ...

    def catalog_snapshot_wire(self, origins: object = None) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...


class RowWork(Protocol):
    """What a share's tasks ask of the node's worker (:class:`~hpcflow.daemon.worker.Worker`)."""

    #: Where a share's step times are counted (for the metrics endpoint).
    events: Events

    def pull(self, name: str, rows: tuple[int, int] | None, src: str | None = None,
             tag: dict[str, Any] | None = None, wait_s: float | None = None
             ) -> tuple[list[DatasetRecord], dict[str, int]]: ...

    def run(self, req: RunRequest, wait_s: float | None = None,
            feeding: Sequence[Any] = ()) -> RunReply: ...


__all__ = ["NodeParts", "RowWork", "ServedNode"]
