"""Reports: checksums, the rounding tolerance, the JSON shape, the table, the plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcflow.harness.replay import APPROACHES
from hpcflow.harness.report import (
    MATPLOTLIB_REQUIREMENT,
    MESSAGES,
    ApproachResult,
    array_checksum,
    compare,
    format_table,
    human_bytes,
    plot,
    to_json,
)


def results() -> list[ApproachResult]:
    return [
        ApproachResult(approach="decentralised", bytes_moved=3 * 2**20, wall_s=0.25,
                       links={"n2->n1": 2**20, "n3->n2": 2 * 2**20}, messages=12,
                       result_checksum="abc", matches_reference=True, max_abs_err=1e-15),
        ApproachResult(approach="nfs", bytes_moved=64 * 2**20 + 5, wall_s=1.5,
                       links={"nfs->n1": 40 * 2**20, "n1->nfs": 24 * 2**20 + 5}, messages=8,
                       result_checksum="abc", matches_reference=False, max_abs_err=math.inf,
                       extra={"placement_bytes": 10}),
        ApproachResult.skip("centralised", "no daemons in this test"),
    ]


def test_checksum_covers_dtype_shape_and_bytes() -> None:
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert array_checksum(a) == array_checksum(a.copy())
    assert array_checksum(a) == array_checksum(np.asfortranarray(a))  # values, not layout
    assert array_checksum(a) != array_checksum(a.reshape(4, 3))
    assert array_checksum(a) != array_checksum(a.astype(np.float32))
    b = a.copy()
    b[2, 3] = np.nextafter(b[2, 3], 100)
    assert array_checksum(a) != array_checksum(b)
    assert len(array_checksum(np.empty((0, 3)))) == 64


def test_compare_accepts_split_rounding_and_rejects_real_errors() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 8))
    whole = x.mean(axis=0)
    split = sum(p.sum(axis=0) for p in np.array_split(x, 7)) / len(x)
    assert not np.array_equal(whole, split)  # the rounding really differs
    ok, err = compare(split, whole)
    assert ok and 0 < err < 1e-12
    assert compare(whole, whole) == (True, 0.0)
    wrong = whole.copy()
    wrong[3] += 1e-6
    ok, err = compare(wrong, whole)
    assert not ok and err == pytest.approx(1e-6, rel=1e-3)


def test_compare_dtypes_shapes_ints_nans() -> None:
    a = np.arange(6, dtype=np.int64)
    assert compare(a, a.copy()) == (True, 0.0)
    b = a.copy()
    b[0] += 1
    assert compare(b, a) == (False, 1.0)
    assert compare(a.astype(np.float64), a)[0] is False  # dtype must match
    assert compare(a.reshape(2, 3), a) == (False, math.inf)
    f32 = np.linspace(0, 30, 5, dtype=np.float32)
    assert compare(f32 + np.float32(1e-5), f32)[0]  # float32 rounding
    assert not compare(f32 + np.float32(0.1), f32)[0]
    nan = np.array([1.0, np.nan])
    assert compare(nan, nan.copy()) == (True, 0.0)
    assert compare(np.array([1.0, 2.0]), nan) == (False, math.inf)
    c = np.fft.fft(np.ones((2, 4)), axis=1)
    assert compare(c + 1e-12j, c)[0]


def test_json_shape() -> None:
    doc = to_json("use-case-one", results())
    assert set(doc) == {"scenario", "approaches"}
    assert doc["scenario"] == "use-case-one"
    assert list(doc["approaches"]) == ["decentralised", "nfs", "centralised"]
    nfs = doc["approaches"]["nfs"]
    assert nfs["bytes_moved"] == 64 * 2**20 + 5 and nfs["wall_s"] == 1.5
    assert nfs["links"] == {"nfs->n1": 40 * 2**20, "n1->nfs": 24 * 2**20 + 5}
    assert nfs["result_checksum"] == "abc" and nfs["messages"] == 8
    assert nfs["max_abs_err"] is None and nfs["matches_reference"] is False
    assert nfs["extra"] == {"placement_bytes": 10} and nfs["skipped"] is None
    assert doc["approaches"]["centralised"]["skipped"] == "no daemons in this test"
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc


def test_table_contents() -> None:
    table = format_table("use-case-one", results())
    lines = table.splitlines()
    assert lines[0] == "scenario use-case-one"
    row = next(line for line in lines if line.startswith("nfs "))
    assert "64 MiB" in row and "1.50 s" in row and " 8 " in row and "MISMATCH" in row
    row = next(line for line in lines if line.startswith("decentralised "))
    assert "3 MiB" in row and "250 ms" in row and "ok" in row
    link = next(line for line in lines if line.startswith("n3->n2"))
    assert link.split()[1:] == ["2", "MiB", "-"]
    assert any(line.startswith("nfs->n1") and "40 MiB" in line for line in lines)
    assert lines[-1] == "centralised: skipped: no daemons in this test"
    assert not any(line.startswith("centralised") for line in lines[:-1])


def test_failed_approach_is_in_table_and_json() -> None:
    rs = [*results()[:1], ApproachResult.fail("centralised", "HpcflowError: agent failed")]
    table = format_table("x", rs)
    assert table.splitlines()[-1] == "centralised: FAILED: HpcflowError: agent failed"
    assert not any(line.startswith("centralised ") for line in table.splitlines())
    doc = to_json("x", rs)["approaches"]
    assert doc["centralised"]["failed"] == "HpcflowError: agent failed"
    assert doc["centralised"]["skipped"] is None and doc["decentralised"]["failed"] is None


def test_messages_column_is_defined_for_every_approach() -> None:
    assert set(MESSAGES) == set(APPROACHES)


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(64 * 2**20) == "64 MiB"
    assert human_bytes(3 * 2**40) == "3 TiB"
    assert human_bytes(2**63) == "8 EiB"  # scenario size checks quote absurd sizes


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason=f"plot needs {MATPLOTLIB_REQUIREMENT}")
    out = tmp_path / "report.png"
    plot({"use-case-one": results(), "median": results()[:2]}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=f"pip install '{MATPLOTLIB_REQUIREMENT}'"):
        plot({"x": results()}, tmp_path / "x.png")
