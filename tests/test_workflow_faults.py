"""Workflows under faults and contention, on real daemons: holders killed mid-step,
inputs vanishing, ops that lie about their output, busy or slow nodes, replicas.

Ops that must block while the test acts wait on *gate files* in a directory the
test owns (an op touches ``TAG.started`` with its pid, then waits for
``TAG.open``), so every step is sequenced by events, never by sleeps.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpcflow
from tests.conftest import SCALE, TTL, Cluster, names_on, wait_for

GATED_OPS = '''
import os, time
import numpy as np
from hpcflow import op

GATES = {gates!r}
LIMIT = {limit!r}


def _touch(name):
    with open(os.path.join(GATES, name), "w") as f:
        f.write(str(os.getpid()))


def _wait(name):
    deadline = time.monotonic() + LIMIT
    while not os.path.exists(os.path.join(GATES, name)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {{name}} never opened")
        time.sleep(0.01)


@op("gated", kind="rowwise")
def gated(x, *, tag="g", until=""):
    """x + 0, but real data (planning samples have at most 5 rows) waits for a gate."""
    if len(x) > 10:
        _touch(tag + ".started")
        _wait(until or tag + ".open")
    return x + 0


@op("keep_big", kind="rowwise")
def keep_big(x):
    """A filter: its output rows depend on the values (samples are all > 0.5)."""
    return x[x[:, 0] > 0.5]


@op("slow_plan", kind="rowwise")
def slow_plan(x, *, secs=0.0):
    """Sleeps while the planner infers its output from samples."""
    if len(x) <= 5:
        time.sleep(secs)
    return x * 1
'''


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    path = tmp_path / "gates"
    path.mkdir()
    return path


@pytest.fixture
def ops_module(tmp_path: Path, gates: Path) -> Path:
    mod = tmp_path / "gated_ops.py"
    mod.write_text(GATED_OPS.format(gates=str(gates), limit=20.0 * SCALE))
    return mod


def open_gate(gates: Path, name: str) -> None:
    (gates / name).write_text("open")


def started(gates: Path, tag: str, timeout: float = 20) -> int:
    """Wait until a gated op started; the pid of the daemon running it."""
    path = gates / f"{tag}.started"
    wait_for(lambda: path.exists() and path.read_text(), timeout, f"{tag} to start")
    return int(path.read_text())


@pytest.fixture
def trio(make_cluster, tmp_path: Path, ops_module: Path) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "fast.toml"
    cfg.write_text("transfer_timeout_s = 2.0\nrpc_timeout_s = 5.0\n")
    cl = make_cluster()
    for i in range(3):
        cl.add(f"n{i + 1}", via=f"n{i}" if i else None,
               extra=["--config", str(cfg), "--ops", str(ops_module)])
    cl.wait_members()
    yield cl


def put_parts(cl: Cluster, name: str, parts: list[tuple[str, np.ndarray]]) -> None:  # type: ignore[type-arg]
    """Part k of ``name`` on the k-th listed node."""
    for k, (node, rows) in enumerate(parts):
        with cl[node].client() as c:
            c.put(name, rows, part=k, nparts=len(parts))


def wf_records(node: Any) -> set[str]:
    return {k for k in names_on(node) if k.startswith("wf-")}


def test_holder_killed_mid_step_replans_and_its_leftovers_go(trio: Cluster,
                                                             gates: Path) -> None:
    """SIGKILL the node running a step, mid-step: the flow re-plans from the replicas;
    when the node restarts it re-announces what the failed attempt had made there, and
    its janitor drops it at once (the initiator says that execution failed).  The flow
    keeps its outputs (``keep=True``), so they are durable files that outlive the
    kill; intermediates of other flows live in memory and die with the node."""
    cl = trio
    w = np.random.default_rng(9).random((2005, 4))
    put_parts(cl, "W", [("n2", w[:2000]), ("n1", w[2000:])])
    with cl["n3"].client() as c:
        c.wait_for("W", 10)
        c.replicate("W")  # every part also on n3
    wait_for(lambda: {"W@0", "W@1"} <= names_on(cl["n1"]), 10, "W on n1")
    pids = {n.proc.pid: name for name, n in cl.nodes.items() if n.proc is not None}
    victim: list[str] = []

    def kill_when_started() -> None:
        victim.append(pids[started(gates, "k")])
        cl[victim[0]].kill(signal.SIGKILL)
        open_gate(gates, "k.open")  # the re-planned step passes straight through

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    with cl["n1"].client(keep=True) as flow:
        scaled = flow.run("scale", "W", factor=2.0)
        s = flow.run("colsum", flow.run("gated", scaled, tag="k"))
        assert np.allclose(s.fetch(), 2 * w.sum(0))
        killer.join()
        assert flow.report()["replans"] == 1
        (name,) = victim
        assert name != "n1"  # the 2000-row part runs on n2 or n3
        # the failed attempt's output part is still in the dead node's store ...
        store = cl[name].data_dir / "datasets"
        orphans = [p for p in store.glob("wf-*") if scaled.name in p.name]
        assert orphans, sorted(p.name for p in store.iterdir())
        # ... and goes once the node is back, while the flow is still open
        cl[name].start()
        cl.wait_members()
        wait_for(lambda: not any(store.glob(f"{flow.flow.id}*")), 15, "the janitor")
        # the janitor's deletions reach the initiator's catalog a moment later
        wait_for(lambda: not any(r.owner == name for r in flow.catalog()
                                 if r.name.startswith("wf-")), 10, "the deletions announced")
        outputs = {h.name for h in flow.flow.handles.values()}
    # What stays is the step outputs the flow keeps, made by the re-planned execution.
    with cl["n1"].client() as c:
        left = [r for r in c.catalog() if r.name.startswith("wf-")]
    assert left and {r.name for r in left} <= outputs
    assert all(r.owner != name for r in left)


def test_an_input_that_vanishes_mid_run_is_a_replan(trio: Cluster, gates: Path) -> None:
    """The plan reads a copy of X on n1; it is deleted while the flow runs: the step
    fails with DatasetNotFound (not a misleading InvalidData), the flow re-plans once
    from n2's copy, and the report counts the bytes the failed attempt moved too."""
    cl = trio
    x = np.random.default_rng(5).random((40, 3))
    z = np.arange(3.0)
    with cl["n2"].client() as c:
        c.put("X", x)
    with cl["n3"].client() as c:
        c.put("Z", z)
    with cl["n1"].client() as c:
        c.wait_for("X", 10)
        c.replicate("X")  # a plain copy on n1, which the plan will read

    def vanish() -> None:
        started(gates, "v")
        with cl["n1"].client() as c:
            c.delete("X")  # n1's copy; n2's stays
        open_gate(gates, "v.open")

    thread = threading.Thread(target=vanish)
    thread.start()
    with cl["n1"].client() as flow:
        g = flow.run("gated", "X", tag="v")
        h = flow.run("add", g, "Z")  # Z (a row vector on n3) comes to n1: 24 bytes
        c = flow.run("add", h, "X")  # reads n1's copy of X, gone by then
        assert np.allclose(c.fetch(), 2 * x + z)
        thread.join()
        report = flow.report()
    assert report["replans"] == 1
    assert report["bytes_planned"] == x.nbytes + z.nbytes  # X (or its sum) and Z, once
    # the first attempt had already brought Z to n1: that counts too
    assert Counter(report["moved"]) == Counter(report["planned"]) + Counter({"n3->n1": z.nbytes})
    for node in ("n1", "n2", "n3"):
        assert not wf_records(cl[node])


