"""Benchmark: the catalog at cluster scale, with N real daemons on this machine (issue 12).

For each N in ``--sizes`` (default 16, 64, 256): start one seed, then the N-1 others in
batches of ``--batch`` (default 16; 0: all at once, a start-up storm on purpose), each
batch launched together and waited for (every daemon has bound its ports: ``node.json``)
before the next (with ``--absorb S``, also until the seed lists the batch alive, at
most S s); each joins through the seed (``--via seed``) or through a random daemon
already up (``--via random``); ``--ttl`` is passed to the daemons (an overloaded host
keeps live members silent for longer than the default 3.5 s).  Then, ``--settle S``
seconds later (0 by default; forming 256 daemons on 2 cores leaves a 1-min load
average near 300, which takes minutes to decay), measure

* **form**: seconds from launching the first of the N-1 until every node answers and
  lists all N members alive (and from the moment the last daemon was ready);
* **put -> visible everywhere**: ``--puts`` small puts, each on one of 5 random nodes, while
  every node waits for the name (the ``wait`` RPC, which returns when that node's
  catalog has it): p50/p99 of the time until the *last* node has it (``--wait-sample K``:
  of K random nodes only);
* **lookup**: ``locate`` round trips from the script to random nodes, p50/p99;
* **idle, per daemon**: CPU (utime+stime from /proc, over ``--idle-s`` seconds of an
  idle cluster, as % of one core), memory (RSS, and PSS: RSS with each shared page
  divided among the processes mapping it, i.e. what N daemons really take: libraries'
  code is shared by all of them), threads, open file descriptors, and catalog messages
  and bytes received per second (the node's own ``stats``: the catalog stream, i.e.
  heartbeats and membership gossip; in ``dht`` mode the DHT's UDP datagrams are not
  counted);
* **joiner synced**: one more node joins through a random member; seconds until it
  lists every dataset and every member.

``--catalog replicated|dht`` is passed to the daemons (both modes run the same
measurements; a mode or option the daemons do not know fails at the seed's start).
``--sim`` then prints the simulator's figures for 1,000 and 10,000 nodes if
``hpcflow.catalog.sim`` exists in this tree.  Prints one markdown table, with the
machine's load average, free memory and ``ulimit -n`` (other developers' processes load
this machine: idle CPU figures include contention).  If a cluster does not form within
``--form-timeout`` the row says so, with what was missing (dead daemons and the tail of
one's log, how many members the slowest nodes list, file descriptors).

Run: ``python bench/catalog_scale.py [--sizes 16,64] [--catalog dht] [--batch 16]
[--absorb 120] [--ttl 30] [--heartbeat 1] [--idle-s 10] [--settle 120]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import percentile

import hpcflow
from hpcflow.harness.local import NodeProcess
from hpcflow.rpc.calls import new_client

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


def pss_mb(pid: int) -> float:
    """Proportional set size: RSS with each shared page divided among its mappers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def machine() -> str:
    """Load average, available memory and the fd limit, for the record."""
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    la = os.getloadavg()
    return (f"load average {la[0]:.1f} {la[1]:.1f} {la[2]:.1f}, {avail / 1024:.1f} GB "
            f"available, ulimit -n {soft}")


def pid_of(node: NodeProcess) -> int:
    assert node.proc is not None
    return node.proc.pid


