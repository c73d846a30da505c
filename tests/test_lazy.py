"""Lazy arrays (issue 14, item 1): ``c.array(name)`` reads only the rows and columns
indexed, straight from the parts' holders, and works under dask and xarray.

Real daemons on loopback hold a 1M-row dataset split in three parts over three
nodes; values are compared with numpy's for the same index, and bytes moved are
read from the client's traffic counter and from the holders' own stats.
"""

from __future__ import annotations

import configparser
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hpcflow
from hpcflow.client.lazy import LazyArray

from .conftest import SCALE, Cluster, three_nodes, wait_for

ROWS = 1_000_000
BOUNDS = [0, 333_333, 666_666, ROWS]
NODES = ["n1", "n2", "n3"]
BIG = np.arange(ROWS * 3, dtype=np.float32).reshape(ROWS, 3)
# a trajectory-like (frames, atoms, 3) dataset, parts of unequal size
T = np.random.default_rng(14).standard_normal((90, 20, 3))
T_BOUNDS = [0, 17, 60, 90]
ROW = BIG.itemsize * 3  # bytes of one row of BIG


@pytest.fixture(scope="module")
def lazy_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with three_nodes(tmp_path_factory.mktemp("lazy")) as c:
        for k, n in enumerate(NODES):
            with c[n].client() as k_c:
                k_c.put("BIG", BIG[BOUNDS[k]:BOUNDS[k + 1]], part=k, nparts=3)
                k_c.put("T", T[T_BOUNDS[k]:T_BOUNDS[k + 1]], part=k, nparts=3)
        with c["n2"].client() as k_c:
            k_c.put("ONE", np.arange(200, dtype=np.int32).reshape(50, 4))
            k_c.put("SCALAR", np.array(7.5))
        with c["n1"].client() as k_c:
            for name in ("BIG", "T", "ONE", "SCALAR"):
                k_c.wait_for(name, 15 * SCALE)
        yield c


@pytest.fixture(scope="module")
def client(lazy_cluster: Cluster) -> Iterator[hpcflow.Client]:
    with lazy_cluster["n1"].client() as c:
        yield c


def received(c: hpcflow.Client) -> int:
    return sum(c.traffic.bytes_received.values())


def test_metadata_without_reading(client: hpcflow.Client) -> None:
    before = received(client)
    a = client.array("BIG")
    assert isinstance(a, LazyArray)
    assert (a.shape, a.dtype, a.ndim, a.size, a.nbytes, len(a)) == (
        BIG.shape, BIG.dtype, 2, BIG.size, BIG.nbytes, ROWS)
    assert a.part_chunks == ((333_333, 333_333, 333_334), (3,))
    assert [v[0] for v in a.versions] == [0, 1, 2]
    assert "BIG" in repr(a) and "3 parts" in repr(a)
    s = client.array("SCALAR")
    assert s.shape == () and s.ndim == 0 and s[()] == 7.5 and float(np.asarray(s)) == 7.5
    with pytest.raises(TypeError):
        len(s)
    with pytest.raises(TypeError):
        iter(s)
    with pytest.raises(ValueError, match="never viewed"):
        np.asarray(s, copy=False)
    rows = list(client.array("ONE"))
    assert len(rows) == 50 and rows[7].tolist() == [28, 29, 30, 31]
    assert received(client) - before == 2 * 8 + 200 * 4  # the scalar twice, ONE's rows


def test_unknown_and_invalid_names_are_typed(lazy_cluster: Cluster,
                                             client: hpcflow.Client) -> None:
    with pytest.raises(hpcflow.DatasetNotFound):
        client.array("NO_SUCH")
    with pytest.raises(hpcflow.InvalidName):
        client.array("../etc")
    with lazy_cluster["n3"].client() as c:
        a = c.array("ONE")
        np.testing.assert_array_equal(a[3], np.arange(12, 16))
    with pytest.raises(hpcflow.InvalidData, match="closed"):
        a[3]
    assert a[3:3].shape == (0, 4)  # nothing to read: no client needed


INDEXES: list[Any] = [
    5, -1, np.int64(333_333), slice(10, 20), slice(None, None, 7), slice(333_000, 334_000),
    slice(666_665, 666_667), slice(None, None, -100_000), slice(-5, None),
    slice(999_990, 5, -3), (slice(10, 20), 1), (slice(10, 20), -1), (Ellipsis, [2, 0]),
    (slice(100, 200, 9), slice(None, None, -1)), [999_999, 0, 500_000, 0], np.array([], int),
    (Ellipsis,), (), (5, 2), (slice(5, 5),), (None, slice(3, 6)), (slice(3, 6), None, 1),
    np.arange(ROWS) % 250_000 == 0, (slice(0, 10), np.array([True, False, True])),
    ([1, 2], [0, 2]),
]


