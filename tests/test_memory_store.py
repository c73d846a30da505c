"""Volatile parts: held in memory within the budget, spilled past it, forgotten on restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcflow.catalog.memory import MemoryReader
from hpcflow.catalog.store import Store
from hpcflow.errors import DatasetNotFound, IntegrityError


def opened(root: Path, budget: int = 1 << 20) -> Store:
    s = Store(root, "n1", memory_budget=budget)
    s.open()
    return s


def test_a_volatile_part_lives_in_memory_and_reads_back_exactly(tmp_path: Path) -> None:
    s = opened(tmp_path)
    events: list[tuple[str, bool]] = []
    s.listeners.append(lambda key, rec: events.append((key, rec is not None)))
    a = np.arange(5000, dtype=np.float64).reshape(1000, 5)
    rec = s.put_array("I", a, volatile=True, chunk_bytes=8192)
    assert s.is_volatile("I") and isinstance(s.reader("I"), MemoryReader)
    assert not any(tmp_path.rglob("I*.h5")), "an in-memory part must not touch the disk"
    assert s.memory_used == a.nbytes
    np.testing.assert_array_equal(s.read_array("I"), a)  # verify=True: digests recomputed
    # Chunks and ranges are served from memory, as the bulk path reads them.
    r = s.reader("I", rec.version)
    joined = b"".join(bytes(r.chunk(i)[0]) for i in range(len(r)))
    assert joined == a.tobytes() and len(r) > 1
    assert bytes(r.byte_range(40, 16)) == a.tobytes()[40:56]
    # The same record (checksum included) as a durable write of the same data.
    durable = s.put_array("D", a, chunk_bytes=8192)
    assert durable.checksum == rec.checksum and (tmp_path / "datasets" / "D.h5").exists()
    s.delete("I")
    assert s.memory_used == 0 and not s.is_volatile("I")
    with pytest.raises(DatasetNotFound):
        s.reader("I")
    assert events == [("I", True), ("D", True), ("I", False)]


def test_an_adopted_array_is_kept_without_a_copy_and_cannot_change_behind_the_catalog(
        tmp_path: Path) -> None:
    s = opened(tmp_path)
    a = np.arange(40_000, dtype=np.float64).reshape(8000, 5).copy()  # 320 kB, 5 chunks
    expected = a.copy()
    rec = s.put_array("A", a, volatile=True, chunk_bytes=65536, adopt=True)
    held = s.reader("A").array()
    assert np.shares_memory(held, a), "an adopted array must be kept, not copied"
    assert not a.flags.writeable, "the caller's array must not change the stored part"
    with pytest.raises(ValueError):
        a[0, 0] = -1.0
    np.testing.assert_array_equal(s.read_array("A"), expected)  # digests verified
    # The same checksum as a copied write of the same bytes.
    assert s.put_array("C", expected, volatile=True, chunk_bytes=65536).checksum == rec.checksum
    assert s.memory_used == 2 * a.nbytes
    # Views, non-contiguous arrays and durable parts are copied as before.
    base = np.arange(40_000, dtype=np.float64)
    s.put_array("V", base[:20_000], volatile=True, adopt=True)
    s.put_array("T", expected.T, volatile=True, adopt=True)
    s.put_array("D", base, adopt=True)
    assert base.flags.writeable and not np.shares_memory(s.reader("V").array(), base)
    np.testing.assert_array_equal(s.read_array("T"), expected.T)
    np.testing.assert_array_equal(s.read_array("D"), base)


def test_past_the_budget_volatile_parts_spill_unsynced_and_are_gone_after_restart(
        tmp_path: Path) -> None:
    s = opened(tmp_path, budget=10_000)
    small, big = np.ones(1000, np.float64), np.ones(2000, np.float64)
    s.put_array("A", small, volatile=True)          # 8000 bytes: fits
    s.put_array("B", big, volatile=True)            # would exceed: spilled
    assert s.stats() == {"memory_used": 8000, "memory_budget": 10_000, "in_memory": 1,
                         "spilled": 1}
    assert (tmp_path / "spill" / "B.h5").exists()
    np.testing.assert_array_equal(s.read_array("B"), big)
    s.delete("A")
    s.put_array("C", small, volatile=True)          # room again
    assert s.is_volatile("C") and isinstance(s.reader("C"), MemoryReader)
    s.close()
    again = opened(tmp_path, budget=10_000)
    assert again.records() == [] and not any((tmp_path / "spill").iterdir())


def test_overwriting_moves_a_part_between_memory_spill_and_disk(tmp_path: Path) -> None:
    s = opened(tmp_path, budget=10_000)
    for step, (n, volatile) in enumerate([(100, True), (2000, True), (10, False),
                                           (100, True), (3000, False)]):
        a = np.full(n, step, np.float64)
        rec = s.put_array("X", a, volatile=volatile, overwrite=True)
        assert rec.version == step + 1
        np.testing.assert_array_equal(s.read_array("X"), a)
        files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("X.h5"))
        expect = [] if volatile and n * 8 <= 10_000 else [
            "spill/X.h5" if volatile else "datasets/X.h5"]
        assert files == expect, (step, files)
        assert s.memory_used == (n * 8 if expect == [] else 0)
    s.delete("X")
    assert not any(tmp_path.rglob("X.h5")) and s.memory_used == 0


def test_an_aborted_or_corrupt_memory_write_leaves_nothing(tmp_path: Path) -> None:
    s = opened(tmp_path)
    w = s.begin("Z", (100,), np.float64, volatile=True)
    assert s.memory_used == 800
    w.abort()
    assert s.memory_used == 0 and s.records() == []
    w = s.begin("Z", (100,), np.float64, volatile=True)
    with pytest.raises(IntegrityError):
        w.write_chunk(0, np.zeros(100).tobytes(), digest=12345)
    w.abort()
    assert s.memory_used == 0 and s.records() == []
    w = s.begin("Z", (100,), np.float64, volatile=True)
    w.write_chunk(0, np.zeros(100).tobytes())
    with pytest.raises(IntegrityError):
        w.commit("xxh3:not-it")
    assert s.memory_used == 0 and s.records() == []


def test_a_reader_taken_before_a_delete_keeps_its_bytes(tmp_path: Path) -> None:
    """A transfer in flight while the flow closes must not read freed memory."""
    s = opened(tmp_path)
    a = np.arange(100.0)
    s.put_array("R", a, volatile=True)
    r = s.reader("R")
    s.delete("R")
    assert bytes(r.chunk(0)[0]) == a.tobytes()


def test_empty_and_scalar_volatile_parts(tmp_path: Path) -> None:
    s = opened(tmp_path)
    for name, a in [("E", np.empty((0, 3))), ("S", np.float32(2.5)), ("O", np.ones((1, 1)))]:
        s.put_array(name, a, volatile=True)
        out = s.read_array(name)
        assert out.shape == np.shape(a) and out.dtype == np.asarray(a).dtype
        np.testing.assert_array_equal(out, a)
