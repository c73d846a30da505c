"""One job of the NFS baseline, run as its own process on one (emulated) node.

``python -m nfs_baseline.worker JOB`` takes a JSON job as its argument, does it over
NFSv3 with :class:`~nfs_baseline.client.NfsClient` and prints one JSON line
with its byte counters on stdout.  A process per job because each job belongs
to a node: with network namespaces the harness starts it inside that node's
namespace (``ip netns exec``), so its NFS traffic really crosses that node's
link to the NFS host.  Jobs::

    {"kind": "put",  "url": U, "files": [[LOCAL_NPY, REMOTE], ...], "mkdirs": [DIR, ...]}
    {"kind": "step", "url": U, "op_modules": [...], "op": NAME, "params": {...},
     "inputs": [[REMOTE_PART, ...], ...], "output": REMOTE}
    {"kind": "get",  "url": U, "inputs": [REMOTE_PART, ...], "local": LOCAL_NPY}

A dataset is one or more ``.npy`` part files in row order; a step reads all
parts of each input and writes its output as one file.  Output::

    {"bytes_read": int, "bytes_written": int, "ops": int, "mount_s": float, "work_s": float}

``work_s`` runs from after the mount to the end of the job: a conventional
cluster has the export mounted already, and interpreter start-up is an
artefact of one-process-per-job.  On failure: exit status 1, ``{"error":
"Type: message"}`` on stdout and the traceback on stderr.  ``step`` needs
``hpcflow.ops`` (imported lazily: the rest of this package does not depend
on hpcflow).  libnfs calls have no timeout; the caller must bound the process.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import numpy as np

from nfs_baseline.client import NfsClient

__all__ = ["main", "run_job"]


def _put(client: NfsClient, job: dict[str, Any]) -> None:
    for directory in job.get("mkdirs", []):
        client.makedirs(directory)
    for local, remote in job["files"]:
        client.write_array(remote, np.load(local, mmap_mode="r", allow_pickle=False))


def _read_parts(client: NfsClient, parts: list[str]) -> np.ndarray[Any, Any]:
    arrays = [client.read_array(p) for p in parts]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _step(client: NfsClient, job: dict[str, Any]) -> None:
    from hpcflow import ops

    for module in job.get("op_modules", []):
        ops.load_op_module(module)
    inputs = [_read_parts(client, parts) for parts in job["inputs"]]
    client.write_array(job["output"], ops.apply(ops.get_op(job["op"]), inputs, job["params"]))


def _get(client: NfsClient, job: dict[str, Any]) -> None:
    np.save(job["local"], _read_parts(client, job["inputs"]), allow_pickle=False)


_KINDS = {"put": _put, "step": _step, "get": _get}


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Do *job* and return its counters (see the module docstring)."""
    action = _KINDS.get(job.get("kind", ""))
    if action is None:
        raise ValueError(f"unknown job kind {job.get('kind')!r} (known: {', '.join(_KINDS)})")
    start = time.perf_counter()
    with NfsClient(job["url"]) as client:
        mounted = time.perf_counter()
        action(client, job)
        done = time.perf_counter()
        return {"bytes_read": client.bytes_read, "bytes_written": client.bytes_written,
                "ops": client.ops, "mount_s": mounted - start, "work_s": done - mounted}


def main() -> int:
    try:
        if len(sys.argv) != 2:
            raise ValueError("usage: python -m nfs_baseline.worker JOB_JSON")
        report = run_job(json.loads(sys.argv[1]))
    except Exception as exc:
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
