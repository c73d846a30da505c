"""Scenario files: a workflow, its cluster and its data, declared in TOML.

A scenario is what every approach (decentralised, centralised, NFS) replays,
so it must pin down everything that influences bytes moved: which nodes
exist, where each row-part of each dataset lives, the steps of the script in
order, which node runs the script (the *initiator*, where the result must
end), and the link bandwidths.  Data is generated deterministically from
``seed`` (or read from an H5MD file), so two approaches always see the same
bytes and their results can be compared with :func:`reference_result`.

Example (``scenarios/use-case-one.toml``)::

    name = "use-case-one"
    nodes = ["n1", "n2", "n3"]
    initiator = "n1"
    result = "C"
    seed = 0
    ops = []                    # user op modules: "x.py" (relative to the file) or a module name
    [links]
    default_gbit = 1.0          # per-pair overrides: "n1-n3" = 0.1 ("nfs" names the NFS
                                # host, "orch" the centralised orchestrator's)
    [datasets.DS1]
    shape = [50000, 12]
    dtype = "float64"
    parts = [{ node = "n2", rows = 50000 }]
    [[steps]]
    out = "A"
    op = "fft"
    inputs = ["DS1"]
    params = {}

An H5MD dataset replaces ``shape``/``dtype`` (optional then; checked if given)
by ``source`` (path relative to the scenario file, or to an installed package
named by ``source_package``, e.g. ``MDAnalysisTests``) and ``path`` (the HDF5
dataset or H5MD element group inside it).  Steps may only use names defined
before them: the script is sequential.  Every problem is a
:class:`~hpcflow.errors.ConfigError` reading ``FILE: KEY: problem``.

Limits checked at load, so that nothing fails half-way through a replay:
bandwidths within what ``tc tbf`` shapes correctly
(:data:`~hpcflow.harness.netns.MIN_GBIT` .. :data:`~hpcflow.harness.netns.MAX_GBIT`
Gbit/s), every dataset and step output small enough to hold in memory
(:func:`memory_limit`: the replay generates every dataset in memory), and a
row of at most :data:`MAX_ROW_BYTES` (output shapes are inferred by running
the op on a few sample rows), at most :data:`MAX_NODES` nodes, :data:`MAX_PARTS`
dataset parts and :data:`MAX_STEPS` steps, arrays or tables nested at most
:data:`~hpcflow.config.MAX_TOML_DEPTH` levels deep, and a file of at most
:data:`MAX_FILE_BYTES`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcflow import ops
from hpcflow.catalog.record import validate_dtype, validate_name
from hpcflow.config import parse_toml
from hpcflow.errors import ConfigError, InvalidData, InvalidName
from hpcflow.harness.netns import MAX_GBIT, MIN_GBIT
from hpcflow.harness.report import human_bytes
from hpcflow.sources import open_source

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "MAX_PARTS",
    "MAX_ROW_BYTES",
    "MAX_STEPS",
    "NFS_HOST",
    "ORCH_HOST",
    "DatasetSpec",
    "LinkSpec",
    "PartSpec",
    "Scenario",
    "StepSpec",
    "gather",
    "generate",
    "list_scenarios",
    "load_scenario",
    "memory_limit",
    "reference_result",
]

NFS_HOST = "nfs"
"""Reserved host name of the NFS server (valid in link overrides, not as a node)."""
ORCH_HOST = "orch"
"""Reserved host name of the centralised orchestrator (valid in link overrides, not as a node)."""
_RESERVED = {NFS_HOST: "the NFS server", ORCH_HOST: "the centralised orchestrator"}

MAX_ROW_BYTES = 16 * 2**20
"""Largest row of a dataset or step output (shape inference runs ops on 2-5 sample rows)."""
_MAX_DIMS = 32
MAX_NODES = 256
"""Most nodes in a scenario (each is a daemon process, and a host with ``--netns``)."""
MAX_PARTS = 4096
"""Most dataset parts in a scenario, all datasets together (each is a put, ~10 ms)."""
MAX_STEPS = 1024
"""Most steps in a scenario."""
MAX_FILE_BYTES = 1 << 20
"""Largest scenario file (the shipped ones are about 1 KiB)."""

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # what netns.Topology accepts
_TOP_KEYS = {"name", "description", "nodes", "initiator", "result", "seed", "ops", "links",
             "datasets", "steps"}
_DATASET_KEYS = {"shape", "dtype", "parts", "source", "source_package", "path"}
_PART_KEYS = {"node", "rows"}
_STEP_KEYS = {"out", "op", "inputs", "params"}

Array = np.ndarray[Any, Any]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class PartSpec:
    """``rows`` consecutive rows of a dataset, held by ``node``."""

    node: str
    rows: int


@dataclass(frozen=True)
class DatasetSpec:
    """A row-partitioned input dataset; parts are in row order."""

    name: str
    shape: Shape
    dtype: str
    parts: tuple[PartSpec, ...]
    source: Path | None = None
    path: str | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def row_ranges(self) -> list[tuple[str, int, int]]:
        """``(node, start, stop)`` of every part, in row order."""
        out, start = [], 0
        for part in self.parts:
            out.append((part.node, start, start + part.rows))
            start += part.rows
        return out


@dataclass(frozen=True)
class StepSpec:
    """``out = op(*inputs, **params)``; ``shape``/``dtype`` are inferred at load."""

    out: str
    op: str
    inputs: tuple[str, ...]
    params: Mapping[str, Any]
    shape: Shape
    dtype: str


@dataclass(frozen=True)
class LinkSpec:
    """Link bandwidths in Gbit/s: a default plus overrides per unordered pair.

    ``overrides`` keys are sorted name pairs, the form ``netns.Topology(links=)``
    takes.
    """

    default_gbit: float = 1.0
    overrides: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def gbit(self, a: str, b: str) -> float:
        """Bandwidth between *a* and *b* (symmetric)."""
        key = (a, b) if a <= b else (b, a)
        return self.overrides.get(key, self.default_gbit)


@dataclass(frozen=True)
class Scenario:
    """One validated scenario file."""

    name: str
    description: str
    file: Path
    nodes: tuple[str, ...]
    initiator: str
    result: str
    seed: int
    ops: tuple[str, ...]
    links: LinkSpec
    datasets: Mapping[str, DatasetSpec]
    steps: tuple[StepSpec, ...]

    def array_info(self, name: str) -> tuple[Shape, np.dtype[Any]]:
        """Shape and dtype of a dataset or a step output."""
        if name in self.datasets:
            ds = self.datasets[name]
            return ds.shape, np.dtype(ds.dtype)
        for step in self.steps:
            if step.out == name:
                return step.shape, np.dtype(step.dtype)
        raise KeyError(name)

    def load_ops(self) -> None:
        """Import the scenario's user op modules into the default op registry."""
        for module in self.ops:
            ops.load_op_module(module)


