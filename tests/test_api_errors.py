"""The script API on wrong arguments: a typed hpcflow error (never numpy's, msgpack's or
Python's TypeError), nothing stored or overwritten; and the daemon logging a user's
planning errors as one line, keeping tracebacks for its own bugs.

Against a real daemon over real sockets.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent.threadpool
import numpy as np
import pytest

import hpcflow
from hpcflow.daemon.pools import run_in
from hpcflow.errors import InvalidData, ParamError

from .conftest import Cluster, NodeProc

ARR = np.arange(12.0).reshape(4, 3)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    c = Cluster(tmp_path_factory.mktemp("api-errors"))
    try:
        yield c.add("n1")
    finally:
        c.stop()


@pytest.fixture
def client(node: NodeProc) -> Iterator[hpcflow.Client]:
    with node.client() as c:
        c.put("A", ARR, overwrite=True)
        yield c


def raises(exc: type[Exception], call: Callable[[], Any], *words: str) -> None:
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), str(info.value)


def names(c: hpcflow.Client) -> set[str]:
    return {r.name for r in c.catalog()}


@pytest.mark.parametrize("flag", ["no", "", 0, 1, None, [True]])
def test_overwrite_must_be_a_bool(client: hpcflow.Client, flag: object) -> None:
    """``overwrite="no"`` used to overwrite (a non-empty string is true)."""
    raises(InvalidData, lambda: client.put("A", ARR * 2, overwrite=flag), "overwrite must be")
    h = client.run("colsum", "A")
    raises(InvalidData, lambda: h.save("A", overwrite=flag), "overwrite must be")
    # the node refuses it too, for a client that skips these checks (the inline put RPC)
    raises(InvalidData, lambda: client._call("put", "A", (ARR * 2).tobytes(), [4, 3], "<f8",
                                             None, None, flag), "overwrite must be")
    assert np.array_equal(client.fetch("A"), ARR)
    client.put("A", ARR, overwrite=np.True_)  # numpy's bool is a bool
    raises(InvalidData, lambda: hpcflow.connect(client.endpoint, keep=flag), "keep must be")


def test_what_put_cannot_store_faithfully_is_refused(client: hpcflow.Client) -> None:
    masked = np.ma.masked_array(ARR, mask=ARR > 5)
    raises(InvalidData, lambda: client.put("M", masked), "masked arrays are not supported")
    raises(InvalidData, lambda: client.put("M", ARR, dataset="/x"), "dataset='/x'", "ndarray")
    raises(InvalidData, lambda: client.put("M", [[1, 2], [3]]), "cannot make an array")
    raises(InvalidData, lambda: client.put("M", "nofile.h5", dataset=5), "dataset must be")
    assert "M" not in names(client)


@pytest.mark.parametrize("lineage,words", [
    ({"tags": {"a", "b"}}, ["lineage cannot be sent", "set"]),
    ({"x": np.arange(3)}, ["lineage cannot be sent", "numpy.ndarray"]),
    ({"n": 2**70}, ["lineage cannot be sent"]),
    ({1: "x"}, ["dict with str keys"]),
    (["a"], ["dict with str keys"]),
])
def test_lineage_msgpack_cannot_encode_is_typed(client: hpcflow.Client, lineage: object,
                                                words: list[str]) -> None:
    raises(InvalidData, lambda: client.put("L", ARR, lineage=lineage), *words)  # type: ignore[arg-type]
    assert "L" not in names(client)


@pytest.mark.parametrize("params,words", [
    ({"bins": {1, 2}}, ["'bins' cannot be sent", "set"]),
    ({"bins": np.array([0.0, 5.0, 12.0])}, ["'bins'", "numpy.ndarray", "bins.tolist()"]),
    ({"factor": np.int64(2)}, ["'factor'", "numpy.int64", "factor.tolist()"]),
    ({"factor": object()}, ["'factor' cannot be sent"]),
    # more items than a node decodes in one message: it used to drop the call unanswered
    # and the script waited 20 s for LostRemote
    ({"bins": [float(i) for i in range(100_001)]}, ["'bins' cannot be sent", "100000 items"]),
])
def test_params_msgpack_cannot_encode_are_param_errors(client: hpcflow.Client,
                                                       params: dict[str, Any],
                                                       words: list[str]) -> None:
    op = "histogram" if "bins" in params else "scale"
    raises(ParamError, lambda: client.run(op, "A", **params), *words)
    raises(ParamError, lambda: client.submit(op, "A", **params), *words)
    assert client.flow.executions == 0 and not client.flow.handles  # nothing was sent
    # what the hint says works
    fixed = {k: v.tolist() for k, v in params.items() if isinstance(v, np.ndarray | np.generic)}
    if fixed:
        assert client.run(op, "A", **fixed).fetch() is not None


def test_wrong_argument_types_are_typed(client: hpcflow.Client, tmp_path: Path) -> None:
    cases: list[tuple[Callable[[], Any], str]] = [
        (lambda: client.put("B", ARR, chunk_bytes="4096"), "chunk_bytes must be an int"),  # type: ignore[arg-type]
        (lambda: client.put("B", ARR, progress=5), "progress must be a callable"),  # type: ignore[arg-type]
        (lambda: client.fetch("A", progress="x"), "progress must be a callable"),
        (lambda: client.fetch_to("A", 5), "output path must be a str or Path"),  # type: ignore[arg-type]
        (lambda: client.fetch_to("A", tmp_path / "o.h5", progress=1), "progress must be"),  # type: ignore[arg-type]
        (lambda: client.explain("A"), "expected a handle"),  # type: ignore[arg-type]
        (lambda: client.flow.plan("A"), "expected a handle"),  # type: ignore[arg-type]
        (lambda: hpcflow.gather(5), "gather wants an iterable of handles"),  # type: ignore[arg-type]
        (lambda: hpcflow.gather(["A"]), "expected a handle"),  # type: ignore[list-item]
    ]
    for call, words in cases:
        raises(InvalidData, call, words)
    assert "B" not in names(client) and list(tmp_path.iterdir()) == []


def test_planning_errors_from_user_input_are_one_log_line(node: NodeProc,
                                                          client: hpcflow.Client) -> None:
    before = node.log_path.read_text()
    bad: list[tuple[Callable[[], Any], type[Exception]]] = [
        (lambda: client.run("histogram", "A", bins=-3).fetch(), hpcflow.ParamError),
        # a rule numpy does not know (the CLI's --param bins=nan) was an OpError
        (lambda: client.run("histogram", "A", bins="nan").fetch(), hpcflow.ParamError),
        (lambda: client.run("colsum", "A", foo=1).fetch(), hpcflow.ParamError),
        (lambda: client.run("add", "A", "A", "A").fetch(), hpcflow.ArityError),
        (lambda: client.run("nosuchop", "A").fetch(), hpcflow.UnknownOpError),
        (lambda: client.run("colsum", "NOPE").fetch(), hpcflow.DatasetNotFound),
        (lambda: client.explain(client.run("histogram", "A", bins=0)), hpcflow.ParamError),
    ]
    for call, exc in bad:
        with pytest.raises(exc):
            call()
    # the last reply came after the daemon logged it: its log is complete
    new = node.log_path.read_text()[len(before):]
    assert "Traceback" not in new and "ThreadPoolWorker" not in new, new
    failed = [line for line in new.splitlines() if "failed:" in line]
    assert len(failed) == len(bad), new
    for line, (_, exc) in zip(failed, bad, strict=True):
        assert f"failed: {exc.__name__}: " in line, line


def test_an_op_calling_sys_exit_is_an_op_error_not_the_end_of_the_node(
        make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mod = tmp_path / "quitting_ops.py"
    mod.write_text(textwrap.dedent("""
        import sys
        from hpcflow import op

        @op("quit_on_big", kind="global")
        def quit_on_big(x):
            if x.shape[0] > 100:  # not on the planner's tiny samples: on the real run
                sys.exit(0)
            return x
    """))
    c: Cluster = make_cluster()
    node = c.add("q", extra=["--ops", str(mod)])
    with node.client() as cl:
        cl.put("BIG", np.ones((1000, 3)))
        raises(hpcflow.OpError, lambda: cl.run("quit_on_big", "BIG").fetch(),
               "'quit_on_big' called sys.exit(0)")
        assert cl.ping()["name"] == "q"  # still serving
    assert node.alive()


def test_pool_errors_raise_in_the_caller_and_bugs_keep_their_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    pool = gevent.threadpool.ThreadPool(1)
    try:
        assert run_in(pool, lambda x: x * 2, 21) == 42

        def user_error() -> None:
            raise ParamError("bins must be >= 1")

        def bug() -> None:
            {}["missing"]

        with caplog.at_level(logging.ERROR, logger="hpcflow.pools"):
            with pytest.raises(ParamError):
                run_in(pool, user_error)
            assert caplog.records == []  # the caller logs it, as one line
            with pytest.raises(KeyError):
                run_in(pool, bug)
        (rec,) = caplog.records
        assert rec.exc_info is not None and "bug" in rec.getMessage()
        assert "{}[\"missing\"]" in caplog.text  # the traceback, down to the faulty line
    finally:
        pool.kill()
