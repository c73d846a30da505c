"""Benchmark: the catalog at cluster scale, with N real daemons on this machine (issue 12).

For each N in ``--sizes`` (default 16, 64, 256): start one seed, then the N-1 others
all at once, each joining through the seed (a start-up storm on purpose), and measure

* **form**: seconds from launching the N-1 until every node answers and lists all N
  members alive;
* **put -> visible everywhere**: ``--puts`` small puts, each on a random node, while
  every node waits for the name (the ``wait`` RPC, which returns when that node's
  catalog has it): p50/p99 of the time until the *last* node has it;
* **lookup**: ``locate`` round trips from the script to random nodes, p50/p99;
* **idle, per daemon**: CPU (utime+stime from /proc, over ``--idle-s`` seconds of an
  idle cluster, as % of one core), RSS (MB), open file descriptors, and catalog
  messages and bytes received per second (the node's own ``stats``);
* **joiner synced**: one more node joins through a random member; seconds until it
  lists every dataset and every member.

``--catalog`` is passed to the daemons (``replicated``; another mode once built).
``--sim`` then prints the simulator's figures for 1,000 and 10,000 nodes if
``hpcflow.catalog.sim`` exists in this tree.  Prints one markdown table.

Other developers' processes load this machine: idle CPU figures include contention,
and the 256-daemon run needs about 15 GB of RAM and a few minutes.

Run: ``python bench/catalog_scale.py [--sizes 16,64] [--heartbeat 1] [--idle-s 10]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import percentile

import hpcflow
from hpcflow.harness.local import NodeProcess

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pid_of(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


class Bench:
    def __init__(self, root: Path, n: int, args: argparse.Namespace) -> None:
        self.root, self.n, self.args = root, n, args
        self.extra = ["--heartbeat", str(args.heartbeat), "--catalog", args.catalog,
                      "--log-level", "WARNING"]
        self.nodes: list[NodeProcess] = []
        self.clients: dict[str, Any] = {}

    def node(self, name: str, via: str | None) -> NodeProcess:
        peers = [self.nodes[0].rpc] if via else []
        return NodeProcess(name, self.root / name, peers=peers, extra=self.extra)

    def client(self, node: NodeProcess) -> Any:
        c = self.clients.get(node.name)
        if c is None:
            c = self.clients[node.name] = hpcflow.connect(node.rpc, timeout_s=120)
        return c

    def members_alive(self, node: NodeProcess) -> int:
        return sum(1 for m in self.client(node).nodes() if m["alive"])

    def form(self) -> tuple[float, float]:
        """Seconds from launching the N-1 until formed, and from the last one ready (the
        first includes starting N-1 Python processes on this machine's cores)."""
        seed = self.node("s000", None)
        seed.start(120)
        self.nodes.append(seed)
        rest = [self.node(f"s{i:03d}", "s000") for i in range(1, self.n)]
        t0 = time.monotonic()
        for p in rest:
            p.launch()
        for p in rest:
            p.wait_ready(600)
        ready = time.monotonic()
        self.nodes += rest
        pending = list(self.nodes)
        deadline = t0 + self.args.form_timeout
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"N={self.n}: {len(pending)} nodes not formed after "
                                 f"{self.args.form_timeout} s")
            pending = [p for p in pending if self.members_alive(p) < self.n]
            if pending:
                gevent.sleep(0.2)
        return time.monotonic() - t0, time.monotonic() - ready

    def settled(self) -> bool:
        """No node has membership news left to spread (every heartbeat an idle one)."""
        def idle(cat: dict[str, Any]) -> bool:
            if "news_pending" in cat:  # heartbeats every heartbeat_s, to FANIN followers
                return not cat["news_pending"]
            return bool(cat.get("heartbeat_interval_ms", 1e9) > self.args.heartbeat * 1000)
        return all(idle(self.client(p).stats()["catalog"]) for p in self.nodes)

    def idle(self) -> dict[str, float]:
        deadline = time.monotonic() + 60
        while self.n > 9 and not self.settled() and time.monotonic() < deadline:
            gevent.sleep(0.5)
        pids = [pid_of(p) for p in self.nodes]
        stats0 = [self.client(p).stats()["catalog"] for p in self.nodes]
        cpu0, t0 = [cpu_s(pid) for pid in pids], time.monotonic()
        gevent.sleep(self.args.idle_s)  # the measurement window
        cpu1, t1 = [cpu_s(pid) for pid in pids], time.monotonic()
        stats1 = [self.client(p).stats()["catalog"] for p in self.nodes]
        dt = t1 - t0
        cpu = [(b - a) / dt * 100 for a, b in zip(cpu0, cpu1, strict=True)]
        msgs = [(b["received"] - a["received"]) / dt for a, b in zip(stats0, stats1, strict=True)]
        byts = [(b.get("bytes_received", 0) - a.get("bytes_received", 0)) / dt
                for a, b in zip(stats0, stats1, strict=True)]
        rss = [rss_mb(pid) for pid in pids]
        return {"cpu_pct": sum(cpu) / len(cpu), "cpu_all": sum(cpu), "rss": sum(rss) / len(rss),
                "rss_max": max(rss), "fds": sum(fds(pid) for pid in pids) / len(pids),
                "msgs": sum(msgs) / len(msgs), "bytes": sum(byts) / len(byts)}

    def visible(self, i: int) -> float:
        """One put; seconds until the last node's ``wait`` for it returned (the clients
        are gevent-based: one greenlet per node, all in this thread)."""
        name = f"bench{i}"

        def wait(p: NodeProcess) -> float:
            self.client(p).wait_for(name, 60)
            return time.monotonic()

        waits = [gevent.spawn(wait, p) for p in self.nodes]
        gevent.sleep(0.2)  # let the waits arrive before the put (they also work if not)
        c = self.client(random.choice(self.nodes))
        t0 = time.monotonic()
        c.put(name, np.arange(16.0))
        gevent.joinall(waits, raise_error=True)
        return max(g.value for g in waits) - t0

    def lookups(self) -> list[float]:
        out = []
        for _ in range(self.args.lookups):
            c = self.client(random.choice(self.nodes))
            t0 = time.monotonic()
            c.locate(f"bench{random.randrange(self.args.puts)}")
            out.append(time.monotonic() - t0)
        return out

    def joiner(self) -> float:
        p = NodeProcess(f"s{self.n:03d}", self.root / f"s{self.n:03d}",
                        peers=[random.choice(self.nodes).rpc], extra=self.extra)
        t0 = time.monotonic()
        p.start(120)
        self.nodes.append(p)
        want = {f"bench{i}" for i in range(self.args.puts)}
        while True:
            c = self.client(p)
            names = {r.name for r in c.catalog()}
            if want <= names and self.members_alive(p) == self.n + 1:
                return time.monotonic() - t0
            if time.monotonic() - t0 > 120:
                return float("inf")
            gevent.sleep(0.05)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        for p in self.nodes:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
        for p in self.nodes:
            p.kill(timeout_s=30)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"catscale{n}-") as tmp:
        b = Bench(Path(tmp), n, args)
        try:
            formed, converged = b.form()
            print(f"N={n}: formed in {formed:.1f} s ({converged:.1f} s after the last was "
                  "ready)", file=sys.stderr)
            idle = b.idle()
            vis = [b.visible(i) for i in range(args.puts)]
            look = b.lookups()
            joined = b.joiner()
            return {"n": n, "form": formed, "conv": converged, **idle,
                    "vis50": percentile(vis, 50), "vis99": percentile(vis, 99),
                    "look50": percentile(look, 50), "look99": percentile(look, 99),
                    "join": joined}
        finally:
            b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16,64,256")
    ap.add_argument("--catalog", default="replicated")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--puts", type=int, default=20)
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--form-timeout", type=float, default=600.0)
    ap.add_argument("--sim", action="store_true", help="also the simulated 1,000 and 10,000")
    args = ap.parse_args(argv)
    rows = [run_size(int(s), args) for s in args.sizes.split(",") if s]
    print(f"\ncatalog={args.catalog}, heartbeat {args.heartbeat:g} s, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| daemons | form s (after all ready) | put->all p50 / p99 ms | locate p50 / p99 ms "
          "| idle CPU % per daemon (all) | RSS MB (max) | fds | msgs/s | bytes/s "
          "| joiner synced s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['form']:.1f} ({r['conv']:.1f}) | {r['vis50'] * 1e3:.0f} / "
              f"{r['vis99'] * 1e3:.0f} | {r['look50'] * 1e3:.1f} / {r['look99'] * 1e3:.1f} "
              f"| {r['cpu_pct']:.2f} "
              f"({r['cpu_all']:.0f}) | {r['rss']:.0f} ({r['rss_max']:.0f}) | {r['fds']:.0f} "
              f"| {r['msgs']:.1f} | {r['bytes']:.0f} | {r['join']:.1f} |")
    if args.sim:
        if importlib.util.find_spec("hpcflow.catalog.sim") is None:
            print("\n(no simulator in this tree)")
        else:
            from hpcflow.catalog import sim  # type: ignore[attr-defined,unused-ignore]

            print()
            print(sim.report([1000, 10000]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