@pytest.mark.parametrize("key", INDEXES, ids=repr)
def test_values_equal_numpy(client: hpcflow.Client, key: Any) -> None:
    got = client.array("BIG")[key]
    want = BIG[key]
    assert isinstance(got, np.ndarray) or np.isscalar(got)
    assert np.shape(got) == want.shape and np.asarray(got).dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_values_equal_numpy_for_generated_indexes(lazy_cluster: Cluster, data: Any) -> None:
    with lazy_cluster["n2"].client() as c:
        a = c.array("T")
        key = data.draw(st.one_of(
            hnp.basic_indices(T.shape, allow_newaxis=True, allow_ellipsis=True),
            st.tuples(st.lists(st.integers(-90, 89), max_size=12).map(
                lambda rows: np.array(rows, dtype=np.intp)),
                      hnp.basic_indices(T.shape[1:])).map(lambda t: (t[0], *t[1]) if
                                                          isinstance(t[1], tuple) else t),
            st.tuples(st.slices(90), st.lists(st.integers(-20, 19), min_size=1, max_size=5)),
        ))
        np.testing.assert_array_equal(a[key], T[key])


T_INDEXES: list[Any] = [
    slice(None), slice(None, None, 2), (slice(None), 5), (slice(3, 80, 3), slice(2, 9)),
    (slice(None, None, -1), [19, 0, 7]), ([0, 1, 2, 40, 41, 89, 3], slice(None), 2),
    (np.arange(90) % 4 == 1, slice(None, None, -2)), (slice(10, 70), slice(5, 6), [2, 0]),
    (Ellipsis, 1), (88, slice(None)), ([5, 5, 5, 6],),
]


@pytest.mark.parametrize(("piece", "gap", "ranges", "max_range"), [
    (1000, 64 * 1024, 4096, 64 << 20),  # pieces of 2 rows: a run picked from many pieces
    (1, 64 * 1024, 4096, 64 << 20),     # pieces of 1 row
    (1000, 0, 4096, 64 << 20),          # nothing read through: a range per row
    (1000, 0, 3, 64 << 20),             # at most 3 ranges a part: widest gaps kept
    (1000, 64 * 1024, 4096, 100),       # rows larger than a range request: one range each
], ids=["piece2", "piece1", "nogap", "3ranges", "hugerows"])
def test_reads_cut_in_pieces_and_ranges_equal_numpy(
        client: hpcflow.Client, monkeypatch: pytest.MonkeyPatch, piece: int, gap: int,
        ranges: int, max_range: int) -> None:
    from hpcflow.client import lazy

    monkeypatch.setattr(lazy, "PIECE_BYTES", piece)
    monkeypatch.setattr(lazy, "GAP_BYTES", gap)
    monkeypatch.setattr(lazy, "MAX_RANGES", ranges)
    monkeypatch.setattr(lazy, "MAX_RANGE", max_range)
    a = client.array("T")  # rows of 480 bytes
    for key in T_INDEXES:
        np.testing.assert_array_equal(a[key], T[key], err_msg=repr(key))


BAD: list[Any] = [ROWS, -ROWS - 1, (0, 3), (0, -4), 1.5, "a", (0, 0, 0), [ROWS], (..., ...),
                  (slice(0, 2), [5]), slice(0, 2.5), np.array([1.0]), {"a": 1},
                  np.ones(7, dtype=bool), (0, slice("a", None))]


@pytest.mark.parametrize("key", BAD, ids=repr)
def test_bad_indexes_raise_what_numpy_raises_and_move_nothing(client: hpcflow.Client,
                                                              key: Any) -> None:
    a = client.array("BIG")
    with pytest.raises((IndexError, TypeError, ValueError)) as numpy_err:
        BIG[key]
    before = received(client)
    with pytest.raises(numpy_err.type):
        a[key]
    assert received(client) == before


