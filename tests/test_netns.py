"""Emulated cluster in network namespaces: reachability, shaping, teardown.

Real namespaces, veths, tbf qdiscs and TCP between processes; skipped with
the reason from ``netns.available()`` where that is impossible (not root,
no iproute2, restricted container).  Waits are bounded by
``HPCFLOW_TIMEOUT_SCALE`` x a base and never used for synchronisation.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcflow.harness.netns import MAX_GBIT, MIN_GBIT, Topology, available, remove_stale
from hpcflow.harness.procs import claim, reap_stale

# Real NFS servers, network namespaces and whole replays: one xdist worker runs
# them one after another (tests/conftest.py), the rest of the suite beside them.
pytestmark = pytest.mark.xdist_group("hosts")

SCALE = float(os.environ.get("HPCFLOW_TIMEOUT_SCALE", "1"))
REPO = str(Path(__file__).resolve().parents[1])
PORT = 5000  # free in every fresh namespace
OK, REASON = available()
needs_netns = pytest.mark.skipif(not OK, reason=f"network namespaces unavailable: {REASON}")

# Accepts connections one at a time, swallows everything until EOF, then
# answers "<bytes received> <peer address>" -- a TCP ping and a sink in one.
SINK = f"""
import socket, sys
srv = socket.create_server(("0.0.0.0", {PORT}))
print("ready", flush=True)
while True:
    conn, (peer, _) = srv.accept()
    with conn:
        n = 0
        while chunk := conn.recv(1 << 20):
            n += len(chunk)
        conn.sendall(f"{{n}} {{peer}}".encode())
"""


def namespaces() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Next stdout line of *proc*, failing after *timeout* x SCALE seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout * SCALE):
            raise AssertionError(f"no output from {proc.args!r} within {timeout * SCALE:g} s")
    return proc.stdout.readline().strip()


def start_sink(topo: Topology, host: str) -> subprocess.Popen[str]:
    proc = topo.popen(host, [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    assert read_line(proc, 10) == "ready"
    return proc


def send(topo: Topology, src: str, dst: str, payload: bytes) -> tuple[float, str]:
    """Send *payload* from *src* to the sink on *dst*; (seconds, sink's reply)."""
    with topo.socket(src) as sock:
        sock.settimeout(30 * SCALE)
        start = time.monotonic()
        sock.connect((topo.address(dst), PORT))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)  # tells the sink we are done
        reply = b""
        while chunk := sock.recv(256):
            reply += chunk
        return time.monotonic() - start, reply.decode()


def spawn_builder(hosts: list[str]) -> subprocess.Popen[str]:
    """A separate Python process that builds a topology and then blocks on stdin."""
    code = ("import sys; from hpcflow.harness.netns import Topology\n"
            f"t = Topology({hosts!r}, 1.0).build()\n"
            "print(' '.join(t.netns(h) for h in t.hosts), flush=True)\n"
            "sys.stdin.read()\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO})


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(["n1", "n2", "n3"], bandwidth_gbit=1.0, links={("n1", "n3"): 0.05}) as t:
        yield t


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        Topology(["a", "a"])
    with pytest.raises(ValueError, match="bad host name"):
        Topology(["a", "b/c"])
    with pytest.raises(ValueError, match="unknown pair"):
        Topology(["a", "b"], links={("a", "z"): 1.0})
    with pytest.raises(ValueError, match="positive"):
        Topology(["a", "b"], 0.0)
    for bad in (float("inf"), float("nan"), MIN_GBIT / 2, MAX_GBIT * 2):
        with pytest.raises(ValueError, match=r"within 1e-05\.\.100 Gbit/s"):
            Topology(["a", "b"], bad)
    with pytest.raises(ValueError, match="within"):
        Topology(["a", "b", "c"], 1.0, links={("a", "c"): float("inf")})
    with pytest.raises(ValueError, match="mtu"):
        Topology(["a", "b"], mtu=70000)


def test_addressing_plan_is_unique_and_short() -> None:
    hosts = [f"node-{i:02d}" for i in range(12)]
    t = Topology(hosts, 1.0, links={("node-00", "node-11"): None}, mtu=9000)
    assert len({t.address(h) for h in hosts}) == 12
    link_addrs = [t.link_address(a, b) for a in hosts for b in hosts if a != b]
    assert len(set(link_addrs)) == 12 * 11
    assert all(len(t.interface(a, b)) <= 15 for a in hosts for b in hosts if a != b)
    assert t.bandwidth("node-11", "node-00") is None and t.bandwidth("node-01", "node-02") == 1.0
    assert t.netns("node-03").startswith(f"hf{os.getpid()}-")


@needs_netns
def test_range_ends_are_shaped_as_asked() -> None:
    # tc silently shrinks a burst that does not fit its time budget: check what it built
    with Topology(["a", "b", "c"], MIN_GBIT, links={("a", "c"): MAX_GBIT}) as t:
        slow = subprocess.run(["tc", "-n", t.netns("a"), "qdisc", "show", "dev",
                               t.interface("a", "b")], capture_output=True, text=True).stdout
        fast = subprocess.run(["tc", "-n", t.netns("a"), "qdisc", "show", "dev",
                               t.interface("a", "c")], capture_output=True, text=True).stdout
    # (below the range, e.g. 1 Kbit/s: "burst 31176b lat 275s")
    assert re.search(r"rate 10Kbit burst 64Kb lat (49\.\d|50)ms", slow), slow
    assert re.search(r"rate 100Gbit burst \d+b lat 50ms", fast), fast


def test_reap_stale_removes_what_a_killed_owner_claimed(tmp_path: Path) -> None:
    # An owner claims a directory and a child of its own session (as ganesha is), then dies
    # by SIGKILL; a live owner's claim is left alone.
    code = ("import os, subprocess, sys\n"
            "from hpcflow.harness.procs import claim\n"
            "child = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            "claim(sys.argv[1], [child.pid])\n"
            "print(child.pid, flush=True)\n"
            "sys.stdin.read()\n")
    dead, live = tmp_path / "hfx-dead", tmp_path / "hfx-live"
    dead.mkdir()
    live.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", code, str(dead)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                    "PYTHONPATH": REPO})
    child = int(read_line(owner, 20))
    claim(live)  # ours: alive
    (tmp_path / "hfx-unclaimed").mkdir()
    assert reap_stale(str(tmp_path / "hfx-*")) == []  # the owner still runs
    owner.kill()
    owner.wait(timeout=10 * SCALE)
    assert reap_stale(str(tmp_path / "hfx-*")) == [str(dead)]
    assert not dead.exists() and live.exists() and (tmp_path / "hfx-unclaimed").exists()
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1][0] == "Z"  # killed


