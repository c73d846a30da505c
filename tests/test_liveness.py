"""Membership and liveness under stress, with real daemons: big transfers must not
starve heartbeats, a name cannot be taken twice, a restarted seed finds its peers
again, and a transfer from a holder declared dead fails over without waiting out
its timeout."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import msgpack
import numpy as np
import pytest
import zmq
import zmq.green as zmqg

import hpcflow
from tests.conftest import (
    HEARTBEAT,
    SCALE,
    TTL,
    Cluster,
    FakePeer,
    NodeProc,
    free_port_triple,
    names_on,
    wait_for,
)

MB = 1024 * 1024


def _config(tmp_path: Path, name: str, text: str) -> list[str]:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return ["--config", str(p)]


def _alive(node: NodeProc) -> dict[str, bool]:
    with node.client() as c:
        return {n["name"]: n["alive"] for n in c.nodes()}


def _epochs(node: NodeProc) -> dict[str, int]:
    with node.client() as c:
        return {n["name"]: n["epoch"] for n in c.nodes()}


def _marked_dead(node: NodeProc) -> int:
    with node.client() as c:
        return int(c.stats()["catalog"]["marked_dead"])


def test_big_transfers_do_not_starve_heartbeats(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # n1's disk is slow (every 4 MiB write blocks 70 ms, as under dirty-page throttling)
    # and it receives 2 x 256 MiB at once: an upload (bulk server path) and a replication
    # (bulk client path).  Done on the event loop, that is ~9 s without a heartbeat.
    c = make_cluster()
    n1 = c.add("n1", extra=_config(tmp_path, "slow", "fault_write_delay_s = 0.07\n"))
    n2 = c.add("n2", via="n1")
    c.wait_members()
    data = np.frombuffer(np.random.default_rng(5).bytes(256 * MB), dtype=np.float64)
    with n2.client() as cl:
        cl.put("SRC", data)
    wait_for(lambda: "SRC" in names_on(n1), 10, "SRC on n1")

    ctx = zmqg.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"HB")
    sub.connect(n1.info["pub"])
    beats: list[float] = []

    def listen() -> None:
        while True:
            sub.recv_multipart()
            beats.append(time.monotonic())

    watcher = gevent.spawn(listen)
    try:
        with gevent.Timeout(10 * SCALE, AssertionError("no heartbeat from n1")):
            while not beats:
                gevent.sleep(0.01)
        with n1.client() as a, n1.client() as b:
            t0 = time.monotonic()
            jobs = [gevent.spawn(a.replicate, "SRC"), gevent.spawn(b.put, "UP", data)]
            gevent.joinall(jobs, raise_error=True)
            took = time.monotonic() - t0
        gevent.sleep(2 * HEARTBEAT)
    finally:
        watcher.kill()
        sub.close()
        ctx.destroy(linger=0)
    assert took > 64 * 0.07, "the injected write delay did not apply"
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert beats[-1] - beats[0] > took and len(gaps) > 10
    assert max(gaps) < TTL * SCALE, f"n1 was silent for {max(gaps):.2f} s during transfers"
    assert _marked_dead(n1) == 0 and _marked_dead(n2) == 0
    assert _alive(n2)["n1"] and _alive(n1)["n2"]


def _catalog_stats(node: NodeProc) -> dict[str, int]:
    with node.client() as c:
        return dict(c.stats()["catalog"])


def test_a_node_that_was_starved_does_not_find_its_peers_dead(cluster: Cluster) -> None:
    """A node whose own event loop ran late (here stopped for three TTLs, as a process
    starved on an overloaded host) does not take its members' heartbeats, unread in its
    own sockets, for silence: it feels the strain and stretches its timeouts
    (Lifeguard's local health awareness) instead of declaring every member dead."""
    n3 = cluster["n3"]
    assert n3.proc is not None
    before = _catalog_stats(n3)["marked_dead"]
    n3.proc.send_signal(signal.SIGSTOP)
    try:  # the others find n3 silent meanwhile: rightly, it did not answer
        wait_for(lambda: not _alive(cluster["n1"]).get("n3", True), 3 * TTL + 10,
                 "n1 to find the stopped n3 dead")
        time.sleep(3 * TTL * SCALE)  # n3 must stay stopped for a while: not a wait
    finally:
        n3.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: _catalog_stats(n3)["strain"] >= 1, 10, "n3 to feel its strain")
    wait_for(lambda: all(_alive(cluster[n]).values() for n in ("n1", "n2", "n3")), 20,
             "every member alive to every node again")
    assert _catalog_stats(n3)["marked_dead"] == before


