"""Who owns a workflow's intermediate datasets, and when they go away.

Everything an execution creates (step outputs, reduce partials, copies and
slices of inputs, the ``.result`` the script fetches) is stored with a
*flow tag* in its lineage::

    {"workflow": "wf-1a2b", "flow": {"initiator": "n1", "epoch": 1732..., "execution": "x-9f",
                                     "keep": false}}

naming the initiating daemon (by name and epoch: a restart is a new epoch)
and the execution.  Two mechanisms remove them:

* **close**: when the script closes its flow, the initiator deletes what the
  flow created (only its non-kept parts with ``keep=True``), except copies a
  running execution on this initiator still reads; when an execution fails,
  what it created is deleted at once.  Both skip nodes that are down.
* **the janitor**: every daemon periodically looks at the tagged datasets it
  holds and asks their initiator (:class:`FlowBook`) whether each execution
  is still wanted.  It drops a dataset when the initiator answers that the
  execution failed, or that its flow is closed (unless tagged ``keep``), or
  when the initiator is alive under a new epoch (it restarted, so the flow
  is gone; ``keep`` datasets stay).  While the initiator is down it decides
  nothing.  So a holder that was killed mid-step and restarts cleans up what
  it re-announces, and so does a holder the clean-up could not reach.

Limits: a script that dies without closing its flow leaves the flow open on
the initiator until the initiator restarts; a ``keep`` dataset of a failed
execution whose initiator restarted before the holder came back is kept.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gevent

from ..catalog.record import DatasetRecord
from ..errors import DatasetExists, DatasetNotFound, HpcflowError
from .parts import NodeParts

log = logging.getLogger("hpcflow.lifecycle")

#: How many failed executions an initiator remembers after their flow closed.
FAILED_MEMORY = 10_000


@dataclass(frozen=True)
class FlowTag:
    """The lineage entry that ties a dataset to the execution that made it."""

    initiator: str
    epoch: int
    execution: str
    keep: bool = False

    def to_lineage(self, wf: str) -> dict[str, Any]:
        return {"workflow": wf, "flow": {"initiator": self.initiator, "epoch": self.epoch,
                                         "execution": self.execution, "keep": self.keep}}

    @classmethod
    def of(cls, rec: DatasetRecord) -> tuple[str, FlowTag] | None:
        """The workflow id and tag of a tagged record (None if untagged or malformed)."""
        tag, wf = rec.lineage.get("flow"), rec.lineage.get("workflow")
        if not isinstance(tag, dict) or not isinstance(wf, str):
            return None
        initiator, epoch, xid = tag.get("initiator"), tag.get("epoch"), tag.get("execution")
        if not (isinstance(initiator, str) and isinstance(epoch, int)
                and isinstance(xid, str)):
            return None
        return wf, cls(initiator, epoch, xid, bool(tag.get("keep")))


def new_execution_id() -> str:
    return f"x-{uuid.uuid4().hex[:12]}"


class FlowBook:
    """The initiator's memory of its open flows and their executions.

    An execution is registered before it creates anything, so a holder asking
    about a dataset always finds its execution here while it runs.
    """

    def __init__(self) -> None:
        self.flows: dict[str, dict[str, str]] = {}  # wf -> execution -> running|done|failed
        self.failed: dict[str, None] = {}  # failed executions, oldest first (bounded)
        self.uses: dict[str, set[tuple[str, str]]] = {}  # running execution -> (node, name)

    def begin(self, wf: str, uses: Iterable[tuple[str, str]] = ()) -> str:
        xid = new_execution_id()
        self.flows.setdefault(wf, {})[xid] = "running"
        self.uses[xid] = set(uses)
        return xid

    def end(self, wf: str, xid: str, ok: bool) -> None:
        self.uses.pop(xid, None)
        if ok:
            running = self.flows.get(wf)
            if running is not None:  # a flow closed meanwhile stays closed: its janitors
                running[xid] = "done"  # drop what this execution made
            return
        self.flows.get(wf, {}).pop(xid, None)
        self.failed[xid] = None
        while len(self.failed) > FAILED_MEMORY:
            self.failed.pop(next(iter(self.failed)))

    def close(self, wf: str) -> None:
        """The flow is over: its executions are no longer wanted (unless kept)."""
        self.flows.pop(wf, None)

    def in_use(self, node: str, name: str) -> bool:
        """Does a running execution read ``name`` (or a slice of it) on ``node``?"""
        return any((node, name) in uses for uses in self.uses.values())

    def status(self, wf: str, xid: str) -> str:
        """``running``, ``done`` (flow open), ``failed`` or ``closed`` (flow gone)."""
        if xid in self.failed:
            return "failed"
        return self.flows.get(wf, {}).get(xid, "closed")

    def wanted(self, holder: str, items: list[Any]) -> list[bool]:
        """For a holder's ``[wf, execution, name, keep]`` items: may each stay?"""
        out = []
        for wf, xid, name, keep in items:
            status = self.status(str(wf), str(xid))
            out.append(status in ("running", "done") or (status == "closed" and bool(keep))
                       or self.in_use(holder, str(name)))
        return out


