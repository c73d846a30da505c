"""The workflow part of the script API: lazy handles, whole-graph planning, reports.

::

    with hpcflow.connect("127.0.0.1:7101") as flow:
        a = flow.run("fft", "DS1")          # lazy handle, nothing runs
        c = flow.run("add", a, flow.run("fft", "DS2"))
        print(flow.explain(c))              # the plan, per step, with bytes and reasons
        result = c.fetch()                  # plans the whole graph, executes, returns numpy
        print(c.plan.bytes_moved, flow.report())

Every step's output is a dataset named ``<workflow id>.<n>.<op>``, kept on the
node that made it (names of that form are reserved for flows: a put of one is
refused); ``handle.save("NAME")`` keeps a copy under a name of your
own (with the output's lineage), and closing the flow removes everything else
it created.  With ``keep=True`` the step outputs stay; reduce partials,
copies of inputs and the results materialised for fetching still go.  What a
failed or abandoned execution leaves on a node that was down is dropped by
that node's janitor (:mod:`hpcflow.daemon.lifecycle`).

A flow's id is a hash of a secret only this flow object knows
(:class:`~hpcflow.rpc.messages.FlowSecret`), sent to the node with ``execute``,
``save`` and ``cleanup``: other scripts see the id (in the catalog's lineage)
but cannot run steps in, save from, clean up or close this flow.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.lock

from ..catalog.record import validate_flag, validate_name
from ..decide.plan import Plan
from ..errors import (
    DatasetNotFound,
    InvalidData,
    ParamError,
    PeerUnavailable,
    PlanningError,
    ProtocolError,
)
from ..rpc.messages import FlowSecret
from ..rpc.traffic import Traffic
from ..wire import unencodable


class Connection(Protocol):
    """What a :class:`Flow` uses of its client (:class:`~hpcflow.client.client.Client`
    is one): calls to the connected node, a fetch, and the bytes received."""

    @property
    def node(self) -> str:
        """The name of the node connected to."""
        ...

    @property
    def traffic(self) -> Traffic: ...

    def _call(self, method: str, *args: Any) -> Any: ...

    def fetch(self, name: str, part: int | None = None, progress: Any = None, *,
              out: Any = None, location: dict[str, Any] | None = None) -> Any: ...

    def metadata(self, name: str, rows: tuple[int, int] | None = None) -> dict[str, Any]: ...


#: Submitted executions one flow keeps in flight; more wait their turn (a node refuses
#: more than its per-connection limit of requests at once).
SUBMIT_CONCURRENCY = 64


@dataclass(frozen=True)
class PlanView:
    """The plan as the node returned it: per-step strategy, transfers, bytes, reasons."""

    raw: dict[str, Any]

    @property
    def bytes_moved(self) -> int:
        return int(self.raw["bytes_moved"])

    @property
    def seconds(self) -> float:
        return float(self.raw["seconds"])

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.raw["steps"])

    def strategy(self, handle: Handle) -> str:
        return str(next(s for s in self.steps if s["out"] == handle.name)["strategy"])

    def explain(self) -> str:
        """The explain table: as the node sent it (``plan``), or formatted here from the
        plan (``execute`` replies leave it out)."""
        if "explain" not in self.raw:
            try:
                self.raw["explain"] = Plan.from_wire(self.raw).explain()
            except (KeyError, TypeError, ValueError) as exc:
                raise ProtocolError(f"malformed plan from the node: {exc!r}") from None
        return str(self.raw["explain"])

    def __str__(self) -> str:
        return self.explain()


@dataclass
class Handle:
    """A lazy step output.  ``fetch()`` runs whatever it still needs and returns it."""

    flow: Flow
    name: str
    op: str
    inputs: tuple[str, ...]
    params: dict[str, Any]
    plan: PlanView | None = None
    #: Where the result's parts lie once executed (None when it came back inline).
    location: dict[str, Any] | None = None
    value: Any = None  # the result itself when it came back inline (small results)
    executed: bool = False
    #: Position among the flow's handles (creation order, which is dependency order).
    seq: int = 0
    #: A running submission (:meth:`Flow.submit`), and the execution claiming this step.
    job: gevent.event.AsyncResult | None = field(default=None, repr=False)
    claim: gevent.event.Event | None = field(default=None, repr=False)

    def fetch(self) -> Any:
        return self.flow._fetch(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        """``np.asarray(handle)``: the result, fetched (it used to be a 0-d object array)."""
        arr = self.fetch()
        return arr if dtype is None else arr.astype(dtype, copy=False)

    def metadata(self) -> dict[str, Any]:
        """The output's H5MD metadata (computing it first if need be): a per-frame result
        (a rowwise op's, one row per input frame) has the time and step of the frames it
        was computed from; see :meth:`~hpcflow.client.client.Client.metadata`."""
        self.flow._done(self)
        return self.flow.client.metadata(self.name)

    def times(self) -> Any:
        """The time of each row of the output (a numpy array), or None when it has no
        time axis (a reduction, data put without one)."""
        return self.metadata()["time"]

    def wait(self) -> Handle:
        """Block until this handle's submission (if any) has run; raise its error."""
        self.flow._done(self)
        return self

    def save(self, name: str, overwrite: bool = False, partitioned: bool | None = None) -> str:
        """Keep this output under ``name`` beyond the flow's life, with its whole lineage.

        ``partitioned=True`` keeps each part on the node that made it, as the parts of
        one saved dataset (nothing moves); ``False`` gathers it whole on the initiator;
        the default is ``True`` when the output is split (more than one part)."""
        if partitioned is not None:
            partitioned = validate_flag(partitioned, "partitioned")
        self.flow._save(self, validate_name(name), validate_flag(overwrite, "overwrite"),
                        partitioned)
        return name

    def __repr__(self) -> str:
        state = "done" if self.executed else "pending"
        return f"<Handle {self.name} = {self.op}({', '.join(self.inputs)}) {state}>"


def _array(d: dict[str, Any]) -> Any:
    """An inline result from the wire (the node checked shape and dtype against the
    op's output model; a reply that does not fit them is a protocol error)."""
    import numpy as np

    try:
        dt = np.dtype(d["dtype"])
        return np.frombuffer(d["data"], dtype=dt).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed inline result: {exc}") from None


@dataclass
class Flow:
    """Workflow state of one client session."""

    client: Connection
    keep: bool = False
    objective: str = "bytes"
    method: str = "optimal"  # or a baseline planner ("greedy", "pull_all"), to compare
    #: Proves to the node that requests for this flow come from this script.
    secret: FlowSecret = field(default_factory=FlowSecret.new, repr=False)
    #: ``wf-`` and a hash of the secret (set from it).
    id: str = field(init=False)
    handles: dict[str, Handle] = field(default_factory=dict)
    created: list[list[Any]] = field(default_factory=list)
    planned: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    moved: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    executions: int = 0
    replans: int = 0
    calls: int = 0
    closed: bool = False
    #: Measured seconds per step output: transfer, compute and wait, summed over nodes.
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds_total: float = 0.0
    _slots: gevent.lock.BoundedSemaphore = field(
        default_factory=lambda: gevent.lock.BoundedSemaphore(SUBMIT_CONCURRENCY), repr=False)

    def __post_init__(self) -> None:
        self.id = self.secret.flow_id

    def run(self, op: str, *inputs: Handle | str, **params: Any) -> Handle:
        if not isinstance(op, str) or not op:
            raise InvalidData("op must be a name")
        names = []
        for x in inputs:
            if isinstance(x, Handle):
                if x.flow is not self:
                    raise InvalidData(f"{x.name} belongs to another flow")
                names.append(x.name)
            else:
                names.append(validate_name(x))
        if not names:
            raise InvalidData(f"{op} needs at least one input")
        for key, value in params.items():  # refused here, not as msgpack's TypeError later
            why = unencodable(value)
            if why is not None:
                hint = f" (numpy: pass {key}.tolist())" if hasattr(value, "tolist") else ""
                raise ParamError(f"{op}: parameter {key!r} cannot be sent ({why}): use "
                                 f"numbers, strings, booleans, lists and dicts{hint}")
        name = f"{self.id}.{len(self.handles) + 1}.{op}"
        validate_name(name)
        h = Handle(self, name, op, tuple(names), dict(params), seq=len(self.handles))
        self.handles[name] = h
        return h

    def _pending(self, target: Handle) -> list[Handle]:
        """Unexecuted handles ``target`` depends on, in creation (= dependency) order."""
        need: set[str] = set()
        stack = [target.name]
        while stack:
            h = self.handles[stack.pop()]
            if h.executed or h.name in need:
                continue
            need.add(h.name)
            stack += [i for i in h.inputs if i in self.handles]
        # Creation order is dependency order: sort what is needed by it rather than walk
        # every handle the flow ever made.
        return sorted((self.handles[n] for n in need), key=lambda h: h.seq)

    def _request(self, target: Handle, method: str | None = None,
                 deliver: bool = True) -> dict[str, Any]:
        """``deliver=False``: plan for ``target`` to stay where it is made (no delivery to
        the initiator is counted, none inline): a save of a result not fetched."""
        steps = [{"out": h.name, "op": h.op, "inputs": list(h.inputs), "params": h.params}
                 for h in self._pending(target)]
        return {"wf": self.id, "steps": steps, "deliver": [target.name] if deliver else [],
                "objective": self.objective, "method": method or self.method, "keep": self.keep}

    def explain(self, target: Handle, method: str | None = None) -> str:
        """The plan for everything ``target`` still needs, without running it."""
        _handle(target)
        if target.executed:
            return f"{target.name} is already computed"
        return PlanView(self.client._call("plan", self._request(target, method))).explain()

    def plan(self, target: Handle, method: str | None = None) -> PlanView:
        _handle(target)
        return PlanView(self.client._call("plan", self._request(target, method)))

    def submit(self, op: str, *inputs: Handle | str, **params: Any) -> Handle:
        """Like :meth:`run`, but start executing now, without waiting: many independent
        submissions run concurrently.  ``handle.fetch()`` (or :func:`gather`) waits."""
        h = self.run(op, *inputs, **params)
        job: gevent.event.AsyncResult = gevent.event.AsyncResult()

        def go() -> None:
            try:
                with self._slots:  # at most SUBMIT_CONCURRENCY executions in flight
                    self._execute(h)
                job.set(None)
            except BaseException as exc:  # handed to whoever waits for the handle
                job.set_exception(exc)

        h.job = job
        gevent.spawn(go)
        return h

    def _execute(self, target: Handle, deliver: bool = True) -> None:
        """Plan and run what ``target`` still needs.  Steps another execution of this
        flow is running (a concurrent submission) are waited for, not run twice.

        Intermediates live in their nodes' memory: an output this flow computed
        earlier may be gone (its node restarted).  Then it is computed again from
        its lineage (the handles that made it), once, before the error stands."""
        for attempt in (1, 2):
            while True:
                pending = self._pending(target)
                busy = [h.claim for h in pending if h.claim is not None]
                if not busy:
                    break
                gevent.wait(busy, count=1)
            if not pending:
                return
            claim = gevent.event.Event()
            for h in pending:
                h.claim = claim
            try:
                self._execute_pending(target, pending, deliver)
                return
            except (DatasetNotFound, PlanningError):
                inputs = {i for h in pending for i in h.inputs if i in self.handles}
                if attempt == 2 or not self._forget_lost(self.handles[i] for i in inputs):
                    raise
            finally:
                for h in pending:
                    h.claim = None
                claim.set()

    def _forget_lost(self, handles: Iterable[Handle]) -> bool:
        """Mark executed handles whose output is no longer complete on live nodes as not
        executed (so they are computed again); True if there was any."""
        lost = False
        for h in handles:
            if not h.executed or h.value is not None or h.claim is not None:
                continue
            try:
                complete = bool(self.client._call("locate", h.name)["complete"])
            except DatasetNotFound:
                complete = False
            if not complete:
                h.executed, h.location, h.plan = False, None, None
                lost = True
        return lost

    def _execute_pending(self, target: Handle, pending: list[Handle],
                         deliver: bool = True) -> None:
        if self.closed:
            raise InvalidData(f"flow {self.id} is closed: start a new one (connect again)")
        req = {**self._request(target, deliver=deliver), "secret": self.secret.to_wire()}
        reply = self.client._call("execute", req)
        view, ex = PlanView(reply["plan"]), reply["execution"]
        self.executions += 1
        self.replans += int(bool(reply.get("replanned")))
        self.calls += int(ex["calls"])
        self.created += ex["created"]
        for t in view.raw["steps"]:
            for tr in t["transfers"]:
                self.planned[f"{tr['src']}->{tr['dst']}"] += tr["nbytes"]
        for tr in view.raw["delivery"]:
            self.planned[f"{tr['src']}->{tr['dst']}"] += tr["nbytes"]
        for link, n in ex["moved"].items():
            self.moved[link] += n
        for out, kinds in (ex.get("steps") or {}).items():
            self.seconds[out] = {k: round(v, 6) for k, v in kinds.items()}
        self.seconds_total += float(ex.get("seconds", 0.0))
        for h in pending:
            h.executed, h.plan = True, view
        inline = ex.get("inline") or {}
        if target.name in inline:
            target.value = _array(inline[target.name])
        else:  # not delivered (deliver=False): located in the catalog when fetched
            target.location = ex["results"].get(target.name)

    def _done(self, target: Handle, deliver: bool = True) -> None:
        """Wait for a submission of ``target``, or run what it still needs (``deliver``:
        planned to reach the initiator, as for a fetch)."""
        if target.job is not None:
            target.job.get()
        if not target.executed:
            self._execute(target, deliver)

    def _fetch(self, target: Handle) -> Any:
        self._done(target)
        if target.value is not None:
            return target.value.copy()  # the caller may modify what it gets
        # Pulled straight from the holders; a location from the execution saves a locate,
        # and an output computed as another's input is located in the catalog.
        planned = target.location is not None
        before = dict(self.client.traffic.bytes_received)
        try:
            arr = self.client.fetch(target.name, location=target.location)
        except (DatasetNotFound, PeerUnavailable):
            if not self._forget_lost([target]):
                raise
            self._execute(target)  # its node lost it: compute it again
            if target.value is not None:
                return target.value.copy()
            planned = target.location is not None
            arr = self.client.fetch(target.name, location=target.location)
        for holder, n in self.client.traffic.bytes_received.items():
            got = n - before.get(holder, 0)
            if got and holder != self.client.node:
                link = f"{holder}->{self.client.node}"
                self.moved[link] += got
                if not planned:  # no plan said it would move: it moves as asked
                    self.planned[link] += got
        return arr

    def _save(self, target: Handle, name: str, overwrite: bool = False,
              partitioned: bool | None = None, restore: bool = False) -> dict[str, Any]:
        # Not run yet, and saved in parts: planned to stay where it is made, so a step
        # that grows its data (fft) runs on the holders instead of pulling its input
        # to the initiator for a delivery nobody asked for.
        self._done(target, deliver=not (partitioned or (
            partitioned is None and self._splits_in_place(target))))
        reply: dict[str, Any] = self.client._call(
            "save", self.id, target.name, name, overwrite, self.secret.to_wire(),
            {"partitioned": partitioned, "restore": restore})
        for link, n in reply["moved"].items():
            self.moved[link] += n
            self.planned[link] += n
        return reply

    def _splits_in_place(self, target: Handle) -> bool:
        """Whether ``target``, not run yet, would be made in several parts if it stays
        where it is made (then a save keeps it partitioned; the plan is cached for the
        execution that follows)."""
        if target.executed or target.job is not None:
            return False
        plan = self.client._call("plan", self._request(target, deliver=False))
        step = next((s for s in plan["steps"] if s["out"] == target.name), None)
        return step is not None and sum(w["mode"] == "part" for w in step["work"]) > 1

    def report(self) -> dict[str, Any]:
        """Planned vs actually moved bytes per link, over every execution so far.

        ``moved`` counts everything that crossed the network, including what an
        attempt abandoned for a re-plan had moved (so after a re-plan it can
        exceed ``planned``, which is the plans that ran to the end).  ``seconds``
        gives each step's measured seconds by kind: ``transfer`` (pulling its
        inputs), ``compute`` (reading local rows and running the op) and
        ``wait`` (for earlier steps and for copies other nodes make), summed over
        the nodes that ran it; ``seconds_total`` is the executions' wall time on
        the initiator."""
        return {"workflow": self.id, "executions": self.executions, "replans": self.replans,
                "calls": self.calls,
                "bytes_planned": sum(self.planned.values()),
                "bytes_moved": sum(self.moved.values()),
                "planned": dict(self.planned), "moved": dict(self.moved),
                "seconds": {k: dict(v) for k, v in self.seconds.items()},
                "seconds_total": round(self.seconds_total, 6)}

    def close(self) -> int:
        """Close the flow: remove what it created on every node, except (with ``keep``)
        the step outputs.  Submissions still running are not waited for: what they
        make is dropped by the nodes' janitors once they finish (the initiator says
        the flow is closed)."""
        self.closed = True
        if not self.handles and not self.created:
            return 0
        kept = set(self.handles) if self.keep else set()
        items = [c for c in self.created if c[1] not in kept]
        removed = int(self.client._call("cleanup", items, self.id, self.secret.to_wire()))
        self.created = []
        return removed


def _handle(value: object) -> Handle:
    if not isinstance(value, Handle):
        raise InvalidData(f"expected a handle (from run or submit), got {type(value).__name__}")
    return value


def gather(handles: Iterable[Handle]) -> list[Any]:
    """The results of ``handles`` (submitted or not), in order; the first error raises
    once every submission has finished."""
    try:
        hs = [_handle(h) for h in handles]
    except TypeError:
        raise InvalidData(f"gather wants an iterable of handles, got {type(handles).__name__}"
                          ) from None
    jobs = [h.job for h in hs if h.job is not None]
    gevent.wait(jobs)
    return [h.fetch() for h in hs]