class Bench:
    def __init__(self, root: Path, n: int, args: argparse.Namespace) -> None:
        self.root, self.n, self.args = root, n, args
        self.extra = ["--heartbeat", str(args.heartbeat), "--catalog", args.catalog,
                      "--log-level", "WARNING"] + (["--ttl", str(args.ttl)] if args.ttl else [])
        self.nodes: list[NodeProcess] = []
        self.clients: dict[str, Any] = {}
        self.rpcs: dict[str, Any] = {}

    def node(self, name: str, via: NodeProcess | None) -> NodeProcess:
        peers = [via.rpc] if via is not None else []
        return NodeProcess(name, self.root / name, peers=peers, extra=self.extra)

    def via(self) -> NodeProcess:
        """Whom the next daemon joins through: the seed, or any daemon already up."""
        return self.nodes[0] if self.args.via == "seed" else random.choice(self.nodes)

    def client(self, node: NodeProcess) -> Any:
        """A script's client (``hpcflow.connect``), for puts: connecting asks the node
        for ``info``, which in DHT mode lists the catalog (a DHT lookup per member: 7 s
        per node at 64 on a loaded machine), so only a few nodes get one."""
        c = self.clients.get(node.name)
        if c is None:
            c = self.clients[node.name] = hpcflow.connect(node.rpc, timeout_s=120)
        return c

    def rpc(self, node: NodeProcess) -> Any:
        """A bare RPC client of ``node`` (no ``info`` at connect), for polling."""
        c = self.rpcs.get(node.name)
        if c is None:
            c = self.rpcs[node.name] = new_client(node.rpc, 120.0)
        return c

    def stats(self, node: NodeProcess) -> dict[str, Any]:
        return dict(self.rpc(node).call("stats"))

    def members_alive(self, node: NodeProcess) -> int:
        cat = self.stats(node)["catalog"]
        if "members_alive" in cat:
            return int(cat["members_alive"])
        # daemons from before that counter: the catalog listing (in DHT mode a lookup
        # per member)
        return sum(1 for m in self.rpc(node).call("catalog", False)["nodes"] if m["alive"])

    def form(self) -> tuple[float, float]:
        """Seconds from launching the N-1 until formed, and from the last one ready (the
        first includes starting N-1 Python processes on this machine's cores)."""
        seed = self.node("s000", None)
        seed.start(120)
        self.nodes.append(seed)
        batch = self.args.batch or self.n
        t0 = time.monotonic()
        for lo in range(1, self.n, batch):
            # a batch joins through daemons that are up: launched together, then waited
            # for (each has bound its ports), so a batch never waits on a slower one
            group = [self.node(f"s{i:03d}", self.via())
                     for i in range(lo, min(self.n, lo + batch))]
            for p in group:
                p.launch()
            for p in group:
                p.wait_ready(600)
            self.nodes += group
            if self.args.absorb:  # and the seed lists them alive before the next batch
                deadline = time.monotonic() + self.args.absorb
                while ((self.members_alive_or_none(seed) or 0) < len(self.nodes)
                       and time.monotonic() < deadline):
                    gevent.sleep(0.2)
        ready = time.monotonic()
        self.putters = random.sample(self.nodes, min(5, self.n))  # puts start on these
        self.put_s: list[float] = []  # each put's own seconds (see visible)
        print(f"N={self.n}: all {self.n} daemons up in {ready - t0:.1f} s ({machine()})",
              file=sys.stderr)
        pending = list(self.nodes)
        deadline = t0 + self.args.form_timeout
        while pending:
            if time.monotonic() > deadline:
                raise NotFormed(self.why_not_formed(pending))
            pending = [p for p in pending if (self.members_alive_or_none(p) or 0) < self.n]
            if pending:
                gevent.sleep(0.2)
        return time.monotonic() - t0, time.monotonic() - ready

    def members_alive_or_none(self, node: NodeProcess) -> int | None:
        try:
            return self.members_alive(node)
        except hpcflow.HpcflowError:
            return None

    def why_not_formed(self, pending: list[NodeProcess]) -> str:
        """What a cluster that did not form lacks, as precisely as we can tell."""
        dead = [p for p in self.nodes if p.proc is not None and p.proc.poll() is not None]
        counts = sorted((self.members_alive_or_none(p) or -1, p.name) for p in pending)
        lines = [f"N={self.n}: {len(pending)} nodes not formed after "
                 f"{self.args.form_timeout:g} s ({machine()})",
                 f"  dead daemons: {len(dead)} {[p.name for p in dead][:10]}",
                 f"  members alive as the slowest see it (-1: no answer): {counts[:10]}"]
        live = [p for p in self.nodes if p not in dead]
        if live:
            fd = [fds(pid_of(p)) for p in live]
            lines.append(f"  file descriptors per daemon: max {max(fd)}, "
                         f"mean {sum(fd) / len(fd):.0f}")
        if dead:
            lines.append(f"  log of {dead[0].name}:\n" + dead[0].log_tail(15))
        return "\n".join(lines)

    def settled(self) -> bool:
        """No node has membership news left to spread (every heartbeat an idle one)."""
        def idle(cat: dict[str, Any]) -> bool:
            if "news_pending" in cat:  # heartbeats every heartbeat_s, to FANIN followers
                return not cat["news_pending"]
            return bool(cat.get("heartbeat_interval_ms", 1e9) > self.args.heartbeat * 1000)
        return all(idle(self.stats(p)["catalog"]) for p in self.nodes)

    def idle(self) -> dict[str, float]:
        deadline = time.monotonic() + 60
        while self.n > 9 and not self.settled() and time.monotonic() < deadline:
            gevent.sleep(0.5)
        pids = [pid_of(p) for p in self.nodes]
        stats0 = [self.stats(p)["catalog"] for p in self.nodes]
        cpu0, t0 = [cpu_s(pid) for pid in pids], time.monotonic()
        gevent.sleep(self.args.idle_s)  # the measurement window
        cpu1, t1 = [cpu_s(pid) for pid in pids], time.monotonic()
        stats1 = [self.stats(p)["catalog"] for p in self.nodes]
        dt = t1 - t0
        cpu = [(b - a) / dt * 100 for a, b in zip(cpu0, cpu1, strict=True)]
        msgs = [(b["received"] - a["received"]) / dt for a, b in zip(stats0, stats1, strict=True)]
        byts = [(b.get("bytes_received", 0) - a.get("bytes_received", 0)) / dt
                for a, b in zip(stats0, stats1, strict=True)]
        rss = [rss_mb(pid) for pid in pids]
        pss = [pss_mb(pid) for pid in pids]
        return {"cpu_pct": sum(cpu) / len(cpu), "cpu_all": sum(cpu), "rss": sum(rss) / len(rss),
                "rss_max": max(rss), "pss": sum(pss) / len(pss),
                "threads": sum(threads(pid) for pid in pids) / len(pids),
                "fds": sum(fds(pid) for pid in pids) / len(pids),
                "msgs": sum(msgs) / len(msgs), "bytes": sum(byts) / len(byts)}

    def visible(self, i: int) -> float:
        """One put; seconds until the last node's ``wait`` for it returned (the clients
        are gevent-based: one greenlet per node, all in this thread).  The put's own
        time (until acknowledged: its claim round with the name's arbiters included) goes
        to :attr:`put_s`.  With ``--wait-sample K``, only K random nodes wait (in DHT
        mode each waiting node polls the DHT: 256 of them at once swamped it)."""
        name = f"bench{i}"

        def wait(p: NodeProcess) -> float:
            self.rpc(p).call("wait", name, 60.0)
            return time.monotonic()

        c = self.client(random.choice(self.putters))
        k = self.args.wait_sample
        waiters = random.sample(self.nodes, k) if 0 < k < len(self.nodes) else self.nodes
        waits = [gevent.spawn(wait, p) for p in waiters]
        gevent.sleep(0.2)  # let the waits arrive before the put (they also work if not)
        t0 = time.monotonic()
        for attempt in range(3):  # an overloaded member may miss the name's claim round
            try:
                c.put(name, np.arange(16.0))
                break
            except hpcflow.PeerUnavailable as exc:
                if attempt == 2:
                    raise
                print(f"put {name}: {exc}; again (counted in its time)", file=sys.stderr)
                gevent.sleep(1.0)
        self.put_s.append(time.monotonic() - t0)  # the put itself (its claim round)
        gevent.joinall(waits)
        if not all(g.successful() for g in waits):  # a node that stopped answering
            return float("inf")
        return max(g.value for g in waits) - t0

    def lookups(self) -> list[float]:
        out = []
        for _ in range(self.args.lookups):
            c = self.rpc(random.choice(self.nodes))
            t0 = time.monotonic()
            c.call("locate", f"bench{random.randrange(self.args.puts)}")
            out.append(time.monotonic() - t0)
        return out

    def joiner(self) -> float:
        p = NodeProcess(f"s{self.n:03d}", self.root / f"s{self.n:03d}",
                        peers=[random.choice(self.nodes).rpc], extra=self.extra)
        t0 = time.monotonic()
        p.start(120)
        self.nodes.append(p)
        want = [f"bench{i}" for i in range(self.args.puts)]
        while True:
            # synced: it lists every member alive and finds every dataset (a lookup each:
            # in DHT mode there is nothing to list but what the DHT holds)
            if self.members_alive(p) == self.n + 1 and all(self.found(p, w) for w in want):
                return time.monotonic() - t0
            if time.monotonic() - t0 > 120:
                return float("inf")
            gevent.sleep(0.05)

    def found(self, node: NodeProcess, name: str) -> bool:
        try:
            self.rpc(node).call("locate", name)
            return True
        except hpcflow.DatasetNotFound:
            return False

    def close(self) -> None:
        for c in [*self.clients.values(), *self.rpcs.values()]:
            c.close()
        for p in self.nodes:
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
        for p in self.nodes:
            p.kill(timeout_s=30)


