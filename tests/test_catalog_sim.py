"""The dissemination model (``hpcflow.catalog.sim``) follows what the replicated catalog
does now: beyond a full mesh a node hears HB_FANIN heartbeats, probes one member it does
not hear every PROBE_IDLE_EVERY periods, a silent member is found by its few
heartbeat-takers (or a probe) and the announcement reaches everyone at once.  In process,
no daemon: a few seconds of arithmetic."""

from __future__ import annotations

import math

import pytest

from hpcflow.catalog import sim
from hpcflow.catalog.membership import FANIN, HB_FANIN, PROBE_IDLE_EVERY, heard_members

MESH = FANIN + 1  # the largest full mesh


@pytest.mark.parametrize("n", [MESH + 1, 100, 1000, 10_000])
def test_idle_heartbeats_are_hb_fanin_whatever_the_size(n: int) -> None:
    i = sim.idle(n)
    assert i["heartbeats"] == HB_FANIN  # per second, at a 1 s heartbeat
    assert i["probes"] == pytest.approx(1 / PROBE_IDLE_EVERY)
    assert i["anti_entropy"] == 0  # the heard members' vector digests agree with ours
    # received: heartbeats, a probe's answer and another node's probe
    assert i["msgs"] == pytest.approx(HB_FANIN + 2 / PROBE_IDLE_EVERY)
    assert i["msgs"] < FANIN  # not the FANIN + 1 of the model before HB_FANIN
    assert i["bytes_heartbeats"] == HB_FANIN * sim.heartbeat_bytes()


def test_idle_messages_do_not_grow_with_the_cluster() -> None:
    small, large = sim.idle(100), sim.idle(10_000)
    assert large["msgs"] == pytest.approx(small["msgs"], rel=0.02)
    assert large["heartbeats"] == small["heartbeats"]
    assert large["bytes"] == pytest.approx(small["bytes"], rel=0.02)
    # what does grow: one anti-entropy round (made only when digests differ) lists
    # every origin
    assert large["vector_round_bytes"] > 50 * small["vector_round_bytes"]


def test_a_full_mesh_hears_everyone_and_probes_no_one() -> None:
    i = sim.idle(MESH)
    assert (i["heartbeats"], i["probes"], i["anti_entropy"]) == (MESH - 1, 0, 0)
    assert i["msgs"] == MESH - 1


def test_heartbeat_fanin_and_period_are_parameters() -> None:
    assert sim.idle(1000, hb_fanin=1)["heartbeats"] == 1
    assert sim.idle(1000, hb_fanin=FANIN + 5)["heartbeats"] == FANIN  # at most fan-in
    i = sim.idle(1000, heartbeat_s=2.0)
    assert i["heartbeats"] == HB_FANIN / 2
    assert i["probes"] == pytest.approx(1 / (2 * PROBE_IDLE_EVERY))


def test_the_overlay_hears_what_heard_members_picks() -> None:
    """Exact: each node hears heard_members' picks (its successor among them), follows
    them and others up to FANIN; hearers is the inverse of heard."""
    n = 300
    ov = sim.overlay(n, exact=True)
    names = [f"node{i:05d}" for i in range(n)]
    assert not ov.mesh
    for i in range(n):
        want = heard_members(names[i], names[:i] + names[i + 1:], HB_FANIN)
        assert {names[j] for j in ov.heard[i]} == want
        assert (i + 1) % n in ov.heard[i]
        assert set(ov.heard[i]) <= set(ov.follows[i]) and len(ov.follows[i]) == FANIN
        assert i not in ov.follows[i]
        for j in ov.heard[i]:
            assert i in ov.hearers[j]
    assert sum(len(h) for h in ov.hearers) == sum(len(h) for h in ov.heard)


