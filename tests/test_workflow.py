"""Workflows on real daemons: planning, execution, accounting, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpcflow
from tests.conftest import SCALE, Cluster, add_three, names_on, wait_for

#: Every test here that starts a cluster runs in both catalog modes (conftest.py).
CATALOG_MODES = ("replicated", "dht")

ROWS = 4000


def node_bytes(cluster: Cluster) -> int:
    """Node-to-node bytes received, from every daemon's own transport counters."""
    total = 0
    names = set(cluster.nodes)
    for node in cluster.nodes.values():
        if node.alive():
            with node.client() as c:
                got = c.stats()["traffic"]["bytes_received"]
            total += sum(n for peer, n in got.items() if peer in names)
    return total


@pytest.fixture
def thesis(cluster: Cluster) -> tuple[Cluster, np.ndarray, np.ndarray]:
    """The thesis' use case: script on n1, DS1 on n2, DS2 on n3."""
    rng = np.random.default_rng(42)
    d1, d2 = rng.random((ROWS, 12)), rng.random((ROWS, 12))
    with cluster["n2"].client() as c:
        c.put("DS1", d1)
    with cluster["n3"].client() as c:
        c.put("DS2", d2)
    wait_for(lambda: {"DS1", "DS2"} <= names_on(cluster["n1"]), 10, "DS1, DS2 on n1")
    return cluster, d1, d2


