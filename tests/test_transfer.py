"""The bulk path with real daemons: big data, corruption, dead peers, exact counters."""

from __future__ import annotations

import signal
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import zmq

import hpcflow
from hpcflow.errors import DatasetNotFound, PeerUnavailable
from hpcflow.rpc.bulk import from_holders
from tests.conftest import SCALE, Cluster, names_on, wait_for

MB = 1024 * 1024


def _config(tmp_path: Path, name: str, text: str) -> list[str]:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return ["--config", str(p)]


def test_fetch_over_200mb_round_trips_bit_exact(cluster: Cluster) -> None:
    rng = np.random.default_rng(7)
    data = rng.standard_normal((210 * MB // (8 * 64), 64))  # 210 MiB of float64
    with cluster["n2"].client() as c:
        rec = c.put("BIG", data)
    assert rec.nbytes == data.nbytes > 200 * MB
    wait_for(lambda: "BIG" in names_on(cluster["n1"]), 10, "BIG on n1")
    with cluster["n1"].client() as c:
        got = c.fetch("BIG")
        assert got.dtype == data.dtype and np.array_equal(got, data)
        assert c.traffic.bytes_received["n2"] == data.nbytes
    del got
    with cluster["n2"].client() as c:
        sent = c.stats()["traffic"]["bytes_sent"]
    assert sent["client@n1"] == data.nbytes  # the holder counted exactly what it sent


def test_replicate_between_daemons_counts_both_sides(cluster: Cluster) -> None:
    data = np.arange(3 * MB, dtype=np.int32).reshape(-1, 16)
    with cluster["n3"].client() as c:
        c.put("REP", data)
    wait_for(lambda: "REP" in names_on(cluster["n1"]), 10, "REP on n1")
    with cluster["n1"].client() as c:
        (copy,) = c.replicate("REP")
        assert copy.owner == "n1"
        n1 = c.stats()["traffic"]
    with cluster["n3"].client() as c:
        n3 = c.stats()["traffic"]
    assert n1["bytes_received"]["n3"] == n3["bytes_sent"]["n1"] == data.nbytes
    with cluster["n2"].client() as c:
        wait_for(lambda: len(c.locate("REP")["parts"][0]["holders"]) == 2, 10, "2 replicas")


def test_corrupted_chunk_in_flight_is_detected_and_retried(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    bad = c.add("bad", extra=_config(tmp_path, "bad", "fault_corrupt_chunks = 2\n"))
    data = np.random.default_rng(3).random((2 * MB // 8 * 5,))  # 10 MiB, several chunks
    with bad.client() as cl:
        cl.put("D", data)
        got = cl.fetch("D")
        assert np.array_equal(got, data)
        assert cl.traffic.chunk_retries == 2  # both corruptions caught by the chunk digest


def test_corruption_at_rest_is_reported(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    n = c.add("disk")
    data = np.arange(1_000_000, dtype=np.float64)
    with n.client() as cl:
        rec = cl.put("D", data)
    path = n.data_dir / "datasets" / "D.h5"
    with h5py.File(path, "r") as f:
        offset = f["data"].id.get_offset()
    with open(path, "r+b") as fh:  # a bit flip on disk, behind the daemon's back
        fh.seek(offset + 123_456)
        b = fh.read(1)
        fh.seek(offset + 123_456)
        fh.write(bytes([b[0] ^ 0x01]))
    with n.client() as cl, pytest.raises(hpcflow.IntegrityError, match="corrupted"):
        cl.fetch("D")
    assert rec.checksum  # the record itself is unchanged


def test_holder_dying_mid_transfer_gives_clear_error(cluster: Cluster) -> None:
    data = np.zeros((40 * MB // 8,))
    with cluster["n2"].client() as c:
        c.put("DIE", data)
    wait_for(lambda: "DIE" in names_on(cluster["n1"]), 10, "DIE on n1")
    killed = []

    def kill_on_first_chunk(done: int, total: int) -> None:
        if not killed:
            cluster["n2"].kill(signal.SIGKILL)
            killed.append(done)

    with hpcflow.connect(cluster["n1"].rpc, timeout_s=2) as c:
        with pytest.raises(hpcflow.PeerUnavailable, match="n2"):
            c.fetch("DIE", progress=kill_on_first_chunk)
        assert c.ping()["name"] == "n1"
    assert killed


def test_abandoned_upload_leaves_nothing_behind(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    n = c.add("up", extra=_config(tmp_path, "up", "transfer_timeout_s = 0.5\n"))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(n.info["bulk"])
    s.send_multipart([b"PUT", msgpack.packb({
        "r": 1, "name": "HALF", "part": None, "shape": [4 * MB], "dtype": "<u1",
        "chunk_bytes": MB, "by": "crasher"})])
    assert s.poll(10_000 * SCALE)
    verb, hdr = s.recv_multipart()
    assert verb == b"OK"
    u = msgpack.unpackb(hdr)["u"]
    s.send_multipart([b"DATA", msgpack.packb({"r": 1, "u": u, "i": 0, "d": 0}), b"x" * MB])
    s.recv_multipart()  # NACK: wrong digest, nothing written
    s.close()
    ctx.term()  # the "client" is gone without END or ABORT
    tmp_files = lambda: list((n.data_dir / "datasets").glob(".tmp-*"))  # noqa: E731
    wait_for(lambda: not tmp_files(), 10, "the server to discard the abandoned upload")
    with n.client() as cl:
        assert "HALF" not in {r.name for r in cl.catalog()}
        assert cl.stats()["uploads_in_progress"] == 0


def test_truncated_hdf5_source_is_refused_cleanly(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "t.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("x", data=np.zeros((1000, 100)))
    raw = src.read_bytes()
    src.write_bytes(raw[: len(raw) // 2])
    with cluster["n1"].client() as c:
        with pytest.raises(hpcflow.InvalidData, match="truncated"):
            c.put("T", src, dataset="x")
        assert "T" not in {r.name for r in c.catalog()}
    assert not list((cluster["n1"].data_dir / "datasets").glob(".tmp-*"))


def test_fetch_to_file_and_npy_sources(cluster: Cluster, tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 100, (3000, 7), dtype=np.int16)
    npy = tmp_path / "a.npy"
    np.save(npy, arr)
    with cluster["n2"].client() as c:
        c.put("NPY", npy)
    wait_for(lambda: "NPY" in names_on(cluster["n3"]), 10, "NPY on n3")
    with cluster["n3"].client() as c:
        out = c.fetch_to("NPY", tmp_path / "out.h5", h5path="/deep/group/arr")
    with h5py.File(out) as f:
        assert np.array_equal(f["/deep/group/arr"][...], arr)
    assert not list(tmp_path.glob("out.h5.partial-*"))


@pytest.mark.parametrize("name,path", [
    ("cu.h5md", "/particles/atoms/position"),
    ("cobrotoxin.h5md", "/particles/trajectory/position/value"),
    ("coordinates/test.h5md", "/particles/trajectory/position"),
])
def test_real_h5md_files_round_trip(cluster: Cluster, real_h5md: Path, tmp_path: Path,
                                    name: str, path: str) -> None:
    src = real_h5md / name
    with h5py.File(src, "r") as f:
        obj = f[path]
        want = (obj["value"] if isinstance(obj, h5py.Group) else obj)[...]
    key = "REAL_" + Path(name).stem
    with cluster["n2"].client() as c:
        rec = c.put(key, src, dataset=path)
    assert rec.shape == want.shape and rec.dtype == want.dtype.str
    wait_for(lambda: key in names_on(cluster["n1"]), 10, f"{key} on n1")
    with cluster["n1"].client() as c:
        got = c.fetch(key)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    # A truncated copy of the same real file is refused with a clear error, nothing stored.
    cut = tmp_path / "cut.h5md"
    raw = src.read_bytes()
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    with cluster["n2"].client() as c, pytest.raises(hpcflow.InvalidData):
        c.put(key + "_cut", cut, dataset=path)
    assert key + "_cut" not in names_on(cluster["n1"])


def _raw_put(s: zmq.Socket, r: int, shape: list[int], **kw: object) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    s.send_multipart([b"PUT", msgpack.packb({
        "r": r, "name": f"RAW{r}", "part": None, "shape": shape, "dtype": "<u1",
        "chunk_bytes": MB, "by": "raw", **kw})])
    assert s.poll(10_000 * SCALE), "no answer to PUT"
    verb, hdr = s.recv_multipart()
    return verb, msgpack.unpackb(hdr)


def test_failed_uploads_are_typed_and_leave_no_temp_file(tmp_path: Path) -> None:
    """A node whose files may not exceed 64 MiB (RLIMIT_FSIZE: the "disk full" of this
    test): uploads it cannot hold fail with a typed error, and nothing is left behind."""
    from tests.conftest import NodeProc

    n = NodeProc("small", tmp_path / "small", [], [])
    n.prefix = ["prlimit", f"--fsize={64 * MB}", "--"]
    n.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(n.info["bulk"])
    tmp_files = lambda: list((n.data_dir / "datasets").glob(".tmp-*"))  # noqa: E731
    try:
        verb, hdr = _raw_put(s, 1, [2**44], chunk_bytes=16 * MB)  # 16 TiB: "File too large"
        assert verb == b"ERR" and hdr["type"] == "StoreError", hdr
        assert not tmp_files()
        verb, hdr = _raw_put(s, 2, [2**62, 8])  # overflows int64 sizes: no MemoryError
        assert verb == b"ERR" and hdr["type"] == "InvalidData" and "PiB" in hdr["msg"], hdr
        verb, hdr = _raw_put(s, 3, [4], nparts="2", part=0)
        assert verb == b"ERR" and hdr["type"] == "InvalidData", hdr
        with n.client() as c:
            with pytest.raises(hpcflow.StoreError):
                c.put("TOOBIG", np.zeros(100 * MB, np.uint8))
            assert not tmp_files()
            assert c.stats()["uploads_in_progress"] == 0
            c.put("FITS", np.arange(1000))  # still serving
            assert c.fetch("FITS").tolist() == list(range(1000))
    finally:
        s.close()
        ctx.term()
        n.kill(signal.SIGTERM)


def test_only_the_uploading_client_can_abort_its_upload(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    n = c.add("ab")
    ctx = zmq.Context()
    owner, other = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (owner, other):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(n.info["bulk"])
    try:
        verb, hdr = _raw_put(owner, 1, [MB])
        assert verb == b"OK"
        u = hdr["u"]
        other.send_multipart([b"ABORT", msgpack.packb({"r": 1, "u": u})])
        probe = {"r": 2, "key": "NOPE", "v": 1, "i": 0, "by": "x"}
        other.send_multipart([b"GET", msgpack.packb(probe)])
        assert other.poll(10_000 * SCALE)
        other.recv_multipart()  # the server has handled the ABORT by now
        payload = np.full(MB, 3, np.uint8)
        from hpcflow.catalog.chunking import chunk_digest, dataset_checksum

        d = chunk_digest(payload)
        owner.send_multipart([b"DATA", msgpack.packb({"r": 1, "u": u, "i": 0, "d": d}),
                              payload])
        assert owner.poll(10_000 * SCALE)
        assert owner.recv_multipart()[0] == b"ACK"  # the upload survived the stranger's ABORT
        owner.send_multipart([b"END", msgpack.packb(
            {"r": 1, "u": u, "checksum": dataset_checksum((MB,), "|u1", MB, [d])})])
        assert owner.poll(10_000 * SCALE)
        assert owner.recv_multipart()[0] == b"DONE"
        with n.client() as cl:
            assert cl.fetch("RAW1").sum() == 3 * MB
    finally:
        owner.close()
        other.close()
        ctx.term()


def test_chunk_replies_travel_in_frames_of_at_most_1_mib(cluster: Cluster) -> None:
    """The wire format: a 4 MiB chunk comes back as several <= 1 MiB frames that
    concatenate to the chunk whose digest the header carries (and that a fetch
    reassembles at the right offsets, including a short last chunk)."""
    from hpcflow.catalog.chunking import chunk_digest

    data = np.random.default_rng(3).integers(0, 255, 9 * MB + 12345, dtype=np.uint8)
    with cluster["n2"].client() as c:
        rec = c.put("FRAMED", data, chunk_bytes=4 * MB)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(cluster["n2"].info["bulk"])
    try:
        for i, size in [(0, 4 * MB), (2, MB + 12345)]:
            s.send_multipart([b"GET", msgpack.packb({"r": 9, "key": "FRAMED", "v": rec.version,
                                                     "i": i, "by": "test"})])
            assert s.poll(10_000 * SCALE), "no CHUNK reply"
            verb, hdr, *frames = s.recv_multipart()
            assert verb == b"CHUNK"
            assert all(len(f) <= MB for f in frames) and len(frames) == -(-size // MB)
            joined = b"".join(frames)
            assert joined == data[i * 4 * MB : i * 4 * MB + size].tobytes()
            assert msgpack.unpackb(hdr)["d"] == chunk_digest(joined)
    finally:
        s.close()
        ctx.term()
    with cluster["n1"].client() as c:
        wait_for(lambda: "FRAMED" in names_on(cluster["n1"]), 10, "FRAMED on n1")
        assert np.array_equal(c.fetch("FRAMED"), data)


def test_fetch_into_a_reused_array_and_refusals_that_touch_nothing(cluster: Cluster) -> None:
    rows = np.arange(6 * 4096, dtype=np.float64).reshape(-1, 8)
    half = len(rows) // 2
    with cluster["n2"].client() as c:
        c.put("OUT", rows[:half], part=0, nparts=2)
    with cluster["n3"].client() as c:
        c.put("OUT", rows[half:], part=1, nparts=2)
    with cluster["n1"].client() as c:
        wait_for(lambda: not c.locate("OUT")["missing"], 10, "both parts of OUT on n1")
        buf = np.full_like(rows, -1.0)
        assert c.fetch("OUT", out=buf) is buf
        assert np.array_equal(buf, rows)
        buf[:] = -1.0
        assert c.fetch("OUT", out=buf) is buf and np.array_equal(buf, rows)  # reused
        part1 = np.zeros((len(rows) - half, 8))
        assert np.array_equal(c.fetch("OUT", part=1, out=part1), rows[half:])
        before = dict(c.traffic.bytes_received)
        for bad, why in [
            (np.zeros((len(rows), 4)), r"out is \[.*, 4\] <f8 but OUT is \[.*, 8\] <f8"),
            (np.zeros(rows.shape, np.float32), "<f4 but OUT"),
            (np.zeros((8, len(rows))).T, "C-contiguous"),
            (rows.tolist(), "numpy array, not list"),
        ]:
            with pytest.raises(hpcflow.InvalidData, match=why):
                c.fetch("OUT", out=bad)
        ro = np.full_like(rows, 7.0)
        ro.flags.writeable = False
        with pytest.raises(hpcflow.InvalidData, match="writeable"):
            c.fetch("OUT", out=ro)
        assert np.all(ro == 7.0)
        assert dict(c.traffic.bytes_received) == before  # refused before any byte moved


class _Holder:
    def __init__(self, owner: str) -> None:
        self.owner = owner


def test_from_holders_order_skips_and_errors() -> None:
    """The one failover loop: preferred source, then our copy, then the rest in order;
    holders without an endpoint are skipped; the error names every holder."""
    holders = [_Holder(n) for n in ("a", "b", "me", "src", "dead")]
    endpoints = {"a": "tcp://a", "b": "tcp://b", "me": "tcp://me", "src": "tcp://src"}
    tried: list[str] = []

    def failing(h: _Holder, ep: str | None) -> None:
        tried.append(h.owner)
        raise PeerUnavailable(f"{h.owner} timed out")

    with pytest.raises(PeerUnavailable) as err:
        from_holders(holders, failing, endpoints.get, what="DS", prefer="src", here="me")
    assert tried == ["src", "me", "a", "b"]
    assert "no holder of DS answered" in str(err.value)
    assert "dead is not alive" in str(err.value) and "b timed out" in str(err.value)

    # the first that works wins; its result comes back with it
    def second_works(h: _Holder, ep: str | None) -> str:
        if h.owner == "me":
            raise PeerUnavailable("busy")
        return f"{h.owner}@{ep}"

    used, got = from_holders(holders, second_works, endpoints.get, what="DS", here="me")
    assert (used.owner, got) == ("a", "a@tcp://a")

    # our own copy is read locally (no endpoint needed) with local=True
    used, got = from_holders(holders, lambda h, ep: ep, {}.get, what="DS", here="me", local=True)
    assert (used.owner, got) == ("me", None)

    # other errors pass through unless listed in retry_on
    def missing(h: _Holder, ep: str | None) -> str:
        if h.owner == "a":
            raise DatasetNotFound("gone")
        return h.owner

    with pytest.raises(DatasetNotFound):
        from_holders(holders, missing, endpoints.get, what="DS")
    assert from_holders(holders, missing, endpoints.get, what="DS",
                        retry_on=(PeerUnavailable, DatasetNotFound))[1] == "b"
