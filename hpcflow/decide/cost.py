"""The cost model: bytes always, time as fixed costs + bandwidth + queueing + compute.

See ``docs/cost-model.md`` for the precise definitions.  Costs are compared as
``(primary, secondary)`` pairs so ties are broken deterministically: bytes then
seconds for ``objective="bytes"``, seconds then bytes for ``objective="time"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Objective = Literal["bytes", "time"]
CostKey = tuple[float, float]

#: Defaults of the fixed costs (seconds), used where nothing was learned.
DEFAULT_CALL_LATENCY_S = 5e-4
DEFAULT_STEP_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class Link:
    """A directed network path's bandwidth (bytes/s) and one-transfer latency (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class CostModel:
    """Per-pair links, per-node call latency and load, fixed step cost and op throughput,
    plus the objective.

    ``links`` is looked up as ``(src, dst)`` then ``(dst, src)``, else
    ``default_link``.  ``call_latency`` is the round trip of one call from the
    initiator to a node (``default_call_latency`` otherwise); the initiator
    calls itself for free.  ``step_overhead`` is the fixed cost of one unit of
    work on any node (what a unit takes beyond its compute).  ``load`` counts
    queued or active ops per node; each one is assumed to delay a new op by
    ``queued_op_seconds``.  ``throughput`` is input bytes per second an op
    processes (``default_throughput`` otherwise).

    Every field is hashable once its mappings are turned into sorted item
    tuples (:meth:`fingerprint`), which is what plan caches key on.
    """

    objective: Objective = "bytes"
    default_link: Link = Link(bandwidth=1.25e9, latency=1e-4)
    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    load: Mapping[str, int] = field(default_factory=dict)
    queued_op_seconds: float = 1.0
    throughput: Mapping[str, float] = field(default_factory=dict)
    default_throughput: float = 1e9
    call_latency: Mapping[str, float] = field(default_factory=dict)
    default_call_latency: float = DEFAULT_CALL_LATENCY_S
    step_overhead: float = DEFAULT_STEP_OVERHEAD_S

    def __post_init__(self) -> None:
        if self.objective not in ("bytes", "time"):
            raise ValueError(f"objective must be 'bytes' or 'time', not {self.objective!r}")
        fixed = [self.default_call_latency, self.step_overhead, *self.call_latency.values()]
        if any(not x >= 0 for x in fixed):  # also rejects NaN
            raise ValueError("call latencies and the step overhead must be >= 0 seconds")
        rates = [self.default_throughput, *self.throughput.values()]
        if any(not x > 0 for x in rates):
            raise ValueError("op throughputs must be > 0 bytes/s")

    def link(self, src: str, dst: str) -> Link:
        return self.links.get((src, dst)) or self.links.get((dst, src)) or self.default_link

    def has_custom_link(self, node: str) -> bool:
        return any(node in pair for pair in self.links)

    def transfer_seconds(self, src: str, dst: str, nbytes: int) -> float:
        if src == dst:
            return 0.0
        link = self.link(src, dst)
        return link.latency + nbytes / link.bandwidth

    def call_seconds(self, initiator: str, node: str) -> float:
        """Round trip of the call that hands ``node`` its work (none on the initiator)."""
        if node == initiator:
            return 0.0
        return self.call_latency.get(node, self.default_call_latency)

    def wait_seconds(self, node: str) -> float:
        """Queueing delay before a new op starts on ``node``."""
        return self.load.get(node, 0) * self.queued_op_seconds

    def compute_seconds(self, op: str, nbytes_in: int) -> float:
        return nbytes_in / self.throughput.get(op, self.default_throughput)

    def key(self, nbytes: float, seconds: float) -> CostKey:
        """The comparison key of a cost under this objective."""
        return (nbytes, seconds) if self.objective == "bytes" else (seconds, nbytes)

    def fingerprint(self) -> tuple[object, ...]:
        """Every field, hashable (mappings as sorted item tuples): equal fingerprints
        give equal plans."""
        return (
            self.objective,
            self.default_link,
            tuple(sorted(self.links.items())),
            tuple(sorted(self.load.items())),
            self.queued_op_seconds,
            tuple(sorted(self.throughput.items())),
            self.default_throughput,
            tuple(sorted(self.call_latency.items())),
            self.default_call_latency,
            self.step_overhead,
        )
