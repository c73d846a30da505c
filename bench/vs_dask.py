"""Benchmark (issue 10): hpcflow against Dask distributed, same hosts, same links.

Every scenario (``scenarios/*.toml`` plus the three of ``bench/scenarios/``:
an op that grows its data, a big result that must end on the initiator, a
chain of ten small steps) runs under both systems in the same run, on the
same emulated cluster:

* every scenario node is its own host, a network namespace joined to every
  other by a veth pair shaped with ``tc tbf`` (:class:`hpcflow.harness.netns.Topology`):
  the scenario's link rates, or ``--link-gbit`` for all links;
* **hpcflow**: one daemon per host, the data written into each holder's store
  before it starts (as ``hpcflow replay`` does); the script runs on the
  initiator's host and submits the scenario's steps as one lazy workflow;
* **Dask**: one scheduler on the initiator's host, one ``dask worker
  --nthreads 1 --nworkers 1 --no-nanny`` per host.  Each part of each dataset
  is generated on the worker of the node that holds it in the scenario
  (``client.submit(make_part, ..., workers=[addr])``: the same bytes the
  replay places), the dask arrays are built from those futures, each step is
  the equivalent dask.array computation (see :func:`dask_step`) and where it
  runs is left to Dask; the script, on the initiator's host like hpcflow's,
  gathers the result's chunks straight from the workers that computed them
  (``client.compute`` on the chunks, ``direct_to_workers``) and joins them,
  Dask's cheapest way; ``--dask-finalize`` uses plain ``.compute()``, which
  first concatenates every chunk on one worker (one more hop for the whole
  result: 49 MiB instead of 29 on fft-grow-3).

Each system runs ``--warmup`` untimed rounds and then ``--repeats`` timed ones
(medians reported); both results are checked against numpy's.  Measured per
round, the same way for both: the wall time in the script's process from
submission to the result in hand (hpcflow: ``fetch()``, planning included;
Dask: compute and gather, graph optimisation included; building the lazy
graph is outside), and the bytes that crossed links, as the growth of every
namespace's non-loopback interfaces' transmit counters over that window
(wire bytes: payload plus TCP/IP/Ethernet headers and whatever control
traffic, heartbeats included, ran meanwhile).  For hpcflow also its own
transport counters (payload bytes, from the daemons' ``stats``).

The lower bound is hpcflow's plan's bytes over the link rate (summed over
links: ``sum(bytes(link) / rate(link))``, the issue's definition; on the
uniform links it is total bytes / rate).  Links of this emulation are
independent pairs that can run at once, so the time the busiest link needs,
``max(bytes(link) / rate(link))``, is also printed (LB‖): nothing can beat
that one.  Targets (issue 10): hpcflow wall <= 0.8x Dask's on every scenario,
and <= 1.5x the lower bound where data dominates, i.e. where the bound is at
least ``--data-ms`` and exceeds numpy's time for the same steps on one core
(measured here), so that neither fixed costs nor compute decide the time.

Needs root (network namespaces) and Dask (``pip install -e ".[bench]"``);
without Dask it runs hpcflow alone and says so.  Ctrl-C or SIGTERM tears
down every daemon, worker, scheduler, namespace and temporary file (the
harness's machinery: :class:`~hpcflow.harness.netns.Topology`, ``LocalCluster``,
claimed work directories); what a SIGKILLed run leaves (namespaces, its
directory) is removed by the next run or replay.  Writes every measurement to
``--json`` (default ``bench/results/vs_dask.json``); the exit status is 1 if a
system failed or a result differs from numpy's, not for missed targets.

Run: ``python bench/vs_dask.py [--scenarios NAME|FILE ...] [--repeats 3] [--link-gbit G]``
(about 2 minutes for all eight scenarios with ``--repeats 5`` on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from hpcflow import ops
from hpcflow.errors import HpcflowError
from hpcflow.harness.local import LocalCluster
from hpcflow.harness.netns import Topology
from hpcflow.harness.netns import available as netns_available
from hpcflow.harness.procs import (
    claimed_tmpdir,
    die_with_parent,
    enter_netns,
    guard_process_exit,
    run_job,
    signals_deferred,
    terminate,
)
from hpcflow.harness.replay import place, remove_leftovers
from hpcflow.harness.report import compare, human_bytes
from hpcflow.harness.scenario import Scenario, generate, list_scenarios, load_scenario

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SCENARIO_DIRS = (ROOT / "scenarios", BENCH / "scenarios")
SCHEDULER_PORT = 8786  # the initiator's namespace has a port space of its own
TARGET_VS_DASK = 0.8
TARGET_VS_BOUND = 1.5
PROGRESS = "vs_dask: "
_TMP_PREFIX = "hpcflow-replay-vsdask-"  # reaped by remove_leftovers() if we are SIGKILLed

Array = np.ndarray[Any, Any]
Progress = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- measuring the wire ---------------------------------------------------------------

def wire_counters(namespaces: Sequence[str]) -> dict[str, int]:
    """Transmitted bytes of every non-loopback interface, ``"netns/dev" -> tx_bytes``.

    Read from ``/proc/thread-self/net/dev`` by a throw-away thread that joins
    each namespace in turn (``setns`` changes only the calling thread), so the
    script reads all hosts' counters itself in well under a millisecond.
    ``/sys/class/net`` would show the namespace sysfs was mounted in instead.
    """
    out: dict[str, int] = {}
    error: list[BaseException] = []

    def read() -> None:
        try:
            for ns in namespaces:
                enter_netns(f"/run/netns/{ns}")
                for line in Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]:
                    dev, fields = line.split(":", 1)
                    if dev.strip() != "lo":
                        out[f"{ns}/{dev.strip()}"] = int(fields.split()[8])  # tx bytes
        except BaseException as exc:  # handed to the caller
            error.append(exc)

    thread = threading.Thread(target=read, name="wire-counters")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return out


def wire_delta(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(n - before.get(dev, 0) for dev, n in after.items())


# -- the script side: runs in the initiator's namespace --------------------------------

def _progress(msg: str) -> None:
    print(PROGRESS + msg, file=sys.stderr, flush=True)


def agent(job_file: str) -> int:
    """``vs_dask.py --agent JOB``: run one system's rounds, save the result, print JSON."""
    job = json.loads(Path(job_file).read_text())
    sc = load_scenario(job["scenario"])
    sc.load_ops()
    run = agent_hpcflow if job["system"] == "hpcflow" else agent_dask
    result, rounds = run(sc, job)
    np.save(job["result"], np.asarray(result))
    print(json.dumps({"rounds": rounds}))
    return 0


