"""Ops: split execution equals numpy on gathered data; registry, hashes, inference, errors."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcflow.ops import (
    ArityError,
    InputError,
    OpError,
    OpRegistry,
    OpSpec,
    ParamError,
    RegistrationError,
    UnknownOpError,
    apply,
    combine_partials,
    get_op,
    infer_output,
    list_ops,
    load_op_module,
    op,
    output_model,
    row_roles,
    run_global,
    run_partial,
    run_rowwise_part,
)
from hpcflow.ops.builtin import histogram_counts_edges

Array = np.ndarray[Any, Any]


def _flat(x: Array) -> Array:
    return x.reshape(len(x), int(np.prod(x.shape[1:])))


def _lexsorted(x: Array) -> Array:
    flat = _flat(x)
    return x[np.lexsort(flat.T[::-1])]


def _gram(x: Array) -> Array:
    flat = _flat(x)
    result: Array = flat.T @ flat
    return result


# name -> (params, numpy reference on the gathered inputs, needs at least one row)
REFERENCE: dict[str, tuple[dict[str, Any], Callable[..., Array], bool]] = {
    "scale": ({"factor": 2.5}, lambda x: x * 2.5, False),
    "add": ({}, lambda a, b: a + b, False),
    "fft": ({}, lambda x: np.fft.fft(x, axis=1), False),
    "colsum": ({}, lambda x: x.sum(axis=0), False),
    "colmean": ({}, lambda x: x.mean(axis=0), True),
    "histogram": (
        {"bins": 7, "range": (-2.0, 2.0)},
        lambda x: _table(*np.histogram(x, bins=7, range=(-2.0, 2.0))),
        False,
    ),
    "gram": ({}, _gram, False),
    "median": ({}, lambda x: np.median(x, axis=0), True),
    "quantiles": ({"q": [0.1, 0.5, 0.9]}, lambda x: np.quantile(x, [0.1, 0.5, 0.9], axis=0), True),
    "sort_rows": ({}, _lexsorted, False),
    "min": ({}, lambda x: x.min(axis=0), True),
    "max": ({}, lambda x: x.max(axis=0), True),
    "var": ({}, lambda x: x.var(axis=0), True),
    "std": ({}, lambda x: x.std(axis=0), True),
    "select": ({"index": [0, -1, 0]}, lambda x: x[:, [0, -1, 0]], False),
    "frames": ({"start": 1, "stop": -1, "step": 3}, lambda x: x[1:-1:3], False),
}

part_sizes = st.lists(st.sampled_from([0, 0, 1, 1, 2, 3, 7]), min_size=1, max_size=5)


def _split(x: Array, sizes: list[int]) -> list[Array]:
    return np.split(x, np.cumsum(sizes)[:-1])


def _data(seed: int, rows: int, cols: int, name: str) -> Array:
    rng = np.random.default_rng(seed)
    if name == "sort_rows":  # few distinct values: ties exercise the secondary keys
        return rng.integers(0, 3, (rows, cols)).astype(np.float64)
    return rng.normal(size=(rows, cols))


def _assert_same(got: Array, want: Array) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    else:
        np.testing.assert_array_equal(got, want)


def test_builtins_are_registered() -> None:
    assert set(REFERENCE) <= set(list_ops())
    kinds = {name: get_op(name).kind for name in REFERENCE}
    assert kinds["scale"] == kinds["add"] == kinds["fft"] == "rowwise"
    assert kinds["colsum"] == kinds["colmean"] == kinds["histogram"] == kinds["gram"] == "reduce"
    assert kinds["sort_rows"] == "reduce"  # sorted runs where the parts are, merged
    assert kinds["min"] == kinds["max"] == kinds["var"] == kinds["std"] == "reduce"
    assert kinds["select"] == kinds["frames"] == "rowwise"
    assert kinds["median"] == kinds["quantiles"] == "global"


@settings(max_examples=25, deadline=None)
@given(sizes=part_sizes, cols=st.integers(1, 4), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_split_execution_equals_numpy(name: str, sizes: list[int], cols: int, seed: int) -> None:
    params, reference, needs_rows = REFERENCE[name]
    spec = get_op(name)
    inputs = [_data(seed + i, sum(sizes), cols, name) for i in range(spec.arity)]
    if needs_rows and sum(sizes) == 0:
        with pytest.raises(OpError):
            apply(spec, inputs, params)
        return
    want = np.asarray(reference(*inputs))
    _assert_same(apply(spec, inputs, params), want)
    pieces = [_split(x, sizes) for x in inputs]
    if spec.kind == "rowwise":
        ends = np.cumsum([0, *sizes]).tolist()  # each block where it lies (frames needs it)
        outs = [run_rowwise_part(spec, list(block), params, (lo, hi, ends[-1]))
                for block, lo, hi in zip(zip(*pieces, strict=True), ends, ends[1:], strict=False)]
        _assert_same(np.concatenate(outs), want)
    elif spec.kind == "reduce":
        partials = [run_partial(spec, block, params) for block in pieces[0]]
        _assert_same(combine_partials(spec, partials, params), want)
    else:
        _assert_same(run_global(spec, [np.concatenate(p) for p in pieces], params), want)


@settings(max_examples=15, deadline=None)
@given(sizes=part_sizes, seed=st.integers(0, 2**16))
def test_reduce_ops_on_integer_and_3d_input(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-5, 5, (sum(sizes), 2, 3))
    for name in ("colsum", "gram", "colmean"):
        spec = get_op(name)
        if name == "colmean" and len(x) == 0:
            continue
        partials = [run_partial(spec, block, {}) for block in _split(x, sizes)]
        _assert_same(combine_partials(spec, partials, {}), apply(spec, [x], {}))
        if name == "colmean":
            assert apply(spec, [x], {}).dtype == np.float64  # like np.mean of integers


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i4", "<f8"])
def test_reduce_ops_on_big_endian_input(dtype: str) -> None:
    """HDF5 files written on other machines are often big-endian; numpy only sums in
    native byte order, so the ops must not pass the input's dtype through."""
    x = (np.random.default_rng(3).random((50, 3)) * 10).astype(dtype)
    for name, want in (("colmean", x.mean(axis=0)), ("colsum", x.sum(axis=0))):
        spec = get_op(name)
        got = apply(spec, [x], {})
        np.testing.assert_allclose(got, want, rtol=1e-6)
        partials = [run_partial(spec, block, {}) for block in (x[:20], x[20:])]
        np.testing.assert_allclose(combine_partials(spec, partials, {}), want, rtol=1e-6)


