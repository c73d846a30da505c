"""Data in and out (issue 14, item 4): a row range of a file, an open h5py dataset, a file
split over nodes in one call, a split dataset deleted cluster-wide, progress in bytes.

Real daemons on loopback; "only the range is read" is shown with an HDF5 file whose
chunks outside the range are corrupted on disk, so reading any of them fails.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

import hpcflow
from hpcflow.errors import InvalidData, NotOwner

from .conftest import SCALE, Cluster, names_on, three_nodes, wait_for

ROWS, COLS, CHUNK = 400, 8, 10
DATA = np.random.default_rng(14).random((ROWS, COLS))


def _file_with_bad_chunks(path: Path, good: tuple[int, int]) -> Path:
    """``DATA`` at ``/d`` in chunks of ``CHUNK`` rows (gzip), every chunk outside rows
    ``good`` overwritten on disk with junk: reading any row there raises."""
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=DATA, chunks=(CHUNK, COLS), compression="gzip")
    with h5py.File(path, "r") as f:
        dsid = f["d"].id
        spans = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    with open(path, "r+b") as raw:
        for info in spans:
            row = info.chunk_offset[0]
            if good[0] <= row < good[1]:
                continue
            raw.seek(info.byte_offset)
            raw.write(b"\xff" * info.size)
    with h5py.File(path, "r") as f:  # the sentinel works: rows outside cannot be read
        for lo in (0, ROWS - CHUNK):
            if not good[0] <= lo < good[1]:
                with pytest.raises(OSError):
                    f["d"][lo:lo + 1]
        assert np.array_equal(f["d"][good[0]:good[1]], DATA[good[0]:good[1]])
    return path


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with three_nodes(tmp_path_factory.mktemp("io"), n3_via="n1") as c:
        yield c


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "hpcflow", *args], capture_output=True,
                       text=True, timeout=60 * SCALE)
    assert (r.returncode == 0) == ok, r.stderr + r.stdout
    return r


def test_put_rows_reads_only_the_range(trio: Cluster, tmp_path: Path) -> None:
    src = _file_with_bad_chunks(tmp_path / "bad.h5", (100, 200))
    with trio["n1"].client() as c:
        with pytest.raises(InvalidData, match="read failed"):  # the whole file: it hits junk
            c.put("WHOLE", src, dataset="/d")
        rec = c.put("R1", src, dataset="/d", rows=(100, 200))
        assert rec.shape == (100, COLS)
        assert np.array_equal(c.fetch("R1"), DATA[100:200])
        with h5py.File(src, "r") as f:  # an open h5py dataset, a sub-range of the range
            rec = c.put("R2", f["d"], rows=slice(120, 190))
            assert f.id.valid  # the caller's file is left open
        assert rec.shape == (70, COLS)
        assert np.array_equal(c.fetch("R2"), DATA[120:190])
        assert "WHOLE" not in {r.name for r in c.catalog()}
    r = _cli("put", "--node", trio["n2"].rpc, "R3", f"{src}:/d", "--rows", "150:200",
             "--json")
    assert json.loads(r.stdout)["shape"] == [50, COLS]
    with trio["n3"].client() as c:
        c.wait_for("R3", 10)
        assert np.array_equal(c.fetch("R3"), DATA[150:200])
        assert [r.owner for r in c.delete("R3", all_parts=True)] == ["n2"]  # a whole one
        for name in ("R1", "R2"):
            c.delete(name, all_parts=True)


def test_put_of_an_h5py_dataset_and_bad_ranges(trio: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "ok.h5"
    with h5py.File(path, "w") as f:
        f["/particles/all/position/value"] = DATA.reshape(ROWS, 4, 2)
    with trio["n2"].client() as c, h5py.File(path, "r") as f:
        c.put("H5", f["/particles/all/position"])  # an H5MD element group: its value
        assert np.array_equal(c.fetch("H5"), DATA.reshape(ROWS, 4, 2))
        c.delete("H5")
        ds = f["/particles/all/position/value"]
        bad = [((5, 2), "before the start"), ((-1, 3), ">= 0"), ((0, ROWS + 1), "out of range"),
               ((0.5, 2), "must be an integer"), (slice(0, 10, 2), "has a step"),
               ("a:b", "LO:HI"), ((1, 2, 3), r"must be \(lo, hi\)"), ((True, 3), "integer")]
        for rows, msg in bad:
            with pytest.raises(InvalidData, match=msg):
                c.put("BAD", ds, rows=rows)
        with pytest.raises(InvalidData, match="out of range"):
            c.put("BAD", DATA, rows=(ROWS + 1, None))
        with pytest.raises(InvalidData, match="scalar"):
            c.put("BAD", np.float64(3.0), rows=(0, 1))
        assert c.put("ARR", DATA, rows=(390, None)).shape == (10, COLS)  # to the end
        assert np.array_equal(c.fetch("ARR"), DATA[390:])
        c.delete("ARR")
        assert not [r for r in c.catalog() if r.name in ("BAD", "ARR")]
    f2 = h5py.File(path, "r")
    closed = f2["/particles/all/position/value"]
    f2.close()
    with trio["n2"].client() as c, pytest.raises(InvalidData, match="closed"):
        c.put("BAD", closed)
    r = _cli("put", "--node", trio["n1"].rpc, "BAD", f"{path}:/particles/all/position",
             "--rows", "300:500", "--json", ok=False)
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "InvalidData" and f"has {ROWS} rows" in err["message"]


def test_put_split_over_nodes_and_rm_all_parts(trio: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "traj.h5"
    with h5py.File(path, "w") as f:
        f["/particles/all/position/value"] = DATA.reshape(ROWS, 4, 2)
    seen: list[tuple[int, int]] = []
    with trio["n1"].client() as c:
        recs = c.put_split("SPL", path, dataset="/particles/all/position",
                           nodes=["n2", "n3", "n1"], nparts=4, chunk_bytes=4096,
                           progress=lambda done, total: seen.append((done, total)))
        assert [(r.part, r.owner, r.nparts) for r in recs] == [
            (0, "n2", 4), (1, "n3", 4), (2, "n1", 4), (3, "n2", 4)]
        assert [r.shape[0] for r in recs] == [100, 100, 100, 100]
        c.wait_for("SPL", 10)
        assert np.array_equal(c.fetch("SPL"), DATA.reshape(ROWS, 4, 2))
        # progress: bytes of the whole put, never going back, ending at the total
        assert {t for _, t in seen} == {DATA.nbytes}
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1] == (DATA.nbytes, DATA.nbytes) and len(seen) > 4
        # overwritten with as many parts: replaced; with fewer, refused (part 3 would stay)
        again = c.put_split("SPL", DATA.reshape(ROWS, 4, 2) * 2, nodes=["n2", "n3", "n1"],
                            nparts=4, overwrite=True)
        assert [r.version for r in again] == [2, 2, 2, 2]
        with pytest.raises(InvalidData, match=r"SPL has part 3 on the cluster, which 3 parts "
                           r"would not replace: delete it first \(rm SPL --all-parts\)"):
            c.put_split("SPL", DATA.reshape(ROWS, 4, 2), nodes=["n1"], nparts=3, overwrite=True)
        wait_for(lambda: {r.version for r in c.catalog() if r.name == "SPL"} == {2}, 10,
                 "the new versions known on n1")
        assert np.array_equal(c.fetch("SPL"), DATA.reshape(ROWS, 4, 2) * 2)
        with pytest.raises(NotOwner, match=r"SPL is split over n1, n2, n3 \(4 parts\): use "
                           r"--all-parts .* or --part K on each holder"):
            c.delete("SPL")
        gone = c.delete("SPL", all_parts=True)
        assert sorted((r.part, r.owner) for r in gone) == [
            (0, "n2"), (1, "n3"), (2, "n1"), (3, "n2")]
    for n in ("n1", "n2", "n3"):
        wait_for(lambda n=n: not any(k.startswith("SPL") for k in names_on(trio[n])), 10,
                 f"SPL gone on {n}")

    # the command line: a row range of the file, three parts on two nodes, then rm
    r = _cli("put", "--node", trio["n3"].rpc, "SPL2", f"{path}:/particles/all/position",
             "--rows", "40:340", "--split", "3", "--nodes", "n1,n3", "--json")
    assert [(p["part"], p["owner"], p["shape"][0]) for p in json.loads(r.stdout)] == [
        (0, "n1", 100), (1, "n3", 100), (2, "n1", 100)]
    with trio["n2"].client() as c:
        c.wait_for("SPL2", 10)
        assert np.array_equal(c.fetch("SPL2"), DATA.reshape(ROWS, 4, 2)[40:340])
    r = _cli("rm", "--node", trio["n2"].rpc, "SPL2", ok=False)
    assert "SPL2 is split over n1, n3 (3 parts): use --all-parts" in r.stderr
    r = _cli("rm", "--node", trio["n2"].rpc, "SPL2", "--all-parts")
    assert r.stdout.count("deleted SPL2") == 3
    wait_for(lambda: not any(k.startswith("SPL2") for k in names_on(trio["n2"])), 10,
             "SPL2 gone")


def test_failed_split_put_leaves_nothing(trio: Cluster, tmp_path: Path) -> None:
    src = _file_with_bad_chunks(tmp_path / "tail.h5", (0, 300))  # rows 300.. are junk
    with trio["n1"].client() as c:
        with pytest.raises(InvalidData, match="read failed"):
            c.put_split("HALF", src, dataset="/d", nodes=["n1", "n2"], nparts=4)
        with pytest.raises(InvalidData, match="no member is named 'nx'"):
            c.put_split("HALF", src, dataset="/d", nodes=["n1", "nx"], nparts=2)
        with pytest.raises(InvalidData, match="twice"):
            c.put_split("HALF", src, dataset="/d", nodes=["n1", "n1"], nparts=2)
        with pytest.raises(InvalidData, match="too few for nparts=5"):
            c.put_split("HALF", src, dataset="/d", rows=(0, 4), nodes=["n1"], nparts=5)
        with pytest.raises(InvalidData, match="nparts must be given"):
            c.put_split("HALF", src, dataset="/d", nodes=["n1"], nparts=None)  # type: ignore[arg-type]
    for n in ("n1", "n2", "n3"):  # parts 0-2 were stored, then taken back
        wait_for(lambda n=n: not any(k.startswith("HALF") for k in names_on(trio[n], True)),
                 10, f"no HALF on {n}")


def test_progress_in_bytes_for_put_and_fetch(trio: Cluster, tmp_path: Path) -> None:
    arr = np.arange(50_000, dtype=np.float64).reshape(5000, 10)
    puts: list[tuple[int, int]] = []
    fetches: list[tuple[int, int]] = []
    to_file: list[tuple[int, int]] = []
    with hpcflow.connect(trio["n2"].rpc, timeout_s=15) as c:
        c.put("PROG", arr, chunk_bytes=64 * 1024,
              progress=lambda d, t: puts.append((d, t)))
        got = c.fetch("PROG", progress=lambda d, t: fetches.append((d, t)))
        c.fetch_to("PROG", tmp_path / "p.h5", progress=lambda d, t: to_file.append((d, t)))
        c.delete("PROG")
    assert np.array_equal(got, arr)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert np.array_equal(f["/data"][()], arr)
    for seen in (puts, fetches, to_file):
        assert len(seen) == 7  # 400 000 bytes in 64 KiB chunks
        assert {t for _, t in seen} == {arr.nbytes}
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1][0] == arr.nbytes


def test_split_put_and_rm_all_parts_with_keys(keyed: Cluster, keys: Path) -> None:
    """With keys the client reaches the other holders (bulk uploads, deletes) with its
    client key; without keys it reaches nothing and nothing is stored or deleted."""
    with keyed["n1"].client(keys=str(keys)) as c:
        recs = c.put_split("KSPL", DATA, nodes=["n2", "n1"], nparts=3)
        assert [(r.part, r.owner) for r in recs] == [(0, "n2"), (1, "n1"), (2, "n2")]
        c.wait_for("KSPL", 10)
        assert np.array_equal(c.fetch("KSPL"), DATA)
    r = _cli("rm", "--node", keyed["n2"].rpc, "KSPL", "--all-parts", ok=False)
    assert "AuthenticationError" in r.stderr
    with keyed["n2"].client(keys=str(keys)) as c:
        assert sorted(r.part for r in c.delete("KSPL", all_parts=True)) == [0, 1, 2]
    def left(n: str) -> set[str]:
        with keyed[n].client(keys=str(keys)) as c:
            return {r.key for r in c.catalog(include_dead=True) if r.name == "KSPL"}
    for n in ("n1", "n2"):
        wait_for(lambda n=n: not left(n), 10, f"KSPL gone on {n}")


def test_cli_put_shows_progress_in_bytes_on_a_terminal(trio: Cluster, tmp_path: Path) -> None:
    """On a terminal (a real pty as stderr) put prints bytes of bytes, ending at the
    file's size: it used to print chunk counts as bytes ('47 B / 120 B')."""
    arr = np.random.default_rng(2).random((40_000, 10))  # 3.1 MiB
    np.save(tmp_path / "big.npy", arr)
    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "hpcflow", "put", "--node", trio["n1"].rpc,
                            "TTY", str(tmp_path / "big.npy")], stdout=subprocess.PIPE,
                           stderr=slave, text=True, timeout=60 * SCALE)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                got = os.read(master, 65536)
            except OSError:  # EIO: the pty's other side is closed and drained
                break
            if not got:
                break
            shown += got
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert r.returncode == 0, shown
    assert "stored TTY on n1" in r.stdout
    assert "put TTY: 3.1 MiB / 3.1 MiB (100%" in shown.decode()
    with trio["n1"].client() as c:
        c.delete("TTY")


