"""Plans an initiator made, reused while nothing they depend on changed.

A script that runs the same small op again and again asks for the same plan
each time, under new output names.  A plan depends only on the steps (ops,
parameters, which inputs are datasets and which are earlier outputs), the
objective and method, where the source datasets' parts live, which ops each
live node has (by definition hash), and the cost model (links, learned fixed
costs, and load under the time objective); the key is exactly those, with
output names replaced by their step positions.  Learned costs reach the key
only when they move by more than a factor of two
(:meth:`~hpcflow.daemon.learned.Learned.stable_costs`).  A hit returns the
cached plan with the outputs renamed; anything that changes a part's holders,
a node's ops or the learned links is another key.  Under the bytes objective,
a plan whose key differs only in the learned costs is served at once while
the search under the new costs runs in the background, at most every 10 s
(:meth:`PlanCache.get_or_make`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import gevent
import gevent.event

from ..decide import CostModel, Placement, Plan, Step
from ..ops import ModelCache, OpRegistry
from ..ops.spec import constant_bytes

log = logging.getLogger("hpcflow.plancache")


def _step_key(steps: Sequence[Step]) -> tuple[Any, ...] | None:
    position = {s.out: i for i, s in enumerate(steps)}
    out = []
    for s in steps:
        params = constant_bytes(dict(s.params))
        if params is None:
            return None  # parameters we cannot compare exactly: never cached
        ins = tuple(("step", position[n]) if n in position else ("data", n) for n in s.inputs)
        out.append((s.op, ins, params))
    return tuple(out)


def plan_key(steps: Sequence[Step], deliver: Sequence[str], objective: str, method: str,
             initiator: str, placement: Placement, node_ops: Mapping[str, Mapping[str, str]],
             cost: CostModel, registry: OpRegistry) -> tuple[Any, ...] | None:
    """What a plan depends on, or None when it cannot be compared (never cached)."""
    skey = _step_key(steps)
    if skey is None:
        return None
    position = {s.out: i for i, s in enumerate(steps)}
    return (
        skey, tuple(position[d] for d in deliver), objective, method, initiator,
        tuple(sorted(placement.datasets.items())),
        tuple(sorted((n, tuple(sorted(ops.items()))) for n, ops in node_ops.items())),
        tuple(registry.get(s.op).definition_hash for s in steps),
        # Under the bytes objective load only breaks ties between plans that move the
        # same bytes: a plan made under other load is still a fewest-bytes plan, and
        # load changes with every heartbeat.
        (replace(cost, load={}) if objective == "bytes" else cost).fingerprint(),
    )


class PlanCache:
    """The last ``size`` plans by :func:`plan_key`, and the op output models they used."""

    def __init__(self, size: int = 256, refresh_every_s: float = 10.0) -> None:
        self.size = size
        self._plans: OrderedDict[tuple[Any, ...], tuple[Plan, tuple[str, ...]]] = OrderedDict()
        self.models = ModelCache()
        self.hits = 0
        self.misses = 0
        self._making: dict[tuple[Any, ...], gevent.event.Event] = {}
        #: Plans served while a re-plan under moved costs ran in the background.
        self.stale = 0
        #: The newest key of each (steps, data, ops) under the bytes objective: a key
        #: without its last item, the cost model's fingerprint.
        self._latest: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        #: At most one background re-plan per (steps, data, ops) this often (seconds).
        self.refresh_every_s = refresh_every_s
        self._refresh_at: dict[tuple[Any, ...], float] = {}

    def get(self, key: tuple[Any, ...] | None, steps: Sequence[Step]) -> Plan | None:
        found = self._plans.get(key) if key is not None else None
        if key is None or found is None:
            self.misses += 1
            return None
        self._plans.move_to_end(key)
        self.hits += 1
        return _renamed(found, steps)

    def get_or_make(self, key: tuple[Any, ...] | None, steps: Sequence[Step],
                    make: Callable[[], Plan], stale_ok: bool = True) -> Plan:
        """The cached plan for ``key``, else ``make()``'s (then cached).  Requests for a
        key being planned wait for that plan rather than plan it again: a script that
        submits hundreds of the same op at once pays for one search, not hundreds.

        Under the bytes objective, when only the learned costs moved since a plan for the
        same steps, data and ops was made, that plan is returned at once (it still moves
        the fewest bytes: costs only break ties between equal-byte plans) and the search
        under the new costs runs in the background for later requests, at most once every
        ``refresh_every_s`` per steps, data and ops (learned costs wobble under load, and
        each search takes CPU from the executions this node runs)."""
        if stale_ok and key is not None and key not in self._plans and _bytes(key):
            stale = self._plans.get(self._latest.get(key[:-1], ()))
            if stale is not None:
                self.stale += 1
                now = time.monotonic()
                # One search at a time, and not often: it runs beside the executions this
                # node serves (and takes the GIL from them), for a tie-break.
                if key not in self._making and now >= self._refresh_at.get(key[:-1], 0.0):
                    self._refresh_at[key[:-1]] = now + self.refresh_every_s
                    gevent.spawn(self._refresh, key, list(steps), make)
                return _renamed(stale, steps)
        while key is not None and key in self._making:
            self._making[key].wait()
        plan = self.get(key, steps)
        if plan is not None:
            return plan
        if key is None:
            return make()
        done = self._making[key] = gevent.event.Event()
        try:
            plan = make()
            self.put(key, steps, plan)
            return plan
        finally:
            del self._making[key]
            done.set()

    def _refresh(self, key: tuple[Any, ...], steps: list[Step],
                 make: Callable[[], Plan]) -> None:
        try:
            self.get_or_make(key, steps, make, stale_ok=False)
        except Exception as exc:  # the next request plans (and reports) it itself
            log.info("background re-plan failed: %s: %s", type(exc).__name__, exc)

    def put(self, key: tuple[Any, ...] | None, steps: Sequence[Step], plan: Plan) -> None:
        if key is None:
            return
        self._plans[key] = (plan, tuple(s.out for s in steps))
        if _bytes(key):
            self._latest[key[:-1]] = key
        while len(self._plans) > self.size:
            old, _ = self._plans.popitem(last=False)
            if self._latest.get(old[:-1]) == old:
                del self._latest[old[:-1]]
                self._refresh_at.pop(old[:-1], None)


def _bytes(key: tuple[Any, ...]) -> bool:
    return key[2] == "bytes"  # see plan_key: (steps, deliver, objective, ..., cost)


def _renamed(found: tuple[Plan, tuple[str, ...]], steps: Sequence[Step]) -> Plan:
    plan, outs = found
    return plan.renamed(dict(zip(outs, (s.out for s in steps), strict=True)))


__all__ = ["PlanCache", "plan_key"]