def test_thesis_rowwise_fetches_raw_inputs(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, d1, d2 = thesis
    before = node_bytes(cluster)
    with cluster["n1"].client() as flow:
        a, b = flow.run("fft", "DS1"), flow.run("fft", "DS2")
        c = flow.run("add", a, b)
        text = flow.explain(c)
        assert "fetch" in text and "optimal plan" in text
        got = c.fetch()
        assert np.allclose(got, np.fft.fft(d1, axis=1) + np.fft.fft(d2, axis=1))
        # fft doubles the bytes: cheapest is to pull both raw inputs to n1 once.
        assert c.plan is not None and c.plan.bytes_moved == d1.nbytes + d2.nbytes
        # The executed plan's table (formatted in the script: execute leaves it out) is
        # the table the node gave for the same plan before it ran.
        assert c.plan.explain().splitlines()[1:] == text.splitlines()[1:]
        report = flow.report()
        assert report["moved"] == {"n2->n1": d1.nbytes, "n3->n1": d2.nbytes}
        assert report["bytes_moved"] == report["bytes_planned"]
    assert node_bytes(cluster) - before == d1.nbytes + d2.nbytes  # = the transport's count
    # Closing the flow removed every intermediate output and copy.
    assert names_on(cluster["n1"]) == {"DS1", "DS2"}


def test_thesis_reduce_moves_only_partials(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, d1, d2 = thesis
    before = node_bytes(cluster)
    with cluster["n1"].client() as flow:
        c = flow.run("add", flow.run("colsum", "DS1"), flow.run("colsum", "DS2"))
        got = c.fetch()
        assert np.allclose(got, d1.sum(0) + d2.sum(0))
        moved = flow.report()["bytes_moved"]
    assert moved <= 2 * 12 * 8 * 2  # a few column sums, never the data
    assert node_bytes(cluster) - before == moved


def test_thesis_global_colocates(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, d1, d2 = thesis
    with cluster["n1"].client() as flow:
        m = flow.run("median", flow.run("add", "DS1", "DS2"))
        got = m.fetch()
        assert np.allclose(got, np.median(d1 + d2, axis=0))
        assert m.plan is not None
        # add needs both inputs together: one dataset moves once, the result is small.
        assert m.plan.bytes_moved <= d1.nbytes + 12 * 8


def test_reduce_over_four_holders_moves_only_partials(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cl = make_cluster()
    for i in range(5):
        cl.add(f"n{i + 1}", via=f"n{i}" if i else None)
    cl.wait_members()
    data = np.random.default_rng(1).random((8000, 6))
    for i in range(4):
        with cl[f"n{i + 2}"].client() as c:
            c.put("SIM", data[i * 2000 : (i + 1) * 2000], part=i, nparts=4)
    wait_for(lambda: "SIM@3" in names_on(cl["n1"]), 10, "SIM parts on n1")
    before = node_bytes(cl)
    with cl["n1"].client() as flow:
        s = flow.run("colsum", "SIM")
        assert np.allclose(s.fetch(), data.sum(0))
        assert s.plan is not None
        (step,) = s.plan.steps
        assert step["strategy"] == "split" and step["combiner"] == "n1"
        report = flow.report()
    assert report["bytes_moved"] == 4 * 6 * 8  # four partials of 6 float64, nothing else
    assert node_bytes(cl) - before == report["bytes_moved"]


def test_global_op_runs_on_largest_holder(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cl = make_cluster()
    for i in range(4):
        cl.add(f"n{i + 1}", via=f"n{i}" if i else None)
    cl.wait_members()
    data = np.random.default_rng(2).random((3500, 4))
    bounds = {"n2": (0, 3000), "n3": (3000, 3400), "n4": (3400, 3500)}
    for k, (node, (lo, hi)) in enumerate(bounds.items()):
        with cl[node].client() as c:
            c.put("U", data[lo:hi], part=k, nparts=3)
    wait_for(lambda: "U@2" in names_on(cl["n1"]), 10, "U parts on n1")
    with cl["n1"].client() as flow:
        m = flow.run("median", "U")
        assert np.allclose(m.fetch(), np.median(data, axis=0))
        assert m.plan is not None
        (step,) = m.plan.steps
        assert step["strategy"] == "delegate" and step["nodes"] == ["n2"]
        assert m.plan.bytes_moved == data[3000:].nbytes + 4 * 8


def test_whole_workflow_beats_greedy(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, d1, d2 = thesis
    with cluster["n1"].client() as flow:
        # scale is cheap to run anywhere, fft doubles the data: greedy runs each step
        # where its input is and then must ship the doubled result to the consumer.
        c = flow.run("add", flow.run("fft", flow.run("scale", "DS1", factor=2.0)),
                     flow.run("fft", "DS2"))
        greedy = flow.flow.plan(c, "greedy").bytes_moved
        optimal = flow.flow.plan(c, "optimal").bytes_moved
        assert optimal < greedy
        got = c.fetch()
        assert np.allclose(got, np.fft.fft(2 * d1, axis=1) + np.fft.fft(d2, axis=1))
        assert flow.report()["bytes_moved"] == optimal


def test_eager_use_and_save(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, d1, d2 = thesis
    with cluster["n1"].client() as flow:
        a = flow.run("scale", "DS1", factor=3.0)
        assert np.allclose(a.fetch(), 3 * d1)
        b = flow.run("add", a, "DS2")
        assert np.allclose(b.fetch(), 3 * d1 + d2)
        assert np.allclose(a.fetch(), 3 * d1)  # cached result
        b.save("KEPT")
        wf = flow.flow.id
    with cluster["n3"].client() as c:
        wait_for(lambda: "KEPT" in names_on(cluster["n3"]), 10, "KEPT announced")
        assert np.allclose(c.fetch("KEPT"), 3 * d1 + d2)
        lineage = c.describe("KEPT")["records"][0]["lineage"]
    assert all(not n.startswith("wf-") for n in names_on(cluster["n1"]))
    # the saved copy says what it is: the add of the scaled DS1 and DS2, in which flow,
    # back to the datasets that were put (never the flow's own names, which go)
    assert lineage["op"] == "add" and lineage["workflow"] == wf
    steps = lineage["derivation"]["steps"]
    assert [(s["op"], s["inputs"]) for s in steps] == [("scale", ["DS1"]), ("add", [0, "DS2"])]
    assert lineage["saved_from"] == b.name and "flow" not in lineage  # never cleaned up


def test_keep_keeps_only_the_step_outputs(thesis: tuple[Cluster, Any, Any]) -> None:
    """keep=True keeps what the user asked for, the steps' outputs; partials, the
    results materialised for fetching and copies of inputs still go."""
    cluster, d1, d2 = thesis
    with cluster["n1"].client(keep=True) as flow:
        a = flow.run("scale", "DS1", factor=2.0)
        b = flow.run("colsum", a)
        c = flow.run("add", flow.run("fft", "DS2"), "DS1")  # copies an input to n1
        assert np.allclose(b.fetch(), 2 * d1.sum(0))
        assert np.allclose(c.fetch(), np.fft.fft(d2, axis=1) + d1)
        made = {name for _, name, _ in flow.flow.created}
        steps = set(flow.flow.handles)
        assert made - steps  # partials, results or copies were made
    left = {r.name for r in cluster["n1"].client().catalog() if r.name.startswith("wf-")}
    executed = {h for h in steps if flow.flow.handles[h].executed}
    assert left == executed
    with cluster["n1"].client() as c:  # the copy of DS1 on n1 went too
        holders = {h["owner"] for p in c.locate("DS1")["parts"] for h in p["holders"]}
        assert holders == {"n2"}
        for rec in c.catalog():
            if rec.name in left:
                with cluster[rec.owner].client() as owner:
                    owner.delete(rec.name, rec.part)


def test_lineage_of_outputs(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, _, _ = thesis
    with cluster["n1"].client(keep=True) as flow:
        a = flow.run("scale", "DS1", factor=0.5)
        a.fetch()
        recs = [r for r in flow.catalog() if r.name == a.name]
        lin = recs[0].lineage
        assert lin["op"] == "scale" and lin["params"] == {"factor": 0.5}
        assert lin["inputs"][0]["name"] == "DS1" and lin["workflow"] == flow.flow.id
    assert a.name in names_on(cluster["n1"])  # keep=True: outputs stay


def test_errors_are_typed_and_leave_nothing(thesis: tuple[Cluster, Any, Any]) -> None:
    cluster, _, _ = thesis
    with cluster["n1"].client() as flow:
        with pytest.raises(hpcflow.UnknownOpError, match="nope"):
            flow.run("nope", "DS1").fetch()
        with pytest.raises(hpcflow.ArityError, match="takes 2"):
            flow.run("add", "DS1").fetch()
        with pytest.raises(hpcflow.ParamError, match="factor"):
            flow.run("scale", "DS1").fetch()
        with pytest.raises(hpcflow.DatasetNotFound):
            flow.run("fft", "MISSING").fetch()
        with cluster["n2"].client() as c:
            c.put("SHORT", np.zeros((10, 12)))
        wait_for(lambda: "SHORT" in names_on(cluster["n1"]), 10, "SHORT on n1")
        with pytest.raises(hpcflow.InputError, match=r"row counts") as err:
            flow.run("add", "DS1", "SHORT").fetch()
        assert f"({ROWS}, 12)" in str(err.value) and "(10, 12)" in str(err.value)
    assert all(not n.startswith("wf-") for n in names_on(cluster["n1"]))


def test_the_issues_script_runs(thesis: tuple[Cluster, Any, Any]) -> None:
    """The issue's script, literally: the colsum of DS2 is broadcast over fft(DS1)'s rows."""
    cluster, d1, d2 = thesis
    before = node_bytes(cluster)
    with cluster["n1"].client() as flow:
        a = flow.run("fft", "DS1")
        b = flow.run("colsum", "DS2")
        c = flow.run("add", a, b)
        assert "optimal plan" in flow.explain(c)
        result = c.fetch()
        assert np.allclose(result, np.fft.fft(d1, axis=1) + d2.sum(axis=0))
        assert c.plan is not None
        report = flow.report()
        # DS1 moves once (before fft doubles it), DS2 sends only its column sums
        assert c.plan.bytes_moved == report["bytes_moved"] == d1.nbytes + 12 * 8
        assert report["moved"] == report["planned"]
    assert node_bytes(cluster) - before == d1.nbytes + 12 * 8


USER_OPS = '''
import numpy as np
from hpcflow import op

@op("expand", kind="rowwise")
def expand(x):
    return np.hstack([x, x * x])

@op("colmax", kind="reduce", combine=lambda parts: np.max(parts, axis=0))
def colmax(x):
    return x.max(axis=0)

@op("explode", kind="rowwise")
def explode(x):
    if x.shape[0] > 50:  # planning samples have a handful of rows: fails only for real
        raise RuntimeError("boom")
    return x
'''


def test_user_ops_only_where_loaded(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mod = tmp_path / "myops.py"
    mod.write_text(USER_OPS)
    cl = make_cluster()
    cl.add("n1", extra=["--ops", str(mod)])
    cl.add("n2", via="n1", extra=["--ops", str(mod)])
    cl.add("n3", via="n2")  # no user ops here
    cl.wait_members()
    data = np.random.default_rng(3).random((500, 3))
    with cl["n3"].client() as c:
        c.put("ON3", data)
    wait_for(lambda: "ON3" in names_on(cl["n1"]), 10, "ON3 on n1")
    import importlib.util

    spec = importlib.util.spec_from_file_location("myops_test", mod)
    assert spec and spec.loader
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # planner side registry
    with cl["n1"].client() as flow:
        e = flow.run("expand", "ON3")
        assert np.allclose(e.fetch(), np.hstack([data, data * data]))
        assert e.plan is not None and "n3" not in e.plan.steps[0]["nodes"]
        m = flow.run("colmax", "ON3")
        assert np.allclose(m.fetch(), data.max(0))
        assert all("n3" not in s["nodes"] for s in m.plan.steps)  # type: ignore[union-attr]
    with cl["n3"].client() as flow, pytest.raises(hpcflow.UnknownOpError, match="n1, n2"):
        flow.run("expand", "ON3").fetch()  # the initiator n3 has no such op


def test_failed_op_leaves_no_partial_outputs(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mod = tmp_path / "myops.py"
    mod.write_text(USER_OPS)
    cl = make_cluster()
    cl.add("n1", extra=["--ops", str(mod)])
    cl.add("n2", via="n1", extra=["--ops", str(mod)])
    cl.wait_members()
    with cl["n1"].client() as c:
        c.put("P", np.zeros((40, 2)), part=0, nparts=2)  # this part succeeds
    with cl["n2"].client() as c:
        c.put("P", np.ones((100, 2)), part=1, nparts=2)  # this one raises
    wait_for(lambda: "P@1" in names_on(cl["n1"]), 10, "P parts")
    with cl["n1"].client() as flow, pytest.raises(hpcflow.OpError, match="boom"):
        flow.run("explode", "P").fetch()
    for n in ("n1", "n2"):
        assert not [k for k in names_on(cl[n]) if k.startswith("wf-")]


SHAPE_OPS = '''
import numpy as np
from hpcflow import op

@op("sort_union", kind="global", arity=3)
def sort_union(a, b, c):
    u = np.concatenate([a, b, c])
    return u[np.lexsort(u.T[::-1])]

@op("keep_big_global", kind="global")
def keep_big_global(x):
    """A filter: its output rows depend on the values (planning samples are all > 0.5)."""
    return x[x[:, 0] > 0.5]

def _merge(parts):
    for mins, total in parts:
        if total.shape != ():
            raise ValueError(f"the 0-d total came back with shape {total.shape}")
    return np.append(np.min([m for m, _ in parts], axis=0), sum(t for _, t in parts))

@op("colmin_total", kind="reduce", combine=_merge)
def colmin_total(x):
    return x.min(axis=0), np.array(x.sum())  # a tuple partial holding a 0-d array
'''


@pytest.fixture
def shape_ops(make_cluster, tmp_path: Path) -> Cluster:  # type: ignore[no-untyped-def]
    """Three nodes that all load SHAPE_OPS."""
    mod = tmp_path / "shape_ops.py"
    mod.write_text(SHAPE_OPS)
    cl = add_three(make_cluster(), extra=["--ops", str(mod)])
    return cl


def test_global_op_over_inputs_of_different_row_counts(shape_ops: Cluster) -> None:
    """Issue 10: the output model of a global op over three inputs of 100, 300 and 550
    rows has 950 rows (it used to say 3 x 100, so the run failed); a global op whose
    output really depends on the data fails without being told to become global."""
    cl = shape_ops
    rng = np.random.default_rng(10)
    data = {"A": rng.random((100, 3)), "B": rng.random((300, 3)), "C": rng.random((550, 3))}
    for node, name in zip(("n1", "n2", "n3"), data, strict=True):
        with cl[node].client() as c:
            c.put(name, data[name])
    wait_for(lambda: set(data) <= names_on(cl["n1"]), 10, "A, B, C on n1")
    union = np.concatenate(list(data.values()))
    with cl["n1"].client() as flow:
        got = flow.run("sort_union", "A", "B", "C").fetch()
        assert np.array_equal(got, union[np.lexsort(union.T[::-1])])
        report = flow.report()
        assert report["bytes_moved"] == report["bytes_planned"]
        with pytest.raises(hpcflow.OpError) as err:
            flow.run("keep_big_global", "C").fetch()
    text = str(err.value)
    assert "keep_big_global" in text and "returned shape" in text and "(550, 3)" in text
    assert "declare it kind='global'" not in text
    assert "kind='global' already" in text and "out_shape=" in text


def test_reduce_partial_with_a_0d_item_split_over_nodes(shape_ops: Cluster) -> None:
    """Issue 10: a tuple partial's 0-d item reached combine as shape (1,) once partials
    were stored and moved between nodes; combine must see the partial's own shapes."""
    cl = shape_ops
    x = np.random.default_rng(11).random((600, 4))
    with cl["n2"].client() as c:
        c.put("X", x[:250], part=0, nparts=2)
    with cl["n3"].client() as c:
        c.put("X", x[250:], part=1, nparts=2)
    wait_for(lambda: "X@1" in names_on(cl["n1"]), 10, "X parts on n1")
    with cl["n1"].client() as flow:
        r = flow.run("colmin_total", "X")
        assert np.allclose(r.fetch(), np.append(x.min(0), x.sum()))
        assert r.plan is not None
        (step,) = r.plan.steps
        assert step["strategy"] == "split"
        # each holder made its partial and sent it: both went through storage and the wire
        assert sorted(t["src"] for t in step["transfers"] if t["kind"] == "partial") == [
            "n2", "n3"]


def test_pack_partial_keeps_every_item_shape() -> None:
    from hpcflow.daemon.worker import pack_partial, unpack_partial

    grid = np.arange(12.0).reshape(3, 4)
    partial = (np.array(2.5), np.arange(3, dtype=np.int32), grid.T, np.empty((0, 2)),
               np.array(True))
    blob, how = pack_partial(partial)
    assert blob.dtype == np.uint8 and blob.nbytes == sum(x.nbytes for x in partial)
    back = unpack_partial(blob, how)
    assert [(x.shape, x.dtype) for x in back] == [(x.shape, x.dtype) for x in partial]
    assert all(np.array_equal(a, b) for a, b in zip(back, partial, strict=True))


def test_replan_when_a_holder_dies(make_cluster, tmp_path: Path, catalog_mode: str) -> None:  # type: ignore[no-untyped-def]
    if catalog_mode == "dht":
        # This test needs the initiator to plan with the dead holder before its TTL runs
        # out; in DHT mode the lookup of R asks the dead node's DHT node too and waits
        # out an RPC timeout, by which time the membership has marked it dead: the plan
        # uses n3 at once (no re-plan to count).  Re-planning itself is mode-independent.
        pytest.skip("relies on planning inside the dead holder's TTL (replicated only)")
    cfg = tmp_path / "fast.toml"
    cfg.write_text("transfer_timeout_s = 2.0\nrpc_timeout_s = 5.0\n")
    cl = make_cluster()
    for i in range(3):
        cl.add(f"n{i + 1}", via=f"n{i}" if i else None, extra=["--config", str(cfg)])
    cl.wait_members()
    data = np.random.default_rng(4).random((3000, 5))
    with cl["n2"].client() as c:
        c.put("R", data)
    with cl["n3"].client() as c:
        c.wait_for("R", 10)
        c.replicate("R")  # a second copy on n3
    wait_for(lambda: len(cl["n1"].client().locate("R")["parts"][0]["holders"]) == 2, 10,
             "two replicas of R")
    cl["n2"].kill(signal.SIGKILL)  # n1's catalog still believes n2 alive for a TTL
    with cl["n1"].client() as flow:
        s = flow.run("colsum", "R")
        assert np.allclose(s.fetch(), data.sum(0))
        # The plan first used n2 (the original holder); the re-plan used n3's replica.
        assert flow.report()["replans"] == 1


def test_cli_run_and_explain(thesis: tuple[Cluster, Any, Any], tmp_path: Path) -> None:
    cluster, d1, _ = thesis

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpcflow", *args], capture_output=True,
                              text=True, timeout=60 * SCALE)

    r = cli("explain", "--node", cluster["n1"].rpc, "colsum", "DS1")
    assert r.returncode == 0 and "optimal plan" in r.stdout, r.stderr
    r = cli("explain", "--node", cluster["n1"].rpc, "colsum", "DS1", "--save", "X")
    assert r.returncode == 2 and "--save" in r.stderr  # explain runs nothing to save
    out = tmp_path / "s.npy"
    r = cli("run", "--node", cluster["n1"].rpc, "scale", "DS1", "--param", "factor=2",
            "--output", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["shape"] == [ROWS, 12] and doc["bytes_moved"] == doc["bytes_planned"]
    assert np.allclose(np.load(out), 2 * d1)
    r = cli("run", "--node", cluster["n1"].rpc, "nope", "DS1", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["type"] == "UnknownOpError"
    # --save twice needs --overwrite; --method runs a baseline planner, range=0,1 is a list
    hist = tmp_path / "h.npy"
    args = ("run", "--node", cluster["n1"].rpc, "histogram", "DS1", "--param", "bins=4",
            "--param", "range=0,1", "--save", "HIST", "--method", "pull_all", "--json",
            "--output", str(hist))
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    counts, edges = np.histogram(d1, bins=4, range=(0, 1))
    want = np.column_stack([edges[:-1], edges[1:], counts])  # bins x [left, right, count]
    assert doc["plan"]["method"] == "pull_all" and np.array_equal(np.load(hist), want)
    with cluster["n1"].client() as c:
        assert np.array_equal(c.fetch("HIST"), want)
    r = cli(*args)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["type"] == "DatasetExists"
    assert cli(*args, "--overwrite").returncode == 0


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Four nodes kept for a module: random placements are put and removed per example."""
    cl = Cluster(tmp_path_factory.mktemp("wide"))
    try:
        for i in range(4):
            cl.add(f"n{i + 1}", via=f"n{i}" if i else None)
        cl.wait_members()
        yield cl
    finally:
        cl.stop()


def _table(counts: Any, edges: Any) -> Any:
    """histogram's result: bins x [left edge, right edge, count], float64."""
    return np.column_stack([edges[:-1], edges[1:], counts])


OPS_UNDER_TEST = [  # every built-in op; add gets the dataset twice
    ("scale", {"factor": -1.5}, lambda x: -1.5 * x),
    ("add", {}, lambda x: x + x),
    ("fft", {}, lambda x: np.fft.fft(x, axis=1)),
    ("colsum", {}, lambda x: x.sum(0)),
    ("colmean", {}, lambda x: x.mean(0)),
    ("gram", {}, lambda x: x.T @ x),
    ("histogram", {"bins": 5, "range": [0.0, 1.0]},
     lambda x: _table(*np.histogram(x, bins=5, range=(0.0, 1.0)))),
    ("median", {}, lambda x: np.median(x, axis=0)),
    ("quantiles", {"q": [0.1, 0.5, 0.9]}, lambda x: np.quantile(x, [0.1, 0.5, 0.9], axis=0)),
    ("sort_rows", {}, lambda x: x[np.lexsort(x.T[::-1])]),
    ("min", {}, lambda x: x.min(axis=0)),
    ("max", {}, lambda x: x.max(axis=0)),
    ("var", {}, lambda x: x.var(axis=0)),
    ("std", {}, lambda x: x.std(axis=0)),
    ("select", {"index": [2, 0]}, lambda x: x[:, [2, 0]]),
    ("frames", {"start": 1, "step": 3}, lambda x: x[1::3]),
]


@pytest.mark.parametrize("which", range(len(OPS_UNDER_TEST)),
                         ids=[op for op, _, _ in OPS_UNDER_TEST])
def test_split_execution_equals_numpy_on_random_partitions(wide: Cluster, which: int) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    op, params, ref = OPS_UNDER_TEST[which]
    arity = 2 if op == "add" else 1
    counter = iter(range(10**6))

    @settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=st.lists(st.sampled_from([0, 1, 2, 7, 40]), min_size=1, max_size=4),
           homes=st.lists(st.sampled_from(["n1", "n2", "n3", "n4"]), min_size=4, max_size=4),
           seed=st.integers(0, 1000))
    def check(rows: list[int], homes: list[str], seed: int) -> None:
        if sum(rows) == 0:
            rows = [*rows, 3]  # a median of nothing is undefined; keep at least one row
        data = np.random.default_rng(seed).random((sum(rows), 3))
        name = f"RP{op}{next(counter)}"
        start = 0
        for k, n in enumerate(rows):
            with wide[homes[k % 4]].client() as c:
                c.put(name, data[start : start + n], part=k, nparts=len(rows))
            start += n
        with wide["n1"].client() as flow:
            flow.wait_for(name, 10)
            got = flow.run(op, *[name] * arity, **params).fetch()
        assert np.allclose(got, ref(data)), (op, rows, homes)
        for k in range(len(rows)):
            with wide[homes[k % 4]].client() as c:
                c.delete(name, k)

    check()