def test_row_ranges_keep_their_own_source_rows_and_h5md_times(trio: Cluster,
                                                               tmp_path: Path) -> None:
    """A put of rows [lo, hi) records those rows of the file and their step and time;
    each part of a split put records its own (of the whole file's numbering)."""
    path = tmp_path / "el.h5md"
    with h5py.File(path, "w") as f:
        el = f.create_group("/particles/all/position")
        el["value"] = DATA.reshape(ROWS, 4, 2)
        el["value"].attrs["unit"] = "nm"
        el["step"] = 10 * np.arange(ROWS)
        el["time"] = 0.5 * np.arange(ROWS)
        el["time"].attrs["unit"] = "ps"
    with trio["n1"].client() as c:
        rec = c.put("EL", path, dataset="/particles/all/position", rows=(50, 90))
        assert rec.lineage["source"]["rows"] == [50, 90]
        m = c.metadata("EL")
        assert m["unit"] == "nm" and m["time_unit"] == "ps"
        np.testing.assert_array_equal(m["step"], 10 * np.arange(50, 90))
        with h5py.File(path, "r") as f:  # the element group itself, from the open file
            recs = c.put_split("ELS", f["/particles/all/position"], rows=(100, 400),
                               nodes=["n2", "n3"], nparts=3)
        assert [r.lineage["source"]["rows"] for r in recs] == [[100, 200], [200, 300],
                                                              [300, 400]]
        c.wait_for("ELS", 10)
        m = c.metadata("ELS")
        np.testing.assert_allclose(m["time"], 0.5 * np.arange(100, 400))
        assert np.array_equal(c.fetch("ELS"), DATA.reshape(ROWS, 4, 2)[100:400])
        c.delete("EL")
        c.delete("ELS", all_parts=True)


