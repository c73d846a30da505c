"""Partitioned saves, full lineage and recompute, on real daemons (issue 14, item 3).

The input X is split in two parts, on n2 and n3 (part 1 also on n4); V is a
short vector on n1, the initiator.  A three-step flow (scale, add V, select) leaves its result
split on n2/n3; saving it partitioned keeps the parts there (0 bytes moved)
and records a lineage that names only X and V.  Then the holder of saved part
1 is killed: ``recompute`` refuses while V is gone or changed (naming it);
with V as it was, it re-derives the lost part on the surviving holder of X's
part 1, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hpcflow
from hpcflow.catalog.lineage import MAX_DEPTH, MAX_LINEAGE_BYTES, Lineage, Source, Step
from hpcflow.errors import (
    DatasetExists,
    DatasetNotFound,
    InputChanged,
    InputMissing,
    InvalidData,
    InvalidName,
    LineageError,
)

from .conftest import Cluster, wait_for

ROWS, COLS = 600, 8
#: An op that is not deterministic: what it made cannot be recomputed.
NOISY_OPS = """
import numpy as np
from hpcflow import op

@op("jitter", kind="rowwise")
def jitter(x):
    return x + np.random.default_rng().random(x.shape)
"""
HALF = ROWS // 2


@pytest.fixture
def split(tmp_path: Path) -> Iterator[Cluster]:
    """n1 (the initiator, holds V), n2 and n3 (a part of X each), n4 (spare)."""
    ops = tmp_path / "noisy_ops.py"
    ops.write_text(NOISY_OPS)
    c = Cluster(tmp_path / "cluster")
    try:
        c.add("n1", extra=["--ops", str(ops)])
        for n in ("n2", "n3", "n4"):
            c.add(n, via="n1", extra=["--ops", str(ops)])
        c.wait_members()
        yield c
    finally:
        c.stop()


def _put_inputs(cluster: Cluster, x: np.ndarray[Any, Any], v: np.ndarray[Any, Any]) -> None:
    with cluster["n2"].client() as c:
        c.put("X", x[:HALF], part=0, nparts=2)
    with cluster["n3"].client() as c:
        c.put("X", x[HALF:], part=1, nparts=2)
    with cluster["n1"].client() as c:
        c.put("V", v)
    with cluster["n4"].client() as c:  # a replica: X stays whole when n3 or n4 dies
        c.wait_for("X", 10)
        c.replicate("X", 1)
    with cluster["n1"].client() as c:
        wait_for(lambda: len(c.locate("X")["parts"][1]["holders"]) == 2, 10,
                 "X part 1 on n3 and n4")


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcflow", *args, "--node", cluster["n1"].rpc],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())


def _received(cluster: Cluster) -> dict[str, int]:
    out = {}
    for n in ("n1", "n2", "n3", "n4"):
        with cluster[n].client() as c:
            out[n] = sum(c.stats()["traffic"]["bytes_received"].values())
    return out


def test_partitioned_save_lineage_and_recompute(split: Cluster) -> None:
    rng = np.random.default_rng(14)
    x, v = rng.random((ROWS, COLS)), rng.random(COLS)
    _put_inputs(split, x, v)
    expected = (x * 2.0 + v)[:, [0, 2, 5]]

    with split["n1"].client() as c:
        h = c.run("select", c.run("add", c.run("scale", "X", factor=2.0), "V"), index=[0, 2, 5])
        assert np.array_equal(h.fetch(), expected)
        made = c.wait_for(h.name, 10)["parts"]
        assert len(made) == 2
        made_on = {p["part"]: {r["owner"] for r in p["holders"]} for p in made}
        before_report, before_nodes = c.report()["bytes_moved"], _received(split)
        h.save("RESULT")  # split: partitioned by default
        # nothing moved: by the flow's report and by the daemons' own counters
        assert c.report()["bytes_moved"] == before_report
        assert _received(split) == before_nodes
        h.save("WHOLE", partitioned=False)  # gathered: the other half moves to n1
        gathered = c.report()["bytes_moved"] - before_report
        assert 0 < gathered <= expected.nbytes
        after = _received(split)
        assert {n for n in after if after[n] != before_nodes[n]} == {"n1"}
        assert after["n1"] - before_nodes["n1"] == gathered
        # refusals come before anything is written, and lose nothing
        with pytest.raises(DatasetExists, match="RESULT already exists"):
            h.save("RESULT")
        with pytest.raises(InvalidData, match="V is a whole dataset on n1"):
            h.save("V", overwrite=True)
        assert np.array_equal(c.fetch("V"), v)
        with pytest.raises(InvalidName):
            h.save(h.name)
        h.save("RESULT", overwrite=True)  # a new version of each part, where it was
        # (the save returns once the initiator's catalog shows every part it wrote)
        assert {r.version for r in c.catalog() if r.name == "RESULT"} == {2}
        assert _received(split) == after
        noisy = c.run("select", c.run("jitter", h), index=[0])  # on h's parts, where they are
        noisy.fetch()
        noisy.save("NOISY")
        assert ({p["part"]: p["holders"][0]["owner"] for p in c.locate("NOISY")["parts"]}
                == {p["part"]: p["holders"][0]["owner"] for p in c.locate(h.name)["parts"]})
        # saved without being fetched: planned to stay where it is made, so the fft (twice
        # the bytes) runs on X's holders; delivered, it would pull X to n1 first
        assert c.flow.plan(c.run("fft", "X")).bytes_moved >= x.nbytes // 2
        spec, before = c.run("fft", "X"), (c.report()["bytes_moved"], _received(split))
        spec.save("SPEC")
        assert (c.report()["bytes_moved"], _received(split)) == before
        assert len(c.locate("SPEC")["parts"]) == 2
        assert np.allclose(c.fetch("SPEC"), np.fft.fft(x, axis=1))
        sums = c.run("colsum", h)  # a reduce over the flow's output: its partials' inputs
        sums.save("SUMS")
        assert np.allclose(c.fetch("SUMS"), expected.sum(axis=0))
        lin_sums = c.lineage("SUMS")
        assert lin_sums is not None
        assert [(s.op, s.inputs) for s in lin_sums.steps][2:] == [("select", (1,)),
                                                                 ("colsum", (2,))]

    with split["n1"].client() as c:
        loc = c.wait_for("RESULT", 10)
        assert len(loc["parts"]) == 2
        for p in loc["parts"]:  # each part stays on a node that made it, one copy
            assert len(p["holders"]) == 1 and p["holders"][0]["owner"] in made_on[p["part"]]
            assert p["holders"][0]["nparts"] == 2
        assert [len(p["holders"]) for p in c.locate("WHOLE")["parts"]] == [1]
        assert c.locate("WHOLE")["parts"][0]["holders"][0]["owner"] == "n1"
        assert np.array_equal(c.fetch("RESULT"), expected)
        assert c.lineage("X") is None  # put: no derivation

        lin = c.lineage("RESULT")
        assert lin is not None and lin.truncated is None
        assert [s.op for s in lin.steps] == ["scale", "add", "select"]
        assert [s.params for s in lin.steps] == [{"factor": 2.0}, {}, {"index": [0, 2, 5]}]
        assert [s.inputs for s in lin.steps] == [("X",), (0, "V"), (1,)]
        assert all(len(s.op_hash) >= 8 for s in lin.steps)
        assert {s.name for s in lin.sources} == {"X", "V"}
        assert "wf-" not in json.dumps(lin.to_wire()["steps"])
        assert "wf-" not in json.dumps(lin.to_wire()["sources"])
        for s in lin.sources:  # the versions and checksums the steps read
            assert s.differs(*_now(c, s.name)) is None
            assert s.versions == (1,)
        assert c.lineage("WHOLE") == lin  # the same derivation, gathered or not
        for p in loc["parts"]:  # every part's record carries it, and its rows
            rec = p["holders"][0]["lineage"]
            assert rec["derivation"] == lin.to_wire() and rec["saved_from"] == h.name
            assert rec["rows"] == [p["row_start"], p["row_stop"]]

    tree = _cli(split, "lineage", "RESULT")
    assert tree.returncode == 0, tree.stderr
    assert tree.stdout.startswith("RESULT") and "scale" in tree.stdout
    assert "X  (put; version 1" in tree.stdout and "V  (put; version 1" in tree.stdout
    as_json = json.loads(_cli(split, "lineage", "RESULT", "--json").stdout)
    assert Lineage.from_wire(as_json["derivation"]) == lin and as_json["missing"] == []
    assert {h["node"] for p in as_json["parts"] for h in p["holders"]} <= {"n2", "n3", "n4"}
    # the same from the shell: a split result is saved partitioned unless --gather
    for name, how, nparts in (("SEL", [], 2), ("SELW", ["--gather"], 1)):
        run = _cli(split, "run", "select", "X", "--param", "index=[1]", "--save", name,
                   *how, "--json")
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        assert doc["shape"] == [x.shape[0], 1] and doc["values"] is None
        if not how:  # saved where it was made, never fetched: nothing moved
            assert doc["bytes_moved"] == 0
        with split["n1"].client() as c:
            assert len(c.wait_for(name, 10)["parts"]) == nparts
            assert np.array_equal(c.fetch(name), x[:, [1]])

    # the holder of saved part 1 (n3 or n4, whichever the plan chose) dies, stays dead
    assert made_on[0] == {"n2"} and len(made_on[1]) == 1
    victim = made_on[1].pop()
    survivor = ({"n3", "n4"} - {victim}).pop()
    split[victim].kill(signal.SIGKILL)
    with split["n1"].client() as c:
        wait_for(lambda: not c.locate("RESULT")["complete"], 10, f"{victim} noticed dead")
        assert c.locate("RESULT")["missing"] == [1]
        with pytest.raises(hpcflow.DatasetNotFound):
            c.fetch("RESULT")
        c.delete("V")  # an input that is gone: refused, naming it
        with pytest.raises(InputMissing, match=r"input V is gone"):
            c.recompute("RESULT")
        c.put("V", v + 1.0)  # ... or that changed: refused, naming it, nothing stored
        with pytest.raises(InputChanged, match=r"input V changed .*checksum"):
            c.recompute("RESULT")
        assert c.locate("RESULT")["missing"] == [1]
        c.delete("V")
        c.put("V", v)  # the same data again (from its source): recompute may run
        # an op that is not deterministic: the recomputed part differs, nothing is stored
        assert c.locate("NOISY")["missing"] == [1]
        with pytest.raises(LineageError, match="part 1 of NOISY differs from the saved one"):
            c.recompute("NOISY")
        assert c.locate("NOISY")["missing"] == [1]
        with split[survivor].client() as cs:  # its own records: nothing was written there
            assert not [r for r in cs.catalog() if r.name == "NOISY" and r.owner == survivor]
        wait_for(lambda: not [r for r in c.catalog() if r.name.startswith("wf-")], 10,
                 "the recomputing flow's intermediates gone")
    out = _cli(split, "recompute", "RESULT", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["restored"] == [1]
    with split["n1"].client() as c:
        loc = c.wait_for("RESULT", 10)
        assert [p["holders"][0]["owner"] for p in loc["parts"]] == ["n2", survivor]
        assert np.array_equal(c.fetch("RESULT"), expected)
        assert c.recompute("RESULT")["restored"] == []  # nothing lost any more
        with pytest.raises(LineageError, match="put, not saved"):
            c.recompute("X")
    bad = _cli(split, "recompute", "X")  # one typed line from the shell
    assert bad.returncode == 1 and "(LineageError)" in bad.stderr, bad.stderr
    bad = _cli(split, "lineage", "NOPE", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["type"] == "DatasetNotFound"
    with split["n1"].client() as c:
        # the flow that recomputed it left nothing behind
        wait_for(lambda: not [r for r in c.catalog() if r.name.startswith("wf-")], 10,
                 "the recomputing flow's intermediates gone")


def _now(c: hpcflow.Client, name: str) -> tuple[set[int], str]:
    from hpcflow.catalog.lineage import source_digest

    parts = c.locate(name)["parts"]
    return ({h["version"] for p in parts for h in p["holders"]},
            source_digest((p["part"], p["holders"][0]["checksum"]) for p in parts))


# -- the lineage structure itself (pure) ---------------------------------------------

def _lin(nsteps: int, params: dict[str, Any] | None = None) -> Lineage:
    steps = [Step("scale", "ab" * 8, dict(params or {"factor": 2}), ("X",))]
    steps += [Step("scale", "ab" * 8, {"factor": k}, (k - 1,)) for k in range(1, nsteps)]
    return Lineage(tuple(steps), (Source("X", (1,), "c" * 32),), "wf-x")


def test_lineage_round_trips_and_refuses_garbage() -> None:
    lin = _lin(3)
    assert Lineage.from_wire(json.loads(json.dumps(lin.to_wire()))) == lin
    nested = Lineage((Step("add", "", {}, ("S", "X")),),
                     (Source("S", (2,), "d" * 32, lin), Source("X", (1,), "c" * 32)))
    assert Lineage.from_wire(nested.to_wire()) == nested
    assert "S  (saved; version 2" in "\n".join(nested.render("OUT"))
    for bad in ({"steps": [{"op": "a", "inputs": [3]}], "sources": []},  # not an earlier step
                {"steps": [{"op": "a", "inputs": ["Y"]}], "sources": []},  # not a source
                {"steps": [{"op": "a", "inputs": [True]}], "sources": []},
                {"steps": "x"}, {"format": 99}, [], {"sources": [{"name": "X"}]}):
        with pytest.raises(InvalidData):
            Lineage.from_wire(bad)


def test_lineage_past_the_limit_is_truncated_with_a_marker() -> None:
    small = _lin(2)
    assert small.bounded() is small
    big = _lin(3, {"factor": 2, "blob": "x" * MAX_LINEAGE_BYTES})
    cut = big.bounded()
    assert cut.nbytes() <= MAX_LINEAGE_BYTES
    assert cut.steps == () and cut.truncated is not None and "limit" in cut.truncated
    assert [s.name for s in cut.sources] == ["X"]  # still names what it read
    assert "steps not recorded" in "\n".join(cut.render("BIG"))
    # a saved source's own (nested) lineage goes first, marked as omitted
    nested = Lineage((Step("add", "", {}, ("S",)),), (Source("S", (1,), "d" * 32, big),))
    lean = nested.bounded()
    assert lean.steps == nested.steps and lean.sources[0].lineage is None
    assert lean.sources[0].omitted is not None and "limit" in lean.sources[0].omitted


def test_lineage_nested_past_the_depth_limit_is_cut_with_a_marker() -> None:
    lin = _lin(1)
    for k in range(MAX_DEPTH + 3):  # each level a saved dataset derived from the one below
        lin = Lineage((Step("scale", "", {}, (f"S{k}",)),),
                      (Source(f"S{k}", (1,), "d" * 32, lin),))
    with pytest.raises(InvalidData, match="nested more than"):
        Lineage.from_wire(lin.to_wire())
    cut = lin.bounded()
    assert cut.depth() == MAX_DEPTH + 1
    assert Lineage.from_wire(cut.to_wire()) == cut
    assert "nested deeper than" in json.dumps(cut.to_wire())


def test_bad_save_and_lineage_requests_are_typed_errors(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    cluster.add("n1")
    cluster.wait_members()
    with cluster["n1"].client() as c:
        c.put("D", np.arange(30.0).reshape(10, 3))
        h = c.run("scale", "D", factor=2.0)
        h.fetch()
        with pytest.raises(InvalidData, match="partitioned"):
            h.save("S", partitioned="yes")  # type: ignore[arg-type]
        flow, secret = c.flow.id, c.flow.secret.to_wire()
        for options, error in (({"partitioned": "yes"}, InvalidData), ("x", InvalidData),
                               ({"restore": 1}, InvalidData),
                               ({"restore": True}, DatasetNotFound)):  # no such saved dataset
            with pytest.raises(error):
                c._call("save", flow, h.name, "S", False, secret, options)
        for req in ("x", {}, {"output": h.name, "name": "S", "replica": {"checksum": 3}},
                    {"output": h.name, "name": "S", "lineage": "x"}):
            with pytest.raises((InvalidData, InvalidName)):
                c._call("save_part", req)  # node-only with keys; checked without
        with pytest.raises(InvalidName):
            c.lineage("../etc")
        with pytest.raises(DatasetNotFound):
            c.lineage("NOPE")
        with pytest.raises(DatasetNotFound):
            c.recompute("NOPE")
        assert "S" not in {r.name for r in c.catalog()}  # nothing stored by any of them
        h.save("S")  # and the node goes on: a whole result, gathered (here)
        assert np.array_equal(c.fetch("S"), np.arange(30.0).reshape(10, 3) * 2)
        assert c.lineage("S") is not None and c.recompute("S")["restored"] == []
