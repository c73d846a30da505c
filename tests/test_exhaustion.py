"""Hostile clients exhausting a node's resources: every one is bounded, the node keeps serving.

Real daemons on loopback, attacked over real sockets: a burst of bulk PUT headers
(file descriptors, temp files, disk claims), inline fetches whose replies are never
read (memory), and histograms whose ``bins`` would size gigabytes (planning and
running).  Each test asserts the refusal (a typed error, at once), the bound (counted
on the daemon: /proc/PID/fd, RSS, its own stats) and that ordinary work still goes on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import hpcflow
from hpcflow.errors import InputError, Overloaded, ParamError, StoreError
from tests.conftest import SCALE, Cluster, NodeProc, wait_for

MiB = 1024 * 1024


def fds(node: NodeProc) -> int:
    assert node.proc is not None
    return len(os.listdir(f"/proc/{node.proc.pid}/fd"))


def rss(node: NodeProc) -> int:
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def stats(node: NodeProc) -> dict:
    with node.client() as c:
        return c.stats()


def temp_files(node: NodeProc) -> list[str]:
    return [p.name for p in (node.data_dir / "datasets").glob(".tmp-*")]


def still_serves(node: NodeProc, name: str) -> None:
    """An ordinary client puts and fetches through the bulk path."""
    data = np.arange(64 * 1024, dtype=np.float64).reshape(-1, 8)
    with node.client() as c:
        c.put(name, data)
        assert np.array_equal(c.fetch(name), data)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProc]:
    conf = tmp_path / "node.toml"
    conf.write_text(f"max_uploads = 40\nmax_uploads_per_connection = 16\n"
                    f"max_inline_bytes = {32 * MiB}\nmax_inline_bytes_per_connection = "
                    f"{16 * MiB}\ntransfer_timeout_s = {3 * SCALE}\n")
    c = Cluster(tmp_path)
    try:
        yield c.add("n1", extra=["--config", str(conf)])
    finally:
        c.stop()


def put_header(r: int, name: str, nbytes: int) -> list[bytes]:
    return [b"PUT", msgpack.packb({"r": r, "name": name, "shape": [nbytes // 8], "dtype": "<f8",
                                   "chunk_bytes": 4 * MiB, "by": "hostile"})]


def replies(sock: zmq.Socket, n: int) -> list[tuple[bytes, dict]]:
    out = []
    for _ in range(n):
        assert sock.poll(int(20_000 * SCALE)), f"only {len(out)} of {n} replies came"
        verb, hdr = sock.recv_multipart()[:2]
        out.append((verb, msgpack.unpackb(hdr)))
    return out


def test_put_headers_are_bounded(node: NodeProc) -> None:
    """1000 PUT headers from one socket, then from 40 more: past the limits each is refused
    with Overloaded at once, the daemon's fds stay bounded, and uploads resume once the
    abandoned ones are reaped."""
    base = fds(node)
    ctx = zmq.Context()
    try:
        one = ctx.socket(zmq.DEALER)
        one.connect(node.info["bulk"])
        for i in range(1000):
            one.send_multipart(put_header(i, f"A{i}", MiB))
        got = replies(one, 1000)
        ok = [h for v, h in got if v == b"OK"]
        refused = [h for v, h in got if v == b"ERR"]
        assert len(ok) == 16 and len(refused) == 984
        assert {h["type"] for h in refused} == {"Overloaded"}, refused[:3]
        assert fds(node) <= base + 16 + 4
        assert len(temp_files(node)) == 16
        still_serves(node, "OK1")  # the total limit (40) is not reached

        many = [ctx.socket(zmq.DEALER) for _ in range(40)]
        for k, s in enumerate(many):
            s.connect(node.info["bulk"])
            for i in range(25):
                s.send_multipart(put_header(i, f"B{k}-{i}", MiB))
        ok2 = sum(v == b"OK" for s in many for v, _ in replies(s, 25))
        assert ok2 == 40 - 16
        # uploads, connections, and a few for the datasets just served
        assert fds(node) <= base + 40 + len(many) + 1 + 10
        assert stats(node)["uploads_in_progress"] == 40
        with node.client() as c, pytest.raises(Overloaded, match="uploads are open"):
            c.put("REFUSED", np.zeros(10))
        # Abandoned: the reaper discards them (temp files too) after transfer_timeout_s.
        wait_for(lambda: stats(node)["uploads_in_progress"] == 0, 20, "the reaper")
        assert temp_files(node) == []
        still_serves(node, "OK2")
        assert node.alive()
    finally:
        ctx.destroy(linger=0)


def test_put_claims_are_checked_against_free_disk(node: NodeProc) -> None:
    """An upload bigger than the free disk is a StoreError before any file exists; one
    that fits alone but not beside the open uploads' claims is Overloaded until they end."""
    vfs = os.statvfs(node.data_dir)
    free = vfs.f_bavail * vfs.f_frsize
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.connect(node.info["bulk"])
        s.send_multipart(put_header(1, "HUGE", (free * 2) // 8 * 8))
        [(verb, hdr)] = replies(s, 1)
        assert verb == b"ERR" and hdr["type"] == StoreError.__name__, hdr
        assert "does not fit" in hdr["msg"] and temp_files(node) == []

        big = int(free * 0.6) // 4096 * 4096  # sparse: claims space, takes none yet
        s.send_multipart(put_header(2, "BIG1", big))
        s.send_multipart(put_header(3, "BIG2", big))
        (v1, h1), (v2, h2) = replies(s, 2)
        assert v1 == b"OK", h1
        assert v2 == b"ERR" and h2["type"] == "Overloaded" and "claim" in h2["msg"], h2
        s.send_multipart([b"ABORT", msgpack.packb({"r": 4, "u": h1["u"]})])
        wait_for(lambda: stats(node)["uploads_in_progress"] == 0, 10, "the abort")
        s.send_multipart(put_header(5, "BIG2", big))
        [(v3, h3)] = replies(s, 1)
        assert v3 == b"OK", h3
        s.send_multipart([b"ABORT", msgpack.packb({"r": 6, "u": h3["u"]})])
        wait_for(lambda: not temp_files(node), 10, "the temp file removed")
        assert stats(node)["uploads_refused"] == 2
        still_serves(node, "OK3")
    finally:
        ctx.destroy(linger=0)


def fetch_request(i: int, name: str) -> list[bytes]:
    return [b"", msgpack.packb([{"message_id": b"f%d" % i, "v": 3}, "fetch", [name]])]


def test_inline_fetch_bytes_are_bounded(node: NodeProc) -> None:
    """A client that asks for 15 MiB inline fetches and never reads the replies holds at
    most its connection's quota; another at most the rest; then everyone else gets
    Overloaded for big inline fetches (and puts) at once, while small ones and the bulk
    path work,
    and closing the hostile sockets frees the quota."""
    big = np.random.default_rng(0).random((15 * MiB - 4096) // 8)
    with node.client() as c:
        c.put("BIG", big)
        c.put("SMALL", np.arange(100.0))
    before = rss(node)
    ctx = zmq.Context()
    try:
        hostile = []
        for _ in range(2):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.RCVBUF, 4096)
            s.connect(node.rpc)
            for i in range(40):
                s.send_multipart(fetch_request(i, "BIG"))
            hostile.append(s)
        # One reply per connection (16 MiB quota each) is queued; the other 78 are refused.
        wait_for(lambda: stats(node)["inline"]["refused"] == 78, 30, "the refusals")
        st = stats(node)["inline"]
        assert st["bytes"] == 2 * big.nbytes and st["holders"] == 2
        # Unbounded, 80 queued replies of 15 MiB took over a GiB.
        assert rss(node) - before < 200 * MiB, (before, rss(node))
        with node.client() as c:
            with pytest.raises(Overloaded, match="inline put/fetch"):
                c._call("fetch", "BIG")
            small = c._call("fetch", "SMALL")
            assert np.frombuffer(small["data"], dtype=small["dtype"]).tolist() == list(
                np.arange(100.0))
            assert np.array_equal(c.fetch("BIG"), big)  # the bulk path is not affected
            ten = np.ones(10 * MiB // 8)
            with pytest.raises(Overloaded, match="inline put/fetch"):
                c._call("put", "TEN", ten.tobytes(), [ten.size], "<f8")
            c._call("put", "TINY", np.arange(4.0).tobytes(), [4], "<f8")
            assert c.fetch("TINY").tolist() == [0, 1, 2, 3]
        for s in hostile:
            s.close(linger=0)  # libzmq drops the queued replies with the connections
        wait_for(lambda: stats(node)["inline"]["bytes"] == 0, 20, "the quota freed")
        with node.client() as c:
            got = c._call("fetch", "BIG")
            assert np.array_equal(np.frombuffer(got["data"], dtype=got["dtype"]), big)
        # Released once libzmq has let go of the reply (polled): a moment after it arrived.
        wait_for(lambda: stats(node)["inline"]["bytes"] == 0, 10, "the last fetch's bytes freed")
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("bins", [150_000_000, 1_000_000_000, 10**18])
def test_histogram_bins_are_bounded(node: NodeProc, bins: int) -> None:
    """bins sized for gigabytes is a ParamError from explain and run before anything is
    allocated (it used to take the daemon to 3.5 GB, and 1e9 killed it)."""
    with node.client() as c:
        c.put("H", np.random.default_rng(1).random((100, 4)))
        before = rss(node)
        with pytest.raises(ParamError, match="bins"):
            c.explain(c.run("histogram", "H", bins=bins, range=[0, 1]))
        with pytest.raises(ParamError, match="bins"):
            c.run("histogram", "H", bins=bins, range=[0, 1]).fetch()
        assert rss(node) - before < 50 * MiB
        counts = c.run("histogram", "H", bins=1000, range=[0, 1]).fetch()[:, 2]
        assert counts.sum() == 400
    assert node.alive()


def test_quantile_count_is_bounded(node: NodeProc) -> None:
    """quantiles' output has a row per q: more than MAX_QUANTILES is a ParamError."""
    from hpcflow.ops.builtin import MAX_QUANTILES

    with node.client() as c:
        c.put("Q", np.random.default_rng(2).random((50, 3)))
        with pytest.raises(ParamError, match="quantiles"):
            c.explain(c.run("quantiles", "Q", q=[0.5] * (MAX_QUANTILES + 1)))
        got = c.run("quantiles", "Q", q=[0.5] * MAX_QUANTILES).fetch()
        assert got.shape == (MAX_QUANTILES, 3)


def test_gram_columns_are_bounded(node: NodeProc) -> None:
    """gram's output is columns x columns: 200 000 columns (a 3 MB input) asked for a
    320 GB output.  More than MAX_GRAM_COLS is an InputError before numpy allocates."""
    from hpcflow.ops.builtin import MAX_GRAM_COLS

    with node.client() as c:
        c.put("WIDE", np.ones((2, 200_000), dtype=np.float32))
        with pytest.raises(InputError, match="columns"):
            c.explain(c.run("gram", "WIDE"))
        with pytest.raises(InputError, match="columns"):
            c.run("gram", "WIDE").fetch()
        c.put("EDGE", np.ones((2, 64)))
        assert c.run("gram", "EDGE").fetch().shape == (64, 64)
    assert MAX_GRAM_COLS * MAX_GRAM_COLS * 8 <= 1 << 30
    assert node.alive()


def test_histogram_bins_from_a_rule_are_bounded(node: NodeProc) -> None:
    """A bin rule ('fd', 'auto') sizes the bins from the data: values with a tiny spread
    and one far outlier would ask for billions of bins, refused before allocation."""
    x = np.concatenate([np.linspace(0, 1e-6, 1000), [1e6]])[:, None]
    with node.client() as c:
        c.put("SPIKY", x)
        with pytest.raises(ParamError, match="bins"):
            c.run("histogram", "SPIKY", bins="fd").fetch()
        counts = c.run("histogram", "SPIKY", bins=10, range=[0, 1e6]).fetch()[:, 2]
        assert counts.sum() == 1001 and counts[0] == 1000
    assert node.alive()


def test_limits_are_typed_config() -> None:
    from hpcflow.config import NodeConfig
    from hpcflow.errors import ConfigError

    cfg = NodeConfig(data_dir=Path("x"))
    assert (cfg.max_uploads, cfg.max_uploads_per_connection) == (128, 16)
    assert (cfg.max_inline_bytes, cfg.max_inline_bytes_per_connection) == (64 * MiB, 32 * MiB)
    with pytest.raises(ConfigError, match="max_uploads"):
        NodeConfig(data_dir=Path("x"), max_uploads=4, max_uploads_per_connection=8)
    with pytest.raises(ConfigError, match="max_inline_bytes"):
        NodeConfig(data_dir=Path("x"), max_inline_bytes=-1)
    assert hpcflow.Overloaded is Overloaded


def test_inline_results_of_execute_count_against_the_inline_quota(tmp_path: Path) -> None:
    """A script that sends executions and never reads the replies could queue their
    inline results in the node; past the quota a result comes back as its location
    (the script pulls it from its holder) instead of riding in the reply."""
    conf = tmp_path / "node.toml"
    conf.write_text("max_inline_bytes = 8192\nmax_inline_bytes_per_connection = 4096\n")
    c = Cluster(tmp_path)
    try:
        n1 = c.add("n1", extra=["--config", str(conf)])
        wide = np.random.default_rng(3).random((50, 1000))  # colsum: 8000 B, over 4096
        narrow = np.random.default_rng(4).random((50, 8))   # colsum: 64 B
        with n1.client() as cl:
            cl.put("WIDE", wide)
            cl.put("NARROW", narrow)
            before = cl.stats()["inline"]["refused"]
            big, small = cl.run("colsum", "WIDE"), cl.run("colsum", "NARROW")
            np.testing.assert_allclose(big.fetch(), wide.sum(axis=0))
            np.testing.assert_allclose(small.fetch(), narrow.sum(axis=0))
            assert big.value is None and big.location is not None  # pulled from its holder
            assert small.value is not None  # inline, within the quota
            assert cl.stats()["inline"]["refused"] == before + 1
        wait_for(lambda: stats(n1)["inline"]["bytes"] == 0, 10, "the inline bytes freed")
    finally:
        c.stop()
