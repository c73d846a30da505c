"""The whole cluster seen from one node (``hpcflow status``), and waiting for a node to
be ready (``hpcflow wait-ready``).

``cluster_status`` asks one node for its members, their load and advertised ops (from
the members' heartbeats) and the catalog (what each holds, dead members included),
then asks every live member for its own ``info`` and ``stats`` (catalog mode, bytes
sent and received per peer); a member that does not answer is listed with the error.
Ops whose definition hash differs between members, or that some members lack, are
named per member: the planner never sends a step to such a member.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import gevent
import gevent.pool

from ..config import timeout_scale
from ..errors import AuthenticationError, ConfigError, HpcflowError, PeerUnavailable
from .client import Client, connect

#: Members asked at once for their own info and stats.
FAN_OUT = 16


def op_differences(ops: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per member, the ops that differ from the rest: ``{node: {op: "missing" |
    "differs"}}``.  The reference definition of an op is the hash most members
    advertise (ties: the smallest hash, so every viewer agrees)."""
    names = sorted({op for table in ops.values() for op in table})
    out: dict[str, dict[str, str]] = {node: {} for node in ops}
    for op in names:
        counts = Counter(table[op] for table in ops.values() if op in table)
        ref = min(counts, key=lambda h: (-counts[h], h))
        for node, table in ops.items():
            if op not in table:
                out[node][op] = "missing"
            elif table[op] != ref:
                out[node][op] = "differs"
    return {node: d for node, d in out.items() if d}


def _member_detail(rpc: str, timeout_s: float, keys: Any) -> dict[str, Any]:
    try:
        with connect(rpc, timeout_s=timeout_s, keys=keys) as c:
            info, stats = c.info(), c.stats()
    except HpcflowError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    t = stats.get("traffic", {})
    return {"catalog_mode": info.get("catalog_mode"), "version": info.get("version"),
            "bytes_stored": info.get("bytes_stored"),
            "sent": t.get("bytes_sent", {}), "received": t.get("bytes_received", {})}


def cluster_status(c: Client, keys: Any = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """Every member as ``c``'s node sees it, with what each live member says itself."""
    info = c.info()
    nodes = c.nodes()
    held: dict[str, list[int]] = {}
    for r in c.catalog(include_dead=True):
        h = held.setdefault(r.owner, [0, 0])
        h[0] += 1
        h[1] += r.nbytes
    alive_ops = {n["name"]: dict(n.get("ops") or {}) for n in nodes if n["alive"]}
    differ = op_differences(alive_ops)
    members = []
    for n in sorted(nodes, key=lambda n: n["name"]):
        count, nbytes = held.get(n["name"], [0, 0])
        members.append({"name": n["name"], "alive": bool(n["alive"]), "rpc": n["rpc"],
                        "load": n.get("load") or {}, "datasets": count, "bytes_held": nbytes,
                        "ops": dict(n.get("ops") or {}),
                        "ops_differ": differ.get(n["name"], {})})
    live = [m for m in members if m["alive"]]
    pool = gevent.pool.Pool(FAN_OUT)
    jobs = [pool.spawn(_member_detail, m["rpc"], timeout_s, keys) for m in live]
    gevent.joinall(jobs)
    for m, job in zip(live, jobs, strict=True):
        m.update(job.value if job.successful() else {"error": str(job.exception)})
    return {"node": info["name"], "catalog_mode": info["catalog_mode"],
            "members": members,
            "alive": sum(m["alive"] for m in members),
            "dead": sum(not m["alive"] for m in members),
            "ops_differ": {m["name"]: m["ops_differ"] for m in members if m["ops_differ"]}}


def wait_ready(address: str, timeout_s: float, keys: Any = None,
               members: int = 0) -> dict[str, Any]:
    """Block until the node at ``address`` answers (and sees ``members`` live members,
    itself included); its ``info``.  ``PeerUnavailable`` after ``timeout_s`` (scaled by
    ``HPCFLOW_TIMEOUT_SCALE``); wrong keys fail at once (they will not get better)."""
    deadline = time.monotonic() + timeout_s * timeout_scale()
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            why = f": {last}" if last else ""
            raise PeerUnavailable(f"node at {address} not ready after {timeout_s:g} s{why}")
        try:
            # connect() scales its timeout itself
            with connect(address, timeout_s=max(0.05, min(2.0, remaining) / timeout_scale()),
                         keys=keys) as c:
                while True:
                    info = c.info()
                    alive = sum(1 for n in c.nodes() if n["alive"])
                    if alive >= members:
                        return {**info, "members_alive": alive}
                    last = PeerUnavailable(f"{alive} of {members} members alive")
                    if time.monotonic() > deadline:
                        break
                    gevent.sleep(0.1)
        except (AuthenticationError, ConfigError):
            raise
        except HpcflowError as exc:
            last = exc
            gevent.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


__all__ = ["cluster_status", "op_differences", "wait_ready"]