class _Where:
    """Builds ``FILE: KEY: problem`` errors."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: {key}: {problem}")

    def table(self, value: object, key: str, allowed: set[str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_typename(value)}")
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else unknown[0],
                                f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def get(self, tbl: Mapping[str, Any], key: str, prefix: str, kind: type | tuple[type, ...],
            default: Any = ...) -> Any:
        where = f"{prefix}.{key}" if prefix else key
        if key not in tbl:
            if default is ...:
                raise self.fail(where, "missing")
            return default
        value = tbl[key]
        expected = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
            names = " or ".join(k.__name__ for k in expected)
            raise self.fail(where, f"must be {names}, got {_typename(value)} {value!r}")
        return value

    def name(self, value: object, key: str, check: Callable[[object], Any]) -> str:
        try:
            check(value)
        except (InvalidName, ValueError) as exc:
            raise self.fail(key, str(exc)) from None
        assert isinstance(value, str)
        return value


_TOML_TYPES: dict[type, str] = {dict: "table", list: "array", str: "string"}


def _typename(value: object) -> str:
    return _TOML_TYPES.get(type(value), type(value).__name__)


def _check_node_name(value: object) -> None:
    if not isinstance(value, str) or not _NODE_RE.match(value):
        raise ValueError(f"invalid node name {value!r} (letters, digits, '_.-', <= 64, "
                         "starting with a letter or digit)")
    if value in _RESERVED:
        raise ValueError(f"node name {value!r} is reserved for {_RESERVED[value]}")


def memory_limit() -> int:
    """Largest dataset (or step output) a scenario may declare, in bytes.

    The replay generates every dataset in memory and keeps a gathered copy
    for the numpy reference, and an approach's result arrives in memory too:
    a quarter of this machine's physical memory leaves room for that.
    """
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):  # no sysconf: a conservative 1 GiB
        return 2**30


def _check_size(w: _Where, key: str, shape: Shape, dtype: np.dtype[Any], what: str) -> None:
    """Refuse arrays the replay could not hold, before anything allocates them."""
    if len(shape) > _MAX_DIMS:
        raise w.fail(key, f"{len(shape)} dimensions; at most {_MAX_DIMS} are supported")
    row = math.prod(shape[1:]) * dtype.itemsize
    total = math.prod(shape) * dtype.itemsize
    if row > MAX_ROW_BYTES:
        raise w.fail(key, f"{what} has rows of {human_bytes(row)}; at most "
                     f"{human_bytes(MAX_ROW_BYTES)} per row are supported")
    limit = memory_limit()
    if total > limit:
        raise w.fail(key, f"{what} would be {human_bytes(total)}; the replay holds every array "
                     f"in memory, which allows at most {human_bytes(limit)} here (a quarter of "
                     "RAM)")


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; user op modules are imported.

    Raises :class:`ConfigError` naming the file, the key and the problem.
    """
    file = Path(path).resolve()
    w = _Where(file)
    try:
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:  # parsing 6 MB of TOML takes seconds, and it is no scenario
            raise ConfigError(f"{file}: {human_bytes(size)}; a scenario file may have at most "
                              f"{human_bytes(MAX_FILE_BYTES)}")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    raw = parse_toml(text, file)
    top = w.table(raw, "", _TOP_KEYS)

    name = w.get(top, "name", "", str)
    if not name.strip():
        raise w.fail("name", "must not be empty")
    description = w.get(top, "description", "", str, "")
    nodes_raw = w.get(top, "nodes", "", list)
    if not nodes_raw:
        raise w.fail("nodes", "must list at least one node")
    if len(nodes_raw) > MAX_NODES:
        raise w.fail("nodes", f"{len(nodes_raw)} nodes; at most {MAX_NODES} are supported "
                     "(each is a daemon process)")
    nodes = tuple(w.name(n, f"nodes[{i}]", _check_node_name) for i, n in enumerate(nodes_raw))
    if len(set(nodes)) != len(nodes):
        dup = next(n for n in nodes if nodes.count(n) > 1)
        raise w.fail("nodes", f"node {dup!r} listed twice")
    initiator = w.get(top, "initiator", "", str)
    if initiator not in nodes:
        raise w.fail("initiator", f"unknown node {initiator!r} (nodes: {', '.join(nodes)})")
    seed = w.get(top, "seed", "", int, 0)
    if seed < 0:
        raise w.fail("seed", f"must be >= 0, got {seed}")
    op_modules = _load_ops(w, top, file)
    links = _links(w, top.get("links", {}), nodes)

    if "datasets" not in top:
        raise w.fail("datasets", "missing: declare at least one dataset")
    datasets: dict[str, DatasetSpec] = {}
    for ds_name, ds_raw in w.table(top["datasets"], "datasets").items():
        w.name(ds_name, f"datasets.{ds_name}", validate_name)
        datasets[ds_name] = _dataset(w, ds_name, ds_raw, nodes, file)
    if not datasets:
        raise w.fail("datasets", "empty: declare at least one dataset")
    nparts = sum(len(ds.parts) for ds in datasets.values())
    if nparts > MAX_PARTS:
        raise w.fail("datasets", f"{nparts} parts in all; at most {MAX_PARTS} are supported "
                     "(each is a put into a node's store)")

    steps = _steps(w, w.get(top, "steps", "", list, []), datasets)
    result = w.get(top, "result", "", str)
    produced = [*datasets, *(s.out for s in steps)]
    if result not in produced:
        raise w.fail("result", f"{result!r} is not produced by any step nor declared as a "
                     f"dataset (defined: {', '.join(produced)})")
    return Scenario(name=name, description=description, file=file, nodes=nodes,
                    initiator=initiator, result=result, seed=seed, ops=op_modules, links=links,
                    datasets=datasets, steps=steps)


