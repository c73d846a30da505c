"""The replay harness end to end: every shipped scenario, every approach, and its failures.

Real daemons, a real orchestrator, a real nfs-ganesha (where the machine
allows), real signals.  Interrupt tests isolate the run's temporary files in
their own ``TMPDIR`` so that "nothing is left behind" can be checked exactly.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

import nfs_baseline
from hpcflow.errors import ConfigError
from hpcflow.harness import netns
from hpcflow.harness.local import ABORT_GRACE_S
from hpcflow.harness.procs import OWNER_FILE
from hpcflow.harness.replay import APPROACHES, check, remove_leftovers, replay
from hpcflow.harness.report import ApproachResult
from hpcflow.harness.scenario import Scenario, list_scenarios, load_scenario
from tests.conftest import SCALE, wait_for

# Real NFS servers, network namespaces and whole replays: one xdist worker runs
# them one after another (tests/conftest.py), the rest of the suite beside them.
pytestmark = pytest.mark.xdist_group("hosts")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = list_scenarios(ROOT / "scenarios")
NFS_OK, NFS_WHY = nfs_baseline.available()
NETNS_OK, NETNS_WHY = netns.available()
needs_nfs = pytest.mark.skipif(not NFS_OK, reason=f"NFS baseline unavailable: {NFS_WHY}")
needs_netns = pytest.mark.skipif(not NETNS_OK,
                                 reason=f"network namespaces unavailable: {NETNS_WHY}")


# -- what the bytes must be ------------------------------------------------------------

def nbytes(sc: Scenario, name: str) -> int:
    shape, dtype = sc.array_info(name)
    return math.prod(shape) * dtype.itemsize


def part_bytes(sc: Scenario, name: str, node: str) -> int:
    ds = sc.datasets[name]
    return sum(p.rows for p in ds.parts if p.node == node) * nbytes(sc, name) // ds.shape[0]


def centralised_links(sc: Scenario, step_node: dict[str, str]) -> dict[str, int]:
    """The orchestrator's traffic, restated from the baseline's rules and its routing.

    Rows a node lacks are fetched from their holder once and uploaded to that
    node once; every output returns to the orchestrator, which forwards it
    where needed and finally to the initiator.
    """
    links: Counter[str] = Counter()
    fetched: set[tuple[str, int]] = set()
    on: defaultdict[str, set[str]] = defaultdict(set)

    def forward(name: str, node: str) -> None:
        if node in on[name]:
            return
        if name in sc.datasets:
            ds = sc.datasets[name]
            for k, part in enumerate(ds.parts):
                if part.node != node and part.rows:
                    size = part.rows * nbytes(sc, name) // ds.shape[0]
                    if (name, k) not in fetched:
                        fetched.add((name, k))
                        links[f"{part.node}->orch"] += size
                    links[f"orch->{node}"] += size
        else:
            links[f"orch->{node}"] += nbytes(sc, name)
        on[name].add(node)

    for step in sc.steps:
        node = step_node[step.out]
        for name in dict.fromkeys(step.inputs):
            forward(name, node)
        links[f"{node}->orch"] += nbytes(sc, step.out)
        on[step.out].add(node)
    forward(sc.result, sc.initiator)
    return {k: v for k, v in links.items() if v}


def nfs_payload(sc: Scenario) -> tuple[int, int]:
    """(read, written) array bytes: every step reads its inputs and writes its output on the
    initiator, which finally reads the result (each file also has a .npy header)."""
    read = sum(nbytes(sc, i) for s in sc.steps for i in s.inputs) + nbytes(sc, sc.result)
    return read, sum(nbytes(sc, s.out) for s in sc.steps)


def dec_use_case_one(sc: Scenario, links: dict[str, int]) -> None:
    # fft doubles the bytes, so the raw inputs travel to the initiator, exactly once
    assert links == {"n2->n1": nbytes(sc, "DS1"), "n3->n1": nbytes(sc, "DS2")}


def dec_linear_reduction(sc: Scenario, links: dict[str, int]) -> None:
    # scale runs on each holder, colmean's partials (8 sums + a count) meet on one node
    assert sum(links.values()) < 512 and all(v <= 128 for v in links.values()), links
    assert {link.split("->")[0] for link in links} <= {"n2", "n3", "n4", "n5"}


def dec_median_unequal(sc: Scenario, links: dict[str, int]) -> None:
    # the two small parts join the big one on n2; only the 4 medians go to n1
    assert links == {"n3->n2": part_bytes(sc, "T", "n3"), "n4->n2": part_bytes(sc, "T", "n4"),
                     "n2->n1": nbytes(sc, "MED")}


def dec_fan_in(sc: Scenario, links: dict[str, int]) -> None:
    # five of the six datasets must meet the sixth; they meet at the initiator (D1's home)
    assert links == {f"n{k}->n1": nbytes(sc, f"D{k}") for k in range(2, 7)}


def dec_h5md(sc: Scenario, links: dict[str, int]) -> None:
    # each holder histograms its own frames; only the two partial histograms travel
    assert set(links) == {"n2->n1", "n3->n1"} and sum(links.values()) <= 2 * 12 * 8 + 64


DECENTRALISED: dict[str, Callable[[Scenario, dict[str, int]], None]] = {
    "use-case-one": dec_use_case_one, "linear-reduction-4": dec_linear_reduction,
    "median-unequal": dec_median_unequal, "fan-in-6": dec_fan_in,
    "h5md-trajectory": dec_h5md}


def test_every_shipped_scenario_has_byte_expectations() -> None:
    assert {load_scenario(p).name for p in SCENARIOS} == set(DECENTRALISED)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_replay_on_loopback(path: Path, tmp_path: Path) -> None:
    sc, results = replay(path, workdir=tmp_path)
    by = {r.approach: r for r in results}
    assert list(by) == list(APPROACHES)
    assert check(sc, results) == []
    for r in results:
        assert r.failed is None
        if r.skipped:
            assert r.approach == "nfs" and not NFS_OK and r.skipped == NFS_WHY
            continue
        assert r.matches_reference, f"{r.approach}: max abs err {r.max_abs_err}"
        assert r.bytes_moved == sum(r.links.values())
    dec, cen, nfs = by["decentralised"], by["centralised"], by["nfs"]
    # hpcflow's own accounting equals what the daemons' transports counted.
    assert dec.extra["transport_bytes"] == dec.bytes_moved == dec.extra["bytes_planned"]
    DECENTRALISED[sc.name](sc, dec.links)
    # The orchestrator ran every step somewhere and moved exactly what its rules imply.
    assert set(cen.extra["step_node"]) == {s.out for s in sc.steps}
    assert set(cen.extra["step_node"].values()) <= set(sc.nodes)
    assert cen.links == centralised_links(sc, cen.extra["step_node"])
    assert dec.bytes_moved < cen.bytes_moved
    if not nfs.skipped:
        read, written = nfs_payload(sc)
        assert set(nfs.links) == {"nfs->n1", "n1->nfs"}
        headers = (nfs.links["nfs->n1"] - read, nfs.links["n1->nfs"] - written)
        assert min(headers) > 0, headers
        # one .npy header (64-byte aligned, a few hundred bytes at most) per file operation
        assert 64 * nfs.messages <= sum(headers) <= 256 * nfs.messages, (headers, nfs.messages)
        assert dec.bytes_moved < nfs.bytes_moved


@pytest.mark.parametrize("name", ["use-case-one", "h5md-trajectory"])
def test_replay_with_the_dht_catalog(name: str, tmp_path: Path) -> None:
    """``--catalog dht``: the same result as numpy and the same bytes moved as in the
    replicated mode (the planner sees the same catalog, read from the DHT)."""
    path = ROOT / "scenarios" / f"{name}.toml"
    sc, results = replay(path, ["decentralised"], workdir=tmp_path, catalog="dht")
    assert check(sc, results) == []
    [dec] = results
    assert dec.failed is None and dec.matches_reference, dec.max_abs_err
    assert dec.extra["transport_bytes"] == dec.bytes_moved == dec.extra["bytes_planned"]
    DECENTRALISED[sc.name](sc, dec.links)


# -- the centralised baseline's load threshold ------------------------------------------------

FANOUT = """\
name = "threshold-fanout"
description = "five independent ffts of D (held by n2 only), combined and reduced"
nodes = ["n1", "n2", "n3"]
initiator = "n1"
result = "S"
seed = 7
[datasets.D]
shape = [20000, 8]
dtype = "float64"
parts = [{ node = "n2", rows = 20000 }]
""" + "".join(f'[[steps]]\nout = "A{k}"\nop = "fft"\ninputs = ["D"]\n' for k in range(1, 6)) + """
[[steps]]
out = "B1"
op = "add"
inputs = ["A1", "A2"]
[[steps]]
out = "B2"
op = "add"
inputs = ["A3", "A4"]
[[steps]]
out = "B3"
op = "add"
inputs = ["B1", "B2"]
[[steps]]
out = "B4"
op = "add"
inputs = ["B3", "A5"]
[[steps]]
out = "S"
op = "colsum"
inputs = ["B4"]
"""


def test_threshold_binds_and_spreads_work(tmp_path: Path) -> None:
    # Five ffts start at once; n2 (the only holder) takes three (the threshold), the next
    # nearest node the other two, and both of those need D there at the same moment.
    path = tmp_path / "fanout.toml"
    path.write_text(FANOUT)
    sc, (cen,) = replay(path, ["centralised"], threshold=3, workdir=tmp_path / "w")
    assert cen.failed is None and cen.matches_reference, cen.failed
    ffts = Counter(cen.extra["step_node"][f"A{k}"] for k in range(1, 6))
    assert ffts == {"n2": 3, "n1": 2}
    # D went to n1 once: one fetch from n2, one upload, although two steps there needed it.
    assert cen.links == centralised_links(sc, cen.extra["step_node"])
    assert cen.links["orch->n1"] >= nbytes(sc, "D")


def test_threshold_must_be_at_least_one(tmp_path: Path) -> None:
    path = tmp_path / "fanout.toml"
    path.write_text(FANOUT)
    with pytest.raises(ConfigError, match="threshold must be an integer >= 1"):
        replay(path, ["centralised"], threshold=0)
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(path), "--threshold",
                        "-1"], capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1 and "--threshold must be an integer >= 1" in r.stderr
    assert "got -1" in r.stderr


# -- failures, odd results, many files ---------------------------------------------------------

FRAGILE_OP = """\
import sys
from hpcflow import op

