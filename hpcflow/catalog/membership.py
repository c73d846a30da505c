"""Who is in the cluster, how to reach them, and whether they are alive.

Membership is gossiped as deltas (SWIM-style, after hashicorp/memberlist, but
disseminated over each node's PUB socket rather than UDP): a heartbeat carries
only the descriptors of members that joined, restarted or came back recently
(each retransmitted ``NEWS_RETRANSMIT`` times by every node that learns it first,
as memberlist retransmits: a heartbeat reaches only the node's followers), the
members found dead recently, and a digest of the sender's view of the live
members.  A node whose digest keeps differing from ours gets a push/pull (a
``hello``: our descriptor for its full member list), at most one per
``heartbeat_s`` per node: the anti-entropy path.  A descriptor with a larger
``epoch`` (a restart) replaces the older one.

Idle cost per node stays bounded: a node follows (reads the PUB stream of) at
most :func:`fanin` members, and beyond a full mesh takes the heartbeats of
``HB_FANIN`` of them (its ring successor among them), so it receives at most
that many heartbeats per ``heartbeat_s`` whatever the cluster size.  A member
found silent by those who hear it is marked dead and announced; every receiver
confirms with a probe of its own before it believes it.  Beside that, a node
pings a member it does not hear every ``PROBE_IDLE_EVERY`` periods (round robin
over a shuffled list, as memberlist does), and one whose ops it does not know at
once.  An overloaded node stretches these timeouts (local health awareness, see
``ReplicatedCatalog.patience``).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ProtocolError

#: An epoch (a run's start, ``time_ns`` on its host) further ahead of this host's clock
#: is refused: it would outrank every later real run of that name.  Generous, because
#: hosts' clocks differ and a data dir's epochs only ever grow (``daemon/epoch.py``).
MAX_EPOCH_AHEAD_S = 86_400.0


#: Gossip tuning, in one place.  Members a node follows (one SUB socket each) and relays
#: catalog updates from: updates reach every node in about log(N)/log(FANIN) hops.
#: 8, not 4: a cluster of up to 9 nodes (most workflows) is then a full mesh, where
#: nothing is relayed; with relays a 6-node flow took 44 ms instead of 25 (every
#: update decoded ~5 times a node).  Beyond a full mesh a node takes the heartbeats of
#: only ``HB_FANIN`` of the members it follows (the others bring only updates).
FANIN = 8
#: Test-only override of FANIN (a cluster smaller than FANIN is a full mesh).
FANIN_ENV = "HPCFLOW_CATALOG_FANIN"
#: Heartbeats that carry one membership change (a join, a restart, a death).
NEWS_RETRANSMIT = 3
#: Most membership changes carried by one heartbeat.
NEWS_PER_HEARTBEAT = 32
#: Of the members a node follows, how many it hears the heartbeats of when the cluster
#: is larger than a full mesh (their ring successor among them, so each node is watched
#: by its ring predecessor and about as many others): the rest of its streams bring
#: only updates (the publisher filters, ZeroMQ's PUB sends a subscriber only the kinds
#: it subscribed to).  Each heartbeat received costs an idle node ~0.3 ms of CPU.
HB_FANIN = 3
#: Test-only override of HB_FANIN (a small cluster beyond a full mesh can then show who
#: hears whom, e.g. one heartbeat-taker per node).
HB_FANIN_ENV = "HPCFLOW_CATALOG_HB_FANIN"
#: Heartbeat periods between two looks for a member to probe: one whose ops we do not
#: know yet (to plan with it) is probed at once.
PROBE_EVERY = 1.0
#: Heartbeat periods between two probes of a random member we do not hear heartbeats
#: from (a backstop, and a refresh of its load and ops): its death is found by the
#: members that hear it, and each receiver of that news checks with a probe of its own.
PROBE_IDLE_EVERY = 10


def _count_from_env(env: str, default: int) -> int:
    """``$env`` as a count of at least one (a test-only override), else ``default``."""
    try:
        return max(1, int(os.environ.get(env, default)))
    except ValueError:
        return default


def fanin() -> int:
    """Members a node follows: ``FANIN``, or ``$HPCFLOW_CATALOG_FANIN`` (tests only)."""
    return _count_from_env(FANIN_ENV, FANIN)


def hb_fanin() -> int:
    """Of the members a node follows, how many it takes the heartbeats of beyond a full
    mesh: ``HB_FANIN``, or ``$HPCFLOW_CATALOG_HB_FANIN`` (tests only).  At least one: the
    ring successor, which keeps every node watched."""
    return _count_from_env(HB_FANIN_ENV, HB_FANIN)


def _score(me: str, slot: int, name: str) -> bytes:
    return hashlib.blake2b(f"{me}\0{slot}\0{name}".encode(), digest_size=8).digest()


def heard_members(me: str, live: list[str], count: int = HB_FANIN) -> set[str]:
    """The ``count`` members (of ``live``, others than ``me``) whose heartbeats ``me``
    takes beyond a full mesh: its successor in name order (every node is then watched
    by its predecessor, and the "who follows whom" graph is one cycle) and, for each of
    ``count - 1`` slots, the member ranked first by a hash of (``me``, slot,
    member) -- rendezvous hashing: a join or a death moves a node's choice only when
    the newcomer ranks first or the chosen one died (about 2 nodes of 256 change on a
    join; an offset in the name order moved a third of them), and the choices scatter
    away from ``me``'s neighbours in a sorted host list, which often share a switch.
    A node is so watched by its predecessor and, on average, ``count - 1`` others."""
    others = [n for n in live if n != me]
    if not others:
        return set()
    ring = sorted([*others, me])
    heard = {ring[(ring.index(me) + 1) % len(ring)]}
    for slot in range(1, count):
        heard.add(max(others, key=lambda n: _score(me, slot, n)))
    return heard


def membership_digest(members: list[tuple[str, int]]) -> str:
    """A short digest of a set of ``(name, epoch)`` pairs (order does not matter)."""
    h = hashlib.blake2b(digest_size=8)
    for name, epoch in sorted(members):
        h.update(f"{name}\0{epoch}\n".encode())
    return h.hexdigest()


def vector_digest(vector: dict[str, tuple[int, int]]) -> str:
    """A short digest of a per-origin ``name -> (epoch, seq)`` vector."""
    h = hashlib.blake2b(digest_size=8)
    for name, (epoch, seq) in sorted(vector.items()):
        h.update(f"{name}\0{epoch}\0{seq}\n".encode())
    return h.hexdigest()


def epoch_ahead_s(epoch: int) -> float:
    """How many seconds ``epoch`` lies ahead of this host's clock (negative: behind)."""
    return (epoch - time.time_ns()) / 1e9