def test_duplicate_name_joining_through_a_third_node_is_refused(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    real = _epochs(cluster["n1"])["n2"]
    dup = subprocess.Popen(
        [sys.executable, "-m", "hpcflow", "node", "--name", "n2", "--data-dir",
         str(tmp_path / "dup2"), "--listen", "127.0.0.1:0", "--peer", cluster["n1"].rpc,
         "--heartbeat", str(HEARTBEAT), "--ttl", str(TTL * SCALE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = dup.communicate(timeout=30 * SCALE)
    except subprocess.TimeoutExpired:
        dup.kill()
        _, err = dup.communicate()
        pytest.fail("the second n2 was let into the cluster:\n" + err[-2000:])
    assert dup.returncode == 2 and "already used" in err and "still running" in err, err
    # The real n2 keeps its identity everywhere, well past a TTL.
    time.sleep(TTL * SCALE + 0.5)
    for n in ("n1", "n3"):
        assert _epochs(cluster[n])["n2"] == real and _alive(cluster[n])["n2"]
    with cluster["n2"].client() as c:
        c.put("STILL", np.arange(3))
    wait_for(lambda: "STILL" in names_on(cluster["n3"]), 10, "n2's put on n3")


def test_gossiped_impostor_does_not_replace_a_live_member(cluster: Cluster) -> None:
    """A member gossips a second "n2" at another endpoint: n1 asks that endpoint, which
    does not answer as that n2 (or, if it did, the real n2, which still answers as
    itself), and ignores the claim instead of dropping n2's heartbeats."""
    n1 = cluster["n1"]
    real = _epochs(n1)["n2"]
    with FakePeer("gossip", n1) as gossip:
        fake_n2 = {**gossip.info, "name": "n2", "epoch": real + 10**9}

        def beat() -> bool:
            gossip.send([b"HB", msgpack.packb(
                {"s": "gossip", "e": 1, "q": 0, "p": {"members": [gossip.info, fake_n2]}})])
            with n1.client() as c:
                cat = c.stats()["catalog"]
                return bool(cat["refused_claims"] + cat["unverified"] >= 1)

        wait_for(beat, 10, "n1 to check and refuse the claim")
        deadline = time.monotonic() + TTL * SCALE + 0.5
        while time.monotonic() < deadline:  # keep gossiping the impostor past a TTL
            beat()
            time.sleep(HEARTBEAT)
        assert _epochs(n1)["n2"] == real and _alive(n1)["n2"]
        assert _marked_dead(n1) == 0




def _restart_and_read(node: NodeProc, sig: int, name: str, want: list[int],
                      amnesia: bool = False) -> None:
    """Stop ``node`` with ``sig``, start it again (same command; with ``amnesia``, without
    the members it remembers) and check that it sees the whole cluster alive and can
    read ``name`` from another node."""
    node.kill(sig)
    if amnesia:
        (node.data_dir / "members.json").unlink(missing_ok=True)
    node.start()
    wait_for(lambda: _alive(node) == {"n1": True, "n2": True, "n3": True}, 15,
             f"the restarted {node.name} to see the whole cluster alive")
    with node.client() as cl:
        cl.wait_for(name, 10)
        assert cl.fetch(name).tolist() == want


def test_restarted_seed_node_finds_its_peers_again(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # n1 is the seed (no --peer) on fixed ports; after a restart nobody but the others
    # can tell it about the cluster: they must say hello when its heartbeats omit them.
    c = make_cluster()
    n1 = c.add("n1", extra=["--listen", f"127.0.0.1:{free_port_triple()}"])
    c.add("n2", via="n1")
    c.add("n3", via="n2")
    c.wait_members()
    with c["n3"].client() as cl:
        cl.put("ON3", np.arange(6))
    wait_for(lambda: "ON3" in names_on(n1), 10, "ON3 on n1")
    _restart_and_read(n1, signal.SIGTERM, "ON3", list(range(6)), amnesia=True)


def test_transfer_from_a_holder_declared_dead_fails_over_early(cluster: Cluster) -> None:
    # Two holders, n2 and n3; n2 hangs (SIGSTOP: connections open, nothing answers).
    # Transfers must give up on n2 when the catalog declares it dead (TTL), not after
    # the 30 s transfer timeout, and take the copy on n3.
    data = np.arange(8 * MB, dtype=np.int64)
    with cluster["n2"].client() as c:
        c.put("TWO", data)
    wait_for(lambda: "TWO" in names_on(cluster["n3"]), 10, "TWO on n3")
    with cluster["n3"].client() as c:
        c.replicate("TWO")
    with cluster["n1"].client() as c:
        wait_for(lambda: len(c.locate("TWO")["parts"][0]["holders"]) == 2, 10, "2 holders")
    n2 = cluster["n2"].proc
    assert n2 is not None
    limit = 15.0  # half the transfer timeout; the TTL is 1 s x scale
    try:
        # A script client on n1 (asks n1's catalog while n2 is silent).
        n2.send_signal(signal.SIGSTOP)
        with hpcflow.connect(cluster["n1"].rpc, timeout_s=30) as c:
            t0 = time.monotonic()
            assert np.array_equal(c.fetch("TWO"), data)
            took = time.monotonic() - t0
            assert c.traffic.bytes_received["n3"] == data.nbytes
        assert took < limit, f"fetch took {took:.1f} s"
        n2.send_signal(signal.SIGCONT)
        wait_for(lambda: _alive(cluster["n1"])["n2"], 10, "n2 alive again")
        # The daemon itself (replicate into n1).
        n2.send_signal(signal.SIGSTOP)
        with cluster["n1"].client() as c:
            t0 = time.monotonic()
            (copy,) = c.replicate("TWO")
            took = time.monotonic() - t0
            assert copy.owner == "n1"
            assert c.stats()["traffic"]["bytes_received"]["n3"] == data.nbytes
        assert took < limit, f"replicate took {took:.1f} s"
    finally:
        n2.send_signal(signal.SIGCONT)


def test_restarted_node_rejoins_through_remembered_members(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # A seed on ephemeral ports: after a restart its endpoints are new, so nobody can
    # hear it; it must find the cluster itself, through the members it remembers.
    c = make_cluster()
    n1 = c.add("n1")
    c.add("n2", via="n1")
    c.add("n3", via="n2")
    c.wait_members()
    members = n1.data_dir / "members.json"
    wait_for(lambda: members.exists() and len(json.loads(members.read_text())) == 2, 10,
             "n1 to remember n2 and n3")
    with c["n2"].client() as cl:
        cl.put("ON2", np.arange(4))
    _restart_and_read(n1, signal.SIGKILL, "ON2", [0, 1, 2, 3])
    for peer in ("n2", "n3"):
        wait_for(lambda peer=peer: _alive(c[peer])["n1"], 10, f"{peer} to see n1 again")
