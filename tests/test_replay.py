"""The replay harness end to end: every shipped scenario, every approach."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import nfs_baseline
from hpcflow.harness import netns
from hpcflow.harness.replay import APPROACHES, check, replay
from hpcflow.harness.scenario import list_scenarios
from tests.conftest import SCALE, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = list_scenarios(ROOT / "scenarios")
NFS_OK, NFS_WHY = nfs_baseline.available()


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_replay_on_loopback(path: Path, tmp_path: Path) -> None:
    sc, results = replay(path, workdir=tmp_path)
    by = {r.approach: r for r in results}
    assert list(by) == list(APPROACHES)
    assert check(sc, results) == []
    for r in results:
        if r.skipped:
            assert r.approach == "nfs" and not NFS_OK and r.skipped == NFS_WHY
            continue
        assert r.matches_reference, f"{r.approach}: max abs err {r.max_abs_err}"
        assert r.bytes_moved == sum(r.links.values())
    dec = by["decentralised"]
    # hpcflow's own accounting equals what the daemons' transports counted.
    assert dec.extra["transport_bytes"] == dec.bytes_moved == dec.extra["bytes_planned"]
    # What every shipped scenario is built to show: moving the operation to the data
    # moves strictly fewer bytes than routing through an orchestrator or via NFS.
    assert dec.bytes_moved < by["centralised"].bytes_moved
    if not by["nfs"].skipped:
        assert dec.bytes_moved < by["nfs"].bytes_moved
    # The centralised baseline routes everything through the orchestrator.
    assert all("orch" in link for link in by["centralised"].links)


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
        assert {"bytes_moved", "wall_s", "links", "result_checksum"} <= set(a)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "decentralised: starting" in r.stderr  # progress is shown
    assert "bytes moved" in r.stdout


def test_cli_replay_bad_scenario_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nnodes = ["n1"]\ninitiator = "n9"\nresult = "A"\n')
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(bad)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1
    assert str(bad) in r.stderr and "initiator" in r.stderr


NETNS_OK, NETNS_WHY = netns.available()


@pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")
def test_replay_in_network_namespaces(tmp_path: Path) -> None:
    # use case one over slow (0.2 Gbit/s) links, so link time dominates CPU noise
    text = (ROOT / "scenarios" / "use-case-one.toml").read_text()
    slow = tmp_path / "slow.toml"
    slow.write_text(text.replace("default_gbit = 1.0", "default_gbit = 0.2"))
    sc, results = replay(slow, netns=True, workdir=tmp_path / "work")
    by = {r.approach: r for r in results}
    assert check(sc, results) == []
    assert all(r.matches_reference for r in results if not r.skipped)
    assert by["decentralised"].bytes_moved < by["centralised"].bytes_moved
    # Over shaped links, moving 5x fewer bytes must show in the wall time too.
    assert by["decentralised"].wall_s < by["centralised"].wall_s
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout.split() if ns.startswith("hf")]


def test_cli_replay_empty_directory_is_an_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "hpcflow", "replay", str(tmp_path)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1 and "no scenario files" in r.stderr


@pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")
def test_ctrl_c_during_netns_replay_tears_everything_down(tmp_path: Path) -> None:
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "hpcflow", "replay",
                             str(ROOT / "scenarios" / "use-case-one.toml"), "--netns"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait for the daemons to be up inside their namespaces
        seen.append(line)
        if "daemons up" in line:
            break
    assert any("daemons up" in line for line in seen), "".join(seen)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60 * SCALE)
    prefix = f"hf{proc.pid}-"
    left = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                         text=True).stdout.split() if ns.startswith(prefix)]
    assert left == []

    def no_daemons() -> bool:
        return not subprocess.run(["pgrep", "-f", "hpcflow-replay-use-case-one"],
                                  capture_output=True, text=True).stdout.split()

    wait_for(no_daemons, 30, "the replay's daemons to exit")