@needs_netns
def test_every_host_reaches_every_other(topo: Topology) -> None:
    sinks = {h: start_sink(topo, h) for h in topo.hosts}
    for src in topo.hosts:
        for dst in topo.hosts:
            if src != dst:
                _, reply = send(topo, src, dst, b"ping")
                # the sink sees the sender's host address: routes use it as source
                assert reply == f"4 {topo.address(src)}", (src, dst)
    assert all(p.poll() is None for p in sinks.values())


@needs_netns
def test_shaped_link_is_measurably_slower(topo: Topology) -> None:
    start_sink(topo, "n2")
    start_sink(topo, "n3")
    payload = os.urandom(4 << 20)
    fast, reply_fast = send(topo, "n1", "n2", payload)  # 1 Gbit/s
    slow, reply_slow = send(topo, "n1", "n3", payload)  # 0.05 Gbit/s
    assert reply_fast.split()[0] == reply_slow.split()[0] == str(len(payload))
    rate = 0.05e9 / 8
    bound = (len(payload) - 256 * 1024) / rate  # minus generous burst allowance
    # Load can only slow a transfer down, so the lower bound is robust;
    # the upper bound (loose, scaled) checks the rate is roughly right.
    assert slow >= 0.9 * bound, f"shaped transfer took {slow:.3f} s < {bound:.3f} s"
    assert slow <= 4 * bound * SCALE, f"shaped transfer took {slow:.3f} s, rate far too low"
    assert slow >= 2 * fast, f"0.05 Gbit/s link {slow:.3f} s vs 1 Gbit/s link {fast:.3f} s"


@needs_netns
def test_twelve_host_full_mesh() -> None:
    hosts = [f"h{i}" for i in range(12)]
    with Topology(hosts, 1.0, mtu=9000) as t:
        assert {t.netns(h) for h in hosts} <= namespaces()
        link = subprocess.run(["ip", "-n", t.netns("h3"), "link", "show", t.interface("h3", "h7")],
                              capture_output=True, text=True, check=True).stdout
        assert "mtu 9000" in link and "state UP" in link
        start_sink(t, "h11")
        assert send(t, "h0", "h11", b"x" * 1000)[1] == f"1000 {t.address('h0')}"
    assert not {t.netns(h) for h in hosts} & namespaces()


@needs_netns
def test_teardown_kills_processes_and_removes_namespaces() -> None:
    t = Topology(["a", "b"], 1.0).build()
    names = {t.netns(h) for h in t.hosts}
    ours = t.popen("a", ["cat"], stdin=subprocess.PIPE)
    # started behind the topology's back, still inside one of its namespaces
    foreign = subprocess.Popen(["nsenter", f"--net=/run/netns/{t.netns('b')}", "cat"],
                               stdin=subprocess.PIPE)
    t.teardown()
    assert ours.poll() is not None
    assert foreign.wait(timeout=10 * SCALE) == -signal.SIGKILL
    assert not names & namespaces()
    t.teardown()  # idempotent


@needs_netns
def test_teardown_on_exception() -> None:
    names: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), Topology(["a", "b"]) as t:
        names = {t.netns(h) for h in t.hosts}
        assert names <= namespaces()
        raise RuntimeError("boom")
    assert names and not names & namespaces()


@needs_netns
def test_sigterm_tears_down() -> None:
    proc = spawn_builder(["a", "b", "c"])
    names = set(read_line(proc, 20).split())
    assert len(names) == 3 and names <= namespaces()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20 * SCALE) == 128 + signal.SIGTERM
    assert not names & namespaces()


@needs_netns
def test_remove_stale_after_sigkill() -> None:
    proc = spawn_builder(["a", "b"])
    names = set(read_line(proc, 20).split())
    proc.kill()  # no chance to clean up
    proc.wait(timeout=10 * SCALE)
    assert names <= namespaces()
    assert names <= set(remove_stale())
    assert not names & namespaces()
