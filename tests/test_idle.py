"""What an idle daemon carries (issue 12, many daemons on one machine).

256 daemons on one host must each stay small: these tests pin, on real daemons, what
was cut without relying on timing: modules a daemon does not import unless its options
need them (asked from the daemon itself: ``PYTHONPROFILEIMPORTTIME`` makes CPython log
every import to stderr, which is the node's log), its threads, and RPC clients that do
not keep a heartbeat timer running while no call is in flight.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import gevent
import numpy as np
import pytest
import zmq

from hpcflow.errors import DatasetNotFound
from hpcflow.rpc import auth, strict
from hpcflow.rpc.calls import PeerClients

from .conftest import HEARTBEAT, SCALE, Cluster, NodeProc, three_nodes, wait_for

#: Never needed by a node started without ``--metrics`` / ``--catalog dht``, or never
#: at all (the client's optional integrations and the replay harness).
NOT_IMPORTED = ("asyncio", "kademlia", "rpcudp", "prometheus_client", "dask", "xarray",
                "MDAnalysis", "hpcflow.client.xarray_backend", "hpcflow.harness.local",
                "hpcflow.catalog.dht")


def imported(log: Path) -> set[str]:
    """Every module the process logged importing (``-X importtime`` format)."""
    out = set()
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line)
        if m:
            out.add(m.group(1))
    return out


def threads(node: NodeProc) -> list[str]:
    assert node.proc is not None
    task = Path(f"/proc/{node.proc.pid}/task")
    return [(t / "comm").read_text().strip() for t in task.iterdir()]


def numpy_threads() -> int:
    """Threads a bare Python that imported numpy has (OpenBLAS starts its own)."""
    out = subprocess.run([sys.executable, "-c", "import os, numpy; "
                          "print(len(os.listdir('/proc/self/task')))"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.fixture
def cluster3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by the daemons
    with three_nodes(tmp_path, n3_via="n1") as c:
        yield c


def test_an_idle_daemon_imports_only_what_it_runs(cluster3: Cluster) -> None:
    """A formed cluster that stored, announced, probed and served a fetch between nodes:
    no daemon imported asyncio (pyzmq's monitor helper pulled it in: ~6 MB a process),
    prometheus_client (only ``--metrics``), the DHT mode's modules, dask, xarray or
    MDAnalysis."""
    n1, n3 = cluster3["n1"], cluster3["n3"]
    with n1.client() as c:
        c.put("D", np.arange(4000.0).reshape(1000, 4))
    with n3.client() as c:
        c.wait_for("D", 10 * SCALE)
        assert np.array_equal(c.fetch("D"), np.arange(4000.0).reshape(1000, 4))
    for name in ("n1", "n2", "n3"):  # every node has pinged (verified) its members
        with cluster3[name].client() as c:
            wait_for(lambda c=c: c.stats()["catalog"]["members_alive"] == 3, 10, "members")
    for name in ("n1", "n2", "n3"):
        mods = imported(cluster3[name].log_path)
        assert "hpcflow.daemon.node" in mods, "the import log is not the daemon's"
        bad = sorted(m for m in mods if m.split(".")[0] in NOT_IMPORTED or any(
            m == x or m.startswith(x + ".") for x in NOT_IMPORTED))
        assert not bad, f"{name} imported {bad}"


def test_an_idle_daemon_runs_few_threads(cluster3: Cluster) -> None:
    """Main thread, one ZeroMQ context's I/O thread and reaper (the node's RPC clients
    share the node's context: pyzmq's shared instance was two more), and whatever
    numpy's BLAS starts; no resolver thread for liveness probes of numeric addresses."""
    for name in ("n1", "n2", "n3"):
        with cluster3[name].client() as c:
            # each member verified by a ping; and what monitoring polls instead of a
            # catalog listing (in DHT mode a lookup per member)
            wait_for(lambda c=c: c.stats()["catalog"]["members_alive"] == 3, 10, "members")
            assert c.stats()["catalog"]["members"] == 3
    allowed = numpy_threads() + 2
    for name in ("n1", "n2", "n3"):
        names = threads(cluster3[name])
        assert names.count("ZMQbg/IO/0") == 1, names
        assert len(names) <= allowed, f"{name}: {names}, at most {allowed} expected"


def wakeups(pid: int) -> int:
    """Times the process' main thread has blocked (each time the event loop slept)."""
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text()
    return int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def test_a_lone_idle_daemon_wakes_about_once_a_heartbeat_period(tmp_path: Path) -> None:
    """Each wake-up of a Python daemon costs ~0.1 ms of a core, and 256 of them share
    two cores: the timers of an idle node (heartbeat, membership monitor, prober,
    members file, op check, janitor, upload reaper) fire about once a period in all,
    nothing polls faster than the heartbeat, nothing wakes for work it does not have
    (the monitor ticked four times a period and the reaper every second: 6.6 wake-ups
    a period).  The window is a measurement, not synchronisation."""
    c = Cluster(tmp_path)
    try:
        node = c.add("n1")
        assert node.proc is not None
        with node.client() as cl:
            wait_for(lambda: cl.stats()["catalog"]["heartbeat_interval_ms"] > 0, 10,
                     "the first heartbeat")
        period = HEARTBEAT
        gevent.sleep(2 * period)
        before = wakeups(node.proc.pid)
        window = 25 * period
        gevent.sleep(window)
        per_period = (wakeups(node.proc.pid) - before) / (window / period)
        assert per_period < 3, f"{per_period:.1f} wake-ups per heartbeat period"
    finally:
        c.stop()