def test_empty_part_partials_are_zeros_of_the_right_shape() -> None:
    empty = np.empty((0, 3))
    np.testing.assert_array_equal(run_partial(get_op("colsum"), empty, {}), np.zeros(3))
    np.testing.assert_array_equal(run_partial(get_op("gram"), empty, {}), np.zeros((3, 3)))
    counts = run_partial(get_op("histogram"), empty, {"bins": 4, "range": (0, 1)})[0]
    np.testing.assert_array_equal(counts, np.zeros(4, dtype=np.int64))


def _table(counts: Array, edges: Array) -> Array:
    """histogram's result: bins x [left edge, right edge, count], float64."""
    return np.column_stack([edges[:-1], edges[1:], counts]).astype(np.float64)


def test_histogram_gives_numpys_edges_and_needs_a_range_for_equal_bins() -> None:
    """Counts and edges equal np.histogram's (edges in the dtype numpy computes them in,
    float32 input included) whether split or not; an integer bins without range is
    refused, saying why, rather than gathering every value on one node; numpy's rules
    still run on one node."""
    spec = get_op("histogram")
    for dtype in (np.float32, np.float64, np.int16):
        x = (np.random.default_rng(1).normal(size=(40, 2)) * 9).astype(dtype)
        for params in ({"bins": 5, "range": (-7.3, 6.1)}, {"bins": [-20, -1.5, 0, 2, 30]},
                       {"bins": 1, "range": (0, 1)}):
            counts, edges = np.histogram(x, params["bins"], params.get("range"))
            parts = [run_partial(spec, b, params) for b in _split(x, [13, 0, 27])]
            got = combine_partials(spec, parts, params)
            _assert_same(got, _table(counts, edges))
            back = histogram_counts_edges(got)
            np.testing.assert_array_equal(back[0], counts)
            np.testing.assert_array_equal(back[1], edges.astype(np.float64))
    assert spec.can_split({"bins": [0.0, 0.5, 1.0]}) and spec.can_split({"bins": 5})
    assert not spec.can_split({"bins": "fd"})
    x = np.random.default_rng(1).normal(size=(20, 2))
    with pytest.raises(ParamError, match=r"give range=\(lo, hi\) .* gather all of it"):
        apply(spec, [x], {"bins": 5})
    with pytest.raises(ParamError, match="give range"):
        apply(spec, [x], {})
    _assert_same(apply(spec, [x], {"bins": "auto"}), _table(*np.histogram(x, "auto")))
    with pytest.raises(OpError, match="different bins"):
        combine_partials(spec, [run_partial(spec, x, {"bins": 2, "range": (0, 1)}),
                                run_partial(spec, x, {"bins": 2, "range": (0, 2)})], {})
    for bad in ([0, "a"], [0, float("inf")], [1, 0], [0, 1, 2], "01", [True, 2]):
        with pytest.raises(ParamError, match="range must be"):
            apply(spec, [x], {"bins": 3, "range": bad})
    with pytest.raises(OpError, match="not a histogram table"):
        histogram_counts_edges(np.zeros((3, 2)))