@op("fragile", kind="rowwise")
def fragile(x):
    # breaks only inside the daemons of the centralised run (their data dirs say so)
    if any("/centralised/" in arg for arg in sys.argv):
        raise RuntimeError("fragile op refuses to run here")
    return x * 2.0
"""


def test_a_failing_approach_is_reported_and_the_others_are_kept(tmp_path: Path) -> None:
    (tmp_path / "fragile.py").write_text(FRAGILE_OP)
    text = (ROOT / "scenarios" / "use-case-one.toml").read_text()
    path = tmp_path / "fragile.toml"
    path.write_text(text.replace("ops = []", 'ops = ["fragile.py"]')
                    .replace('op = "fft"\ninputs = ["DS1"]', 'op = "fragile"\ninputs = ["DS1"]'))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(path), "--approach",
                        "all", "--json", str(out)], capture_output=True, text=True,
                       timeout=300 * SCALE)
    assert r.returncode == 1, r.stderr
    doc = json.loads(out.read_text())["approaches"]
    assert "fragile op refuses to run here" in doc["centralised"]["failed"]
    assert doc["decentralised"]["failed"] is None and doc["decentralised"]["matches_reference"]
    assert doc["decentralised"]["bytes_moved"] > 0
    assert doc["nfs"]["failed"] is None  # ran after the failure (or was skipped here)
    assert "centralised: FAILED: " in r.stdout and "PROBLEM: centralised: failed" in r.stderr


def test_a_result_that_is_an_input_dataset_is_delivered_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "input-result.toml"
    path.write_text('name = "input-result"\nnodes = ["n1", "n2"]\ninitiator = "n1"\n'
                    'result = "DS"\n[datasets.DS]\nshape = [100, 4]\ndtype = "float64"\n'
                    'parts = [{ node = "n1", rows = 60 }, { node = "n2", rows = 40 }]\n')
    sc, results = replay(path, workdir=tmp_path / "w")
    by = {r.approach: r for r in results}
    assert check(sc, results) == []
    n2_part = 40 * 4 * 8
    dec = by["decentralised"]
    assert dec.links == {"n2->n1": n2_part} and dec.extra["transport_bytes"] == n2_part
    assert by["centralised"].links == {"n2->orch": n2_part, "orch->n1": n2_part}
    if not by["nfs"].skipped:
        assert by["nfs"].links["nfs->n1"] >= 100 * 4 * 8  # the initiator reads both parts


def test_cli_directory_with_bad_files_reports_them_all_and_runs_nothing(tmp_path: Path) -> None:
    good = (ROOT / "scenarios" / "median-unequal.toml").read_text()
    (tmp_path / "a-good.toml").write_text(good)
    (tmp_path / "b-bad.toml").write_text(good.replace('initiator = "n1"', 'initiator = "n9"'))
    (tmp_path / "c-bad.toml").write_text(good.replace("default_gbit = 1.0",
                                                      "default_gbit = inf"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(tmp_path), "--json",
                        str(tmp_path / "out.json")], capture_output=True, text=True,
                       timeout=60 * SCALE)
    assert r.returncode == 1
    assert f"{tmp_path / 'b-bad.toml'}: initiator: unknown node 'n9'" in r.stderr
    assert f"{tmp_path / 'c-bad.toml'}: links.default_gbit: must be within" in r.stderr
    assert "2 of 3 scenario file(s) invalid; nothing was run" in r.stderr
    assert "starting" not in r.stderr and not (tmp_path / "out.json").exists()
    assert time.monotonic() - t0 < 30 * SCALE


def test_cli_replay_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay",
                        str(ROOT / "scenarios" / "median-unequal.toml"), "--json", str(out),
                        "--plot", str(png), "--approach", "all"], capture_output=True,
                       text=True, timeout=300 * SCALE)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "median-unequal"
    for name in ("decentralised", "centralised"):
        a = doc["approaches"][name]
        assert {"bytes_moved", "wall_s", "links", "result_checksum", "failed"} <= set(a)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "decentralised: starting" in r.stderr  # progress is shown, sizes in human units
    assert re.search(r"decentralised: 1\.83 MiB moved", r.stderr), r.stderr
    assert re.search(r"centralised: [\d.]+ (B|KiB|MiB) moved", r.stderr), r.stderr
    assert "bytes moved" in r.stdout


def test_cli_replay_bad_scenario_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nnodes = ["n1"]\ninitiator = "n9"\nresult = "A"\n')
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(bad)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "initiator" in r.stderr


def test_cli_replay_empty_directory_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(tmp_path)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1 and "no scenario files" in r.stderr


@needs_nfs
def test_nfs_alone_but_unable_to_start_is_an_error(tmp_path: Path) -> None:
    # A server of our own (alive, so not a leftover) holds the NFS port.
    with nfs_baseline.GaneshaServer():
        r = subprocess.run([sys.executable, "-m", "hpcflow", "replay",
                            str(ROOT / "scenarios" / "median-unequal.toml"), "--approach", "nfs"],
                           capture_output=True, text=True, timeout=120 * SCALE)
    assert r.returncode == 1
    assert "nfs: skipped: NFS server could not start: port 2049" in r.stdout
    assert "no approach ran" in r.stderr


# -- interrupts and leftovers --------------------------------------------------------------------

def _alive(pid: int) -> bool:
    """True if *pid* runs (a zombie no longer does)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _ours(tmp: Path) -> list[str]:
    """Processes whose command line mentions *tmp* (daemons, agents, ganesha, workers)."""
    out = subprocess.run(["pgrep", "-af", str(tmp)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _start_replay(tmp: Path, *args: str) -> subprocess.Popen[str]:
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "hpcflow", "replay", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})


