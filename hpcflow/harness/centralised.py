"""The centralised baseline: one orchestrator routes every step and every output.

Modelled on the locality-aware orchestrator of "Big Data Workflows:
Locality-Aware Orchestration Using Software Containers" (shared/reference/003)
and the thesis' centralised approach ("a central instance which will
orchestrate operation delegation and operation output forwarding"):

* **registration** — at start the orchestrator collects every node's own
  inventory (which parts of which datasets it holds);
* **routing** (the paper's greedy variant) — each step goes to the node with
  the least *data distance* among nodes with fewer than ``threshold`` active
  operations (the paper's load threshold, default 3); if every node is at the
  threshold the step waits for a slot.  The paper measures distance between
  the host of a data unit and a pod's host (0 on the same host, else a zone
  distance); a step here has several inputs split over several hosts, so the
  distance is the input bytes the node does not hold.  Ties go to the node
  holding more of the input, then by name.  Link bandwidth is not weighed: in
  this baseline every missing byte crosses the orchestrator's own two links
  whichever node is chosen.  Steps whose inputs are ready are dispatched
  concurrently, so the threshold binds when a workflow fans out;
* **forwarding** (the thesis' centralised approach, not the paper, whose
  agents fetch from data adapters) — input rows the executor lacks travel
  *through the orchestrator* (holder -> orchestrator -> executor), and every
  operation output returns to the orchestrator, which forwards it to the next
  executor that needs it and finally to the initiator.  Each slice is fetched
  from its holder once and uploaded to a given node once, however many
  concurrent steps there need it.

Every byte through the orchestrator is counted by its bulk client: links are
``"NODE->orch"`` and ``"orch->NODE"``.  ``step_node`` records where each step
ran.  It reuses the daemons' node-side primitives (``run_op`` on local data,
bulk fetch and upload) but none of the decentralised catalog or planner.
Outputs and forwarded input slices are held in the orchestrator's memory
(scenario sizes); a production orchestrator would spool them to disk.

On a cluster with keys the orchestrator is part of the cluster, not a script:
it holds the node key (``keys``, default ``$HPCFLOW_KEYS``), which ``run_op``,
``delete_parts`` and uploads of slices (lineage ``slice_of``/``rows``) need.
"""

from __future__ import annotations

import logging
import operator
import uuid
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import gevent
import gevent.event
import numpy as np

from ..catalog.chunking import DEFAULT_CHUNK_BYTES, Payload
from ..catalog.record import DatasetRecord
from ..errors import ConfigError
from ..rpc import auth
from ..rpc.bulk import BulkClient, BulkSettings
from ..rpc.calls import PeerClients
from ..rpc.messages import RunReply
from ..rpc.traffic import Traffic
from .scenario import ORCH_HOST, Scenario

log = logging.getLogger("hpcflow.centralised")

ORCH = ORCH_HOST
DEFAULT_THRESHOLD = 3


def check_threshold(threshold: object) -> int:
    """The load threshold as an int >= 1, or a ConfigError saying why not."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"--threshold must be an integer >= 1 (active operations per node "
                          f"before the orchestrator passes it over), got {threshold!r}")
    return threshold


@dataclass
class _Object:
    """A dataset or step output as the orchestrator tracks it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    parts: list[tuple[int, int, list[DatasetRecord]]] = field(default_factory=list)
    on: set[str] = field(default_factory=set)  # nodes holding all rows
    data: np.ndarray[Any, Any] | None = None  # an output, held by the orchestrator

    def rows_on(self, node: str) -> int:
        if node in self.on:
            return self.shape[0] if self.shape else 1
        return sum(hi - lo for lo, hi, recs in self.parts if any(r.owner == node for r in recs))

    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