def test_independent_steps_run_at_the_same_time(trio: Cluster, gates: Path) -> None:
    """Two gated steps wait for each other: run one after the other they would never
    finish; the executor starts both since neither depends on the other."""
    cl = trio
    a, b = np.ones((20, 3)), np.full((20, 3), 2.0)
    with cl["n2"].client() as c:
        c.put("A", a)
    with cl["n3"].client() as c:
        c.put("B", b)
    wait_for(lambda: {"A", "B"} <= names_on(cl["n1"]), 10, "A, B on n1")
    with cl["n1"].client() as flow:
        ga = flow.run("gated", "A", tag="a", until="b.started")
        gb = flow.run("gated", "B", tag="b", until="a.started")
        assert np.allclose(flow.run("add", ga, gb).fetch(), a + b)


def test_an_op_whose_output_depends_on_the_data_fails_clearly(trio: Cluster) -> None:
    cl = trio
    f = np.random.default_rng(11).random((600, 3))
    put_parts(cl, "FL", [("n1", f[:300]), ("n2", f[300:])])
    with cl["n1"].client() as flow:
        flow.wait_for("FL", 10)
        for build in (lambda: flow.run("keep_big", "FL"),
                      lambda: flow.run("colsum", flow.run("keep_big", "FL"))):
            with pytest.raises(hpcflow.OpError) as err:
                build().fetch()
            text = str(err.value)
            assert "keep_big" in text and "returned shape" in text
            # the model's shape for the unit that ran: a part, or the whole (a fetch plan)
            assert "expected (300, 3)" in text or "expected (600, 3)" in text, text
            assert "kind='global'" in text
    for node in ("n1", "n2", "n3"):
        assert not wf_records(cl[node])


def test_planning_a_slow_op_does_not_silence_the_initiator(make_cluster, tmp_path: Path,
                                                           ops_module: Path) -> None:  # type: ignore[no-untyped-def]
    """Inference runs op code (here 3 x 0.4 TTL of sleep) off the event loop: the
    initiator's heartbeats keep flowing, so its peers never mark it dead."""
    secs = 0.4 * TTL * SCALE
    cl = make_cluster()
    cl.add("n1", extra=["--ops", str(ops_module)])
    cl.add("n2", via="n1", extra=["--ops", str(ops_module)])
    cl.wait_members()
    with cl["n2"].client() as c:
        c.put("S", np.ones((20, 3)))
    wait_for(lambda: "S" in names_on(cl["n1"]), 10, "S on n1")
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        with cl["n1"].client() as c:
            while not done.is_set():
                seen.append(all(n["alive"] for n in c.nodes()))
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with cl["n2"].client() as flow:  # n2 plans
            t0 = time.monotonic()
            flow.explain(flow.run("slow_plan", "S", secs=secs))
            assert time.monotonic() - t0 >= 3 * secs  # longer than a TTL in all
    finally:
        done.set()
        watcher.join()
    assert seen and all(seen), f"n1 saw a node dead during planning ({seen.count(False)}x)"


