"""The execution protocol between an initiator and the nodes of a plan: typed messages.

An initiator turns a plan into one :class:`Share` per participating node and
sends each its share once (``run_share``).  A share is the node's tasks in
plan order: :class:`PullTask` (make rows of a dataset local, from the source
the plan chose) and :class:`RunTask` (run one unit of an op on local rows).
Each task belongs to a step and a *phase* of it (0: the step's data pulls,
1: its units, 2: pulls of reduce partials to the combiner, 3: the combine);
a node runs a step's phases in order and its steps as soon as the steps they
depend on have finished *here*.  Inputs made on other nodes are waited for
through the catalog, where their makers announce them: no round trip to the
initiator between steps.  The node answers with a :class:`ShareReply` (what
it created, the bytes it received from each source, and the replies of its
units, small delivered results inline); a share that fails or is cancelled
(``cancel_share``) first removes what it created on its node.

A share's units are :class:`RunRequest` (answered by :class:`RunReply`), the
same messages a single ``run_op`` call carries.  Every message is a
dataclass with ``to_wire``/``from_wire``, defined here once and used by both
ends.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..catalog.record import (
    DatasetRecord,
    validate_dtype,
    validate_name,
    validate_part,
    validate_shape,
)
from ..errors import InvalidData, NotFlowOwner, ProtocolError

MODES = ("whole", "part", "partial", "combine")
#: The most bytes of an output a ``run_op`` reply may carry inline (see RunRequest.inline).
MAX_INLINE = 1 << 20
PHASES = 4
MAX_TASKS = 100_000


#: A flow's id: ``wf-`` and 24 hex digits (96 bits) of a hash of the flow's secret.
FLOW_ID = re.compile(r"wf-[0-9a-f]{24}")
_SECRET = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FlowSecret:
    """What proves a request comes from the script that created a flow.

    The script draws 32 random bytes (:meth:`new`) and names its flow after a hash
    of them (:attr:`flow_id`, ``wf-`` and 24 hex digits): the id, which every
    client can read in the catalog (the lineage of the flow's datasets), reveals
    nothing of the secret, and nobody can pick a secret for a given id.  The
    script sends the secret to its node with ``execute``, ``save`` and
    ``cleanup``; the node checks it against the request's flow id
    (:meth:`check`) and keeps it nowhere.  It never reaches other nodes, the
    catalog or a log (``repr`` hides it).
    """

    value: str = field(repr=False)

    @classmethod
    def new(cls) -> FlowSecret:
        return cls(secrets.token_hex(32))

    @property
    def flow_id(self) -> str:
        digest = hashlib.sha256(b"hpcflow flow id\0" + self.value.encode()).hexdigest()
        return f"wf-{digest[:24]}"

    def to_wire(self) -> str:
        return self.value

    @classmethod
    def from_wire(cls, d: object, wf: object) -> FlowSecret:
        """The secret sent for flow ``wf``: NotFlowOwner if it is missing or not
        that flow's (InvalidData if ``wf`` is no flow id)."""
        if not isinstance(wf, str) or not FLOW_ID.fullmatch(wf):
            raise InvalidData(f"{str(wf)[:60]!r} is not a flow id (wf- and 24 hex digits, "
                              "from hpcflow.connect)")
        if d is None:
            raise NotFlowOwner(f"flow {wf}: the request carries no flow secret; only the "
                               "script that created a flow may run, save or close it")
        if not isinstance(d, str) or not _SECRET.fullmatch(d):
            raise InvalidData("a flow secret is 64 lowercase hex digits")
        secret = cls(d)
        if not hmac.compare_digest(secret.flow_id, wf):
            raise NotFlowOwner(f"flow {wf} belongs to another script: only the script "
                               "that created a flow may run, save or close it")
        return secret


@dataclass(frozen=True)
class InputRef:
    """Rows ``[lo, hi)`` of a dataset (``rows=None``: all of it) that has ``total`` rows
    in all (sent with a rowwise op's row blocks: a row-selecting op needs the block's
    place in the whole)."""

    name: str
    rows: tuple[int, int] | None = None
    total: int | None = None

    @classmethod
    def from_wire(cls, d: object) -> InputRef:
        if not isinstance(d, dict):
            raise ProtocolError("input must be a map")
        rows = d.get("rows")
        if rows is not None:
            if (not isinstance(rows, list | tuple) or len(rows) != 2
                    or not all(isinstance(x, int) and x >= 0 for x in rows) or rows[0] > rows[1]):
                raise InvalidData(f"rows must be [lo, hi] with 0 <= lo <= hi, got {rows!r}")
            rows = (int(rows[0]), int(rows[1]))
        total = d.get("total")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)
                                  or rows is None or total < rows[1]):
            raise InvalidData(f"total must be the row count of the whole input (at least "
                              f"the block's end), got {total!r}")
        return cls(validate_name(d.get("name")), rows, total)


