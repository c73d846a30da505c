"""The conventional approach: every dataset on a real NFS export.

The thesis (Sadeghi, ch. 1 "Approaches" and 5.2.3 "Data Locationing")
defines it as "we put the required data on a network file system and all
application instances will access it there".  Operation delegation only
appears with the centralised approach ("a central instance which will
orchestrate operation delegation and operation output forwarding"), and in
use case one (2.1) "we run a script ... on Node 1", so here

* **every step runs on the initiator**, the node running the script: with no
  delegation, the script executes each operation itself, reading the inputs
  from NFS and writing the output back to NFS (the only shared storage);
* the initiator finally reads the result file over NFS, as the result must
  end there (1.1);
* steps run one after the other, in file order, like the script.

Before the workflow each holder node uploads its parts (that is how the
data gets "on" the network file system); this placement is reported in
``extra`` and not counted in ``bytes_moved``, which is the workflow's NFS
payload: ``links["nfs->N"]`` = bytes read by node N, ``links["N->nfs"]`` =
bytes written.  Files are ``.npy`` (header + data, see ``nfs_baseline``), so
every transfer is the array bytes plus a header of 128 bytes or so.
``messages`` counts NFS file operations (one per whole-file read or write),
not RPCs.  ``wall_s`` sums the workers' own timings from after the mount to
the end of their job (an HPC node has the export mounted already); the
runner's end-to-end time including process start-up is in ``extra``.

Each job runs as a ``python -m nfs_baseline.worker`` process: inside the
node's network namespace when a :class:`~hpcflow.harness.netns.Topology` is
given (the server then runs in host ``"nfs"``), else everything on
127.0.0.1.  libnfs has no timeouts, so every worker is killed after
``worker_timeout_s``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import nfs_baseline
from hpcflow.config import timeout_scale
from hpcflow.harness.netns import Topology
from hpcflow.harness.procs import die_with_parent, signals_deferred
from hpcflow.harness.report import ApproachResult, array_checksum, compare
from hpcflow.harness.scenario import NFS_HOST, Scenario, reference_result

__all__ = ["APPROACH", "NfsApproachError", "run_nfs"]

APPROACH = "nfs"
_REPO = Path(nfs_baseline.__file__).resolve().parents[1]

Array = np.ndarray[Any, Any]
Data = Mapping[str, Sequence[tuple[str, Array]]]


class NfsApproachError(RuntimeError):
    """A worker failed or timed out (a bug or a broken server, not a missing package)."""


def _remote_parts(data: Data) -> dict[str, list[str]]:
    """Export-relative file of every part of every dataset, in row order."""
    return {name: [f"data/{name}.{k}.npy" for k in range(len(parts))]
            for name, parts in data.items()}


class _Runner:
    """Starts workers on nodes and adds up what they report."""

    def __init__(self, url: str, topology: Topology | None, timeout_s: float) -> None:
        self.url = url
        self.topology = topology
        self.timeout_s = timeout_s
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO), env.get("PYTHONPATH")]))
        self.env = env
        self.started: list[subprocess.Popen[str]] = []

    def start(self, node: str, job: dict[str, Any]) -> tuple[str, subprocess.Popen[str]]:
        argv = [sys.executable, "-m", "nfs_baseline.worker", json.dumps({**job, "url": self.url})]
        kwargs: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                                  "stderr": subprocess.PIPE, "text": True, "env": self.env,
                                  "preexec_fn": die_with_parent}
        with signals_deferred():  # see die_with_parent
            proc = (self.topology.popen(node, argv, **kwargs) if self.topology is not None
                    else subprocess.Popen(argv, **kwargs))
            self.started.append(proc)
        return node, proc

    def stop(self) -> None:
        """Kill workers still running (after a failure or Ctrl-C; libnfs has no timeouts)."""
        with signals_deferred():
            for proc in self.started:
                if proc.poll() is None:
                    proc.kill()
                # A communicate() cut short by the signal may leave its pipes half-used:
                # a teardown error must not replace the error (or signal) being unwound.
                with contextlib.suppress(OSError, ValueError):
                    proc.communicate()
                proc.wait()

    def finish(self, node: str, proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise NfsApproachError(f"{what} on {node}: no answer within {self.timeout_s:g} s "
                                   "(libnfs has no timeout; is the server reachable?)") from None
        lines = out.strip().splitlines()
        try:
            report: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            report = {}
        if proc.returncode != 0 or "work_s" not in report:
            reason = report.get("error") or (err.strip().splitlines() or ["no output"])[-1]
            raise NfsApproachError(f"{what} on {node} failed (exit {proc.returncode}): {reason}")
        return report

    def run(self, node: str, job: dict[str, Any], what: str) -> dict[str, Any]:
        return self.finish(*self.start(node, job), what)


def _place(runner: _Runner, data: Data, remote: Mapping[str, list[str]],
           workdir: Path) -> dict[str, Any]:
    """Every holder uploads its parts (one worker per node, all at once)."""
    staged = workdir / "parts"
    staged.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[list[str]]] = {}
    for name, parts in data.items():
        for (node, arr), rel in zip(parts, remote[name], strict=True):
            local = staged / Path(rel).name
            np.save(local, arr, allow_pickle=False)
            files.setdefault(node, []).append([str(local), rel])
    start = time.perf_counter()
    started = [runner.start(node, {"kind": "put", "files": f, "mkdirs": ["data", "out"]})
               for node, f in files.items()]
    reports = {node: runner.finish(node, proc, "placement") for node, proc in started}
    return {"placement_bytes": sum(r["bytes_written"] for r in reports.values()),
            "placement_links": {f"{n}->{NFS_HOST}": r["bytes_written"]
                                for n, r in reports.items()},
            "placement_wall_s": time.perf_counter() - start}


def _workflow(runner: _Runner, scenario: Scenario, remote: dict[str, list[str]],
              workdir: Path) -> tuple[list[tuple[str, dict[str, Any]]], Array, float]:
    """All steps, then the result fetch, on the initiator; returns reports and the result."""
    node = scenario.initiator
    reports = []
    start = time.perf_counter()
    for step in scenario.steps:
        out = f"out/{step.out}.npy"
        job = {"kind": "step", "op_modules": list(scenario.ops), "op": step.op,
               "params": dict(step.params), "inputs": [remote[n] for n in step.inputs],
               "output": out}
        reports.append((f"step {step.out}", runner.run(node, job, f"step {step.out}")))
        remote[step.out] = [out]
    local = workdir / "result.npy"
    job = {"kind": "get", "inputs": remote[scenario.result], "local": str(local)}
    reports.append(("result", runner.run(node, job, "result fetch")))
    elapsed = time.perf_counter() - start
    return reports, np.load(local, allow_pickle=False), elapsed


def run_nfs(scenario: Scenario, data: Data, *, topology: Topology | None = None,
            workdir: Path, worker_timeout_s: float | None = None,
            progress: Callable[[str], None] = lambda _: None) -> ApproachResult:
    """Replay *scenario* with all data on a real nfs-ganesha export.

    *data* is :func:`~hpcflow.harness.scenario.generate`'s output.  With
    *topology* (hosts: the scenario's nodes plus ``"nfs"``) the server runs in
    host ``"nfs"`` and the workers in their node's namespace.  Returns a
    skipped result with the reason when NFS cannot run here; raises
    :class:`NfsApproachError` when a worker fails.
    """
    ok, reason = nfs_baseline.available()
    if not ok:
        return ApproachResult.skip(APPROACH, reason)
    if topology is not None:
        missing = [h for h in (*scenario.nodes, NFS_HOST) if h not in topology.hosts]
        if missing:
            raise ValueError(f"topology lacks host(s) {missing} needed by {scenario.name!r}")
    scale = timeout_scale()
    timeout = worker_timeout_s if worker_timeout_s is not None else 60 * scale
    server = nfs_baseline.GaneshaServer(
        bind_addr="127.0.0.1" if topology is None else "0.0.0.0",
        netns=None if topology is None else topology.netns(NFS_HOST),
        start_timeout=10 * scale, stop_grace=10 * scale)
    try:
        server.start()
    except nfs_baseline.NfsUnavailable as exc:
        return ApproachResult.skip(APPROACH, f"NFS server could not start: {exc}")
    url = server.url if topology is None else server.url_via(topology.address(NFS_HOST))
    runner = _Runner(url, topology, timeout)
    try:
        remote = _remote_parts(data)
        progress("server up, placing the data on the export")
        placement = _place(runner, data, remote, workdir)
        progress("data placed, running the workflow")
        reports, result, elapsed = _workflow(runner, scenario, remote, workdir)
    finally:
        try:
            runner.stop()
        finally:
            server.stop()

    node = scenario.initiator
    links: Counter[str] = Counter()
    for _what, r in reports:
        links[f"{NFS_HOST}->{node}"] += r["bytes_read"]
        links[f"{node}->{NFS_HOST}"] += r["bytes_written"]
    matches, err = compare(result, reference_result(scenario, data))
    return ApproachResult(
        approach=APPROACH,
        bytes_moved=sum(links.values()),
        wall_s=sum(r["work_s"] for _what, r in reports),
        links={k: v for k, v in links.items() if v},
        messages=sum(r["ops"] for _what, r in reports),
        result_checksum=array_checksum(result),
        matches_reference=matches,
        max_abs_err=err,
        extra={**placement,
               "wall_incl_process_start_s": elapsed,
               "step_node": {s.out: node for s in scenario.steps},
               "jobs": [{"job": what, "node": node, **r} for what, r in reports],
               "netns": topology is not None,
               "url": url})
