"""The HDF5 store and chunk layout, on real files."""

from __future__ import annotations

import itertools
import math
import resource
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcflow.catalog.chunking import Chunking, Payload, chunk_digest
from hpcflow.catalog.record import MAX_PARTS, DatasetRecord, validate_name
from hpcflow.catalog.store import Store
from hpcflow.errors import DatasetExists, InvalidData, InvalidName, ProtocolError, StoreError


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    itemsize=st.sampled_from([1, 2, 4, 8, 16]),
    chunk_bytes=st.integers(1, 400),
)
def test_chunks_tile_the_array_exactly(shape: list[int], itemsize: int, chunk_bytes: int) -> None:
    arr = np.arange(math.prod(shape) * itemsize, dtype=np.uint8).view(f"V{itemsize}")
    arr = arr.reshape(shape)
    ch = Chunking(tuple(shape), itemsize, chunk_bytes)
    pieces, pos = [], 0
    for i in range(len(ch)):
        off, length = ch.byte_range(i)
        assert off == pos and length > 0
        piece = np.ascontiguousarray(arr[ch.slab(i)]).tobytes()
        assert len(piece) == length
        assert length <= max(chunk_bytes, itemsize)
        pieces.append(piece)
        pos += length
    assert b"".join(pieces) == arr.tobytes()


@given(st.binary(max_size=5000), st.lists(st.integers(0, 5000), max_size=6))
def test_a_payload_split_anywhere_hashes_copies_and_writes_as_one_buffer(
        data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    p = Payload([data[a:b] for a, b in itertools.pairwise(bounds)])
    assert p.nbytes == len(data) and p.digest() == chunk_digest(data)
    flat = np.zeros(len(data) + 3, np.uint8)
    p.copy_into(flat, 3)
    assert flat[3:].tobytes() == data


def test_writer_takes_a_chunk_in_frames(tmp_path: Path) -> None:
    s = Store(tmp_path, "n1")
    s.open()
    a = np.arange(3000, dtype=np.int64)
    w = s.begin("FR", a.shape, a.dtype, chunk_bytes=8192)
    raw = a.tobytes()
    for i in range(len(w.chunking)):
        off, n = w.chunking.byte_range(i)
        w.write_chunk(i, Payload([raw[off : off + 100], raw[off + 100 : off + n]]),
                      chunk_digest(raw[off : off + n]))
    w.commit()
    r = s.reader("FR")
    assert b"".join(bytes(memoryview(r.chunk(i)[0]).cast("B")) for i in range(len(r))) == raw


@pytest.mark.parametrize("dtype", ["?", "i1", "<u8", "<f4", ">f8", "<c16"])
@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (1,), (7, 3), (5, 4, 3)])
def test_round_trip_dtypes_and_shapes(tmp_path: Path, dtype: str, shape: tuple[int, ...]) -> None:
    store = Store(tmp_path, "me")
    store.open()
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.random(shape) * 100).astype(dtype)
    rec = store.put_array("A", arr, chunk_bytes=4096)
    assert rec.shape == shape and rec.dtype == np.dtype(dtype).str
    got = store.read_array("A")
    assert got.dtype == arr.dtype and np.array_equal(got, arr)
    reopened = Store(tmp_path, "me")
    assert [r.key for r in reopened.open()] == ["A"]
    assert reopened.get("A") == rec
    assert np.array_equal(reopened.read_array("A"), arr)


