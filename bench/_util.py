"""Shared helpers for benchmarks: start local daemons as processes, wait for them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def start_node(root: Path, name: str, peers: list[str], extra: list[str] | None = None
               ) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    data = root / name
    data.mkdir(parents=True, exist_ok=True)
    (data / "node.json").unlink(missing_ok=True)
    args = [sys.executable, "-m", "hpcflow", "node", "--name", name, "--data-dir", str(data),
            "--listen", "127.0.0.1:0", "--log-level", "WARNING", *(extra or [])]
    for p in peers:
        args += ["--peer", p]
    log = open(root / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not (data / "node.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {name} failed to start; see {root / name}.log")
        time.sleep(0.02)
    return proc, json.loads((data / "node.json").read_text())


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]
