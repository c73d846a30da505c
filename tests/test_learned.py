"""Learned fixed costs and compute speed, and the cost model the adapter builds from them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from hpcflow.daemon import adapter
from hpcflow.daemon.learned import MAX_KEYS, MIN_COMPUTE_BYTES, Learned
from hpcflow.decide import CostModel


def snapshot(**loads: int) -> Any:
    """Just what cost_model reads of a catalog snapshot: each node's name and load."""
    return SimpleNamespace(nodes=[SimpleNamespace(info=SimpleNamespace(name=n),
                                                  load={"active": a}) for n, a in loads.items()])


def test_observations_are_smoothed_like_bandwidth() -> None:
    learned = Learned()
    learned.observe_call("n2", 1e-3)
    learned.observe_call("n2", 2e-3)
    learned.observe_step(4e-3)
    learned.observe_step(2e-3)
    learned.observe_compute("fft", 8 << 20, 0.01)
    learned.observe_compute("fft", 8 << 20, 0.02)
    got = learned.costs()
    assert got.call_latency == {"n2": pytest.approx(0.7e-3 + 0.3 * 2e-3)}
    assert got.step_overhead == pytest.approx(0.7 * 4e-3 + 0.3 * 2e-3)
    rate = (8 << 20) / 0.01
    assert got.throughput == {"fft": pytest.approx(0.7 * rate + 0.3 * rate / 2)}


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1e-3, 3600.0, "1", None])
def test_nonsense_times_are_ignored(seconds: Any) -> None:
    learned = Learned()
    learned.observe_call("n2", seconds)
    learned.observe_call("n2", 0.0)  # no round trip takes no time
    learned.observe_step(seconds)
    assert learned.costs().call_latency == {}
    assert learned.costs().step_overhead is None


def test_nonsense_compute_times_are_ignored() -> None:
    learned = Learned()
    learned.observe_compute("fft", 10, 1e-6)  # too small to say anything about speed
    learned.observe_compute("fft", MIN_COMPUTE_BYTES, 0.0)
    learned.observe_compute("fft", MIN_COMPUTE_BYTES, float("nan"))
    learned.observe_compute("fft", MIN_COMPUTE_BYTES, 1e-12)  # 1e18 B/s: a clock artefact
    learned.observe_compute("fft", -MIN_COMPUTE_BYTES, 1.0)
    learned.observe_compute("", MIN_COMPUTE_BYTES, 1.0)
    assert learned.costs().throughput == {}
    learned.observe_step(0.0)  # a unit with no overhead at all is possible
    assert learned.costs().step_overhead == 0.0


def test_the_number_of_peers_and_ops_is_bounded() -> None:
    learned = Learned()
    for i in range(MAX_KEYS + 10):
        learned.observe_call(f"peer{i}", 1e-3)
        learned.observe_compute(f"op{i}", MIN_COMPUTE_BYTES, 1e-3)
    got = learned.costs()
    assert len(got.call_latency) == len(got.throughput) == MAX_KEYS
    assert "peer0" not in got.call_latency and f"peer{MAX_KEYS + 9}" in got.call_latency
    # observing a peer again keeps it (least recently observed goes first)
    learned.observe_call("peer10", 1e-3)
    learned.observe_call("new", 1e-3)
    assert "peer10" in learned.costs().call_latency
    assert "peer11" not in learned.costs().call_latency


def test_costs_is_a_snapshot() -> None:
    learned = Learned()
    learned.observe_call("n2", 1e-3)
    got = learned.costs()
    learned.observe_call("n3", 1e-3)
    assert list(got.call_latency) == ["n2"]


def test_cost_model_without_learned_keeps_working() -> None:
    cost = adapter.cost_model(snapshot(n1=0, n2=2), "time", 10.0, {("n2", "n1"): 1.234e9})
    assert cost.links[("n2", "n1")].bandwidth == 1.2e9  # quantised
    assert cost.load == {"n1": 0, "n2": 2}
    defaults = CostModel()
    assert cost.call_latency == {} and cost.throughput == {}
    assert cost.step_overhead == defaults.step_overhead
    assert cost.default_call_latency == defaults.default_call_latency


def test_cost_model_keeps_heartbeated_load_in_range() -> None:
    """Load comes from peers' heartbeats: a negative one would make a node's time look
    below zero to the search, a huge one is capped."""
    cost = adapter.cost_model(snapshot(n1=-(2**63), n2=2**63 - 1), "time", 10.0, {})
    assert cost.load == {"n1": 0, "n2": adapter.MAX_LOAD}


def test_cost_model_uses_learned_values_quantised() -> None:
    learned = Learned()
    learned.observe_call("n2", 0.000_512_3)
    learned.observe_step(0.001_234)
    learned.observe_compute("fft", 100 << 20, 0.333)
    cost = adapter.cost_model(snapshot(n1=0), "bytes", 10.0, {}, learned)
    assert cost.call_latency == {"n2": 0.00051}
    assert cost.step_overhead == 0.0012
    assert cost.throughput == {"fft": 3.1e8}
    assert cost.call_seconds("n1", "n2") == 0.00051
    assert cost.compute_seconds("fft", int(3.1e8)) == 1.0


def test_small_wobbles_give_the_same_cost_model() -> None:
    """Plans are cached by the cost model's contents: noise below the quantisation step
    must not change them."""
    models = []
    for wobble in (1.0, 1.005, 0.995):
        learned = Learned()
        learned.observe_call("n2", 5e-4 * wobble)
        learned.observe_step(1.1e-3 * wobble)
        learned.observe_compute("colsum", 10 << 20, (10 << 20) / 3e8 * wobble)
        cost = adapter.cost_model(snapshot(n1=0), "time", 10.0, {("n2", "n1"): 1.1e9 * wobble},
                                  learned)
        models.append(cost.fingerprint())
    assert models[0] == models[1] == models[2]
    hash(models[0])


def test_bad_learned_bandwidth_is_ignored() -> None:
    cost = adapter.cost_model(snapshot(), "bytes", 10.0,
                              {("n2", "n1"): 0.0, ("n3", "n1"): float("nan")})
    assert cost.links == {}


def test_link_bandwidth_reaches_the_planner_only_when_it_really_moves() -> None:
    """Each transfer updates a link's measured bandwidth; the planner (and so the plan
    cache's key) sees a new value only past the drift (2x), else every run re-plans."""
    learned = Learned()
    link = ("n2", "n1")
    assert learned.stable_links({link: 1.0e8}) == {link: 1.0e8}
    for measured in (0.6e8, 1.9e8, 1.4e8):  # wobbles within 2x: the published value holds
        assert learned.stable_links({link: measured}) == {link: 1.0e8}
    assert learned.stable_links({link: 2.5e8}) == {link: 2.5e8}  # a real change: at once
    assert learned.stable_links({link: 2.5e8, ("n3", "n1"): 5e7}) == {
        link: 2.5e8, ("n3", "n1"): 5e7}
    assert learned.stable_links({link: float("nan"), ("n3", "n1"): -1.0}) == {}