@dataclass(frozen=True)
class PeerInfo:
    """How to reach one daemon: its RPC, catalog-publisher and bulk endpoints, and the
    public key (hex Ed25519, made per run) its catalog updates are signed with."""

    name: str
    epoch: int
    rpc: str
    pub: str
    bulk: str
    key: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: object) -> PeerInfo:
        if not isinstance(d, dict):
            raise ProtocolError("peer descriptor must be a map")
        try:
            info = cls(str(d["name"]), int(d["epoch"]), str(d["rpc"]), str(d["pub"]),
                       str(d["bulk"]), str(d.get("key", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed peer descriptor: {exc}") from exc
        for ep in (info.rpc, info.pub, info.bulk):
            if not ep.startswith(("tcp://", "ipc://")) or len(ep) > 256:
                raise ProtocolError(f"peer endpoint {ep[:64]!r} is not tcp:// or ipc://")
        if not info.name or len(info.name) > 128 or info.epoch < 0:
            raise ProtocolError("peer descriptor has an invalid name or epoch")
        if info.key and (len(info.key) != 64 or info.key.strip("0123456789abcdef")):
            raise ProtocolError("peer descriptor's key is not 64 hex digits")
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
    interval: float = 0.0  # its heartbeat interval as it announced it (0: not yet)
    gap_since: float | None = None  # updates after a missing one are buffered since then
    vdigest: str = ""  # the digest of its per-origin vector on its last heartbeat