def agent_hpcflow(sc: Scenario, job: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    from hpcflow.client.client import connect
    from hpcflow.harness.agent import _fetch_to_initiator, _node_counters, _transport_bytes

    nodes: dict[str, str] = job["nodes"]
    namespaces: list[str] = job["netns"]
    with connect(nodes[sc.initiator]) as c:
        for name in sc.datasets:
            c.wait_for(name, 60)
    rounds, result = [], None
    for k in range(job["warmup"] + job["repeats"]):
        before = _node_counters(nodes)
        with connect(nodes[sc.initiator]) as flow:
            handles: dict[str, Any] = {}
            for step in sc.steps:
                ins = [handles.get(i, i) for i in step.inputs]
                handles[step.out] = flow.run(step.op, *ins, **dict(step.params))
            target = handles.get(sc.result)
            delivery: dict[str, int] = {}
            w0 = wire_counters(namespaces)
            t0 = time.perf_counter()
            if target is not None:
                result = target.fetch()
            else:  # the result is an input dataset: the script's fetch is the delivery
                result, delivery, _ = _fetch_to_initiator(flow, sc.result, sc.initiator)
            wall = time.perf_counter() - t0
            w1 = wire_counters(namespaces)
            report = flow.report()
            after = _node_counters(nodes)
        planned, moved = dict(report["planned"]), dict(report["moved"])
        for link, n in delivery.items():
            planned[link] = planned.get(link, 0) + n
            moved[link] = moved.get(link, 0) + n
        rounds.append({"warmup": k < job["warmup"], "wall_s": wall,
                       "wire_bytes": wire_delta(w0, w1), "planned": planned, "moved": moved,
                       "transport_bytes": _transport_bytes(before, after),
                       "replans": report["replans"]})
        _progress(f"hpcflow round {k + 1}: {wall * 1000:.0f} ms")
        if job.get("detail"):
            if k == job["warmup"] + job["repeats"] - 1 and target is not None and (
                    target.plan is not None):
                for line in target.plan.explain().splitlines():
                    _progress(line)
            _progress(f"  on the initiator {report['seconds_total'] * 1000:.1f} ms; " + "; ".join(
                f"{out.split('.', 1)[-1]}: " + ", ".join(f"{kind} {s * 1000:.1f}"
                                                        for kind, s in kinds.items())
                for out, kinds in report["seconds"].items()))
    return result, rounds


def agent_dask(sc: Scenario, job: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    import _dask_tasks as tasks  # bench/ is sys.path[0] here and on the workers' PYTHONPATH
    import dask.array as da
    from dask.array.core import concatenate3
    from distributed import Client, wait

    namespaces: list[str] = job["netns"]
    path = str(sc.file)
    client = Client(job["scheduler"], timeout=60, direct_to_workers=True)
    try:
        client.wait_for_workers(len(sc.nodes), timeout=120)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        addr = {info["name"]: a for a, info in workers.items()}
        missing = sorted(set(sc.nodes) - set(addr))
        if missing:
            raise RuntimeError(f"no Dask worker named {missing} (have {sorted(addr)})")
        arrays: dict[str, Any] = {}
        placed: list[tuple[Any, str]] = []
        for name, ds in sc.datasets.items():
            blocks = []
            for k, part in enumerate(ds.parts):
                if part.rows == 0:
                    continue
                fut = client.submit(tasks.make_part, path, name, k, key=f"{name}-part{k}",
                                    workers=[addr[part.node]], pure=False)
                placed.append((fut, part.node))
                blocks.append(da.from_delayed(fut, (part.rows, *ds.shape[1:]), dtype=ds.dtype))
            arrays[name] = (da.concatenate(blocks) if blocks
                            else da.zeros(ds.shape, dtype=ds.dtype))
        wait([f for f, _ in placed])
        who = client.who_has([f for f, _ in placed])
        for fut, node in placed:
            if list(who[fut.key]) != [addr[node]]:
                raise RuntimeError(f"{fut.key} is on {who[fut.key]}, not on {node}'s worker")
        _progress(f"dask: {len(placed)} parts generated on their holders' workers")
        for step in sc.steps:
            arrays[step.out] = dask_step(sc, step, [arrays[i] for i in step.inputs])
        target = arrays[sc.result]
        rounds, result = [], None
        for k in range(job["warmup"] + job["repeats"]):
            w0 = wire_counters(namespaces)
            t0 = time.perf_counter()
            if job["finalize"]:  # concatenates the chunks on a worker, then ships them again
                result = target.compute()
            else:  # every chunk straight from the worker that made it to the script
                chunks = target.to_delayed()
                got = client.gather(client.compute(list(chunks.reshape(-1))))
                nested = np.empty(chunks.shape, dtype=object)
                for i, block in enumerate(got):
                    nested.flat[i] = block
                result = concatenate3(nested.tolist())
            wall = time.perf_counter() - t0
            w1 = wire_counters(namespaces)
            rounds.append({"warmup": k < job["warmup"], "wall_s": wall,
                           "wire_bytes": wire_delta(w0, w1)})
            _progress(f"dask round {k + 1}: {wall * 1000:.0f} ms")
    finally:
        client.close()
    return result, rounds


def dask_step(sc: Scenario, step: Any, ins: list[Any]) -> Any:
    """One scenario step as the equivalent dask.array computation.

    Built-ins with a dask.array counterpart use it: ``scale`` (``x * f``),
    ``add`` (``a + b``, numpy broadcasting), ``fft`` (``da.fft.fft(x, axis=1)``),
    ``colsum``/``colmean`` (``sum``/``mean(axis=0)``), ``histogram`` with fixed
    edges (``da.histogram``), ``gram`` (``X.T @ X``), ``median``
    (``da.median(x, axis=0)``, which puts each column's rows in one chunk),
    ``frames`` (``x[start:stop:step]``).
    The rest (per-column ``quantiles``, lexicographic ``sort_rows``, a
    histogram whose edges need the global range, user ops) have none: they
    become tasks running hpcflow's own numpy code by the op's kind: per row
    block (rowwise), per-block partials plus a combine (reduce), or on inputs
    gathered into one chunk (global) -- what ``da.median`` itself does.
    """
    import dask.array as da

    p = dict(step.params)
    x = ins[0]
    if step.op == "scale":
        return x * p["factor"]
    if step.op == "add":
        return ins[0] + ins[1]
    if step.op == "fft":
        return da.fft.fft(x, axis=1)
    if step.op == "colsum":
        return x.sum(axis=0)
    if step.op == "colmean":
        return x.mean(axis=0)
    if step.op == "gram":
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:])) if x.ndim != 2 else x
        return flat.T @ flat
    if step.op == "median":
        return da.median(x, axis=0)
    if step.op == "frames":  # a row selection: dask slices across its chunks itself
        return x[p.get("start", 0):p.get("stop"):p.get("step", 1)]
    spec = ops.get_op(step.op)
    if spec.rows is not None:  # its blocks would need their place in the whole input
        raise ValueError(f"{step.op}: row-selecting user ops have no dask counterpart here")
    if step.op == "histogram" and spec.can_split(p):
        counts, edges = da.histogram(x, bins=p.get("bins", 10), range=p.get("range"))
        return da.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
    return _by_kind(sc, step, spec, ins)


