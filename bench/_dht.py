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
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--lookups", type=int, default=200)
    a = ap.parse_args()
    for n in a.nodes:
        print(json.dumps(lookup_latency(n, lookups=a.lookups)), flush=True)


if __name__ == "__main__":
    main()
