"""Scenario files: the shipped ones load, bad ones say file + key + problem, data is deterministic.

Real TOML files and real HDF5/H5MD files throughout (written to tmp_path
where a test needs a variant).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from hpcflow.errors import ConfigError
from hpcflow.harness.netns import MAX_GBIT, MIN_GBIT
from hpcflow.harness.scenario import (
    LinkSpec,
    Scenario,
    generate,
    list_scenarios,
    load_scenario,
    memory_limit,
    reference_result,
)

# Real NFS servers, network namespaces and whole replays: one xdist worker runs
# them one after another (tests/conftest.py), the rest of the suite beside them.
pytestmark = pytest.mark.xdist_group("hosts")

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
SHIPPED = list_scenarios(SCENARIOS)
H5MD = SCENARIOS / "data" / "chain.h5md"


def test_the_required_scenarios_are_shipped() -> None:
    names = {load_scenario(p).name for p in SHIPPED}
    assert {"use-case-one", "linear-reduction-4", "median-unequal", "fan-in-6",
            "h5md-trajectory"} <= names
    data_bytes = sum(p.stat().st_size for p in (SCENARIOS / "data").rglob("*") if p.is_file())
    assert data_bytes < 2 * 2**20


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenario_loads_generates_and_computes(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.file == path.resolve() and sc.initiator in sc.nodes
    data = generate(sc)
    assert list(data) == list(sc.datasets)
    total = 0
    for name, ds in sc.datasets.items():
        parts = data[name]
        assert [node for node, _ in parts] == [p.node for p in ds.parts]
        assert [len(arr) for _, arr in parts] == [p.rows for p in ds.parts]
        for _, arr in parts:
            assert arr.shape[1:] == ds.shape[1:] and str(arr.dtype) == ds.dtype
        total += ds.nbytes
    assert total < 64 * 2**20  # replayable in seconds, not minutes
    result = reference_result(sc, data)
    shape, dtype = sc.array_info(sc.result)
    assert result.shape == shape and result.dtype == dtype


def test_generate_is_deterministic_and_independent_of_partitioning(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "linear-reduction-4.toml")
    first, second = generate(sc), generate(sc)
    for (n1, a1), (n2, a2) in zip(first["SIM"], second["SIM"], strict=True):
        assert n1 == n2 and np.array_equal(a1, a2)
    text = (SCENARIOS / "linear-reduction-4.toml").read_text()
    start = text.index("parts = [")
    end = text.index("]\n", text.index("{ node = \"n5\"")) + 2
    one = tmp_path / "one.toml"
    one.write_text(text[:start] + 'parts = [{ node = "n3", rows = 160000 }]\n' + text[end:])
    whole = generate(load_scenario(one))["SIM"]
    assert len(whole) == 1 and whole[0][0] == "n3"
    assert np.array_equal(whole[0][1], np.concatenate([a for _, a in first["SIM"]]))
    other_seed = tmp_path / "seed.toml"
    other_seed.write_text(text.replace("seed = 1", "seed = 2"))
    assert not np.array_equal(generate(load_scenario(other_seed))["SIM"][0][1], first["SIM"][0][1])


def test_use_case_one_reference_is_fft_plus_fft() -> None:
    sc = load_scenario(SCENARIOS / "use-case-one.toml")
    data = generate(sc)
    (node1, ds1), = data["DS1"]
    (node2, ds2), = data["DS2"]
    assert (node1, node2, sc.initiator, sc.result) == ("n2", "n3", "n1", "C")
    # the documented recipe: one generator per (seed, dataset name)
    seq = np.random.SeedSequence(0, spawn_key=(zlib.crc32(b"DS1"),))
    assert np.array_equal(ds1, np.random.default_rng(seq).standard_normal((50000, 12)))
    expected = np.fft.fft(ds1, axis=1) + np.fft.fft(ds2, axis=1)
    result = reference_result(sc, data)
    assert result.dtype == np.complex128
    np.testing.assert_array_equal(result, expected)


def test_links_are_symmetric_with_overrides() -> None:
    sc = load_scenario(SCENARIOS / "median-unequal.toml")
    assert sc.links.gbit("n1", "n2") == sc.links.gbit("n2", "n1") == 0.25
    assert sc.links.gbit("n3", "n1") == 1.0
    assert sc.links.gbit("n1", "nfs") == 1.0
    spec = LinkSpec(default_gbit=10.0, overrides={("n1", "nfs"): 0.5})
    assert spec.gbit("nfs", "n1") == 0.5 and spec.gbit("n2", "nfs") == 10.0


def test_h5md_source_is_read_and_split(tmp_path: Path) -> None:
    sc = load_scenario(SCENARIOS / "h5md-trajectory.toml")
    ds = sc.datasets["POS"]
    assert ds.source == H5MD and ds.shape == (160, 256, 3) and ds.dtype == "float32"
    with h5py.File(H5MD, "r") as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        whole = f["/particles/chain/position/value"][:]
        assert f["/particles/chain/position/step"].shape == (160,)
        assert f["/particles/chain/position/time"].shape == (160,)
    (n2, a), (n3, b) = generate(sc)["POS"]
    assert (n2, n3) == ("n2", "n3")
    assert np.array_equal(a, whole[:100]) and np.array_equal(b, whole[100:])
    centred = whole - whole.mean(axis=1, keepdims=True)
    rg = np.sqrt((centred**2).sum(axis=2).mean(axis=1))
    counts, edges = np.histogram(rg, bins=12, range=(0.0, 24.0))
    result = reference_result(sc, generate(sc))  # bins x [left edge, right edge, count]
    np.testing.assert_array_equal(result, np.column_stack([edges[:-1], edges[1:], counts]))
    assert result[:, 2].sum() == 160  # every frame falls inside the range


@pytest.mark.parametrize("name,path,frames", [
    ("cu.h5md", "/particles/atoms/position", 20),
    ("cobrotoxin.h5md", "/particles/trajectory/position/value", 3),
    ("coordinates/test.h5md", "/particles/trajectory/position", 5),
])
def test_mdanalysis_test_files_load(tmp_path: Path, real_h5md: Path, name: str, path: str,
                                    frames: int) -> None:
    first = frames // 2
    scenario = tmp_path / "md.toml"
    scenario.write_text(f"""
