"""DHT catalog lookup latency on loopback, for ``bench/catalog_scale.py`` (issue 12).

:func:`lookup_latency` starts ``n`` real kademlia nodes (hpcflow's
:class:`~hpcflow.catalog.dht.facade.DhtFacade`, each its own thread, asyncio
loop and UDP socket on 127.0.0.1, with the catalog's storage), joins them,
has "holders" write the pointers and merged index entries of ``names``
partitioned datasets exactly as :class:`~hpcflow.catalog.dht.catalog.DhtCatalog`
does, and times what a node's catalog does for a name it has not cached:

* ``index``: one DHT lookup of ``idx/NAME`` (every replica's value collected);
* ``name``: the whole lookup -- the index, then the pointers it lists, concurrently.

All nodes share this process (and its GIL): on 2 cores at 64 nodes the figures
include thread scheduling, so they are an upper bound for one lookup between
separate daemons.  Run ``python3 bench/_dht.py`` for 16 and 64 nodes.

:func:`daemon_idle_cost` starts real daemons in either catalog mode and
measures each one's idle CPU and RSS (``--daemons N``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent

from hpcflow.catalog.dht import keys as K
from hpcflow.catalog.dht.facade import DhtFacade
from hpcflow.catalog.dht.storage import PointerStorage
from hpcflow.catalog.dht.values import (
    decode_value,
    encode_value,
    index_body,
    make_entry,
    merge,
    parts_of,
    pointer_body,
)
from hpcflow.catalog.record import DatasetRecord


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def lookup_latency(n: int, names: int = 32, parts: int = 4, lookups: int = 200,
                   seed: int = 1) -> dict[str, Any]:
    """Start ``n`` DHT nodes, store ``names`` datasets of ``parts`` parts (each part on
    its own holder), then time ``lookups`` index and whole-name lookups from random
    nodes.  Returns p50/p99 in milliseconds and how long joining and writing took."""
    rng = random.Random(seed)
    nodes: list[DhtFacade] = []
    try:
        t0 = time.monotonic()
        for _ in range(n):
            f = DhtFacade(PointerStorage(), rpc_timeout_s=2.0, call_timeout_s=60.0)
            f.start()
            nodes.append(f)
        seedaddr = [("127.0.0.1", nodes[0].port)]
        for f in nodes[1:]:
            f.bootstrap(seedaddr)
        for f in nodes:  # a second round, as the node's maintenance does while thin
            f.bootstrap([("127.0.0.1", nodes[rng.randrange(n)].port)])
        joined = time.monotonic() - t0
        epoch = time.time_ns()
        t1 = time.monotonic()
        writes = []
        for i in range(names):
            name = f"D{i}"
            held: dict[int, list[int]] = {}
            for p in range(parts):
                held.setdefault(rng.randrange(n), []).append(p)
            for holder, mine in held.items():  # as DhtCatalog writes: a pointer per part,
                who = f"h{holder}"  # one index entry per holder listing all its parts
                ikey = K.index_key(name)
                items = [(ikey, encode_value([make_entry(ikey, who, (epoch, 1),
                                                         index_body(list(mine)), None)]))]
                for p in mine:
                    rec = DatasetRecord(name, p, who, (1000, 3), "<f8", 24_000, "xxh3:00",
                                        4096, nparts=parts)
                    pkey = K.pointer_key(name, p, who)
                    items.append((pkey, encode_value([make_entry(pkey, who, (epoch, 2 + p),
                                                                 pointer_body(rec), None)])))
                writes.append(gevent.spawn(nodes[holder].set_many, items))
        gevent.joinall(writes, raise_error=True)
        wrote = time.monotonic() - t1
        index_ms, name_ms, complete = [], [], 0
        for _ in range(lookups):
            reader = nodes[rng.randrange(n)]
            name = f"D{rng.randrange(names)}"
            ikey = K.index_key(name)
            t = time.perf_counter()
            values = reader.get_many([ikey])[ikey]
            index_ms.append((time.perf_counter() - t) * 1000)
            entries = merge([e for v in values for e in decode_value(v, None, ikey)])
            pkeys = [K.pointer_key(name, p, e.writer) for e in entries for p in parts_of(e)]
            got = reader.get_many(pkeys)
            name_ms.append((time.perf_counter() - t) * 1000)
            complete += len({p for e in entries for p in parts_of(e)}) == parts and all(
                got[k] for k in pkeys)
        return {"nodes": n, "names": names, "parts": parts, "lookups": lookups,
                "join_s": round(joined, 2), "write_s": round(wrote, 2),
                "index_p50_ms": round(statistics.median(index_ms), 2),
                "index_p99_ms": round(_percentile(index_ms, 99), 2),
                "name_p50_ms": round(statistics.median(name_ms), 2),
                "name_p99_ms": round(_percentile(name_ms, 99), 2),
                "complete": complete}
    finally:
        for f in nodes:
            f.stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def daemon_idle_cost(n: int, mode: str, idle_s: float = 10.0,
                     heartbeat_s: float = 1.0) -> dict[str, Any]:
    """Start ``n`` real daemons in catalog ``mode`` (each joining through the previous),
    wait until they see each other, put one dataset, then measure each daemon's CPU
    over ``idle_s`` seconds of idleness and its RSS.  Per-daemon averages."""
    import numpy as np

    from hpcflow.client.client import connect
    from hpcflow.harness.local import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        cl = LocalCluster(Path(tmp), extra=["--catalog", mode, "--log-level", "WARNING",
                                            "--heartbeat", str(heartbeat_s)])
        with cl:
            t0 = time.monotonic()
            for i in range(n):
                cl.add(f"n{i}")
            cl.wait_converged(120)
            formed = time.monotonic() - t0
            with connect(cl.nodes["n0"].rpc) as c:
                c.put("IDLE", np.zeros((10, 3)))
            with connect(cl.nodes[f"n{n - 1}"].rpc) as c:
                c.wait_for("IDLE", 30)
            time.sleep(2.0)  # settle after the put
            pids = [p.proc.pid for p in cl.nodes.values() if p.proc is not None]
            before = [_cpu_s(pid) for pid in pids]
            time.sleep(idle_s)
            cpu = [(_cpu_s(pid) - b) / idle_s for pid, b in zip(pids, before, strict=True)]
            rss = [_rss_mb(pid) for pid in pids]
        return {"mode": mode, "daemons": n, "formed_s": round(formed, 1),
                "idle_cpu_pct_per_daemon": round(100 * statistics.mean(cpu), 2),
                "idle_cpu_pct_all": round(100 * sum(cpu), 1),
                "rss_mb_per_daemon": round(statistics.mean(rss), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--daemons", type=int, nargs="*", default=[],
                    help="also measure idle CPU and RSS of this many real daemons per mode")
    a = ap.parse_args()
    for n in a.nodes:
        print(json.dumps(lookup_latency(n, lookups=a.lookups)), flush=True)
    for n in a.daemons:
        for mode in ("replicated", "dht"):
            print(json.dumps(daemon_idle_cost(n, mode)), flush=True)


if __name__ == "__main__":
    main()