def test_rm_all_parts_leaves_a_running_flows_copies_to_it(trio: Cluster) -> None:
    """A flow that gathered a split dataset holds copies of its parts (its intermediates,
    which only its script may remove): rm --all-parts deletes every holder's own part,
    skips those copies instead of failing half way, and they go when the flow closes."""
    with trio["n1"].client() as c:
        c.put_split("CPY", DATA, nodes=["n2", "n3"], nparts=2)
        med = c.run("median", "CPY")  # a global op: the parts meet on one node, as copies
        np.testing.assert_allclose(med.fetch(), np.median(DATA, axis=0))
        copies = [r for r in c.catalog() if r.name == "CPY" and "flow" in r.lineage]
        assert copies, "the flow made no copy: the test would show nothing"
        gone = c.delete("CPY", all_parts=True)
        assert sorted((r.part, r.owner) for r in gone) == [(0, "n2"), (1, "n3")]
        left = {(r.part, r.owner) for r in c.catalog(include_dead=True) if r.name == "CPY"}
        assert left <= {(r.part, r.owner) for r in copies}
    for n in ("n1", "n2", "n3"):  # the flow closed with its client: its copies went too
        wait_for(lambda n=n: not any(k.startswith("CPY") for k in names_on(trio[n], True)),
                 10, f"no CPY on {n}")


def test_real_h5md_split_from_an_open_file(trio: Cluster, real_h5md: Path) -> None:
    """ZnH5MD's cu.h5md (20 frames of 108 atoms, Angstrom, fs): frames 2..17 spread over
    two nodes straight from the open file; values, units and times as h5py reads them."""
    with h5py.File(real_h5md / "cu.h5md", "r") as f:
        el = f["/particles/atoms/position"]
        want, times = el["value"][2:17], el["time"][2:17]
        with trio["n3"].client() as c:
            recs = c.put_split("CU", el, rows=(2, 17), nodes=["n1", "n2"], nparts=2)
            assert [r.shape[0] for r in recs] == [7, 8]
            assert np.array_equal(c.fetch("CU"), want)
            m = c.metadata("CU")
            assert m["unit"] == "Angstrom" and m["time_unit"] == "fs"
            np.testing.assert_array_equal(m["time"], times)
            c.delete("CU", all_parts=True)
