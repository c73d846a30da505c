"""The ``hpcflow`` command: run a node daemon, and talk to one."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _version
from .config import NodeConfig
from .errors import ConfigError, HpcflowError, InvalidData, StoreError, to_wire


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _progress(label: str, enabled: bool) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    t0, last = time.monotonic(), [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2 and done < total:
            return
        last[0] = now
        rate = done / max(now - t0, 1e-9)
        pct = 100.0 * done / total if total else 100.0
        print(f"\r{label}: {_size(done)} / {_size(total)} ({pct:.0f}%, {_size(rate)}/s)",
              end="" if done < total else "\n", file=sys.stderr, flush=True)
    return show


def _record_row(r: dict[str, Any]) -> str:
    part = "-" if r["part"] is None else str(r["part"])
    shape = "x".join(str(n) for n in r["shape"]) or "scalar"
    return (f"{r['name']:<24} {part:>4}  {r['owner']:<12} {shape:<18} {r['dtype']:<6} "
            f"{_size(r['nbytes']):>10}  v{r['version']}")


def cmd_node(a: argparse.Namespace) -> int:
    from .daemon.node import run_node

    overrides = {
        "name": a.name, "data_dir": a.data_dir, "listen": a.listen, "pub": a.pub,
        "bulk": a.bulk, "advertise": a.advertise, "peers": a.peer, "catalog": a.catalog,
        "heartbeat_s": a.heartbeat, "ttl_s": a.ttl, "ops": a.ops, "log_level": a.log_level,
        "memory_budget": a.memory_budget, "keys": a.keys,
        "peers_from": a.peers_from, "peers_file": a.peers_file, "metrics": a.metrics,
    }
    config = NodeConfig.load(a.config, overrides)
    return run_node(config)


def cmd_keygen(a: argparse.Namespace) -> int:
    from .rpc.auth import keygen

    written = keygen(a.keydir)
    for path in written:
        print(path)
    print(f"nodes need node.key_secret and client.key, clients client.key_secret and "
          f"node.key: start every node with --keys {a.keydir}", file=sys.stderr)
    return 0


def _client(a: argparse.Namespace) -> Any:
    from .client.client import connect

    return connect(a.node, timeout_s=a.timeout, keys=a.keys)


def _source(source: str, dataset: str | None) -> tuple[str, str | None]:
    """``FILE`` or ``FILE:/path/in/hdf5`` (a file that exists under the whole name wins)."""
    path, sep, inner = source.partition(":/")
    if not sep or os.path.exists(source):
        return source, dataset
    if dataset is not None:
        raise InvalidData(f"{source} names a path inside the file and so does --dataset "
                          f"{dataset}: give one")
    return path, "/" + inner


def cmd_put(a: argparse.Namespace) -> int:
    source, dataset = _source(a.source, a.dataset)
    show = _progress(f"put {a.name}", not a.json and sys.stderr.isatty())
    if a.split is None and a.nodes is not None:
        raise InvalidData("--nodes goes with --split N (the parts are spread over them)")
    with _client(a) as c:
        if a.split is not None:
            if a.part is not None or a.nparts is not None:
                raise InvalidData("--split N makes parts 0..N-1 itself: no --part/--nparts")
            nodes = [n.strip() for n in (a.nodes or c.node).split(",") if n.strip()]
            recs = c.put_split(a.name, source, dataset=dataset, rows=a.rows, nodes=nodes,
                               nparts=a.split, overwrite=a.overwrite, progress=show)
        else:
            recs = [c.put(a.name, source, dataset=dataset, rows=a.rows, part=a.part,
                          nparts=a.nparts, overwrite=a.overwrite, progress=show)]
    if a.json:
        print(json.dumps(recs[0].to_wire() if a.split is None else
                         [r.to_wire() for r in recs]))
        return 0
    for rec in recs:
        print(f"stored {rec.key} on {rec.owner}: {'x'.join(map(str, rec.shape))} "
              f"{rec.dtype}, {_size(rec.nbytes)}, {rec.checksum}")
    return 0


def _unwind_on_signals() -> None:
    """SIGINT and SIGTERM end the command through the ``finally`` clauses that remove a
    half-written output (SIGTERM's default action would leave it behind): as SystemExit
    thrown into the main greenlet where it next waits for I/O, which gevent's hub does
    without printing it.  Not raised by the handler itself: that lands in whatever code
    runs at the moment, and inside h5py the exception was swallowed (the get then waited
    on for its stopped holder) or came out as a TypeError with a traceback."""
    import gevent

    hub, main = gevent.get_hub(), gevent.getcurrent()
    caught: list[int] = []

    def unwind(signum: int, frame: object) -> None:
        if not caught:  # a second Ctrl-C must not cut the clean-up short
            caught.append(signum)
            hub.loop.run_callback(main.throw, SystemExit(128 + signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, unwind)


def _save_npy(out: Path, arr: Any) -> None:
    from .client.client import partial_path

    tmp = partial_path(out)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def cmd_get(a: argparse.Namespace) -> int:
    from .client.client import check_output_path, split_h5path

    out = check_output_path(a.out)  # user errors first, before anything moves
    if out.suffix != ".npy" and a.h5path is not None:
        split_h5path(a.h5path)
    if out.suffix == ".npy" and a.h5md:
        raise InvalidData(f"{out} is a .npy file: --h5md writes HDF5 (name it .h5md)")
    show = _progress(f"get {a.name}", not a.json and sys.stderr.isatty())
    t0 = time.monotonic()
    _unwind_on_signals()
    with _client(a) as c:
        if out.suffix == ".npy":
            arr = c.fetch(a.name, part=a.part, progress=show)
            _save_npy(out, arr)
            shape, dtype = arr.shape, arr.dtype
        else:
            import h5py

            c.fetch_to(a.name, out, part=a.part, h5path=a.h5path, progress=show,
                       h5md=True if a.h5md else None)
            with h5py.File(out, "r") as f:  # the one dataset fetch_to tagged with its name
                found: list[Any] = []
                f.visititems(lambda _, o: found.append(o) if isinstance(o, h5py.Dataset)
                             and o.attrs.get("hpcflow_name") == a.name else None)
                shape, dtype = found[0].shape, found[0].dtype
        received = sum(c.traffic.bytes_received.values())
        # the holders the bytes actually came from (after any fail-over)
        holders = sorted(k for k, v in c.traffic.bytes_received.items() if v)
    result = {"name": a.name, "path": str(out), "bytes": received, "from": holders,
              "shape": list(shape), "dtype": dtype.str,
              "seconds": round(time.monotonic() - t0, 3), "checksum_verified": True}
    what = f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
    print(json.dumps(result) if a.json else
          f"wrote {out} ({what}, {_size(received)} from {', '.join(holders)}, checksum verified)"
          if holders else f"wrote {out} ({what}: empty, nothing to transfer)")
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    with _client(a) as c:
        recs = [r.to_wire() for r in c.catalog(include_dead=a.all)]
        nodes = c.nodes()
    if a.pattern:
        recs = [r for r in recs if a.pattern in r["name"]]
    alive = {n["name"]: n["alive"] for n in nodes}
    for r in recs:
        r["alive"] = alive.get(r["owner"], False)
    if a.json:
        print(json.dumps({"nodes": nodes, "datasets": recs}))
        return 0
    print(f"{'NAME':<24} {'PART':>4}  {'NODE':<12} {'SHAPE':<18} {'DTYPE':<6} {'SIZE':>10}  VER")
    for r in recs:
        print(_record_row(r) + ("" if r["alive"] else "  (node dead)"))
    live = sorted(n["name"] for n in nodes if n["alive"])
    dead = sorted(n["name"] for n in nodes if not n["alive"])
    print(f"{len(recs)} parts; nodes alive: {', '.join(live)}"
          + (f"; dead: {', '.join(dead)}" if dead else ""))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    with _client(a) as c:
        info = c.info()
        info["stats"] = c.stats()
    if a.json:
        print(json.dumps(info))
        return 0
    t = info["stats"]["traffic"]
    ep = info["endpoints"]
    print(f"node {info['name']} (hpcflow {info['version']}, pid {info['pid']}, "
          f"catalog {info['catalog_mode']})")
    print(f"  rpc {ep['rpc']}  pub {ep['pub']}  bulk {ep['bulk']}")
    print(f"  load: {info['load']['active']} active operations, "
          f"loadavg {info['load']['loadavg']:.2f}")
    print(f"  stores {info['datasets']} dataset parts ({_size(info['bytes_stored'])}); "
          f"catalog lists {info['catalog_entries']} on live nodes")
    print(f"  peers alive: {', '.join(info['peers_alive']) or 'none'}"
          + (f"; dead: {', '.join(info['peers_dead'])}" if info["peers_dead"] else ""))
    peers = sorted(set(t["bytes_sent"]) | set(t["bytes_received"]))
    for peer in peers:
        print(f"  {peer:<16} sent {_size(t['bytes_sent'].get(peer, 0)):>10}   "
              f"received {_size(t['bytes_received'].get(peer, 0)):>10}")
    if t["chunk_retries"]:
        print(f"  chunks re-requested after a failed checksum: {t['chunk_retries']}")
    ops = info.get("ops") or {}
    print(f"  ops ({len(ops)}): " + ", ".join(f"{k} {v[:8]}" for k, v in sorted(ops.items())))
    return 0


def cmd_wait_ready(a: argparse.Namespace) -> int:
    from .client.status import wait_ready

    if not (a.timeout > 0 and a.timeout < float("inf")):
        raise InvalidData(f"--timeout must be a positive number of seconds, not {a.timeout}")
    info = wait_ready(a.addr, a.timeout, keys=a.keys, members=a.members)
    print(json.dumps({"name": info["name"], "ready": True,
                      "members_alive": info["members_alive"]}) if a.json else
          f"node {info['name']} ready ({info['members_alive']} members alive)")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    from .client.status import cluster_status

    with _client(a) as c:
        st = cluster_status(c, keys=a.keys, timeout_s=min(a.timeout, 5.0))
    if a.json:
        print(json.dumps(st))
        return 0
    print(f"cluster seen from {st['node']} (catalog {st['catalog_mode']}): "
          f"{st['alive']} alive, {st['dead']} dead")
    print(f"  {'NODE':<16} {'STATE':<5} {'LOAD':>4} {'DATASETS':>8} {'HELD':>10}  "
          f"{'CATALOG':<10} {'OPS':>3}  RPC")
    for m in st["members"]:
        load = m["load"].get("active", "-") if m["alive"] else "-"
        print(f"  {m['name']:<16} {'alive' if m['alive'] else 'dead':<5} {load:>4} "
              f"{m['datasets']:>8} {_size(m['bytes_held']):>10}  "
              f"{m.get('catalog_mode') or '-':<10} {len(m['ops']):>3}  {m['rpc']}")
    for m in st["members"]:
        if m.get("error"):
            print(f"  {m['name']}: did not answer: {m['error']}")
    for name, ops in st["ops_differ"].items():
        print(f"  ops that differ on {name}: "
              + ", ".join(f"{op} ({why})" for op, why in sorted(ops.items()))
              + "; the planner sends it no step using them")
    for m in st["members"]:
        peers = sorted(set(m.get("sent", {})) | set(m.get("received", {})))
        for peer in peers:
            print(f"  {m['name']:<16} -> {peer:<16} sent {_size(m['sent'].get(peer, 0)):>10}"
                  f"   received {_size(m['received'].get(peer, 0)):>10}")
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    with _client(a) as c:
        if a.all_parts:
            recs = c.delete(a.name, a.part, all_parts=True)
            if a.json:
                print(json.dumps([r.to_wire() for r in recs]))
            for rec in [] if a.json else recs:
                print(f"deleted {rec.key} from {rec.owner}")
            return 0
        rec = c.delete(a.name, a.part)
    print(json.dumps(rec.to_wire()) if a.json else f"deleted {rec.key} from {rec.owner}")
    return 0


def _params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; values are parsed as JSON when they can be (numbers, lists, true)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidData(f"--param wants key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            items = value.split(",")
            try:  # range=0,1 is read as [0, 1]
                out[key] = [json.loads(x) for x in items] if len(items) > 1 else value
            except json.JSONDecodeError:
                out[key] = value
    return out


def _run_or_explain(a: argparse.Namespace, execute: bool) -> int:
    with _client(a) as c:
        c.flow.objective, c.flow.method = a.objective, a.method
        h = c.run(a.op, *a.inputs, **_params(a.param))
        if not execute:
            view = c.flow.plan(h, a.method)
            print(json.dumps(view.raw) if a.json else view.explain())
            return 0
        arr: Any = None
        if a.save and not a.output:
            # saved, not shown: planned to stay where it is made (a split result moves
            # nothing), so it is not fetched either
            h.save(a.save, overwrite=a.overwrite, partitioned=a.partitioned)
            saved = c.array(a.save)
            shape, dtype = tuple(saved.shape), np.dtype(saved.dtype)
        else:
            arr = h.fetch()
            shape, dtype = arr.shape, arr.dtype
            if a.save:
                h.save(a.save, overwrite=a.overwrite, partitioned=a.partitioned)
        if a.output:
            np.save(a.output, arr)
        report = c.report()
        assert h.plan is not None
        result = {"op": a.op, "inputs": a.inputs, "shape": list(shape), "dtype": dtype.str,
                  "bytes_planned": report["bytes_planned"], "bytes_moved": report["bytes_moved"],
                  "moved": report["moved"], "saved_as": a.save, "output": a.output,
                  "values": None if arr is None or a.output else _json_values(arr),
                  "plan": h.plan.raw}
        if a.json:
            print(json.dumps(result))
        else:
            print(h.plan.explain())
            print(f"result: {'x'.join(map(str, shape)) or 'scalar'} {dtype}; moved "
                  f"{_size(report['bytes_moved'])} (planned {_size(report['bytes_planned'])})"
                  + (f"; saved as {a.save}" if a.save else "")
                  + (f"; written to {a.output}" if a.output else ""))
            if arr is None:
                print(f"(not fetched: hpcflow get {a.save} FILE, or --output FILE.npy)")
            elif not a.output:
                print(arr)  # numpy's summary past 1000 values
                if arr.size > np.get_printoptions()["threshold"]:
                    print("(every value: --json, or --output FILE.npy)")
    return 0


def _json_values(arr: np.ndarray[Any, Any]) -> Any:
    """Every value of ``arr`` as nested JSON lists (``{"real": ..., "imag": ...}`` for a
    complex array; NaN and infinities as Python's json writes them: NaN, Infinity)."""
    if arr.dtype.kind == "c":
        return {"real": arr.real.tolist(), "imag": arr.imag.tolist()}
    return arr.tolist()


def cmd_lineage(a: argparse.Namespace) -> int:
    from .catalog.lineage import Lineage
    from .client.lineage import describe

    with _client(a) as c:
        info = describe(c, a.name)
    if a.json:
        print(json.dumps(info))
        return 0
    d = info["derivation"]
    if d is None:
        print(f"{a.name}: put, not derived (no lineage)")
    else:
        print("\n".join(Lineage.from_wire(d).render(a.name)))
    for p in info["parts"]:
        held = ", ".join(h["node"] + ("" if h["alive"] else " (dead)") for h in p["holders"])
        print(f"  part {'whole' if p['part'] is None else p['part']}: rows {p['rows']}, "
              f"checksum {p['checksum'][:16]}, on {held}")
    if info["missing"]:
        print(f"  lost (no live holder): parts {info['missing']}: hpcflow recompute {a.name}")
    return 0


def cmd_recompute(a: argparse.Namespace) -> int:
    with _client(a) as c:
        reply = c.recompute(a.name)
    if a.json:
        print(json.dumps({"name": a.name, "restored": reply["restored"],
                          "moved": reply["moved"]}))
    elif not reply["restored"]:
        print(f"{a.name}: every part has a live holder, nothing to recompute")
    else:
        print(f"{a.name}: recomputed and stored parts {reply['restored']} "
              f"({_size(sum(reply['moved'].values()))} moved to store them)")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    return _run_or_explain(a, execute=True)


def cmd_explain(a: argparse.Namespace) -> int:
    return _run_or_explain(a, execute=False)


def cmd_replay(a: argparse.Namespace) -> int:
    from .harness import report
    from .harness.centralised import check_threshold
    from .harness.replay import APPROACHES, check, replay
    from .harness.scenario import Scenario, list_scenarios, load_scenario

    check_threshold(a.threshold)
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            need = report.MATPLOTLIB_REQUIREMENT
            raise ConfigError(f"--plot needs matplotlib: pip install '{need}'"
                              " (or the package's [plot] extra)") from None
    paths: list[Path] = []
    for p in a.scenarios:
        if Path(p).is_dir():
            found = list_scenarios(p)
            if not found:
                raise ConfigError(f"{p}: no scenario files (*.toml) in this directory")
            paths += found
        else:
            paths.append(Path(p))
    # Every file is checked before anything runs: all problems at once, in a second.
    scenarios: list[Scenario] = []
    bad: list[str] = []
    for path in paths:
        try:
            scenarios.append(load_scenario(path))
        except HpcflowError as exc:
            bad.append(str(exc))
    if bad:
        for msg in bad:
            print(f"hpcflow: error: {msg}", file=sys.stderr)
        print(f"hpcflow: {len(bad)} of {len(paths)} scenario file(s) invalid; nothing was run",
              file=sys.stderr)
        return 1
    approaches = list(APPROACHES) if a.approach == "all" else [a.approach]
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not a.quiet else None
    docs, by_scenario, failed = [], {}, False
    for sc in scenarios:
        try:
            sc, results = replay(sc, approaches, netns=a.netns, threshold=a.threshold,
                                 progress=say or (lambda m: None), catalog=a.catalog)
        except HpcflowError as exc:  # e.g. no namespaces here: the other scenarios still run
            print(f"hpcflow: error: {sc.file}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(report.format_table(sc, results))
        print()
        problems = check(sc, results)
        for msg in problems:
            print(f"PROBLEM: {msg}", file=sys.stderr)
        failed |= bool(problems)
        docs.append(report.to_json(sc, results))
        by_scenario[sc.name] = results
    if a.json and docs:
        out = docs[0] if len(paths) == 1 else {"scenarios": docs}
        Path(a.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}", file=sys.stderr)
    if a.plot and by_scenario:
        report.plot(by_scenario, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .harness.demo import run_demo

    return run_demo(nodes=a.nodes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"hpcflow {_version.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    n = sub.add_parser("node", help="run a node daemon (logs to stderr; stop with Ctrl-C)")
    n.add_argument("--config", type=Path, help="TOML file with any of the options below")
    n.add_argument("--name", help="node name (default: HOSTNAME-PORT)")
    n.add_argument("--data-dir", type=Path, help="where this node keeps its HDF5 datasets")
    n.add_argument("--listen", help="RPC endpoint HOST:PORT (default 127.0.0.1:7101); the "
                   "catalog publisher and bulk channel default to PORT+1 and PORT+2")
    n.add_argument("--pub", help="catalog publisher endpoint (default PORT+1)")
    n.add_argument("--bulk", help="bulk data endpoint (default PORT+2)")
    n.add_argument("--advertise", help="host name/IP peers should use to reach this node")
    n.add_argument("--peer", action="append", default=[], help="RPC endpoint of a peer to "
                   "join through (repeatable; one is enough)")
    n.add_argument("--catalog", choices=["replicated", "dht"], help="replicated (default): "
                   "every node holds the whole catalog; dht: pointers in a Kademlia DHT on "
                   "UDP, port = the --listen port (README, Architecture)")
    n.add_argument("--heartbeat", type=float, help="heartbeat interval in s (default 1)")
    n.add_argument("--ttl", type=float, help="silence after which a peer is dead (default 3.5)")
    n.add_argument("--ops", action="append", default=[], help="module with user operations")
    n.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    n.add_argument("--memory-budget", type=int, metavar="BYTES",
                   help="bytes of workflow intermediates held in memory; more are spilled "
                        "to unsynced files (default: a quarter of RAM)")
    n.add_argument("--keys", metavar="KEYDIR", help="the cluster's CURVE keys (hpcflow "
                   "keygen); env HPCFLOW_KEYS; without: no authentication")
    n.add_argument("--peers-from", choices=["slurm"], help="peers are the other hosts of "
                   "this SLURM job (SLURM_JOB_NODELIST), on this node's port; the name "
                   "defaults to the host name, --listen to 0.0.0.0:7101")
    n.add_argument("--peers-file", metavar="PATH", help="file of peers, HOST or HOST:PORT "
                   "per line (e.g. written by a job script)")
    n.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over "
                   "HTTP there (/metrics)")
    n.set_defaults(fn=cmd_node)

    k = sub.add_parser("keygen", help="make a cluster's CURVE keys (node and client keypairs)")
    k.add_argument("keydir", type=Path, help="directory to write them into (made 0700)")
    k.set_defaults(fn=cmd_keygen)

    def client_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node", default=os.environ.get("HPCFLOW_NODE", "127.0.0.1:7101"),
                        help="RPC endpoint of the node to talk to (env HPCFLOW_NODE)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
        sp.add_argument("--keys", metavar="KEYDIR", help="the cluster's keys (needs "
                        "client.key_secret and node.key; env HPCFLOW_KEYS)")

    s = sub.add_parser("put", help="store an array from .npy or HDF5 on a node")
    client_opts(s)
    s.add_argument("name")
    s.add_argument("source", help=".npy file or HDF5 file (H5MD included), or "
                   "FILE:/path/in/hdf5")
    s.add_argument("--dataset", help="path of the array inside the HDF5 file")
    s.add_argument("--rows", metavar="LO:HI", help="store only rows [LO, HI) of the source "
                   "(LO or HI may be left out); nothing else is read")
    s.add_argument("--part", type=int, help="row-part index of a partitioned dataset")
    s.add_argument("--nparts", type=int, help="total number of parts (optional)")
    s.add_argument("--split", type=int, metavar="N", help="spread the rows over --nodes as "
                   "N parts (part k on node k mod len(nodes))")
    s.add_argument("--nodes", metavar="A,B,C", help="with --split: member names to put "
                   "the parts on (default: the --node itself)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing version")
    s.set_defaults(fn=cmd_put)

    g = sub.add_parser("get", help="fetch a dataset into an HDF5 (or .npy) file")
    client_opts(g)
    g.add_argument("name")
    g.add_argument("out", help="output file: .npy, or HDF5 for anything else")
    g.add_argument("--part", type=int)
    g.add_argument("--h5path", help="dataset path in the output HDF5 file (default /data); "
                   "with H5MD, the element (default: the one it was put from)")
    g.add_argument("--h5md", action="store_true",
                   help="write an H5MD element with step, time and units (default for .h5md)")
    g.set_defaults(fn=cmd_get)

    ls = sub.add_parser("ls", help="list every dataset on every live node")
    client_opts(ls)
    ls.add_argument("pattern", nargs="?", help="only names containing this")
    ls.add_argument("--all", action="store_true", help="include datasets on dead nodes")
    ls.set_defaults(fn=cmd_ls)

    i = sub.add_parser("info", help="node status, load, peers and traffic counters")
    client_opts(i)
    i.set_defaults(fn=cmd_info)

    w = sub.add_parser("wait-ready", help="block until a node answers (exit status 0), or "
                       "give up after --timeout (exit status 1)")
    w.add_argument("addr", nargs="?", default=os.environ.get("HPCFLOW_NODE", "127.0.0.1:7101"),
                   help="RPC endpoint of the node (env HPCFLOW_NODE)")
    w.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    w.add_argument("--members", type=int, default=0, metavar="N",
                   help="also wait until the node sees N members alive (itself included)")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.add_argument("--keys", metavar="KEYDIR", help="the cluster's keys (env HPCFLOW_KEYS)")
    w.set_defaults(fn=cmd_wait_ready)

    st = sub.add_parser("status", help="the whole cluster from one node: members, load, "
                        "data held, ops, traffic")
    client_opts(st)
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("rm", help="delete a dataset held by this node (--all-parts: from "
                       "every holder)")
    client_opts(r)
    r.add_argument("name")
    r.add_argument("--part", type=int)
    r.add_argument("--all-parts", action="store_true", help="delete every part (and copy) "
                   "of the dataset from every node holding one")
    r.set_defaults(fn=cmd_rm)

    for verb, fn, text in (("run", cmd_run, "run one operation where the planner says"),
                           ("explain", cmd_explain, "show the plan for one operation")):
        sp = sub.add_parser(verb, help=text)
        client_opts(sp)
        sp.add_argument("op")
        sp.add_argument("inputs", nargs="+", help="input dataset names")
        sp.add_argument("--param", action="append", default=[], help="op parameter k=v "
                        "(v parsed as JSON when possible), repeatable")
        sp.add_argument("--objective", choices=["bytes", "time"], default="bytes")
        sp.add_argument("--method", choices=["optimal", "greedy", "pull_all"],
                        default="optimal", help="planner: the exact optimum (default) or a "
                        "baseline, to compare")
        if verb == "run":  # explain runs nothing, so it has no result to keep or write
            sp.add_argument("--save", help="keep the result as a dataset with this name")
            sp.add_argument("--overwrite", action="store_true",
                            help="with --save: replace an existing dataset of that name")
            sp.add_argument("--output", help="write the result to this .npy file (else "
                            "--json prints every value)")
            how = sp.add_mutually_exclusive_group()
            how.add_argument("--partitioned", dest="partitioned", action="store_true",
                             default=None, help="with --save: keep each part on the node that "
                             "made it (the default for a split result)")
            how.add_argument("--gather", dest="partitioned", action="store_false",
                             help="with --save: store the result whole on the node connected to")
        sp.set_defaults(fn=fn)

    ln = sub.add_parser("lineage", help="how a saved dataset was derived (the tree back to "
                        "the datasets that were put) and where its parts are")
    client_opts(ln)
    ln.add_argument("name")
    ln.set_defaults(fn=cmd_lineage)

    rc = sub.add_parser("recompute", help="re-derive the parts of a saved dataset whose "
                        "holders are gone, from its lineage")
    client_opts(rc)
    rc.add_argument("name")
    rc.set_defaults(fn=cmd_recompute)

    from .harness.report import MESSAGES

    rp = sub.add_parser(
        "replay", help="replay scenario(s) under decentralised, centralised "
        "and NFS approaches and compare bytes moved and time",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay scenario(s) under each approach and print, per approach, bytes "
        "moved (total and per link), wall time and messages, and whether the result matches "
        "numpy.  Exits 1 if an approach failed, a result differs, or no approach asked for "
        "could run.",
        epilog="'messages' counts different things per approach:\n" + "\n".join(
            textwrap.fill(f"{name}: {text}", 78, initial_indent="  ", subsequent_indent="    ")
            for name, text in MESSAGES.items()))
    rp.add_argument("scenarios", nargs="+", help="scenario .toml file(s) or a directory of them")
    rp.add_argument("--approach", default="all",
                    choices=["all", "decentralised", "centralised", "nfs"])
    rp.add_argument("--json", help="write the results as JSON to this file")
    rp.add_argument("--plot", help="draw the comparison to this PNG (needs matplotlib)")
    rp.add_argument("--netns", action="store_true", help="one network namespace per host, "
                    "links shaped per the scenario (root only)")
    rp.add_argument("--threshold", type=int, default=3,
                    help="centralised: active operations per node before it is passed over "
                    "(>= 1, default 3)")
    rp.add_argument("--quiet", action="store_true", help="no progress on stderr")
    rp.add_argument("--catalog", default="replicated", choices=["replicated", "dht"],
                    help="the daemons' catalog mode (default replicated)")
    rp.set_defaults(fn=cmd_replay)

    d = sub.add_parser("demo", help="start a small local cluster, move data, tear it down")
    d.add_argument("--nodes", type=int, default=3)
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (HpcflowError, OSError) as exc:  # OSError: a file the user named, as a message
        name, msg = to_wire(exc) if isinstance(exc, HpcflowError) else (
            type(exc).__name__, str(exc))
        if getattr(args, "json", None) is True:  # --json as a flag, not replay's --json FILE
            print(json.dumps({"error": {"type": name, "message": msg}}))
        else:
            print(f"hpcflow: error: {msg} ({name})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
