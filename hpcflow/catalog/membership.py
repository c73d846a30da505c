"""Who is in the cluster, how to reach them, and whether they are alive.

Membership is gossiped: every heartbeat carries the descriptors of the
members its sender believes alive, so a node that joined through one peer
learns the rest within a heartbeat or two.  A descriptor with a larger
``epoch`` (a restart) replaces the older one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ProtocolError

#: An epoch (a run's start, ``time_ns`` on its host) further ahead of this host's clock
#: is refused: it would outrank every later real run of that name.  Generous, because
#: hosts' clocks differ and a data dir's epochs only ever grow (``daemon/epoch.py``).
MAX_EPOCH_AHEAD_S = 86_400.0


def epoch_ahead_s(epoch: int) -> float:
    """How many seconds ``epoch`` lies ahead of this host's clock (negative: behind)."""
    return (epoch - time.time_ns()) / 1e9


@dataclass(frozen=True)
class PeerInfo:
    """How to reach one daemon: its RPC, catalog-publisher and bulk endpoints."""

    name: str
    epoch: int
    rpc: str
    pub: str
    bulk: str

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: object) -> PeerInfo:
        if not isinstance(d, dict):
            raise ProtocolError("peer descriptor must be a map")
        try:
            info = cls(str(d["name"]), int(d["epoch"]), str(d["rpc"]), str(d["pub"]),
                       str(d["bulk"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed peer descriptor: {exc}") from exc
        for ep in (info.rpc, info.pub, info.bulk):
            if not ep.startswith(("tcp://", "ipc://")) or len(ep) > 256:
                raise ProtocolError(f"peer endpoint {ep[:64]!r} is not tcp:// or ipc://")
        if not info.name or len(info.name) > 128 or info.epoch < 0:
            raise ProtocolError("peer descriptor has an invalid name or epoch")
        return info


@dataclass
class PeerState:
    """What this node knows about one peer, as the catalog subscriber sees it."""

    info: PeerInfo
    alive: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    synced: bool = False  # snapshot applied; updates are applied in order
    seq: int = 0
    load: dict[str, Any] = field(default_factory=dict)
    ops: dict[str, str] = field(default_factory=dict)  # op name -> definition hash
    dead_since: float | None = None
    unknown_since: float | None = None  # first heartbeat of a run of them omitting us
    introduced_at: float = float("-inf")  # when we last said hello to it unasked