def test_the_drawn_overlay_is_like_the_hashed_one() -> None:
    """Above EXACT_UP_TO the rendezvous picks are drawn: the same shape (successor heard,
    about HB_FANIN takers per node, a few with one only)."""
    exact, drawn = sim.overlay(600, exact=True), sim.overlay(600, exact=False)
    for ov in (exact, drawn):
        takers = [len(h) for h in ov.hearers]
        assert HB_FANIN - 0.1 < sum(takers) / len(takers) <= HB_FANIN
        assert min(takers) >= 1 and max(takers) < 4 * HB_FANIN
        assert all((i + 1) % 600 in ov.heard[i] for i in range(600))
    ratio = (sum(len(h) == 1 for h in exact.hearers)
             / max(1, sum(len(h) == 1 for h in drawn.hearers)))
    assert 0.5 < ratio < 2


def test_an_update_still_floods_over_all_followed_streams() -> None:
    for n in (1000, 10_000):
        u = sim.update_spread(n)
        assert u["hops"] <= math.ceil(math.log(n) / math.log(FANIN)) + 2
        assert u["t"] < 0.01
        assert u["bytes_per_receiver"] == pytest.approx(FANIN * sim.update_bytes())
        assert u["bytes_sent"] == pytest.approx(FANIN * sim.update_bytes())


def test_in_a_full_mesh_nothing_is_relayed() -> None:
    u = sim.update_spread(MESH)
    assert u["hops"] == 1
    assert u["publisher_bytes"] == (MESH - 1) * sim.update_bytes()
    assert u["bytes_sent"] == pytest.approx(u["publisher_bytes"] / MESH)


def test_a_crashed_node_is_found_by_its_takers_after_the_ttl_then_known_at_once() -> None:
    d = sim.detection(1000, runs=60)
    # its takers' monitors fire after ttl_s of silence (its last beat up to 1 s before);
    # a probe beats them now and then, not every time (one per node per 10 s)
    assert sim.TTL_S - sim.HEARTBEAT_S < d["first"] <= sim.TTL_S + sim.HEARTBEAT_S / 4
    assert 0.05 < d["by_probe"] < 0.6
    # the announcement is passed on at once, and a refused probe confirms it
    assert d["all"] - d["first"] < 0.05
    assert 1 < d["hops"] < 20


def test_a_hung_node_costs_each_node_one_patient_probe() -> None:
    crashed, hung = sim.detection(1000, runs=40), sim.detection(1000, runs=40, hung=True)
    assert hung["first"] >= crashed["first"]
    assert hung["by_probe"] < crashed["by_probe"]  # a probe waits out patience() first
    # every receiver waits 2 * patience() for its own probe: once, not once per hop
    gap = hung["all"] - hung["first"]
    assert 2 * sim.TTL_S <= gap < 2 * sim.TTL_S + 1


def test_strain_stretches_detection() -> None:
    calm, strained = sim.detection(500, runs=40), sim.detection(500, runs=40, strain=1)
    assert strained["first"] > calm["first"] + sim.TTL_S / 2
    assert strained["by_probe"] > calm["by_probe"]


def test_probes_go_only_to_members_not_heard() -> None:
    """With takers that never give up, only probes find a death: beyond a full mesh at
    the idle rate (a probe of a given member per node every PROBE_IDLE_EVERY * (N - 1 -
    HB_FANIN) periods: all nodes together, one every ~PROBE_IDLE_EVERY periods); in a
    full mesh everyone is heard, so no one probes and the takers find it."""
    patient = 500.0  # ttl: far longer than a probe round's silence must be
    d = sim.detection(1000, ttl_s=patient, runs=60)
    assert d["by_probe"] == 1
    # the first of ~996 probers: exponential with mean ~PROBE_IDLE_EVERY s
    assert 0.3 * PROBE_IDLE_EVERY < d["first"] < 1.5 * PROBE_IDLE_EVERY
    mesh = sim.detection(MESH, ttl_s=patient, runs=20)
    assert mesh["by_probe"] == 0 and mesh["first"] > patient - 1


def test_report_has_a_row_per_size_and_serfs_figures() -> None:
    text = sim.report([MESH, 200], runs=5)
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith(f"| {MESH} | {MESH - 1:.1f} (")
    assert rows[2].startswith(f"| 200 | {sim.idle(200)['msgs']:.1f} ({HB_FANIN} + "
                              f"{2 / PROBE_IDLE_EVERY:.1f} + ")
    assert f"HB_FANIN={HB_FANIN}" in text and "Serf" in text and "42 KB/s" in text