def _load_ops(w: _Where, top: Mapping[str, Any], file: Path) -> tuple[str, ...]:
    """Resolve op modules (``.py`` paths relative to the file) and import them."""
    resolved = []
    for i, entry in enumerate(w.get(top, "ops", "", list, [])):
        key = f"ops[{i}]"
        if not isinstance(entry, str) or not entry:
            raise w.fail(key, f"must be a module name or .py path, got {entry!r}")
        if entry.endswith(".py") or "/" in entry:
            module = (file.parent / entry).resolve()
            if not module.is_file():
                raise w.fail(key, f"op module file {module} does not exist")
            entry = str(module)
        try:
            ops.load_op_module(entry)
        except ops.OpError as exc:
            raise w.fail(key, str(exc)) from None
        resolved.append(entry)
    return tuple(resolved)


def _links(w: _Where, raw: object, nodes: tuple[str, ...]) -> LinkSpec:
    tbl = w.table(raw, "links")
    hosts = (*nodes, *_RESERVED)
    default = 1.0
    overrides: dict[tuple[str, str], float] = {}
    for key, value in tbl.items():
        where = f"links.{key}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise w.fail(where, f"must be a number (Gbit/s), got {_typename(value)} {value!r}")
        if not MIN_GBIT <= value <= MAX_GBIT:  # also rejects 0, negatives, inf and nan
            raise w.fail(where, f"must be within {MIN_GBIT:g}..{MAX_GBIT:g} Gbit/s (what tc tbf "
                         f"shapes correctly), got {value}")
        if key == "default_gbit":
            default = float(value)
            continue
        # node names may contain '-': accept the one split into two known hosts
        pairs = [(key[:i], key[i + 1:]) for i, c in enumerate(key) if c == "-"]
        pairs = [(a, b) for a, b in pairs if a in hosts and b in hosts and a != b]
        if len(pairs) != 1:
            raise w.fail(where, "not a link: use default_gbit or \"A-B\" with two different "
                         f"hosts from {', '.join(hosts)}")
        a, b = pairs[0]
        pair = (a, b) if a <= b else (b, a)
        if pair in overrides:
            raise w.fail(where, f"link {a}-{b} given twice")
        overrides[pair] = float(value)
    return LinkSpec(default_gbit=default, overrides=overrides)


