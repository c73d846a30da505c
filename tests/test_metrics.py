"""``--metrics``: a real node serves Prometheus text over HTTP, scraped with urllib and
parsed with prometheus_client's own parser; the numbers are checked against the
node's stats and what the test did.  A scraper that never finishes its request
does not stop the node's heartbeats or RPC."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import hpcflow

from .conftest import SCALE, TTL, Cluster, wait_for


def scrape(url: str) -> dict[str, Any]:
    """``{family: {labels-tuple: value}}`` of one scrape (samples by their full name)."""
    with urllib.request.urlopen(url, timeout=10 * SCALE) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def metrics_url(node: Any) -> str:
    return str(json.loads((node.data_dir / "node.json").read_text())["metrics"])


BOOM = """
from hpcflow import op

@op("boom", kind="rowwise")
def boom(x):
    if x.shape[0] > 50:  # fine on the planner's tiny samples, fails on the real rows
        raise ValueError("boom")
    return x
"""


def test_metrics_scraped_over_http(make_cluster: Any, tmp_path: Path) -> None:
    ops = tmp_path / "boom_ops.py"
    ops.write_text(BOOM)
    c: Cluster = make_cluster()
    n1 = c.add("n1", extra=["--metrics", "127.0.0.1:0", "--ops", str(ops)])
    n2 = c.add("n2", via="n1", extra=["--metrics", "127.0.0.1:0", "--ops", str(ops)])
    c.wait_members()
    url1, url2 = metrics_url(n1), metrics_url(n2)
    m = scrape(url1)
    assert m["hpcflow_members"] == {(("state", "alive"),): 2.0, (("state", "dead"),): 0.0}
    assert m["hpcflow_node_info"][(("node", "n1"), ("version", hpcflow.__version__))] == 1
    data = np.random.default_rng(1).random((1000, 12))
    with n2.client() as cl:
        cl.put("DS", data)
    with n1.client() as cl:
        cl.wait_for("DS", timeout_s=10)
        # sum over rows: n1 pulls DS from n2 or runs colsum there; either way bytes move
        h = cl.run("colsum", "DS")
        assert np.allclose(h.fetch(), data.sum(axis=0))
        report = cl.report()
        with n2.client() as c2:
            stats2 = c2.stats()["traffic"]
    m1, m2 = scrape(url1), scrape(url2)
    assert m2["hpcflow_store_bytes"][()] == data.nbytes
    assert m2["hpcflow_store_datasets"][()] == 1
    # The flow's intermediates go when it closes, and their removal reaches each catalog
    # in its own time: wait until both list DS alone.
    wait_for(lambda: all(scrape(u)["hpcflow_catalog_entries"][()] == 1 for u in (url1, url2)),
             10, "both catalogs to list DS alone")
    # bytes per peer node, as the node's own counters have them (no dataset label)
    sent2 = {dict(k)["peer"]: v for k, v in m2["hpcflow_transfer_sent_bytes_total"].items()}
    assert sent2 == {k: float(v) for k, v in stats2["bytes_sent"].items()}
    assert sent2.get("n1", 0) == sum(v for k, v in report["moved"].items() if k == "n2->n1")
    assert all(len(k) == 1 for k in m2["hpcflow_transfer_sent_bytes_total"])
    # the op ran exactly once, on whichever node the plan chose, and failed nowhere
    runs = [mm.get("hpcflow_ops_run_total", {}).get((("op", "colsum"),), 0) for mm in (m1, m2)]
    assert sum(runs) == 1
    assert not m1.get("hpcflow_ops_failed_total") and not m2.get("hpcflow_ops_failed_total")
    assert m1["hpcflow_planning_duration_seconds_count"][()] >= 1  # n1 planned
    assert m1["hpcflow_planning_duration_seconds_sum"][()] > 0
    ran = m1 if runs[0] else m2
    assert ran["hpcflow_op_duration_seconds_count"][()] == 1
    assert ran["hpcflow_step_duration_seconds_count"][(("phase", "compute"),)] == 1
    assert ran["hpcflow_op_duration_seconds_bucket"][(("le", "+Inf"),)] == 1
    # a failing op is counted by op, where it ran
    with n1.client() as cl, pytest.raises(hpcflow.OpError, match="boom"):
        cl.run("boom", "DS").fetch()
    m1, m2 = scrape(url1), scrape(url2)
    failed = [mm.get("hpcflow_ops_failed_total", {}).get((("op", "boom"),), 0) for mm in (m1, m2)]
    assert sum(failed) == 1
    assert scrape(url1)["hpcflow_bulk_transfers_in_flight"] == {
        (("direction", "pull"),): 0.0, (("direction", "upload"),): 0.0}


def test_stalled_scraper_does_not_stop_the_node(make_cluster: Any) -> None:
    c: Cluster = make_cluster()
    n1 = c.add("n1", extra=["--metrics", "127.0.0.1:0"])
    n2 = c.add("n2", via="n1")
    c.wait_members()
    host, port = metrics_url(n1)[len("http://"):].split("/")[0].rsplit(":", 1)
    stalled = []
    try:
        for _ in range(20):  # more than the scrapes served at once, each half a request
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            stalled.append(s)
        # n2 keeps seeing n1 alive over three TTLs (n1's heartbeats go on), and n1
        # still answers RPC
        with n2.client() as cl:
            end = time.monotonic() + 3 * TTL * SCALE
            while time.monotonic() < end:
                assert all(n["alive"] for n in cl.nodes()), "n1 stopped heartbeating"
                gevent.sleep(0.05)
        with n1.client() as cl:
            assert cl.ping()["name"] == "n1"
    finally:
        for s in stalled:
            s.close()
    # once they go, a real scrape is served again
    wait_for(lambda: scrape(metrics_url(n1))["hpcflow_members"], 10, "a scrape after stalls")


def test_metrics_address_taken(make_cluster: Any) -> None:
    c: Cluster = make_cluster()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        try:
            c.add("n1", extra=["--metrics", f"127.0.0.1:{port}"])
        except Exception as exc:  # the node exits 1; its log says why
            assert "cannot serve metrics on" in str(exc)
        else:
            raise AssertionError("a node started on a taken metrics port")
