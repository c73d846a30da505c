"""What a daemon learns about the fixed costs and compute speed the planner weighs.

The planner's time estimate (``docs/cost-model.md``) charges each remote call
a round trip, each unit of work a fixed overhead, and each op its input bytes
over a throughput.  :class:`Learned` smooths what the daemon observes into
those numbers, the way :meth:`hpcflow.rpc.traffic.Traffic.observe` does for
link bandwidth (an exponentially weighted moving average, ``0.7 * old + 0.3 *
new``), and :meth:`Learned.costs` hands them to
:func:`hpcflow.daemon.adapter.cost_model`.

Observations come from the network and from user code's timings, so each one
is checked: non-finite, negative or absurd values are ignored, and the
number of peers and ops remembered is bounded (the least recently observed
is forgotten first).  Nothing here is rounded: the adapter quantises what it
builds, since plans are cached by the cost model's contents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Weight of the previous estimate in each update (as for learned bandwidth).
KEEP = 0.7
#: Peers and ops remembered at most (their names come from the wire and from users).
MAX_KEYS = 1024
#: A call round trip or a unit's overhead longer than this is a stall, not a latency.
MAX_FIXED_S = 10.0
#: Compute over fewer input bytes says more about the fixed overhead than the op's
#: speed (like bandwidth, learned from transfers over 1 MiB only).
MIN_COMPUTE_BYTES = 1 << 20
#: Throughputs outside this range (bytes/s) are measurement errors (clock resolution,
#: a unit that was mostly waiting).
THROUGHPUT_RANGE = (1e3, 1e13)


@dataclass(frozen=True)
class LearnedCosts:
    """A snapshot of what was learned (empty / None where nothing was observed).

    ``call_latency``: seconds of a small call's round trip to each peer;
    ``step_overhead``: fixed seconds of one unit of work on a node;
    ``throughput``: input bytes per second of each op.
    """

    call_latency: dict[str, float] = field(default_factory=dict)
    step_overhead: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)


class _Smoothed:
    """EWMA per key, at most ``MAX_KEYS`` keys (least recently observed dropped first)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}  # insertion order = least recently observed first

    def update(self, key: str, value: float) -> None:
        old = self.values.pop(key, None)
        while len(self.values) >= MAX_KEYS:
            del self.values[next(iter(self.values))]
        self.values[key] = value if old is None else KEEP * old + (1 - KEEP) * value


def _moved(a: float | None, b: float | None, drift: float) -> bool:
    if a is None or b is None:
        return a is not b
    if a <= 0 or b <= 0:
        return a != b
    return max(a, b) / min(a, b) > 1 + drift


def _drifted(old: LearnedCosts, new: LearnedCosts, drift: float) -> bool:
    if old.call_latency.keys() != new.call_latency.keys() or (
            old.throughput.keys() != new.throughput.keys()):
        return True
    return (_moved(old.step_overhead, new.step_overhead, drift)
            or any(_moved(v, new.call_latency[k], drift) for k, v in old.call_latency.items())
            or any(_moved(v, new.throughput[k], drift) for k, v in old.throughput.items()))


def _finite(*values: float) -> bool:
    try:
        return all(math.isfinite(v) for v in values)
    except TypeError:
        return False


class Learned:
    """Smoothed call latency per peer, step overhead and compute throughput per op.

    Feed it from the daemon (all times in seconds, sizes in bytes):

    * :meth:`observe_call` -- the round trip of a small RPC to ``peer``;
    * :meth:`observe_compute` -- one unit's compute time over ``nbytes_in`` input bytes;
    * :meth:`observe_step` -- one unit's fixed overhead (its run time minus compute);

    and pass it to :func:`~hpcflow.daemon.adapter.cost_model`.
    """

    def __init__(self, drift: float = 1.0) -> None:
        self._calls = _Smoothed()
        self._throughput = _Smoothed()
        self._step: float | None = None
        self.drift = drift
        self._published: LearnedCosts | None = None
        self._links: dict[tuple[str, str], float] = {}

    def observe_call(self, peer: str, seconds: float) -> None:
        if not isinstance(peer, str) or not peer or not _finite(seconds):
            return
        if 0 < seconds <= MAX_FIXED_S:
            self._calls.update(peer, float(seconds))

    def observe_compute(self, op: str, nbytes_in: int, seconds: float) -> None:
        if not isinstance(op, str) or not op or not _finite(nbytes_in, seconds):
            return
        if nbytes_in < MIN_COMPUTE_BYTES or seconds <= 0:
            return
        rate = nbytes_in / seconds
        low, high = THROUGHPUT_RANGE
        if low <= rate <= high:
            self._throughput.update(op, float(rate))

    def observe_step(self, seconds: float) -> None:
        if not _finite(seconds) or not 0 <= seconds <= MAX_FIXED_S:
            return
        old = self._step
        self._step = float(seconds) if old is None else KEEP * old + (1 - KEEP) * seconds

    def costs(self) -> LearnedCosts:
        """What was learned so far (copies: later observations do not change it)."""
        return LearnedCosts(
            call_latency=dict(self._calls.values),
            step_overhead=self._step,
            throughput=dict(self._throughput.values),
        )

    def stable_costs(self) -> LearnedCosts:
        """What the planner should use: the last published costs until some estimate
        has moved by more than ``drift`` (relative) or a new peer or op appears.

        Plans are cached by the cost model's contents; estimates that wobble with
        every observation would make every plan new.  A real change (a peer twice as
        slow) still reaches the planner at once."""
        now = self.costs()
        old = self._published
        if old is None or _drifted(old, now, self.drift):
            self._published = now
            return now
        return old

    def stable_links(self, measured: Mapping[tuple[str, str], float]
                     ) -> dict[tuple[str, str], float]:
        """Link bandwidths (bytes/s, as :class:`~hpcflow.rpc.traffic.Traffic` measures
        them) for the planner, held like :meth:`stable_costs`: a link's published value
        changes only when its measurement moves by more than ``drift``, so a plan made
        after one transfer is still the cached plan after the next."""
        published = {}
        for link, bw in measured.items():
            if not _finite(bw) or bw <= 0:
                continue
            old = self._links.get(link)
            published[link] = bw if old is None or _moved(old, bw, self.drift) else old
        self._links = published
        return dict(published)

    def to_wire(self) -> dict[str, object]:
        """For stats and debugging: the current estimates."""
        c = self.costs()
        return {"call_latency": c.call_latency, "step_overhead": c.step_overhead,
                "throughput": c.throughput}


__all__ = ["Learned", "LearnedCosts"]