class NotFormed(Exception):
    """The cluster did not form in time; the message says what was missing."""


def _phase(n: int, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, printed to stderr as it comes; None (and why, on stderr) if it failed."""
    try:
        value = fn()
    except (hpcflow.HpcflowError, gevent.Timeout) as exc:
        print(f"N={n}: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    print(f"N={n}: {what}: {value}", file=sys.stderr)
    return value


def _pct(values: list[float] | None, q: float) -> float | None:
    return percentile(values, q) if values else None


def _f(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"catscale{n}-") as tmp:
        b = Bench(Path(tmp), n, args)
        try:
            try:
                formed, converged = b.form()
            except NotFormed as exc:
                print(str(exc), file=sys.stderr)
                return {"n": n, "failed": str(exc).splitlines()[0]}
            print(f"N={n}: formed in {formed:.1f} s ({converged:.1f} s after the last was "
                  "ready)", file=sys.stderr)
            if args.settle:  # forming's own load (its 1-min average) dies down first
                gevent.sleep(args.settle)
                print(f"N={n}: measuring after {args.settle:g} s more ({machine()})",
                      file=sys.stderr)
            # Each phase on its own: one that fails (a starved daemon stops answering)
            # leaves a "-" in its cells, and the others are still printed.
            idle = _phase(n, "idle", b.idle) or {}
            vis = _phase(n, "put->all", lambda: [b.visible(i) for i in range(args.puts)])
            look = _phase(n, "locate", b.lookups)
            joined = _phase(n, "joiner", b.joiner)
            return {"n": n, "form": formed, "conv": converged, **idle,
                    "vis50": _pct(vis, 50), "vis99": _pct(vis, 99),
                    "put50": _pct(b.put_s, 50),
                    "look50": _pct(look, 50), "look99": _pct(look, 99),
                    "join": joined, "load": os.getloadavg()[0]}
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
    ap.add_argument("--wait-sample", type=int, default=0, metavar="K",
                    help="put->all: only K random nodes wait for each put (0: all)")
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="wait S s once formed before measuring (the 1-min load average "
                    "of forming 256 decays meanwhile)")
    ap.add_argument("--batch", type=int, default=16,
                    help="daemons launched together, each batch once the last is up (0: all)")
    ap.add_argument("--via", choices=["seed", "random"], default="seed",
                    help="join through the seed or a random daemon already up")
    ap.add_argument("--absorb", type=float, default=0.0, metavar="S",
                    help="after each batch, wait up to S s until the seed lists it alive")
    ap.add_argument("--ttl", type=float, default=0.0,
                    help="the daemons' --ttl (default theirs: 3.5 s); an overloaded host "
                    "makes live members silent for longer")
    ap.add_argument("--sim", action="store_true", help="also the simulated 1,000 and 10,000")
    args = ap.parse_args(argv)
    print(f"start: {machine()}", file=sys.stderr)
    rows = [run_size(int(s), args) for s in args.sizes.split(",") if s]
    print(f"\ncatalog={args.catalog}, heartbeat {args.heartbeat:g} s, ttl "
          f"{args.ttl or 'default'}, batches of {args.batch or 'all'} through {args.via}"
          f"{f' absorbed (<= {args.absorb:g} s)' if args.absorb else ''}, "
          f"{f'measured {args.settle:g} s after forming, ' if args.settle else ''}"
          f"{f'put->all over {args.wait_sample} random nodes, ' if args.wait_sample else ''}"
          f"{os.cpu_count()} cores, "
          f"{machine()} at the end\n")
    print("| daemons | form s (after all ready) | put->all p50 / p99 ms (the put p50) "
          "| locate p50 / p99 ms "
          "| idle CPU % per daemon (all) | RSS MB (max) | PSS MB | threads | fds | msgs/s "
          "| bytes/s | joiner synced s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['n']} | not formed: {r['failed']} |" + " - |" * 11)
            continue
        g = r.get
        print(f"| {r['n']} | {r['form']:.1f} ({r['conv']:.1f}) | {_f(g('vis50'), '.0f', 1e3)} / "
              f"{_f(g('vis99'), '.0f', 1e3)} ({_f(g('put50'), '.0f', 1e3)}) "
              f"| {_f(g('look50'), '.1f', 1e3)} / {_f(g('look99'), '.1f', 1e3)} "
              f"| {_f(g('cpu_pct'), '.2f')} ({_f(g('cpu_all'), '.0f')}) "
              f"| {_f(g('rss'), '.0f')} ({_f(g('rss_max'), '.0f')}) | {_f(g('pss'), '.0f')} "
              f"| {_f(g('threads'), '.0f')} | {_f(g('fds'), '.0f')} "
              f"| {_f(g('msgs'), '.1f')} | {_f(g('bytes'), '.0f')} | {_f(g('join'), '.1f')} "
              f"| {r['load']:.1f} |")
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
