"""The ``hpcflow`` command on bad input: one line on stderr naming the problem, a
non-zero exit, no traceback, and nothing half-written left behind.

Every case is the real command in a subprocess against real daemons.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import hpcflow
from hpcflow.config import MAX_TOML_DEPTH
from hpcflow.harness.scenario import MAX_FILE_BYTES, MAX_PARTS

from .conftest import SCALE, Cluster, NodeProc, wait_for


def hpcflow_cli(*args: str, cwd: Path | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpcflow", *args], capture_output=True,
                          text=True, timeout=timeout * SCALE, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one ``hpcflow: error:`` line mentioning ``words``."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcflow: error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cli-errors"))
    try:
        c.add("n1")
        yield c
    finally:
        c.stop()


def test_put_of_unreadable_sources_is_one_line(node: Cluster, tmp_path: Path) -> None:
    rpc = node["n1"].rpc
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "magic.npy").write_bytes(b"\x93NUMPY")  # cut inside the magic string
    with h5py.File(tmp_path / "null.h5", "w") as f:
        f.create_dataset("x", data=h5py.Empty("f8"))  # H5S_NULL: a type and no data
    with h5py.File(tmp_path / "loop.h5", "w") as f:
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
        f["ok"] = np.arange(3.0)
        f["dangling"] = h5py.ExternalLink("nowhere.h5", "/x")
    cases = [
        (["empty.npy"], ["empty.npy", "empty file"]),
        (["magic.npy"], ["magic.npy", "not a readable .npy"]),
        (["null.h5"], ["null.h5:/x", "null dataspace"]),
        (["null.h5", "--dataset", "/x"], ["null dataspace"]),
        (["loop.h5", "--dataset", "/a"], ["loop.h5:/a", "cannot be opened"]),
        (["loop.h5", "--dataset", "/dangling"], ["loop.h5", "no dataset '/dangling'"]),
        (["."], ["is a directory"]),  # was h5py's whole OSError text
    ]
    for args, words in cases:
        r = hpcflow_cli("put", "--node", rpc, "BAD", *args, cwd=tmp_path)
        one_line_error(r, "(InvalidData)", *words)
    r = hpcflow_cli("put", "--node", rpc, "BAD", "empty.npy", "--json", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "InvalidData"
    with hpcflow.connect(rpc) as c:  # nothing was stored, half or whole
        assert "BAD" not in {r.name for r in c.catalog()}
        assert c.stats()["uploads_in_progress"] == 0
    # the real dataset next to the loop is still readable
    r = hpcflow_cli("put", "--node", rpc, "OKAY", "loop.h5", "--dataset", "/ok", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_timeout_must_be_a_finite_positive_number(node: Cluster, value: str) -> None:
    r = hpcflow_cli("ls", "--node", node["n1"].rpc, "--timeout", value)
    one_line_error(r, "timeout_s must be a finite number of seconds > 0", "(InvalidData)")


def test_get_of_an_empty_dataset_says_so(node: Cluster, tmp_path: Path) -> None:
    with hpcflow.connect(node["n1"].rpc) as c:
        c.put("EMPTY", np.empty((0, 3)), overwrite=True)
    for out in ("e.h5", "e.npy"):
        r = hpcflow_cli("get", "--node", node["n1"].rpc, "EMPTY", out, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"wrote {out} (0x3 float64: empty, nothing to transfer)"
    assert np.load(tmp_path / "e.npy").shape == (0, 3)
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["/data"].shape == (0, 3)
    r = hpcflow_cli("get", "--node", node["n1"].rpc, "EMPTY", "j.h5", "--json", cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert (doc["bytes"], doc["from"], doc["shape"], doc["dtype"]) == (0, [], [0, 3], "<f8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5", "e.npy", "j.h5"]


@pytest.fixture(scope="module")
def stoppable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """n2 holds BIG; a test stops n2 (SIGSTOP) to catch a get of BIG mid-transfer.  Long
    TTLs keep n1 from giving up on the stopped holder first."""
    c = Cluster(tmp_path_factory.mktemp("stoppable"))
    try:
        c.add("n1", extra=["--ttl", str(60 * SCALE)])
        c.add("n2", via="n1", extra=["--ttl", str(60 * SCALE)])
        with c["n2"].client() as cl:
            cl.put("BIG", np.ones((2000, 64)))
        with c["n1"].client() as cl:
            cl.wait_for("BIG", 10 * SCALE)
        yield c
    finally:
        c.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("out", ["big.h5", "big.npy"])
def test_a_killed_get_leaves_no_partial_file(stoppable: Cluster, tmp_path: Path,
                                             sig: signal.Signals, out: str) -> None:
    holder = stoppable["n2"]
    assert holder.proc is not None
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        get = subprocess.Popen([sys.executable, "-m", "hpcflow", "get", "--node",
                                stoppable["n1"].rpc, "BIG", out], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if out.endswith(".h5"):  # the HDF5 output is created before the pull starts
                partial = wait_for(lambda: list(tmp_path.glob(f"{out}.partial-{get.pid}")),
                                   20, "the partial output file")
                assert partial
            else:  # the .npy is written after the pull: catch it connected and waiting
                wait_for(lambda: _connected_to(get.pid, holder), 20, "the get's connection")
            t0 = time.monotonic()
            get.send_signal(sig)
            _, err = get.communicate(timeout=20 * SCALE)
        finally:
            if get.poll() is None:
                get.kill()
                get.wait()
        assert get.returncode == 128 + sig, err
        assert time.monotonic() - t0 < 10 * SCALE
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert list(tmp_path.iterdir()) == []
    finally:
        holder.proc.send_signal(signal.SIGCONT)


_SIGNAL_MID_CODE = """
import os, signal, gevent
from hpcflow.cli import _unwind_on_signals
_unwind_on_signals()
try:
    try:
        os.kill(os.getpid(), signal.SIG%s)  # the handler runs at the next bytecode
        total = sum(range(10000))  # running code (h5py, say) is not interrupted
        print("ran on", flush=True)
    except SystemExit:
        print("raised in running code", flush=True)
    gevent.sleep(5)
    print("the wait was not interrupted", flush=True)
