"""H5MD in and out: units, step/time and the source survive a put, come back from
``metadata``, go out again as a valid H5MD element, and follow per-frame op results.

Real files nobody here wrote (MDAnalysisTests' ``cobrotoxin.h5md`` in nm, ZnH5MD's
``cu.h5md``), real daemons on loopback, and MDAnalysis reading hpcflow's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import zmq

import hpcflow
from hpcflow.errors import DatasetNotFound, InvalidData, PermissionDenied

from .conftest import SCALE, Cluster, three_nodes, wait_for

POS = "/particles/trajectory/position"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three nodes for the whole module (n2 joins through n1, n3 through n2): every
    test uses its own dataset names.  A test that kills a node makes its own."""
    with three_nodes(tmp_path_factory.mktemp("h5md")) as c:
        yield c


def test_put_keeps_units_time_step_and_source(shared: Cluster, real_h5md: Path) -> None:
    src = real_h5md / "cobrotoxin.h5md"
    with h5py.File(src) as f:
        want = f[f"{POS}/value"][...]
        t, step = f[f"{POS}/time"][...], f[f"{POS}/step"][...]
    with shared["n2"].client() as c:
        rec = c.put("COBRO", src, dataset=POS)
        assert rec.lineage["source"]["file"] == str(src.resolve())
        assert rec.lineage["source"]["path"] == f"{POS}/value"
        assert rec.lineage["source"]["rows"] == [0, 3]
        assert rec.lineage["h5md"]["unit"] == "nm"
        assert rec.lineage["h5md"]["time"]["unit"] == "ps"
        # the per-frame arrays stay out of the catalog's records
        assert "data" not in str(rec.lineage["h5md"]["time"])
    with shared["n1"].client() as c:  # asked from another node: the holder sends them
        c.wait_for("COBRO", timeout_s=30)
        meta = c.metadata("COBRO")
        assert meta["unit"] == "nm" and meta["time_unit"] == "ps"
        assert meta["element"] == POS
        np.testing.assert_array_equal(meta["time"], t)
        np.testing.assert_array_equal(meta["step"], step)
        assert meta["time"].dtype == t.dtype and meta["step"].dtype == step.dtype
        assert meta["sources"][0]["path"] == f"{POS}/value"
        part = c.metadata("COBRO", rows=(1, 3))
        np.testing.assert_array_equal(part["time"], t[1:3])
        assert c.describe("COBRO")["records"][0]["lineage"]["h5md"]["unit"] == "nm"
        np.testing.assert_array_equal(c.fetch("COBRO"), want)


def test_fixed_interval_step_and_time(shared: Cluster, tmp_path: Path) -> None:
    """H5MD's scalar form: frame i at offset + i * interval, for the rows put."""
    path = tmp_path / "fixed.h5md"
    with h5py.File(path, "w") as f:
        el = f.create_group("/particles/all/position")
        el["value"] = np.arange(10 * 4 * 3, dtype=np.float32).reshape(10, 4, 3)
        el["value"].attrs["unit"] = "Angstrom"
        el["step"] = np.int64(100)
        el["step"].attrs["offset"] = np.int64(1000)
        el["time"] = np.float64(0.5)
        el["time"].attrs["offset"] = np.float64(2.0)
        el["time"].attrs["unit"] = "ps"
    with shared["n1"].client() as c:
        rec = c.put("FIXED", path, dataset="/particles/all/position")
        assert rec.lineage["h5md"]["step"]["form"] == "linear"
        meta = c.metadata("FIXED")
        np.testing.assert_array_equal(meta["step"], 1000 + 100 * np.arange(10))
        np.testing.assert_allclose(meta["time"], 2.0 + 0.5 * np.arange(10))
        assert meta["step"].dtype == np.int64
        np.testing.assert_allclose(c.metadata("FIXED", rows=(7, 10))["time"], [5.5, 6.0, 6.5])


