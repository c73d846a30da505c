"""How a node finds and keeps its cluster: joining through a peer, introducing itself,
probing who answers at an endpoint, and remembering the live members for the next run.

A node joins through its ``--peer`` endpoints and, after a restart, through the
members its data dir remembers (``members.json``); the catalog then learns
the rest from gossip (:mod:`hpcflow.catalog.replicated`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import gevent

from ..catalog.membership import PeerInfo
from ..errors import ConfigError, HpcflowError, ProtocolError
from ..rpc.calls import refuses_connections
from .parts import NodeParts

log = logging.getLogger("hpcflow.node")

MEMBERS_FILE = "members.json"
#: Heartbeat periods between two looks at whether members.json needs rewriting (a
#: node killed soon after it joined must still find its members again on restart).
REMEMBER_EVERY = 2
#: How long a restarted node keeps trying the members it remembers (they may be gone).
REJOIN_FOR_S = 60.0
#: A node's first hello waits a random part of this many heartbeat periods: many nodes
#: started at once (a batch job) must not all knock at one member in the same instant.
JOIN_JITTER = 0.5


class Members:
    """The node's side of membership; ``refused`` is called when a peer refuses us
    outright (our name is taken), which must stop the daemon."""

    def __init__(self, node: NodeParts, refused: Callable[[], None]) -> None:
        self.node = node
        self.refused = refused

    def remembered(self) -> list[str]:
        """RPC endpoints of the members this data dir's last run knew (best effort)."""
        try:
            eps = json.loads((self.node.config.data_dir / MEMBERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(eps, list):
            return []
        return [ep for ep in eps[:64] if isinstance(ep, str) and len(ep) <= 256
                and ep.startswith(("tcp://", "ipc://")) and ep != self.node.me.rpc]

    def remember(self) -> None:
        """Keep ``members.json`` up to date with the live members' RPC endpoints (looked
        at every ``REMEMBER_EVERY`` heartbeat periods: one of an idle node's wake-ups)."""
        path = self.node.config.data_dir / MEMBERS_FILE
        last: list[str] | None = None
        while True:
            gevent.sleep(REMEMBER_EVERY * self.node.config.heartbeat_s)
            eps = sorted(v.info.rpc for v in self.node.catalog.nodes()
                         if v.alive and v.info.name != self.node.name)
            if eps == last or not eps:
                continue
            try:
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(eps))
                os.replace(tmp, path)
                last = eps
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)

    def join(self, endpoint: str, give_up_after: float | None = None) -> None:
        """Introduce ourselves to a peer; retry until it answers (or ``give_up_after`` s,
        for a remembered member that may be gone for good).

        A peer that refuses us outright (our name is taken) stops this daemon:
        two nodes with one name would corrupt every catalog.
        """
        delay, warned = 0.2, False
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        gevent.sleep(random.uniform(0, JOIN_JITTER * self.node.config.heartbeat_s))
        while True:
            if deadline is not None and time.monotonic() > deadline:
                log.info("remembered member %s did not answer; not trying it again", endpoint)
                return
            try:
                member = self.hello(endpoint)
                log.info("joined the cluster through %s", endpoint)
                # the whole catalog from this one member (once per run, whichever member
                # answers first; see catalog/replicated.py)
                self.node.catalog.bootstrap(member)
                return
            except ConfigError as exc:
                if give_up_after is not None and not self.name_taken(endpoint):
                    log.error("remembered member %s refused us (%s), but no node it knows "
                              "answers as %s: not stopping, not trying it again", endpoint,
                              exc, self.node.name)
                    return
                log.error("cannot join through %s: %s", endpoint, exc)
                self.refused()
                return
            except HpcflowError as exc:
                if not warned:
                    log.warning("peer %s not reachable yet (%s); retrying", endpoint, exc)
                    warned = True
            gevent.sleep(delay)
            delay = min(delay * 2, 5.0)

    def name_taken(self, endpoint: str) -> bool:
        """Whether the member at ``endpoint`` knows a live node with our name that answers
        as itself (not as us): a remembered member's word alone is not enough to stop us,
        since any process that was once a member is remembered."""
        for info in self._live_twins(endpoint)[:4]:
            answer = self.probe(info.rpc)
            if (answer is not None and answer.name == self.node.name
                    and answer.epoch != self.node.epoch):
                return True
        return False

    def hello(self, endpoint: str) -> PeerInfo:
        """Introduce ourselves at ``endpoint`` and learn the members it knows; returns the
        descriptor it gave of itself."""
        try:
            reply = self.node.peers.call(endpoint, "hello", self.node.me.to_wire())
        except ConfigError:
            self._learn_twins(endpoint)
            raise
        try:
            descriptors = [PeerInfo.from_wire(d) for d in [reply["self"], *reply["members"]]]
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed hello reply from {endpoint}: {exc}") from None
        # It answered at that endpoint: its own descriptor is believed if it names it
        # (and answers a ping with it, which also brings its ops, load and seq: it is
        # alive to us at once, and the planner must know what it can run).
        first = descriptors[0]
        self.node.catalog.add_peer(first, verified=first.rpc == endpoint
                                   and self.node.catalog.answers_as(first))
        for info in descriptors[1:]:
            self.node.catalog.add_peer(info)
        return descriptors[0]

    def _learn_twins(self, endpoint: str) -> None:
        """The member at ``endpoint`` refused our hello (our name is taken): tell the
        catalog of the live nodes it knows under our name, which checks each (the later
        of two same-named daemons leaves).  Heartbeats carry membership deltas, not the
        member list, so this refusal may be the only place we hear of the other."""
        for info in self._live_twins(endpoint)[:4]:
            self.node.catalog.add_peer(info)

    def _live_twins(self, endpoint: str) -> list[PeerInfo]:
        """The live nodes with our name that the member at ``endpoint`` lists (none if
        it does not answer, or answers garbage)."""
        try:
            nodes = self.node.peers.call(endpoint, "catalog")["nodes"]
            return [PeerInfo.from_wire(d) for d in nodes[:4096]
                    if isinstance(d, dict) and d.get("name") == self.node.name
                    and d.get("alive") is True]
        except (HpcflowError, KeyError, TypeError):
            return []

    def probe(self, endpoint: str, timeout_s: float | None = None) -> PeerInfo | None:
        """Who answers at an RPC endpoint now: the descriptor it gives of itself (name,
        epoch, endpoints, key); None when nothing does within ``timeout_s`` (default
        the TTL; a refused connection answers at once) or the answer is malformed."""
        head = self.probe_head(endpoint, timeout_s)
        return head[0] if head is not None else None

    def probe_head(self, endpoint: str, timeout_s: float | None = None
                   ) -> tuple[PeerInfo, dict[str, Any]] | None:
        """:meth:`probe`, and the rest of the answer: the sequence number the node's
        catalog stream is at ("seq", -1 when it does not say), its ops and load."""
        if not self.node.peers.connected(endpoint) and refuses_connections(endpoint):
            return None  # a connection that is up needs no such check
        try:
            r = self.node.peers.call(endpoint, "ping",
                                     timeout_s=timeout_s or self.node.config.ttl_s)
            info = PeerInfo.from_wire(r["self"])
        except (HpcflowError, KeyError, TypeError, ValueError):
            return None
        seq = r.get("seq")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else -1
        return info, {"seq": seq, "ops": r.get("ops"), "load": r.get("load")}


__all__ = ["MEMBERS_FILE", "REJOIN_FOR_S", "Members"]
