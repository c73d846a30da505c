"""The cost model: bytes always, time as bandwidth + latency + queueing + compute.

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


@dataclass(frozen=True)
class Link:
    """A directed network path's bandwidth (bytes/s) and one-transfer latency (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class CostModel:
    """Per-pair links, node load and op throughput, plus the objective.

    ``links`` is looked up as ``(src, dst)`` then ``(dst, src)``, else
    ``default_link``.  ``load`` counts queued or active ops per node; each one
    is assumed to delay a new op by ``queued_op_seconds``.  ``throughput`` is
    input bytes per second an op processes (``default_throughput`` otherwise).
    """

    objective: Objective = "bytes"
    default_link: Link = Link(bandwidth=1.25e9, latency=1e-4)
    links: Mapping[tuple[str, str], Link] = field(default_factory=dict)
    load: Mapping[str, int] = field(default_factory=dict)
    queued_op_seconds: float = 1.0
    throughput: Mapping[str, float] = field(default_factory=dict)
    default_throughput: float = 1e9

    def __post_init__(self) -> None:
        if self.objective not in ("bytes", "time"):
            raise ValueError(f"objective must be 'bytes' or 'time', not {self.objective!r}")

    def link(self, src: str, dst: str) -> Link:
        return self.links.get((src, dst)) or self.links.get((dst, src)) or self.default_link

    def has_custom_link(self, node: str) -> bool:
        return any(node in pair for pair in self.links)

    def transfer_seconds(self, src: str, dst: str, nbytes: int) -> float:
        if src == dst:
            return 0.0
        link = self.link(src, dst)
        return link.latency + nbytes / link.bandwidth

    def wait_seconds(self, node: str) -> float:
        """Queueing delay before a new op starts on ``node``."""
        return self.load.get(node, 0) * self.queued_op_seconds

    def compute_seconds(self, op: str, nbytes_in: int) -> float:
        return nbytes_in / self.throughput.get(op, self.default_throughput)

    def key(self, nbytes: float, seconds: float) -> CostKey:
        """The comparison key of a cost under this objective."""
        return (nbytes, seconds) if self.objective == "bytes" else (seconds, nbytes)