def test_plain_array_and_plain_dataset_have_no_axis(shared: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["/data"] = np.ones((4, 2))
    with shared["n1"].client() as c:
        c.put("MEM", np.ones((3, 2)))
        meta = c.metadata("MEM")
        assert meta["time"] is None and meta["step"] is None and meta["unit"] is None
        assert meta["sources"] == []
        rec = c.put("PLAIN", path)
        assert rec.lineage["source"]["path"] == "/data"
        assert "h5md" not in rec.lineage
        assert c.metadata("PLAIN")["time"] is None


def test_malformed_element_is_refused_and_nothing_stored(shared: Cluster,
                                                         tmp_path: Path) -> None:
    for bad in ("short_time", "text_time", "unit_number", "step_group"):
        path = tmp_path / f"{bad}.h5md"
        with h5py.File(path, "w") as f:
            el = f.create_group("/particles/all/position")
            el["value"] = np.zeros((5, 2, 3))
            el["time"] = np.arange(5.0)
            if bad == "step_group":
                el.create_group("step")
            else:
                el["step"] = np.arange(5)
            if bad == "short_time":
                del el["time"]
                el["time"] = np.arange(4.0)
            elif bad == "text_time":
                del el["time"]
                el["time"] = np.array([b"a"] * 5)
            elif bad == "unit_number":
                el["value"].attrs["unit"] = 3
        with shared["n1"].client() as c:
            with pytest.raises(InvalidData):
                c.put("BAD", path, dataset="/particles/all/position")
            assert not [r for r in c.catalog() if r.name == "BAD"], bad
        assert not list((shared["n1"].data_dir).glob("**/BAD*"))


def _frames(path: Path) -> list[tuple[np.ndarray, float, int]]:
    """What MDAnalysis reads from an H5MD file: positions (Angstrom), time, step per frame."""
    from MDAnalysis.coordinates.H5MD import H5MDReader

    r = H5MDReader(str(path))
    try:
        return [(ts.positions.copy(), float(ts.time), int(ts.data["step"])) for ts in r]
    finally:
        r.close()


@pytest.mark.parametrize("name, element", [("cobrotoxin.h5md", POS),
                                           ("cu.h5md", "/particles/atoms/position")])
def test_h5md_out_reads_in_mdanalysis_as_the_original(shared: Cluster, real_h5md: Path,
                                                      tmp_path: Path, name: str,
                                                      element: str) -> None:
    pytest.importorskip("MDAnalysis")
    src = real_h5md / name
    ds = "TRAJ_" + name.split(".")[0]
    with shared["n2"].client() as c:
        c.put(ds, src, dataset=element)
    out = tmp_path / "out.h5md"
    with shared["n3"].client() as c:
        c.wait_for(ds, timeout_s=30)
        assert c.fetch_to(ds, out) == out
    with h5py.File(out) as f, h5py.File(src) as g:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/creator"].attrs["name"] == "hpcflow"
        assert f["h5md/author"].attrs["name"]
        assert f[f"{element}/value"].attrs["unit"] == g[f"{element}/value"].attrs["unit"]
        assert f[f"{element}/time"].attrs["unit"] == g[f"{element}/time"].attrs["unit"]
        np.testing.assert_array_equal(f[f"{element}/step"][...], g[f"{element}/step"][...])
    ours, theirs = _frames(out), _frames(src)
    assert len(ours) == len(theirs) > 1
    for (p, t, s), (p0, t0, s0) in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(p, p0, rtol=1e-6)
        assert t == pytest.approx(t0) and s == s0
    if name == "cobrotoxin.h5md":  # nm in the file: MDAnalysis converted ours too
        with h5py.File(src) as g:
            np.testing.assert_allclose(ours[1][0], g[f"{element}/value"][1] * 10, rtol=1e-6)


def test_cli_get_h5md_and_plain(shared: Cluster, real_h5md: Path, tmp_path: Path) -> None:
    src = real_h5md / "cobrotoxin.h5md"
    with shared["n1"].client() as c:
        c.put("COB", src, dataset=POS)
    node = shared["n1"].rpc
    out = tmp_path / "cob.h5md"
    r = subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node", node, "--json",
                        "COB", str(out)], capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [3, 19385, 3]
    with h5py.File(out) as f:
        np.testing.assert_allclose(f[f"{POS}/time"][...], [0, 50, 100])
        assert f[f"{POS}/value"].attrs["unit"] == "nm"
    plain = tmp_path / "cob.h5"  # not .h5md: the array at /data as before, unless --h5md
    r = subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node", node, "COB",
                        str(plain)], capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 0, r.stderr
    with h5py.File(plain) as f:
        assert list(f) == ["data"]
    r = subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node", node, "--h5md",
                        "--h5path", "/particles/p/position", "COB", str(plain)],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 0, r.stderr
    with h5py.File(plain) as f:
        assert f["/particles/p/position/value"].shape == (3, 19385, 3)
        assert f["/particles/p/box"].attrs["dimension"] == 3
    r = subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node", node, "--h5md",
                        "COB", str(tmp_path / "cob.npy")],
                       capture_output=True, text=True, timeout=60 * SCALE)
    assert r.returncode == 1 and "--h5md" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("cob.npy*"))