def _wait_for_line(proc: subprocess.Popen[str], trigger: str) -> None:
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if trigger in line:
            return
    raise AssertionError(f"never saw {trigger!r}:\n{''.join(seen)}")


def _server_pids(tmp: Path) -> list[int]:
    """ganesha and rpcbind of the replay running with TMPDIR=tmp (from their claim)."""
    markers = glob.glob(str(tmp / "hf-ganesha-*" / OWNER_FILE))
    return [pid for m in markers for pid, _ in json.loads(Path(m).read_text())["procs"]]


# Measured 0.1-2.6 s (SCALE 1).  A daemon still serving an RPC (the agent's) only exits
# when zerorpc declares that client lost, ~15 s later; the harness SIGKILLs it after
# ABORT_GRACE_S.  The bound is that grace plus a few seconds, so ~15 s fails at any scale.
EXIT_BOUND_S = ABORT_GRACE_S * SCALE + 5

INTERRUPTS = [
    pytest.param(signal.SIGTERM, "decentralised", "decentralised: 3 daemons up",
                 id="sigterm-daemons"),
    pytest.param(signal.SIGINT, "centralised", "centralised: workflow running",
                 id="sigint-orchestrator"),
    pytest.param(signal.SIGTERM, "nfs", "nfs: server up", marks=needs_nfs, id="sigterm-nfs"),
    pytest.param(signal.SIGINT, "nfs", "nfs: data placed", marks=needs_nfs, id="sigint-nfs"),
]