def test_an_rpc_client_ticks_only_while_a_call_is_in_flight(tmp_path: Path) -> None:
    """A node keeps one RPC client per member it called; the heartbeat ticker of each
    used to wake every 5 s for good (at 256 members, 51 wake-ups a second)."""
    node = NodeProc("n1", tmp_path / "n1", [], []).start()
    try:
        client = strict.Client(timeout=10 * SCALE, heartbeat=1.0)
        client.connect(node.rpc)
        try:
            assert client._tick is None
            assert client.call("ping")["self"]["name"] == "n1"
            tick = client._tick
            assert tick is not None
            tick.join(timeout=5 * SCALE)  # ends once nothing is pending
            assert tick.dead
            # the next call starts it again (a long call must be heartbeated: the
            # server ends one whose client went silent)
            waiter = gevent.spawn(client.call, "wait", "nothing-here", 0.5)
            gevent.sleep(0)  # let the call be sent
            assert client._tick is not None and not client._tick.dead
            with pytest.raises(DatasetNotFound):
                waiter.get(timeout=10 * SCALE)
            client._tick.join(timeout=5 * SCALE)
            assert client._tick.dead
        finally:
            client.close()
    finally:
        node.kill()


@pytest.mark.parametrize("keyed", [False, True])
def test_a_node_context_holds_sockets_for_a_thousand_members(keyed: bool, keys: Path) -> None:
    """About four ZeroMQ sockets per member (SUB, RPC DEALER, its monitor's two PAIRs):
    libzmq's default of 1023 per context failed ``zmq_socket`` with EMFILE ("Too many
    open files") at about 250 members."""
    ctx = auth.context(auth.load(keys, auth.NODE) if keyed else None)
    socks = []
    try:
        for _ in range(4 * 1024 + 16):
            socks.append(ctx.socket(zmq.PAIR))
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()


def test_import_log_helper_reads_cpython_format(tmp_path: Path) -> None:
    """The probe above reads what CPython writes (so a format change fails loudly)."""
    log = tmp_path / "log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-X", "importtime", "-c", "import json"],
                       stderr=f, check=True, env={**os.environ})
    assert "json" in imported(log)


def test_peer_clients_keep_few_connections_and_know_when_one_drops(tmp_path: Path) -> None:
    """A node keeps at most ``max_idle`` RPC clients between calls (one per member ever
    pinged cost ~0.4 MB per member in a large cluster), least recently used closed
    first; a kept client knows when its peer's connection dropped (a probe through a
    connection that is up skips the raw TCP connect that checks for a listener)."""
    with three_nodes(tmp_path, n3_via="n1") as c:
        peers = PeerClients(10 * SCALE, max_idle=2)
        try:
            eps = {n: c[n].rpc for n in ("n1", "n2", "n3")}
            for name in ("n1", "n2", "n3"):
                assert peers.call(eps[name], "ping")["self"]["name"] == name
            assert list(peers._clients) == [eps["n2"], eps["n3"]]  # n1's went first
            wait_for(lambda: peers.connected(eps["n3"]), 10, "n3's connection up")
            assert not peers.connected(eps["n1"])
            c["n3"].kill(signal.SIGKILL)
            wait_for(lambda: not peers.connected(eps["n3"]), 10, "n3's connection to drop")
            assert peers.connected(eps["n2"])
        finally:
            peers.close()


def test_peer_clients_close_clients_left_unused(tmp_path: Path) -> None:
    """A client unused for ``idle_s`` is closed at the next call (each kept client has
    two sockets whose guard polls wake an idle node), the one in use is kept."""
    with three_nodes(tmp_path, n3_via="n1") as c:
        peers = PeerClients(10 * SCALE, idle_s=0.5)
        try:
            eps = {n: c[n].rpc for n in ("n1", "n2", "n3")}
            peers.call(eps["n1"], "ping")
            first = peers._clients[eps["n1"]]
            peers.call(eps["n2"], "ping")
            assert list(peers._clients) == [eps["n1"], eps["n2"]]  # both kept, fresh
            peers._used[eps["n1"]] -= 1.0  # as if unused for a second
            peers.call(eps["n3"], "ping")
            assert list(peers._clients) == [eps["n2"], eps["n3"]]
            assert first._closed
            assert peers.call(eps["n1"], "ping")["self"]["name"] == "n1"  # made anew
        finally:
            peers.close()
