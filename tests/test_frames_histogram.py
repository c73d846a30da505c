"""Issue 14, item 5 (the rest): ``frames`` split over nodes with the stride kept across
part boundaries and its output rows predicted by the planner; ``histogram`` with its bin
edges; ``hpcflow run --json`` with the values of arrays of any size.

Real daemons on loopback: a trajectory split unevenly over three nodes.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hpcflow.errors import ParamError
from hpcflow.ops import histogram_counts_edges

from .conftest import SCALE, Cluster, names_on, three_nodes

CUTS = (0, 33, 67, 100)  # parts of 33, 34 and 33 frames on n1, n2, n3
TRJ = np.random.default_rng(5).random((100, 4, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with three_nodes(tmp_path_factory.mktemp("frames"), n3_via="n1") as c:
        for k, node in enumerate(("n1", "n2", "n3")):
            with c[node].client() as cl:
                cl.put("TRJ", TRJ[CUTS[k]:CUTS[k + 1]], part=k, nparts=3)
        with c["n1"].client() as cl:
            cl.wait_for("TRJ", 10)
        yield c


def _kept_per_part(sl: slice) -> list[int]:
    rows = np.arange(len(TRJ))[sl]
    return [int(((rows >= lo) & (rows < hi)).sum()) for lo, hi in itertools.pairwise(CUTS)]


@pytest.mark.parametrize("params", [{"start": 2, "stop": 95, "step": 7}, {"step": 10},
                                    {"start": -40, "step": 3}, {"start": 34, "stop": 66}])
def test_frames_split_keeps_the_global_stride_and_the_plan_counts_its_rows(
        trio: Cluster, params: dict[str, Any]) -> None:
    sl = slice(params.get("start", 0), params.get("stop"), params.get("step", 1))
    want = TRJ[sl]
    with trio["n1"].client() as flow:
        h = flow.run("frames", "TRJ", **params)
        step = flow.flow.plan(h).steps[0]
        # each holder selects its own frames: nothing moves to run the op
        assert step["strategy"] == "split" and step["nodes"] == ["n1", "n2", "n3"]
        assert step["nbytes"] == 0
        spans = [w["out_rows"] for w in step["work"] if w["mode"] == "part"]
        assert [hi - lo for lo, hi in spans] == _kept_per_part(sl)
        got = h.fetch()
        assert got.dtype == want.dtype and np.array_equal(got, want)
        report = flow.report()
        # the delivery of n2's and n3's frames was planned to the byte: the output rows
        # of every part were predicted right (ceil(rows / step) is not affine in rows)
        row = TRJ[0].nbytes
        moved, planned = ({k: n for k, n in report[w].items() if n} for w in ("moved",
                                                                              "planned"))
        assert moved == planned == {
            f"{n}->n1": k * row for n, k in zip(("n2", "n3"), _kept_per_part(sl)[1:],
                                                strict=True) if k}


def test_frames_feeds_later_steps_split_and_reduced(trio: Cluster) -> None:
    with trio["n2"].client() as flow:
        picked = flow.run("frames", "TRJ", start=1, step=4)
        scaled = flow.run("scale", picked, factor=2.0)  # stays split where the frames are
        mean = flow.run("colmean", scaled)
        plan = flow.flow.plan(mean)
        assert [s["strategy"] for s in plan.steps[:2]] == ["split", "split"]
        spans = [w["out_rows"] for w in plan.steps[1]["work"] if w["mode"] == "part"]
        assert [hi - lo for lo, hi in spans] == _kept_per_part(slice(1, None, 4))
        got = mean.fetch()
        np.testing.assert_allclose(got, 2.0 * TRJ[1::4].astype(np.float64).mean(axis=0),
                                   rtol=1e-12)
        assert got.dtype == np.float64
        report = flow.report()
        assert report["bytes_moved"] == report["bytes_planned"]


def test_frames_bad_params_are_param_errors_and_leave_nothing(trio: Cluster) -> None:
    before = {n: names_on(trio[n]) for n in ("n1", "n2", "n3")}
    with trio["n3"].client() as flow:
        for bad, msg in (({"step": 0}, "step must be an integer >= 1"),
                         ({"step": -2}, ">= 1"), ({"start": 1.5}, "start must be an integer"),
                         ({"stop": "10"}, "stop must be"), ({"every": 2}, "bad params")):
            with pytest.raises(ParamError, match=msg):
                flow.run("frames", "TRJ", **bad).fetch()
            with pytest.raises(ParamError, match=msg):
                flow.explain(flow.run("frames", "TRJ", **bad))
    assert {n: names_on(trio[n]) for n in ("n1", "n2", "n3")} == before


def test_histogram_split_gives_numpys_counts_and_edges(trio: Cluster) -> None:
    values = TRJ.astype(np.float64)
    with trio["n1"].client() as flow:
        h = flow.run("histogram", "TRJ", bins=9, range=[0.1, 0.95])
        table = h.fetch()
        assert h.plan is not None and h.plan.steps[0]["combiner"] == "n1"
        counts, edges = np.histogram(TRJ, bins=9, range=(0.1, 0.95))  # edges in float32
        assert table.dtype == np.float64 and table.shape == (9, 3)
        np.testing.assert_array_equal(table[:, 2], counts)
        np.testing.assert_array_equal(table[:, 0], edges[:-1].astype(np.float64))
        np.testing.assert_array_equal(table[:, 1], edges[1:].astype(np.float64))
        got_counts, got_edges = histogram_counts_edges(table)
        assert np.array_equal(got_counts, counts) and np.array_equal(got_edges, edges)
        # only n2's and n3's partials moved: 9 counts, 2 outer edges (and no raw values)
        assert flow.report()["moved"] == {"n2->n1": 9 * 8 + 2 * 8, "n3->n1": 9 * 8 + 2 * 8}
        edged = flow.run("histogram", "TRJ", bins=[0.0, 0.2, 0.5, 1.0]).fetch()
        want_c, want_e = np.histogram(values, bins=[0.0, 0.2, 0.5, 1.0])
        assert np.array_equal(histogram_counts_edges(edged)[0], want_c)
        assert np.array_equal(histogram_counts_edges(edged)[1], want_e)
    before = {n: names_on(trio[n]) for n in ("n1", "n2", "n3")}
    with trio["n2"].client() as flow:
        with pytest.raises(ParamError, match=r"give range=\(lo, hi\) with an integer bins"):
            flow.run("histogram", "TRJ", bins=9).fetch()
        with pytest.raises(ParamError, match="one node would have to gather all of it"):
            flow.explain(flow.run("histogram", "TRJ"))
    assert {n: names_on(trio[n]) for n in ("n1", "n2", "n3")} == before


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "hpcflow", *args], capture_output=True,
                       text=True, timeout=60 * SCALE)
    assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_run_json_prints_every_value_or_writes_the_file(trio: Cluster, tmp_path: Path) -> None:
    node = trio["n3"].rpc
    doc = json.loads(_cli("run", "--node", node, "frames", "TRJ", "--param", "step=2",
                          "--json").stdout)
    assert doc["shape"] == [50, 4, 3]  # 600 values, once left out past 20
    assert np.array_equal(np.array(doc["values"], dtype=np.float32), TRJ[::2])
    doc = json.loads(_cli("run", "--node", node, "fft", "TRJ", "--json").stdout)
    got = np.array(doc["values"]["real"]) + 1j * np.array(doc["values"]["imag"])
    np.testing.assert_allclose(got, np.fft.fft(TRJ, axis=1), rtol=1e-5, atol=1e-5)
    out = tmp_path / "f.npy"
    doc = json.loads(_cli("run", "--node", node, "frames", "TRJ", "--param", "start=-3",
                          "--json", "--output", str(out)).stdout)
    assert doc["values"] is None and np.array_equal(np.load(out), TRJ[-3:])
    text = _cli("run", "--node", node, "scale", "TRJ", "--param", "factor=1").stdout
    assert "..." in text and "every value: --json, or --output" in text  # numpy's summary
    text = _cli("run", "--node", node, "frames", "TRJ", "--param", "step=40").stdout
    assert f"{TRJ[80, 3, 2]:.8f}"[:6] in text and "every value" not in text
