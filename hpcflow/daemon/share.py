"""A node runs its share of an execution (see :mod:`hpcflow.rpc.messages`), without the initiator.

Steps with tasks here start once the steps they depend on have finished
here; a step runs its phases in order and the tasks of one phase at once.
Pulls of data that exists before the execution (inputs, not outputs) start
at once, whatever step they serve: transfers overlap with earlier steps'
compute, and a step's units start while its pulls still land (a rowwise op
computes on row blocks as they arrive, :mod:`.stream`; other ops wait for them).
An input made elsewhere in this execution is waited for through the catalog
(its maker announces it), as long as it takes: the initiator cancels the
share if another node fails.  On failure or cancellation the share removes
what it created here before it answers, so a re-plan starts clean.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import gevent
import gevent.event

from ..errors import DatasetNotFound, HpcflowError, InvalidData, to_wire
from ..rpc.messages import PHASES, PullTask, RunTask, Share, ShareReply, Task
from .parts import NodeParts, RowWork

log = logging.getLogger("hpcflow.share")

#: How long a task waits for an input another node of this execution makes (the
#: initiator cancels sooner when a node fails).
MADE_HERE_WAIT_S = 24 * 3600.0


class ShareCancelled(HpcflowError):
    """The initiator cancelled this share (another node failed, or the flow ended)."""


class Shares:
    """The shares running on this node, by execution id."""

    def __init__(self, node: NodeParts, worker: RowWork) -> None:
        self.node = node
        self.worker = worker
        self.running: dict[str, gevent.Greenlet] = {}

    def run(self, share: Share) -> ShareReply:
        if share.execution in self.running:
            raise InvalidData(f"execution {share.execution} already has a share here")
        reply = ShareReply()
        t0 = time.monotonic()
        g = gevent.spawn(_Runner(self.node, self.worker, share, reply).run)
        self.running[share.execution] = g
        try:
            g.join()
        finally:
            if not g.ready():  # our own call was ended (node stopping): end the share too
                g.kill()
            self.running.pop(share.execution, None)
        reply.wall_s = time.monotonic() - t0
        for (_, phase), seconds in reply.seconds.items():
            self.worker.events.step(phase, seconds)
        exc = g.exception
        if isinstance(exc, gevent.GreenletExit) or (g.ready() and not g.successful()
                                                    and exc is None):
            exc = ShareCancelled(f"share of {share.execution} on {self.node.name} cancelled")
        if exc is not None:  # what it made is gone; what it moved is still reported
            if not isinstance(exc, HpcflowError):
                log.warning("share of %s failed: %s: %s", share.execution,
                            type(exc).__name__, exc)
            reply.error = to_wire(exc)
            reply.created, reply.runs = [], []
        return reply

    def cancel(self, execution: str) -> bool:
        g = self.running.get(execution)
        if g is None:
            return False
        g.kill(block=True, timeout=30)
        return True


class _Runner:
    def __init__(self, node: NodeParts, worker: RowWork, share: Share, reply: ShareReply
                 ) -> None:
        self.node = node
        self.worker = worker
        self.share = share
        self.reply = reply
        self.by_step: dict[int, list[list[Task]]] = defaultdict(lambda: [[] for _ in range(PHASES)])
        for t in share.tasks:
            self.by_step[t.step][t.phase].append(t)

    def run(self) -> None:
        done = {k: gevent.event.Event() for k in self.by_step}
        # Pulls of pre-existing data depend on nothing: start them all now.
        early = {k: [gevent.spawn(self._task, t) for t in phases[0] if not t.made_here]
                 for k, phases in self.by_step.items()}
        greenlets = [gevent.spawn(self._step, k, done, early[k]) for k in sorted(self.by_step)]
        everything = greenlets + [g for gs in early.values() for g in gs]
        try:
            gevent.joinall(greenlets, raise_error=True)
        except BaseException:
            gevent.killall(everything)
            self._remove_created()
            raise

    def _step(self, k: int, done: dict[int, gevent.event.Event],
              early: list[gevent.Greenlet]) -> None:
        t0 = time.monotonic()
        for j in self.share.depends[k]:
            if j in done:
                done[j].wait()
        self.reply.spent(k, "wait", time.monotonic() - t0)
        first, units, *rest = self.by_step[k]
        self._phase([t for t in first if t.made_here])
        feeding = [g for g in early if not g.ready()]
        try:  # the units start while the pulls still land (rowwise ones use the first rows)
            self._phase(units, feeding)
        except BaseException:
            failed = [g.exception for g in early if g.ready() and g.exception is not None]
            if failed:  # the pull's error is the cause, not the unit's missing rows
                raise failed[0] from None
            raise
        gevent.joinall(early, raise_error=True)
        for phase in rest:
            self._phase(phase)
        done[k].set()

    def _phase(self, phase: list[Task], feeding: list[gevent.Greenlet] | None = None) -> None:
        if len(phase) == 1:
            self._task(phase[0], feeding or [])
        elif phase:
            jobs = [gevent.spawn(self._task, t, feeding or []) for t in phase]
            try:
                gevent.joinall(jobs, raise_error=True)
            finally:
                gevent.killall(jobs)

    def _task(self, t: Task, feeding: list[gevent.Greenlet] | None = None) -> None:
        wait = MADE_HERE_WAIT_S if t.made_here else None
        worker = self.worker
        t0 = time.monotonic()
        if isinstance(t, PullTask):
            if t.src is not None and t.src != self.node.name and t.made_here:
                self._wait_for_source(t)
                self.reply.spent(t.step, "wait", time.monotonic() - t0)
                t0 = time.monotonic()
            created, moved = worker.pull(t.obj, t.rows, t.src, self.share.tag, wait)
            self.reply.spent(t.step, "transfer", time.monotonic() - t0)
            for rec in created:
                self.reply.created.append((self.node.name, rec.name, rec.part))
            for src, n in moved.items():
                self.reply.moved[src] = self.reply.moved.get(src, 0) + n
        else:
            assert isinstance(t, RunTask)
            out = worker.run(t.request, wait, feeding or [])
            self.reply.spent(t.step, "compute", time.monotonic() - t0)
            rec = out.record
            self.reply.created.append((self.node.name, rec.name, rec.part))
            self.reply.runs.append(out)

    def _wait_for_source(self, t: PullTask) -> None:
        """The plan reads ``t.obj`` from ``t.src``'s copy, which this execution makes:
        wait until the catalog shows ``src`` holding those rows (else the pull would take
        another holder's bytes, and the link the plan counted would not be the one used)."""
        cat = self.node.catalog
        if not cat.wait_until(
                lambda: _holds([*cat.records_named(t.obj), *cat.slices_of(t.obj)], t),
                MADE_HERE_WAIT_S):
            raise DatasetNotFound(f"{t.src} never held {t.obj}")

    def _remove_created(self) -> None:
        store = self.node.store
        for _, name, part in self.reply.created:
            try:
                store.delete(name, part)
            except HpcflowError as exc:  # already gone, or being rewritten: best effort
                log.debug("share clean-up of %s: %s", name, exc)


def _holds(records: Any, t: PullTask) -> bool:
    lo, hi = t.rows if t.rows is not None else (0, None)
    for rec in records:
        if rec.owner != t.src:
            continue
        if rec.name == t.obj:  # a copy of (a part of) the dataset itself
            return True
        rows = rec.lineage.get("slice_of") == t.obj and rec.lineage.get("rows")
        if rows and rows[0] <= lo and (hi is None or hi <= rows[1]):
            return True
    return False


__all__ = ["ShareCancelled", "Shares"]
