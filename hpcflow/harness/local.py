"""Start hpcflow daemons as local processes and wait until they are ready.

Used by the replay harness, the benchmarks and the tests.  Nodes bind
ephemeral ports by default and report their bound endpoints in
``<data_dir>/node.json``; :meth:`NodeProcess.start` waits for that file (or
for the process to die, in which case the error carries its log tail).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import timeout_scale
from ..errors import PeerUnavailable
from .procs import die_with_parent, signals_deferred

STOP_GRACE_S = 30.0
"""How long :meth:`LocalCluster.stop` lets daemons exit cleanly (scaled)."""
ABORT_GRACE_S = 2.0
"""The same when tearing down after an error or Ctrl-C.  A daemon answers SIGTERM
in milliseconds unless an RPC is still being served: it then waits for that
request's client to be declared lost (zerorpc heartbeat, ~15 s) before exiting,
which only delays an abort; its data is being thrown away anyway."""


class NodeProcess:
    """One ``hpcflow node`` subprocess; can be killed and started again on the same data."""

    def __init__(self, name: str, data_dir: Path, *, peers: Sequence[str] = (),
                 listen: str = "127.0.0.1:0", extra: Sequence[str] = (),
                 prefix: Sequence[str] = ()) -> None:
        self.name, self.data_dir = name, Path(data_dir)
        self.peers, self.listen = list(peers), listen
        self.extra, self.prefix = list(extra), list(prefix)  # prefix: e.g. ip netns exec NS
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    @property
    def rpc(self) -> str:
        return str(self.info["rpc"])

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def argv(self) -> list[str]:
        args = [*self.prefix, sys.executable, "-m", "hpcflow", "node", "--name", self.name,
                "--data-dir", str(self.data_dir), "--listen", self.listen, *self.extra]
        for p in self.peers:
            args += ["--peer", p]
        return args

    def start(self, timeout_s: float = 30.0) -> NodeProcess:
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it (many nodes at once: launch each, then
        ``wait_ready`` each; from the main thread, since a node dies with its parent
        *thread*)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "node.json").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log, signals_deferred():
            # Nodes launched by a harness, benchmark or test must not outlive it.
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def wait_ready(self, timeout_s: float = 30.0) -> NodeProcess:
        """Wait until the launched node has bound its endpoints (``node.json``)."""
        assert self.proc is not None, "launch() first"
        ready = self.data_dir / "node.json"
        deadline = time.monotonic() + timeout_s * timeout_scale()
        while not ready.exists():
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"node {self.name} exited with {self.proc.returncode}:\n"
                                      + self.log_tail())
            if time.monotonic() > deadline:
                self.kill()
                raise PeerUnavailable(f"node {self.name} not ready after {timeout_s:g} s:\n"
                                      + self.log_tail())
            time.sleep(0.02)
        self.info = json.loads(ready.read_text())
        return self

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 30.0) -> int | None:
        """Send ``sig`` and wait; escalate to SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s * timeout_scale())
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class LocalCluster:
    """Nodes on this machine; each new node joins through the previous one."""

    def __init__(self, root: Path, extra: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.extra = list(extra)
        self.nodes: dict[str, NodeProcess] = {}

    def add(self, name: str, via: str | None = None, extra: Sequence[str] = (),
            **kw: Any) -> NodeProcess:
        if via is None and self.nodes:
            via = list(self.nodes)[-1]
        return self._node(name, [self.nodes[via].rpc] if via else [], extra, kw).start()

    def _node(self, name: str, peers: list[str], extra: Sequence[str],
              kw: Mapping[str, Any]) -> NodeProcess:
        """A node of this cluster (registered, so ``stop()`` ends it once launched)."""
        node = NodeProcess(name, self.root / name, peers=peers,
                           extra=[*self.extra, *extra], **kw)
        self.nodes[name] = node
        return node

    def add_all(self, names: Sequence[str],
                kw: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Start ``names`` at once rather than one after another: the first alone when
        the cluster is empty, then the rest launched together, each joining through
        the first node, and waited for together (``kw``: per node, as ``add`` takes)."""
        kw = kw or {}
        todo = list(names)
        if not todo:
            return
        if not self.nodes:
            self.add(todo[0], **kw.get(todo[0], {}))
            todo = todo[1:]
        seed = self.nodes[next(iter(self.nodes))]
        launched = []
        for name in todo:
            opts = dict(kw.get(name, {}))
            node = self._node(name, [seed.rpc], opts.pop("extra", ()), opts)
            node.launch()
            launched.append(node)
        for node in launched:
            node.wait_ready()

    def __getitem__(self, name: str) -> NodeProcess:
        return self.nodes[name]

    def wait_converged(self, timeout_s: float = 30.0) -> None:
        """Until every running node sees every other running node alive."""
        from ..client.client import connect

        running = {n for n, p in self.nodes.items() if p.alive()}
        deadline = time.monotonic() + timeout_s * timeout_scale()
        for name in running:
            with connect(self.nodes[name].rpc) as c:
                while not running <= {n["name"] for n in c.nodes() if n["alive"]}:
                    if time.monotonic() > deadline:
                        raise PeerUnavailable(f"membership {sorted(running)} did not converge")
                    time.sleep(0.02)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every node at once; SIGKILL those still running after *grace_s* (scaled).

        SIGINT/SIGTERM to this process wait until it is done, so a second
        Ctrl-C cannot leave daemons behind.
        """
        with signals_deferred():
            running = [n.proc for n in self.nodes.values() if n.alive() and n.proc is not None]
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s * timeout_scale()
            for proc in running:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(STOP_GRACE_S if exc_type is None else ABORT_GRACE_S)