@pytest.mark.parametrize("sig,approach,trigger", INTERRUPTS)
def test_interrupted_loopback_replay_leaves_nothing(tmp_path: Path, sig: int, approach: str,
                                                    trigger: str) -> None:
    tmp = tmp_path / "tmp"
    proc = _start_replay(tmp, str(ROOT / "scenarios" / "use-case-one.toml"), "--approach",
                         approach)
    _wait_for_line(proc, trigger)
    servers = _server_pids(tmp)
    assert bool(servers) == trigger.startswith("nfs")
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=30 * SCALE)
    elapsed = time.monotonic() - t0
    assert proc.stderr is not None
    assert rc == (130 if sig == signal.SIGINT else 128 + signal.SIGTERM), proc.stderr.read()
    assert elapsed < EXIT_BOUND_S, f"took {elapsed:.1f} s to exit"
    assert os.listdir(tmp) == []  # replay dir (data stores), ganesha's dir
    assert _ours(tmp) == []
    assert not [pid for pid in servers if _alive(pid)]


@needs_nfs
def test_leftovers_of_a_killed_replay_are_removed_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    proc = _start_replay(tmp, str(ROOT / "scenarios" / "use-case-one.toml"), "--approach",
                         "nfs")
    _wait_for_line(proc, "nfs: server up")
    servers = _server_pids(tmp)
    proc.kill()  # no chance to clean up
    proc.wait(timeout=10 * SCALE)
    left = sorted(os.listdir(tmp))
    assert [n.split("-")[0] for n in left] == ["hf", "hpcflow"], left
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # rpcbind drops privileges, which clears its parent-death signal: only the reaper gets it
    removed = [Path(p).name for p in remove_leftovers() if p.startswith(str(tmp))]
    assert sorted(removed) == left
    assert os.listdir(tmp) == []
    wait_for(lambda: not [pid for pid in servers if _alive(pid)], 10, "the server to be gone")
    wait_for(lambda: _ours(tmp) == [], 10, "the killed replay's children to exit")