def test_h5md_out_of_a_plain_dataset_numbers_its_frames(shared: Cluster,
                                                       tmp_path: Path) -> None:
    with shared["n1"].client() as c:
        c.put("OBS", np.arange(6.0).reshape(3, 2))
        out = c.fetch_to("OBS", tmp_path / "obs.h5md")
        with pytest.raises(InvalidData):
            c.fetch_to("OBS", tmp_path / "bad.h5md", h5path="/particles/../x")
        assert not list(tmp_path.glob("bad.h5md*"))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["/observables/OBS/value"][...],
                                      np.arange(6.0).reshape(3, 2))
        np.testing.assert_array_equal(f["/observables/OBS/step"][...], [0, 1, 2])
        assert "time" not in f["/observables/OBS"]


def _element_file(path: Path, frames: range) -> np.ndarray:
    """An H5MD file whose position element holds ``frames`` of a 12-frame trajectory
    (step 10 i, time 0.5 i ps, positions in nm)."""
    rng = np.random.default_rng(7)
    full = rng.random((12, 5, 3)).astype(np.float32)
    with h5py.File(path, "w") as f:
        el = f.create_group("/particles/all/position")
        el["value"] = full[frames.start:frames.stop]
        el["value"].attrs["unit"] = "nm"
        el["step"] = 10 * np.arange(frames.start, frames.stop)
        el["time"] = 0.5 * np.arange(frames.start, frames.stop)
        el["time"].attrs["unit"] = "ps"
    return full


def test_source_metadata_cuts_time_and_step_to_the_rows_put(tmp_path: Path) -> None:
    from hpcflow.h5md import axis_values
    from hpcflow.sources import source_metadata

    path = tmp_path / "t.h5md"
    _element_file(path, range(0, 12))
    lineage, aux = source_metadata(path, "/particles/all/position", rows=(3, 7))
    np.testing.assert_array_equal(aux["step"], [30, 40, 50, 60])
    np.testing.assert_allclose(aux["time"], [1.5, 2.0, 2.5, 3.0])
    assert lineage["source"]["rows"] == [3, 7]
    with pytest.raises(InvalidData):
        source_metadata(path, "/particles/all/position", rows=(3, 13))
    with h5py.File(path) as f:  # an open dataset (item 4's put of an h5py dataset) too
        lineage, aux = source_metadata(f["/particles/all/position/value"], rows=(10, 12))
    assert lineage["source"]["file"] == str(path.resolve())
    assert lineage["h5md"]["unit"] == "nm" and lineage["h5md"]["time"]["unit"] == "ps"
    np.testing.assert_array_equal(aux["step"], [100, 110])
    fixed = tmp_path / "fixed.h5md"  # the scalar form: the offset moves to the first row
    with h5py.File(fixed, "w") as f:
        el = f.create_group("/particles/all/position")
        el["value"] = np.zeros((10, 2, 3))
        el["step"] = np.int64(100)
        el["step"].attrs["offset"] = np.int64(1000)
    lineage, aux = source_metadata(fixed, "/particles/all/position", rows=(3, 5))
    assert aux == {} and "time" not in lineage["h5md"]
    np.testing.assert_array_equal(axis_values(lineage["h5md"]["step"], 2, None), [1300, 1400])