class Janitor:
    """A daemon's sweeper of tagged datasets nobody will clean up (see the module doc)."""

    def __init__(self, node: NodeParts, book: FlowBook) -> None:
        self.node = node
        self.book = book  # this node's, for the flows it initiated
        self.swept = 0

    @property
    def period_s(self) -> float:
        return max(1.0, 5 * self.node.config.heartbeat_s)

    def run(self) -> None:
        """Sweep forever; waits for the node to start first (it runs from construction)."""
        while not self.node.ready:
            gevent.sleep(0.05)
        while True:
            try:
                self.sweep()
            except HpcflowError as exc:
                log.info("janitor: %s", exc)
            except Exception:  # never let the sweeper die
                log.exception("janitor sweep failed")
            gevent.sleep(self.period_s)

    def sweep(self) -> int:
        """One pass; returns how many datasets it dropped."""
        node = self.node
        by_initiator: defaultdict[str, list[tuple[DatasetRecord, str, FlowTag]]] = (
            defaultdict(list))
        for rec in node.store.records():
            found = FlowTag.of(rec)
            if found is not None:
                by_initiator[found[1].initiator].append((rec, *found))
        if not by_initiator:
            return 0
        views = {v.info.name: v for v in node.catalog.nodes()}
        drop: list[DatasetRecord] = []
        for initiator, recs in by_initiator.items():
            view = views.get(initiator)
            if view is None or not view.alive:
                continue  # undecidable until it is back
            current = [r for r in recs if r[2].epoch == view.info.epoch]
            drop += [rec for rec, _, tag in recs if tag.epoch != view.info.epoch and not tag.keep]
            if not current:
                continue
            items = [[wf, tag.execution, rec.lineage.get("slice_of", rec.name), tag.keep]
                     for rec, wf, tag in current]
            wanted = self._ask(initiator, view.info.rpc, items)
            drop += [rec for (rec, _, _), ok in zip(current, wanted, strict=True) if not ok]
        for rec in drop:
            try:
                node.store.delete(rec.name, rec.part)
                self.swept += 1
                log.info("janitor: dropped %s (its workflow %s is over)", rec.key,
                         rec.lineage.get("workflow"))
            except (DatasetNotFound, DatasetExists):
                pass  # gone already, or being rewritten right now
        return len(drop)

    def _ask(self, initiator: str, endpoint: str, items: list[Any]) -> list[bool]:
        node = self.node
        if initiator == node.name:
            return self.book.wanted(node.name, items)
        reply = node.peers.call(endpoint, "flow_status", node.name, items)
        if not isinstance(reply, list) or len(reply) != len(items):
            return [True] * len(items)  # a confused peer: keep everything
        return [bool(x) for x in reply]
