"""``hpcflow replay``: one scenario, three approaches, side by side.

For each approach the replay starts from the same state: the scenario's
data is generated (or read from H5MD) and written straight into each node's
store *before* its daemon starts, so placement costs no network traffic and
every approach sees identical bytes.  Then:

* **decentralised** — N hpcflow daemons; the script (an agent process on the
  initiator's host) hands the whole workflow to the initiator's daemon,
  which plans with its replicated catalog and delegates directly to holders;
* **centralised** — the same daemons, but an orchestrator process (its own
  host) registers their inventories, routes each step by data distance with
  a load threshold and forwards all data and outputs through itself
  (:mod:`hpcflow.harness.centralised`);
* **nfs** — a real nfs-ganesha server holds all data; every step reads its
  inputs over NFS and writes its output back (:mod:`hpcflow.harness.nfs_approach`).

Every approach's result is compared with numpy on the gathered data.  With
``netns=True`` each node, the orchestrator and the NFS server are separate
hosts in network namespaces joined by veth links shaped per the scenario's
``[links]`` (root only); wall times then reflect the link speeds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog.store import Store
from ..config import timeout_scale
from ..errors import ConfigError, HpcflowError
from .centralised import ORCH
from .local import LocalCluster
from .nfs_approach import run_nfs
from .report import ApproachResult, array_checksum, compare
from .scenario import NFS_HOST, Scenario, generate, load_scenario, reference_result

APPROACHES = ("decentralised", "centralised", "nfs")
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def place(scenario: Scenario, data: dict[str, Any], root: Path) -> None:
    """Write every part into its node's store, as if the simulation had produced it there."""
    for node in scenario.nodes:
        store = Store(root / node, node)
        store.open()
        for name, parts in data.items():
            for k, (holder, arr) in enumerate(parts):
                if holder == node:
                    single = len(parts) == 1
                    store.put_array(name, arr, part=None if single else k,
                                    nparts=None if single else len(parts))
        store.close()


def _topology(scenario: Scenario) -> Any:
    from .netns import Topology, available

    ok, why = available()
    if not ok:
        raise ConfigError(f"--netns needs network namespaces here: {why}")
    hosts = [*scenario.nodes, ORCH, NFS_HOST]
    links = {pair: gbit for pair, gbit in scenario.links.overrides.items()
             if pair[0] in hosts and pair[1] in hosts}
    return Topology(hosts, bandwidth_gbit=scenario.links.default_gbit, links=links)


def _run_agent(approach: str, scenario: Scenario, cluster: LocalCluster, work: Path,
               prefix: list[str], threshold: int) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    job = {"approach": approach, "scenario": str(scenario.file),
           "nodes": {n: p.rpc for n, p in cluster.nodes.items()},
           "initiator": scenario.initiator, "result": str(work / f"{approach}.npy"),
           "threshold": threshold}
    job_file = work / f"{approach}.job.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([*prefix, sys.executable, "-m", "hpcflow.harness.agent",
                           str(job_file)], capture_output=True, text=True,
                          timeout=600 * timeout_scale())
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise HpcflowError(f"{approach} agent failed ({proc.returncode}):\n{tail}")
    return np.load(str(job["result"])), json.loads(proc.stdout.strip().splitlines()[-1])


def run_daemons(approach: str, scenario: Scenario, data: dict[str, Any], reference: Any,
                work: Path, topology: Any, threshold: int, progress: Progress) -> ApproachResult:
    root = work / approach
    place(scenario, data, root)
    extra_args = [arg for m in scenario.ops for arg in ("--ops", m)]
    with LocalCluster(root, extra=["--log-level", "WARNING", *extra_args]) as cluster:
        for node in scenario.nodes:
            kw: dict[str, Any] = {}
            if topology is not None:
                kw = {"listen": f"{topology.address(node)}:0",
                      "prefix": ["ip", "netns", "exec", topology.netns(node)]}
            cluster.add(node, **kw)
        if topology is None:  # under netns only the hosts can reach each other: the agent waits
            cluster.wait_converged(60)
        progress(f"  {approach}: {len(scenario.nodes)} daemons up, running the workflow")
        host = scenario.initiator if approach == "decentralised" else ORCH
        prefix = [] if topology is None else ["ip", "netns", "exec", topology.netns(host)]
        result, m = _run_agent(approach, scenario, cluster, work, prefix, threshold)
    ok, err = compare(result, reference)
    links = {k: int(v) for k, v in m["links"].items()}
    return ApproachResult(approach=approach, bytes_moved=sum(links.values()),
                          wall_s=float(m["wall_s"]), links=links, messages=int(m["messages"]),
                          result_checksum=array_checksum(result), matches_reference=ok,
                          max_abs_err=err, extra=m.get("extra", {}))


def replay(path: str | Path, approaches: Sequence[str] = APPROACHES, *, netns: bool = False,
           threshold: int = 3, workdir: Path | None = None,
           progress: Progress = _quiet) -> tuple[Scenario, list[ApproachResult]]:
    """Replay one scenario under each approach; results in the order asked."""
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise ConfigError(f"unknown approach(es) {unknown}; choose from {APPROACHES}")
    scenario = load_scenario(path)
    scenario.load_ops()
    t0 = time.monotonic()
    data = generate(scenario)
    reference = reference_result(scenario, data)
    progress(f"{scenario.name}: {scenario.description} "
             f"({sum(d.nbytes for d in scenario.datasets.values()) / 2**20:.1f} MiB of input, "
             f"{len(scenario.nodes)} nodes{', netns' if netns else ''})")
    results = []
    with ExitStack() as stack:
        tmp = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=f"hpcflow-replay-{scenario.name}-")))
        topology = stack.enter_context(_topology(scenario)) if netns else None
        for approach in approaches:
            work = tmp / approach
            work.mkdir(parents=True, exist_ok=True)
            progress(f"  {approach}: starting")
            if approach == "nfs":
                res = run_nfs(scenario, data, topology=topology, workdir=work)
            else:
                res = run_daemons(approach, scenario, data, reference, work, topology,
                                  threshold, progress)
            results.append(res)
            progress(f"  {approach}: " + (f"skipped ({res.skipped})" if res.skipped else
                     f"{res.bytes_moved / 2**20:.2f} MiB moved, {res.wall_s:.3f} s, result "
                     f"{'matches' if res.matches_reference else 'DIFFERS FROM'} numpy"))
    progress(f"{scenario.name}: done in {time.monotonic() - t0:.1f} s")
    return scenario, results


def check(scenario: Scenario, results: Sequence[ApproachResult]) -> list[str]:
    """Problems a user must hear about: wrong results, approaches that disagree."""
    problems = [f"{r.approach}: result differs from numpy (max abs err {r.max_abs_err:.3g})"
                for r in results if not r.skipped and not r.matches_reference]
    for r in results:
        if not r.skipped and r.approach == "decentralised":
            transport = r.extra.get("transport_bytes")
            if transport is not None and transport != r.bytes_moved:
                problems.append(f"decentralised: accounted {r.bytes_moved} B but the daemons "
                                f"counted {transport} B")
    return problems