def test_time_plans_ignore_idle_waits(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """Clients blocked in wait_for on n3 are no load: the time objective still runs the
    median where the data is instead of pulling it to n1."""
    cl = make_cluster()
    for i in range(3):
        cl.add(f"n{i + 1}", via=f"n{i}" if i else None)
    cl.wait_members()
    data = np.random.default_rng(1).random((20000, 8))
    with cl["n3"].client() as c:
        c.put("M", data)
    wait_for(lambda: "M" in names_on(cl["n1"]), 10, "M on n1")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            with cl["n3"].client() as c:
                c.wait_for("NEVER", 4 * SCALE)
        except hpcflow.DatasetNotFound:
            pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    with cl["n1"].client() as flow:
        loads = []
        while time.monotonic() - t0 < 2 * SCALE:  # a few heartbeats with the waits open
            n3 = next(n for n in flow.nodes() if n["name"] == "n3")
            loads.append(n3["load"]["active"])
            time.sleep(0.05)
        flow.flow.objective = "time"
        m = flow.run("median", "M")
        assert m.plan is None and all(t.is_alive() for t in threads)  # still waiting
        plan = flow.flow.plan(m)
        assert np.allclose(m.fetch(), np.median(data, axis=0))
    for t in threads:
        t.join()
    assert not errors
    assert loads and max(loads) == 0, loads
    assert (plan.steps[0]["strategy"], plan.steps[0]["nodes"]) == ("delegate", ["n3"])


def test_transfers_come_from_the_source_the_plan_chose(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """R lives on n2 and n3; n1 has measured a fast link from n3 (and assumes a slow
    default for n2), so the plan pulls from n3 -- and so does the execution."""
    slow = tmp_path / "slow.toml"
    slow.write_text("link_gbit = 0.001\n")
    cl = make_cluster()
    cl.add("n1", extra=["--config", str(slow)])
    cl.add("n2", via="n1")
    cl.add("n3", via="n2")
    cl.wait_members()
    r = np.random.default_rng(2).random((4096, 64))  # 2 MiB
    with cl["n2"].client() as c:
        c.put("R", r)
    with cl["n3"].client() as c:
        c.put("T", np.zeros((4096, 64)))
        c.wait_for("R", 10)
        c.replicate("R")
    with cl["n1"].client() as c:
        c.wait_for("T", 10)
        c.replicate("T")  # teaches n1 the n3 link (transfers over 1 MiB are measured)
        assert "n3" in c.stats()["traffic"]["bandwidth"]
        wait_for(lambda: len(c.locate("R")["parts"][0]["holders"]) == 2, 10, "two R")
    with cl["n1"].client() as flow:
        flow.flow.method = "pull_all"
        s = flow.run("scale", "R", factor=1.0)
        assert np.allclose(s.fetch(), r)
        report = flow.report()
    assert report["planned"] == report["moved"] == {"n3->n1": r.nbytes}


def test_closing_a_flow_keeps_copies_another_running_flow_reads(trio: Cluster,
                                                                 gates: Path) -> None:
    """Flow A made a copy of X on n1 and closes while flow B, planned on that copy, is
    still running on the same initiator: the copy stays until B is done (no re-plan),
    then n1's janitor drops it, since A is over."""
    cl = trio
    x = np.random.default_rng(6).random((40, 3))
    with cl["n2"].client() as c:
        c.put("X", x)
    wait_for(lambda: "X" in names_on(cl["n1"]), 10, "X on n1")
    a_ready = threading.Event()
    made: list[Any] = []

    def flow_a() -> None:  # a client lives in one thread: A runs wholly in this one
        with cl["n1"].client() as a:
            a.flow.method = "pull_all"  # so A pulls X to n1
            made.append(a.run("sort_rows", "X").fetch())
            made.append(list(a.flow.created))
            a_ready.set()
            started(gates, "r")
        # closed here, while B's gated step holds on
        open_gate(gates, "r.open")

    thread = threading.Thread(target=flow_a)
    thread.start()
    assert a_ready.wait(30 * SCALE)
    assert np.allclose(made[0], x[np.lexsort(x.T[::-1])])
    assert ["n1", "X", None] in made[1]  # A pulled X to n1
    with cl["n1"].client() as b:
        g = b.run("gated", "X", tag="r")
        c = b.run("add", g, "X")
        assert np.allclose(c.fetch(), 2 * x)
        thread.join()
        assert b.report()["replans"] == 0 and b.report()["bytes_moved"] == 0
    with cl["n1"].client() as c:
        wait_for(lambda: {h["owner"] for p in c.locate("X")["parts"] for h in p["holders"]}
                 == {"n2"}, 15, "the janitor to drop A's copy")