except SystemExit as exc:
    print("exit", exc.code, flush=True)
    raise
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_unwinds_the_get_where_it_next_waits(sig: signal.Signals) -> None:
    """A signal is not raised inside whatever code runs when it arrives (inside h5py it
    was swallowed and the get hung on its stopped holder, or became a TypeError) but
    where the command next waits, which is where its clean-up is written for."""
    r = subprocess.run([sys.executable, "-c", _SIGNAL_MID_CODE % sig.name[3:]],
                       capture_output=True, text=True, timeout=20 * SCALE)
    assert r.stdout.splitlines() == ["ran on", f"exit {128 + sig}"], r.stdout + r.stderr
    assert r.returncode == 128 + sig and r.stderr == "", r.stderr


def _connected_to(pid: int, holder: NodeProc) -> bool:
    """Whether process ``pid`` has a TCP connection to the holder's bulk port."""
    bulk = holder.info["bulk"]
    port = int(bulk.rsplit(":", 1)[1])
    r = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                       capture_output=True, text=True)
    return f"pid={pid}," in r.stdout


@pytest.mark.parametrize("body,shows", [
    ("import sys\nsys.exit(0)\n", "sys.exit(0)"),
    ("import sys\nsys.exit(3)\n", "sys.exit(3)"),
    ("raise SystemExit('bye')\n", "sys.exit('bye')"),
])
def test_an_ops_module_calling_sys_exit_stops_the_daemon_loudly(tmp_path: Path, body: str,
                                                                 shows: str) -> None:
    mod = tmp_path / "quitter.py"
    mod.write_text(body)
    r = hpcflow_cli("node", "--name", "q", "--data-dir", str(tmp_path / "q"), "--listen",
                    "127.0.0.1:0", "--ops", str(mod))
    one_line_error(r, "--ops", "quitter.py", "called " + shows, "(ConfigError)")
    assert r.returncode == 1


def _scenario(parts: str, extra: str = "") -> str:
    return f'''name = "s"
nodes = ["n1", "n2"]
initiator = "n1"
result = "M"
{extra}
[datasets.D]
shape = [{parts.count("node")}, 2]
dtype = "float64"
parts = [{parts}]
[[steps]]
out = "M"
op = "colsum"
inputs = ["D"]
params = {{}}
'''


def test_scenarios_too_deep_or_too_big_fail_before_anything_runs(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"  # tomllib recurses once per level: a RecursionError
    deep.write_text(_scenario('{ node = "n1", rows = 1 }', "x = " + "[" * 5000 + "]" * 5000))
    nested = tmp_path / "nested.toml"  # within Python's limit, beyond ours
    depth = MAX_TOML_DEPTH + 1
    nested.write_text(_scenario('{ node = "n1", rows = 1 }', "x = " + "[" * depth + "]" * depth))
    dotted = tmp_path / "dotted.toml"  # dotted keys nest too
    dotted.write_text(_scenario('{ node = "n1", rows = 1 }', "y" + ".y" * 5000 + " = 1"))
    def parts(n: int) -> str:
        return ", ".join(f'{{ node = "n{1 + i % 2}", rows = 1 }}' for i in range(n))

    huge = tmp_path / "huge.toml"  # 200,000 parts passed validation and failed mid-replay
    huge.write_text(_scenario(parts(200_000)))
    many = tmp_path / "many.toml"  # too many parts in a file of a reasonable size
    many.write_text(_scenario(parts(MAX_PARTS + 1)))
    assert many.stat().st_size < MAX_FILE_BYTES < huge.stat().st_size
    expected = ((deep, ["deep.toml", "nested more than"]),
                (nested, ["nested.toml", "nested more than"]),
                (dotted, ["dotted.toml", "nested more than"]),
                (huge, ["huge.toml", "a scenario file may have at most 1 MiB"]),
                (many, ["many.toml", "datasets.D.parts", f"at most {MAX_PARTS}"]))
    t0 = time.monotonic()  # every file is checked and reported, one line each
    r = hpcflow_cli("replay", "--approach", "decentralised", *(str(p) for p, _ in expected))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == "hpcflow: 5 of 5 scenario file(s) invalid; nothing was run", r.stderr
    assert len(lines) == 6, r.stderr
    for line, (_, words) in zip(lines, expected, strict=False):
        assert line.startswith("hpcflow: error:") and all(w in line for w in words), line
    assert r.stdout == ""  # no replay started: it would print its progress and table
    assert time.monotonic() - t0 < 30 * SCALE
    # at the limit the nesting is accepted, and the next check speaks (x is no scenario key)
    at_limit = tmp_path / "at-limit.toml"
    brackets = MAX_TOML_DEPTH - 1  # the top-level table is the first level
    at_limit.write_text(_scenario('{ node = "n1", rows = 1 }',
                                  "x = " + "[" * brackets + "]" * brackets))
    r = hpcflow_cli("replay", "--approach", "decentralised", str(at_limit))
    assert r.returncode == 1 and "x: unknown key" in r.stderr, r.stderr
    assert "nested" not in r.stderr


def test_node_config_nested_too_deep_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("name = " + "[" * 3000 + "]" * 3000 + "\n")
    r = hpcflow_cli("node", "--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    one_line_error(r, "node.toml", "nested more than", "(ConfigError)")
