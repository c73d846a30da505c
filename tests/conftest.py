"""Real daemons on loopback: each node is a ``python -m hpcflow node`` subprocess.

Nodes bind ephemeral ports (``--listen 127.0.0.1:0``) and write their bound
endpoints to ``<data_dir>/node.json``; fixtures wait for that file rather
than sleeping.  Every wait is bounded by ``HPCFLOW_TIMEOUT_SCALE`` x a base.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import msgpack
import numpy as np
import pytest
import zerorpc
import zmq

import hpcflow
from hpcflow.config import timeout_scale
from hpcflow.harness.local import LocalCluster, NodeProcess
from hpcflow.rpc import auth

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
        gevent.sleep(0.02)  # (greenlets of the test process, e.g. socket monitors, run)


class NodeProc(NodeProcess):
    """A test node: short heartbeats so liveness tests run in about a second."""

    def __init__(self, name: str, data_dir: Path, peers: list[str], extra: list[str]) -> None:
        listen = "127.0.0.1:0"
        if "--listen" in extra:
            i = extra.index("--listen")
            listen, extra = extra[i + 1], extra[:i] + extra[i + 2:]
        super().__init__(name, data_dir, peers=peers, listen=listen, extra=[
            "--heartbeat", str(HEARTBEAT), "--ttl", str(TTL * SCALE), *extra])

    def client(self, **kw: Any) -> hpcflow.Client:
        return hpcflow.connect(self.rpc, timeout_s=15, **kw)


class Cluster(LocalCluster):
    """A set of test nodes; ``add(name, via=...)`` joins through one named peer.  Every
    node gets the cluster's ``extra`` arguments (e.g. ``--catalog dht``) first."""

    def add(self, name: str, via: str | None = None, extra: list[str] | None = None,
            **kw: Any) -> NodeProc:
        peers = [self.nodes[via].rpc] if via else []
        node = NodeProc(name, self.root / name, peers, [*self.extra, *(extra or [])])
        self.nodes[name] = node
        node.start()
        return node

    def __getitem__(self, name: str) -> NodeProc:
        node = self.nodes[name]
        assert isinstance(node, NodeProc)
        return node

    def wait_members(self, timeout: float = 15) -> None:
        self.wait_converged(timeout)


