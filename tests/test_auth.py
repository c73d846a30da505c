"""CURVE keys and roles (issue 11, item 2): real keyed daemons, real hostile sockets.

A keyed cluster must run workflows as an unkeyed one does; a process without
the cluster's keys (none, another cluster's, a stranger's client key) must get
``AuthenticationError`` at once; a client key must be refused node-to-node
calls and slice uploads; a rogue "peer" must neither join nor feed anyone's
catalog; and a node without keys must behave exactly as before.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import msgpack
import numpy as np
import pytest
import zerorpc
import zmq
import zmq.auth
import zmq.green as zmqg

import hpcflow
from hpcflow.cli import main
from hpcflow.config import NodeConfig
from hpcflow.daemon.lifecycle import FlowTag
from hpcflow.daemon.service import NODE_ONLY
from hpcflow.errors import AuthenticationError, ConfigError, PermissionDenied
from hpcflow.harness.centralised import Orchestrator
from hpcflow.rpc import auth, strict
from tests.conftest import SCALE, Cluster, FakePeer, NodeProc, names_on, wait_for

FAST_S = 2.0 * SCALE  # "quickly": well under any RPC timeout (15 s here)


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """"No keys" must mean none here, whatever the shell running the tests exports."""
    monkeypatch.delenv(auth.KEYS_ENV, raising=False)


def keyed_client(node: NodeProc, keys: Path, **kw: Any) -> hpcflow.Client:
    return node.client(keys=str(keys), **kw)


# -- keys on disk -------------------------------------------------------------------------

def test_keygen_writes_private_keys_and_never_overwrites(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    d = tmp_path / "k"
    assert main(["keygen", str(d)]) == 0
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for role in ("node", "client"):
        assert stat.S_IMODE((d / f"{role}.key_secret").stat().st_mode) == 0o600
        pub, secret = zmq.auth.load_certificate(d / f"{role}.key_secret")
        assert zmq.auth.load_certificate(d / f"{role}.key") == (pub, None) and secret
    node, client = auth.Keys.load(d, auth.NODE), auth.Keys.load(d, auth.CLIENT)
    assert node.server == client.server == node.public and node.client == client.public
    before = (d / "node.key_secret").read_bytes()
    capsys.readouterr()
    assert main(["keygen", str(d)]) == 1
    assert "already holds keys" in capsys.readouterr().err
    assert (d / "node.key_secret").read_bytes() == before


def test_bad_key_files_are_config_errors_naming_the_path(tmp_path: Path) -> None:
    d = tmp_path / "k"
    auth.keygen(d)
    secret = d / "node.key_secret"
    with pytest.raises(ConfigError, match="does not exist"):
        auth.Keys.load(tmp_path / "nope", auth.NODE)
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=f"{secret}.*accessible to other users"):
        auth.Keys.load(d, auth.NODE)
    auth.Keys.load(d, auth.CLIENT)  # a client does not read the node's secret
    os.chmod(secret, 0o600)
    (d / "client.key").write_text('curve\n    public-key = "not-a-key"\n')
    with pytest.raises(ConfigError, match=f"{d / 'client.key'}.*not a CURVE key"):
        auth.Keys.load(d, auth.NODE)
    (d / "client.key").unlink()
    with pytest.raises(ConfigError, match=f"{d / 'client.key'} is missing"):
        auth.Keys.load(d, auth.NODE)
    os.chmod(d / "client.key_secret", 0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(ConfigError, match=f"{d / 'client.key_secret'} cannot be read"):
            auth.Keys.load(d, auth.CLIENT)
    # the daemon refuses to start, naming the file, before binding anything
    r = subprocess.run([sys.executable, "-m", "hpcflow", "node", "--data-dir",
                        str(tmp_path / "data"), "--listen", "127.0.0.1:0", "--keys", str(d)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1 and str(d / "client.key") in r.stderr, r.stderr


def test_keys_from_config_file_and_environment(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "k"
    auth.keygen(d)
    toml = tmp_path / "node.toml"
    toml.write_text(f'data_dir = "{tmp_path / "data"}"\nkeys = "{d}"\n')
    assert NodeConfig.load(toml, {}).keys == str(d)
    toml.write_text(f'data_dir = "{tmp_path / "data"}"\nkeys = 3\n')
    with pytest.raises(ConfigError, match="keys"):
        NodeConfig.load(toml, {})
    monkeypatch.delenv(auth.KEYS_ENV, raising=False)
    assert auth.load(None, auth.CLIENT) is None
    monkeypatch.setenv(auth.KEYS_ENV, str(d))
    loaded = auth.load(None, auth.CLIENT)
    assert loaded is not None and loaded.directory == d and loaded.role == auth.CLIENT


# -- a keyed cluster ------------------------------------------------------------------------

def test_keyed_cluster_runs_a_workflow_end_to_end(keyed: Cluster, keys: Path) -> None:
    with keyed_client(keyed["n1"], keys) as c:
        h = c.run("colsum", "D")
        assert h.fetch().tolist() == [1000.0, 1000.0, 1000.0]
        assert c.fetch("D").shape == (1000, 3)  # bulk, from both holders
        made = [r for r in c.catalog() if FlowTag.of(r) is not None]
        assert made, "the flow should have made intermediates on the nodes"
    # Closing the client removed them (a client's cleanup of its own flow is allowed).
    with keyed_client(keyed["n2"], keys) as c:
        wait_for(lambda: not [r for r in c.catalog() if FlowTag.of(r) is not None], 10,
                 "the flow's intermediates to go")
        assert {(r.name, r.part) for r in c.catalog()} == {("D", 0), ("D", 1)}


def test_clients_without_the_clusters_keys_fail_fast(keyed: Cluster, keys: Path,
                                                     tmp_path: Path) -> None:
    other = tmp_path / "other"
    auth.keygen(other)
    stranger = tmp_path / "stranger"  # the cluster's (public) node key, its own client key
    auth.keygen(stranger)
    (stranger / "node.key").write_bytes((keys / "node.key").read_bytes())
    cases = {"no keys": None, "another cluster's keys": other,
             "a stranger's client key": stranger}
    for what, kd in cases.items():
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError) as err:
            hpcflow.connect(keyed["n1"].rpc, timeout_s=15, keys=str(kd) if kd else None)
        took = time.monotonic() - t0
        assert took < FAST_S, f"{what}: AuthenticationError after {took:.1f} s"
        assert "keys" in str(err.value)
    assert "refused our key" in str(err.value)  # the node's ZAP said no to the stranger
    assert "refused a connection" in keyed["n1"].log_path.read_text()
    # Every socket the node binds (RPC, catalog PUB, bulk) refuses plain ZeroMQ.
    eps = json.loads((keyed["n1"].data_dir / "node.json").read_text())
    ctx = zmqg.Context()
    try:
        for kind, sock_type in (("rpc", zmq.DEALER), ("pub", zmq.SUB), ("bulk", zmq.DEALER)):
            sock = ctx.socket(sock_type)
            failed = gevent.event.Event()
            watch = auth.HandshakeWatch(sock, eps[kind], lambda exc, ev=failed: ev.set())
            sock.connect(eps[kind])
            assert failed.wait(FAST_S), f"{kind}: no handshake failure seen"
            watch.close()
            sock.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    with keyed_client(keyed["n1"], keys) as c:  # and the node serves its cluster as before
        assert c.ping()["name"] == "n1"


def node_only_args(name: str) -> list[Any]:
    return {"hello": [{"name": "evil", "epoch": 1, "rpc": "tcp://127.0.0.1:9",
                       "pub": "tcp://127.0.0.1:9", "bulk": "tcp://127.0.0.1:9"}],
            "snapshot": [], "pull": ["D"], "run_share": [{}], "cancel_share": ["x-1"],
            "run_op": [{}], "delete_parts": [[["D", 0]]],
            "flow_status": ["n2", [["wf", "x", "D", False]]], "claim": [{}],
            "release_claim": ["D", None, "n2", 1], "claim_stands": ["D", None, 1],
            "save_part": [{}], "aux": ["D@0", 1, 0, 1]}[name]


def test_client_key_is_refused_node_only_calls_and_slices(keyed: Cluster, keys: Path) -> None:
    with keyed_client(keyed["n1"], keys) as c:
        before = c.stats()["rpc"]["denied"]
        for name in sorted(NODE_ONLY):
            with pytest.raises(PermissionDenied, match=f"{name} is a node-to-node call"):
                c._rpc.call(name, *node_only_args(name))
        assert c.stats()["rpc"]["denied"] == before + len(NODE_ONLY)
        # A forged slice of D (workflows would read it as D's rows) is refused ...
        with pytest.raises(PermissionDenied, match="slice"):
            c.put("FAKE", np.full((10, 3), 1000.0), lineage={"slice_of": "D", "rows": [0, 10]})
        # ... and cleanup naming another node's user dataset removes nothing.
        # (its own flow's, with the flow's secret: the node checks that before anything)
        assert c._call("cleanup", [["n2", "D", 1], ["n1", "D", 0]], c.flow.id,
                       c.flow.secret.to_wire()) == 0
        assert {(r.name, r.part) for r in c.catalog()} == {("D", 0), ("D", 1)}
        assert c.run("colsum", "D").fetch().tolist() == [1000.0] * 3


def test_rogue_peer_cannot_join_or_feed_a_catalog(keyed: Cluster, keys: Path,
                                                  tmp_path: Path) -> None:
    n1 = keyed["n1"]
    descriptor = node_only_args("hello")[0]
    # hello without keys: the handshake fails at once; with a client key: refused.
    for ctx, error in ((zmqg.Context(), AuthenticationError),
                       (auth.context(auth.Keys.load(keys, auth.CLIENT)), PermissionDenied)):
        rogue = strict.Client(timeout=15, context=ctx)
        rogue.connect(n1.rpc)
        t0 = time.monotonic()
        with pytest.raises(error):
            rogue.call("hello", descriptor)
        assert time.monotonic() - t0 < FAST_S
        rogue.close()
        ctx.destroy(linger=0)
    # Rogue PUBs (no keys; a CURVE server with its own key) publish constantly.  A SUB
    # secured like a node's own connects to them and to n1's PUB: only n1's messages
    # arrive.  A rogue SUB without keys on n1's PUB gets nothing meanwhile.
    stranger = tmp_path / "stranger"
    auth.keygen(stranger)
    plain = zmqg.Context()
    strange = auth.context(auth.Keys.load(stranger, auth.NODE))
    node_ctx = auth.context(auth.Keys.load(keys, auth.NODE))
    pubs = [c.socket(zmq.PUB) for c in (plain, strange)]
    try:
        sub = node_ctx.socket(zmq.SUB)
        spy = plain.socket(zmq.SUB)
        for s in (sub, spy):
            s.setsockopt(zmq.SUBSCRIBE, b"")
        for p in pubs:
            sub.connect(f"tcp://127.0.0.1:{p.bind_to_random_port('tcp://127.0.0.1')}")
        pub_ep = json.loads((n1.data_dir / "node.json").read_text())["pub"]
        sub.connect(pub_ep)
        spy.connect(pub_ep)

        def publish() -> None:
            while True:
                for p in pubs:
                    p.send_multipart([b"ROGUE", b"forged catalog update"])
                gevent.sleep(0.01)

        pumping = gevent.spawn(publish)
        got: list[list[bytes]] = []
        with gevent.Timeout(10 * SCALE):
            while len(got) < 5:  # n1's heartbeats come every 0.2 s
                got.append(sub.recv_multipart())
        pumping.kill()
        assert not [m for m in got if m[0] == b"ROGUE"]
        with pytest.raises(zmq.Again):
            spy.recv_multipart(zmq.NOBLOCK)
    finally:
        for c in (plain, strange, node_ctx):
            c.destroy(linger=0)
    with keyed_client(n1, keys) as c:
        assert "evil" not in {n["name"] for n in c.nodes()}


def test_centralised_baseline_forwards_slices_with_the_node_key(keyed: Cluster,
                                                                keys: Path) -> None:
    """The orchestrator uploads rows as slices and calls run_op: it holds the node key."""
    nodes = {n: keyed[n].rpc for n in ("n1", "n2")}
    step = SimpleNamespace(out="S", op="colsum", inputs=["D"], params={})
    orch = Orchestrator(nodes, "n1", keys=str(keys), timeout_s=30 * SCALE)
    try:
        result = orch.run(SimpleNamespace(steps=[step], result="S"))  # type: ignore[arg-type]
        assert result.tolist() == [1000.0] * 3
        assert any(".rows" in name for _node, name, _part in orch.created)  # rows forwarded
        orch.cleanup()
    finally:
        orch.close()
    with keyed_client(keyed["n1"], keys) as c:
        wait_for(lambda: {(r.name, r.part) for r in c.catalog()} == {("D", 0), ("D", 1)},
                 10, "the orchestrator's slices and outputs to go")


# -- without keys: as before -----------------------------------------------------------

def test_unkeyed_node_talks_to_anyone_and_warns_off_loopback(tmp_path: Path,
                                                             keys: Path) -> None:
    c = Cluster(tmp_path)
    try:
        open_node = c.add("n1", extra=["--listen", "0.0.0.0:0"])
        keyed_wild = c.add("n2", extra=["--listen", "0.0.0.0:0", "--keys", str(keys)])
        assert "NO AUTHENTICATION" in open_node.log_path.read_text()
        assert "NO AUTHENTICATION" not in keyed_wild.log_path.read_text()
        port = open_node.rpc.rsplit(":", 1)[1]
        stock = zerorpc.Client(timeout=10 * SCALE)  # stock zerorpc, no keys
        stock.connect(f"tcp://127.0.0.1:{port}")
        try:
            assert stock.ping()["name"] == "n1"
        finally:
            stock.close()
        with hpcflow.connect(f"127.0.0.1:{port}", timeout_s=15) as h:
            h.put("X", np.arange(4.0))
            assert h.fetch("X").tolist() == [0.0, 1.0, 2.0, 3.0]
            assert h._rpc.call("snapshot")["records"]  # no roles without keys
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError):  # a keyed client refuses an open node
            hpcflow.connect(f"127.0.0.1:{port}", timeout_s=15, keys=str(keys))
        assert time.monotonic() - t0 < FAST_S
    finally:
        c.stop()


def test_cli_with_and_without_keys(keyed: Cluster, keys: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rpc = keyed["n1"].rpc
    assert main(["ls", "--node", rpc, "--keys", str(keys), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(d["name"], d["part"]) for d in listed["datasets"]} >= {("D", 0), ("D", 1)}
    t0 = time.monotonic()
    assert main(["ls", "--node", rpc, "--json"]) == 1
    assert time.monotonic() - t0 < FAST_S
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "AuthenticationError"


# -- catalog updates are signed by their origin (issue 11, item 3 b; issue 12) -------------

def test_a_peer_cannot_publish_as_another_node(tmp_path: Path) -> None:
    """A process that joined as "evil" publishes n2's next update (n2's epoch, n2's next
    sequence number) on its own stream, as a relay would pass it on.  Accepted, it would
    make n2's real update a duplicate, dropped everywhere for good; without n2's
    signature it is dropped instead (``forged``)."""
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1")
        n2 = c.add("n2", via="n1")
        c.wait_members()
        snap = strict.Client(timeout=10 * SCALE)
        snap.connect(n2.rpc)
        state = snap.call("snapshot")
        snap.close()
        epoch, seq = state["epoch"], state["seq"]
        with FakePeer("evil", n1) as evil:
            # heartbeats until n1 has subscribed (slow joiner)
            wait_for(lambda: evil.heard_by(n1), 10, "evil's heartbeats to arrive")
            forged = {"name": "FORGED", "part": None, "owner": "n2", "shape": [1],
                      "dtype": "<f8", "nbytes": 8, "checksum": "xxh3:0", "chunk_bytes": 4096,
                      "version": 1}

            def forged_dropped() -> bool:
                evil.send([b"KV", msgpack.packb({"s": "n2", "e": epoch, "q": seq + 1,
                                                 "k": "FORGED", "v": forged})])
                with n1.client() as k:
                    return bool(k.stats()["catalog"]["forged"] >= 1)

            wait_for(forged_dropped, 10, "n1 to drop the forged update")
            with n2.client() as k:
                k.put("REAL", np.arange(3.0))  # n2's real update seq + 1
            wait_for(lambda: "REAL" in names_on(n1), 10, "n2's real update on n1")
            assert "FORGED" not in names_on(n1)
    finally:
        c.stop()
