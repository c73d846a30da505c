"""A real 3-node cluster on loopback: catalog replication, membership, liveness."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import hpcflow
from tests.conftest import SCALE, TTL, Cluster, names_on, wait_for

#: Every test here that starts a cluster runs in both catalog modes (conftest.py).
CATALOG_MODES = ("replicated", "dht")


def test_put_is_visible_on_every_node(cluster: Cluster) -> None:
    data = np.arange(60, dtype=np.float64).reshape(20, 3)
    with cluster["n2"].client() as c:
        rec = c.put("DS1", data)
    assert rec.owner == "n2" and rec.shape == (20, 3) and rec.dtype == "<f8"
    assert rec.nbytes == data.nbytes and rec.checksum.startswith("xxh3:")
    for n in ("n1", "n3"):
        wait_for(lambda n=n: "DS1" in names_on(cluster[n]), 10, f"DS1 on {n}")
        with cluster[n].client() as c:
            loc = c.locate("DS1")
            assert loc["parts"][0]["holders"][0]["owner"] == "n2"
            # the holders' bulk endpoints, not every member's (O(N) per reply)
            assert loc["bulk"] == {"n2": cluster["n2"].info["bulk"]}
            assert np.array_equal(c.fetch("DS1"), data)


def test_join_through_one_peer_discovers_all(cluster: Cluster) -> None:
    # n1 was started with no peers and n3 joined via n2: n1 must still know n3.
    with cluster["n1"].client() as c:
        alive = {n["name"] for n in c.nodes() if n["alive"]}
    assert alive == {"n1", "n2", "n3"}


def test_late_joiner_gets_full_catalog(cluster: Cluster) -> None:
    for i, n in enumerate(("n1", "n2", "n3")):
        with cluster[n].client() as c:
            c.put(f"D{i}", np.full((5, 2), i, dtype=np.int32))
    want = {"D0", "D1", "D2"}
    wait_for(lambda: want <= names_on(cluster["n1"]), 10, "catalog on n1")
    late = cluster.add("n4", via="n3")
    wait_for(lambda: want <= names_on(late), 10, "snapshot on the late joiner")
    with late.client() as c:
        assert c.fetch("D1").tolist() == [[1, 1]] * 5


def test_killed_node_is_marked_dead_then_restored(cluster: Cluster) -> None:
    with cluster["n3"].client() as c:
        c.put("ON3", np.ones((10, 4)))
    wait_for(lambda: "ON3" in names_on(cluster["n1"]), 10, "ON3 on n1")
    cluster["n3"].kill(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: "ON3" not in names_on(cluster["n1"]), 10, "n3's entries withdrawn")
    elapsed = time.monotonic() - t0
    assert elapsed < TTL * SCALE + 2.0 * SCALE, f"dead peer noticed only after {elapsed:.1f} s"
    assert "ON3" in names_on(cluster["n1"], include_dead=True)
    with cluster["n1"].client() as c:
        with pytest.raises(hpcflow.DatasetNotFound, match="only on n3, which is not alive"):
            c.fetch("ON3")
        assert {n["name"]: n["alive"] for n in c.nodes()}["n3"] is False
    cluster["n3"].start()  # same data dir, new ephemeral ports: rejoins through n2
    wait_for(lambda: "ON3" in names_on(cluster["n1"]), 15, "n3's entries back on n1")
    with cluster["n1"].client() as c:
        assert np.array_equal(c.fetch("ON3"), np.ones((10, 4)))


def test_partitioned_dataset_across_nodes(cluster: Cluster) -> None:
    rows = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    for i, n in enumerate(("n1", "n2", "n3")):
        with cluster[n].client() as c:
            c.put("SIM", rows[i * 400 : (i + 1) * 400], part=i, nparts=3)
    def complete() -> bool:
        with cluster["n1"].client() as c:
            return bool(c.locate("SIM")["complete"])
    wait_for(complete, 10, "all SIM parts in n1's catalog")
    with cluster["n1"].client() as c:
        loc = c.locate("SIM")
        assert [(p["row_start"], p["row_stop"]) for p in loc["parts"]] == [
            (0, 400), (400, 800), (800, 1000)]
        assert [p["holders"][0]["owner"] for p in loc["parts"]] == ["n1", "n2", "n3"]
        assert np.array_equal(c.fetch("SIM"), rows)
        assert np.array_equal(c.fetch("SIM", part=1), rows[400:800])
        with pytest.raises(hpcflow.DatasetExists):
            c.put("SIM", rows[:10], part=2)  # part 2 lives on n3
        with pytest.raises(hpcflow.InvalidData, match="must match its other parts"):
            c.put("SIM", np.zeros((5, 4), np.float32), part=3)


def test_missing_part_is_reported(cluster: Cluster) -> None:
    with cluster["n1"].client() as c:
        c.put("GAP", np.zeros((4, 2)), part=0, nparts=2)
        with pytest.raises(hpcflow.DatasetNotFound, match=r"parts \[1\]"):
            c.fetch("GAP")


def test_delete_propagates_and_only_owner_may_delete(cluster: Cluster) -> None:
    with cluster["n2"].client() as c:
        c.put("TMP", np.zeros(8))
    wait_for(lambda: "TMP" in names_on(cluster["n1"]), 10, "TMP on n1")
    with cluster["n1"].client() as c, pytest.raises(hpcflow.NotOwner, match="n2"):
        c.delete("TMP")
    with cluster["n2"].client() as c:
        c.delete("TMP")
    wait_for(lambda: "TMP" not in names_on(cluster["n1"]), 10, "TMP gone from n1")


def test_errors_cross_the_wire_typed(cluster: Cluster) -> None:
    with cluster["n1"].client() as c:
        with pytest.raises(hpcflow.DatasetNotFound):
            c.describe("NOPE")
        c.put("X", np.zeros(3))
        with pytest.raises(hpcflow.DatasetExists):
            c.put("X", np.zeros(3))
        assert c.put("X", np.ones(3), overwrite=True).version == 2
        assert c.fetch("X").tolist() == [1.0, 1.0, 1.0]
        # A raw RPC with a path-like name must be refused by the daemon itself.
        with pytest.raises(hpcflow.InvalidName):
            c._call("locate", "../../etc/passwd")
        with pytest.raises(hpcflow.InvalidData):
            c._call("put", "Y", b"\x00" * 7, [2], "<f8")
        with pytest.raises(hpcflow.InvalidData):
            c._call("put", "Y", b"\x00" * 8, [1], "object")
        assert c.ping()["name"] == "n1"  # connection still usable


def test_inline_rpc_put_and_fetch(cluster: Cluster) -> None:
    arr = np.arange(12, dtype="<i8").reshape(3, 4)
    with cluster["n3"].client() as c:
        c._call("put", "INL", arr.tobytes(), [3, 4], "<i8")
    wait_for(lambda: "INL" in names_on(cluster["n1"]), 10, "INL on n1")
    with cluster["n1"].client() as c:
        got = c._call("fetch", "INL")
    assert np.frombuffer(got["data"], dtype=got["dtype"]).reshape(got["shape"]).tolist() == (
        arr.tolist())


def test_restart_keeps_inventory_and_sigterm_is_clean(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    n = c.add("solo")
    with n.client() as cl:
        cl.put("KEEP", np.arange(5))
    n.kill(signal.SIGTERM)
    assert n.proc is not None and n.proc.returncode == 0, n.log_tail()
    assert not (n.data_dir / "node.json").exists()
    n.start()
    with n.client() as cl:
        assert cl.fetch("KEEP").tolist() == [0, 1, 2, 3, 4]


def test_sigterm_does_not_wait_for_requests_in_flight(make_cluster) -> None:  # type: ignore[no-untyped-def]
    # A client blocked in a long ``wait`` must not hold the daemon's shutdown until
    # zerorpc gives up on it (it used to take ~15 s, 40 s with the client still there).
    import gevent

    c = make_cluster()
    n = c.add("busy")
    with n.client() as cl:
        pending = gevent.spawn(cl.wait_for, "NEVER", 120)
        gevent.sleep(0.2)  # let the request reach the daemon (nothing to await on our side)
        assert not pending.ready()
        t0 = time.monotonic()
        n.kill(signal.SIGTERM)
        took = time.monotonic() - t0
        pending.kill()
    assert n.proc is not None and n.proc.returncode == 0, n.log_tail()
    assert took < 6 * SCALE, f"stopping took {took:.1f} s with a request in flight"


def test_second_daemon_on_same_data_dir_is_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    n = c.add("a")
    r = subprocess.run([sys.executable, "-m", "hpcflow", "node", "--name", "b", "--data-dir",
                        str(n.data_dir), "--listen", "127.0.0.1:0"], capture_output=True,
                       text=True, timeout=60 * SCALE)
    assert r.returncode != 0 and "in use by another hpcflow node" in r.stderr


def test_cli_put_ls_get_json(cluster: Cluster, tmp_path: Path) -> None:
    src = tmp_path / "traj.h5"
    pos = np.random.default_rng(1).random((50, 8, 3)).astype(np.float32)
    with h5py.File(src, "w") as f:
        f.create_dataset("/particles/all/position/value", data=pos, chunks=(1, 8, 3))
    def cli(*args: str) -> dict:  # type: ignore[type-arg]
        r = subprocess.run([sys.executable, "-m", "hpcflow", *args, "--json"],
                           capture_output=True, text=True, timeout=60 * SCALE)
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout)  # type: ignore[no-any-return]
    put = cli("put", "--node", cluster["n2"].rpc, "TRAJ", str(src), "--dataset",
              "/particles/all/position")  # an H5MD element group: its "value" is used
    assert put["shape"] == [50, 8, 3] and put["owner"] == "n2"
    wait_for(lambda: "TRAJ" in names_on(cluster["n3"]), 10, "TRAJ on n3")
    ls = cli("ls", "--node", cluster["n3"].rpc)
    row = next(d for d in ls["datasets"] if d["name"] == "TRAJ")
    assert row["owner"] == "n2" and row["dtype"] == "<f4" and row["nbytes"] == pos.nbytes
    out = tmp_path / "out.h5"
    got = cli("get", "--node", cluster["n1"].rpc, "TRAJ", str(out))
    assert got["from"] == ["n2"] and got["checksum_verified"]
    with h5py.File(out) as f:
        assert np.array_equal(f["/data"][...], pos)
    r = subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node", cluster["n1"].rpc,
                        "NOPE", str(out), "--json"], capture_output=True, text=True,
                       timeout=60 * SCALE)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["type"] == "DatasetNotFound"


def test_wait_for_blocks_until_the_dataset_appears(cluster: Cluster) -> None:
    import gevent

    with cluster["n1"].client() as waiter, cluster["n3"].client() as writer:
        pending = gevent.spawn(waiter.wait_for, "LATER", 20)
        gevent.sleep(0)
        assert not pending.ready()
        writer.put("LATER", np.arange(3))
        loc = pending.get(timeout=20 * SCALE)
        assert loc["parts"][0]["holders"][0]["owner"] == "n3"
        with pytest.raises(hpcflow.DatasetNotFound, match="within"):
            waiter.wait_for("NEVER", 0.3)


def test_nodes_on_ipc_endpoints(tmp_path: Path) -> None:
    from tests.conftest import NodeProc

    a = NodeProc("ia", tmp_path / "ia", [], ["--listen", f"ipc://{tmp_path}/ia.sock"])
    try:
        a.start()
        b = NodeProc("ib", tmp_path / "ib", [a.rpc], ["--listen", f"ipc://{tmp_path}/ib.sock"])
        b.start()
        assert a.rpc.startswith("ipc://")
        with a.client() as c:
            c.put("IPC", np.arange(4))
        with b.client() as c:
            c.wait_for("IPC", 10)
            assert c.fetch("IPC").tolist() == [0, 1, 2, 3]
    finally:
        for n in (a, locals().get("b")):
            if n is not None:
                n.kill(signal.SIGTERM)


def test_clean_stop_says_goodbye(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A TTL far longer than the test: only the goodbye can withdraw the entries in time.
    cfg = tmp_path / "slow-ttl.toml"
    cfg.write_text("ttl_s = 120.0\n")
    c = make_cluster()
    a = c.add("a", extra=["--config", str(cfg)])
    b = c.add("b", via="a", extra=["--config", str(cfg)])
    with b.client() as cl:
        cl.put("BYEDATA", np.arange(3))
    wait_for(lambda: "BYEDATA" in names_on(a), 10, "BYEDATA on a")
    b.kill(signal.SIGTERM)
    wait_for(lambda: "BYEDATA" not in names_on(a), 10, "b's entries withdrawn on goodbye")


def test_duplicate_node_name_is_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    c = make_cluster()
    first = c.add("twin")
    r = subprocess.run([sys.executable, "-m", "hpcflow", "node", "--name", "twin", "--data-dir",
                        str(first.data_dir.parent / "twin2"), "--listen", "127.0.0.1:0",
                        "--peer", first.rpc], capture_output=True, text=True,
                       timeout=60 * SCALE)
    assert r.returncode == 2 and "already used" in r.stderr, r.stderr[-2000:]
    with first.client() as cl:
        assert [n["name"] for n in cl.nodes()] == ["twin"]


def test_connecting_to_nothing_fails_fast() -> None:
    import socket
    import time

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(hpcflow.PeerUnavailable, match="connection refused"):
        hpcflow.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_part_on_a_dead_node_is_missing_without_nparts(cluster: Cluster) -> None:
    # The issue's own example: parts put without nparts.  When n2 dies, its part is
    # missing, not silently dropped from a "complete" half-size dataset.
    rows = np.arange(4000, dtype=np.float64).reshape(2000, 2)
    with cluster["n1"].client() as c:
        c.put("SIM", rows[:1000], part=0)
    with cluster["n2"].client() as c:
        c.put("SIM", rows[1000:], part=1)
    with cluster["n3"].client() as c:
        wait_for(lambda: c.locate("SIM")["shape"] == [2000, 2], 10, "both parts on n3")
    cluster["n2"].kill(signal.SIGKILL)
    with cluster["n3"].client() as c:
        wait_for(lambda: len(c.locate("SIM")["parts"]) == 1, 10 + TTL, "n2 marked dead")
        loc = c.locate("SIM")
        assert loc["complete"] is False and loc["missing"] == [1]
        with pytest.raises(hpcflow.DatasetNotFound, match=r"parts \[1\]"):
            c.fetch("SIM")
        with pytest.raises(hpcflow.DatasetNotFound, match=r"parts \[1\]"):
            c._call("fetch", "SIM")  # the daemon's own read path too
        assert np.array_equal(c.fetch("SIM", part=0), rows[:1000])


def test_parts_on_one_node_must_agree(cluster: Cluster) -> None:
    with cluster["n1"].client() as c:
        c.put("Q", np.zeros((3, 2)), part=0)
        with pytest.raises(hpcflow.InvalidData, match="must match its other parts"):
            c.put("Q", np.ones((2, 5), np.int8), part=1)
        with pytest.raises(hpcflow.InvalidData, match="must match its other parts"):
            c._call("put", "Q", b"\x01" * 10, [2, 5], "|i1", 1)  # inline RPC put
        assert {r.key for r in c.catalog()} == {"Q@0"}
        c.put("Q", np.ones((2, 2)), part=1)  # a matching part is fine
        c.put("Q", np.full((4, 2), 7.0), part=0, overwrite=True)  # and replacing one
        assert c.fetch("Q").shape == (6, 2)


def test_parts_that_disagree_are_refused_on_read(make_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Parts already stored inconsistently (written by an older version, or copied in):
    # every read path refuses them instead of returning uninitialised memory.
    from hpcflow.catalog.store import Store

    store = Store(tmp_path / "c0" / "old", "old")
    store.open()
    store.put_array("Q", np.zeros((3, 2)), part=0)
    store.put_array("Q", np.ones((2, 5), np.int8), part=1)
    store.close()
    c = make_cluster()
    n = c.add("old")
    with n.client() as cl:
        assert {r.key for r in cl.catalog()} == {"Q@0", "Q@1"}
        for read in (lambda: cl.fetch("Q"), lambda: cl._call("fetch", "Q"),
                     lambda: cl.fetch_to("Q", tmp_path / "q.h5"), lambda: cl.locate("Q")):
            with pytest.raises(hpcflow.InvalidData, match="disagree"):
                read()
        assert not (tmp_path / "q.h5").exists()
        cl.delete("Q", part=1)
        assert cl.fetch("Q").shape == (3, 2)


def test_nparts_is_validated_everywhere(cluster: Cluster) -> None:
    with cluster["n1"].client() as c:
        for nparts, match in ((10**7, "between 1 and"), ("2", "positive integer"),
                              (0, "between 1 and")):
            with pytest.raises(hpcflow.InvalidData, match=match):
                c.put("P", np.zeros(3), part=0, nparts=nparts)  # type: ignore[arg-type]
            with pytest.raises(hpcflow.InvalidData, match=match):
                c._call("put", "P", b"\x00" * 24, [3], "<f8", 0, nparts)
            with pytest.raises(hpcflow.InvalidData, match=match):
                c.bulk.upload(c.node_bulk, c.node, "P", (3,), np.dtype("<f8"),
                              lambda slab: np.zeros(3)[slab], part=0, nparts=nparts,
                              chunk_bytes=4096)
        assert "P" not in {r.name for r in c.catalog()}
        assert c.stats()["uploads_in_progress"] == 0


def test_get_reports_user_errors_without_tracebacks(cluster: Cluster, tmp_path: Path) -> None:
    with cluster["n2"].client() as c:
        c.put("G", np.arange(12.0).reshape(4, 3))
    with cluster["n3"].client() as c:
        c.wait_for("G", 10)  # the put's announcement reaches n3 a moment later
        c.replicate("G")  # n2 and n3 hold G; a get through n3 reads n3's own copy

    def get(*args: str, json_out: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hpcflow", "get", "--node",
                               cluster["n3"].rpc, "G", *args, *(["--json"] if json_out else [])],
                              capture_output=True, text=True, timeout=60 * SCALE)
    for args, match in (([str(tmp_path / "a.h5"), "--h5path", "/a/"], "must name a dataset"),
                        ([str(tmp_path / "a.h5"), "--h5path", "/a/../b"], "'..'"),
                        ([str(tmp_path / "nodir" / "a.h5")], "does not exist"),
                        ([str(tmp_path / "nodir" / "a.npy")], "does not exist"),
                        ([str(tmp_path)], "is a directory")):
        r = get(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        err = json.loads(r.stdout)["error"]
        assert err["type"] == "InvalidData" and match in err["message"], err
        r = get(*args, json_out=False)
        assert r.returncode == 1 and r.stderr.startswith("hpcflow: error:"), r.stderr
    r = get(str(tmp_path / "ok.h5"), "--h5path", "data")  # relative: /data
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["from"] == ["n3"]  # the holder actually used
    with h5py.File(tmp_path / "ok.h5") as f:
        assert f["/data"].shape == (4, 3)
    assert not list(tmp_path.glob("*.partial-*"))
