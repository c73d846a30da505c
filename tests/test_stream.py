"""A rowwise unit runs on its input's row blocks as they land (transfer and compute overlap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest

from hpcflow.daemon.stream import Arrivals, _subtract, row_blocks
from hpcflow.errors import DatasetNotFound
from tests.conftest import Cluster, add_three, names_on, wait_for

# -- the pure bookkeeping --------------------------------------------------------------


def test_subtract_leaves_what_is_not_covered() -> None:
    assert _subtract([(0, 10)], 3, 5) == [(0, 3), (5, 10)]
    assert _subtract([(0, 3), (5, 10)], 0, 10) == []
    assert _subtract([(0, 3)], 3, 5) == [(0, 3)]


def test_row_blocks_hand_out_every_row_once_as_it_lands() -> None:
    """Rows come from a committed local piece at once and from a pull's feed chunk by
    chunk, in landing order; rows both have are handed out once."""
    data = np.arange(100 * 3, dtype=np.float64).reshape(100, 3)
    arrivals = Arrivals()
    local = [(0, 30, data[0:30])]
    flat = np.zeros(70 * 3 * 8, dtype=np.uint8)
    feed = arrivals.feed("X", 30)
    feed.open(flat, "<f8", (70, 3))
    row = 3 * 8
    pulling = [True]
    got: list[tuple[int, int]] = []
    out = np.full_like(data, -1)

    def consume() -> None:
        for a, b, x in row_blocks("X", 10, 100, local=lambda: local, arrivals=arrivals,
                                  pending=lambda: pulling[0], block_rows=8):
            got.append((a, b))
            out[a:b] = x

    g = gevent.spawn(consume)
    gevent.sleep(0)
    assert got and all(b <= 30 for _, b in got)  # the local rows, before anything landed
    # chunks land out of order: rows 60-100 first, then 30-60
    flat[30 * row:].view(np.float64)[:] = data[60:].ravel()
    feed.landed(30 * row, 40 * row)
    gevent.sleep(0)
    assert max(b for _, b in got) == 100 and not g.ready()
    flat[: 30 * row].view(np.float64)[:] = data[30:60].ravel()
    feed.landed(0, 30 * row)
    g.join(timeout=5)
    assert g.successful()
    np.testing.assert_array_equal(out[10:], data[10:])
    assert sorted(got) == sorted(set(got)) and sum(b - a for a, b in got) == 90
    assert all(b - a <= 8 for a, b in got)
    feed.close()
    assert arrivals.landed("X") == []


def test_row_blocks_report_rows_that_never_arrive() -> None:
    arrivals = Arrivals()
    pulling = [True]
    g = gevent.spawn(lambda: list(row_blocks("X", 0, 10, local=lambda: [], arrivals=arrivals,
                                             pending=lambda: pulling[0], block_rows=4)))
    gevent.sleep(0)
    assert not g.ready()  # waiting for the pull
    pulling[0] = False
    arrivals.poke()  # the pull ended (the share pokes when a pull's greenlet ends)
    g.join(timeout=5)
    assert isinstance(g.exception, DatasetNotFound)
    assert "rows [0, 10) of X never arrived" in str(g.exception)


# -- on real daemons -------------------------------------------------------------------

IN_PLACE_OPS = '''
import numpy as np
from hpcflow import op

@op("double_in_place", kind="rowwise")
def double_in_place(x):
    x *= 2  # changes its input: it must get rows of its own
    return x
'''


@pytest.fixture
def split(make_cluster: Any, tmp_path: Path) -> tuple[Cluster, np.ndarray]:
    """X (2 x 5.1 MB, two 4 MiB chunks per part) split over n2 and n3; every node
    loads an op that doubles its input in place."""
    mod = tmp_path / "in_place.py"
    mod.write_text(IN_PLACE_OPS)
    cl = add_three(make_cluster(), extra=["--ops", str(mod)])
    x = np.random.default_rng(7).random((80000, 16))
    for k, n in enumerate(("n2", "n3")):
        with cl[n].client() as c:
            c.put("X", x[k * 40000 : (k + 1) * 40000], part=k, nparts=2)
    wait_for(lambda: "X@1" in names_on(cl["n1"]) and "X@0" in names_on(cl["n1"]), 10,
             "X's parts on n1")
    return cl, x


def _streamed(node: Any) -> dict[str, int]:
    with node.client() as c:
        return dict(c.stats()["streamed"])


def test_an_fft_runs_on_the_blocks_of_pulled_parts_and_equals_numpy(
        split: tuple[Cluster, np.ndarray]) -> None:
    cl, x = split
    before = _streamed(cl["n1"])
    with cl["n1"].client() as flow:
        r = flow.run("fft", "X")  # fft doubles the bytes: the raw parts come to n1
        np.testing.assert_allclose(r.fetch(), np.fft.fft(x, axis=1))
        assert r.plan is not None and r.plan.steps[0]["nodes"] == ["n1"]
        assert flow.report()["bytes_moved"] == x.nbytes
        again = flow.run("scale", "X", factor=0.5)  # the copies are here now
        np.testing.assert_array_equal(again.fetch(), x * 0.5)
    after = _streamed(cl["n1"])
    assert after.get("units", 0) - before.get("units", 0) == 2
    # each unit: 4 blocks (two 4 MiB chunks per part) at least
    assert after.get("blocks", 0) - before.get("blocks", 0) >= 8


def test_ops_over_several_inputs_run_block_by_block_too(
        split: tuple[Cluster, np.ndarray]) -> None:
    """add over two row inputs made here, and over a row input and a broadcast operand."""
    cl, x = split
    before = _streamed(cl["n1"]).get("units", 0)
    with cl["n1"].client() as flow:
        f = flow.run("fft", "X")
        both = flow.run("add", f, flow.run("fft", "X"))
        np.testing.assert_allclose(both.fetch(), 2 * np.fft.fft(x, axis=1))
        shifted = flow.run("add", flow.run("colsum", "X"), "X")  # broadcast operand first
        np.testing.assert_allclose(shifted.fetch(), x + x.sum(0))
        assert all(s["nodes"] == ["n1"] for s in both.plan.steps)  # type: ignore[union-attr]
    # two ffts, their add, and the add with the broadcast column sums
    assert _streamed(cl["n1"]).get("units", 0) - before == 4


def test_a_user_op_that_changes_its_input_changes_no_stored_copy(
        split: tuple[Cluster, np.ndarray]) -> None:
    cl, x = split
    before = _streamed(cl["n1"]).get("units", 0)
    with cl["n1"].client() as flow:
        np.testing.assert_allclose(flow.run("fft", "X").fetch(), np.fft.fft(x, axis=1))
        # X's parts are on n1 now (the fft pulled them): the next steps run there
        first = flow.run("double_in_place", "X")
        np.testing.assert_array_equal(first.fetch(), 2 * x)
        assert first.plan is not None and first.plan.bytes_moved == 0
        second = flow.run("double_in_place", "X")  # 4 * x if n1's copies had changed
        np.testing.assert_array_equal(second.fetch(), 2 * x)
    assert _streamed(cl["n1"]).get("units", 0) - before == 3  # block by block, all three
    with cl["n2"].client() as c:
        np.testing.assert_array_equal(c.fetch("X", part=0), x[:40000])


def test_into_is_for_rowwise_ops_and_writes_what_the_op_returns() -> None:
    from hpcflow.ops import OpSpec, get_op, run_rowwise_into
    from hpcflow.ops.errors import RegistrationError

    with pytest.raises(RegistrationError, match="only rowwise ops take an into"):
        OpSpec("r", "reduce", lambda x: x.sum(0), into=lambda x, out: None)
    x = np.random.default_rng(1).random((50, 8)).astype(np.float32)
    for name, params in (("scale", {"factor": 3.0}), ("fft", {})):
        spec = get_op(name)
        want = spec.fn(x, **params)
        out = np.empty_like(want)
        run_rowwise_into(spec, [x], params, out)
        np.testing.assert_array_equal(out, want)