def _dataset(w: _Where, name: str, raw: object, nodes: tuple[str, ...],
             file: Path) -> DatasetSpec:
    prefix = f"datasets.{name}"
    tbl = w.table(raw, prefix, _DATASET_KEYS)
    source: Path | None = None
    h5path: str | None = None
    if "source" in tbl:
        source, h5path, shape, dtype = _h5md_info(w, prefix, tbl, file)
    else:
        for key in ("path", "source_package"):
            if key in tbl:
                raise w.fail(f"{prefix}.{key}", "only valid together with 'source'")
        shape = _shape(w, f"{prefix}.shape", w.get(tbl, "shape", prefix, list))
        dtype = _dtype(w, f"{prefix}.dtype", w.get(tbl, "dtype", prefix, str, "float64"))
    if source is not None:  # shape/dtype are optional for H5MD, but must match if given
        declared: dict[str, object] = {}
        if "shape" in tbl:
            declared["shape"] = _shape(w, f"{prefix}.shape", tbl["shape"])
        if "dtype" in tbl:
            declared["dtype"] = _dtype(w, f"{prefix}.dtype", tbl["dtype"])
        for key, actual in (("shape", shape), ("dtype", dtype)):
            if key in declared and declared[key] != actual:
                raise w.fail(f"{prefix}.{key}", f"declared {declared[key]} but "
                             f"{source}:{h5path} has {actual}")
    if not shape:
        raise w.fail(f"{prefix}.shape", "must have a row axis (at least 1 dimension)")
    _check_size(w, f"{prefix}.shape", shape, np.dtype(dtype), f"dataset {name}")

    parts_raw = w.get(tbl, "parts", prefix, list)
    if not parts_raw:
        raise w.fail(f"{prefix}.parts", "must list at least one part")
    if len(parts_raw) > MAX_PARTS:  # before checking each of them
        raise w.fail(f"{prefix}.parts", f"{len(parts_raw)} parts; at most {MAX_PARTS} are "
                     "supported in a scenario (each is a put into a node's store)")
    parts = []
    for i, part_raw in enumerate(parts_raw):
        where = f"{prefix}.parts[{i}]"
        part = w.table(part_raw, where, _PART_KEYS)
        node = w.get(part, "node", where, str)
        if node not in nodes:
            raise w.fail(f"{where}.node", f"unknown node {node!r} (nodes: {', '.join(nodes)})")
        rows = w.get(part, "rows", where, int)
        if rows < 0:
            raise w.fail(f"{where}.rows", f"must be >= 0, got {rows}")
        parts.append(PartSpec(node=node, rows=rows))
    total = sum(p.rows for p in parts)
    if total != shape[0]:
        raise w.fail(f"{prefix}.parts", f"rows sum to {total} but shape[0] is {shape[0]}")
    return DatasetSpec(name=name, shape=shape, dtype=dtype, parts=tuple(parts),
                       source=source, path=h5path)