def test_rows_larger_than_a_chunk(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    arr = np.random.default_rng(1).random((3, 1000, 7))  # 56 KB rows, 4 KiB chunks
    store.put_array("FAT", arr, chunk_bytes=4096)
    assert np.array_equal(store.read_array("FAT"), arr)


def test_written_file_is_plain_hdf5(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    arr = np.arange(20.0).reshape(4, 5)
    store.put_array("P", arr, part=2, nparts=4, lineage={"op": "scale"})
    with h5py.File(tmp_path / "datasets" / "P@2.h5") as f:
        assert np.array_equal(f["data"][...], arr)
        assert f.attrs["name"] == "P" and f.attrs["part"] == 2
    assert store.get("P", 2).lineage == {"op": "scale"}


def test_nothing_visible_until_commit_and_abort_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    w = store.begin("W", (100,), "<f8", chunk_bytes=4096)
    w.write_chunk(0, np.zeros(100))
    assert store.records() == []
    assert len(list((tmp_path / "datasets").glob(".tmp-*"))) == 1
    with pytest.raises(DatasetExists, match="being written"):
        store.begin("W", (1,), "<f8")
    w.abort()
    assert store.records() == [] and not list((tmp_path / "datasets").iterdir())
    store.begin("W", (1,), "<f8").abort()  # the name is free again


def test_crash_leftovers_are_removed_and_truncated_files_quarantined(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    store.put_array("GOOD", np.arange(10))
    store.put_array("BAD", np.zeros(100_000))
    w = store.begin("HALF", (10,), "<i8")  # a crash would leave this temp file behind
    w.write_chunk(0, np.arange(10))
    bad = tmp_path / "datasets" / "BAD.h5"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    fresh = Store(tmp_path, "me")
    assert [r.key for r in fresh.open()] == ["GOOD"]
    assert not list((tmp_path / "datasets").glob(".tmp-*"))
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("BAD.h5")


def test_overwrite_bumps_version(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    assert store.put_array("V", np.zeros(3)).version == 1
    with pytest.raises(DatasetExists):
        store.put_array("V", np.ones(3))
    assert store.put_array("V", np.ones(3), overwrite=True).version == 2
    assert store.read_array("V").tolist() == [1, 1, 1]


def test_whole_and_partitioned_cannot_share_a_name(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    store.put_array("M", np.zeros(3))
    with pytest.raises(InvalidData):
        store.put_array("M", np.zeros(3), part=0)


def test_bad_dtypes_and_sizes_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    with pytest.raises(InvalidData):
        store.put_array("S", np.array(["a", "b"]))
    with pytest.raises(InvalidData):
        store.put_array("O", np.array([1, None], dtype=object))
    w = store.begin("Z", (10,), "<f8", chunk_bytes=4096)
    with pytest.raises(InvalidData, match="expected 80"):
        w.write_chunk(0, np.zeros(3))
    w.abort()


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", ".hidden", "a..b", "x\n", "a b",
                                  "x" * 129, "é", "a@1", "-x"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@pytest.mark.parametrize("name", ["DS1", "run_3.pos", "wf:abc=1", "_x", "9", "a-b+c"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("bad", [
    None, [], {"name": "x"},
    {"name": "A", "part": None, "owner": "n", "shape": [2], "dtype": "<f8", "nbytes": 99,
     "checksum": "c", "chunk_bytes": 4096},
    {"name": "../A", "part": None, "owner": "n", "shape": [2], "dtype": "<f8", "nbytes": 16,
     "checksum": "c", "chunk_bytes": 4096},
    {"name": "A", "part": -1, "owner": "n", "shape": [2], "dtype": "<f8", "nbytes": 16,
     "checksum": "c", "chunk_bytes": 4096},
    {"name": "A", "part": None, "owner": "n", "shape": [2], "dtype": "|O", "nbytes": 16,
     "checksum": "c", "chunk_bytes": 4096},
])
def test_record_from_wire_rejects_garbage(bad: object) -> None:
    with pytest.raises((ProtocolError, InvalidName)):
        DatasetRecord.from_wire(bad)


def _rec(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "A", "part": 0, "owner": "n", "shape": [2],
                               "dtype": "<f8", "nbytes": 16, "checksum": "c",
                               "chunk_bytes": 4096}
    return {**base, **kw}


@pytest.mark.parametrize("bad", [
    _rec(nparts=10**7), _rec(nparts="2"), _rec(nparts=0), _rec(part=None, nparts=2),
    _rec(part=3, nparts=2), _rec(part=10**6), _rec(part=None, shape=[2**62, 8], nbytes=0),
    _rec(part=None, shape=[2**62, 8], nbytes=2**65 * 8),
])
def test_record_from_wire_bounds_parts_and_sizes(bad: dict[str, object]) -> None:
    # Every O(nparts) structure a catalog builds from a peer's claim is bounded by these,
    # and a size that overflows int64 (2**62 x 8 wraps to 0 in numpy) is refused.
    with pytest.raises(ProtocolError):
        DatasetRecord.from_wire(bad)
    assert DatasetRecord.from_wire(_rec(nparts=MAX_PARTS, part=MAX_PARTS - 1)).nparts == (
        MAX_PARTS)


@pytest.mark.parametrize("part,nparts,match", [
    (0, 10**7, "nparts must be between"), (0, "2", "nparts must be a positive integer"),
    (0, 0, "nparts must be between"), (None, 2, "outside nparts"), (5, 2, "outside nparts"),
    (10**6, None, "too large"),
])
def test_put_validates_part_and_nparts(tmp_path: Path, part: object, nparts: object,
                                       match: str) -> None:
    store = Store(tmp_path, "me")
    store.open()
    with pytest.raises(InvalidData, match=match):
        store.put_array("P", np.zeros(3), part=part, nparts=nparts)  # type: ignore[arg-type]
    assert not list(store.dir.iterdir())


def test_impossible_sizes_are_refused_before_any_file_exists(tmp_path: Path) -> None:
    store = Store(tmp_path, "me")
    store.open()
    with pytest.raises(InvalidData, match="PiB"):
        store.begin("H", (2**62, 8), "<u1")  # numpy's int64 product wraps to 0 here
    with pytest.raises(InvalidData, match="chunks"):
        store.begin("H", (2**44,), "<u1", chunk_bytes=4096)  # 4 billion digests
    assert not list(store.dir.iterdir())


def test_failed_writes_are_typed_and_leave_nothing(tmp_path: Path) -> None:
    """A write the file system refuses (here RLIMIT_FSIZE: EFBIG, as ENOSPC would be)
    is a StoreError, and abort removes the temp file; so is a file that cannot even be
    created at its size."""
    store = Store(tmp_path, "me")
    store.open()
    w = store.begin("F", (4 * 1024 * 1024,), "<u1", chunk_bytes=1024 * 1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, hard))
    try:
        w.write_chunk(0, np.ones(1024 * 1024, np.uint8))  # below the limit: fine
        with pytest.raises(StoreError, match="File too large"):
            w.write_chunk(2, np.ones(1024 * 1024, np.uint8))
        w.abort()
        with pytest.raises(StoreError, match="cannot create"):
            store.begin("G", (64 * 1024 * 1024,), "<u1")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not list(store.dir.iterdir())
    assert store.put_array("F", np.arange(10)).key == "F"  # nothing stuck as "busy"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "pop"]), st.sampled_from("ABC"),
                          st.sampled_from([None, 0, 1]), st.booleans()), max_size=40))
def test_record_table_indexes_match_a_scan(ops: list[tuple[str, str, int | None, bool]]) -> None:
    """The by-name and slice indexes always say what scanning every record would."""
    from hpcflow.catalog.record import RecordTable

    table = RecordTable()
    for what, name, part, is_slice in ops:
        rec = DatasetRecord(f"{name}:rows0-1" if is_slice else name, None if is_slice else part,
                            "n1", (1,), "<f8", 8, "x", 4096,
                            lineage={"slice_of": name, "rows": [0, 1]} if is_slice else {})
        if what == "set":
            table[rec.key] = rec
        elif what == "del" and rec.key in table:
            del table[rec.key]
        else:
            table.pop(rec.key, None)
        for n in "ABC":
            assert sorted(r.key for r in table.named(n)) == sorted(
                r.key for r in table.values() if r.name == n)
            assert sorted(r.key for r in table.slices_of(n)) == sorted(
                r.key for r in table.values() if r.lineage.get("slice_of") == n)
    with pytest.raises(TypeError):
        table.update({})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "swap", "drop"]),
                          st.sampled_from(["o1", "o2", "o3"]), st.sampled_from("AB"),
                          st.sampled_from([None, 0, 1]), st.booleans()), max_size=40))