name = "md"
nodes = ["n1", "n2"]
initiator = "n1"
result = "AVG"
[datasets.POS]
source = "{real_h5md / name}"
path = "{path}"
parts = [{{ node = "n1", rows = {first} }}, {{ node = "n2", rows = {frames - first} }}]
[[steps]]
out = "AVG"
op = "colmean"
inputs = ["POS"]
""")
    sc = load_scenario(scenario)
    assert sc.datasets["POS"].shape[0] == frames
    data = generate(sc)
    whole = np.concatenate([a for _, a in data["POS"]])
    np.testing.assert_allclose(reference_result(sc, data), whole.mean(axis=0), rtol=1e-6)


def test_list_scenarios_only_lists_toml(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text("")
    (tmp_path / "a.toml").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.toml").write_text("")
    assert list_scenarios(tmp_path) == [tmp_path / "a.toml", tmp_path / "b.toml"]


# --- bad files ----------------------------------------------------------------

BASE = """\
name = "bad"
nodes = ["n1", "n2"]
initiator = "n1"
result = "B"
seed = 0
ops = []
[links]
default_gbit = 1.0
[datasets.DS1]
shape = [100, 4]
dtype = "float64"
parts = [{ node = "n1", rows = 60 }, { node = "n2", rows = 40 }]
[datasets.DS2]
shape = [100, 4]
dtype = "float64"
parts = [{ node = "n2", rows = 100 }]
[datasets.POS]
source = "SOURCE"
path = "/particles/chain/position"
parts = [{ node = "n2", rows = 160 }]
[[steps]]
out = "A"
op = "scale"
inputs = ["DS1"]
params = { factor = 2.0 }
[[steps]]
out = "B"
op = "add"
inputs = ["A", "DS2"]
"""

# (id, (old, new) replacements of BASE, key named in the message, problem text)
BAD: list[tuple[str, list[tuple[str, str]], str, str]] = [
    ("unknown-top-key", [("seed = 0", "seed = 0\ncolour = 'red'")], "colour", "unknown key"),
    ("wrong-type", [("seed = 0", 'seed = "zero"')], "seed", "must be int"),
    ("bool-is-not-int", [("seed = 0", "seed = true")], "seed", "must be int"),
    ("missing-name", [('name = "bad"\n', "")], "name", "missing"),
    ("unknown-initiator", [('initiator = "n1"', 'initiator = "n7"')], "initiator",
     "unknown node 'n7'"),
    ("duplicate-node", [('["n1", "n2"]', '["n1", "n2", "n1"]')], "nodes", "listed twice"),
    ("reserved-node", [('["n1", "n2"]', '["n1", "n2", "nfs"]')], "nodes[2]", "reserved"),
    ("unknown-dataset-key", [("shape = [100, 4]\ndtype", "shap = [1]\nshape = [100, 4]\ndtype")],
     "datasets.DS1.shap", "unknown key"),
    ("unknown-part-node", [('{ node = "n2", rows = 100 }', '{ node = "n9", rows = 100 }')],
     "datasets.DS2.parts[0].node", "unknown node 'n9'"),
    ("rows-do-not-sum", [("rows = 40 }", "rows = 39 }")], "datasets.DS1.parts",
     "rows sum to 99 but shape[0] is 100"),
    ("negative-rows", [("rows = 40 }", "rows = -40 }")], "datasets.DS1.parts[1].rows", ">= 0"),
    ("bad-dtype", [('dtype = "float64"\nparts = [{ node = "n2"',
                    'dtype = "U8"\nparts = [{ node = "n2"')], "datasets.DS2.dtype",
     "not supported"),
    ("bad-shape", [("shape = [100, 4]\ndtype", "shape = [100, -4]\ndtype")],
     "datasets.DS1.shape", "non-negative integers"),
    ("unknown-op", [('op = "scale"', 'op = "sacle"')], "steps[0].op", "unknown op 'sacle'"),
    ("undefined-input", [('inputs = ["A", "DS2"]', 'inputs = ["A", "DS3"]')],
     "steps[1].inputs[1]", "'DS3' is not defined"),
    ("input-defined-later", [('inputs = ["A", "DS2"]', 'inputs = ["DS1", "DS2"]'),
                             ('inputs = ["DS1"]', 'inputs = ["B"]')], "steps[0].inputs[0]",
     "'B' is produced by a later step (steps[1]); steps run in file order"),
    ("cycle", [('inputs = ["DS1"]', 'inputs = ["B"]')], "steps[0].inputs[0]",
     "cycle in steps: A needs B needs A"),
    ("self-cycle", [('inputs = ["A", "DS2"]', 'inputs = ["B", "DS2"]')], "steps[1].inputs[0]",
     "cycle in steps: B needs its own output"),
    ("reserved-orch-node", [('["n1", "n2"]', '["n1", "n2", "orch"]')], "nodes[2]",
     "reserved for the centralised orchestrator"),
    ("huge-row", [("shape = [100, 4]\ndtype", "shape = [100, 40000000000]\ndtype")],
     "datasets.DS1.shape", "dataset DS1 has rows of 298 GiB; at most 16 MiB per row"),
    ("huge-dataset", [("shape = [100, 4]\ndtype", "shape = [100000000000000, 4]\ndtype"),
                      ("rows = 40 }", "rows = 99999999999940 }")],
     "datasets.DS1.shape", "dataset DS1 would be 2.84 PiB"),
    ("too-many-dims", [("shape = [100, 4]\ndtype", "shape = [100" + ", 1" * 40 + "]\ndtype")],
     "datasets.DS1.shape", "41 dimensions; at most 32"),
    ("infinite-bandwidth", [("default_gbit = 1.0", "default_gbit = inf")],
     "links.default_gbit", "must be within 1e-05..100 Gbit/s"),
    ("nan-bandwidth", [("default_gbit = 1.0", "default_gbit = nan")], "links.default_gbit",
     "got nan"),
    ("too-slow-to-shape", [("default_gbit = 1.0", "default_gbit = 1e-6")],
     "links.default_gbit", "must be within 1e-05..100 Gbit/s"),
    ("infinite-override", [("default_gbit = 1.0", 'default_gbit = 1.0\n"n1-n2" = inf')],
     "links.n1-n2", "must be within"),
    ("too-fast-orch-link", [("default_gbit = 1.0", 'default_gbit = 1.0\n"n1-orch" = 400')],
     "links.n1-orch", "must be within"),
    ("duplicate-output", [('out = "B"', 'out = "A"')], "steps[1].out", "must be unique"),
    ("output-shadows-dataset", [('out = "A"', 'out = "DS2"')], "steps[0].out",
     "already a dataset"),
    ("result-not-produced", [('result = "B"', 'result = "Z"')], "result", "not produced"),
    ("wrong-arity", [('inputs = ["A", "DS2"]', 'inputs = ["A"]')], "steps[1]",
     "takes 2 input(s)"),
    ("rows-mismatch", [('inputs = ["A", "DS2"]', 'inputs = ["A", "POS"]')], "steps[1]",
     "equal row counts"),
    ("bad-params", [("params = { factor = 2.0 }", "params = { fatcor = 2.0 }")], "steps[0]",
     "bad params"),
    ("step-unknown-key", [('op = "add"', 'op = "add"\nkind = "x"')], "steps[1].kind",
     "unknown key"),
    ("missing-source", [('source = "SOURCE"', 'source = "nowhere.h5md"')],
     "datasets.POS.source", "does not exist"),
    ("bad-h5md-path", [('path = "/particles/chain/position"', 'path = "/particles/nope"')],
     "datasets.POS.path", "has no dataset '/particles/nope'"),
    ("h5md-shape-mismatch", [('path = "/particles', 'shape = [160, 256, 2]\npath = "/particles')],
     "datasets.POS.shape", "declared (160, 256, 2)"),
    ("path-without-source", [("shape = [100, 4]\ndtype", "path = '/x'\nshape = [100, 4]\ndtype")],
     "datasets.DS1.path", "only valid together with 'source'"),
    ("missing-package", [('source = "SOURCE"', 'source_package = "no_such_pkg_xyz"\nsource = "x"')],
     "datasets.POS.source_package", "not installed"),
    ("bad-link-pair", [("default_gbit = 1.0", 'default_gbit = 1.0\n"n1-n9" = 0.1')],
     "links.n1-n9", "not a link"),
    ("zero-bandwidth", [("default_gbit = 1.0", "default_gbit = 0")], "links.default_gbit",
     "must be within"),
    ("missing-op-module", [("ops = []", 'ops = ["nowhere.py"]')], "ops[0]", "does not exist"),
]


def _write(tmp_path: Path, replacements: list[tuple[str, str]]) -> Path:
    text = BASE
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    text = text.replace("SOURCE", str(H5MD))
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_base_of_the_bad_cases_is_good(tmp_path: Path) -> None:
    sc = load_scenario(_write(tmp_path, []))
    assert isinstance(sc, Scenario) and [s.out for s in sc.steps] == ["A", "B"]


@pytest.mark.parametrize("replacements,key,problem", [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_file_message_names_file_key_and_problem(
        tmp_path: Path, replacements: list[tuple[str, str]], key: str, problem: str) -> None:
    path = _write(tmp_path, replacements)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message, message


def test_bandwidth_range_ends_and_orch_links_are_accepted(tmp_path: Path) -> None:
    path = _write(tmp_path, [("default_gbit = 1.0",
                              'default_gbit = 1e-5\n"n1-orch" = 100\n"n2-nfs" = 0.5')])
    links = load_scenario(path).links
    assert links.default_gbit == MIN_GBIT == 1e-5
    assert links.gbit("orch", "n1") == MAX_GBIT == 100.0 and links.gbit("nfs", "n2") == 0.5


def test_step_output_too_big_to_hold_is_refused_before_anything_runs(tmp_path: Path) -> None:
    # fft doubles the bytes: an input at 3/4 of the limit makes an output at 3/2 of it
    rows = memory_limit() * 3 // 4 // (4 * 8)
    path = _write(tmp_path, [("shape = [100, 4]\ndtype", f"shape = [{rows}, 4]\ndtype"),
                             ("rows = 40 }", f"rows = {rows - 60} }}"),
                             ('op = "scale"\ninputs = ["DS1"]\nparams = { factor = 2.0 }',
                              'op = "fft"\ninputs = ["DS1"]')])
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: steps[0]: output A would be ")
    assert "a quarter of RAM" in str(info.value)


def test_not_h5md_source(tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["/particles/chain/position/value"] = np.zeros((160, 256, 3), dtype=np.float32)
    path = _write(tmp_path, [("SOURCE", str(plain))])
    with pytest.raises(ConfigError, match=r"datasets\.POS\.source: .* is not H5MD"):
        load_scenario(path)


@pytest.mark.parametrize("content,problem", [
    (None, "no such scenario file"),
    ("name = [", "invalid TOML"),
    ('name = "x"\nnodes = ["n1"]\ninitiator = "n1"\nresult = "D"\n', "datasets: missing"),
])
def test_unreadable_files(tmp_path: Path, content: Any, problem: str) -> None:
    path = tmp_path / "broken.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert str(info.value).startswith(str(path)) and problem in str(info.value)
