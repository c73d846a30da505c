"""The NFS approach against a real nfs-ganesha: result, exact byte counts, skips, netns.

Needs root and the packages of ``nfs_baseline/install-system-deps.sh``;
elsewhere the NFS tests are skipped with ``nfs_baseline.available()``'s
reason.  Worker timeouts scale with ``HPCFLOW_TIMEOUT_SCALE``; nothing
sleeps to synchronise.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nfs_baseline
from hpcflow.harness import netns
from hpcflow.harness.nfs_approach import NfsApproachError, run_nfs
from hpcflow.harness.report import array_checksum
from hpcflow.harness.scenario import NFS_HOST, Scenario, generate, load_scenario, reference_result

# Real NFS servers, network namespaces and whole replays: one xdist worker runs
# them one after another (tests/conftest.py), the rest of the suite beside them.
pytestmark = pytest.mark.xdist_group("hosts")

SCALE = float(os.environ.get("HPCFLOW_TIMEOUT_SCALE", "1"))
NFS_OK, NFS_REASON = nfs_baseline.available()
needs_nfs = pytest.mark.skipif(not NFS_OK, reason=f"NFS baseline unavailable: {NFS_REASON}")

SMALL = """\
name = "small"
nodes = ["n1", "n2", "n3"]
initiator = "n1"
result = "M"
seed = 5
[links]
default_gbit = 1.0
"n1-nfs" = 0.5
[datasets.DS1]
shape = [3000, 4]
dtype = "float64"
parts = [{ node = "n2", rows = 1800 }, { node = "n3", rows = 1200 }]
[datasets.DS2]
shape = [3000, 4]
dtype = "float32"
parts = [{ node = "n1", rows = 3000 }]
[[steps]]
out = "A"
op = "scale"
inputs = ["DS1"]
params = { factor = 2.0 }
[[steps]]
out = "B"
op = "add"
inputs = ["A", "DS2"]
[[steps]]
out = "M"
op = "colsum"
inputs = ["B"]
"""


def npy_size(arr: np.ndarray[Any, Any]) -> int:
    buf = io.BytesIO()
    np.save(buf, arr)
    return len(buf.getvalue())


@pytest.fixture
def small(tmp_path: Path) -> Scenario:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return load_scenario(path)


def check_small(sc: Scenario, result: Any) -> None:
    """Exact bytes: each step reads its input files and writes one output; n1 reads M."""
    data = generate(sc)
    ds1 = [arr for _, arr in data["DS1"]]
    ds2 = data["DS2"][0][1]
    a = 2.0 * np.concatenate(ds1)
    b = a + ds2
    m = b.sum(axis=0)
    reads = sum(map(npy_size, ds1)) + npy_size(a) + npy_size(ds2) + npy_size(b) + npy_size(m)
    writes = npy_size(a) + npy_size(b) + npy_size(m)
    assert result.skipped is None
    assert result.links == {"nfs->n1": reads, "n1->nfs": writes}
    assert result.bytes_moved == reads + writes
    assert result.messages == (2 + 1) + (2 + 1) + (1 + 1) + 1  # file reads + writes per job
    assert result.matches_reference and result.max_abs_err == 0.0
    assert result.result_checksum == array_checksum(reference_result(sc, data))
    placed = {"n2->nfs": npy_size(ds1[0]), "n3->nfs": npy_size(ds1[1]), "n1->nfs": npy_size(ds2)}
    assert result.extra["placement_links"] == placed
    assert result.extra["placement_bytes"] == sum(placed.values())
    assert result.extra["step_node"] == {"A": "n1", "B": "n1", "M": "n1"}
    assert 0 < result.wall_s <= result.extra["wall_incl_process_start_s"]


@needs_nfs
def test_small_scenario_over_loopback(small: Scenario, tmp_path: Path) -> None:
    result = run_nfs(small, generate(small), workdir=tmp_path / "work",
                     worker_timeout_s=60 * SCALE)
    check_small(small, result)
    assert result.extra["netns"] is False


@pytest.mark.skipif(not (NFS_OK and netns.available()[0]),
                    reason=f"needs NFS ({NFS_REASON or 'ok'}) and netns "
                           f"({netns.available()[1] or 'ok'})")
def test_small_scenario_in_network_namespaces(small: Scenario, tmp_path: Path) -> None:
    hosts = [*small.nodes, NFS_HOST]
    with netns.Topology(hosts, bandwidth_gbit=small.links.default_gbit,
                        links=dict(small.links.overrides)) as topo:
        assert topo.bandwidth("nfs", "n1") == 0.5
        result = run_nfs(small, generate(small), topology=topo, workdir=tmp_path / "work",
                         worker_timeout_s=60 * SCALE)
    check_small(small, result)
    assert result.extra["netns"] is True
    assert f"nfs://{topo.address(NFS_HOST)}/" in result.extra["url"]


def test_skipped_with_reason_when_the_server_binary_is_absent(
        small: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no ganesha.nfsd (nor anything else) here
    ok, reason = nfs_baseline.available()
    assert not ok
    result = run_nfs(small, generate(small), workdir=tmp_path / "work")
    assert result.skipped == reason
    assert result.approach == "nfs" and result.bytes_moved == 0 and not result.matches_reference
    if os.geteuid() == 0:
        assert "'ganesha.nfsd' not found" in reason


@needs_nfs
def test_failing_worker_raises_with_its_error(small: Scenario, tmp_path: Path) -> None:
    data = generate(small)
    data["DS2"] = [("n1", data["DS2"][0][1][:10])]  # rows no longer line up with A
    with pytest.raises(NfsApproachError, match=r"step B on n1 failed .*equal row counts"):
        run_nfs(small, data, workdir=tmp_path / "work", worker_timeout_s=60 * SCALE)


def test_worker_reports_bad_jobs_as_json() -> None:
    done = subprocess.run([sys.executable, "-m", "nfs_baseline.worker",
                           json.dumps({"kind": "bogus", "url": "nfs://127.0.0.1/x"})],
                          capture_output=True, text=True, timeout=60 * SCALE, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "error": "ValueError: unknown job kind 'bogus' (known: put, step, get)"}
