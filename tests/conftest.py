"""Real daemons on loopback: each node is a ``python -m hpcflow node`` subprocess.

Nodes bind ephemeral ports (``--listen 127.0.0.1:0``) and write their bound
endpoints to ``<data_dir>/node.json``; fixtures wait for that file rather
than sleeping.  Every wait is bounded by ``HPCFLOW_TIMEOUT_SCALE`` x a base.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hpcflow
from hpcflow.config import timeout_scale

SCALE = timeout_scale()
HEARTBEAT = 0.2
TTL = 1.0


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until truthy; fail the test with ``what`` after ``timeout`` x scale."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * SCALE:.1f} s waiting for {what}")
        time.sleep(0.02)


class NodeProc:
    """One daemon process and what it wrote about itself."""

    def __init__(self, name: str, data_dir: Path, peers: list[str], extra: list[str]) -> None:
        self.name, self.data_dir, self.peers, self.extra = name, data_dir, peers, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def rpc(self) -> str:
        return str(self.info["rpc"])

    def start(self) -> NodeProc:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "node.json").unlink(missing_ok=True)
        args = [sys.executable, "-m", "hpcflow", "node", "--name", self.name, "--data-dir",
                str(self.data_dir), "--listen", "127.0.0.1:0", "--heartbeat", str(HEARTBEAT),
                "--ttl", str(TTL * SCALE), *self.extra]
        for p in self.peers:
            args += ["--peer", p]
        log = open(self.data_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stderr=log, stdout=log)
        log.close()
        path = self.data_dir / "node.json"

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited with {self.proc.returncode}: "
                                     + self.log_tail())
            return path.exists()

        wait_for(ready, 20, f"node {self.name} to start")
        self.info = json.loads(path.read_text())
        return self

    def log_tail(self, n: int = 30) -> str:
        p = self.data_dir.parent / f"{self.name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def client(self) -> hpcflow.Client:
        return hpcflow.connect(self.rpc, timeout_s=15)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30 * SCALE)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """A set of nodes; the first one is the entry point for the others."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, NodeProc] = {}

    def add(self, name: str, via: str | None = None, extra: list[str] | None = None) -> NodeProc:
        peers = [self.nodes[via].rpc] if via else []
        node = NodeProc(name, self.root / name, peers, extra or [])
        self.nodes[name] = node
        return node.start()

    def __getitem__(self, name: str) -> NodeProc:
        return self.nodes[name]

    def stop(self) -> None:
        for n in self.nodes.values():
            n.kill(signal.SIGTERM)

    def wait_members(self, timeout: float = 15) -> None:
        """Until every running node sees every other running node alive."""
        running = {n for n, p in self.nodes.items() if p.alive()}

        def converged() -> bool:
            for name in running:
                with self.nodes[name].client() as c:
                    alive = {n["name"] for n in c.nodes() if n["alive"]}
                if not running <= alive:
                    return False
            return True

        wait_for(converged, timeout, f"membership {sorted(running)} to converge")


def names_on(node: NodeProc, include_dead: bool = False) -> set[str]:
    with node.client() as c:
        return {r.key for r in c.catalog(include_dead=include_dead)}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes in a chain: n2 joins through n1, n3 through n2."""
    c = Cluster(tmp_path)
    try:
        c.add("n1")
        c.add("n2", via="n1")
        c.add("n3", via="n2")
        c.wait_members()
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[], Cluster]]:
    made: list[Cluster] = []

    def make() -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}")
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


os.environ.setdefault("HPCFLOW_TIMEOUT_SCALE", str(SCALE))