def _shape(w: _Where, key: str, raw: object) -> Shape:
    if not isinstance(raw, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in raw):
        raise w.fail(key, f"must be an array of non-negative integers, got {raw!r}")
    return tuple(raw)


def _dtype(w: _Where, key: str, raw: object) -> str:
    try:
        return str(validate_dtype(raw))
    except InvalidData as exc:
        raise w.fail(key, str(exc)) from None


def _h5md_info(w: _Where, prefix: str, tbl: Mapping[str, Any],
               file: Path) -> tuple[Path, str, Shape, str]:
    """Locate the H5MD source, check its layout and return (file, dataset path, shape, dtype)."""
    rel = w.get(tbl, "source", prefix, str)
    package = w.get(tbl, "source_package", prefix, str, None)
    if package is None:
        base = file.parent
    else:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise w.fail(f"{prefix}.source_package",
                         f"package {package!r} is not installed (pip install {package})")
        base = Path(next(iter(spec.submodule_search_locations)))
    source = (base / rel).resolve()
    if not source.is_file():
        raise w.fail(f"{prefix}.source", f"file {source} does not exist")
    h5path = w.get(tbl, "path", prefix, str)
    try:
        with h5py.File(source, "r") as f:
            version = f["h5md"].attrs.get("version") if isinstance(f.get("h5md"), h5py.Group) \
                else None
    except OSError as exc:
        raise w.fail(f"{prefix}.source", f"{source} is not a readable HDF5 file ({exc})") from None
    if version is None:
        raise w.fail(f"{prefix}.source", f"{source} is not H5MD (no /h5md group with a "
                     "'version' attribute)")
    try:
        src = open_source(source, h5path)
    except InvalidData as exc:
        raise w.fail(f"{prefix}.path", str(exc)) from None
    src.close()
    return source, h5path, src.shape, str(src.dtype)


def _later_outputs(raw: list[Any]) -> dict[str, tuple[int, list[str]]]:
    """``out -> (index, input names)`` of every step that looks well-formed, for messages."""
    found: dict[str, tuple[int, list[str]]] = {}
    for i, step in enumerate(raw):
        if isinstance(step, dict) and isinstance(step.get("out"), str):
            inputs = step.get("inputs")
            names = [n for n in inputs if isinstance(n, str)] if isinstance(inputs, list) else []
            found.setdefault(step["out"], (i, names))
    return found


def _cycle(graph: Mapping[str, tuple[int, list[str]]], start: str, target: str) -> list[str]:
    """A path of step outputs from *start* back to *target* through inputs, or []."""
    stack, seen = [(start, [start])], {start}
    while stack:
        name, path = stack.pop()
        for dep in graph.get(name, (0, []))[1]:
            if dep == target:
                return path
            if dep in graph and dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return []


def _undefined_input(w: _Where, key: str, out: str, name: str,
                     graph: Mapping[str, tuple[int, list[str]]]) -> ConfigError:
    if name == out:
        return w.fail(key, f"cycle in steps: {out} needs its own output")
    if name in graph:
        loop = _cycle(graph, name, out)
        if loop:
            return w.fail(key, "cycle in steps: " + " needs ".join([out, *loop, out]))
        return w.fail(key, f"{name!r} is produced by a later step (steps[{graph[name][0]}]); "
                      "steps run in file order, so move this step after it")
    return w.fail(key, f"{name!r} is not defined by a dataset or an earlier step")