def test_fft_doubles_bytes_of_float64() -> None:
    x = np.ones((4, 8))
    assert apply(get_op("fft"), [x], {}).nbytes == 2 * x.nbytes


def test_user_ops_from_the_brief() -> None:
    registry = OpRegistry()

    @registry.op("expand", kind="rowwise")
    def expand(x: Array) -> Array:
        return np.hstack([x, x * x])

    @registry.op("colmax", kind="reduce", combine=lambda parts: np.max(parts, axis=0))
    def colmax(x: Array) -> Array:
        return np.asarray(x.max(axis=0))

    x = np.arange(12.0).reshape(6, 2)
    assert registry.names() == ["colmax", "expand"]
    assert registry.get("expand").arity == 1
    blocks = [run_rowwise_part(registry.get("expand"), [b], {}) for b in _split(x, [2, 4])]
    np.testing.assert_array_equal(np.concatenate(blocks), np.hstack([x, x * x]))
    partials = [run_partial(registry.get("colmax"), b, {}) for b in _split(x, [1, 5])]
    np.testing.assert_array_equal(combine_partials(registry.get("colmax"), partials, {}), x.max(0))
    assert infer_output(registry.get("expand"), [(100, 2)], ["float64"], {}) == (
        (100, 4),
        np.dtype("float64"),
    )


def test_default_decorator_registers_globally() -> None:
    @op("test_ops_negate", kind="rowwise")
    def negate(x: Array) -> Array:
        return -x

    assert get_op("test_ops_negate").fn is negate
    assert "test_ops_negate" in list_ops()


def test_definition_hash_is_stable_and_tracks_code_kind_and_arity() -> None:
    def f(x: Array) -> Array:
        return x + 1

    def g(x: Array) -> Array:
        return x + 2

    a = OpSpec("f", "rowwise", f)
    assert a.definition_hash == OpSpec("f", "rowwise", f).definition_hash
    assert a.definition_hash != OpSpec("f", "rowwise", g).definition_hash
    assert a.definition_hash != OpSpec("f", "global", f).definition_hash
    assert a.definition_hash != OpSpec("f", "rowwise", f, arity=2).definition_hash
    # no source available: falls back to the code object, still stable
    namespace: dict[str, Any] = {}
    exec("def h(x):\n    return x * 3\n", namespace)
    h1 = OpSpec("h", "rowwise", namespace["h"]).definition_hash
    exec("def h(x):\n    return x * 3\n", namespace)
    assert OpSpec("h", "rowwise", namespace["h"]).definition_hash == h1
    exec("def h(x):\n    return x * 4\n", namespace)
    assert OpSpec("h", "rowwise", namespace["h"]).definition_hash != h1