def _by_kind(sc: Scenario, step: Any, spec: Any, ins: list[Any]) -> Any:
    """A step without a dask.array counterpart, as delayed tasks running hpcflow's numpy code."""
    import _dask_tasks as tasks
    import dask
    import dask.array as da

    path, params = str(sc.file), dict(step.params)
    dtype = np.dtype(step.dtype)

    def whole(a: Any) -> Any:  # one chunk (Dask picks the worker that concatenates)
        return a.rechunk(a.shape).to_delayed().reshape(-1)[0]

    if not spec.can_split(params):  # global, or a reduce that needs all rows at once
        task = dask.delayed(tasks.whole_op)(path, step.op, params, *map(whole, ins))
        return da.from_delayed(task, step.shape, dtype=dtype)
    rows_in = ops.row_roles(spec, [a.shape for a in ins])
    first = ins[rows_in.index(True)]
    row_chunks = first.chunks[0]

    def by_rows(a: Any) -> list[Any]:  # one delayed per row block, other axes whole
        a = a.rechunk((row_chunks, *((-1,) * (a.ndim - 1))))
        return list(a.to_delayed().reshape(-1))

    if spec.kind == "reduce":
        partials = [dask.delayed(tasks.reduce_partial)(path, step.op, params, b)
                    for b in by_rows(ins[0])]
        task = dask.delayed(tasks.reduce_combine)(path, step.op, params, partials)
        return da.from_delayed(task, step.shape, dtype=dtype)
    per_input = [by_rows(a) if row else [whole(a)] * len(row_chunks)
                 for a, row in zip(ins, rows_in, strict=True)]
    blocks = [da.from_delayed(dask.delayed(tasks.rowwise_block)(path, step.op, params,
                                                                 *[b[i] for b in per_input]),
                              (n, *step.shape[1:]), dtype=dtype)
              for i, n in enumerate(row_chunks)]
    return da.concatenate(blocks) if blocks else da.zeros(step.shape, dtype=dtype)


