"""Warn when this node's op definitions differ from what its peers advertise.

Every node advertises its ops with a hash of their definition in its heartbeats; the
planner never sends a step to a node whose hash differs from the initiator's, so a node
restarted with an edited op module is silently left out of every plan its peers make
(and it leaves them out of its own).  This greenlet compares, every few heartbeats,
this node's hashes with each live peer's and logs a warning once per (peer, op,
pair of hashes) -- again if they change -- naming the op and the nodes on each side.
It compares only the peers whose advertised table is new since its last look (the
catalog replaces a member's table when it changes), or all of them when ours
changed: at 256 members, comparing every table every time was 2.4 ms each round,
a third of an idle node's CPU.
"""

from __future__ import annotations

import logging

import gevent

from .parts import NodeParts

log = logging.getLogger("hpcflow.node")

#: Distinct differences remembered (each warned once); past it the memory is reset.
MAX_REMEMBERED = 10_000
#: Heartbeat periods between two comparisons.
EVERY = 5


def differences(mine: dict[str, str], peers: dict[str, dict[str, str]]
                ) -> list[tuple[str, str, str, str]]:
    """``(peer, op, my hash, peer's hash)`` for every op both have with different
    definitions (an op only one side has is not a difference of definition)."""
    return [(peer, op, h, table[op]) for peer, table in sorted(peers.items())
            for op, h in sorted(mine.items()) if op in table and table[op] != h]


def watch(node: NodeParts, every_s: float) -> None:
    """Run until killed: compare and warn (see the module docstring)."""
    warned: set[tuple[str, str, str, str]] = set()
    checked: dict[str, dict[str, str]] = {}  # peer -> the table we compared last
    mine_checked: dict[str, str] | None = None
    while True:
        gevent.sleep(every_s)
        if not node.ready:
            continue
        ours = node.registry.hashes()
        if ours != mine_checked:
            checked = {}
            mine_checked = ours
        peers = {v.info.name: v.ops for v in node.catalog.nodes()
                 if v.alive and v.info.name != node.name and v.ops}
        new = {name: ops for name, ops in peers.items() if checked.get(name) is not ops}
        checked = peers
        for diff in differences(ours, new):
            if diff in warned:
                continue
            if len(warned) >= MAX_REMEMBERED:
                warned.clear()
            warned.add(diff)
            peer, op, mine, theirs = diff
            log.warning("op %r here (definition %s) differs from the one %s advertises (%s): "
                        "the planner will not send a step using it between the two; load the "
                        "same op module on every node and restart the odd one", op,
                        mine[:12], peer, theirs[:12])


__all__ = ["differences", "watch"]
