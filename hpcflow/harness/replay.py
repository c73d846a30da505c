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

An approach that breaks is reported as failed (with the error) and the
others still run.  From the first line of :func:`replay` on, SIGTERM unwinds
like Ctrl-C: daemons, agents, NFS server, namespaces and the temporary
directory are removed on either, and teardown holds further signals back
until it is done.  What a SIGKILLed replay leaves behind (its temporary
directory, an NFS server's, namespaces) is removed by the next replay.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

import nfs_baseline

from ..catalog.store import Store
from ..config import CATALOG_MODES, timeout_scale
from ..errors import ConfigError, HpcflowError
from .agent import AGENT_PROGRESS
from .centralised import DEFAULT_THRESHOLD, ORCH, check_threshold
from .local import LocalCluster
from .netns import Topology, remove_stale
from .netns import available as netns_available
from .nfs_approach import run_nfs
from .procs import claimed_tmpdir, guard_process_exit, reap_stale, run_job
from .report import ApproachResult, array_checksum, compare, human_bytes
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


def _topology(scenario: Scenario) -> Topology:
    ok, why = netns_available()
    if not ok:
        raise ConfigError(f"--netns needs network namespaces here: {why}")
    hosts = [*scenario.nodes, ORCH, NFS_HOST]
    links = {pair: gbit for pair, gbit in scenario.links.overrides.items()
             if pair[0] in hosts and pair[1] in hosts}
    return Topology(hosts, bandwidth_gbit=scenario.links.default_gbit, links=links)


_TMP_PREFIX = "hpcflow-replay-"


def remove_leftovers() -> list[str]:
    """Remove what killed replays left: their temp dirs, NFS servers and namespaces.

    Only resources named by the harness and claimed by a process that no
    longer exists are touched (see :func:`~hpcflow.harness.procs.reap_stale`
    and :func:`~hpcflow.harness.netns.remove_stale`); concurrent replays keep theirs.
    """
    return [*remove_stale(), *nfs_baseline.remove_stale(),
            *reap_stale(str(Path(tempfile.gettempdir()) / f"{_TMP_PREFIX}*"))]


def _work_dir(stack: ExitStack, name: str) -> Path:
    """A claimed temporary directory, removed at the end (signals held back meanwhile)."""
    return claimed_tmpdir(stack, f"{_TMP_PREFIX}{name}-")


def _run_agent(approach: str, scenario: Scenario, cluster: LocalCluster, work: Path,
               prefix: list[str], threshold: int,
               progress: Progress) -> tuple[np.ndarray[Any, Any], dict[str, Any]]:
    """Run the approach's script as an agent process; relay its progress lines."""
    job = {"approach": approach, "scenario": str(scenario.file),
           "nodes": {n: p.rpc for n, p in cluster.nodes.items()},
           "initiator": scenario.initiator, "result": str(work / f"{approach}.npy"),
           "threshold": threshold}
    doc = run_job([*prefix, sys.executable, "-m", "hpcflow.harness.agent"], job, approach,
                  work, what=f"{approach} agent", marker=AGENT_PROGRESS,
                  progress=lambda msg: progress(f"  {approach}: {msg.strip()}"),
                  timeout_s=600 * timeout_scale())
    return np.load(str(job["result"])), doc


def run_daemons(approach: str, scenario: Scenario, data: dict[str, Any], reference: Any,
                work: Path, topology: Any, threshold: int, progress: Progress,
                catalog: str = "replicated") -> ApproachResult:
    root = work / approach
    place(scenario, data, root)
    extra_args = [arg for m in scenario.ops for arg in ("--ops", m)]
    extra_args += ["--catalog", catalog]
    with LocalCluster(root, extra=["--log-level", "WARNING", *extra_args]) as cluster:
        cluster.add_all(scenario.nodes, {} if topology is None else {
            node: {"listen": f"{topology.address(node)}:0",
                   "prefix": ["ip", "netns", "exec", topology.netns(node)]}
            for node in scenario.nodes})
        if topology is None:  # under netns only the hosts can reach each other: the agent waits
            cluster.wait_converged(60)
        progress(f"  {approach}: {len(scenario.nodes)} daemons up, starting the script")
        host = scenario.initiator if approach == "decentralised" else ORCH
        prefix = [] if topology is None else ["ip", "netns", "exec", topology.netns(host)]
        result, m = _run_agent(approach, scenario, cluster, work, prefix, threshold,
                               progress)
    ok, err = compare(result, reference)
    links = {k: int(v) for k, v in m["links"].items()}
    return ApproachResult(approach=approach, bytes_moved=sum(links.values()),
                          wall_s=float(m["wall_s"]), links=links, messages=int(m["messages"]),
                          result_checksum=array_checksum(result), matches_reference=ok,
                          max_abs_err=err, extra=m.get("extra", {}))


def replay(scenario: Scenario | str | Path, approaches: Sequence[str] = APPROACHES, *,
           netns: bool = False, threshold: int = DEFAULT_THRESHOLD, workdir: Path | None = None,
           progress: Progress = _quiet, catalog: str = "replicated"
           ) -> tuple[Scenario, list[ApproachResult]]:
    """Replay one scenario under each approach; results in the order asked.

    ``catalog``: the daemons' ``--catalog`` mode (``replicated`` or ``dht``).

    An approach that fails is returned as :meth:`ApproachResult.fail` with the
    error and the others still run; :func:`check` reports it.
    """
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise ConfigError(f"unknown approach(es) {unknown}; choose from {APPROACHES}")
    if catalog not in CATALOG_MODES:
        raise ConfigError(f"catalog must be one of {CATALOG_MODES}, not {catalog!r}")
    check_threshold(threshold)
    guard_process_exit()  # from here on SIGTERM unwinds (and cleans up) like Ctrl-C
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    sc.load_ops()
    removed = remove_leftovers()
    if removed:
        progress(f"removed leftovers of killed replays: {', '.join(removed)}")
    t0 = time.monotonic()
    data = generate(sc)
    reference = reference_result(sc, data)
    progress(f"{sc.name}: {sc.description} "
             f"({human_bytes(sum(d.nbytes for d in sc.datasets.values()))} of input, "
             f"{len(sc.nodes)} nodes{', netns' if netns else ''})")
    results = []
    with ExitStack() as stack:
        tmp = workdir or _work_dir(stack, sc.name)
        topology = stack.enter_context(_topology(sc)) if netns else None
        for approach in approaches:
            work = tmp / approach
            work.mkdir(parents=True, exist_ok=True)
            progress(f"  {approach}: starting")
            try:
                if approach == "nfs":
                    res = run_nfs(sc, data, topology=topology, workdir=work,
                                  progress=lambda m: progress(f"  nfs: {m}"))
                else:
                    res = run_daemons(approach, sc, data, reference, work, topology,
                                      threshold, progress, catalog)
            except Exception as exc:  # one broken approach must not lose the others
                detail = "" if isinstance(exc, HpcflowError) else (
                    "\n" + "".join(traceback.format_exception(exc)).rstrip())
                res = ApproachResult.fail(approach, f"{type(exc).__name__}: {exc}")
                progress(f"  {approach}: FAILED: {res.failed}{detail}")
                results.append(res)
                continue
            results.append(res)
            progress(f"  {approach}: " + (f"skipped ({res.skipped})" if res.skipped else
                     f"{human_bytes(res.bytes_moved)} moved, {res.wall_s:.3f} s, result "
                     f"{'matches' if res.matches_reference else 'DIFFERS FROM'} numpy"))
    progress(f"{sc.name}: done in {time.monotonic() - t0:.1f} s")
    return sc, results


def check(scenario: Scenario, results: Sequence[ApproachResult]) -> list[str]:
    """Problems a user must hear about: failures, wrong results, miscounted bytes,
    and nothing having run at all (every approach asked for was skipped)."""
    problems = [f"{r.approach}: failed: {r.failed}" for r in results if r.failed]
    problems += [f"{r.approach}: result differs from numpy (max abs err {r.max_abs_err:.3g})"
                 for r in results if r.ran and not r.matches_reference]
    if results and all(r.skipped for r in results):
        problems.append(f"{scenario.name}: no approach ran (" + "; ".join(
            f"{r.approach} skipped: {r.skipped}" for r in results) + ")")
    for r in results:
        if r.ran and r.approach == "decentralised":
            transport = r.extra.get("transport_bytes")
            if transport is not None and transport != r.bytes_moved:
                problems.append(f"decentralised: accounted {r.bytes_moved} B but the daemons "
                                f"counted {transport} B")
    return problems