def _write_module(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_load_op_module_by_path_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = """
        import numpy as np
        from hpcflow.ops import op

        @op("test_ops_cube", kind="rowwise")
        def cube(x):
            return x ** 3
    """
    path = _write_module(tmp_path / "cube_ops.py", src)
    assert load_op_module(path) == ("test_ops_cube",)
    digest = get_op("test_ops_cube").definition_hash
    assert load_op_module(str(path)) == ()  # already loaded: nothing new
    # the same source under a dotted module name re-registers identically
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_op_module("cube_ops") == ()
    assert get_op("test_ops_cube").definition_hash == digest
    other = _write_module(tmp_path / "cube_ops2.py", src.replace("** 3", "** 3 + 0"))
    with pytest.raises(OpError, match="different definition"):
        load_op_module(other)
    with pytest.raises(OpError, match="cannot load"):
        load_op_module("no_such_module_for_hpcflow_tests")
    sys.modules.pop("cube_ops", None)


def test_registry_clash_and_unknown_op() -> None:
    registry = OpRegistry()
    registry.op("twice", kind="rowwise")(lambda x: x * 2)
    with pytest.raises(RegistrationError):
        registry.op("twice", kind="rowwise")(lambda x: x * 3)
    registry.op("twice", kind="rowwise", replace=True)(lambda x: x * 3)
    with pytest.raises(UnknownOpError, match="twice"):
        registry.get("thrice")
    with pytest.raises(RegistrationError):
        OpSpec("bad", "rowwise", lambda x: x, combine=lambda parts: np.zeros(1))
    with pytest.raises(RegistrationError):
        OpSpec("bad", "reduce", lambda x, y: x, arity=2)
    with pytest.raises(RegistrationError):
        OpSpec("bad", "sideways", lambda x: x)  # type: ignore[arg-type]


def test_validation_errors_are_typed() -> None:
    x = np.ones((4, 3))
    with pytest.raises(ArityError):
        apply(get_op("add"), [x], {})
    with pytest.raises(InputError, match=r"differ: rows of shape \(3,\) vs rows of shape \(2,\)"):
        apply(get_op("add"), [x, np.ones((4, 2))], {})
    with pytest.raises(InputError, match="row counts"):
        run_rowwise_part(get_op("add"), [x, np.ones((3, 3))], {})
    with pytest.raises(InputError, match="non-numeric"):
        apply(get_op("scale"), [np.array([["a"]])], {"factor": 2})
    with pytest.raises(ParamError, match="factor"):
        apply(get_op("scale"), [x], {})
    with pytest.raises(ParamError):
        apply(get_op("scale"), [x], {"factor": 2, "offset": 1})
    with pytest.raises(ParamError):
        apply(get_op("scale"), [x], {"factor": "big"})
    with pytest.raises(ParamError):
        apply(get_op("quantiles"), [x], {"q": 1.5})
    with pytest.raises(ParamError):
        apply(get_op("histogram"), [x], {"bins": 0, "range": (0, 1)})
    with pytest.raises(InputError):
        apply(get_op("fft"), [np.ones(4)], {})
    with pytest.raises(OpError):
        run_partial(get_op("median"), x, {})
    with pytest.raises(OpError):
        combine_partials(get_op("colsum"), [], {})


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(0, 50), cols=st.integers(1, 5))
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_inference_matches_real_output(name: str, rows: int, cols: int) -> None:
    params, _, needs_rows = REFERENCE[name]
    spec = get_op(name)
    if needs_rows and rows == 0:
        rows = 1
    inputs = [_data(i, rows, cols, name) for i in range(spec.arity)]
    shape, dtype = infer_output(spec, [x.shape for x in inputs], ["float64"] * spec.arity, params)
    real = apply(spec, inputs, params)
    assert (shape, dtype) == (real.shape, real.dtype)
    if spec.kind == "reduce":
        model = output_model(spec, [(cols,)], ["float64"], params)
        partial = run_partial(spec, inputs[0], params)
        items = partial if isinstance(partial, tuple) else (partial,)
        assert model.partial_nbytes(rows) == sum(item.nbytes for item in items)