def test_partial_read_moves_only_the_rows_asked_for(lazy_cluster: Cluster,
                                                    client: hpcflow.Client) -> None:
    a = client.array("BIG")

    def sent_by_holders() -> dict[str, int]:
        out = {}
        for n in NODES:
            with lazy_cluster[n].client() as k:
                out[n] = k.stats()["traffic"]["bytes_sent"].get(f"client@{client.node}", 0)
        return out

    base, holders0 = dict(client.traffic.bytes_received), sent_by_holders()

    def moved() -> dict[str, int]:
        return {p: n - base.get(p, 0) for p, n in client.traffic.bytes_received.items()
                if n - base.get(p, 0)}

    np.testing.assert_array_equal(a[10:20], BIG[10:20])
    assert moved() == {"n1": 10 * ROW}  # not the part's 4 MB
    holders1 = sent_by_holders()
    assert {n: holders1[n] - holders0[n] for n in NODES} == {"n1": 10 * ROW, "n2": 0, "n3": 0}

    # across parts: each part's rows from its own holder
    base = dict(client.traffic.bytes_received)
    np.testing.assert_array_equal(a[333_000:334_000], BIG[333_000:334_000])
    assert moved() == {"n1": 333 * ROW, "n2": 667 * ROW}

    # one column of rows far apart: just those values
    base = dict(client.traffic.bytes_received)
    np.testing.assert_array_equal(a[::100_000, 2], BIG[::100_000, 2])
    assert moved() == {"n1": 4 * 4, "n2": 3 * 4, "n3": 3 * 4}


def test_dask_from_array_equals_numpy(client: hpcflow.Client) -> None:
    da = pytest.importorskip("dask.array")
    a = client.array("BIG")
    d = da.from_array(a, chunks=(100_000, 3))
    fine = da.from_array(a, chunks=(1_000, 3))
    assert float(d.sum(dtype=np.float64).compute()) == BIG.sum(dtype=np.float64)
    np.testing.assert_array_equal(d[10:20, 1:].compute(), BIG[10:20, 1:])
    before = received(client)
    np.testing.assert_array_equal(a.to_dask()[-1000:].mean(axis=0).compute(),
                                  BIG[-1000:].mean(axis=0))
    assert received(client) - before == 1000 * ROW  # only the chunk it needs, only its rows
    before = received(client)  # 40 chunks read by dask's worker threads, each counted once
    assert float(fine[:40_000].sum(dtype=np.float64).compute()) == BIG[:40_000].sum(
        dtype=np.float64)
    assert received(client) - before == 40_000 * ROW
    t = client.array("T")
    np.testing.assert_allclose(da.from_array(t, chunks=(7, 20, 3)).std(axis=0).compute(),
                               T.std(axis=0))


def test_xarray_backend_opens_lazily(lazy_cluster: Cluster) -> None:
    xr = pytest.importorskip("xarray")
    from hpcflow.client.xarray_backend import (
        HpcflowBackendEntrypoint,
        open_dataarray,
        parse_url,
    )

    url = f"hpcflow://{lazy_cluster['n3'].rpc.removeprefix('tcp://')}/BIG"
    assert HpcflowBackendEntrypoint().guess_can_open(url)
    assert parse_url(url)[1] == "BIG"
    with pytest.raises(hpcflow.InvalidData):
        parse_url("hpcflow://host:1/")
    direct = HpcflowBackendEntrypoint().open_dataset(url, dims=("frame", "xyz"))
    with direct:
        assert direct["BIG"].dims == ("frame", "xyz") and direct["BIG"].shape == BIG.shape
        np.testing.assert_array_equal(direct["BIG"].isel(frame=slice(10, 20), xyz=[0, 2]),
                                      BIG[10:20][:, [0, 2]])
    with xr.open_dataset(url, engine=HpcflowBackendEntrypoint) as ds:
        v = ds["BIG"]
        assert v.dims == ("dim_0", "dim_1") and v.dtype == BIG.dtype
        np.testing.assert_array_equal(v.isel(dim_0=[5, 999_999, 333_333], dim_1=1),
                                      BIG[[5, 999_999, 333_333], 1])
        np.testing.assert_array_equal(v[-3:].values, BIG[-3:])
    with xr.open_dataset(url, engine=HpcflowBackendEntrypoint,
                         chunks={"dim_0": 250_000}) as ds:
        assert float(ds["BIG"].sum(dtype=np.float64).compute()) == BIG.sum(dtype=np.float64)

    with lazy_cluster["n1"].client() as c:
        a = c.array("BIG")
        da = open_dataarray(a, dims=("frame", "xyz"))
        before = received(c)
        assert da.shape == BIG.shape and received(c) == before  # nothing read yet
        np.testing.assert_array_equal(da.isel(frame=slice(10, 20), xyz=2).values,
                                      BIG[10:20, 2])
        assert received(c) - before <= 10 * ROW
        with xr.open_dataset(a, engine=HpcflowBackendEntrypoint) as ds:
            np.testing.assert_array_equal(ds["BIG"][0].values, BIG[0])
        one = c.array("ONE")
        before = received(c)
        whole = xr.DataArray(one)  # not lazy: xarray reads what is no duck array at once
        assert received(c) - before == one.nbytes
        np.testing.assert_array_equal(whole.isel(dim_0=3), np.arange(12, 16))


