"""Deployment on an allocation: peers from a faked SLURM environment and from a peers
file, ``wait-ready`` and ``status``.

Hosts are loopback addresses (Linux routes all of 127.0.0.0/8 to ``lo``): every node
of a "job" binds the same port on its own 127.0.0.x, as nodes of a real job bind one
port on their own hosts, and ``SLURMD_NODENAME`` tells each which host it is.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hpcflow
from hpcflow.config import NodeConfig
from hpcflow.errors import ConfigError
from hpcflow.peers import expand_hostlist, read_peers_file, select_peers

from .conftest import SCALE, NodeProc, wait_for

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def hpcflow_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcflow", *args], capture_output=True,
                          text=True, timeout=timeout * SCALE)


def free_port(hosts: list[str]) -> int:
    """A port P with P, P+1 and P+2 free on every host (the node's three sockets)."""
    for _ in range(200):
        port = random.randrange(20_000, 60_000)
        socks = []
        try:
            for h in hosts:
                for p in (port, port + 1, port + 2):
                    s = socket.socket()
                    socks.append(s)
                    s.bind((h, p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port triple")


class HostNode(NodeProc):
    """A node started the way srun starts it: no --name, SLURM's variables set."""

    def __init__(self, host: str, data_dir: Path, port: int, env: dict[str, str],
                 extra: list[str]) -> None:
        super().__init__(host, data_dir, [], ["--listen", f"{host}:{port}", *extra])
        self.prefix = ["env", *(f"{k}={v}" for k, v in env.items())]

    def argv(self) -> list[str]:
        args = super().argv()
        i = args.index("--name")
        return args[:i] + args[i + 2:]


def test_hostlist_expansion() -> None:
    assert expand_hostlist("node[001-004,010],gpu[1-2]-ib,login1") == [
        "node001", "node002", "node003", "node004", "node010", "gpu1-ib", "gpu2-ib", "login1"]
    assert expand_hostlist("r[1-2]n[8-10]") == ["r1n8", "r1n9", "r1n10", "r2n8", "r2n9",
                                                 "r2n10"]
    assert expand_hostlist("127.0.0.[2-4]") == HOSTS
    assert expand_hostlist("a,a,b") == ["a", "b"]
    for bad in ("n[1-", "n]1[", "n[3-1]", "n[a-b]", "n[]", "n[0-99999999]", "bad/name"):
        with pytest.raises(ConfigError):
            expand_hostlist(bad)


def test_join_through_a_few_peers_never_itself() -> None:
    hosts = [f"n{i}" for i in range(10)]
    picked = select_peers(hosts, {"n4"}, 7101)
    assert picked == ["n0:7101", "n5:7101", "n6:7101"]
    assert select_peers(hosts, {"n9"}, 7101) == ["n0:7101", "n1:7101", "n2:7101"]
    assert select_peers(["n0"], {"n0"}, 7101) == []
    # every node reaches n0, directly or through its successors: one connected cluster
    assert all(select_peers(hosts, {h}, 7101) for h in hosts)


def test_peers_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "peers"
    f.write_text("# the job's hosts\nnode1\nnode2:7300  # another port\n\ntcp://node3:7101\n")
    assert read_peers_file(f) == ["node1", "node2:7300", "tcp://node3:7101"]
    f.write_text("node1\nnot a host\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_peers_file(f)
    r = hpcflow_cli("node", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0",
                    "--peers-file", str(f))
    assert r.returncode == 1 and "need a fixed TCP port" in r.stderr
    # checked before anything binds, so any fixed port will do
    r = hpcflow_cli("node", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:9",
                    "--peers-file", str(tmp_path / "missing"))
    assert r.returncode == 1 and "cannot read peers file" in r.stderr
    r = hpcflow_cli("node", "--data-dir", str(tmp_path / "d"), "--peers-from", "slurm",
                    timeout=30)
    assert r.returncode == 1 and "SLURM_JOB_NODELIST is not set" in r.stderr


def test_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kw, msg in (({"peers_from": "pbs"}, "peers_from must be"),
                    ({"metrics": "nohost"}, "not HOST:PORT"),
                    ({"metrics": "ipc:///tmp/m"}, "metrics must be HOST:PORT"),
                    ({"peers_file": str(tmp_path / "none"), "listen": "ipc:///tmp/x"},
                     "fixed TCP port")):
        with pytest.raises(ConfigError, match=msg):
            NodeConfig(data_dir=tmp_path, **kw)
    toml = tmp_path / "node.toml"
    toml.write_text('peers_from = "slurm"\nlisten = "127.0.0.9:7500"\n')
    monkeypatch.setenv("SLURM_JOB_NODELIST", "127.0.0.[8-9],127.0.0.10")
    monkeypatch.setenv("SLURMD_NODENAME", "127.0.0.9")
    cfg = NodeConfig.load(toml, {"data_dir": str(tmp_path)})
    assert cfg.name == "127.0.0.9"
    assert cfg.peer_endpoints == ["tcp://127.0.0.8:7500", "tcp://127.0.0.10:7500"]


def test_fake_slurm_job(tmp_path: Path) -> None:
    """Three nodes of one "job" find each other from SLURM's node list alone."""
    port = free_port(HOSTS)
    env = {"SLURM_JOB_NODELIST": "127.0.0.[2-4]", "SLURM_JOB_ID": "4242",
           "HPCFLOW_TIMEOUT_SCALE": str(SCALE)}
    addr = {h: f"{h}:{port}" for h in HOSTS}
    # The job script's `wait-ready` runs before the node exists, and returns once it does.
    waiter = subprocess.Popen([sys.executable, "-m", "hpcflow", "wait-ready", addr[HOSTS[0]],
                               "--timeout", "60", "--members", "3", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    nodes = []
    try:
        # the last host first: it waits for peers that are not there yet, as srun's do
        for h in reversed(HOSTS):
            node = HostNode(h, tmp_path / h, port, {**env, "SLURMD_NODENAME": h},
                            ["--peers-from", "slurm"])
            nodes.append(node)
            node.start()
        out, err = waiter.communicate(timeout=60 * SCALE)
        assert waiter.returncode == 0, err
        assert json.loads(out) == {"name": HOSTS[0], "ready": True, "members_alive": 3}
        with hpcflow.connect(addr[HOSTS[2]]) as c:
            c.put("X", np.arange(12.0).reshape(3, 4))
        with hpcflow.connect(addr[HOSTS[0]]) as c:
            c.wait_for("X", timeout_s=10)
            assert c.fetch("X").sum() == 66.0
        r = hpcflow_cli("status", "--node", addr[HOSTS[1]], "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert [m["name"] for m in st["members"]] == HOSTS  # names are the hosts
        assert all(m["alive"] and m["catalog_mode"] == "replicated" for m in st["members"])
        assert [m["rpc"] for m in st["members"]] == [f"tcp://{a}" for a in addr.values()]
        held = {m["name"]: (m["datasets"], m["bytes_held"]) for m in st["members"]}
        assert held == {HOSTS[0]: (0, 0), HOSTS[1]: (0, 0), HOSTS[2]: (1, 96)}
        # the fetch pulled 96 bytes from 127.0.0.4, counted by it against the client
        m4 = st["members"][2]
        assert m4["sent"] == {f"client@{HOSTS[0]}": 96}
        assert st["ops_differ"] == {} and all(m["ops"] for m in st["members"])
        text = hpcflow_cli("status", "--node", addr[HOSTS[1]])
        assert text.returncode == 0 and "3 alive, 0 dead" in text.stdout
        # a member that is gone shows as dead, from any node
        nodes[0].kill()  # 127.0.0.4
        def dead() -> bool:
            r = hpcflow_cli("status", "--node", addr[HOSTS[0]], "--json")
            return r.returncode == 0 and json.loads(r.stdout)["dead"] == 1
        wait_for(dead, 20, "127.0.0.4 reported dead")
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
        for n in nodes:
            n.kill()


def test_peers_file_and_wait_ready_timeout(tmp_path: Path) -> None:
    hosts = ["127.0.0.6", "127.0.0.7"]
    port = free_port(hosts)
    peers = tmp_path / "peers.txt"
    peers.write_text("".join(f"{h}\n" for h in hosts))  # as a job script writes it
    nodes = [HostNode(h, tmp_path / h, port, {}, ["--peers-file", str(peers), "--name",
                                                  f"w{i}"]) for i, h in enumerate(hosts)]
    try:
        for n in nodes:
            n.start()
        r = hpcflow_cli("wait-ready", f"{hosts[1]}:{port}", "--members", "2", "--timeout", "30")
        assert r.returncode == 0, r.stderr
        assert "node w1 ready (2 members alive)" in r.stdout
        # nothing listens there: exit status 1 with the reason, after about the timeout
        t0 = time.monotonic()
        r = hpcflow_cli("wait-ready", f"127.0.0.8:{port}", "--timeout", "1")
        assert r.returncode == 1
        assert "not ready after 1 s" in r.stderr and "PeerUnavailable" in r.stderr
        assert time.monotonic() - t0 < 20 * SCALE
        # a member count that never comes: also 1, saying how many there are
        r = hpcflow_cli("wait-ready", f"{hosts[0]}:{port}", "--members", "5", "--timeout", "1")
        assert r.returncode == 1 and "2 of 5 members alive" in r.stderr
    finally:
        for n in nodes:
            n.kill()