def test_remove_leftovers_keeps_a_live_replays_files(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    proc = _start_replay(tmp, str(ROOT / "scenarios" / "median-unequal.toml"), "--approach",
                         "decentralised")
    try:
        _wait_for_line(proc, "daemons up")
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        before = os.listdir(tmp)
        assert before and remove_leftovers() == [] and os.listdir(tmp) == before
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30 * SCALE)


# -- network namespaces (root) ---------------------------------------------------------------------

@needs_netns
def test_replay_in_network_namespaces(tmp_path: Path) -> None:
    # use case one over slow (0.2 Gbit/s) links, so link time dominates CPU noise
    text = (ROOT / "scenarios" / "use-case-one.toml").read_text()
    slow = tmp_path / "slow.toml"
    slow.write_text(text.replace("default_gbit = 1.0", "default_gbit = 0.2"))
    sc, results = replay(slow, netns=True, workdir=tmp_path / "work")
    by = {r.approach: r for r in results}
    assert check(sc, results) == []
    assert all(r.matches_reference for r in results if not r.skipped)
    dec_use_case_one(sc, by["decentralised"].links)
    cen = by["centralised"]
    assert cen.links == centralised_links(sc, cen.extra["step_node"])
    # Over shaped links, moving 5x fewer bytes must show in the wall time too.
    assert by["decentralised"].wall_s < by["centralised"].wall_s
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout.split() if ns.startswith("hf")]


@needs_netns
@pytest.mark.parametrize("approach,trigger", [
    ("decentralised", "decentralised: workflow running"),
    ("centralised", "centralised: workflow running"),
    pytest.param("nfs", "nfs: data placed", marks=needs_nfs)])
def test_ctrl_c_during_netns_replay_tears_everything_down(tmp_path: Path, approach: str,
                                                          trigger: str) -> None:
    # Over 0.05 Gbit/s links the workflow takes seconds, so it is interrupted mid-way: the
    # initiator's daemon is still serving the script's execute request (dec).
    slow = tmp_path / "slow.toml"
    slow.write_text((ROOT / "scenarios" / "use-case-one.toml").read_text()
                    .replace("default_gbit = 1.0", "default_gbit = 0.05"))
    tmp = tmp_path / "tmp"
    proc = _start_replay(tmp, str(slow), "--netns", "--approach", approach)
    _wait_for_line(proc, trigger)  # the agent (or an NFS worker) is talking to the hosts
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30 * SCALE) == 130
    elapsed = time.monotonic() - t0
    assert elapsed < EXIT_BOUND_S, f"took {elapsed:.1f} s to exit"  # was ~15 s
    prefix = f"hf{proc.pid}-"
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout.split() if ns.startswith(prefix)]
    assert left == []
    assert os.listdir(tmp) == [] and _ours(tmp) == []


def test_failed_result_helpers() -> None:
    r = ApproachResult.fail("centralised", "RuntimeError: boom")
    assert not r.ran and r.failed == "RuntimeError: boom" and r.skipped is None
    sc = load_scenario(ROOT / "scenarios" / "median-unequal.toml")
    assert check(sc, [r]) == ["centralised: failed: RuntimeError: boom"]
    skipped = [ApproachResult.skip("nfs", "no server")]
    assert check(sc, skipped) == ["median-unequal: no approach ran (nfs skipped: no server)"]