def test_handle_array_of_a_result_read_from_its_holders(client: hpcflow.Client) -> None:
    scaled = client.run("scale", "T", factor=2.0)
    total = client.run("colsum", scaled)
    np.testing.assert_allclose(total.fetch(), (2 * T).sum(axis=0))
    a = scaled.array()  # computed as an input, where T's parts are: a dataset
    assert isinstance(a, LazyArray) and a.shape == T.shape
    np.testing.assert_allclose(a[50:70, ::3], 2 * T[50:70, ::3])
    small = client.run("colsum", "T").array()  # came back inline: already here
    assert isinstance(small, np.ndarray)
    np.testing.assert_allclose(small, T.sum(axis=0))


def checksum_of(c: hpcflow.Client, name: str) -> str | None:
    try:
        parts = c.locate(name)["parts"]
    except hpcflow.DatasetNotFound:
        return None
    return str(parts[0]["holders"][0]["checksum"]) if parts else None


def test_failover_to_another_holder_of_the_part(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.add("n1")
        c.add("n2", via="n1")
        c.add("n3", via="n2")
        c.wait_members()
        data = np.arange(30_000, dtype=np.int64).reshape(-1, 2)
        with c["n2"].client() as k:
            k.put("R", data)
        with c["n3"].client() as k:
            wait_for(lambda: "R" in {r.name for r in k.catalog()}, 10, "R on n3")
            k.replicate("R")
            wait_for(lambda: len(k.locate("R")["parts"][0]["holders"]) == 2, 10, "2 copies")
        with c["n1"].client() as k:
            wait_for(lambda: len(k.locate("R")["parts"][0]["holders"]) == 2, 10, "2 copies")
            a = k.array("R")
            first = a._parts[0].holders[0].owner
            other = ({"n2", "n3"} - {first}).pop()
            np.testing.assert_array_equal(a[100:110], data[100:110])
            c[first].kill(signal.SIGKILL)
            base = dict(k.traffic.bytes_received)
            np.testing.assert_array_equal(a[200:300:10, 1], data[200:300:10, 1])
            assert k.traffic.bytes_received[other] > base.get(other, 0)

    finally:
        c.stop()


def test_a_newer_version_is_reported_never_mixed(lazy_cluster: Cluster,
                                                 client: hpcflow.Client) -> None:
    data = np.arange(30_000, dtype=np.int64).reshape(-1, 2)
    with lazy_cluster["n3"].client() as o:
        o.put("V", data, part=0, nparts=2)
    with lazy_cluster["n2"].client() as o:
        o.put("V", data, part=1, nparts=2)
    client.wait_for("V", 10 * SCALE)
    a = client.array("V")
    np.testing.assert_array_equal(a[14_990:15_010], np.vstack([data, data])[14_990:15_010])

    # part 1 overwritten: a read touching only part 0 still gets the version pinned,
    # one touching part 1 is refused rather than mixing versions; refresh reads the new
    with lazy_cluster["n2"].client() as o:
        o.put("V", data[:100] * 2, part=1, nparts=2, overwrite=True)
    np.testing.assert_array_equal(a[:10], data[:10])
    with pytest.raises(hpcflow.DatasetChanged, match="refresh"):
        a[14_990:15_010]
    wait_for(lambda: client.locate("V")["shape"][0] == 15_100, 10, "the new V in the catalog")
    assert a.refresh().shape == (15_100, 2)
    new = np.vstack([data, data[:100] * 2])
    np.testing.assert_array_equal(a[14_990:15_010], new[14_990:15_010])

    # deleted and put again (maybe the same version number, other bytes): refused too
    old = dict((p, c) for p, _, c in a.versions)
    with lazy_cluster["n3"].client() as o:
        o.delete("V", part=0)
        o.put("V", data * 3, part=0, nparts=2)
    wait_for(lambda: checksum_of(client, "V") not in (None, old[0]), 10,
             "the third V in the catalog")
    with pytest.raises(hpcflow.DatasetChanged):
        a[:5]
    np.testing.assert_array_equal(a.refresh()[:5], data[:5] * 3)


def test_hostile_range_requests_get_typed_refusals(lazy_cluster: Cluster) -> None:
    """RANGE requests as a hostile client would write them, on a raw socket: each is
    refused with its own error type and the holder goes on serving good ones."""
    with lazy_cluster["n2"].client() as c:
        rec = hpcflow.DatasetRecord.from_wire(c.describe("ONE")["records"][0])
    good = {"key": rec.key, "v": rec.version, "c": rec.checksum, "o": 16, "n": 16, "by": "x"}
    cases = [
        ({"n": (64 << 20) + 1}, "InvalidData"),        # larger than a range may be
        ({"o": rec.nbytes - 8}, "InvalidData"),        # past the end of the part
        ({"c": "0" * 32}, "DatasetChanged"),           # another copy's checksum
        ({"v": rec.version + 1}, "DatasetChanged"),    # a version it does not hold
        ({"key": "NO_SUCH"}, "DatasetNotFound"),
        ({"c": 5}, "ProtocolError"),
        ({"o": -1}, "ProtocolError"),
    ]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(lazy_cluster["n2"].info["bulk"])

    def ask(r: int, hdr: dict[str, Any]) -> list[bytes]:
        s.send_multipart([b"RANGE", msgpack.packb({"r": r, **hdr})])
        assert s.poll(10_000 * SCALE), f"no answer to {hdr}"
        return s.recv_multipart()

    try:
        for r, (change, error) in enumerate(cases):
            reply = ask(r, {**good, **change})
            assert reply[0] == b"ERR", change
            assert msgpack.unpackb(reply[1])["type"] == error, (change, reply)
        reply = ask(99, good)
        assert reply[0] == b"CHUNK"
        assert b"".join(reply[2:]) == np.arange(200, dtype=np.int32).tobytes()[16:32]
    finally:
        s.close()
        ctx.term()


def test_engine_hpcflow_through_an_installed_entry_point(
        lazy_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine="hpcflow"`` as xarray finds it: the entry point from setup.cfg, installed
    as package metadata on sys.path (the editable install may predate it)."""
    xr = pytest.importorskip("xarray")
    from xarray.backends import plugins

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    spec = cfg["options.entry_points"]["xarray.backends"].strip()
    dist = tmp_path / "hpcflow_lazy_entry-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hpcflow-lazy-entry\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(f"[xarray.backends]\n{spec}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.list_engines.cache_clear()
    try:
        url = f"hpcflow://{lazy_cluster['n1'].rpc.removeprefix('tcp://')}/T"
        with xr.open_dataset(url, engine="hpcflow", dims=("frame", "atom", "xyz")) as ds:
            np.testing.assert_array_equal(ds["T"].isel(frame=slice(15, 20), atom=[3, 1]),
                                          T[15:20][:, [3, 1]])
        assert xr.backends.plugins.guess_engine(url) == "hpcflow"
    finally:
        monkeypatch.undo()
        plugins.list_engines.cache_clear()


def test_corruption_at_rest_is_reported_by_a_partial_read(lazy_cluster: Cluster,
                                                           client: hpcflow.Client) -> None:
    """The holder checks each stored chunk a range touches against its stored digest:
    rows of a corrupted chunk are refused (IntegrityError), rows of a sound one served."""
    data = np.arange(1_000_000, dtype=np.float64)  # 8 MB: two chunks of 4 MiB
    with lazy_cluster["n3"].client() as o:
        o.put("ROT", data)
    client.wait_for("ROT", 10 * SCALE)
    path = lazy_cluster["n3"].data_dir / "datasets" / "ROT.h5"
    with h5py.File(path, "r") as f:
        offset = f["data"].id.get_offset()
    with open(path, "r+b") as fh:  # a bit flip on disk in chunk 0, behind the daemon's back
        fh.seek(offset + 123_456)
        b = fh.read(1)
        fh.seek(offset + 123_456)
        fh.write(bytes([b[0] ^ 0x01]))
    a = client.array("ROT")
    with pytest.raises(hpcflow.IntegrityError, match="corrupted"):
        a[10:20]  # not the flipped bytes, but their chunk
    np.testing.assert_array_equal(a[-10:], data[-10:])  # chunk 1 is sound
    with lazy_cluster["n3"].client() as o:
        o.delete("ROT")