def _steps(w: _Where, raw: list[Any], datasets: Mapping[str, DatasetSpec]) -> tuple[StepSpec, ...]:
    known: dict[str, tuple[Shape, np.dtype[Any]]] = {
        name: (ds.shape, np.dtype(ds.dtype)) for name, ds in datasets.items()}
    if len(raw) > MAX_STEPS:
        raise w.fail("steps", f"{len(raw)} steps; at most {MAX_STEPS} are supported")
    graph = _later_outputs(raw)
    steps = []
    for i, step_raw in enumerate(raw):
        where = f"steps[{i}]"
        tbl = w.table(step_raw, where, _STEP_KEYS)
        out = w.name(w.get(tbl, "out", where, str), f"{where}.out", validate_name)
        if out in known:
            what = "a dataset" if out in datasets else "an earlier step's output"
            raise w.fail(f"{where}.out", f"{out!r} is already {what} (outputs must be unique)")
        op_name = w.get(tbl, "op", where, str)
        try:
            spec = ops.get_op(op_name)
        except ops.UnknownOpError as exc:
            raise w.fail(f"{where}.op", str(exc)) from None
        inputs = w.get(tbl, "inputs", where, list)
        for j, name in enumerate(inputs):
            if not isinstance(name, str):
                raise w.fail(f"{where}.inputs[{j}]", f"must be a string, got {name!r}")
            if name not in known:
                raise _undefined_input(w, f"{where}.inputs[{j}]", out, name, graph)
        params = w.get(tbl, "params", where, dict, {})
        try:
            shape, dtype = ops.infer_output(spec, [known[n][0] for n in inputs],
                                            [known[n][1] for n in inputs], params)
        except ops.OpError as exc:
            raise w.fail(where, f"{op_name}({', '.join(inputs)}): {exc}") from None
        _check_size(w, where, tuple(shape), np.dtype(dtype), f"output {out}")
        known[out] = (tuple(shape), dtype)
        steps.append(StepSpec(out=out, op=op_name, inputs=tuple(inputs), params=dict(params),
                              shape=tuple(shape), dtype=str(dtype)))
    return tuple(steps)


def list_scenarios(directory: str | Path) -> list[Path]:
    """The ``*.toml`` scenario files directly in *directory*, sorted by name."""
    return sorted(p for p in Path(directory).glob("*.toml") if p.is_file())


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, dataset name): data does not depend on declaration order."""
    key = (zlib.crc32(name.encode()),)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _synthesize(ds: DatasetSpec, seed: int) -> Array:
    """Standard normal floats (complex: both components), integers in [0, 1000), fair bools."""
    rng = _rng(seed, ds.name)
    dtype = np.dtype(ds.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(ds.shape).astype(dtype, copy=False)
    if dtype.kind == "c":
        return (rng.standard_normal(ds.shape) + 1j * rng.standard_normal(ds.shape)).astype(dtype)
    if dtype.kind == "b":
        return rng.random(ds.shape) < 0.5
    high = min(1000, int(np.iinfo(dtype).max) + 1)
    return rng.integers(0, high, ds.shape).astype(dtype)


def _read_source(ds: DatasetSpec) -> Array:
    assert ds.source is not None
    try:
        src = open_source(ds.source, ds.path)
        try:
            arr = np.asarray(src.read((slice(None),)))
        finally:
            src.close()
    except InvalidData as exc:
        raise ConfigError(f"{ds.source}: {ds.path}: {exc}") from None
    if arr.shape != ds.shape or str(arr.dtype) != ds.dtype:
        raise ConfigError(f"{ds.source}: {ds.path}: changed since the scenario was loaded "
                          f"({arr.shape} {arr.dtype}, expected {ds.shape} {ds.dtype})")
    return arr


def generate(scenario: Scenario) -> dict[str, list[tuple[str, Array]]]:
    """Every dataset as its parts in row order: ``name -> [(node, array), ...]``.

    Synthetic data depends only on the seed, the dataset name, shape and dtype
    (not on the partitioning); H5MD data is read and split by the parts.
    """
    out: dict[str, list[tuple[str, Array]]] = {}
    for name, ds in scenario.datasets.items():
        whole = _read_source(ds) if ds.source is not None else _synthesize(ds, scenario.seed)
        out[name] = [(node, np.ascontiguousarray(whole[start:stop]))
                     for node, start, stop in ds.row_ranges()]
    return out


def gather(parts: Sequence[tuple[str, Array]]) -> Array:
    """The whole dataset from its parts (row concatenation)."""
    return np.concatenate([arr for _node, arr in parts], axis=0)


def reference_result(scenario: Scenario,
                     data: Mapping[str, Sequence[tuple[str, Array]]]) -> Array:
    """The scenario's result computed with numpy on gathered data, step by step.

    Every approach's result is checked against this.
    """
    scenario.load_ops()
    values: dict[str, Array] = {name: gather(parts) for name, parts in data.items()}
    for step in scenario.steps:
        spec = ops.get_op(step.op)
        values[step.out] = ops.apply(spec, [values[n] for n in step.inputs], step.params)
    return values[scenario.result]
