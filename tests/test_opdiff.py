"""An op module edited on one node only: the planner leaves that node out, and now
says so -- ``explain`` names the excluded nodes per step and why, ``status`` and
``info`` list each node's ops and hashes, and the odd node (and its peers) log a
warning naming the op."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import SCALE, Cluster, wait_for

V1 = """
from hpcflow import op

@op("twice", kind="rowwise")
def twice(x):
    return x * 2

@op("extra", kind="rowwise")
def extra(x):
    return x + 1
"""
V2 = """
from hpcflow import op

@op("twice", kind="rowwise")
def twice(x):
    return x * 2.0  # edited on one node only
"""


def test_different_op_definitions_are_visible(make_cluster: Any, tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "myops.py").write_text(V1)
    (tmp_path / "v2" / "myops.py").write_text(V2)
    c: Cluster = make_cluster()
    n1 = c.add("n1", extra=["--ops", str(tmp_path / "v1" / "myops.py")])
    c.add("n2", via="n1", extra=["--ops", str(tmp_path / "v1" / "myops.py")])
    n3 = c.add("n3", via="n1", extra=["--ops", str(tmp_path / "v2" / "myops.py")])
    c.wait_members()
    data = np.arange(24.0).reshape(6, 4)
    with n3.client() as cl:  # the data is on the odd node: it would be the natural choice
        cl.put("DS", data)
        h3 = cl.info()["ops"]["twice"]
    with n1.client() as cl:
        cl.wait_for("DS", timeout_s=10)
        h1 = cl.info()["ops"]["twice"]
        assert h1 != h3 and "extra" in cl.info()["ops"]
        a = cl.run("twice", "DS")
        b = cl.run("extra", a)
        view = cl.flow.plan(b)
        text = view.explain()
        assert view.raw["excluded"] == {
            a.name: {"n3": f"op 'twice' defined differently ({h3[:8]}, initiator's {h1[:8]})"},
            b.name: {"n3": "op 'extra' missing"}}
        assert f"excluded for {a.name}: n3 (op 'twice' defined differently" in text
        assert f"excluded for {b.name}: n3 (op 'extra' missing)" in text
        steps = {s["out"]: s for s in view.raw["steps"]}
        assert all("n3" not in s["nodes"] for s in steps.values())
        assert np.array_equal(b.fetch(), data * 2 + 1)  # and it still runs, without n3
    # status, from any node: each node's ops, and which differ from the majority
    r = subprocess.run([sys.executable, "-m", "hpcflow", "status", "--node", n3.rpc, "--json"],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["ops_differ"] == {"n3": {"twice": "differs", "extra": "missing"}}
    ops = {m["name"]: m["ops"] for m in st["members"]}
    assert ops["n1"]["twice"] == ops["n2"]["twice"] == h1 and ops["n3"]["twice"] == h3
    r = subprocess.run([sys.executable, "-m", "hpcflow", "status", "--node", n1.rpc],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert "ops that differ on n3: extra (missing), twice (differs)" in r.stdout
    # the warning, on the odd node and on its peers, once each
    wait_for(lambda: "op 'twice' here" in n3.log_tail(400)
             and "differs from the one n1 advertises" in n3.log_tail(400), 10,
             "n3's warning")
    wait_for(lambda: "differs from the one n3 advertises" in n1.log_tail(400), 10,
             "n1's warning")
    n1_log = n1.log_path.read_text()
    assert n1_log.count("differs from the one n3 advertises") == 1
    assert "differs from the one n2 advertises" not in n1_log