class Orchestrator:
    def __init__(self, nodes: dict[str, str], initiator: str, *,
                 threshold: int = DEFAULT_THRESHOLD, timeout_s: float = 60.0,
                 keys: str | auth.Keys | None = None) -> None:
        self.nodes, self.initiator = nodes, initiator
        self.threshold = check_threshold(threshold)
        self.keys = auth.load(keys, auth.NODE)
        self.ctx = auth.context(self.keys)
        self.traffic = Traffic()
        self.bulk = BulkClient(self.ctx, self.traffic, ORCH, BulkSettings(timeout_s=timeout_s))
        self.rpc = PeerClients(timeout_s, context=self.ctx if self.keys is not None else None)
        self.bulk_ep: dict[str, str] = {}
        self.objects: dict[str, _Object] = {}
        self.active: defaultdict[str, int] = defaultdict(int)
        self.slot_free = gevent.event.Event()
        self.created: list[tuple[str, str, int | None]] = []
        self.step_node: dict[str, str] = {}
        self._once_results: dict[Hashable, gevent.event.AsyncResult] = {}
        self.calls = 0
        self.id = f"c-{uuid.uuid4().hex[:8]}"

    def _call(self, node: str, method: str, *args: Any) -> Any:
        self.calls += 1
        return self.rpc.call(self.nodes[node], method, *args, timeout_s=24 * 3600.0)

    # -- registration ----------------------------------------------------------
    def register(self) -> None:
        """Every node reports its own inventory (nothing else of the catalog is used)."""
        found: dict[str, dict[int | None, list[DatasetRecord]]] = defaultdict(dict)
        for node in self.nodes:
            info = self._call(node, "info")
            self.bulk_ep[node] = info["endpoints"]["bulk"]
            for d in self._call(node, "catalog")["records"]:
                rec = DatasetRecord.from_wire(d)
                if rec.owner == node:
                    found[rec.name].setdefault(rec.part, []).append(rec)
        for name, parts in found.items():
            ordered = sorted(parts.items(), key=lambda kv: -1 if kv[0] is None else kv[0])
            first = ordered[0][1][0]
            obj = _Object(name, (0, *first.shape[1:]), np.dtype(first.dtype))
            row = 0
            for _, recs in ordered:
                obj.parts.append((row, row + recs[0].rows, recs))
                row += recs[0].rows
            obj.shape = (row, *first.shape[1:])
            self.objects[name] = obj

    # -- routing -----------------------------------------------------------------
    def _distance(self, node: str, inputs: list[str]) -> tuple[int, int]:
        missing = held = 0
        for name in inputs:
            obj = self.objects[name]
            have = obj.rows_on(node)
            rows = obj.shape[0] if obj.shape else 1
            missing += (rows - have) * obj.row_bytes()
            held += have * obj.row_bytes()
        return missing, -held

    def _choose(self, inputs: list[str]) -> str:
        while True:
            free = [n for n in sorted(self.nodes) if self.active[n] < self.threshold]
            if free:
                return min(free, key=lambda n: self._distance(n, inputs))
            self.slot_free.clear()
            self.slot_free.wait()

    # -- data movement through the orchestrator ------------------------------------
    def _once(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """``fn()`` at most once per key; concurrent callers wait for the first one's outcome.

        Steps run as concurrent greenlets, so two of them routed to one node can
        both need the same slice there: without this they would fetch it twice
        and upload it twice (the second upload fails with DatasetExists).
        """
        result = self._once_results.get(key)
        if result is None:
            result = self._once_results[key] = gevent.event.AsyncResult()
            try:
                value = fn()
            except BaseException as exc:
                result.set_exception(exc)
                raise
            result.set(value)
        return result.get()

    def _ensure(self, name: str, node: str) -> None:
        """Forward whatever rows of ``name`` ``node`` lacks, through the orchestrator."""
        obj = self.objects[name]
        if node not in obj.on:
            self._once(("forward", name, node), partial(self._forward, obj, node))

    def _forward(self, obj: _Object, node: str) -> None:
        pieces: list[tuple[int, int, np.ndarray[Any, Any]]] = []
        if obj.data is not None:  # an output we hold: forward it whole
            pieces.append((0, obj.shape[0], obj.data))
        else:
            for lo, hi, recs in obj.parts:
                if hi > lo and not any(r.owner == node for r in recs):
                    pieces.append((lo, hi, self._once(("fetch", obj.name, lo, hi),
                                                      partial(self._fetch, recs[0]))))
        for lo, hi, arr in pieces:
            # Found by its lineage; the NAME:rowsLO-HI form is reserved for the daemons.
            slice_name = f"{self.id}.{node}.{obj.name}.rows{lo}-{hi}"
            self.bulk.upload(self.bulk_ep[node], node, slice_name, arr.shape, arr.dtype,
                             partial(operator.getitem, arr), chunk_bytes=DEFAULT_CHUNK_BYTES,
                             lineage={"slice_of": obj.name, "rows": [lo, hi]})
            self.created.append((node, slice_name, None))
        obj.on.add(node)

    def _fetch(self, rec: DatasetRecord, bulk: BulkClient | None = None) -> np.ndarray[Any, Any]:
        out = np.empty(rec.shape, dtype=np.dtype(rec.dtype))
        flat = out.reshape(-1).view(np.uint8)

        def deliver(i: int, off: int, buf: Payload, d: int) -> None:
            buf.copy_into(flat, off)

        (bulk or self.bulk).fetch(self.bulk_ep[rec.owner], rec.owner, rec, deliver)
        return out

    # -- execution -------------------------------------------------------------------
    def _step(self, out: str, op: str, inputs: list[str], params: dict[str, Any]) -> None:
        node = self._choose(inputs)
        self.active[node] += 1
        try:
            for name in dict.fromkeys(inputs):
                self._ensure(name, node)
            stored = f"{self.id}.{out}"
            d = self._call(node, "run_op", {
                "op": op, "mode": "whole", "params": params, "out": stored,
                "inputs": [{"name": self.objects[n].name} for n in inputs],
                "lineage": {"workflow": self.id}})
            rec = RunReply.from_wire(d).record
            self.created.append((node, rec.name, rec.part))
            data = self._fetch(rec)  # every output returns through the orchestrator
        finally:
            self.active[node] -= 1
            self.slot_free.set()
        obj = _Object(stored, tuple(data.shape), data.dtype, [], {node}, data)
        obj.parts = [(0, data.shape[0] if data.shape else 1, [rec])]
        self.objects[out] = obj
        self.step_node[out] = node
        log.info("step %s (%s) ran on %s", out, op, node)

    def run(self, scenario: Scenario) -> np.ndarray[Any, Any]:
        self.register()
        done: dict[str, gevent.event.Event] = {s.out: gevent.event.Event() for s in scenario.steps}

        def job(step: Any) -> None:
            for name in step.inputs:
                if name in done:
                    done[name].wait()
            self._step(step.out, step.op, list(step.inputs), dict(step.params))
            done[step.out].set()

        greenlets = [gevent.spawn(job, s) for s in scenario.steps]
        try:
            gevent.joinall(greenlets, raise_error=True)
        finally:
            gevent.killall(greenlets)
        # Finally the result is forwarded to the script on the initiator.
        self._ensure(scenario.result, self.initiator)
        result = self.objects[scenario.result]
        if result.data is not None:
            return result.data
        # The result is an input dataset, now all on the initiator: the rows that were
        # there already are read back only to check the result, so they are not counted.
        check = BulkClient(self.ctx, Traffic(), ORCH, self.bulk.settings)
        return np.concatenate([
            self._once(("fetch", result.name, lo, hi), partial(self._fetch, recs[0], check))
            for lo, hi, recs in result.parts])

    def cleanup(self) -> None:
        by_node: dict[str, list[list[Any]]] = defaultdict(list)
        for node, name, part in self.created:
            by_node[node].append([name, part])
        for node, items in by_node.items():
            self._call(node, "delete_parts", items)

    def links(self) -> dict[str, int]:
        out = {f"{n}->{ORCH}": b for n, b in self.traffic.bytes_received.items() if b}
        out.update({f"{ORCH}->{n}": b for n, b in self.traffic.bytes_sent.items() if b})
        return out

    def close(self) -> None:
        self.rpc.close()
        self.ctx.destroy(linger=0)