# -- the harness side: runs in the root namespace --------------------------------------

def dask_missing() -> str | None:
    """Why Dask cannot run here, or None."""
    try:
        import dask.array  # noqa: F401
        import distributed  # noqa: F401
    except ImportError as exc:
        return (f"Dask is not installed ({exc}); pip install -e \".[bench]\" "
                "(dask[distributed]) to compare against it")
    return None


def _env() -> dict[str, str]:
    """Children find bench/_dask_tasks.py; Dask logs only warnings."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": str(BENCH) + (os.pathsep + path if path else ""),
            "DASK_LOGGING__DISTRIBUTED": "warning"}


def _work_dir(stack: ExitStack, name: str) -> Path:
    return claimed_tmpdir(stack, f"{_TMP_PREFIX}{name}-")


def run_agent(system: str, sc: Scenario, topo: Topology, work: Path, job: dict[str, Any],
              progress: Progress, timeout_s: float) -> tuple[Array, list[dict[str, Any]]]:
    """Run the script side in the initiator's namespace; relay its progress lines."""
    job = {**job, "system": system, "scenario": str(sc.file),
           "netns": [topo.netns(n) for n in sc.nodes], "result": str(work / f"{system}.npy")}
    doc = run_job([sys.executable, str(Path(__file__).resolve()), "--agent"], job, system,
                  work, what=f"{system} script", marker=PROGRESS,
                  progress=lambda msg: progress(f"  {msg}"), timeout_s=timeout_s,
                  popen=partial(topo.popen, sc.initiator), tail_lines=25,
                  stdin=subprocess.DEVNULL, env=_env())
    return np.load(job["result"]), doc["rounds"]