def test_record_tables_index_matches_a_scan(
        ops: list[tuple[str, str, str, int | None, bool]]) -> None:
    """Across origins' tables, which origins hold (a slice of) a name is always what
    scanning every table would say: records set and deleted in a table that is in the
    set, tables replaced (a resync) and dropped (a forgotten member)."""
    from hpcflow.catalog.record import RecordTable, RecordTables

    tables = RecordTables()
    for what, origin, name, part, is_slice in ops:
        rec = DatasetRecord(f"{name}:rows0-1" if is_slice else name, None if is_slice else part,
                            origin, (1,), "<f8", 8, "x", 4096,
                            lineage={"slice_of": name, "rows": [0, 1]} if is_slice else {})
        if what == "swap":  # a resync: a new table, with this record, replaces the old
            tables[origin] = RecordTable([rec])
        elif what == "drop":
            tables.pop(origin, None)
        elif origin not in tables:
            tables[origin] = RecordTable()
        elif what == "set":
            tables[origin][rec.key] = rec
        elif rec.key in tables[origin]:
            del tables[origin][rec.key]
        for n in "AB":
            assert sorted(tables.holding(n)) == sorted(
                o for o, t in tables.items() if any(r.name == n for r in t.values()))
            assert sorted(tables.slicing(n)) == sorted(
                o for o, t in tables.items()
                if any(r.lineage.get("slice_of") == n for r in t.values()))
    held = RecordTable()
    tables["o1"] = held
    with pytest.raises(ValueError):
        tables["o2"] = held  # one set at a time: the index would go stale
    with pytest.raises(TypeError):
        tables.update({})
