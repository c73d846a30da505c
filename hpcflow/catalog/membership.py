"""Who is in the cluster, how to reach them, and whether they are alive.

Membership is gossiped as deltas (SWIM-style, after hashicorp/memberlist, but
disseminated over each node's PUB socket rather than UDP): a heartbeat carries
only the descriptors of members that joined or restarted recently (each
retransmitted ``NEWS_RETRANSMIT`` times), the members found dead recently, and
a digest of the sender's view of the live members.  A node whose digest keeps
differing from ours gets a push/pull (a ``hello``: our descriptor for its full
member list), at most one per ``heartbeat_s`` per node: the anti-entropy path.
A descriptor with a larger ``epoch`` (a restart) replaces the older one.

Idle cost per node stays bounded: a node heartbeats every
:func:`heartbeat_interval` (``heartbeat_s`` up to ``HB_FANIN`` peers, then
proportionally longer), so it receives at most about ``HB_FANIN`` heartbeats
per ``heartbeat_s`` whatever the cluster size; liveness beyond that comes from
probes: every ``PROBE_EVERY`` heartbeat periods a node pings one member (round
robin over a shuffled list, as memberlist does), and a member that does not
answer as itself is marked dead and announced; every receiver confirms with a
probe of its own before it believes it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ProtocolError

#: An epoch (a run's start, ``time_ns`` on its host) further ahead of this host's clock
#: is refused: it would outrank every later real run of that name.  Generous, because
#: hosts' clocks differ and a data dir's epochs only ever grow (``daemon/epoch.py``).
MAX_EPOCH_AHEAD_S = 86_400.0


#: Gossip tuning, in one place.  Heartbeats a node receives per heartbeat period at most
#: (idle): beyond this many peers everyone's heartbeat interval grows.  Each received
#: heartbeat costs an idle daemon a wake-up of its I/O thread and of its hub (about
#: 0.1 ms of CPU on a loaded 2-core host): 4 rather than 8 took an idle daemon of 32
#: from 0.78% to 0.59% of a core.  Liveness does not depend on it (probes find the
#: dead); peers' load, which heartbeats carry, is as old as N / HB_FANIN periods.
HB_FANIN = 4
#: Heartbeats that carry one membership change (a join, a restart, a death).
NEWS_RETRANSMIT = 3
#: Most membership changes carried by one heartbeat.
NEWS_PER_HEARTBEAT = 32
#: Heartbeat periods between two liveness probes sent by one node.
PROBE_EVERY = 1.0


def heartbeat_interval(heartbeat_s: float, peers: int) -> float:
    """How often a node with ``peers`` live peers heartbeats: every node then receives
    about ``HB_FANIN`` heartbeats per ``heartbeat_s``, however large the cluster."""
    return heartbeat_s * max(1.0, peers / HB_FANIN)


def membership_digest(members: list[tuple[str, int]]) -> str:
    """A short digest of a set of ``(name, epoch)`` pairs (order does not matter)."""
    h = hashlib.blake2b(digest_size=8)
    for name, epoch in sorted(members):
        h.update(f"{name}\0{epoch}\n".encode())
    return h.hexdigest()


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


#: Counts every change of any PeerState's ``info`` or ``alive`` in this process: a
#: membership digest computed at one count holds until the next (see
#: ``ReplicatedCatalog.digest``, asked on every heartbeat received).
_GENERATION = [0]


def generation() -> int:
    """The current count of PeerState ``info``/``alive`` changes in this process."""
    return _GENERATION[0]


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
    interval: float = 0.0  # its heartbeat interval as it announced it (0: not yet)
    announce: bool = False  # we heard of it first hand: announce it once it is alive

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("info", "alive"):
            _GENERATION[0] += 1
        object.__setattr__(self, name, value)