class FakePeer:
    """A hand-driven "peer": a real PUB socket we publish on, and a zerorpc server that
    answers ``snapshot`` (empty) and ``ping`` like a daemon would.  It introduces itself
    to ``node`` with a hello; use as a context manager."""

    def __init__(self, name: str, node: NodeProc) -> None:
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.info = {"name": name, "epoch": 1, "rpc": "", "bulk": "tcp://127.0.0.1:9",
                     "pub": f"tcp://127.0.0.1:{port}"}
        info = self.info

        class RPC:
            def snapshot(self, origins: Any = None) -> dict[str, Any]:
                return {"epoch": 1, "seq": 0, "records": [], "self": info, "origins": [],
                        "vector": {}}

            def ping(self) -> dict[str, Any]:
                return {"name": info["name"], "epoch": 1, "self": info}

            def claim(self, request: Any) -> bool:
                return True  # a member: it grants every other node's puts

        self.server = zerorpc.Server(RPC())
        self.server.bind("tcp://127.0.0.1:0")
        self.info["rpc"] = self.server._events._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.runner = gevent.spawn(self.server.run)
        self.rpc = zerorpc.Client(timeout=10 * SCALE)
        self.rpc.connect(node.rpc)
        self.rpc.hello(self.info)

    def send(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def heard_by(self, node: NodeProc) -> bool:
        """Heartbeat with a marker in our load; True once ``node`` shows it (it reads our
        stream: a hello makes us a live member at once, before its SUB is connected)."""
        self.send([b"HB", msgpack.packb({"s": self.info["name"], "e": 1, "q": 0,
                                         "p": {"load": {"heard": 1}}})])
        with node.client() as c:
            return any(n["name"] == self.info["name"] and n["alive"]
                       and n["load"].get("heard") == 1 for n in c.nodes())

    def __enter__(self) -> FakePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pub.close()
        self.rpc.close()
        self.runner.kill()
        self.server.close()
        self.ctx.term()


def free_port_triple(taken: frozenset[int] | set[int] = frozenset()) -> int:
    """A port P with P, P+1 and P+2 free (a node's RPC, PUB and bulk with ``--listen
    HOST:P``), none in ``taken``.  Drawn below the kernel's ephemeral range, where the
    ports other tests' daemons bind (``:0``) never land: a port the kernel handed out
    and took back could be handed to one of them before our node binds it."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(max(1024, lo - 12000), lo - 3)
        if taken & {port, port + 1, port + 2}:
            continue
        socks: list[socket.socket] = []
        try:
            for q in (port, port + 1, port + 2):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", q))
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
        return port
    raise AssertionError("no three free ports in a row")


def names_on(node: NodeProc, include_dead: bool = False) -> set[str]:
    with node.client() as c:
        return {r.key for r in c.catalog(include_dead=include_dead)}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module that sets ``CATALOG_MODES = ("replicated", "dht")`` runs each of its
    tests that starts a cluster through ``cluster``/``make_cluster`` (or asks for
    ``catalog_mode``) once per catalog mode."""
    modes = getattr(metafunc.module, "CATALOG_MODES", None)
    if modes and "catalog_mode" in metafunc.fixturenames:
        metafunc.parametrize("catalog_mode", list(modes), indirect=True)


@pytest.fixture
def catalog_mode(request: pytest.FixtureRequest) -> str:
    """The nodes' ``--catalog`` mode: replicated unless the module asks for both."""
    return str(getattr(request, "param", "replicated"))


def catalog_args(mode: str) -> list[str]:
    return [] if mode == "replicated" else ["--catalog", mode]


def add_three(c: Cluster, n3_via: str = "n2", extra: list[str] | None = None) -> Cluster:
    """Add n1, n2 joined through n1 and n3 through ``n3_via`` (each with ``extra``) to
    ``c``, and wait until they form."""
    c.add("n1", extra=extra)
    c.add("n2", via="n1", extra=extra)
    c.add("n3", via=n3_via, extra=extra)
    c.wait_members()
    return c


@contextlib.contextmanager
def three_nodes(root: Path, n3_via: str = "n2", extra: list[str] | None = None
                ) -> Iterator[Cluster]:
    """:func:`add_three` in a cluster of its own at ``root`` (``extra`` for all its
    nodes), stopped at the end."""
    c = Cluster(root, extra=extra or [])
    try:
        yield add_three(c, n3_via)
    finally:
        c.stop()


@pytest.fixture
def cluster(tmp_path: Path, catalog_mode: str) -> Iterator[Cluster]:
    """Three nodes in a chain: n2 joins through n1, n3 through n2."""
    with three_nodes(tmp_path, extra=catalog_args(catalog_mode)) as c:
        yield c


@pytest.fixture
def make_cluster(tmp_path: Path, catalog_mode: str) -> Iterator[Callable[[], Cluster]]:
    made: list[Cluster] = []

    def make() -> Cluster:
        c = Cluster(tmp_path / f"c{len(made)}", extra=catalog_args(catalog_mode))
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


os.environ.setdefault("HPCFLOW_TIMEOUT_SCALE", str(SCALE))


@pytest.fixture
def real_h5md() -> Path:
    """Directory with real H5MD files from MDAnalysisTests (written by ZnH5MD and MDAnalysis).

    CI extracts them from the package's sdist and sets ``HPCFLOW_REAL_H5MD``; an installed
    MDAnalysisTests works too.
    """
    env = os.environ.get("HPCFLOW_REAL_H5MD")
    if env and (Path(env) / "cu.h5md").exists():
        return Path(env)
    try:
        import MDAnalysisTests  # type: ignore[import-not-found]

        return Path(MDAnalysisTests.__file__).parent / "data"
    except ImportError:
        pytest.skip("real H5MD files unavailable: set HPCFLOW_REAL_H5MD (see .ci/run) or "
                    "pip install MDAnalysisTests")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "cluster"
    auth.keygen(d)
    return d


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[Cluster]:
    """Two keyed nodes (n2 joined through n1) holding parts 0 (on n1) and 1 (on n2) of D
    (ones), for the tests of keys and of flows' secrets."""
    c = Cluster(tmp_path_factory.mktemp("keyed"))
    try:
        c.add("n1", extra=["--keys", str(keys)])
        c.add("n2", via="n1", extra=["--keys", str(keys)])
        with c["n1"].client(keys=str(keys)) as k:
            wait_for(lambda: {n["name"] for n in k.nodes() if n["alive"]} == {"n1", "n2"},
                     15, "the keyed nodes to see each other")
            k.put("D", np.ones((600, 3)), part=0, nparts=2)
        with c["n2"].client(keys=str(keys)) as k:
            k.put("D", np.ones((400, 3)), part=1, nparts=2)
            k.wait_for("D", 10 * SCALE)
        yield c
    finally:
        c.stop()