@dataclass(frozen=True)
class Expect:
    """What the plan's output model says a unit's output looks like."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @classmethod
    def from_wire(cls, d: object) -> Expect | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise InvalidData("expect must be a map of shape and dtype")
        return cls(validate_shape(d.get("shape")), validate_dtype(d.get("dtype")))


@dataclass(frozen=True)
class RunRequest:
    op: str
    mode: str
    inputs: tuple[InputRef, ...]
    out: str
    params: dict[str, Any] = field(default_factory=dict)
    op_hash: str | None = None
    part: int | None = None
    nparts: int | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    expect: Expect | None = None
    #: Return the output in the reply too when it has at most this many bytes (a result
    #: the initiator delivers: no second round trip, no catalog wait, no bulk transfer).
    inline: int = 0

    @classmethod
    def from_wire(cls, d: object) -> RunRequest:
        if not isinstance(d, dict):
            raise ProtocolError("run request must be a map")
        mode = d.get("mode")
        if mode not in MODES:
            raise InvalidData(f"mode must be one of {MODES}, got {mode!r}")
        inputs = d.get("inputs")
        if not isinstance(inputs, list) or not inputs or len(inputs) > 1024:
            raise InvalidData("inputs must be a non-empty list")
        params, lineage = d.get("params") or {}, d.get("lineage") or {}
        if not isinstance(params, dict) or not isinstance(lineage, dict):
            raise InvalidData("params and lineage must be maps")
        op, op_hash = d.get("op"), d.get("hash")
        if not isinstance(op, str) or (op_hash is not None and not isinstance(op_hash, str)):
            raise InvalidData("op must be a name and hash a string")
        inline = d.get("inline", 0)
        if isinstance(inline, bool) or not isinstance(inline, int) or not (
                0 <= inline <= MAX_INLINE):
            raise InvalidData(f"inline must be 0..{MAX_INLINE} bytes")
        return cls(op, str(mode), tuple(InputRef.from_wire(x) for x in inputs),
                   validate_name(d.get("out")), params, op_hash, validate_part(d.get("part")),
                   validate_part(d.get("nparts")), lineage, Expect.from_wire(d.get("expect")),
                   inline)

    @property
    def initiator(self) -> str | None:
        tag = self.lineage.get("flow")
        who = tag.get("initiator") if isinstance(tag, dict) else None
        return who if isinstance(who, str) else None


@dataclass(frozen=True)
class RunReply:
    """What ``run_op`` answers: the stored output's record, and its bytes when the
    request asked for them inline and they fit."""

    record: DatasetRecord
    data: bytes | None = None
    #: Seconds the unit took in all, and in the op itself, over ``nbytes_in`` input bytes
    #: (what the initiator learns op speeds and per-unit overhead from).
    run_s: float = 0.0
    compute_s: float = 0.0
    nbytes_in: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"record": self.record.to_wire(), "data": self.data,
                "timing": [round(self.run_s, 6), round(self.compute_s, 6), self.nbytes_in]}

    @classmethod
    def from_wire(cls, d: object) -> RunReply:
        if not isinstance(d, dict):
            raise ProtocolError("run reply must be a map")
        rec = DatasetRecord.from_wire(d.get("record"))
        data = d.get("data")
        if data is not None and (not isinstance(data, bytes) or len(data) != rec.nbytes):
            raise ProtocolError(f"inline data of {rec.key} does not match its record")
        timing = d.get("timing") or [0.0, 0.0, 0]
        try:
            run_s, compute_s, nbytes_in = float(timing[0]), float(timing[1]), int(timing[2])
        except (TypeError, ValueError, IndexError):
            raise ProtocolError(f"malformed timing in the reply for {rec.key}") from None
        return cls(rec, data, run_s, compute_s, nbytes_in)

    def array(self) -> np.ndarray[Any, Any]:
        assert self.data is not None
        return np.frombuffer(self.data, dtype=np.dtype(self.record.dtype)).reshape(
            self.record.shape)


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise InvalidData(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


@dataclass(frozen=True)
class PullTask:
    """Make rows ``[lo, hi)`` of ``obj`` (all with ``rows=None``) local, from ``src``
    first; ``made_here`` says ``obj`` is an output of this execution (waited for as
    long as it takes, the initiator cancels on failure)."""

    step: int
    phase: int
    obj: str
    rows: tuple[int, int] | None = None
    src: str | None = None
    made_here: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"k": "pull", "step": self.step, "phase": self.phase, "obj": self.obj,
                "rows": list(self.rows) if self.rows else None, "src": self.src,
                "made_here": self.made_here}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PullTask:
        ref = InputRef.from_wire({"name": d.get("obj"), "rows": d.get("rows")})
        src = d.get("src")
        if src is not None and not isinstance(src, str):
            raise InvalidData("src must be a node name")
        return cls(_int(d, "step", 0, MAX_TASKS), _int(d, "phase", 0, PHASES - 1), ref.name,
                   ref.rows, src, bool(d.get("made_here")))


@dataclass(frozen=True)
class RunTask:
    """Run one unit; ``made_here`` as for :class:`PullTask`, for any of its inputs."""

    step: int
    phase: int
    request: RunRequest
    wire: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)
    made_here: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"k": "run", "step": self.step, "phase": self.phase, "request": self.wire,
                "made_here": self.made_here}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> RunTask:
        request = d.get("request")
        if not isinstance(request, dict):
            raise InvalidData("a run task needs a request map")
        return cls(_int(d, "step", 0, MAX_TASKS), _int(d, "phase", 0, PHASES - 1),
                   RunRequest.from_wire(request), request, bool(d.get("made_here")))

    @classmethod
    def of(cls, step: int, phase: int, request: dict[str, Any], made_here: bool) -> RunTask:
        return cls(step, phase, RunRequest.from_wire(request), request, made_here)


Task = PullTask | RunTask


@dataclass(frozen=True)
class Share:
    """One node's part of an execution: its tasks, the lineage tag of what it makes,
    and for every step the earlier steps it depends on."""

    wf: str
    execution: str
    tag: dict[str, Any]
    depends: tuple[tuple[int, ...], ...]
    tasks: tuple[Task, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"wf": self.wf, "execution": self.execution, "tag": self.tag,
                "depends": [list(d) for d in self.depends],
                "tasks": [t.to_wire() for t in self.tasks]}

    @classmethod
    def from_wire(cls, d: object) -> Share:
        if not isinstance(d, dict):
            raise ProtocolError("a share must be a map")
        tasks_raw, depends_raw, tag = d.get("tasks"), d.get("depends"), d.get("tag")
        if not isinstance(tasks_raw, list) or len(tasks_raw) > MAX_TASKS:
            raise InvalidData("tasks must be a list")
        if not isinstance(depends_raw, list) or len(depends_raw) > MAX_TASKS:
            raise InvalidData("depends must be a list per step")
        if not isinstance(tag, dict):
            raise InvalidData("tag must be a map")
        depends = []
        for k, deps in enumerate(depends_raw):
            if not isinstance(deps, list) or not all(
                    isinstance(j, int) and not isinstance(j, bool) and 0 <= j < k for j in deps):
                raise InvalidData(f"step {k} may depend only on earlier steps")
            depends.append(tuple(deps))
        tasks: list[Task] = []
        for t in tasks_raw:
            if not isinstance(t, dict) or t.get("k") not in ("pull", "run"):
                raise InvalidData("a task is a map with k = pull or run")
            task = PullTask.from_wire(t) if t["k"] == "pull" else RunTask.from_wire(t)
            if task.step >= len(depends):
                raise InvalidData(f"task of step {task.step}, but only {len(depends)} steps")
            tasks.append(task)
        execution = d.get("execution")
        if not isinstance(execution, str) or not 0 < len(execution) <= 128:
            raise InvalidData("execution must be an id")
        return cls(validate_name(d.get("wf")), execution, tag, tuple(depends), tuple(tasks))


@dataclass
class ShareReply:
    """What a node did for its share."""

    created: list[tuple[str, str, int | None]] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)
    runs: list[RunReply] = field(default_factory=list)
    #: Seconds spent per (step, kind): kind is transfer, compute or wait.
    seconds: dict[tuple[int, str], float] = field(default_factory=dict)
    #: Why the share failed, as (error class name, message); what it created is gone
    #: then, but what it moved did move and is reported.
    error: tuple[str, str] | None = None
    #: Seconds the share took on its node (the rest of the call is the round trip).
    wall_s: float = 0.0

    def spent(self, step: int, kind: str, seconds: float) -> None:
        self.seconds[(step, kind)] = self.seconds.get((step, kind), 0.0) + seconds

    def to_wire(self) -> dict[str, Any]:
        return {"created": [list(c) for c in self.created], "moved": self.moved,
                "runs": [r.to_wire() for r in self.runs],
                "seconds": [[k, kind, round(s, 6)] for (k, kind), s in self.seconds.items()],
                "error": list(self.error) if self.error else None,
                "wall_s": round(self.wall_s, 6)}

    @classmethod
    def from_wire(cls, d: object) -> ShareReply:
        if not isinstance(d, dict):
            raise ProtocolError("a share reply must be a map")
        try:
            created = [(str(n), validate_name(name), part) for n, name, part in d["created"]]
            moved = {str(k): int(v) for k, v in d["moved"].items()}
            runs = [RunReply.from_wire(r) for r in d["runs"]]
            seconds = {(int(k), str(kind)): float(s) for k, kind, s in d.get("seconds", [])}
            err = d.get("error")
            error = (str(err[0]), str(err[1])) if err else None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ProtocolError(f"malformed share reply: {exc}") from None
        try:
            wall_s = float(d.get("wall_s", 0.0))
        except (TypeError, ValueError):
            raise ProtocolError("malformed share reply: wall_s") from None
        return cls(created, moved, runs, seconds, error, wall_s)


__all__ = ["FLOW_ID", "MAX_INLINE", "MODES", "PHASES", "Expect", "FlowSecret", "InputRef",
           "PullTask", "RunReply", "RunRequest", "RunTask", "Share", "ShareReply", "Task"]
