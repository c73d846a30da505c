"""Node identity and time, with real daemons (issue 11, item 6).

* A node restarted with its clock behind its previous start must still be heard:
  epochs are monotonic per data dir.  The clock really is moved, for the daemon
  process only, by libfaketime (``LD_PRELOAD``; the PyPI package ``libfaketime``
  ships the library).
* Two daemons with one ``--name``, each accepted by a different member before
  either member heard of the other (two clusters that merge, as after a
  partition, or two starts at the same instant), are detected once the members
  meet: the later one exits with status 2 and a clear error, whichever side it
  joined, and every member ends up with the earlier one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from hpcflow.daemon.epoch import EPOCH_FILE, next_epoch
from hpcflow.errors import ConfigError
from tests.conftest import SCALE, TTL, Cluster, NodeProc, names_on, wait_for

MakeCluster = Callable[[], Cluster]


def _faketime_env(offset: str) -> list[str]:
    """``env`` arguments that run a command with its wall clock moved by ``offset``."""
    libfaketime = pytest.importorskip("libfaketime", reason="pip install libfaketime")
    ok, env = libfaketime.get_reload_information()
    if not ok:
        pytest.skip("libfaketime cannot be preloaded here")
    return ["env", *(f"{k}={v}" for k, v in env.items()), f"FAKETIME={offset}"]


def _view(node: NodeProc) -> dict[str, tuple[int, str, bool]]:
    """name -> (epoch, rpc, alive) as ``node`` sees its members."""
    with node.client() as c:
        return {n["name"]: (n["epoch"], n["rpc"], n["alive"]) for n in c.nodes()}


def test_restart_with_the_clock_behind_is_still_heard(make_cluster: MakeCluster) -> None:
    c = make_cluster()
    n1 = c.add("n1")
    n2 = NodeProc("n2", c.root / "n2", [n1.rpc], [])
    n2.prefix = _faketime_env("+1h")  # its first run's clock is an hour ahead
    c.nodes["n2"] = n2
    n2.start()
    c.wait_members()
    first = _view(n1)["n2"][0]
    assert first > time.time_ns() + 50 * 60 * 10**9, "the clock was not moved"
    n2.kill(signal.SIGKILL)
    n2.prefix = []  # restarted with the right time: behind its previous start
    n2.start()
    with n2.client() as cl:
        again = cl.ping()["epoch"]
        cl.put("AFTER", np.arange(5.0))
    assert again > first
    wait_for(lambda: _view(n1)["n2"][0] == again and _view(n1)["n2"][2], 10,
             "n1 to accept n2's new run")
    wait_for(lambda: "AFTER" in names_on(n1), 10, "n2's put on n1")
    assert int((n2.data_dir / EPOCH_FILE).read_text()) == again


def test_epochs_are_monotonic_per_data_dir(tmp_path: Path) -> None:
    a = next_epoch(tmp_path)
    assert a >= time.time_ns() - 10**9 and int((tmp_path / EPOCH_FILE).read_text()) == a
    ahead = time.time_ns() + 3600 * 10**9
    (tmp_path / EPOCH_FILE).write_text(str(ahead))
    assert next_epoch(tmp_path) == ahead + 1
    assert next_epoch(tmp_path) == ahead + 2
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / EPOCH_FILE).write_text("garbage")
    with pytest.raises(ConfigError, match="epoch"):
        next_epoch(tmp_path)


def test_unreadable_epoch_file_stops_the_daemon_with_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "n"
    d.mkdir()
    (d / EPOCH_FILE).write_text("-5")
    r = subprocess.run([sys.executable, "-m", "hpcflow", "node", "--name", "n", "--data-dir",
                        str(d), "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                       timeout=60 * SCALE)
    assert r.returncode != 0 and EPOCH_FILE in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("first_side", ["a", "b"])
def test_twins_accepted_by_two_members_meet_and_the_later_leaves(
        make_cluster: MakeCluster, first_side: str) -> None:
    """Members ``a`` and ``b`` do not know each other yet; each lets in a node named
    ``twin``; then ``bridge`` joins through both.  The twin started later (on
    ``first_side``'s other side) must exit with status 2; the earlier one stays."""
    c = make_cluster()
    a, b = c.add("a"), c.add("b")
    sides = [first_side, "b" if first_side == "a" else "a"]
    twins: dict[str, NodeProc] = {}
    for side in sides:  # the second twin starts once the first runs: a later epoch
        t = NodeProc("twin", c.root / f"twin-{side}", [c[side].rpc], [])
        c.nodes[f"twin-{side}"] = t
        t.start()
        wait_for(lambda side=side: _view(c[side]).get("twin", (0, "", False))[2], 10,
                 f"twin accepted by {side}")
        twins[side] = t
    early, late = twins[sides[0]], twins[sides[1]]
    with early.client() as cl:
        cl.put("EARLY", np.arange(3.0))
    bridge = NodeProc("bridge", c.root / "bridge", [a.rpc, b.rpc], [])
    c.nodes["bridge"] = bridge
    bridge.start()

    assert late.proc is not None
    try:
        late.proc.wait(timeout=20 * SCALE)
    except subprocess.TimeoutExpired:
        pytest.fail("the later twin is still running:\n" + late.log_tail())
    log = late.log_tail(200)
    assert late.proc.returncode == 2, log
    assert "already used" in log and early.info["rpc"] in log, log
    assert early.alive()
    want = (early.info["epoch"], early.info["rpc"], True)
    for n in (a, b, bridge):
        wait_for(lambda n=n: _view(n).get("twin") == want, 10 + TTL,
                 f"{n.name} to know the earlier twin")
        wait_for(lambda n=n: "EARLY" in names_on(n), 10, f"the twin's data on {n.name}")
    time.sleep(TTL * SCALE + 0.5)  # and it stays so past a TTL
    for n in (a, b, bridge):
        assert _view(n)["twin"] == want


def test_twins_started_at_once_through_two_members(cluster: Cluster, tmp_path: Path) -> None:
    """Two ``twin`` daemons started at the same instant, one through n1, one through n3:
    however the race falls, exactly one keeps running and every member agrees on it."""
    logs = [tmp_path / "twin0.log", tmp_path / "twin1.log"]
    procs = []
    for i, via in enumerate(("n1", "n3")):
        with open(logs[i], "w") as log:  # the child keeps its own copy of the fd
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "hpcflow", "node", "--name", "twin", "--data-dir",
                 str(tmp_path / f"twin{i}"), "--listen", "127.0.0.1:0", "--peer",
                 cluster[via].rpc, "--heartbeat", "0.2", "--ttl", str(TTL * SCALE)],
                stdout=subprocess.DEVNULL, stderr=log))
    try:
        def one_left() -> int | None:
            codes = [p.poll() for p in procs]
            return codes.index(None) if codes.count(None) == 1 else None

        wait_for(lambda: one_left() is not None, 30, "one twin to exit")
        left = one_left()
        assert left is not None
        i = left
        err = logs[1 - i].read_text()
        assert procs[1 - i].returncode == 2 and "already used" in err, err[-2000:]
        info = json.loads((tmp_path / f"twin{i}" / "node.json").read_text())
        for n in ("n1", "n2", "n3"):
            wait_for(lambda n=n: _view(cluster[n]).get("twin") == (info["epoch"], info["rpc"],
                                                                    True),
                     10 + TTL, f"{n} to know the surviving twin")
        assert procs[i].poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30 * SCALE)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