def test_per_frame_results_carry_the_time_axis(shared: Cluster, tmp_path: Path) -> None:
    a, b = tmp_path / "a.h5md", tmp_path / "b.h5md"
    full = _element_file(a, range(0, 7))
    _element_file(b, range(7, 12))
    with shared["n1"].client() as c:
        c.put("SPLIT", a, dataset="/particles/all/position", part=0, nparts=2)
    with shared["n2"].client() as c:
        c.put("SPLIT", b, dataset="/particles/all/position", part=1, nparts=2)
    times, steps = 0.5 * np.arange(12), 10 * np.arange(12)
    with shared["n3"].client() as c:
        c.wait_for("SPLIT", timeout_s=30)
        meta = c.metadata("SPLIT")  # parts from two holders, neither of them asked
        np.testing.assert_allclose(meta["time"], times)
        np.testing.assert_array_equal(meta["step"], steps)
        assert [s["part"] for s in meta["sources"]] == [0, 1]
        sel = c.run("select", "SPLIT", index=[0, 2])  # per frame: rows stay frames
        scaled = c.run("scale", sel, factor=10.0)  # and again, from a result
        mean = c.run("colmean", "SPLIT")  # a reduction: no frames left
        np.testing.assert_allclose(scaled.fetch(), full[:, [0, 2]] * 10, rtol=1e-6)
        for h in (sel, scaled):
            m = h.metadata()
            np.testing.assert_allclose(m["time"], times)
            np.testing.assert_array_equal(m["step"], steps)
            assert m["time_unit"] == "ps" and m["of"] == "SPLIT"
            assert m["unit"] is None  # values changed: their unit is not claimed
        m = mean.metadata()
        assert m["time"] is None and m["step"] is None and mean.times() is None
        np.testing.assert_allclose(c.metadata(sel)["time"], times)  # a handle, too
        np.testing.assert_allclose(sel.times(), times)
        scaled.save("SCALED")
        saved = c.metadata("SCALED")
        np.testing.assert_allclose(saved["time"], times)
        out = c.fetch_to("SCALED", tmp_path / "scaled.h5md")
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["/observables/SCALED/time"][...], times)
            assert f["/observables/SCALED/time"].attrs["unit"] == "ps"
            np.testing.assert_allclose(f["/observables/SCALED/value"][...],
                                       full[:, [0, 2]] * 10, rtol=1e-6)
    with shared["n2"].client() as c:  # the input changes: the saved axis is not trusted
        c.put("SPLIT", b, dataset="/particles/all/position", part=1, nparts=2,
              overwrite=True)
    with shared["n3"].client() as c:
        wait_for(lambda: _changed(c), what="n3 to see SPLIT's new version")
        with pytest.raises(InvalidData, match="changed"):
            c.metadata("SCALED")
    for node, part in (("n1", 0), ("n2", 1)):  # the input is gone: so is the axis
        with shared[node].client() as c:
            c.delete("SPLIT", part)
    with shared["n3"].client() as c:
        wait_for(lambda: not any(r.name == "SPLIT" for r in c.catalog()),
                 what="n3 to see SPLIT deleted")
        with pytest.raises(DatasetNotFound, match="gone"):
            c.metadata("SCALED")


def _changed(c: hpcflow.Client) -> bool:
    return any(r.name == "SPLIT" and r.version == 2 for r in c.catalog())


