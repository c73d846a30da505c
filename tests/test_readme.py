"""Every ``sh`` and ``python`` block of the README runs, in the order written, in one
directory, unless the line before it is an ``<!-- illustrative: ... -->`` comment.

The blocks name fixed ports (7101, 7201, ...); each is mapped to a free one here so
the test can run beside other clusters on the machine.  Shell blocks run in one bash
session (its ``&`` daemons live on into the later blocks), Python blocks as
``python3 -`` in the same directory; ``hpcflow`` and ``python3`` are this interpreter.
Everything the script started is in its own process group, ended at the end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import SCALE, free_port_triple

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")


def runnable_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every block that is meant to run."""
    out: list[tuple[str, str, int]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        if lang in ("sh", "python") and not before.startswith("<!-- illustrative"):
            out.append((lang, "\n".join(lines[start + 1:j]), start + 1))
        i = j + 1
    return out


def stop_group(pgid: int) -> None:
    """SIGTERM the group, wait until it is gone (SIGKILL after 30 s, scaled)."""
    deadline = time.monotonic() + 30 * SCALE
    sig = signal.SIGTERM
    while True:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        time.sleep(0.05)  # polling a process group's end: there is no event to wait on


def test_markers_leave_the_tutorial_runnable() -> None:
    blocks = runnable_blocks(README.read_text())
    code = "\n".join(c for _, c, _ in blocks)
    # the tutorial's own steps are in, what needs an allocation or a full install is not
    assert "hpcflow wait-ready 127.0.0.1:7101" in code and "flow.report()" in code
    assert "srun" not in code and "pip install" not in code and "keygen" not in code


def test_readme_blocks_run_in_order(tmp_path: Path) -> None:
    blocks = runnable_blocks(README.read_text())
    ports = sorted({int(p) for _, code, _ in blocks for p in re.findall(r"127\.0\.0\.1:(\d+)",
                                                                      code)})
    mapping: dict[int, int] = {}
    for p in ports:
        mapping[p] = free_port_triple({q + k for q in mapping.values() for k in range(3)})

    def local(code: str) -> str:
        return re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{mapping[int(m.group(1))]}",
                      code)

    script = ["set -e", 'hpcflow() { "$PY" -m hpcflow "$@"; }', 'python3() { "$PY" "$@"; }']
    for k, (lang, code, line) in enumerate(blocks):
        script.append(f"echo '=== README.md line {line} ({lang})' >&2")
        if lang == "sh":
            script.append(local(code))
        else:
            script.append(f"python3 - <<'README_PY_{k}'\n{local(code)}\nREADME_PY_{k}")
    script.append("echo '=== all blocks ran' >&2")
    (tmp_path / "readme.sh").write_text("\n".join(script) + "\n")
    env = {**os.environ, "PY": sys.executable, "HPCFLOW_TIMEOUT_SCALE": str(SCALE)}
    env.pop("HPCFLOW_KEYS", None)
    env.pop("HPCFLOW_NODE", None)
    # Files, not pipes: the daemons the blocks start inherit them and live on.
    with open(tmp_path / "out.txt", "w") as fo, open(tmp_path / "err.txt", "w") as fe:
        proc = subprocess.Popen(["bash", str(tmp_path / "readme.sh")], cwd=tmp_path, env=env,
                                stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        proc.wait(timeout=180 * SCALE)
    except subprocess.TimeoutExpired:
        raise AssertionError("README blocks did not finish:\n"
                             + (tmp_path / "err.txt").read_text()[-3000:]) from None
    finally:
        # the daemons the blocks started with `&` are in the script's process group
        stop_group(proc.pid)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"
    assert "=== all blocks ran" in err
    # what the tutorial says happened did
    assert "checksum verified" in out  # get
    assert "3 alive, 0 dead" in out  # status
    assert "optimal plan (bytes objective)" in out  # the workflow's explain
    assert (tmp_path / "out.h5").exists() and (tmp_path / "sim.h5").exists()
