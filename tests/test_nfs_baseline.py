"""The NFS baseline against a real nfs-ganesha: data path, counters, lifecycle.

Every test talks NFSv3 over real sockets to a real server process; skipped
with the reason from ``nfs_baseline.available()`` where that is impossible
(not root, packages missing).  Waits are bounded by ``HPCFLOW_TIMEOUT_SCALE``
x a base and never used for synchronisation.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nfs_baseline import GaneshaServer, NfsClient, NfsUnavailable, available
from nfs_baseline.client import CHUNK_BYTES

# Real NFS servers, network namespaces and whole replays: one xdist worker runs
# them one after another (tests/conftest.py), the rest of the suite beside them.
pytestmark = pytest.mark.xdist_group("hosts")

SCALE = float(os.environ.get("HPCFLOW_TIMEOUT_SCALE", "1"))
REPO = str(Path(__file__).resolve().parents[1])
OK, REASON = available()
needs_nfs = pytest.mark.skipif(not OK, reason=f"NFS baseline unavailable: {REASON}")


def new_server(**kwargs: Any) -> GaneshaServer:
    return GaneshaServer(start_timeout=10 * SCALE, stop_grace=10 * SCALE, **kwargs)


def npy_size(arr: np.ndarray[Any, Any]) -> int:
    buf = io.BytesIO()
    np.save(buf, arr)
    return len(buf.getvalue())


def running(pid: int) -> bool:
    """True if *pid* exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def server() -> Iterator[GaneshaServer]:
    with new_server() as srv:
        yield srv


@needs_nfs
def test_20mib_array_roundtrip_is_bit_exact_and_counted(server: GaneshaServer) -> None:
    arr = np.random.default_rng(7).standard_normal((2560, 1024))  # 20 MiB float64
    assert arr.nbytes == 20 << 20 and arr.nbytes > 4 * CHUNK_BYTES  # several chunks
    size = npy_size(arr)
    with NfsClient(server.url) as writer:
        writer.makedirs("runs/r1")
        assert writer.write_array("runs/r1/x.npy", arr) == size
        assert (writer.bytes_written, writer.bytes_read, writer.ops) == (size, 0, 2)
    with NfsClient(server.url) as reader:  # separate mount: nothing cached client-side
        out = reader.read_array("runs/r1/x.npy")
        assert (reader.bytes_read, reader.bytes_written, reader.ops) == (size, 0, 1)
        assert reader.listdir("runs/r1") == ["x.npy"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()
    # it really is a standard .npy on the exported directory (reading is safe)
    assert server.export_dir is not None
    assert np.array_equal(np.load(server.export_dir / "runs/r1/x.npy"), arr)


@needs_nfs
@pytest.mark.parametrize("arr", [
    np.arange(10, dtype=np.int16),
    np.zeros((0, 3)),
    np.array(3.5, dtype=np.float32),
    np.asfortranarray(np.arange(60.0).reshape(6, 10)),
    np.arange(2000.0).reshape(40, 50)[::3, ::2],  # non-contiguous view
    np.array(["2020-01-01", "2021-05-05"], dtype="datetime64[D]"),
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
    np.frombuffer(b"read-only buffer", dtype=np.uint8),
], ids=["int16", "empty", "scalar", "fortran", "strided", "datetime", "struct", "readonly"])
def test_array_layouts_roundtrip(server: GaneshaServer, arr: np.ndarray[Any, Any]) -> None:
    with NfsClient(server.url) as c:
        c.write_array("layout.npy", arr)
        out = c.read_array("layout.npy")
        assert c.bytes_written == c.bytes_read == npy_size(arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr) and out.tobytes("A") == np.asarray(arr).tobytes("A")


@needs_nfs
def test_bytes_and_namespace_operations(server: GaneshaServer) -> None:
    with NfsClient(server.url) as c:
        c.makedirs("ns/sub")
        assert c.write_bytes("ns/sub/b.bin", b"hello") == 5
        assert c.read_bytes("ns/sub/b.bin") == b"hello"
        assert c.exists("ns/sub/b.bin") and not c.exists("ns/sub/nope")
        assert c.listdir("ns") == ["sub"]
        c.remove("ns/sub/b.bin")
        assert c.listdir("ns/sub") == []
        with pytest.raises(FileNotFoundError):
            c.remove("ns/sub/b.bin")
        with pytest.raises(FileNotFoundError):
            c.read_array("ns/sub/b.bin")
        with pytest.raises(ValueError, match=r"\.\."):
            c.exists("../etc/passwd")
        assert (c.bytes_written, c.bytes_read) == (5, 5)
    with pytest.raises(ValueError, match="closed"):
        c.exists("ns")
    with pytest.raises(OSError, match="mount"):
        NfsClient(server.url.replace(str(server.export_dir), "/not/exported"))


@needs_nfs
def test_port_in_use_is_reported(server: GaneshaServer) -> None:
    with pytest.raises(NfsUnavailable, match=r"2049 .* in use"):
        new_server().start()


@needs_nfs
def test_stop_leaves_no_processes_and_frees_ports() -> None:
    srv = new_server()
    with pytest.raises(RuntimeError, match="boom"), srv:
        pids, workdir = srv.pids, srv.workdir
        assert len(pids) in (1, 2) and all(map(running, pids)) and accepts(2049)
        with NfsClient(srv.url) as c:
            c.write_bytes("f", b"x")
        raise RuntimeError("boom")  # teardown must also happen on exceptions
    assert not any(map(running, pids))
    assert not accepts(2049) and not accepts(20048)
    assert workdir is not None and not workdir.exists() and not srv.running


def test_missing_binary_gives_clear_reason() -> None:
    ok, reason = available(ganesha_bin="/nonexistent/ganesha.nfsd")
    assert not ok
    expected = "/nonexistent/ganesha.nfsd' not found" if os.geteuid() == 0 else "root"
    assert expected in reason
    srv = GaneshaServer(ganesha_bin="/nonexistent/ganesha.nfsd")
    with pytest.raises(NfsUnavailable, match=expected):
        srv.start()
    assert srv.pids == [] and srv.workdir is None


CLIENT = """
import json, sys
import numpy as np
from nfs_baseline import NfsClient
with NfsClient(sys.argv[1]) as c:
    a = np.arange(1 << 19, dtype=np.float64)  # 4 MiB
    c.write_array("remote.npy", a)
    ok = bool(np.array_equal(c.read_array("remote.npy"), a))
    print(json.dumps([ok, c.bytes_written, c.bytes_read]))
"""


@needs_nfs
def test_server_in_network_namespace() -> None:
    netns = pytest.importorskip("hpcflow.harness.netns")
    ok, reason = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with netns.Topology(["nfs", "c1"], bandwidth_gbit=1.0) as topo, \
            new_server(bind_addr="0.0.0.0", netns=topo.netns("nfs"), nfs_port=12049) as srv:
        proc = topo.popen("c1", [sys.executable, "-c", CLIENT, srv.url_via(topo.address("nfs"))],
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
        out, _ = proc.communicate(timeout=60 * SCALE)
        size = npy_size(np.arange(1 << 19, dtype=np.float64))
        assert json.loads(out) == [True, size, size]
        assert not accepts(12049)  # only reachable inside the emulated cluster