def test_inference_errors_and_declared_shapes() -> None:
    with pytest.raises(ArityError):
        infer_output(get_op("add"), [(3, 2)], ["float64"], {})
    with pytest.raises(InputError):
        infer_output(get_op("add"), [(3, 2), (4, 2)], ["float64"] * 2, {})
    with pytest.raises(InputError):
        infer_output(get_op("add"), [(3, 2), (3, 5)], ["float64"] * 2, {})
    registry = OpRegistry()
    registry.op("halve", kind="global")(lambda x: x[: len(x) // 2])
    with pytest.raises(OpError, match="affine"):
        infer_output(registry.get("halve"), [(10, 2)], ["float64"], {})
    registry.op(
        "halve2",
        kind="global",
        out_shape=lambda shapes, params: (shapes[0][0] // 2, *shapes[0][1:]),
        out_dtype="float64",
    )(lambda x: x[: len(x) // 2])
    with pytest.raises(OpError, match="affine"):  # still fitted: declared shape must be affine
        infer_output(registry.get("halve2"), [(10, 2)], ["float64"], {})
    registry.op("first2", kind="global", out_dtype="float32")(lambda x: x[:2])
    with pytest.raises(OpError, match="declared dtype"):
        infer_output(registry.get("first2"), [(10, 2)], ["float64"], {})


def test_global_op_over_inputs_of_different_row_counts() -> None:
    """Issue 10: a global op over several inputs is sampled with each input's row count
    varied on its own, so a sort of their union is modelled as rows0 + rows1 + rows2
    (not 3 x the first input's rows) and a weighted mix as a * rows0 + b * rows1 + ..."""
    registry = OpRegistry()

    @registry.op("union", kind="global", arity=3)
    def union(a: Array, b: Array, c: Array) -> Array:
        u = np.concatenate([a, b, c])
        return u[np.lexsort(u.T[::-1])]

    shapes = [(100, 3), (300, 3), (550, 3)]
    spec = registry.get("union")
    inputs = [np.random.default_rng(i).random(s) for i, s in enumerate(shapes)]
    assert infer_output(spec, shapes, ["float64"] * 3, {}) == ((950, 3), np.dtype("float64"))
    assert apply(spec, inputs, {}).shape == (950, 3)
    model = output_model(spec, [(3,)] * 3, ["float64"] * 3, {})
    assert model.terms == ((1, 1, 1), (0, 0, 0))
    assert model.shape(10) == (30, 3)  # one count: every input has it
    assert model.nbytes([100, 300, 550]) == 950 * 3 * 8
    assert model.out_rows((0, 0, 7)) == 7

    registry.op("mix", kind="global", arity=3)(
        lambda a, b, c: np.concatenate([a, a, c[1:], np.zeros((4, a.shape[1]))]))
    assert infer_output(registry.get("mix"), shapes, ["float64"] * 3, {})[0] == (753, 3)

    # an op needing equal row counts keeps the equal-rows model, read at its first input
    registry.op("diff", kind="global", arity=2)(lambda a, b: np.sort(a - b, axis=0))
    diff = output_model(registry.get("diff"), [(3,)] * 2, ["float64"] * 2, {})
    assert diff.terms is None and diff.shape((40, 40)) == (40, 3) == diff.shape((40, 9))
    # so does one whose size is not affine in each count separately (equal counts: it is)
    registry.op("longest", kind="global", arity=2)(lambda a, b: a if len(a) >= len(b) else b)
    longest = output_model(registry.get("longest"), [(3,)] * 2, ["float64"] * 2, {})
    assert longest.terms is None and longest.shape(6) == (6, 3)
    # a declared shape is fitted the same way, without running the op
    registry.op("cat2", kind="global", arity=2,
                out_shape=lambda s, p: (s[0][0] + 2 * s[1][0], s[0][1]), out_dtype="float64")(
        lambda a, b: 1 / 0)
    assert infer_output(registry.get("cat2"), [(5, 2), (7, 2)], ["float64"] * 2, {}) == (
        (19, 2), np.dtype("float64"))


def test_add_broadcasts_a_column_vector_against_every_row() -> None:
    """The issue's script adds colsum(DS2), shape (cols,), to fft(DS1): numpy semantics,
    split or not; the vector is a broadcast operand, sent whole to every row block."""
    spec = get_op("add")
    x = np.random.default_rng(3).random((7, 3))
    for v in (np.arange(3.0), np.arange(3.0).reshape(1, 3)):
        want = x + v
        _assert_same(apply(spec, [x, v], {}), want)
        _assert_same(apply(spec, [v, x], {}), v + x)
        assert row_roles(spec, [x.shape, v.shape]) == (True, False)
        blocks = [run_rowwise_part(spec, [b, v], {}) for b in _split(x, [0, 2, 5])]
        _assert_same(np.concatenate(blocks), want)
        assert infer_output(spec, [(1000, 3), v.shape], ["complex128", "float64"], {}) == (
            (1000, 3),
            np.dtype("complex128"),
        )
    assert row_roles(spec, [(5, 3), (5, 3)]) == (True, True)
    assert row_roles(spec, [(1, 3), (1, 3)]) == (True, True)
    assert row_roles(spec, [(0, 3), (1, 3)]) == (True, False)  # an empty block still adds
    with pytest.raises(InputError, match=r"row counts.*\(100, 3\), \(7, 3\)"):
        infer_output(spec, [(100, 3), (7, 3)], ["float64"] * 2, {})
    with pytest.raises(InputError, match="shapes differ"):
        infer_output(spec, [(100, 3), (4,)], ["float64"] * 2, {})
    with pytest.raises(InputError, match="row counts"):
        row_roles(get_op("add"), [(5, 3), (4, 3)])


def test_definition_hash_covers_constants_and_metadata(tmp_path: Path) -> None:
    """Two modules that differ only in a constant the op reads hash differently (the
    audit's h1/h2), and so do kind, splittable, out_shape, out_dtype and combine."""
    import importlib.util

    hashes = []
    for k in ("2.0", "3.0", "2.0"):
        path = tmp_path / f"m{len(hashes)}.py"
        path.write_text(
            "from hpcflow.ops import OpRegistry\nR = OpRegistry()\n"
            f"K = {k}\nW = __import__('numpy').arange(3) * {k}\n"
            "@R.op('k', kind='rowwise')\ndef k(x):\n    return x * K + W.sum()\n"
        )
        spec = importlib.util.spec_from_file_location(f"hash_mod_{len(hashes)}", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        hashes.append(module.R.get("k").definition_hash)
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]

    def closure(factor: float) -> Callable[[Array], Array]:
        def f(x: Array) -> Array:
            return x * factor

        return f

    assert (OpSpec("c", "rowwise", closure(2.0)).definition_hash
            != OpSpec("c", "rowwise", closure(3.0)).definition_hash)

    def red(x: Array) -> Array:
        return np.asarray(x.sum(axis=0))

    base = OpSpec("r", "reduce", red)
    variants = [
        OpSpec("r", "reduce", red, splittable=lambda params: False),
        OpSpec("r", "reduce", red, out_dtype=np.dtype("float32")),
        OpSpec("r", "reduce", red, out_shape=lambda shapes, params: shapes[0][1:]),
        OpSpec("r", "reduce", red, combine=lambda parts: np.max(parts, axis=0)),
    ]
    digests = {base.definition_hash, *(v.definition_hash for v in variants)}
    assert len(digests) == 1 + len(variants)


def test_statistics_accumulate_in_float64_and_var_is_stable_when_split() -> None:
    """float32 input: colmean, var and std are float64 (a float32 sum drifts); var over
    parts far from zero (mean 1e8, spread 1) matches numpy's two-pass float64 var where
    raw sums of squares would cancel; ddof is honoured and needs enough rows."""
    rng = np.random.default_rng(7)
    x32 = rng.normal(size=(5000, 3)).astype(np.float32)
    for name, want in (("colmean", x32.astype(np.float64).mean(axis=0)),
                       ("var", x32.astype(np.float64).var(axis=0)),
                       ("std", x32.astype(np.float64).std(axis=0))):
        spec = get_op(name)
        got = combine_partials(spec, [run_partial(spec, b, {}) for b in _split(x32, [3000, 2000])],
                               {})
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12)
    far = 1e8 + rng.normal(size=(3000, 2))
    spec = get_op("var")
    parts = [run_partial(spec, b, {"ddof": 1}) for b in _split(far, [1000, 0, 1500, 500])]
    # float64 holds 1e8 to ~1e-8: both algorithms round there (a naive sum of squares
    # minus the squared sum, ~1e16 each, would lose every digit of a variance of 1)
    np.testing.assert_allclose(combine_partials(spec, parts, {"ddof": 1}),
                               far.var(axis=0, ddof=1), rtol=1e-7)
    with pytest.raises(OpError, match="needs more than ddof=1 rows"):
        combine_partials(spec, [run_partial(spec, far[:1], {"ddof": 1})], {"ddof": 1})
    with pytest.raises(OpError, match="ddof"):
        run_partial(spec, far, {"ddof": -1})


def test_select_picks_positions_of_the_second_axis() -> None:
    frames = np.arange(4 * 5 * 3, dtype=np.float64).reshape(4, 5, 3)  # frames x atoms x xyz
    spec = get_op("select")
    np.testing.assert_array_equal(apply(spec, [frames], {"index": [4, 1]}), frames[:, [4, 1]])
    for bad in ([], [5], [1.5], "0"):
        with pytest.raises(OpError, match="index"):
            apply(spec, [frames], {"index": bad})


def test_frames_keeps_the_stride_across_parts_and_its_model_counts_every_part() -> None:
    """Every part keeps the rows of the global selection that lie in it, whatever the
    cuts; the output model (what the planner uses) gives each part's rows exactly,
    though ceil(rows / step) is not affine; bad params are ParamErrors."""
    x = np.arange(2 * 97, dtype=np.float32).reshape(97, 2)
    spec = get_op("frames")
    cases = [{}, {"step": 4}, {"start": 5, "stop": 80, "step": 7}, {"start": -20, "step": 3},
             {"stop": 3}, {"start": 200}, {"start": None, "stop": None, "step": 96}]
    for params in cases:
        want = x[params.get("start", 0):params.get("stop"):params.get("step", 1)]
        _assert_same(apply(spec, [x], params), want)
        model = output_model(spec, [(2,)], [x.dtype], params)
        assert model.shape(97) == want.shape
        for cuts in ([0, 97], [0, 1, 2, 50, 51, 97], [0, 30, 30, 64, 97], list(range(0, 98, 9))):
            cuts = sorted({*cuts, 97})
            outs = [run_rowwise_part(spec, [x[lo:hi]], params, (lo, hi, 97))
                    for lo, hi in itertools.pairwise(cuts)]
            _assert_same(np.concatenate(outs), want)
            assert [model.part_shape(lo, hi, 97) for lo, hi in itertools.pairwise(cuts)
                    ] == [o.shape for o in outs]
    for bad in ({"step": 0}, {"step": -1}, {"step": 1.5}, {"start": "a"}, {"stop": True}):
        with pytest.raises(ParamError):
            apply(spec, [x], bad)
        with pytest.raises(ParamError):
            output_model(spec, [(2,)], [x.dtype], bad)
    with pytest.raises(OpError, match="cannot be rows"):
        run_rowwise_part(spec, [x[:10]], {}, (0, 11, 97))


def test_sort_rows_without_ties_in_the_first_column_equals_lexsort() -> None:
    """Continuous data (the fast path: one sort of the first column) and the values
    numpy's sort treats as ties (-0.0 and 0.0, NaNs), split and merged as across nodes."""
    spec = get_op("sort_rows")
    x = np.random.default_rng(9).random((5000, 4))
    x[:3, 0] = [0.0, np.nan, -np.inf]
    special = np.array([[-0.0, 2.0, 0, 0], [np.nan, -1.0, 0, 0], [7.0, 1.0, 0, 0]])
    rng = np.random.default_rng(10)
    ints = np.column_stack([rng.permutation(20_000), rng.integers(0, 3, 20_000)])
    tied = ints.copy()
    tied[:, 0] //= 2  # every first column twice: the second column decides
    for data in (x, np.concatenate([x, special]), ints, ints.astype(np.float32), tied):
        want = data[np.lexsort(data.T[::-1])]
        np.testing.assert_array_equal(apply(spec, [data], {}), want)
        parts = [run_partial(spec, p, {}) for p in np.array_split(data, 3)]
        np.testing.assert_array_equal(combine_partials(spec, parts, {}), want)