def run_hpcflow(sc: Scenario, data: dict[str, Any], topo: Topology, work: Path,
                a: argparse.Namespace, progress: Progress) -> tuple[Array, list[dict[str, Any]]]:
    root = work / "hpcflow"
    place(sc, data, root)
    extra = ["--log-level", "WARNING", *[arg for m in sc.ops for arg in ("--ops", m)]]
    with LocalCluster(root, extra=extra) as cluster:
        cluster.add_all(sc.nodes, {node: {"listen": f"{topo.address(node)}:0",
                                          "prefix": ["ip", "netns", "exec", topo.netns(node)]}
                                   for node in sc.nodes})
        progress(f"  hpcflow: {len(sc.nodes)} daemons up")
        job = {"nodes": {n: p.rpc for n, p in cluster.nodes.items()},
               "warmup": a.warmup, "repeats": a.repeats, "detail": a.detail}
        return run_agent("hpcflow", sc, topo, work, job, progress, a.timeout)


def run_dask(sc: Scenario, topo: Topology, work: Path, a: argparse.Namespace,
             progress: Progress) -> tuple[Array, list[dict[str, Any]]]:
    host = topo.address(sc.initiator)
    scheduler = f"tcp://{host}:{SCHEDULER_PORT}"
    logs = work / "dask"
    logs.mkdir()
    dask_cmd = [sys.executable, "-m", "dask"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(node: str, log_name: str, argv: list[str]) -> None:
        # SIGKILL when we die: a worker answers SIGTERM by trying to say goodbye to its
        # scheduler, which may be gone too; nothing of theirs needs a clean exit.
        with open(logs / f"{log_name}.log", "ab") as log, signals_deferred():
            procs.append(topo.popen(node, argv, stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, env=_env(),
                                    preexec_fn=partial(die_with_parent, signal.SIGKILL)))

    try:
        start(sc.initiator, "scheduler", [*dask_cmd, "scheduler", "--host", host, "--port",
                                          str(SCHEDULER_PORT), "--no-dashboard"])
        for node in sc.nodes:
            start(node, node, [*dask_cmd, "worker", scheduler, "--nthreads", "1",
                               "--nworkers", "1", "--no-nanny", "--host", topo.address(node),
                               "--name", node, "--no-dashboard", "--local-directory",
                               str(logs / f"{node}-scratch"), "--death-timeout", "120"])
        progress(f"  dask: scheduler on {sc.initiator}, {len(sc.nodes)} workers starting")
        try:
            job = {"scheduler": scheduler, "warmup": a.warmup, "repeats": a.repeats,
                   "finalize": a.dask_finalize}
            return run_agent("dask", sc, topo, work, job, progress, a.timeout)
        except HpcflowError as exc:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise HpcflowError(f"{exc}\n{len(dead)} Dask process(es) exited; logs:\n"
                                   + _log_tails(logs)) from None
            raise
    finally:
        with signals_deferred():  # all at once; SIGKILL after 5 s (the topology's too)
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                terminate(proc, 5.0)


def _log_tails(logs: Path, n: int = 8) -> str:
    out = []
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        out.append(f"--- {log.name}\n" + "\n".join(lines))
    return "\n".join(out)


# -- figures -------------------------------------------------------------------------

def link_gbit(sc: Scenario, a: argparse.Namespace, src: str, dst: str) -> float:
    return float(a.link_gbit) if a.link_gbit else sc.links.gbit(src, dst)


def bounds(sc: Scenario, a: argparse.Namespace, planned: dict[str, int]) -> tuple[float, float]:
    """(sum over links, busiest link) of planned bytes / link rate, in seconds."""
    times = []
    for link, n in planned.items():
        src, dst = link.split("->")
        times.append(n * 8 / (link_gbit(sc, a, src, dst) * 1e9))
    return sum(times), max(times, default=0.0)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [r for r in rounds if not r["warmup"]]
    out = {"wall_s": statistics.median(r["wall_s"] for r in timed),
           "wall_min_s": min(r["wall_s"] for r in timed),
           "wall_max_s": max(r["wall_s"] for r in timed),
           "wire_bytes": int(statistics.median(r["wire_bytes"] for r in timed)),
           "rounds": rounds}
    if "transport_bytes" in timed[0]:
        out["transport_bytes"] = int(statistics.median(r["transport_bytes"] for r in timed))
        plans = {json.dumps(r["planned"], sort_keys=True) for r in timed}
        if len(plans) > 1:
            _say(f"note: hpcflow's plan differed between rounds: {sorted(plans)}")
        out["planned"] = timed[len(timed) // 2]["planned"]
        out["bytes_planned"] = sum(out["planned"].values())
        out["bytes_moved"] = int(statistics.median(sum(r["moved"].values()) for r in timed))
    return out


def reference_timed(sc: Scenario, data: dict[str, Any]) -> tuple[Array, float]:
    """numpy's result, and the best of three times for the steps on gathered data."""
    sc.load_ops()
    best, result = math.inf, None
    for _ in range(3):
        t0 = time.perf_counter()
        values = {name: np.concatenate([arr for _n, arr in parts]) for name, parts in data.items()}
        for step in sc.steps:
            values[step.out] = ops.apply(ops.get_op(step.op), [values[i] for i in step.inputs],
                                         step.params)
        best = min(best, time.perf_counter() - t0)
        result = values[sc.result]
    assert result is not None
    return result, best


def bench_scenario(path: Path, a: argparse.Namespace, dask_why: str | None,
                   progress: Progress) -> dict[str, Any]:
    sc = load_scenario(path)
    sc.load_ops()
    data = generate(sc)
    reference, numpy_s = reference_timed(sc, data)
    links = ({} if a.link_gbit else
             {pair: g for pair, g in sc.links.overrides.items()
              if pair[0] in sc.nodes and pair[1] in sc.nodes})
    default = a.link_gbit or sc.links.default_gbit
    progress(f"{sc.name}: {sc.description} ({len(sc.nodes)} hosts, links {default:g} Gbit/s"
             + (f", {len(links)} overridden" if links else "") + ")")
    row: dict[str, Any] = {"scenario": sc.name, "file": str(sc.file), "numpy_s": numpy_s,
                           "link_gbit": default,
                           "link_overrides": {f"{x}-{y}": g for (x, y), g in links.items()}}
    results: dict[str, Array] = {}
    with ExitStack() as stack:
        work = _work_dir(stack, sc.name)
        topo = stack.enter_context(Topology(sc.nodes, bandwidth_gbit=default, links=links))
        systems: list[tuple[str, Callable[[], tuple[Array, list[dict[str, Any]]]]]] = [
            ("hpcflow", lambda: run_hpcflow(sc, data, topo, work, a, progress))]
        if dask_why is None:
            systems.append(("dask", lambda: run_dask(sc, topo, work, a, progress)))
        else:
            row["dask"] = {"skipped": dask_why}
        for system, run in systems:
            try:
                result, rounds = run()
            except Exception as exc:  # one system failing must not lose the other
                detail = "".join(traceback.format_exception(exc)).rstrip()
                progress(f"  {system}: FAILED: {detail}")
                row[system] = {"failed": f"{type(exc).__name__}: {exc}"}
                continue
            ok, err = compare(result, reference)
            row[system] = {**summarise(rounds), "matches_numpy": ok, "max_abs_err": err}
            results[system] = result
            progress(f"  {system}: median {row[system]['wall_s'] * 1000:.0f} ms, "
                     f"{human_bytes(row[system]['wire_bytes'])} on the wire, result "
                     f"{'matches' if ok else 'DIFFERS FROM'} numpy")
    if len(results) == 2:
        row["same_result"] = compare(results["dask"], results["hpcflow"])[0]
    hf = row["hpcflow"]
    if "planned" in hf:
        row["bound_s"], row["bound_busiest_s"] = bounds(sc, a, hf["planned"])
    return row


# -- report ----------------------------------------------------------------------------

def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f}" if s >= 0.0095 else f"{s * 1000:.2f}" if s >= 5e-6 else "<0.01"


def _ratio(x: float | None, y: float | None) -> str:
    if x is None or y is None:
        return "-"
    if y <= 0:
        return "inf"
    return f"{x / y:.2f}" if x / y < 100 else f"{x / y:.0f}"


def verdicts(row: dict[str, Any], a: argparse.Namespace) -> tuple[str, str]:
    hf, dk = row["hpcflow"], row.get("dask", {})
    hf_wall = hf.get("wall_s")
    if hf_wall is None:
        v1 = "FAIL (hpcflow failed)"
    elif "skipped" in dk:
        v1 = "n/a (no Dask)"
    elif "wall_s" not in dk:
        v1 = "n/a (Dask failed)"
    else:
        v1 = "pass" if hf_wall <= TARGET_VS_DASK * dk["wall_s"] else "FAIL"
    bound = row.get("bound_s")
    if hf_wall is None or bound is None:
        v2 = "-"
    elif bound * 1000 < a.data_ms or bound <= row["numpy_s"]:
        v2 = "n/a"
    else:
        v2 = "pass" if hf_wall <= TARGET_VS_BOUND * bound else "FAIL"
    return v1, v2


def table(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    head = ["scenario", "LB ms", "LB‖ ms", "numpy ms", "hf wire", "hf transport", "hf ms",
            "dask wire", "dask ms", "hf/dask", "hf/LB", f"<={TARGET_VS_DASK}x dask",
            f"<={TARGET_VS_BOUND}x LB"]
    lines = []
    for r in rows:
        hf, dk = r["hpcflow"], r.get("dask", {})
        v1, v2 = verdicts(r, a)
        lines.append([
            r["scenario"], _ms(r.get("bound_s")), _ms(r.get("bound_busiest_s")),
            _ms(r["numpy_s"]),
            human_bytes(hf["wire_bytes"]) if "wire_bytes" in hf else "FAILED",
            human_bytes(hf["transport_bytes"]) if "transport_bytes" in hf else "-",
            _ms(hf.get("wall_s")),
            human_bytes(dk["wire_bytes"]) if "wire_bytes" in dk else
            ("skipped" if "skipped" in dk else "FAILED"),
            _ms(dk.get("wall_s")),
            _ratio(hf.get("wall_s"), dk.get("wall_s")),
            _ratio(hf.get("wall_s"), r.get("bound_s")), v1, v2])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
           for x in [head, *lines]]
    return "\n".join(out)


def notes(rows: list[dict[str, Any]], a: argparse.Namespace) -> list[str]:
    out = []
    for r in rows:
        hf, dk = r["hpcflow"], r.get("dask", {})
        bits = []
        if "bytes_planned" in hf:
            bits.append(f"hpcflow planned {human_bytes(hf['bytes_planned'])}, accounted "
                        f"{human_bytes(hf['bytes_moved'])}; walls hf {_ms(hf['wall_min_s'])}.."
                        f"{_ms(hf['wall_max_s'])} ms")
        if "wall_s" in dk:
            bits.append(f"dask {_ms(dk['wall_min_s'])}..{_ms(dk['wall_max_s'])} ms")
        for system, x in (("hpcflow", hf), ("dask", dk)):
            if "failed" in x:
                bits.append(f"{system} FAILED: {x['failed'].splitlines()[0]}")
            elif "matches_numpy" in x and not x["matches_numpy"]:
                bits.append(f"{system} result DIFFERS from numpy (max abs err "
                            f"{x['max_abs_err']:.3g})")
        if r.get("same_result") is False:
            bits.append("Dask's result differs from hpcflow's")
        out.append(f"{r['scenario']}: " + "; ".join(bits))
    return out


def scenario_paths(selected: Sequence[str]) -> list[Path]:
    shipped = [p for d in SCENARIO_DIRS for p in list_scenarios(d)]
    if not selected:
        return shipped
    by_name = {p.stem: p for p in shipped}
    out = []
    for s in selected:
        if s in by_name:
            out.append(by_name[s])
        elif Path(s).is_file():
            out.append(Path(s))
        else:
            raise SystemExit(f"vs_dask: no scenario {s!r} (names: {', '.join(sorted(by_name))}; "
                             "or give a .toml path)")
    return out


def provenance() -> str:
    """Which hpcflow is measured: its directory, and its commit when that is a git checkout."""
    import hpcflow

    where = Path(hpcflow.__file__).resolve().parents[1]
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False)
    if head.returncode != 0:
        return f"hpcflow {hpcflow.__version__} from {where}"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "hpcflow"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (f"hpcflow {hpcflow.__version__} from {where} at {head.stdout.strip()}"
            + (" with uncommitted changes" if dirty else ""))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=[], metavar="NAME|FILE",
                    help="scenario names (file stems in scenarios/ or bench/scenarios/) or "
                         "paths; default: all of both")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per system (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--link-gbit", type=float, default=None,
                    help="rate of every link in Gbit/s (default: the scenario's rates)")
    ap.add_argument("--data-ms", type=float, default=50.0,
                    help="data dominates where the lower bound is at least this and above "
                         "numpy's time for the steps (default 50)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds one system's rounds on one scenario may take")
    ap.add_argument("--json", type=Path, default=BENCH / "results" / "vs_dask.json",
                    help="where to write every measurement (default bench/results/vs_dask.json)")
    ap.add_argument("--dask-finalize", action="store_true",
                    help="gather Dask's result with plain .compute(), which first concatenates "
                         "the chunks on one worker (default: the script gathers every chunk "
                         "straight from the worker that made it, Dask's cheaper way)")
    ap.add_argument("--detail", action="store_true",
                    help="print hpcflow's measured seconds per step (every round) and its "
                    "plan (last round)")
    ap.add_argument("--agent", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.agent:
        return agent(a.agent)
    if a.repeats < 1 or a.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if a.link_gbit is not None and not 1e-5 <= a.link_gbit <= 100:
        ap.error("--link-gbit must be within 0.00001..100 (what tc tbf shapes)")
    ok, why = netns_available()
    if not ok:
        _say(f"vs_dask: needs network namespaces: {why}")
        return 2
    paths = scenario_paths(a.scenarios)
    for p in paths:
        load_scenario(p)  # every file checked before anything runs
    dask_why = dask_missing()
    if dask_why:
        _say(f"vs_dask: SKIPPING Dask: {dask_why}")
    guard_process_exit()  # SIGTERM unwinds (and cleans up) like Ctrl-C from here on
    removed = remove_leftovers()
    if removed:
        _say(f"removed leftovers of killed runs: {', '.join(removed)}")
    started = time.monotonic()
    load, measured = os.getloadavg(), provenance()
    rows = []
    try:
        for path in paths:
            rows.append(bench_scenario(path, a, dask_why, _say))
    except KeyboardInterrupt:
        _say("vs_dask: interrupted; everything started was torn down")
        return 130
    load_end = os.getloadavg()
    links = f"{a.link_gbit:g} Gbit/s on every link" if a.link_gbit else "the scenarios' link rates"
    print(f"hpcflow vs Dask distributed, one network namespace per node, tbf-shaped links "
          f"({links}); Dask's result "
          + ("by .compute()" if a.dask_finalize else "gathered chunk by chunk from its workers")
          + f"; median of {a.repeats} timed rounds after {a.warmup} warm-up; "
          f"load average {load[0]:.2f} at start, {load_end[0]:.2f} at end "
          f"({os.cpu_count()} CPUs); {time.monotonic() - started:.0f} s; {measured}")
    if dask_why:
        print(f"Dask SKIPPED: {dask_why}")
    print(table(rows, a))
    print("LB = hpcflow's planned bytes / link rate, summed over links (the issue's bound); "
          "LB‖ = the busiest link alone (links here run in parallel); numpy = the steps on "
          "gathered data, one core; wire = tx bytes of every host's interfaces (headers, "
          "control and heartbeats included); transport = hpcflow's own payload count; "
          f"<={TARGET_VS_BOUND}x LB is judged only where data dominates (LB >= "
          f"{a.data_ms:g} ms and > numpy), n/a elsewhere")
    for line in notes(rows, a):
        print(line)
    v = [verdicts(r, a) for r in rows]
    judged1 = [x for x, _ in v if x in ("pass", "FAIL") or x.startswith("FAIL")]
    judged2 = [y for _, y in v if y in ("pass", "FAIL")]
    print(f"targets: hpcflow wall <= {TARGET_VS_DASK}x Dask on every scenario: "
          f"{sum(x == 'pass' for x in judged1)}/{len(judged1)} pass; <= {TARGET_VS_BOUND}x the "
          f"lower bound where data dominates: {sum(y == 'pass' for y in judged2)}/"
          f"{len(judged2)} pass")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"args": {k: str(x) for k, x in vars(a).items()},
                                  "hpcflow": measured,
                                  "load_start": load, "load_end": load_end, "rows": rows},
                                 indent=2, default=float))
    _say(f"wrote {a.json}")
    broken = any("failed" in r["hpcflow"] or "failed" in r.get("dask", {})
                 or r["hpcflow"].get("matches_numpy") is False
                 or r.get("dask", {}).get("matches_numpy") is False for r in rows)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