def test_a_replica_keeps_the_axes_after_the_original_holder_is_gone(
        cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "t.h5md"
    _element_file(path, range(0, 12))
    with cluster["n1"].client() as c:
        c.put("REP", path, dataset="/particles/all/position")
    with cluster["n2"].client() as c:
        c.wait_for("REP", timeout_s=30)
        c.replicate("REP")
    cluster["n1"].kill()
    with cluster["n3"].client() as c:
        wait_for(lambda: {r.owner for r in c.catalog() if r.name == "REP"} == {"n2"},
                 what="n1's copy to be withdrawn")
        meta = c.metadata("REP")
        np.testing.assert_allclose(meta["time"], 0.5 * np.arange(12))
        np.testing.assert_array_equal(meta["step"], 10 * np.arange(12))


def test_a_client_cannot_forge_a_result_axis(shared: Cluster) -> None:
    with shared["n1"].client() as c:
        with pytest.raises(InvalidData, match="axis"):
            c.put("FORGED", np.ones((3, 2)), lineage={"axis": {"of": "X", "rows": [0, 3]}})
        # a client may label its own array's units: nothing stored beside it is claimed
        c.put("LABELLED", np.ones((3, 2)), lineage={"h5md": {"unit": "nm"}})
        assert c.metadata("LABELLED")["unit"] == "nm"


def _raw_put(bulk: str, hdr: dict[str, object], payload: list[bytes]) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(bulk)
    try:
        s.send_multipart([b"PUT", msgpack.packb({
            "r": 1, "part": None, "dtype": "<f8", "chunk_bytes": 1 << 20, "by": "raw",
            **hdr}), *payload])
        assert s.poll(10_000 * SCALE), "no answer to PUT"
        verb, reply = s.recv_multipart()
        return verb, msgpack.unpackb(reply)
    finally:
        s.close()
        ctx.term()


#: (aux in the PUT header, payload frames, error type expected): 3 rows of float64
HOSTILE = [
    ([["time", "<f8", 4]], [np.zeros(3).tobytes()], "InvalidData"),   # 3 rows, says 4
    ([["time", "<f8", 3]], [np.zeros(2).tobytes()], "ProtocolError"),  # payload short
    ([["time", "<f8", 3]], [np.zeros(4).tobytes()], "ProtocolError"),  # payload long
    ([["time", "|O", 3]], [np.zeros(3).tobytes()], "InvalidData"),     # not a number
    ([["../x", "<f8", 3]], [np.zeros(3).tobytes()], "ProtocolError"),  # not a key
    ([["time", "<f8", 3]] * 2, [np.zeros(6).tobytes()], "ProtocolError"),  # twice
    ([["time", "<f8", 3]] * 5, [np.zeros(15).tobytes()], "ProtocolError"),  # too many
    ("time", [np.zeros(3).tobytes()], "ProtocolError"),
    (None, [np.zeros(3).tobytes()], "ProtocolError"),                  # payload, no aux
]


def test_hostile_put_aux_is_refused_and_leaves_nothing(shared: Cluster) -> None:
    n = shared["n1"]
    for aux, payload, error in HOSTILE:
        hdr: dict[str, object] = {"name": "HOSTILE", "shape": [3, 2]}
        if aux is not None:
            hdr["aux"] = aux
        verb, reply = _raw_put(n.info["bulk"], hdr, payload)
        assert verb == b"ERR" and reply["type"] == error, (aux, reply)
        assert not list((n.data_dir / "datasets").glob(".tmp-*"))
    with n.client() as c:  # the node still serves, and stored nothing
        assert "HOSTILE" not in {r.name for r in c.catalog()}
        c.put("AFTER", np.ones(2))


def test_with_keys_nodes_send_the_axes_and_clients_cannot_ask_for_them(
        keyed: Cluster, keys: Path, tmp_path: Path) -> None:
    path = tmp_path / "k.h5md"
    _element_file(path, range(0, 12))
    with keyed["n1"].client(keys=str(keys)) as c:
        c.put("KEYED_T", path, dataset="/particles/all/position")
        with pytest.raises(PermissionDenied, match="node-to-node"):
            c._rpc.call("aux", "KEYED_T", 1, 0, 12)
    with keyed["n2"].client(keys=str(keys)) as c:  # n2 asks n1 with the node key
        c.wait_for("KEYED_T", timeout_s=30)
        np.testing.assert_allclose(c.metadata("KEYED_T")["time"], 0.5 * np.arange(12))


def test_store_keeps_per_row_arrays_across_a_restart(tmp_path: Path) -> None:
    from hpcflow.catalog.store import Store

    store = Store(tmp_path, "me")
    store.open()
    arr = np.arange(12.0).reshape(6, 2)
    t = 0.25 * np.arange(6)
    w = store.begin("AUX", arr.shape, arr.dtype, aux={"time": t})
    w.write_chunk(0, arr.tobytes())
    rec = w.commit()
    reopened = Store(tmp_path, "me")
    assert [r.key for r in reopened.open()] == ["AUX"]
    np.testing.assert_array_equal(reopened.read_aux("AUX", rec.version)["time"], t)
    np.testing.assert_array_equal(reopened.read_array("AUX"), arr)
    for bad in ({"time": t[:5]}, {"time": t.reshape(3, 2)}, {"../t": t}):
        with pytest.raises(InvalidData):
            reopened.begin("AUX2", arr.shape, arr.dtype, aux=bad)
    with pytest.raises(InvalidData):
        reopened.begin("AUX3", arr.shape, arr.dtype, aux={"time": t}, volatile=True)
    assert not list(tmp_path.glob("**/.tmp-*"))
    assert reopened.put_array("PLAIN", arr) and reopened.read_aux("PLAIN") == {}
